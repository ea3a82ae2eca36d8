"""GPU correctness of the Triton fast path at real shapes, against fp32 references. Exit status 1 on failure.

1. Every kernel: relative error (max |ours - fp32 reference| / max |reference|) <= 1e-2.
2. Every model end to end, fast fp16 vs the transformers model in fp32: cosine >= 0.999 of the final
   embeddings (text bi-encoder, speech vectoriser, random-weight BERT-base and wav2vec2-base), ranker
   logits within 1e-2 relative.
3. The bundled eval sets: identical top-1 answers from the fast engine and from the fp32 reference engine
   (the transformers models in fp32 on the same GPU; typed queries, and spoken ones where a spoken
   manifest is present), with the transformers fp16 engine's count beside it for scale.

    python benchmarks/check_kernels.py [--skip-eval]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import machine, table  # noqa: E402

from qa_app.kernels.attention import attention, attention_reference
from qa_app.kernels.bias_act import bias_act, bias_act_reference
from qa_app.kernels.conv_gelu import (PER_CHANNEL, PER_ROW, OutputNorm, Packed, conv1d, conv_output_lengths,
                                      pack_conv_weight)
from qa_app.kernels.embeddings import embeddings, embeddings_reference
from qa_app.kernels.layer_norm import layer_norm, layer_norm_reference
from qa_app.kernels.linear import linear, linear_reference
from qa_app.kernels.pooling import mean_pool, mean_pool_reference

DEV = torch.device("cuda")
results: list[list] = []


def record(name: str, shape: str, value: float, bar: float, higher_is_better: bool = False) -> None:
    ok = value >= bar if higher_is_better else value <= bar
    results.append([name, shape, f"{value:.3g}", ("≥ " if higher_is_better else "≤ ") + f"{bar:g}", "ok" if ok else "FAIL"])
    print(results[-1], flush=True)


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12))


def h(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).half()


def check_kernels() -> None:
    torch.manual_seed(0)
    for m, k, n, gelu, res in ((32768, 384, 1152, False, False), (32768, 384, 1536, True, False),
                               (32768, 1536, 384, False, True), (16384, 768, 3072, True, False), (32, 384, 1152, False, False)):
        x, w, b = h(m, k), h(n, k, scale=k ** -0.5), h(n)
        r = h(m, n) if res else None
        record("linear", f"{m}x{k}->{n} gelu={gelu} res={res}", rel(linear(x, w, b, gelu, r),
                                                                  linear_reference(x.float(), w.float(), b.float(), gelu, r)), 1e-2)
    x, b, r = h(32768, 1536), h(1536), h(32768, 1536)
    record("bias_act", "32768x1536 gelu+res", rel(bias_act(x, b, True, r), bias_act_reference(x.float(), b.float(), True, r.float())), 1e-2)
    for n in (384, 768):
        x, r, w, b = h(32768, n), h(32768, n), h(n), h(n)
        record("layer_norm", f"32768x{n} +res", rel(layer_norm(x, w, b, 1e-12, residual=r),
                                                     layer_norm_reference(x.float(), w.float(), b.float(), 1e-12, r.float())), 1e-2)
    ids = torch.randint(0, 30522, (32768,), device=DEV)
    pos = torch.randint(0, 64, (32768,), device=DEV)
    types = torch.randint(0, 2, (32768,), device=DEV)
    word, position, typ, w, b = h(30522, 384), h(512, 384), h(2, 384), h(384), h(384)
    record("embeddings", "32768 tokens x 384", rel(embeddings(ids, pos, types, word, position, typ, w, b, 1e-12),
                                                   embeddings_reference(ids, pos, types, word.float(), position.float(),
                                                                        typ.float(), w.float(), b.float(), 1e-12)), 1e-2)
    lens = torch.randint(8, 65, (1024,), generator=torch.Generator().manual_seed(0))
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]])
    for hidden, heads in ((384, 12), (768, 12)):
        qkv = h(int(lens.sum()), 3 * hidden)
        s, l = starts.to(DEV), lens.to(DEV)
        record("attention packed", f"1024 seqs 8-64 tokens, {heads}x{hidden // heads}",
               rel(attention(qkv, s, l, l, 64, heads), attention_reference(qkv.float(), s, l, l, heads)), 1e-2)
    padded = h(1024 * 64, 3 * 384)
    pstarts = torch.arange(1024, device=DEV) * 64
    q = torch.full((1024,), 64, device=DEV)
    ours = attention(padded, pstarts, q, lens.to(DEV), 64, 12)
    ref = attention_reference(padded.float(), pstarts, q, lens.to(DEV), 12)
    record("attention padded", "1024 x 64, keys masked", rel(ours, ref), 1e-2)
    x = h(int(lens.sum()), 384)
    record("mean_pool", "1024 seqs 8-64", rel(mean_pool(x, starts.to(DEV), lens.to(DEV)),
                                            mean_pool_reference(x.float(), starts.to(DEV), lens.to(DEV))), 1e-2)
    # wav2vec2-base feature encoder layers 0 (GroupNorm from the window moments + GELU in the epilogue) and 1
    # (GELU), then a layer with LayerNorm + GELU in its epilogue (the "layer" variant), a positional conv
    seconds = [2.0, 1.3, 3.7, 1.0]
    packed = Packed([int(s * 16000) for s in seconds])
    audio = torch.randn(packed.rows, 1, device=DEV)
    w0 = torch.randn(512, 1, 10, device=DEV) * 0.3
    w1 = torch.randn(512, 512, 3, device=DEV) * (1536 ** -0.5)
    gamma, beta = torch.rand(512, device=DEV) + 0.5, torch.randn(512, device=DEV) * 0.1
    h0, p0 = conv1d(audio.half(), packed, pack_conv_weight(w0).half(), None, 10, 5,
                    out_norm=OutputNorm(PER_CHANNEL, gamma, beta, 1e-5), out_gelu=True)
    h1, p1 = conv1d(h0, p0, pack_conv_weight(w1).half(), None, 3, 2, out_gelu=True)
    h2, _ = conv1d(h1, p1, pack_conv_weight(w1).half(), None, 3, 2, out_norm=OutputNorm(PER_ROW, gamma, beta, 1e-5),
                   out_gelu=True)
    refs0, refs1, refs2 = [], [], []
    for start, n in zip(packed.starts, packed.lengths):
        y = F.gelu(F.group_norm(F.conv1d(audio[start:start + n].t().unsqueeze(0), w0, None, 5), 512, gamma, beta,
                                1e-5))
        refs0.append(y[0].t())
        y = F.gelu(F.conv1d(y, w1, None, 2))
        refs1.append(y[0].t())
        y = F.gelu(F.layer_norm(F.conv1d(y, w1, None, 2)[0].t(), (512,), gamma, beta, 1e-5))
        refs2.append(y)
    record("conv0 (+GroupNorm+GELU)", "4 utterances 1-3.7 s, 1->512 k10 s5", rel(h0, torch.cat(refs0)), 1e-2)
    record("conv1 (+GELU)", "512->512 k3 s2", rel(h1, torch.cat(refs1)), 1e-2)
    record("conv2 (+LayerNorm+GELU)", "512->512 k3 s2", rel(h2, torch.cat(refs2)), 1e-2)
    # the same chain storing even rows first, so layers 1-2 read each tap as a row block (TMA on Hopper)
    s0, _ = conv1d(audio.half(), packed, pack_conv_weight(w0).half(), None, 10, 5,
                   out_norm=OutputNorm(PER_CHANNEL, gamma, beta, 1e-5), out_gelu=True, out_split=True)
    s1, _ = conv1d(s0, p0, pack_conv_weight(w1).half(), None, 3, 2, out_gelu=True, in_split=True, out_split=True)
    s2, _ = conv1d(s1, p1, pack_conv_weight(w1).half(), None, 3, 2, out_norm=OutputNorm(PER_ROW, gamma, beta, 1e-5),
                   out_gelu=True, in_split=True)
    even_first = torch.cat([torch.cat([r[0::2], r[1::2]]) for r in refs1])
    record("conv1 split in and out (+GELU)", "512->512 k3 s2", rel(s1, even_first), 1e-2)
    record("conv2 split in (+LayerNorm+GELU)", "512->512 k3 s2", rel(s2, torch.cat(refs2)), 1e-2)
    frames = Packed(conv_output_lengths(p1.lengths, 3, 2, 0))
    x = h(frames.rows, 768)
    wp, bp = torch.randn(768, 48, 128, device=DEV) * (6144 ** -0.5), torch.randn(768, device=DEV) * 0.1
    ours = conv1d(x, frames, pack_conv_weight(wp).half(), bp.half(), 128, 1, pad=64, groups=16, out_gelu=True,
                  residual=x, out_lengths=frames.lengths)[0]
    ref = torch.cat([x[s:s + n].float() + F.gelu(F.conv1d(x[s:s + n].float().t().unsqueeze(0), wp, bp, 1, 64, groups=16)[0, :, :n].t())
                     for s, n in zip(frames.starts, frames.lengths)])
    record("positional conv (grouped, +GELU +residual)", "768 ch, k128, 16 groups", rel(ours, ref), 1e-2)


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float((a * b).sum(-1).min())


def check_random_models() -> None:
    from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2Model

    from qa_app.models.fast_encoders import FastBert, FastWav2Vec2, pack_token_rows

    torch.manual_seed(0)
    bert = BertModel(BertConfig(), add_pooling_layer=False).eval().to(DEV)
    rows = [{"input_ids": torch.randint(1000, 30000, (int(n),)).tolist()} for n in torch.randint(8, 65, (64,))]
    batch = pack_token_rows(rows, DEV)
    fast = FastBert(bert)
    with torch.inference_mode():
        ours = fast(batch["input_ids"], batch["position_ids"], batch["seq_start"], batch["seq_len"], 64)
        got = mean_pool(ours, batch["seq_start"], batch["seq_len"]).cpu().numpy()
        want = np.stack([bert(torch.tensor([r["input_ids"]], device=DEV)).last_hidden_state[0].mean(0).cpu().numpy() for r in rows])
    record("BERT-base (random) mean-pooled", "64 seqs 8-64 tokens", cosine_min(got, want), 0.999, True)
    model = Wav2Vec2Model(Wav2Vec2Config()).eval().to(DEV)
    waves = [torch.randn(int(s * 16000), device=DEV) for s in (1.0, 2.0, 3.3)]
    with torch.inference_mode():
        hidden, packed = FastWav2Vec2(model)(torch.cat(waves), [len(w) for w in waves])
        got = np.stack([hidden[s:s + n].float().mean(0).cpu().numpy() for s, n in zip(packed.starts, packed.lengths)])
        want = np.stack([model(w[None]).last_hidden_state[0].mean(0).cpu().numpy() for w in waves])
    record("wav2vec2-base (random) mean frames", "1.0/2.0/3.3 s", cosine_min(got, want), 0.999, True)


def check_shipped_models() -> None:
    from qa_app.config import Settings
    from qa_app.kb import load_queries
    from qa_app.models.loading import ASSETS_DIR
    from qa_app.models.ranker import Ranker
    from qa_app.models.text_encoder import TextEncoder

    settings = Settings.from_env()
    queries = [q.query for q in load_queries(ASSETS_DIR / "eval" / "quartermaster.jsonl")][:512]
    fast = TextEncoder(settings.text_encoder, "cuda", cuda_graphs=True)
    fast.warm_up()
    reference = TextEncoder(settings.text_encoder, "cuda", fast_kernels=False)
    reference.model.float()
    record("text encoder (shipped)", "512 eval queries", cosine_min(fast.encode(queries), reference.encode(queries)), 0.999, True)
    ranker = Ranker(settings.ranker, "cuda", cuda_graphs=True)
    ranker.warm_up()
    ref_ranker = Ranker(settings.ranker, "cuda", fast_kernels=False)
    ref_ranker.model.float()
    passages = queries[1:] + queries[:1]
    got, want = ranker.score(queries, passages), ref_ranker.score(queries, passages)
    record("ranker logits (shipped)", "512 pairs", float(np.abs(got - want).max() / np.abs(want).max()), 1e-2)
    speech = speech_waves()
    if speech:
        from qa_app.models.speech_encoder import SpeechEncoder

        fast_speech = SpeechEncoder(settings.speech_encoder, "cuda")
        ref_speech = SpeechEncoder(settings.speech_encoder, "cuda", fast_kernels=False)
        ref_speech.model.float()
        got, _ = fast_speech.encode(speech)
        want, _ = ref_speech.encode(speech)
        record("speech vectoriser (shipped)", f"{len(speech)} spoken eval clips", cosine_min(got, want), 0.999, True)


def speech_waves() -> list[np.ndarray]:
    from qa_app.audio.io import read_audio_file
    from qa_app.models.loading import ASSETS_DIR
    from qa_app.train.speech_data import read_manifest

    manifest = ASSETS_DIR / "eval" / "spoken" / "innkeeper.jsonl"
    if not manifest.is_file():
        return []
    lines = [line for line in read_manifest(manifest) if Path(line["audio"]).is_file()]
    return [read_audio_file(line["audio"], 15.0) for line in lines]


def check_eval_top1() -> None:
    from qa_app import QAEngine
    from qa_app.config import Settings
    from qa_app.kb import load_queries
    from qa_app.models.loading import ASSETS_DIR

    reference = dict(device="cuda", fast_kernels=False, cuda_graphs=False)
    engines = {"fast": QAEngine(settings=Settings.from_env(device="cuda")),
               "hf-fp16": QAEngine(settings=Settings.from_env(**reference)),
               "fp32": QAEngine(settings=Settings.from_env(**reference))}
    fp32 = engines["fp32"]  # the transformers models in fp32, the KB indexes rebuilt with them
    fp32.encoder.model.float()
    fp32.ranker.model.float()
    for npc in fp32.npcs:
        fp32._npcs[npc] = fp32._build(fp32._npcs[npc].kb)
    for npc in ("quartermaster", "innkeeper"):
        queries = [q.query for q in load_queries(ASSETS_DIR / "eval" / f"{npc}.jsonl")]
        top = {}
        for name, engine in engines.items():
            began = time.perf_counter()
            answers = [a for s in range(0, len(queries), 64) for a in engine.ask_batch(npc, queries[s:s + 64])]
            top[name] = [(a.candidates[0].id if a.candidates else None, a.rejected) for a in answers]
            print(f"{npc} {name}: {time.perf_counter() - began:.1f} s", flush=True)
        for name in ("fast", "hf-fp16"):
            differ = sum(x[0] != y[0] for x, y in zip(top[name], top["fp32"]))
            decisions = sum(x[1] != y[1] for x, y in zip(top[name], top["fp32"]))
            record(f"eval top-1 differs from fp32: {name}", f"{npc}, {len(queries)} typed (accept/reject differ: {decisions})",
                   differ, 0 if name == "fast" else 1e9)
    waves = speech_waves()
    if waves:
        fp32.speech.encoder.model.float()
        top = {}
        for name, engine in engines.items():
            answers = [a for s in range(0, len(waves), 16) for a in engine.ask_speech_batch("innkeeper", waves[s:s + 16])]
            top[name] = [(a.candidates[0].id if a.candidates else None, a.rejected) for a in answers]
        for name in ("fast", "hf-fp16"):
            differ = sum(x[0] != y[0] for x, y in zip(top[name], top["fp32"]))
            decisions = sum(x[1] != y[1] for x, y in zip(top[name], top["fp32"]))
            record(f"eval top-1 differs from fp32: {name}", f"innkeeper, {len(waves)} spoken (accept/reject differ: {decisions})",
                   differ, 0 if name == "fast" else 1e9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()
    print(machine(), flush=True)
    check_kernels()
    check_random_models()
    check_shipped_models()
    if not args.skip_eval:
        check_eval_top1()
    print(table(["check", "shape", "value", "bar", "result"], results))
    sys.exit(0 if all(r[-1] == "ok" for r in results) else 1)


if __name__ == "__main__":
    main()
