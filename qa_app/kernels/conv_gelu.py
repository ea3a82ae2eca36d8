"""wav2vec2's convolutional feature encoder: conv1d + normalisation + GELU as one implicit GEMM per layer, FP16.

Sequences are packed channels-last ([rows, channels], utterances back to back, no padding): output row
``t`` of an utterance reads the ``taps`` input rows from ``t * stride - pad`` (rows outside the utterance
read as zeros), so the GEMM's A tile is loaded straight from the previous layer's output, one tap's channels
at a time as contiguous vectors, and no im2col buffer exists. Output tiles never straddle two utterances:
each utterance owns ``seq_tiles`` tiles of BLOCK_M rows (enough for the longest; the rest are empty and
return at once), so no tile table is built on the host, and the launch is the same for any lengths up to
that longest (a CUDA graph captured for a length bucket replays it with new lengths on the device).

Each layer writes its output already normalised and activated, so the next layer's loads are a plain GEMM
operand (normalising on load, as an earlier version did, put fp32 arithmetic between the loads and the tensor
cores and redid it for every block of output channels: slower than cuDNN's three passes):
- LayerNorm over channels (``PER_ROW``, wav2vec2's "layer" variant, every layer): one tile covers all of a
  row's output channels, and the epilogue normalises the fp32 accumulators before the store;
- GroupNorm with one group per channel (``PER_CHANNEL``, wav2vec2-base's first layer, one input channel):
  its statistics span the whole utterance, but channel c's output is ``w_c . window + b_c`` over the
  ``taps`` input samples each row reads, so its mean and second moment follow from the mean and second-moment
  matrix of those windows (taps x taps numbers per utterance): a small kernel sums them from the raw audio,
  and the layer itself runs once, normalising in its epilogue. (An earlier version ran the layer twice, first
  only summing its outputs: the largest layer of the encoder, computed twice.)
The first layer (one input channel, K = taps = 10) has its own kernel: its ten taps are one K block, and its
cost is the GELU of the encoder's largest output (512 channels at 3.2 kHz), on the CUDA cores.
Padded or grouped convolutions (the transformer's positional convolution: 16 groups of 48 channels, 128 taps,
padding 64; GELU and the residual add fused in its epilogue) run on a regrouped copy of the input: each group's
channels stored on their own ([groups, rows, group channels]) with ``pad`` zero rows before, between and after the
utterances, so that every output row's window (taps x group channels) is one contiguous run, the row's A
operand a plain strided 2D view with K = taps x group channels and no masks. The per-tap K blocks of the
channels-last layout padded each tap's 48 channels to 64 and, at 4x the cost, made this one layer cost as much as
the six layers of the feature encoder (measured on the H100, 128 x 2 s: 2.07 ms -> 0.57 ms with the copy).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from qa_app.kernels import gelu, is_hopper, next_power_of_2, normalize_rows, to_device
from qa_app.kernels.autotune import TILE_CACHE, bench_ms, row_bucket
from qa_app.kernels.linear import TensorDescriptor, tma_ready

# Output normalisation modes (see the module docstring).
NONE, PER_CHANNEL, PER_ROW = 0, 1, 2

# name -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = {
    "128x128x64w8s3": (128, 128, 64, 8, 3),
    "128x256x64w8s3": (128, 256, 64, 8, 3),
    "64x128x64w4s3": (64, 128, 64, 4, 3),
    "64x256x64w8s3": (64, 256, 64, 8, 3),
    "64x64x64w4s3": (64, 64, 64, 4, 3),
    "128x256x32w8s4": (128, 256, 32, 8, 4),
    "64x512x32w8s3": (64, 512, 32, 8, 3),
    "64x64x16w4s3": (64, 64, 16, 4, 3),
    "128x128x16w4s2": (128, 128, 16, 4, 2),
    "128x256x16w8s2": (128, 256, 16, 8, 2),
    "64x512x16w8s2": (64, 512, 16, 8, 2),
    "64x256x16w4s2": (64, 256, 16, 4, 2),
}
# one-input-channel kernel: (BLOCK_M, BLOCK_N, num_warps)
FIRST_TILES = {
    "first64x64w4": (64, 64, 4),
    "first128x64w4": (128, 64, 4),
    "first64x128w4": (64, 128, 4),
    "first128x128w8": (128, 128, 8),
    "first32x256w4": (32, 256, 4),
    "first64x256w8": (64, 256, 8),
    "first32x512w8": (32, 512, 8),
}
# padded or grouped convolutions over the regrouped input: same fields as TILES (H100, wav2vec2-base's positional
# conv: the first is best at 32 and 128 utterances x 99 frames); narrower tiles for groups of <= 32 channels
WINDOW_TILES = {
    "window128x64x64w4s3": (128, 64, 64, 4, 3),
    "window128x64x64w8s3": (128, 64, 64, 8, 3),
    "window128x64x128w8s3": (128, 64, 128, 8, 3),
    "window64x64x64w4s3": (64, 64, 64, 4, 3),
    "window128x64x32w4s4": (128, 64, 32, 4, 4),
    "window128x32x64w4s3": (128, 32, 64, 4, 3),
    "window64x32x64w4s4": (64, 32, 64, 4, 4),
    "window128x16x64w4s3": (128, 16, 64, 4, 3),
}
MOMENT_SPLITS = 16  # programs per utterance summing window moments (a fixed grid: CUDA-graph friendly)
# TMA kernel, sm_90+: same fields
TMA_TILES = {
    "tma128x128x64w8s4": (128, 128, 64, 8, 4),
    "tma64x128x64w4s4": (64, 128, 64, 4, 4),
    "tma128x256x64w8s3": (128, 256, 64, 8, 3),
    "tma64x256x64w8s4": (64, 256, 64, 8, 4),
    "tma128x256x32w8s4": (128, 256, 32, 8, 4),
    "tma64x512x32w8s3": (64, 512, 32, 8, 3),
}


@triton.jit
def _epilogue(acc, seq, ts, t_ok, ns, n_ok, co, out_start, bias_ptr, res_ptr, out_ptr, out_len_ptr, affine_ptr,
              gamma_ptr, beta_ptr, stride_o, eps, C_OUT: tl.constexpr, NORM: tl.constexpr, OUT_GELU: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_SPLIT: tl.constexpr):
    """Bias, norm, GELU (+ residual) and the store of output rows ``ts``."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = t_ok[:, None] & n_ok[None, :]
    out_len = tl.load(out_len_ptr + seq)
    if NORM == 1:  # GroupNorm, one group per channel: this utterance's scale and shift per channel
        scale = tl.load(affine_ptr + (seq * C_OUT + co) * 2, mask=n_ok, other=0.0)
        shift = tl.load(affine_ptr + (seq * C_OUT + co) * 2 + 1, mask=n_ok, other=0.0)
        acc = acc * scale[None, :] + shift[None, :]
    if NORM == 2:  # LayerNorm over the row's channels, all inside this tile
        acc = normalize_rows(tl.where(mask, acc, 0.0), mask, ns, gamma_ptr, beta_ptr, C_OUT, eps)
    if OUT_GELU:
        acc = gelu(acc)
    if OUT_SPLIT:  # even rows first, then odd rows: each tap of a stride-2 consumer reads a row block
        rows = out_start + tl.where(ts % 2 == 0, ts // 2, (out_len + 1) // 2 + ts // 2)
    else:
        rows = out_start + ts
    offsets = rows[:, None] * stride_o + co[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_rows(seq_tiles, in_start_ptr, in_len_ptr, out_start_ptr, out_len_ptr, BLOCK_M: tl.constexpr,
               N_BLOCKS: tl.constexpr):
    """This program's utterance, output rows t0..t1 (t1 <= t0: an empty tile) and block of output channels."""
    tile, pid_n = tl.program_id(0) // N_BLOCKS, tl.program_id(0) % N_BLOCKS
    seq = tile // seq_tiles
    t0 = (tile % seq_tiles) * BLOCK_M
    t1 = tl.minimum(t0 + BLOCK_M, tl.load(out_len_ptr + seq))
    in_start = tl.load(in_start_ptr + seq).to(tl.int64)
    in_len = tl.load(in_len_ptr + seq)
    out_start = tl.load(out_start_ptr + seq).to(tl.int64)
    return pid_n, seq, t0, t1, in_start, in_len, out_start


@triton.jit
def _window_moments_kernel(x_ptr, in_start_ptr, out_len_ptr, part_ptr, stride_x, TAPS: tl.constexpr,
                           STRIDE: tl.constexpr, SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Over one of SPLITS row ranges of an utterance: the sum of the input windows its output rows read (row
    t: samples t * STRIDE .. + TAPS) and of their outer products, in fp32, stored as partial sums."""
    seq, split = tl.program_id(0), tl.program_id(1)
    n = tl.load(out_len_ptr + seq)
    in_start = tl.load(in_start_ptr + seq).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_T) * BLOCK_T
    ks = tl.arange(0, BLOCK_K)
    s1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32)
    for t0 in range(split * chunk, tl.minimum(n, (split + 1) * chunk), BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        ok = (ts < n)[:, None] & (ks < TAPS)[None, :]
        win = tl.load(x_ptr + (in_start + ts[:, None] * STRIDE + ks[None, :]) * stride_x, mask=ok,
                      other=0.0).to(tl.float32)
        s1 += tl.sum(win, axis=0)
        s2 += tl.dot(tl.trans(win), win, input_precision="ieee")
    part = part_ptr + (seq * SPLITS + split) * (BLOCK_K + BLOCK_K * BLOCK_K)
    tl.store(part + ks, s1)
    tl.store(part + BLOCK_K + ks[:, None] * BLOCK_K + ks[None, :], s2)


@triton.jit
def _group_norm_affine_kernel(part_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, out_len_ptr, affine_ptr, eps,
                              C_OUT: tl.constexpr, TAPS: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One utterance's GroupNorm scale and shift per channel from its window moments: channel c's output is
    ``w_c . window + b_c``, so its mean is ``w_c . E[window] + b_c`` and its variance
    ``w_c^T E[window window^T] w_c - (w_c . E[window])^2``; the partial sums are added in a fixed order (the
    same bits whatever else is in the batch)."""
    seq = tl.program_id(0)
    n = tl.maximum(tl.load(out_len_ptr + seq), 1).to(tl.float32)
    ks = tl.arange(0, BLOCK_K)
    s1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32)
    for split in range(SPLITS):
        part = part_ptr + (seq * SPLITS + split) * (BLOCK_K + BLOCK_K * BLOCK_K)
        s1 += tl.load(part + ks)
        s2 += tl.load(part + BLOCK_K + ks[:, None] * BLOCK_K + ks[None, :])
    m1, m2 = s1 / n, s2 / n
    for c0 in range(0, C_OUT, BLOCK_N):
        cs = c0 + tl.arange(0, BLOCK_N)
        c_ok = cs < C_OUT
        w = tl.load(w_ptr + cs[:, None] * TAPS + ks[None, :], mask=c_ok[:, None] & (ks < TAPS)[None, :],
                    other=0.0).to(tl.float32)
        mean = tl.sum(w * m1[None, :], axis=1)
        var = tl.maximum(tl.sum(tl.dot(w, m2, input_precision="ieee") * w, axis=1) - mean * mean, 0.0)
        if HAS_BIAS:
            mean += tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
        scale = tl.load(gamma_ptr + cs, mask=c_ok, other=0.0).to(tl.float32) / tl.sqrt(var + eps)
        shift = tl.load(beta_ptr + cs, mask=c_ok, other=0.0).to(tl.float32) - mean * scale
        tl.store(affine_ptr + (seq * C_OUT + cs) * 2, scale, mask=c_ok)
        tl.store(affine_ptr + (seq * C_OUT + cs) * 2 + 1, shift, mask=c_ok)


@triton.jit
def _first_conv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, seq_tiles, in_start_ptr, in_len_ptr, out_start_ptr,
                       out_len_ptr, affine_ptr, gamma_ptr, beta_ptr, stride_x, stride_o, eps, C_OUT: tl.constexpr,
                       TAPS: tl.constexpr, STRIDE: tl.constexpr, NORM: tl.constexpr, OUT_GELU: tl.constexpr,
                       HAS_BIAS: tl.constexpr, OUT_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """One input channel, no padding (raw audio into wav2vec2's first layer): each output row's taps are
    gathered as one K block (taps <= 16 in one, padded with zeros) for the tensor cores, which leaves the CUDA
    cores to the epilogue's GELU, this layer's real cost (measured on the H100: taps as fp32 FMAs instead took
    1.4x as long)."""
    N_BLOCKS: tl.constexpr = (C_OUT + BLOCK_N - 1) // BLOCK_N
    pid_n, seq, t0, t1, in_start, in_len, out_start = _tile_rows(seq_tiles, in_start_ptr, in_len_ptr, out_start_ptr,
                                                                 out_len_ptr, BLOCK_M, N_BLOCKS)
    if t0 < t1:  # tiles past the utterance's end are empty
        ts = t0 + tl.arange(0, BLOCK_M)
        t_ok = ts < t1
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < C_OUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.static_range(0, TAPS, 16):
            ks = k0 + tl.arange(0, 16)
            a = tl.load(x_ptr + (in_start + ts[:, None] * STRIDE + ks[None, :]) * stride_x,
                        mask=t_ok[:, None] & (ks < TAPS)[None, :], other=0.0)
            b = tl.load(w_ptr + ns[None, :] * TAPS + ks[:, None], mask=(ks < TAPS)[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        _epilogue(acc, seq, ts, t_ok, ns, n_ok, ns, out_start, bias_ptr, out_ptr, out_ptr, out_len_ptr, affine_ptr,
                  gamma_ptr, beta_ptr, stride_o, eps, C_OUT, NORM, OUT_GELU, HAS_BIAS, False, OUT_SPLIT)


@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, seq_tiles, in_start_ptr, in_len_ptr, out_start_ptr, out_len_ptr,
                 gamma_ptr, beta_ptr, stride_x, stride_o, eps, C_IN: tl.constexpr, C_OUT: tl.constexpr,
                 TAPS: tl.constexpr, STRIDE: tl.constexpr, NORM: tl.constexpr, OUT_GELU: tl.constexpr,
                 HAS_BIAS: tl.constexpr, IN_SPLIT: tl.constexpr, OUT_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pointer-based tiles, no padding or groups: any GPU and the interpreter."""
    # Output-channel blocks vary fastest, so the blocks sharing an A tile run together and read it from L2.
    N_BLOCKS: tl.constexpr = (C_OUT + BLOCK_N - 1) // BLOCK_N
    pid_n, seq, t0, t1, in_start, in_len, out_start = _tile_rows(seq_tiles, in_start_ptr, in_len_ptr, out_start_ptr,
                                                                 out_len_ptr, BLOCK_M, N_BLOCKS)
    if t0 < t1:  # tiles past the utterance's end are empty
        ts = t0 + tl.arange(0, BLOCK_M)
        t_ok = ts < t1
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < C_OUT
        K_TOTAL: tl.constexpr = TAPS * C_IN
        C_PAD: tl.constexpr = (C_IN + BLOCK_K - 1) // BLOCK_K * BLOCK_K  # a tap's channels, in whole K blocks
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, TAPS * C_PAD, BLOCK_K):
            # A K block lies inside one tap: each row's slice is contiguous channels (vector loads).
            tap = k0 // C_PAD
            c = k0 % C_PAD + tl.arange(0, BLOCK_K)
            rows = ts * STRIDE + tap
            if IN_SPLIT:  # the input is stored even rows first, then odd rows
                rows = tl.where(rows % 2 == 0, rows // 2, (in_len + 1) // 2 + rows // 2)
            if C_IN % BLOCK_K == 0:
                a_ok = t_ok[:, None]
                b_ok = n_ok[None, :]
            else:  # the tap's last block is partly past its channels
                a_ok = t_ok[:, None] & (c < C_IN)[None, :]
                b_ok = (c < C_IN)[:, None] & n_ok[None, :]
            a = tl.load(x_ptr + ((in_start + rows) * stride_x)[:, None] + c[None, :], mask=a_ok, other=0.0)
            b = tl.load(w_ptr + ns[None, :] * K_TOTAL + (tap * C_IN + c)[:, None], mask=b_ok, other=0.0)
            acc = tl.dot(a, b, acc)
        _epilogue(acc, seq, ts, t_ok, ns, n_ok, ns, out_start, bias_ptr, out_ptr, out_ptr, out_len_ptr, out_ptr,
                  gamma_ptr, beta_ptr, stride_o, eps, C_OUT, NORM, OUT_GELU, HAS_BIAS, False, OUT_SPLIT)


@triton.jit
def _regroup_kernel(x_ptr, xg_ptr, seq_tiles, start_ptr, len_ptr, stride_x, group_rows, CG: tl.constexpr,
                    PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """x [rows, groups * CG] -> xg [groups, group_rows, CG]: utterance u's rows from row ``start + PAD * (u + 1)``
    of its group's block (the gaps stay as allocated: zeros)."""
    tile, group = tl.program_id(0), tl.program_id(1)
    seq = tile // seq_tiles
    t0 = (tile % seq_tiles) * BLOCK_M
    n = tl.load(len_ptr + seq)
    if t0 < n:
        start = tl.load(start_ptr + seq).to(tl.int64)
        ts = t0 + tl.arange(0, BLOCK_M)
        cs = tl.arange(0, BLOCK_C)
        ok = (ts < n)[:, None] & (cs < CG)[None, :]
        values = tl.load(x_ptr + (start + ts)[:, None] * stride_x + group * CG + cs[None, :], mask=ok)
        rows = group * group_rows + start + PAD * (seq + 1) + ts
        tl.store(xg_ptr + rows[:, None] * CG + cs[None, :], values, mask=ok)


@triton.jit
def _window_conv_kernel(xg_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, seq_tiles, in_start_ptr, in_len_ptr, out_start_ptr,
                        out_len_ptr, gamma_ptr, beta_ptr, group_rows, stride_o, eps, C_OUT: tl.constexpr,
                        CG_IN: tl.constexpr, CG_OUT: tl.constexpr, TAPS: tl.constexpr, STRIDE: tl.constexpr,
                        PAD: tl.constexpr, NORM: tl.constexpr, OUT_GELU: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_RES: tl.constexpr, OUT_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Padded or grouped: over the regrouped input (``_regroup_kernel``), output row t's window is the
    ``TAPS * CG_IN`` values from row ``t * STRIDE`` of its utterance's block (which starts with PAD zero rows):
    one contiguous run, so K is flat over taps and channels."""
    N_BLOCKS: tl.constexpr = (CG_OUT + BLOCK_N - 1) // BLOCK_N
    pid_n, seq, t0, t1, in_start, in_len, out_start = _tile_rows(seq_tiles, in_start_ptr, in_len_ptr, out_start_ptr,
                                                                 out_len_ptr, BLOCK_M, N_BLOCKS)
    if t0 < t1:  # tiles past the utterance's end are empty
        group = tl.program_id(1)
        ts = t0 + tl.arange(0, BLOCK_M)
        t_ok = ts < t1
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < CG_OUT
        co = group * CG_OUT + ns
        K_TOTAL: tl.constexpr = TAPS * CG_IN
        windows = xg_ptr + (group * group_rows + in_start + PAD * seq + ts * STRIDE).to(tl.int64) * CG_IN
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_TOTAL, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if K_TOTAL % BLOCK_K == 0:
                a_ok = t_ok[:, None]
                b_ok = n_ok[None, :]
            else:
                a_ok = t_ok[:, None] & (ks < K_TOTAL)[None, :]
                b_ok = (ks < K_TOTAL)[:, None] & n_ok[None, :]
            a = tl.load(windows[:, None] + ks[None, :], mask=a_ok, other=0.0)
            b = tl.load(w_ptr + co[None, :] * K_TOTAL + ks[:, None], mask=b_ok, other=0.0)
            acc = tl.dot(a, b, acc)
        _epilogue(acc, seq, ts, t_ok, ns, n_ok, co, out_start, bias_ptr, res_ptr, out_ptr, out_len_ptr, out_ptr,
                  gamma_ptr, beta_ptr, stride_o, eps, C_OUT, NORM, OUT_GELU, HAS_BIAS, HAS_RES, OUT_SPLIT)


@triton.jit
def _conv_tma_kernel(x_desc, w_desc, bias_ptr, out_ptr, seq_tiles, in_start_ptr, in_len_ptr, out_start_ptr,
                     out_len_ptr, gamma_ptr, beta_ptr, stride_o, eps,
                     C_IN: tl.constexpr, C_OUT: tl.constexpr, TAPS: tl.constexpr, STRIDE: tl.constexpr,
                     NORM: tl.constexpr, OUT_GELU: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Hopper: every tap's A tile is one block of consecutive input rows (stride 1, or stride 2 over an input
    stored even rows first), so the copy engine moves it (TMA) and the K loop pipelines like a plain GEMM's.
    Rows past the utterance's end read its neighbour's rows: they feed only output rows past ``t1``, which are
    neither stored nor counted."""
    N_BLOCKS: tl.constexpr = (C_OUT + BLOCK_N - 1) // BLOCK_N
    pid_n, seq, t0, t1, in_start, in_len, out_start = _tile_rows(seq_tiles, in_start_ptr, in_len_ptr, out_start_ptr,
                                                                 out_len_ptr, BLOCK_M, N_BLOCKS)
    if t0 < t1:  # tiles past the utterance's end are empty
        even_rows = (in_len + 1) // 2
        first = (in_start + t0).to(tl.int32)
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, TAPS * C_IN, BLOCK_K):
            tap = k // C_IN
            if STRIDE == 2:  # tap j of output row t is input row 2t + j: the even (j = 0, 2) or odd (j = 1) half
                row = first + (tap % 2) * even_rows + tap // 2
            else:
                row = first + tap
            acc = tl.dot(x_desc.load([row, k - tap * C_IN]), w_desc.load([n0, k]).T, acc)
        ts = t0 + tl.arange(0, BLOCK_M)
        ns = n0 + tl.arange(0, BLOCK_N)
        _epilogue(acc, seq, ts, ts < t1, ns, ns < C_OUT, ns, out_start, bias_ptr, out_ptr, out_ptr, out_len_ptr,
                  out_ptr, gamma_ptr, beta_ptr, stride_o, eps, C_OUT, NORM, OUT_GELU, HAS_BIAS, False, OUT_SPLIT)


def row_starts(lengths) -> np.ndarray:
    """Where each of back-to-back runs of ``lengths`` rows starts (an exclusive cumulative sum)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.cumsum(lengths) - lengths


@dataclass
class Packed:
    """Utterances packed back to back: row counts per utterance and where each starts."""
    lengths: list[int]

    @property
    def starts(self) -> list[int]:
        return row_starts(self.lengths).tolist()

    @property
    def rows(self) -> int:
        return int(sum(self.lengths))


@dataclass
class OutputNorm:
    """The normalisation applied to a layer's output before its GELU: mode and affine weights (fp32)."""
    mode: int
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


def conv_output_lengths(lengths: list[int], taps: int, stride: int, pad: int) -> list[int]:
    return [max(0, (n + 2 * pad - taps) // stride + 1) for n in lengths]


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """Conv1d weight [C_out, C_in / groups, taps] -> [C_out, taps * C_in / groups], tap-major (the A tile's
    column order: one tap's channels are contiguous in a channels-last input)."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1).contiguous()


@functools.lru_cache(maxsize=None)  # the hot path asks every call; the answer depends on these only
def _candidates(c_in: int, c_out: int, groups: int, taps: int, norm_mode: int, kernel: str) -> list[str]:
    """Tiles worth timing for ``kernel`` ("first", "tma", "window" or "pointer"): K blocks no wider than K needs
    (a tap's channels; over the regrouped input, taps x group channels; TMA tiles: dividing a tap's channels);
    for LayerNorm in the epilogue, the narrowest tiles that hold a whole row of output channels."""
    cg_in = c_in // groups
    tiles = {"first": FIRST_TILES, "window": WINDOW_TILES, "tma": {**TILES, **TMA_TILES}}.get(kernel, TILES)
    if norm_mode == PER_ROW:
        widths = sorted({t[1] for t in tiles.values() if t[1] >= c_out})
        if groups != 1 or not widths:
            raise ValueError(f"LayerNorm epilogue needs groups=1 and <= {max(t[1] for t in tiles.values())} "
                             f"channels, got groups={groups}, {c_out} channels")
        fits = lambda n: n == widths[0]  # noqa: E731
    else:
        fits = lambda n: n <= max(64, next_power_of_2(c_out // groups))  # noqa: E731
    if kernel == "first":
        return [name for name, (_, n, _) in tiles.items() if fits(n)]
    widest_k = max(16, next_power_of_2(cg_in * taps if kernel == "window" else cg_in))
    return [name for name, (_, n, k, _, _) in tiles.items()
            if fits(n) and k <= widest_k and (name not in TMA_TILES or cg_in % k == 0)]


def _kernel_for(x: torch.Tensor, weight: torch.Tensor, stride: int, pad: int, groups: int, in_split: bool,
                residual: torch.Tensor | None) -> str:
    """"first": one input channel, no padding, groups, split input or residual (raw audio). "window": padding or
    groups. "tma": each tap's rows consecutive (stride 1, or 2 over a split input), no residual, 16-byte
    aligned rows, a Hopper (or newer) GPU. "pointer": anything else."""
    if pad > 0 or groups > 1:
        return "window"
    if x.shape[1] == 1 and not in_split and residual is None:
        return "first"
    if (is_hopper(x.device) and residual is None and (stride == 1 or (stride == 2 and in_split))
            and x.shape[1] % 16 == 0 and tma_ready(x, weight)):
        return "tma"
    return "pointer"


def _regroup(x: torch.Tensor, seq_info: torch.Tensor, longest: int, groups: int,
             pad: int) -> tuple[torch.Tensor, int]:
    """x [rows, C] -> [groups, group_rows, C / groups], each utterance with ``pad`` zero rows before and after
    it (see ``_regroup_kernel``; rows of an utterance from ``longest`` on are not copied); returns it and
    group_rows."""
    utterances, cg = seq_info.shape[1], x.shape[1] // groups
    group_rows = triton.cdiv(x.shape[0] + pad * (utterances + 1), 16) * 16
    xg = torch.zeros(groups, group_rows, cg, dtype=x.dtype, device=x.device)
    seq_tiles = triton.cdiv(longest, 64)
    _regroup_kernel[(utterances * seq_tiles, groups)](x, xg, seq_tiles, seq_info[0], seq_info[1], x.stride(0),
                                                      group_rows, CG=cg, PAD=pad, BLOCK_M=64,
                                                      BLOCK_C=next_power_of_2(cg))
    return xg, group_rows


def _group_norm_affine(x: torch.Tensor, seq_info: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       norm: OutputNorm, taps: int, stride: int) -> torch.Tensor:
    """[utterances, C_out, 2] fp32: per utterance and channel, the scale and shift of a one-input-channel
    layer's GroupNorm (see ``_group_norm_affine_kernel``)."""
    utterances, c_out = seq_info.shape[1], weight.shape[0]
    block_k = max(16, next_power_of_2(taps))
    parts = torch.empty(utterances, MOMENT_SPLITS, block_k + block_k * block_k, dtype=torch.float32,
                        device=x.device)
    _window_moments_kernel[(utterances, MOMENT_SPLITS)](x, seq_info[0], seq_info[3], parts, x.stride(0), TAPS=taps,
                                                        STRIDE=stride, SPLITS=MOMENT_SPLITS, BLOCK_T=128,
                                                        BLOCK_K=block_k)
    affine = torch.empty(utterances, c_out, 2, dtype=torch.float32, device=x.device)
    _group_norm_affine_kernel[(utterances,)](parts, weight, bias if bias is not None else weight, norm.weight,
                                             norm.bias, seq_info[3], affine, norm.eps, C_OUT=c_out, TAPS=taps,
                                             SPLITS=MOMENT_SPLITS, HAS_BIAS=bias is not None, BLOCK_K=block_k,
                                             BLOCK_N=64)
    return affine


def conv1d(x: torch.Tensor, packed: Packed, weight: torch.Tensor, bias: torch.Tensor | None, taps: int,
           stride: int, pad: int = 0, groups: int = 1, out_norm: OutputNorm | None = None, out_gelu: bool = False,
           residual: torch.Tensor | None = None, out_lengths: list[int] | None = None, in_split: bool = False,
           out_split: bool = False) -> tuple[torch.Tensor, Packed]:
    """One convolution layer over packed utterances: ``residual + GELU?(out_norm?(conv(x) + bias))``.

    x: [packed.rows, C_in] channels-last; weight: ``pack_conv_weight`` of the Conv1d weight.
    ``out_split`` stores each utterance's output rows even rows first, then odd rows (for a next layer of
    stride 2, which reads it with ``in_split``): then every tap of that layer reads a block of consecutive
    rows, which the copy engine can move. GroupNorm (``PER_CHANNEL``) needs the first-layer shape: one input
    channel, no padding, groups, split input or residual. Returns out [sum(out_lengths), C_out] and its Packed.
    """
    out_lengths = out_lengths or conv_output_lengths(packed.lengths, taps, stride, pad)
    out_packed = Packed(out_lengths)
    seq_info = to_device(np.array([packed.starts, packed.lengths, out_packed.starts, out_lengths], dtype=np.int32),
                         x.device)
    out = conv1d_packed(x, seq_info, max(out_lengths, default=0), out_packed.rows, weight, bias, taps, stride, pad,
                        groups, out_norm, out_gelu, residual, in_split, out_split)
    return out, out_packed


def conv1d_packed(x: torch.Tensor, seq_info: torch.Tensor, longest_out: int, out_rows: int, weight: torch.Tensor,
                  bias: torch.Tensor | None, taps: int, stride: int, pad: int = 0, groups: int = 1,
                  out_norm: OutputNorm | None = None, out_gelu: bool = False, residual: torch.Tensor | None = None,
                  in_split: bool = False, out_split: bool = False) -> torch.Tensor:
    """``conv1d`` on device-side metadata: seq_info [4, utterances] int32 on x's device (input starts, input
    lengths, output starts, output lengths), ``longest_out`` an upper bound of the output lengths and
    ``out_rows`` of their sum (the output's rows; past the utterances' rows nothing is written). Nothing here
    reads the lengths on the host, so a CUDA graph captured with bounds replays for any lengths within them."""
    if in_split and (stride != 2 or pad != 0 or groups != 1):
        raise ValueError("a split input is read by stride-2 layers without padding or groups only")
    if out_split and residual is not None:
        raise ValueError("a residual is added in natural row order: no split output")
    kernel = _kernel_for(x, weight, stride, pad, groups, in_split, residual)
    mode = out_norm.mode if out_norm is not None else NONE
    if mode == PER_CHANNEL and kernel != "first":
        raise ValueError("the GroupNorm epilogue needs one input channel and no padding, groups, split input "
                         "or residual (wav2vec2's first layer)")
    c_in, c_out, utterances = x.shape[1], weight.shape[0], seq_info.shape[1]
    out = torch.empty(out_rows, c_out, dtype=weight.dtype, device=x.device)
    if out_rows == 0 or longest_out == 0:
        return out
    eps = out_norm.eps if out_norm is not None else 0.0
    gamma, beta = (out_norm.weight, out_norm.bias) if out_norm is not None else (x, x)
    affine = _group_norm_affine(x, seq_info, weight, bias, out_norm, taps, stride) if mode == PER_CHANNEL else x
    bias_arg = bias if bias is not None else weight
    if kernel == "window":  # the regrouped input, once for every tile tried; rows past the last window unread
        xg, group_rows = _regroup(x, seq_info, (longest_out - 1) * stride + taps - pad, groups, pad)

    def run(tile: str) -> None:
        if tile in FIRST_TILES:
            block_m, block_n, warps = FIRST_TILES[tile]
            seq_tiles = triton.cdiv(longest_out, block_m)
            _first_conv_kernel[(utterances * seq_tiles * triton.cdiv(c_out, block_n),)](
                x, weight, bias_arg, out, seq_tiles, *seq_info, affine, gamma, beta, x.stride(0), out.stride(0), eps,
                C_OUT=c_out, TAPS=taps, STRIDE=stride, NORM=mode, OUT_GELU=out_gelu, HAS_BIAS=bias is not None,
                OUT_SPLIT=out_split, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        elif tile in TMA_TILES:
            block_m, block_n, block_k, warps, stages = TMA_TILES[tile]
            seq_tiles = triton.cdiv(longest_out, block_m)
            x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
            w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
            _conv_tma_kernel[(utterances * seq_tiles * triton.cdiv(c_out, block_n),)](
                x_desc, w_desc, bias_arg, out, seq_tiles, *seq_info, gamma, beta, out.stride(0), eps, C_IN=c_in,
                C_OUT=c_out, TAPS=taps, STRIDE=stride, NORM=mode, OUT_GELU=out_gelu, HAS_BIAS=bias is not None,
                OUT_SPLIT=out_split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                num_stages=stages)
        elif tile in WINDOW_TILES:
            block_m, block_n, block_k, warps, stages = WINDOW_TILES[tile]
            seq_tiles = triton.cdiv(longest_out, block_m)
            _window_conv_kernel[(utterances * seq_tiles * triton.cdiv(c_out // groups, block_n), groups)](
                xg, weight, bias_arg, residual if residual is not None else out, out, seq_tiles, *seq_info, gamma,
                beta, group_rows, out.stride(0), eps, C_OUT=c_out, CG_IN=c_in // groups, CG_OUT=c_out // groups,
                TAPS=taps, STRIDE=stride, PAD=pad, NORM=mode, OUT_GELU=out_gelu, HAS_BIAS=bias is not None,
                HAS_RES=residual is not None, OUT_SPLIT=out_split, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_K=block_k, num_warps=warps, num_stages=stages)
        else:
            block_m, block_n, block_k, warps, stages = TILES[tile]
            seq_tiles = triton.cdiv(longest_out, block_m)
            _conv_kernel[(utterances * seq_tiles * triton.cdiv(c_out, block_n),)](
                x, weight, bias_arg, out, seq_tiles, *seq_info, gamma, beta, x.stride(0), out.stride(0), eps,
                C_IN=c_in, C_OUT=c_out, TAPS=taps, STRIDE=stride, NORM=mode, OUT_GELU=out_gelu,
                HAS_BIAS=bias is not None, IN_SPLIT=in_split, OUT_SPLIT=out_split, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_K=block_k, num_warps=warps, num_stages=stages)

    shape = (c_in, c_out, taps, stride, pad, groups, row_bucket(out_rows), mode, out_gelu, residual is not None,
             in_split, out_split, kernel)
    names = _candidates(c_in, c_out, groups, taps, mode, kernel)
    run(TILE_CACHE.choose("conv1d", shape, names, lambda t: bench_ms(lambda: run(t)), x.device))
    return out


def conv1d_reference(x: torch.Tensor, packed: Packed, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                     pad: int = 0, groups: int = 1, out_lengths: list[int] | None = None) -> torch.Tensor:
    """Plain ``F.conv1d`` per utterance (weight in Conv1d layout [C_out, C_in / groups, taps]), packed again."""
    taps = weight.shape[-1]
    out_lengths = out_lengths or conv_output_lengths(packed.lengths, taps, stride, pad)
    outs = []
    for start, length, n_out in zip(packed.starts, packed.lengths, out_lengths):
        seq = x[start:start + length].float().t().unsqueeze(0)
        y = torch.nn.functional.conv1d(seq, weight.float(), bias.float() if bias is not None else None, stride,
                                       pad, groups=groups)
        outs.append(y[0, :, :n_out].t())
    return torch.cat(outs).to(x.dtype)
