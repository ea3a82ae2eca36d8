"""attention: multi-head attention over packed sequences (online softmax), against ``attention_reference``
(``scaled_dot_product_attention`` per sequence)."""
import pytest
import torch

from qa_app.kernels.attention import attention, attention_reference


def _packed(lens, heads, head_dim=16):
    starts = torch.tensor([sum(lens[:i]) for i in range(len(lens))], dtype=torch.int32)
    qkv = torch.randn(sum(lens), 3 * heads * head_dim)
    return qkv, starts, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("lens,heads", [
    ([3, 1, 16, 9], 2),        # max 16: 16-row blocks, a sequence filling one block exactly
    ([5, 17, 1, 33], 3),       # max 33: 64-row blocks; three heads (hidden 48, not a power of two)
    ([1, 70, 150, 64], 2),     # 70 and 150 span several 64-row query blocks and several key blocks
])
def test_packed(close, lens, heads):
    """Packed (q_lens == kv_lens): ragged lengths, length 1 included; every sequence's rows match
    attention over that sequence alone."""
    qkv, starts, lens_t = _packed(lens, heads)
    got = attention(qkv, starts, lens_t, lens_t, max(lens), heads)
    close(got, attention_reference(qkv, starts, lens_t, lens_t, heads))


def test_grid_larger_than_sequences(close):
    """``max_q_len`` above every length (a CUDA-graph bucket's bound): the extra query blocks do nothing."""
    qkv, starts, lens_t = _packed([5, 12], 2)
    got = attention(qkv, starts, lens_t, lens_t, 128, 2)
    close(got, attention_reference(qkv, starts, lens_t, lens_t, 2))


def test_padded(close):
    """Padded mode: every sequence padded to 20 rows, q_len = 20, kv_len = the real length. Padding rows hold
    large values, so a padding key that leaked into the softmax would change every query's result. Real
    rows must equal packed attention over the unpadded tokens; padding rows' queries see the real keys only."""
    lens, padded, heads = [20, 7, 1], 20, 2
    hidden = heads * 16
    qkv = torch.randn(len(lens) * padded, 3 * hidden)
    for i, n in enumerate(lens):
        qkv[i * padded + n:(i + 1) * padded] = 50 * torch.randn(padded - n, 3 * hidden)
    starts = torch.arange(len(lens), dtype=torch.int32) * padded
    q_lens = torch.full((len(lens),), padded, dtype=torch.int32)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    got = attention(qkv, starts, q_lens, kv_lens, padded, heads)
    close(got, attention_reference(qkv, starts, q_lens, kv_lens, heads))

    real = torch.cat([torch.arange(i * padded, i * padded + n) for i, n in enumerate(lens)])
    p_qkv, p_starts, p_lens = _packed(lens, heads)
    p_qkv.copy_(qkv[real])
    packed = attention(p_qkv, p_starts, p_lens, p_lens, max(lens), heads)
    close(got[real], packed)


@pytest.mark.parametrize("same_grid", [True, False])
def test_batch_invariance(same_grid):
    """A sequence's result does not depend on the other sequences in the batch: computed alone and packed
    with others, its rows agree bit for bit at the same ``max_q_len`` (the same grid and block size), and
    within 1e-6 when alone it gets its own, smaller block size."""
    lens, heads = [5, 17, 1, 150, 64], 2
    qkv, starts, lens_t = _packed(lens, heads)
    qkv *= 3  # sharper softmax: summation-order effects would show
    packed = attention(qkv, starts, lens_t, lens_t, max(lens), heads)
    for s, n in zip(starts.tolist(), lens):
        one = torch.tensor([n], dtype=torch.int32)
        alone = attention(qkv[s:s + n].clone(), torch.zeros(1, dtype=torch.int32), one, one,
                          max(lens) if same_grid else n, heads)
        if same_grid:
            assert torch.equal(alone, packed[s:s + n]), n
        else:
            torch.testing.assert_close(alone, packed[s:s + n], atol=1e-6, rtol=0)
