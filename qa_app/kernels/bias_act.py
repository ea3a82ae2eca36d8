"""Fused bias + GELU (+ residual): the epilogue of a GEMM that ran elsewhere (cuBLAS), in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qa_app.kernels import gelu


@triton.jit
def _bias_act_kernel(x_ptr, bias_ptr, res_ptr, out_ptr, numel, N,
                     HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = gelu(x)
    if HAS_RES:
        x += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def bias_act(x: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
             residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu?(x + bias) + residual`` over a contiguous [M, N] tensor (in place when ``out`` is ``x``)."""
    out = torch.empty_like(x) if out is None else out
    numel, n = x.numel(), x.shape[-1]
    block = 1024
    _bias_act_kernel[(triton.cdiv(numel, block),)](
        x, bias if bias is not None else x, residual if residual is not None else x, out, numel, n,
        HAS_BIAS=bias is not None, GELU=gelu, HAS_RES=residual is not None, BLOCK=block)
    return out


def bias_act_reference(x, bias=None, gelu=False, residual=None):
    y = x.float() + (bias.float() if bias is not None else 0)
    y = torch.nn.functional.gelu(y) if gelu else y
    return (y + (residual.float() if residual is not None else 0)).to(x.dtype)
