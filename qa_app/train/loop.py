"""What the trainers share: seeding, AdamW with linear warm-up and decay, one clipped optimisation step, and a
step count fitted to a time budget."""
from __future__ import annotations

import logging
import random
import time

import numpy as np
import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's random generators, for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def steps_within(one_step, device: torch.device, minutes: float, most: int) -> int:
    """Time a few training passes (``one_step``: forward + backward, no update) and return how many steps fit
    in ``minutes``, at most ``most``. The caller zeroes the gradients afterwards."""
    for number in range(10):
        if number == 3:  # the first passes pay for kernel selection and allocation
            if device.type == "cuda":
                torch.cuda.synchronize()
            probe = time.time()
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.time() - probe) / 7
    steps = max(10, min(most, int(minutes * 60 / per_step)))
    log.info("%.3f s per step: %d steps fit in %.1f minutes", per_step, steps, minutes)
    return steps
