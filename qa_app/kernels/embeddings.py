"""Fused BERT embeddings: word + position + token-type lookup and LayerNorm in one pass over packed tokens."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qa_app.kernels import next_power_of_2, normalize_rows


@triton.jit
def _embeddings_kernel(ids_ptr, types_ptr, positions_ptr, word_ptr, position_ptr, type_ptr, w_ptr, b_ptr, out_ptr,
                       M, N, eps, HAS_TYPES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    positions = tl.load(positions_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    x = tl.load(word_ptr + ids[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x += tl.load(position_ptr + positions[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_TYPES:
        types = tl.load(types_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        types = tl.zeros([BLOCK_M], dtype=tl.int64)
    x += tl.load(type_ptr + types[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = normalize_rows(x, mask, cols, w_ptr, b_ptr, N, eps)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def embeddings(input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
               word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor,
               weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(word[ids] + position[positions] + token_type[types]): [tokens] ids in, [tokens, hidden] out.
    No token type ids means type 0 everywhere."""
    m, n = input_ids.numel(), word.shape[1]
    out = torch.empty(m, n, dtype=word.dtype, device=word.device)
    block_n = next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    _embeddings_kernel[(triton.cdiv(m, block_m),)](
        input_ids, token_type_ids if token_type_ids is not None else input_ids, position_ids, word, position,
        token_type, weight, bias, out, m, n, eps, HAS_TYPES=token_type_ids is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out


def embeddings_reference(input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias, eps):
    types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
    x = word[input_ids].float() + position[position_ids].float() + token_type[types].float()
    return torch.nn.functional.layer_norm(x, (word.shape[1],), weight.float(), bias.float(), eps).to(word.dtype)
