"""Triton kernels for the models' FP16 fast path on CUDA: functions on tensors, no model or serving knowledge.

One kernel per module, each with its plain PyTorch reference beside it (``*_reference``), which the tests
and ``benchmarks/check_kernels.py`` compare against. On a CPU the kernels run only under
``TRITON_INTERPRET=1`` (the tests' small shapes); the models' CPU path is plain PyTorch.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

SQRT1_2 = 1.0 / math.sqrt(2.0)


@triton.jit
def gelu(x):
    """Exact (erf) GELU, as BERT and wav2vec2 use; x in fp32."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def normalize_rows(x, mask, cols, w_ptr, b_ptr, N, eps):
    """LayerNorm of each row of an fp32 [rows, BLOCK_N] tile whose valid entries are ``mask``."""
    mean = tl.sum(x, axis=1) / N
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    return centred * rstd[:, None] * w[None, :] + b[None, :]


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host metadata (lengths, tile tables, token ids) onto the GPU without stalling the host: a copy from
    pageable memory waited for the stream (about 150 us per copy behind a busy GPU, measured on the H100:
    19 such copies per speech batch made the whole forward host-bound), one from pinned memory is queued.
    The pinned block comes from torch's caching host allocator, reused only after its copy has run."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=None)
def is_hopper(device: torch.device) -> bool:
    """sm_90 or newer (TMA, wgmma); cached: asking the driver on every kernel call cost ~20 us."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
