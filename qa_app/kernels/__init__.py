"""Triton kernels for the models' FP16 fast path on CUDA: functions on tensors, no model or serving knowledge.

One kernel per module, each with its plain PyTorch reference beside it (``*_reference``), which the tests
and ``benchmarks/check_kernels.py`` compare against. On a CPU the kernels run only under
``TRITON_INTERPRET=1`` (the tests' small shapes); the models' CPU path is plain PyTorch.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

SQRT1_2 = 1.0 / math.sqrt(2.0)


@triton.jit
def gelu(x):
    """Exact (erf) GELU, as BERT and wav2vec2 use; x in fp32."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
