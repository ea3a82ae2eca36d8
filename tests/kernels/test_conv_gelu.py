"""conv1d: wav2vec2's convolutions as implicit GEMMs over packed channels-last utterances, each layer storing
its output already normalised (GroupNorm per utterance and channel, or LayerNorm per row) and through GELU,
against ``F.conv1d`` (+ norms and GELU) per utterance."""
import pytest
import torch
import torch.nn.functional as F

from qa_app.kernels import conv_gelu
from qa_app.kernels.conv_gelu import (FIRST_TILES, PER_CHANNEL, PER_ROW, TILES, WINDOW_TILES, OutputNorm, Packed,
                                      conv1d, conv1d_reference, conv_output_lengths, pack_conv_weight)

EPS = 1e-5
LENS = [355, 60, 131]  # samples: 70, 11 and 25 frames after the first layer (taps 10, stride 5)


@pytest.fixture
def tiles_used(monkeypatch):
    """The tile each conv1d call ran with (on a CPU the cache returns the first candidate), so a test can
    check which load path (whole K blocks of a tap's channels, or a partly masked last block) it exercised."""
    used = []
    choose = conv_gelu.TILE_CACHE.choose

    def spy(kernel, shape, candidates, time_ms, device):
        name = choose(kernel, shape, candidates, time_ms, device)
        used.append({**FIRST_TILES, **TILES, **WINDOW_TILES}[name])
        return name

    monkeypatch.setattr(conv_gelu.TILE_CACHE, "choose", spy)
    return used


def _per_utterance(x, packed, fn):
    """fn applied to each (non-empty) utterance as [1, C, T], results packed back channels-last."""
    return torch.cat([fn(x[s:s + n].t().unsqueeze(0))[0].t() for s, n in zip(packed.starts, packed.lengths) if n])


def _layers(channels):
    w0 = torch.randn(channels, 1, 10) * 0.3
    b0 = torch.randn(channels) * 0.1
    w1 = torch.randn(channels, channels, 3) / (3 * channels) ** 0.5
    b1 = torch.randn(channels) * 0.1
    gamma, beta = torch.rand(channels) + 0.5, torch.randn(channels) * 0.1
    return w0, b0, w1, b1, gamma, beta


def _layer_norm(y, gamma, beta):
    """F.layer_norm over the channels of [1, C, T]."""
    return F.layer_norm(y.transpose(1, 2), (y.shape[1],), gamma, beta, EPS).transpose(1, 2)


def _check_path(tile, cg_in, whole_blocks):
    assert (cg_in % tile[2] == 0) == whole_blocks, (tile, cg_in)


def test_output_lengths_and_weight_packing():
    assert conv_output_lengths([355, 60, 9, 10], 10, 5, 0) == [70, 11, 0, 1]
    assert conv_output_lengths([7], 8, 1, 4) == [8]  # even taps, wav2vec2's positional conv: one extra row
    w = torch.randn(4, 3, 5)
    packed = pack_conv_weight(w)
    assert packed.shape == (4, 15) and packed.is_contiguous()
    assert torch.equal(packed[2, 1 * 3 + 2], w[2, 2, 1])  # column = tap * C_in + channel


def test_conv_matches_reference(close):
    """The plain layer (bias, no norm, no GELU) against ``conv1d_reference``."""
    packed = Packed(LENS)
    x = torch.randn(packed.rows, 1)
    w, b = torch.randn(16, 1, 10), torch.randn(16)
    out, out_packed = conv1d(x, packed, pack_conv_weight(w), b, 10, 5)
    assert out_packed.lengths == [70, 11, 25]
    close(out, conv1d_reference(x, packed, w, b, 5))


@pytest.mark.parametrize("channels,whole_blocks", [(24, False), (64, True)])
def test_group_norm_chain(close, tiles_used, channels, whole_blocks):
    """wav2vec2-base's feature encoder start: layer 0 (one input channel) applies the GroupNorm (one group per
    channel, per utterance, its statistics derived from the moments of the input windows) and GELU; layer 1 a
    plain GEMM with GELU. Channels 24 take layer 1's partly masked K-block path, 64 whole blocks."""
    w0, b0, w1, b1, gamma, beta = _layers(channels)
    packed = Packed(LENS)
    x = torch.randn(packed.rows, 1)
    h0, p0 = conv1d(x, packed, pack_conv_weight(w0), b0, 10, 5, out_norm=OutputNorm(PER_CHANNEL, gamma, beta, EPS),
                    out_gelu=True)
    ref0 = _per_utterance(x, packed, lambda a: F.gelu(F.group_norm(F.conv1d(a, w0, b0, 5), channels, gamma, beta,
                                                                   EPS)))
    close(h0, ref0)
    h1, p1 = conv1d(h0, p0, pack_conv_weight(w1), b1, 3, 2, out_gelu=True)
    assert p1.lengths == [34, 5, 12]
    _check_path(tiles_used[-1], channels, whole_blocks)
    close(h1, _per_utterance(ref0, p0, lambda a: F.gelu(F.conv1d(a, w1, b1, 2))))


def test_group_norm_long_utterance(close):
    """An utterance long enough that its window moments are summed by every split program over several row
    blocks each (7,999 frames), next to a short one, against ``F.group_norm``; a DC offset in the audio must not
    leak through the variance."""
    w0, b0, _, _, gamma, beta = _layers(16)
    packed = Packed([40000, 355])
    x = torch.randn(packed.rows, 1) * 0.5 + 0.3
    out, out_packed = conv1d(x, packed, pack_conv_weight(w0), b0, 10, 5,
                             out_norm=OutputNorm(PER_CHANNEL, gamma, beta, EPS))
    assert out_packed.lengths == [7999, 70]
    close(out, _per_utterance(x, packed, lambda a: F.group_norm(F.conv1d(a, w0, b0, 5), 16, gamma, beta, EPS)))


def test_group_norm_needs_first_layer_shape():
    """GroupNorm statistics come from the input windows' moments: only for one input channel."""
    norm = OutputNorm(PER_CHANNEL, torch.ones(8), torch.zeros(8), EPS)
    with pytest.raises(ValueError, match="one input channel"):
        conv1d(torch.randn(50, 4), Packed([50]), pack_conv_weight(torch.randn(8, 4, 3)), None, 3, 1, out_norm=norm)


@pytest.mark.parametrize("channels,whole_blocks", [(24, False), (64, True)])
def test_layer_norm_chain(close, tiles_used, channels, whole_blocks):
    """The layer-norm feature encoder: every layer's epilogue normalises each row over its channels (one tile
    holds the whole row, padded past 24 channels) and applies GELU."""
    w0, b0, w1, b1, gamma, beta = _layers(channels)
    norm = OutputNorm(PER_ROW, gamma, beta, EPS)
    packed = Packed(LENS)
    x = torch.randn(packed.rows, 1)
    h0, p0 = conv1d(x, packed, pack_conv_weight(w0), b0, 10, 5, out_norm=norm, out_gelu=True)
    h1, _ = conv1d(h0, p0, pack_conv_weight(w1), b1, 3, 2, out_norm=norm, out_gelu=True)
    assert tiles_used[-1][1] >= channels
    _check_path(tiles_used[-1], channels, whole_blocks)
    ref0 = _per_utterance(x, packed, lambda a: F.gelu(_layer_norm(F.conv1d(a, w0, b0, 5), gamma, beta)))
    close(h0, ref0)
    close(h1, _per_utterance(ref0, p0, lambda a: F.gelu(_layer_norm(F.conv1d(a, w1, b1, 2), gamma, beta))))


def test_layer_norm_epilogue_limits():
    """LayerNorm in the epilogue needs one tile across all output channels of an ungrouped layer."""
    packed = Packed([200])
    x = torch.randn(200, 8)
    norm = OutputNorm(PER_ROW, torch.ones(8), torch.zeros(8), EPS)
    with pytest.raises(ValueError, match="groups=1"):
        conv1d(x, packed, pack_conv_weight(torch.randn(8, 4, 3)), None, 3, 1, groups=2, out_norm=norm)
    wide = OutputNorm(PER_ROW, torch.ones(1024), torch.zeros(1024), EPS)
    with pytest.raises(ValueError, match="1024 channels"):
        conv1d(x, packed, pack_conv_weight(torch.randn(1024, 8, 3)), None, 3, 1, out_norm=wide)


@pytest.mark.parametrize("channels,groups,taps,whole_blocks", [(32, 4, 8, True), (24, 4, 5, False), (128, 2, 3, True)])
def test_positional_conv(close, tiles_used, channels, groups, taps, whole_blocks):
    """The transformer's positional convolution: grouped, zero-padded by taps // 2 at each utterance's edges
    (never reading a neighbour's rows), GELU and the residual add fused; with even taps the extra last
    output row is dropped (``out_lengths`` = input lengths). K runs flat over taps x group channels: in whole
    K blocks, or with a partly masked last one (24 channels in 4 groups, 5 taps: K = 30)."""
    lens = [70, 1, 25]
    packed = Packed(lens)
    h = torch.randn(packed.rows, channels)
    w, b = torch.randn(channels, channels // groups, taps) * 0.1, torch.randn(channels)
    out, out_packed = conv1d(h, packed, pack_conv_weight(w), b, taps, 1, pad=taps // 2, groups=groups,
                             out_gelu=True, residual=h, out_lengths=lens if taps % 2 == 0 else None)
    assert out_packed.lengths == lens
    assert tiles_used[-1] in WINDOW_TILES.values()
    _check_path(tiles_used[-1], taps * channels // groups, whole_blocks)
    ref = torch.cat([hs + F.gelu(F.conv1d(hs.t()[None], w, b, 1, taps // 2, groups=groups))[0, :, :n].t()
                     for hs, n in ((h[s:s + n], n) for s, n in zip(packed.starts, lens))])
    close(out, ref)


def test_padded_strided_conv(close):
    """The regrouped-window path with a stride: output row t's window starts at input row 2t - pad."""
    packed = Packed([41, 6, 30])
    x = torch.randn(packed.rows, 16)
    w, b = torch.randn(16, 8, 5) * 0.2, torch.randn(16)
    out, out_packed = conv1d(x, packed, pack_conv_weight(w), b, 5, 2, pad=2, groups=2, out_gelu=True)
    assert out_packed.lengths == [21, 3, 15]
    close(out, _per_utterance(x, packed, lambda a: F.gelu(F.conv1d(a, w, b, 2, 2, groups=2))))


@pytest.mark.parametrize("channels", [16, 64])
def test_utterance_boundaries(channels):
    """An utterance's outputs are the same bits whether it is packed alone or between others, including a
    neighbour too short for any output frame: no tile straddles two utterances, no tap reads across a
    boundary, and GroupNorm statistics go to their own utterance."""
    w0, b0, w1, b1, gamma, beta = _layers(channels)
    wp, bp = torch.randn(channels, channels // 4, 8) * 0.1, torch.randn(channels)
    lens = [355, 7, 131, 60]  # 7 samples: no frame at all

    def run(lengths, x):
        """Layers 0 -> 1 as GroupNorm and as LayerNorm chains, a positional conv: [(out, its Packed)]."""
        packed = Packed(lengths)
        pw0, pw1 = pack_conv_weight(w0), pack_conv_weight(w1)
        g0, p0 = conv1d(x, packed, pw0, None, 10, 5, out_norm=OutputNorm(PER_CHANNEL, gamma, beta, EPS), out_gelu=True)
        g1, p1 = conv1d(g0, p0, pw1, b1, 3, 2, out_gelu=True)
        row_norm = OutputNorm(PER_ROW, gamma, beta, EPS)
        r0, _ = conv1d(x, packed, pw0, b0, 10, 5, out_norm=row_norm, out_gelu=True)
        r1, _ = conv1d(r0, p0, pw1, b1, 3, 2, out_norm=row_norm, out_gelu=True)
        pos, p2 = conv1d(g0, p0, pack_conv_weight(wp), bp, 8, 1, pad=4, groups=4, out_gelu=True, residual=g0,
                         out_lengths=p0.lengths)
        return [(g0, p0), (g1, p1), (r0, p0), (r1, p1), (pos, p2)]

    x = torch.randn(sum(lens), 1)
    outs = run(lens, x)
    assert [p.lengths for _, p in outs] == [[70, 0, 25, 11], [34, 0, 12, 5]] * 2 + [[70, 0, 25, 11]]
    sample_starts = Packed(lens).starts
    for i, n in enumerate(lens):
        if i == 1:
            continue
        alone = run([n], x[sample_starts[i]:sample_starts[i] + n])
        for (together, packed), (by_itself, _) in zip(outs, alone):
            part = together[packed.starts[i]:packed.starts[i] + packed.lengths[i]]
            assert part.shape[0] > 0 and torch.equal(part, by_itself), (i, by_itself.shape)


def test_group_norm_statistics_are_per_utterance(close):
    """GroupNorm removes each utterance's own scale: louder audio in one utterance leaves every utterance's
    normalised output unchanged (statistics pooled across utterances would change both), while the raw
    convolution of that utterance does change."""
    w0, _, _, _, gamma, beta = _layers(16)
    norm = OutputNorm(PER_CHANNEL, gamma, beta, EPS)
    packed = Packed([355, 131])
    x = torch.randn(packed.rows, 1)
    louder = x.clone()
    louder[355:] *= 4
    quiet, p0 = conv1d(x, packed, pack_conv_weight(w0), None, 10, 5, out_norm=norm)
    loud, _ = conv1d(louder, packed, pack_conv_weight(w0), None, 10, 5, out_norm=norm)
    close(loud, quiet)
    raw_quiet, raw_loud = (conv1d(a, packed, pack_conv_weight(w0), None, 10, 5)[0] for a in (x, louder))
    assert not torch.allclose(raw_quiet[70:], raw_loud[70:], atol=1e-2)


def _even_rows_first(x, packed):
    return torch.cat([torch.cat([x[s:s + n:2], x[s + 1:s + n:2]]) for s, n in zip(packed.starts, packed.lengths)])


def test_split_layout(close):
    """``out_split`` stores each utterance's rows even rows first, then odd rows; stride-2 layers reading that
    with ``in_split`` (taps 3 and 2, as wav2vec2's) give the same results as on the natural order."""
    w0, b0, w1, b1, gamma, beta = _layers(32)
    w2 = torch.randn(32, 32, 2) / 8
    norm = OutputNorm(PER_ROW, gamma, beta, EPS)
    packed = Packed([355, 7, 131, 64])  # odd and even frame counts, and an utterance with none
    x = torch.randn(packed.rows, 1)
    h0, p0 = conv1d(x, packed, pack_conv_weight(w0), b0, 10, 5, out_norm=norm, out_gelu=True)
    s0, _ = conv1d(x, packed, pack_conv_weight(w0), b0, 10, 5, out_norm=norm, out_gelu=True, out_split=True)
    assert torch.equal(s0, _even_rows_first(h0, p0))
    h1, p1 = conv1d(h0, p0, pack_conv_weight(w1), b1, 3, 2, out_gelu=True)
    s1, _ = conv1d(s0, p0, pack_conv_weight(w1), b1, 3, 2, out_gelu=True, in_split=True, out_split=True)
    assert torch.equal(s1, _even_rows_first(h1, p1))
    h2, p2 = conv1d(h1, p1, pack_conv_weight(w2), None, 2, 2)
    s2, _ = conv1d(s1, p1, pack_conv_weight(w2), None, 2, 2, in_split=True)
    assert p2.lengths == [17, 0, 6, 2] and torch.equal(s2, h2)
    close(h2, _per_utterance(h1, p1, lambda a: F.conv1d(a, w2, None, 2)))
    with pytest.raises(ValueError, match="stride-2"):
        conv1d(s0, p0, pack_conv_weight(w1), b1, 3, 1, in_split=True)
    with pytest.raises(ValueError, match="residual"):
        conv1d(h0, p0, pack_conv_weight(w1), b1, 3, 1, pad=1, residual=h0, out_split=True)
