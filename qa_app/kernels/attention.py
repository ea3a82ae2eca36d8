"""Multi-head attention over packed, padding-free sequences (FlashAttention-style online softmax).

Tokens of all sequences sit back to back in one [tokens, 3 * hidden] tensor (the fused QKV projection's
output: queries, keys, values side by side, heads inside each); sequence ``s`` starts at row
``starts[s]`` and has ``q_lens[s]`` queries attending to its first ``kv_lens[s]`` keys. Packed input
uses ``q_lens == kv_lens`` (no work on padding at all); a padded batch is the same call with every
``q_len`` the padded length and ``kv_len`` the real one. Programs past a sequence's end return at once.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_kernel(qkv_ptr, out_ptr, starts_ptr, q_lens_ptr, kv_lens_ptr, stride_qkv, stride_o, qk_scale,
                      HIDDEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(starts_ptr + seq).to(tl.int64)
    q_len = tl.load(q_lens_ptr + seq)
    kv_len = tl.load(kv_lens_ptr + seq)
    if block * BLOCK_M < q_len:
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        base = qkv_ptr + start * stride_qkv + head * HEAD_DIM
        q = tl.load(base + rows[:, None] * stride_qkv + dims[None, :], mask=rows[:, None] < q_len, other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        for n0 in range(0, kv_len, BLOCK_N):
            keys = n0 + tl.arange(0, BLOCK_N)
            key_ok = keys < kv_len
            k = tl.load(base + HIDDEN + keys[None, :] * stride_qkv + dims[:, None], mask=key_ok[None, :], other=0.0)
            s = tl.dot(q, k) * qk_scale  # log2 units: exp2 below
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(base + 2 * HIDDEN + keys[:, None] * stride_qkv + dims[None, :], mask=key_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        out = out_ptr + start * stride_o + head * HEAD_DIM + rows[:, None] * stride_o + dims[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < q_len)


def attention(qkv: torch.Tensor, starts: torch.Tensor, q_lens: torch.Tensor, kv_lens: torch.Tensor,
              max_q_len: int, heads: int) -> torch.Tensor:
    """qkv [tokens, 3 * hidden] -> context [tokens, hidden]; starts/q_lens/kv_lens int32 [sequences].

    ``max_q_len`` bounds the grid (a CUDA graph captures it at the bucket's longest allowed sequence).
    Rows that belong to no sequence are left unwritten.
    """
    tokens, width = qkv.shape
    hidden = width // 3
    head_dim = hidden // heads
    out = torch.empty(tokens, hidden, dtype=qkv.dtype, device=qkv.device)
    block = 16 if max_q_len <= 16 else 32 if max_q_len <= 32 else 64
    grid = (triton.cdiv(max_q_len, block), starts.numel(), heads)
    _attention_kernel[grid](qkv, out, starts, q_lens, kv_lens, qkv.stride(0), out.stride(0),
                            math.log2(math.e) / math.sqrt(head_dim), HIDDEN=hidden, HEAD_DIM=head_dim,
                            BLOCK_M=block, BLOCK_N=block, num_warps=4 if block == 64 else 2, num_stages=2)
    return out


def attention_reference(qkv, starts, q_lens, kv_lens, heads):
    hidden = qkv.shape[1] // 3
    out = torch.zeros(qkv.shape[0], hidden, dtype=qkv.dtype, device=qkv.device)
    for start, q_len, kv_len in zip(starts.tolist(), q_lens.tolist(), kv_lens.tolist()):
        q, k, v = (qkv[start:start + n, i * hidden:(i + 1) * hidden].float().view(n, heads, -1).transpose(0, 1)
                   for i, n in ((0, q_len), (1, kv_len), (2, kv_len)))
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out[start:start + q_len] = ctx.transpose(0, 1).reshape(q_len, hidden).to(qkv.dtype)
    return out
