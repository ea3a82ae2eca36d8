"""wav2vec2's convolutional feature encoder: conv1d + normalisation + GELU as one implicit GEMM per layer, FP16.

Sequences are packed channels-last ([rows, channels], utterances back to back, no padding): output row
``t`` of an utterance reads the ``taps`` input rows from ``t * stride - pad`` (rows outside the utterance
read as zeros), so the GEMM's A tile is gathered straight from the previous layer's output and no im2col
buffer exists. Output tiles never straddle two utterances (a host-built tile table), which lets a tile's
statistics go to its own utterance.

Normalisation is split across the producer and the consumer so that no normalised copy is ever written:
the producing layer's epilogue accumulates sums and sums of squares of its fp32 results (per utterance and
channel for wav2vec2-base's GroupNorm, per row for the layer-norm variant), and the next layer normalises
and applies GELU while loading its A tile. The same kernel, with groups and padding, runs the grouped
positional convolution of the transformer (GELU and the residual add fused in its epilogue).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from qa_app.kernels import gelu
from qa_app.kernels.autotune import TILE_CACHE, bench_ms, row_bucket

# Normalisation modes, of a layer's input (applied while loading) and of its output (statistics gathered).
NONE, PER_CHANNEL, PER_ROW = 0, 1, 2

# name -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = {
    "128x128x64w8s3": (128, 128, 64, 8, 3),
    "128x256x64w8s3": (128, 256, 64, 8, 3),
    "64x128x64w4s3": (64, 128, 64, 4, 3),
    "64x256x64w8s3": (64, 256, 64, 8, 3),
    "64x64x64w4s3": (64, 64, 64, 4, 3),
    "128x128x64w8s4": (128, 128, 64, 8, 4),
    "128x128x32w4s4": (128, 128, 32, 4, 4),
    "64x64x16w4s3": (64, 64, 16, 4, 3),
}


@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, tiles_ptr, in_start_ptr, in_len_ptr, out_start_ptr,
                 in_stats_ptr, in_gamma_ptr, in_beta_ptr, out_stats_ptr, stride_x, stride_o, eps,
                 C_IN: tl.constexpr, C_OUT: tl.constexpr, CG_IN: tl.constexpr, CG_OUT: tl.constexpr, TAPS: tl.constexpr,
                 STRIDE: tl.constexpr, PAD: tl.constexpr, IN_NORM: tl.constexpr, IN_GELU: tl.constexpr,
                 OUT_STATS: tl.constexpr, OUT_GELU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile, pid_n, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = tl.load(tiles_ptr + tile * 3)
    t0 = tl.load(tiles_ptr + tile * 3 + 1)
    t1 = tl.load(tiles_ptr + tile * 3 + 2)
    in_start = tl.load(in_start_ptr + seq).to(tl.int64)
    in_len = tl.load(in_len_ptr + seq)
    out_start = tl.load(out_start_ptr + seq).to(tl.int64)

    ts = t0 + tl.arange(0, BLOCK_M)
    t_ok = ts < t1
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < CG_OUT
    co = group * CG_OUT + ns
    first_row = ts * STRIDE - PAD  # the utterance's input row under tap 0
    K_TOTAL: tl.constexpr = TAPS * CG_IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_TOTAL, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K_TOTAL
        if CG_IN % BLOCK_K == 0:
            # The block lies inside one tap: each row's slice is contiguous channels (vector loads), and
            # row validity and row statistics are per row, not per element.
            tap = k0 // CG_IN
            ci = group * CG_IN + (k0 % CG_IN) + tl.arange(0, BLOCK_K)
            rows = first_row + tap
            row_ok = t_ok & (rows >= 0) & (rows < in_len)
            a_ok = row_ok[:, None]
            a = tl.load(x_ptr + ((in_start + rows) * stride_x)[:, None] + ci[None, :], mask=a_ok, other=0.0)
        else:
            tap = ks // CG_IN
            ci = group * CG_IN + ks % CG_IN
            rows2 = first_row[:, None] + tap[None, :]
            a_ok = t_ok[:, None] & k_ok[None, :] & (rows2 >= 0) & (rows2 < in_len)
            a = tl.load(x_ptr + (in_start + rows2) * stride_x + ci[None, :], mask=a_ok, other=0.0)
        if IN_NORM != 0 or IN_GELU:
            a = a.to(tl.float32)
            if IN_NORM == 1:  # GroupNorm with one group per channel: statistics over the utterance's rows
                s = tl.load(in_stats_ptr + (seq * C_IN + ci) * 2, mask=k_ok, other=0.0)
                ss = tl.load(in_stats_ptr + (seq * C_IN + ci) * 2 + 1, mask=k_ok, other=0.0)
                mean = s / in_len
                rstd = 1.0 / tl.sqrt(tl.maximum(ss / in_len - mean * mean, 0.0) + eps)
                gamma = tl.load(in_gamma_ptr + ci, mask=k_ok, other=0.0)
                beta = tl.load(in_beta_ptr + ci, mask=k_ok, other=0.0)
                a = (a - mean[None, :]) * (rstd * gamma)[None, :] + beta[None, :]
            if IN_NORM == 2:  # LayerNorm over the channels of each input row
                if CG_IN % BLOCK_K == 0:
                    s = tl.load(in_stats_ptr + (in_start + rows) * 2, mask=row_ok, other=0.0)[:, None]
                    ss = tl.load(in_stats_ptr + (in_start + rows) * 2 + 1, mask=row_ok, other=0.0)[:, None]
                else:
                    s = tl.load(in_stats_ptr + (in_start + rows2) * 2, mask=a_ok, other=0.0)
                    ss = tl.load(in_stats_ptr + (in_start + rows2) * 2 + 1, mask=a_ok, other=0.0)
                mean = s / C_IN
                rstd = 1.0 / tl.sqrt(tl.maximum(ss / C_IN - mean * mean, 0.0) + eps)
                gamma = tl.load(in_gamma_ptr + ci, mask=k_ok, other=0.0)
                beta = tl.load(in_beta_ptr + ci, mask=k_ok, other=0.0)
                a = (a - mean) * rstd * gamma[None, :] + beta[None, :]
            if IN_GELU:
                a = gelu(a)
            a = tl.where(a_ok, a, 0.0).to(w_ptr.dtype.element_ty)  # the convolution pads the normalised signal
        b = tl.load(w_ptr + co[None, :] * K_TOTAL + ks[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = t_ok[:, None] & n_ok[None, :]
    if OUT_STATS == 1:
        kept = tl.where(mask, acc, 0.0)
        tl.atomic_add(out_stats_ptr + (seq * C_OUT + co) * 2, tl.sum(kept, axis=0), mask=n_ok)
        tl.atomic_add(out_stats_ptr + (seq * C_OUT + co) * 2 + 1,
                      tl.sum(kept * kept, axis=0), mask=n_ok)
    if OUT_STATS == 2:
        kept = tl.where(mask, acc, 0.0)
        tl.atomic_add(out_stats_ptr + (out_start + ts) * 2, tl.sum(kept, axis=1), mask=t_ok)
        tl.atomic_add(out_stats_ptr + (out_start + ts) * 2 + 1, tl.sum(kept * kept, axis=1), mask=t_ok)
    if OUT_GELU:
        acc = gelu(acc)
    offsets = (out_start + ts)[:, None] * stride_o + co[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass
class Packed:
    """Utterances packed back to back: row counts per utterance and where each starts."""
    lengths: list[int]

    @property
    def starts(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(int).tolist() if self.lengths else []

    @property
    def rows(self) -> int:
        return int(sum(self.lengths))


@dataclass
class InputNorm:
    """How the layer normalises its input while loading it: the producer's statistics and affine weights."""
    mode: int
    stats: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


def conv_output_lengths(lengths: list[int], taps: int, stride: int, pad: int) -> list[int]:
    return [max(0, (n + 2 * pad - taps) // stride + 1) for n in lengths]


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """Conv1d weight [C_out, C_in / groups, taps] -> [C_out, taps * C_in / groups], tap-major (the A tile's
    column order: one tap's channels are contiguous in a channels-last input)."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1).contiguous()


def _tile_table(out_lengths: list[int], block_m: int, device) -> torch.Tensor:
    """[tiles, 3] int32 rows (utterance, first output row, end row): every utterance cut into block_m rows.

    Built with numpy: a batch of 256 two-second utterances has ~25k tiles in the first layers; as a Python
    list of tuples it cost enough host time that the whole speech call at batch 256 went from 4.6k to 7.1-7.6k
    audio-s/s on the H100 when it moved to numpy."""
    lengths = np.asarray(out_lengths, dtype=np.int64)
    counts = -(-lengths // block_m)
    utterance = np.repeat(np.arange(len(lengths)), counts)
    first_tile = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(int(counts.sum())) - first_tile) * block_m
    table = np.stack([utterance, start, np.minimum(start + block_m, lengths[utterance])], axis=1).astype(np.int32)
    if not len(table):
        table = np.zeros((1, 3), dtype=np.int32)
    return torch.from_numpy(table).to(device, non_blocking=True)


def conv1d(x: torch.Tensor, packed: Packed, weight: torch.Tensor, bias: torch.Tensor | None, taps: int,
           stride: int, pad: int = 0, groups: int = 1, in_norm: InputNorm | None = None, in_gelu: bool = False,
           out_stats: int = NONE, out_gelu: bool = False, residual: torch.Tensor | None = None,
           out_lengths: list[int] | None = None):
    """One convolution layer over packed utterances.

    x: [packed.rows, C_in] channels-last; weight: ``pack_conv_weight`` of the Conv1d weight.
    Returns (out [sum(out_lengths), C_out], its Packed, statistics or None): statistics are fp32 sums and
    sums of squares, [utterances, C_out, 2] (PER_CHANNEL) or [rows, 2] (PER_ROW), for the next layer's
    ``InputNorm``.
    """
    c_in = x.shape[1]
    c_out = weight.shape[0]
    out_lengths = out_lengths or conv_output_lengths(packed.lengths, taps, stride, pad)
    out_packed = Packed(out_lengths)
    out = torch.empty(out_packed.rows, c_out, dtype=weight.dtype, device=x.device)
    device = x.device
    seq_info = torch.tensor([packed.starts, packed.lengths, out_packed.starts], dtype=torch.int32).to(device)

    def run(tile: str, table: torch.Tensor) -> torch.Tensor | None:
        block_m, block_n, block_k, warps, stages = TILES[tile]
        stats = None
        if out_stats == PER_CHANNEL:
            stats = torch.zeros(len(out_lengths), c_out, 2, dtype=torch.float32, device=device)
        elif out_stats == PER_ROW:
            stats = torch.zeros(out_packed.rows, 2, dtype=torch.float32, device=device)
        norm = in_norm
        grid = (table.shape[0], triton.cdiv(c_out // groups, block_n), groups)
        _conv_kernel[grid](
            x, weight, bias if bias is not None else weight, residual if residual is not None else out, out, table,
            seq_info[0], seq_info[1], seq_info[2],
            norm.stats if norm else x, norm.weight if norm else x, norm.bias if norm else x,
            stats if stats is not None else x, x.stride(0), out.stride(0), norm.eps if norm else 0.0,
            C_IN=c_in, C_OUT=c_out, CG_IN=c_in // groups, CG_OUT=c_out // groups, TAPS=taps, STRIDE=stride, PAD=pad,
            IN_NORM=norm.mode if norm else NONE, IN_GELU=in_gelu, OUT_STATS=out_stats, OUT_GELU=out_gelu,
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=warps, num_stages=stages)
        return stats

    if out_packed.rows == 0:
        return out, out_packed, None
    names = [n for n, t in TILES.items() if t[1] <= max(64, triton.next_power_of_2(c_out // groups))]
    shape = (c_in, c_out, taps, stride, pad, groups, row_bucket(out_packed.rows), in_norm.mode if in_norm else 0,
             in_gelu, out_stats, out_gelu, residual is not None)
    tables: dict[int, torch.Tensor] = {}

    def table_for(tile: str) -> torch.Tensor:
        block_m = TILES[tile][0]
        if block_m not in tables:
            tables[block_m] = _tile_table(out_lengths, block_m, device)
        return tables[block_m]

    tile = TILE_CACHE.choose("conv1d", shape, names, lambda t: bench_ms(lambda: run(t, table_for(t))), device)
    return out, out_packed, run(tile, table_for(tile))


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
