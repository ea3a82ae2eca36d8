"""Each Triton kernel against its PyTorch reference on the GPU: eager fp32, eager fp16, torch.compile fp16
and ours, in one run, at the encoders' real shapes (MiniLM-L6 at 1024 x 32 tokens, mixed 8-64 tokens,
wav2vec2-base's feature encoder at batch 32 x 2 s). Prints times, the ratio to eager fp16 and, for GEMMs,
the fraction of the fp16 GEMM ceiling.

    python benchmarks/bench_kernels.py [--skip-compile] [--only conv]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import H100_FP16_GEMM_TFLOPS, cuda_ms, machine, table  # noqa: E402

from qa_app.kernels.attention import attention
from qa_app.kernels.bias_act import bias_act
from qa_app.kernels.conv_gelu import PER_CHANNEL, PER_ROW, OutputNorm, Packed, conv1d, pack_conv_weight
from qa_app.kernels.embeddings import embeddings
from qa_app.kernels.layer_norm import layer_norm
from qa_app.kernels.linear import linear

DEV = torch.device("cuda")
ROWS: list[list] = []
ONLY = [""]


def bench(name: str, shape: str, reference, ours, args32: tuple, args16: tuple, use_compile: bool,
          flops: float = 0.0, extra: dict | None = None) -> None:
    if ONLY[0] not in name:
        return
    times = {"eager fp32": cuda_ms(lambda: reference(*args32)), "eager fp16": cuda_ms(lambda: reference(*args16))}
    if use_compile:
        comp = torch.compile(reference, dynamic=False)
        comp(*args16)
        times["compile fp16"] = cuda_ms(lambda: comp(*args16))
    times["ours"] = cuda_ms(lambda: ours(*args16))
    times.update({k: cuda_ms(v) for k, v in (extra or {}).items()})
    for variant, ms in times.items():
        ceiling = f"{flops / (ms / 1000) / 1e12 / H100_FP16_GEMM_TFLOPS:.1%}" if flops else ""
        ROWS.append([name, shape, variant, f"{ms * 1000:.1f} us", f"{times['eager fp16'] / ms:.2f}x", ceiling])
        print(ROWS[-1], flush=True)


def torch_linear(x, w, b, gelu, residual):
    """What transformers runs, in the inputs' dtype (the kernels' *_reference functions compute in fp32)."""
    y = F.linear(x, w, b)
    y = F.gelu(y) if gelu else y
    return y + residual if residual is not None else y


def torch_embeddings(ids, positions, types, word, position, token_type, w, b, eps):
    return F.layer_norm(word[ids] + position[positions] + token_type[types], (word.shape[1],), w, b, eps)


def three_projections(x, wq, wk, wv, bq, bk, bv):
    return torch.cat([F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)], dim=1)


def padded_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def feature_layers_01(audio, w0, gamma, beta, w1):
    """wav2vec2-base's first two layers as transformers runs them: conv, GroupNorm, GELU, conv, GELU."""
    y = F.gelu(F.group_norm(F.conv1d(audio, w0, None, 5), w0.shape[0], gamma, beta, 1e-5))
    return F.gelu(F.conv1d(y, w1, None, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--only", default="", help="only the kernels whose name contains this text")
    args = parser.parse_args()
    use_compile = not args.skip_compile
    ONLY[0] = args.only
    print(machine(), flush=True)
    torch.manual_seed(0)

    def pair(*shape, scale=1.0):
        x = torch.randn(*shape, device=DEV) * scale
        return x, x.half()

    m = 32768  # MiniLM-L6, 1024 sequences x 32 tokens
    for k, n, gelu, res, label in ((384, 1536, True, False, "FFN up + bias + GELU"),
                                   (1536, 384, False, True, "FFN down + bias + residual")):
        x, x16 = pair(m, k)
        w, w16 = pair(n, k, scale=k ** -0.5)
        b, b16 = pair(n)
        r, r16 = pair(m, n)
        bench(f"linear: {label}", f"{m}x{k} -> {n}", lambda x, w, b, r: torch_linear(x, w, b, gelu, r if res else None),
              lambda x, w, b, r: linear(x, w, b, gelu, r if res else None), (x, w, b, r), (x16, w16, b16, r16), use_compile,
              flops=2 * m * k * n)
    x, x16 = pair(m, 384)
    ws = [pair(384, 384, scale=384 ** -0.5) for _ in range(3)]
    bs = [pair(384) for _ in range(3)]
    wqkv = torch.cat([w[1] for w in ws]).contiguous()
    bqkv = torch.cat([b[1] for b in bs]).contiguous()
    bench("fused QKV projection (vs 3 GEMMs)", f"{m}x384 -> 3x384", three_projections,
          lambda x, *_: linear(x, wqkv, bqkv), (x, *[w[0] for w in ws], *[b[0] for b in bs]),
          (x16, *[w[1] for w in ws], *[b[1] for b in bs]), use_compile, flops=2 * m * 384 * 1152)
    y, y16 = pair(m, 1536)
    b, b16 = pair(1536)
    bench("bias + GELU + residual", f"{m}x1536", lambda y, b: F.gelu(y + b) + y,
          lambda y, b: bias_act(y, b, True, y), (y, b), (y16, b16), use_compile)
    r, r16 = pair(m, 384)
    lw, lw16 = pair(384)
    lb, lb16 = pair(384)
    bench("residual + LayerNorm", f"{m}x384", lambda x, r, w, b: F.layer_norm(x + r, (384,), w, b, 1e-12),
          lambda x, r, w, b: layer_norm(x, w, b, 1e-12, r), (x, r, lw, lb), (x16, r16, lw16, lb16), use_compile)
    ids = torch.randint(0, 30522, (m,), device=DEV)
    pos = torch.arange(32, device=DEV).repeat(1024)
    types = torch.zeros(m, dtype=torch.long, device=DEV)
    tables = [pair(30522, 384), pair(512, 384), pair(2, 384)]
    bench("embeddings (word+pos+type+LN)", f"{m} tokens x 384", torch_embeddings, embeddings,
          (ids, pos, types, *[t[0] for t in tables], lw, lb, 1e-12), (ids, pos, types, *[t[1] for t in tables], lw16, lb16, 1e-12),
          use_compile)
    # attention at mixed lengths: padded SDPA (what transformers runs) vs packed
    lens = torch.randint(8, 65, (1024,), generator=torch.Generator().manual_seed(0))
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]]).to(DEV)
    qkv16 = torch.randn(int(lens.sum()), 1152, device=DEV).half()
    q, k, v = (torch.randn(1024, 12, 64, 32, device=DEV) for _ in range(3))
    mask = (torch.arange(64)[None, :] < lens[:, None]).to(DEV)[:, None, None, :]
    padded_qkv = torch.randn(1024 * 64, 1152, device=DEV).half()
    pstarts = torch.arange(1024, device=DEV) * 64
    full = torch.full((1024,), 64, device=DEV)
    dl = lens.to(DEV)
    bench("attention, 1024 seqs 8-64 tokens, 12x32", "padded 64 (reference) vs packed", padded_sdpa,
          lambda *_: attention(qkv16, starts, dl, dl, 64, 12), (q, k, v, mask), (q.half(), k.half(), v.half(), mask),
          use_compile, extra={"ours on the padded batch": lambda: attention(padded_qkv, pstarts, full, dl, 64, 12)})
    # wav2vec2-base feature encoder layers 0-1, batch 32 x 2 s
    audio, audio16 = pair(32, 1, 32000)
    w0, w016 = pair(512, 1, 10, scale=0.3)
    w1, w116 = pair(512, 512, 3, scale=1536 ** -0.5)
    gamma, beta = torch.rand(512, device=DEV) + 0.5, torch.randn(512, device=DEV) * 0.1
    packed = Packed([32000] * 32)
    flat16 = audio16.reshape(-1, 1)
    p0, p1 = pack_conv_weight(w016), pack_conv_weight(w116)

    def ours_01(*_, split=True):  # as the model runs them: layer 0 stores even rows first for layer 1
        h0, pk = conv1d(flat16, packed, p0, None, 10, 5, out_norm=OutputNorm(PER_CHANNEL, gamma, beta, 1e-5),
                        out_gelu=True, out_split=split)
        return conv1d(h0, pk, p1, None, 3, 2, out_gelu=True, in_split=split)[0]

    flops = 32 * (2 * 6399 * 10 * 512 + 2 * 3199 * 1536 * 512)
    bench("conv feature layers 0-1 (+GroupNorm+GELU)", "batch 32 x 2 s, 512 ch", feature_layers_01, ours_01,
          (audio, w0, gamma, beta, w1), (audio16, w016, gamma.half(), beta.half(), w116), use_compile, flops=flops,
          extra={"ours, natural row order": lambda: ours_01(split=False)})
    # layer 1 alone: the largest GEMM of the encoder (K = 3 taps x 512 channels)
    x1, x116 = pair(32, 512, 6399)
    flat1 = x116.transpose(1, 2).reshape(-1, 512).contiguous()
    frames = Packed([6399] * 32)
    bench("conv layer 1 (+GELU)", "batch 32 x 2 s, 512 -> 512, k3 s2", lambda a, w: F.gelu(F.conv1d(a, w, None, 2)),
          lambda *_: conv1d(flat1, frames, p1, None, 3, 2, out_gelu=True, in_split=True)[0], (x1, w1), (x116, w116),
          use_compile, flops=32 * 2 * 3199 * 1536 * 512,
          extra={"ours, natural row order": lambda: conv1d(flat1, frames, p1, None, 3, 2, out_gelu=True)})
    # the same layer with LayerNorm + GELU in its epilogue (the "layer" variant our speech encoder uses)
    ln_w, ln_b = torch.ones(512, device=DEV), torch.zeros(512, device=DEV)

    def conv_layer_norm(a, w, g, b):
        y = F.conv1d(a, w, None, 2).transpose(1, 2)
        return F.gelu(F.layer_norm(y, (y.shape[-1],), g, b, 1e-5))

    bench("conv layer 1 (+LayerNorm+GELU)", "batch 32 x 2 s, 512 -> 512, k3 s2", conv_layer_norm,
          lambda *_: conv1d(flat1, frames, p1, None, 3, 2, out_norm=OutputNorm(PER_ROW, ln_w, ln_b, 1e-5),
                            out_gelu=True, in_split=True)[0],
          (x1, w1, ln_w, ln_b), (x116, w116, ln_w.half(), ln_b.half()), use_compile, flops=32 * 2 * 3199 * 1536 * 512)
    print()
    print(machine())
    print(table(["kernel", "shape", "variant", "time", "vs eager fp16", "of fp16 GEMM ceiling"], ROWS))


if __name__ == "__main__":
    main()
