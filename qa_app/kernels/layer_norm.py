"""Fused residual add + LayerNorm (+ GELU after it, as wav2vec2's layer-norm feature encoder does)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qa_app.kernels import gelu, next_power_of_2, normalize_rows


@triton.jit
def _layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, M, N, stride_x, stride_r, stride_o, eps,
                       HAS_RES: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = normalize_rows(x, mask, cols, w_ptr, b_ptr, N, eps)
    if GELU:
        y = gelu(y)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """``gelu?(LayerNorm(x + residual))`` over the last dim of a [M, N] tensor."""
    m, n = x.shape
    out = torch.empty_like(x)
    block_n = next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    res = residual if residual is not None else x
    _layer_norm_kernel[(triton.cdiv(m, block_m),)](
        x, res, weight, bias, out, m, n, x.stride(0), res.stride(0), out.stride(0), eps,
        HAS_RES=residual is not None, GELU=gelu, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4 if block_n * block_m <= 4096 else 8)
    return out


def layer_norm_reference(x, weight, bias, eps, residual=None, gelu=False):
    y = x.float() + (residual.float() if residual is not None else 0)
    y = torch.nn.functional.layer_norm(y, (x.shape[-1],), weight.float(), bias.float(), eps)
    return (torch.nn.functional.gelu(y) if gelu else y).to(x.dtype)
