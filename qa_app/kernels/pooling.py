"""Mean pooling over packed sequences, L2-normalised: the bi-encoder's sentence vector, deterministic
(one program per sequence, no atomics), in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qa_app.kernels import next_power_of_2


@triton.jit
def _mean_pool_kernel(x_ptr, starts_ptr, lens_ptr, out_ptr, N, stride_x, NORMALIZE: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.program_id(0)
    start = tl.load(starts_ptr + seq).to(tl.int64)
    length = tl.load(lens_ptr + seq)
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t0 in range(0, length, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = (ts[:, None] < length) & (cols[None, :] < N)
        x = tl.load(x_ptr + (start + ts)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    mean = acc / tl.maximum(length, 1).to(tl.float32)
    if NORMALIZE:
        mean = mean / tl.maximum(tl.sqrt(tl.sum(mean * mean, axis=0)), 1e-12)
    tl.store(out_ptr + seq * N + cols, mean, mask=cols < N)


def mean_pool(x: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """x [tokens, N] packed -> float32 [sequences, N]: the mean of each sequence's rows (zero for an empty
    one), unit length when ``normalize``."""
    n = x.shape[1]
    out = torch.empty(starts.numel(), n, dtype=torch.float32, device=x.device)
    block_n = next_power_of_2(n)
    _mean_pool_kernel[(starts.numel(),)](x, starts, lens, out, n, x.stride(0), NORMALIZE=normalize,
                                         BLOCK_T=max(1, 4096 // block_n), BLOCK_N=block_n, num_warps=4)
    return out


def mean_pool_reference(x, starts, lens, normalize=True):
    out = torch.stack([x[s:s + n].float().mean(0) if n else x.new_zeros(x.shape[1], dtype=torch.float32)
                       for s, n in zip(starts.tolist(), lens.tolist())])
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out
