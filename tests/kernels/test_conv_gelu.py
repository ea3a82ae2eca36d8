"""conv1d: wav2vec2's convolutions as implicit GEMMs over packed channels-last utterances, with the
GroupNorm / LayerNorm statistics split between producer and consumer, against ``F.conv1d`` (+ norms and
GELU) per utterance."""
import pytest
import torch
import torch.nn.functional as F

from qa_app.kernels import conv_gelu
from qa_app.kernels.conv_gelu import (PER_CHANNEL, PER_ROW, TILES, InputNorm, Packed, conv1d, conv1d_reference,
                                      conv_output_lengths, pack_conv_weight)

EPS = 1e-5
LENS = [355, 60, 131]  # samples: 70, 11 and 25 frames after the first layer (taps 10, stride 5)


@pytest.fixture
def tiles_used(monkeypatch):
    """The tile each conv1d call ran with (on a CPU the cache returns the first candidate), so a test can
    check which load path (contiguous taps: CG_IN % BLOCK_K == 0, or the general gather) it exercised."""
    used = []
    choose = conv_gelu.TILE_CACHE.choose

    def spy(kernel, shape, candidates, time_ms, device):
        name = choose(kernel, shape, candidates, time_ms, device)
        used.append(TILES[name])
        return name

    monkeypatch.setattr(conv_gelu.TILE_CACHE, "choose", spy)
    return used


def _per_utterance(x, packed, fn):
    """fn applied to each utterance as [1, C, T], results packed back channels-last."""
    return torch.cat([fn(x[s:s + n].t().unsqueeze(0))[0].t() for s, n in zip(packed.starts, packed.lengths)])


def _layers(channels):
    w0 = torch.randn(channels, 1, 10) * 0.3
    b0 = torch.randn(channels) * 0.1
    w1 = torch.randn(channels, channels, 3) / (3 * channels) ** 0.5
    b1 = torch.randn(channels) * 0.1
    gamma, beta = torch.rand(channels) + 0.5, torch.randn(channels) * 0.1
    return w0, b0, w1, b1, gamma, beta


def _check_path(tile, cg_in, contiguous):
    assert (cg_in % tile[2] == 0) == contiguous, (tile, cg_in)


def test_output_lengths_and_weight_packing():
    assert conv_output_lengths([355, 60, 9, 10], 10, 5, 0) == [70, 11, 0, 1]
    assert conv_output_lengths([7], 8, 1, 4) == [8]  # even taps, wav2vec2's positional conv: one extra row
    w = torch.randn(4, 3, 5)
    packed = pack_conv_weight(w)
    assert packed.shape == (4, 15) and packed.is_contiguous()
    assert torch.equal(packed[2, 1 * 3 + 2], w[2, 2, 1])  # column = tap * C_in + channel


def test_conv_matches_reference(close):
    """The plain layer (bias, no norms) against ``conv1d_reference``."""
    packed = Packed(LENS)
    x = torch.randn(packed.rows, 1)
    w, b = torch.randn(16, 1, 10), torch.randn(16)
    out, out_packed, stats = conv1d(x, packed, pack_conv_weight(w), b, 10, 5)
    assert out_packed.lengths == [70, 11, 25] and stats is None
    close(out, conv1d_reference(x, packed, w, b, 5))


@pytest.mark.parametrize("channels,contiguous", [(16, False), (64, True)])
def test_group_norm_chain(close, tiles_used, channels, contiguous):
    """wav2vec2-base's feature encoder start: layer 0 stores its raw output and gathers per-utterance,
    per-channel sums and sums of squares in its epilogue (its 70 frames take two 64-row tiles whose sums must
    add up); layer 1 applies the GroupNorm (one group per channel) and GELU while loading (``in_norm``
    PER_CHANNEL + ``in_gelu``), then its own GELU. Channels 64 load layer 1's input by the contiguous-tap
    path, 16 by the general gather."""
    w0, _, w1, b1, gamma, beta = _layers(channels)
    packed = Packed(LENS)
    x = torch.randn(packed.rows, 1)
    h0, p0, stats = conv1d(x, packed, pack_conv_weight(w0), None, 10, 5, out_stats=PER_CHANNEL)
    raw0 = conv1d_reference(x, packed, w0, None, 5)
    close(h0, raw0)
    assert stats.shape == (3, channels, 2)
    close(stats, torch.stack([torch.stack([raw0[s:s + n].sum(0), (raw0[s:s + n] ** 2).sum(0)], -1)
                              for s, n in zip(p0.starts, p0.lengths)]))

    h1, p1, _ = conv1d(h0, p0, pack_conv_weight(w1), b1, 3, 2, in_norm=InputNorm(PER_CHANNEL, stats, gamma, beta, EPS),
                       in_gelu=True, out_gelu=True)
    assert p1.lengths == [34, 5, 12]
    _check_path(tiles_used[-1], channels, contiguous)
    ref = _per_utterance(x, packed, lambda a: F.gelu(F.conv1d(F.gelu(F.group_norm(
        F.conv1d(a, w0, None, 5), channels, gamma, beta, EPS)), w1, b1, 2)))
    close(h1, ref)


@pytest.mark.parametrize("channels,contiguous", [(16, False), (64, True)])
def test_layer_norm_chain(close, tiles_used, channels, contiguous):
    """The layer-norm feature encoder: each layer's epilogue gathers per-row sums and sums of squares; the
    next normalises over channels and applies GELU while loading (``in_norm`` PER_ROW + ``in_gelu``)."""
    w0, b0, w1, b1, gamma, beta = _layers(channels)
    packed = Packed(LENS)
    x = torch.randn(packed.rows, 1)
    h0, p0, st0 = conv1d(x, packed, pack_conv_weight(w0), b0, 10, 5, out_stats=PER_ROW)
    h1, _, st1 = conv1d(h0, p0, pack_conv_weight(w1), b1, 3, 2, in_norm=InputNorm(PER_ROW, st0, gamma, beta, EPS),
                        in_gelu=True, out_stats=PER_ROW)
    _check_path(tiles_used[-1], channels, contiguous)

    ref0 = conv1d_reference(x, packed, w0, b0, 5)
    close(h0, ref0)
    close(st0, torch.stack([ref0.sum(1), (ref0 ** 2).sum(1)], -1))
    ref1 = _per_utterance(x, packed, lambda a: F.conv1d(
        F.gelu(F.layer_norm(F.conv1d(a, w0, b0, 5).transpose(1, 2), (channels,), gamma, beta, EPS)).transpose(1, 2),
        w1, b1, 2))
    close(h1, ref1)
    close(st1, torch.stack([ref1.sum(1), (ref1 ** 2).sum(1)], -1))


@pytest.mark.parametrize("mode", [PER_CHANNEL, PER_ROW])
@pytest.mark.parametrize("channels,contiguous", [(16, False), (64, True)])
def test_input_norm_with_padding(close, tiles_used, mode, channels, contiguous):
    """A zero-padded layer (pad 2) that normalises its input while loading: the padding is zeros of the
    *normalised* signal (as F.conv1d on the normalised tensor has), not normalised zeros (which would be
    beta, or GELU of it)."""
    w0, b0, w1, b1, gamma, beta = _layers(channels)
    beta = beta + 1.0  # normalised zeros would be far from zero
    packed = Packed(LENS)
    x = torch.randn(packed.rows, 1)
    h0, p0, st = conv1d(x, packed, pack_conv_weight(w0), b0, 10, 5, out_stats=mode)
    h1, p1, _ = conv1d(h0, p0, pack_conv_weight(w1), b1, 3, 1, pad=2, in_norm=InputNorm(mode, st, gamma, beta, EPS),
                       in_gelu=True)
    assert p1.lengths == [n + 2 for n in p0.lengths]
    _check_path(tiles_used[-1], channels, contiguous)

    def norm(y):
        if mode == PER_CHANNEL:
            return F.group_norm(y, channels, gamma, beta, EPS)
        return F.layer_norm(y.transpose(1, 2), (channels,), gamma, beta, EPS).transpose(1, 2)

    close(h1, _per_utterance(x, packed, lambda a: F.conv1d(F.gelu(norm(F.conv1d(a, w0, b0, 5))), w1, b1, 1, 2)))


@pytest.mark.parametrize("channels,groups,taps,contiguous", [(32, 4, 8, False), (128, 2, 3, True)])
def test_positional_conv(close, tiles_used, channels, groups, taps, contiguous):
    """The transformer's positional convolution: grouped, zero-padded by taps // 2 at each utterance's edges
    (never reading a neighbour's rows), GELU and the residual add fused; with even taps the extra last
    output row is dropped (``out_lengths`` = input lengths)."""
    lens = [70, 1, 25]
    packed = Packed(lens)
    h = torch.randn(packed.rows, channels)
    w, b = torch.randn(channels, channels // groups, taps) * 0.1, torch.randn(channels)
    out, out_packed, _ = conv1d(h, packed, pack_conv_weight(w), b, taps, 1, pad=taps // 2, groups=groups,
                                out_gelu=True, residual=h, out_lengths=lens if taps % 2 == 0 else None)
    assert out_packed.lengths == lens
    _check_path(tiles_used[-1], channels // groups, contiguous)
    ref = torch.cat([hs + F.gelu(F.conv1d(hs.t()[None], w, b, 1, taps // 2, groups=groups))[0, :, :n].t()
                     for hs, n in ((h[s:s + n], n) for s, n in zip(packed.starts, lens))])
    close(out, ref)


@pytest.mark.parametrize("channels", [16, 64])
def test_utterance_boundaries(channels):
    """An utterance's outputs (and statistics) are the same bits whether it is packed alone or between
    others, including a neighbour too short for any output frame: no tile straddles two utterances, no
    tap reads across a boundary, and statistics go to their own utterance."""
    w0, b0, w1, b1, gamma, beta = _layers(channels)
    wp, bp = torch.randn(channels, channels // 4, 8) * 0.1, torch.randn(channels)
    lens = [355, 7, 131, 60]  # 7 samples: no frame at all

    def run(lengths, x):
        """Layers 0 -> 1 as GroupNorm and as LayerNorm chains, a positional conv: [(out, its Packed)], stats."""
        packed = Packed(lengths)
        pw0 = pack_conv_weight(w0)
        h0, p0, stats = conv1d(x, packed, pw0, None, 10, 5, out_stats=PER_CHANNEL)
        g1, p1, _ = conv1d(h0, p0, pack_conv_weight(w1), b1, 3, 2,
                           in_norm=InputNorm(PER_CHANNEL, stats, gamma, beta, EPS), in_gelu=True, out_gelu=True)
        r0, _, st = conv1d(x, packed, pw0, b0, 10, 5, out_stats=PER_ROW)
        r1, _, _ = conv1d(r0, p0, pack_conv_weight(w1), b1, 3, 2,
                           in_norm=InputNorm(PER_ROW, st, gamma, beta, EPS), in_gelu=True)
        pos, p2, _ = conv1d(h0, p0, pack_conv_weight(wp), bp, 8, 1, pad=4, groups=4, out_gelu=True, residual=h0,
                            out_lengths=p0.lengths)
        return [(h0, p0), (g1, p1), (r1, p1), (pos, p2)], stats

    x = torch.randn(sum(lens), 1)
    outs, stats = run(lens, x)
    assert [p.lengths for _, p in outs] == [[70, 0, 25, 11], [34, 0, 12, 5], [34, 0, 12, 5], [70, 0, 25, 11]]
    sample_starts = Packed(lens).starts
    for i, n in enumerate(lens):
        if i == 1:
            continue
        alone, alone_stats = run([n], x[sample_starts[i]:sample_starts[i] + n])
        assert torch.equal(alone_stats[0], stats[i])
        for (together, packed), (by_itself, _) in zip(outs, alone):
            part = together[packed.starts[i]:packed.starts[i] + packed.lengths[i]]
            assert part.shape[0] > 0 and torch.equal(part, by_itself), (i, by_itself.shape)


def test_statistics_are_per_utterance(close):
    """The GroupNorm on load uses each utterance's own statistics: swapping two utterances' statistics changes
    both (guards the GroupNorm tests above against statistics that do not matter)."""
    w0, _, w1, b1, gamma, beta = _layers(16)
    packed = Packed([355, 131])
    x = torch.randn(packed.rows, 1)
    x[355:] *= 4
    h0, p0, stats = conv1d(x, packed, pack_conv_weight(w0), None, 10, 5, out_stats=PER_CHANNEL)

    def layer1(st):
        return conv1d(h0, p0, pack_conv_weight(w1), b1, 3, 2, in_norm=InputNorm(PER_CHANNEL, st, gamma, beta, EPS))[0]

    good, swapped = layer1(stats), layer1(stats.flip(0).contiguous())
    assert not torch.allclose(good, swapped, atol=1e-2)
    close(good, _per_utterance(x, packed, lambda a: F.conv1d(F.group_norm(F.conv1d(a, w0, None, 5), 16, gamma, beta,
                                                                           EPS), w1, b1, 2)))
