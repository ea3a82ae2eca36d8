"""The models' FP16 fast path on CUDA: BERT and wav2vec2 encoders rebuilt from our Triton kernels over
packed, padding-free sequences.

Weights are taken from a loaded transformers model (which stays the reference and the CPU path); the
query, key and value projections are concatenated into one GEMM. Every sequence's tokens (or audio frames)
sit back to back: the GEMMs, LayerNorms and the attention never touch a padding position. A padded batch
can still be run (``q_lens`` = padded length, keys masked to the real length) to measure what padding
costs: that is the only difference between the two paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qa_app.kernels import to_device
from qa_app.kernels.attention import attention
from qa_app.kernels.conv_gelu import (PER_CHANNEL, PER_ROW, OutputNorm, Packed, conv1d_packed, conv_output_lengths,
                                      pack_conv_weight, row_starts)
from qa_app.kernels.embeddings import embeddings
from qa_app.kernels.layer_norm import layer_norm
from qa_app.kernels.linear import linear


def _w(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).contiguous()


@dataclass
class LayerWeights:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    norm1_w: torch.Tensor   # post-norm: after attention; pre-norm: before it
    norm1_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    norm2_w: torch.Tensor   # post-norm: after the feed-forward; pre-norm: before it
    norm2_b: torch.Tensor


class FastTransformer:
    """Encoder layers over packed tokens: post-norm (BERT, wav2vec2-base) or pre-norm (stable wav2vec2)."""

    def __init__(self, layers: list[LayerWeights], heads: int, eps: float, pre_norm: bool) -> None:
        self.layers, self.heads, self.eps, self.pre_norm = layers, heads, eps, pre_norm

    def __call__(self, h: torch.Tensor, starts: torch.Tensor, q_lens: torch.Tensor, kv_lens: torch.Tensor,
                 max_len: int) -> torch.Tensor:
        for w in self.layers:
            if self.pre_norm:
                x = layer_norm(h, w.norm1_w, w.norm1_b, self.eps)
                ctx = attention(linear(x, w.qkv_w, w.qkv_b), starts, q_lens, kv_lens, max_len, self.heads)
                h = linear(ctx, w.out_w, w.out_b, residual=h)
                x = layer_norm(h, w.norm2_w, w.norm2_b, self.eps)
                h = linear(linear(x, w.up_w, w.up_b, gelu=True), w.down_w, w.down_b, residual=h)
            else:
                ctx = attention(linear(h, w.qkv_w, w.qkv_b), starts, q_lens, kv_lens, max_len, self.heads)
                # the residual joins in the LayerNorm kernel: the GEMM's epilogue stays bias-only, which cuBLAS
                # fuses too, so the autotuner may pick either
                h = layer_norm(linear(ctx, w.out_w, w.out_b), w.norm1_w, w.norm1_b, self.eps, residual=h)
                f = linear(linear(h, w.up_w, w.up_b, gelu=True), w.down_w, w.down_b)
                h = layer_norm(f, w.norm2_w, w.norm2_b, self.eps, residual=h)
        return h


class FastBert:
    """A transformers ``BertModel``'s encoder on packed tokens: ``[tokens]`` ids in, ``[tokens, hidden]`` out."""

    def __init__(self, bert: nn.Module, dtype: torch.dtype = torch.float16) -> None:
        emb, cfg = bert.embeddings, bert.config
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"fast path supports absolute position embeddings, not {cfg.position_embedding_type}")
        self.word = _w(emb.word_embeddings.weight, dtype)
        self.position = _w(emb.position_embeddings.weight, dtype)
        self.token_type = _w(emb.token_type_embeddings.weight, dtype)
        self.emb_norm = (_w(emb.LayerNorm.weight, dtype), _w(emb.LayerNorm.bias, dtype))
        self.eps = cfg.layer_norm_eps
        layers = []
        for layer in bert.encoder.layer:
            att = layer.attention
            layers.append(LayerWeights(
                qkv_w=_w(torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight]), dtype),
                qkv_b=_w(torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias]), dtype),
                out_w=_w(att.output.dense.weight, dtype), out_b=_w(att.output.dense.bias, dtype),
                norm1_w=_w(att.output.LayerNorm.weight, dtype), norm1_b=_w(att.output.LayerNorm.bias, dtype),
                up_w=_w(layer.intermediate.dense.weight, dtype), up_b=_w(layer.intermediate.dense.bias, dtype),
                down_w=_w(layer.output.dense.weight, dtype), down_b=_w(layer.output.dense.bias, dtype),
                norm2_w=_w(layer.output.LayerNorm.weight, dtype), norm2_b=_w(layer.output.LayerNorm.bias, dtype)))
        self.encoder = FastTransformer(layers, cfg.num_attention_heads, cfg.layer_norm_eps, pre_norm=False)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_start: torch.Tensor,
                 seq_len: torch.Tensor, max_len: int, token_type_ids: torch.Tensor | None = None,
                 q_len: torch.Tensor | None = None) -> torch.Tensor:
        """Packed: ``q_len`` None. Padded (to measure padding's cost): ``q_len`` = the padded length per row."""
        h = embeddings(input_ids, position_ids, token_type_ids, self.word, self.position, self.token_type,
                       *self.emb_norm, self.eps)
        return self.encoder(h, seq_start, seq_len if q_len is None else q_len, seq_len, max_len)


def pack_token_rows(rows: list[dict[str, list[int]]], device: torch.device, tokens: int | None = None,
                    sequences: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenised rows packed back to back, int64 on device: input_ids, position_ids, (token_type_ids),
    seq_start, seq_len per row. ``tokens``/``sequences`` pad the arrays to a fixed size (CUDA-graph buckets):
    extra tokens belong to no sequence, extra sequences are empty."""
    lens = np.array([len(r["input_ids"]) for r in rows], dtype=np.int64)
    total = int(lens.sum())
    tokens, sequences = tokens or total, sequences or len(rows)
    starts = np.zeros(sequences, dtype=np.int64)
    starts[:len(rows)] = np.concatenate([[0], np.cumsum(lens)[:-1]])
    seq_len = np.zeros(sequences, dtype=np.int64)
    seq_len[:len(rows)] = lens
    batch = {"input_ids": np.zeros(tokens, dtype=np.int64), "position_ids": np.zeros(tokens, dtype=np.int64)}
    batch["input_ids"][:total] = np.concatenate([r["input_ids"] for r in rows])
    batch["position_ids"][:total] = np.concatenate([np.arange(n) for n in lens])
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = np.zeros(tokens, dtype=np.int64)
        batch["token_type_ids"][:total] = np.concatenate([r["token_type_ids"] for r in rows])
    batch["seq_start"], batch["seq_len"] = starts, seq_len
    return {k: to_device(v, device) for k, v in batch.items()}


class FastWav2Vec2:
    """A transformers ``Wav2Vec2Model`` on packed utterances: samples in, packed frames ``[frames, hidden]`` out."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float16) -> None:
        cfg = model.config
        self.norm_mode = cfg.feat_extract_norm  # "group": GroupNorm on layer 0 only; "layer": LayerNorm on each
        if self.norm_mode not in ("group", "layer"):
            raise ValueError(f"unknown feat_extract_norm {self.norm_mode!r}")
        self.convs = []
        for layer, taps, stride in zip(model.feature_extractor.conv_layers, cfg.conv_kernel, cfg.conv_stride):
            norm = getattr(layer, "layer_norm", None)
            self.convs.append(dict(
                weight=_w(pack_conv_weight(layer.conv.weight), dtype),
                bias=_w(layer.conv.bias, dtype) if layer.conv.bias is not None else None, taps=taps, stride=stride,
                norm=(_w(norm.weight, torch.float32), _w(norm.bias, torch.float32), norm.eps) if norm is not None else None))
        fp = model.feature_projection
        self.proj_norm = (_w(fp.layer_norm.weight, dtype), _w(fp.layer_norm.bias, dtype), fp.layer_norm.eps)
        self.proj = (_w(fp.projection.weight, dtype), _w(fp.projection.bias, dtype))
        enc = model.encoder
        pos = enc.pos_conv_embed.conv
        self.pos_taps, self.pos_groups = pos.kernel_size[0], pos.groups
        self.pos_w = _w(pack_conv_weight(pos.weight), dtype)  # weight norm folded: ``weight`` is g * v / |v|
        self.pos_b = _w(pos.bias, dtype)
        self.enc_norm = (_w(enc.layer_norm.weight, dtype), _w(enc.layer_norm.bias, dtype), enc.layer_norm.eps)
        self.pre_norm = cfg.do_stable_layer_norm
        layers = []
        for layer in enc.layers:
            att, ff = layer.attention, layer.feed_forward
            layers.append(LayerWeights(
                qkv_w=_w(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]), dtype),
                qkv_b=_w(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]), dtype),
                out_w=_w(att.out_proj.weight, dtype), out_b=_w(att.out_proj.bias, dtype),
                norm1_w=_w(layer.layer_norm.weight, dtype), norm1_b=_w(layer.layer_norm.bias, dtype),
                up_w=_w(ff.intermediate_dense.weight, dtype), up_b=_w(ff.intermediate_dense.bias, dtype),
                down_w=_w(ff.output_dense.weight, dtype), down_b=_w(ff.output_dense.bias, dtype),
                norm2_w=_w(layer.final_layer_norm.weight, dtype), norm2_b=_w(layer.final_layer_norm.bias, dtype)))
        self.encoder = FastTransformer(layers, cfg.num_attention_heads, cfg.layer_norm_eps, self.pre_norm)
        self.dtype = dtype

    def plan(self, lengths: list[int], utterances: int | None = None, longest: int | None = None) -> "SpeechPlan":
        """Host-side metadata of a batch of ``lengths`` samples per utterance. With ``utterances`` and
        ``longest`` (a CUDA graph's bucket), the buffers and grids are sized for any batch within those bounds
        and the metadata padded with empty utterances; otherwise exactly for these lengths."""
        utterances = utterances or len(lengths)
        lens = np.zeros(utterances, dtype=np.int64)
        lens[:len(lengths)] = lengths
        bound = longest if longest is not None else int(lens.max(initial=0))
        meta, bounds = [], []
        for conv in self.convs:
            out = np.array(conv_output_lengths(lens.tolist(), conv["taps"], conv["stride"], 0), dtype=np.int64)
            bound = conv_output_lengths([bound], conv["taps"], conv["stride"], 0)[0]
            meta.append([row_starts(lens), lens, row_starts(out), out])
            bounds.append((bound, utterances * bound if longest is not None else int(out.sum())))
            lens = out
        meta.append([row_starts(lens), lens, row_starts(lens), lens])  # frames: the positional conv and the transformer
        return SpeechPlan(np.array(meta, dtype=np.int32), bounds)

    def features(self, samples: torch.Tensor, meta: torch.Tensor, plan: "SpeechPlan") -> torch.Tensor:
        """The convolutional feature encoder: packed samples [total] -> packed features [frames, conv_dim].
        Each layer stores its output normalised (GroupNorm on layer 0 only, or LayerNorm on every layer) and
        through GELU, from its GEMM's epilogue; for a stride-2 next layer, even rows first (``out_split``).
        ``meta``: ``plan.meta`` on the device."""
        x = samples.to(self.dtype).reshape(-1, 1)
        in_split, last = False, len(self.convs) - 1
        for i, (conv, (longest, rows)) in enumerate(zip(self.convs, plan.bounds)):
            norm = None
            if self.norm_mode == "layer":
                norm = OutputNorm(PER_ROW, *conv["norm"])
            elif i == 0:
                norm = OutputNorm(PER_CHANNEL, *conv["norm"])
            out_split = i < last and self.convs[i + 1]["stride"] == 2
            x = conv1d_packed(x, meta[i], longest, rows, conv["weight"], conv["bias"], conv["taps"], conv["stride"],
                              out_norm=norm, out_gelu=True, in_split=in_split, out_split=out_split)
            in_split = out_split
        return x

    def forward(self, samples: torch.Tensor, meta: torch.Tensor, plan: "SpeechPlan") -> torch.Tensor:
        """Last hidden states [plan.frame_rows, hidden], each utterance's frames back to back from row 0
        (rows past them, in a graph bucket, are scratch). Reads no lengths on the host: CUDA-graph safe."""
        x = self.features(samples, meta, plan)
        h = linear(layer_norm(x, *self.proj_norm), *self.proj)
        frames = meta[len(self.convs)]
        longest, rows = plan.bounds[-1]
        h = conv1d_packed(h, frames, longest, rows, self.pos_w, self.pos_b, self.pos_taps, 1, pad=self.pos_taps // 2,
                          groups=self.pos_groups, out_gelu=True, residual=h)
        if not self.pre_norm:
            h = layer_norm(h, *self.enc_norm)
        h = self.encoder(h, frames[0], frames[1], frames[1], max(longest, 1))
        if self.pre_norm:
            h = layer_norm(h, *self.enc_norm)
        return h

    def __call__(self, samples: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, Packed]:
        """samples: the utterances' 16 kHz samples back to back; lengths: samples per utterance.
        Returns packed last hidden states [frames, hidden] and the frames per utterance."""
        plan = self.plan(lengths)
        h = self.forward(samples, to_device(plan.meta, samples.device), plan)
        return h, Packed(plan.meta[-1, 1].tolist())


@dataclass
class SpeechPlan:
    """A speech batch's metadata: ``meta`` int32 [conv layers + 1, 4, utterances], per conv layer (input starts,
    input lengths, output starts, output lengths) and last the frames (starts, lengths, starts, lengths); and
    per conv layer (longest output, output rows) bounds, the buffers' and grids' sizes."""
    meta: np.ndarray
    bounds: list[tuple[int, int]]

    @property
    def frame_rows(self) -> int:
        return self.bounds[-1][1]
