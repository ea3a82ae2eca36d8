"""What both trainers share: AdamW with linear warm-up and decay, and one clipped optimisation step."""
from __future__ import annotations

import torch


def adamw_with_warmup(model: torch.nn.Module, learning_rate: float, total_steps: int, warmup_fraction: float):
    """AdamW (weight decay 0.01) and a schedule rising linearly to the rate, then falling linearly to 0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, int(total_steps * warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    return optimizer, scheduler


def step(loss: torch.Tensor, model: torch.nn.Module, optimizer, scheduler) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
