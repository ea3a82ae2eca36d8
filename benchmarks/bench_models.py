"""Whole encoders on the GPU: Hugging Face eager fp32, eager fp16, torch.compile fp16 and our Triton fast path,
in one run, on random weights (a speed test: weights do not change the work).

Shapes: MiniLM-L6 (the bi-encoder and ranker shape) at batch 1 and 1024 x 32 tokens and at mixed lengths
(uniform 8-64 tokens, batch 1024: our padding-free path vs the same kernels on the padded batch);
BERT-base batch 256 x 64; wav2vec2-base at batch 1 and 128 x 2 s, mixed 1-4 s, and its feature encoder
alone (batch 32 x 2 s). Ours is timed eagerly and replayed from a CUDA graph where the server uses one (text:
small batches; speech: buckets of up to 256 s of audio, the host's per-call planning and copies included);
the baselines run as they are (eager, or compiled with the default mode). Prints a table with ratios and the
fraction of the fp16 GEMM ceiling reached (useful FLOPs only: padding does not count).

    python benchmarks/bench_models.py [--skip-compile] [--only minilm,bert,wav2vec2]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import H100_FP16_GEMM_TFLOPS, cuda_ms, graphed, machine, table  # noqa: E402

from qa_app.kernels import to_device
from qa_app.models.fast_encoders import FastBert, FastWav2Vec2, pack_token_rows
from qa_app.models.speech_encoder import SpeechGraphs

DEV = torch.device("cuda")
ROWS: list[list] = []


def bert_flops(cfg, lengths) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = sum(n * 2 * (4 * h * h + 2 * h * i) + 4 * n * n * h for n in lengths)
    return cfg.num_hidden_layers * per_layer


def wav2vec2_flops(cfg, seconds, encoder: bool = True) -> float:
    total = 0.0
    for s in seconds:
        n, c_in = int(s * 16000), 1
        for c, k, st in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
            n = (n - k) // st + 1
            total += 2 * n * k * c_in * c
            c_in = c
        if not encoder:
            continue
        h = cfg.hidden_size
        total += 2 * n * c_in * h + 2 * n * h * (h // cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings
        total += bert_flops(cfg, [n])
    return total


def add(model: str, shape: str, unit: str, times: dict[str, float], work: float, flops: float) -> None:
    """times: ms per call by variant; work: sequences or audio seconds per call (None: report latency)."""
    base = times.get("eager fp16")
    for variant, ms in times.items():
        value = ms if unit == "ms" else work / (ms / 1000.0)
        ratio = (base / ms) if base else float("nan")
        ceiling = flops / (ms / 1000.0) / 1e12 / H100_FP16_GEMM_TFLOPS
        ROWS.append([model, shape, variant, f"{value:,.4g} {unit}", f"{ratio:.2f}x", f"{ceiling:.1%}"])
        print(ROWS[-1], flush=True)


def compiled(model, enabled: bool):
    return torch.compile(model, dynamic=False) if enabled else None


@torch.inference_mode()
def bench_bert(name: str, cfg, cases, use_compile: bool) -> None:
    fp32 = bert_model(cfg)
    fp16 = copy.deepcopy(fp32).half()
    comp = compiled(fp16, use_compile)
    fast = FastBert(fp16)
    gen = torch.Generator().manual_seed(0)
    for batch, lengths in cases:
        rows = [{"input_ids": torch.randint(1000, 30000, (int(n),), generator=gen).tolist()} for n in lengths]
        longest = max(lengths)
        ids = torch.zeros(batch, longest, dtype=torch.long)
        mask = torch.zeros(batch, longest, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row["input_ids"])] = torch.tensor(row["input_ids"])
            mask[r, :len(row["input_ids"])] = 1
        ids, mask = ids.to(DEV), mask.to(DEV)
        packed = pack_token_rows(rows, DEV)
        padded = pack_token_rows([{"input_ids": ids[r].tolist()} for r in range(batch)], DEV)
        q_len = torch.full((batch,), longest, device=DEV)
        real = torch.tensor(lengths, device=DEV)
        times = {"eager fp32": cuda_ms(lambda: fp32(input_ids=ids, attention_mask=mask)),
                 "eager fp16": cuda_ms(lambda: fp16(input_ids=ids, attention_mask=mask))}
        if comp is not None:
            began = time.perf_counter()
            comp(input_ids=ids, attention_mask=mask)
            print(f"compile {name} batch {batch}: {time.perf_counter() - began:.0f} s", flush=True)
            times["compile fp16"] = cuda_ms(lambda: comp(input_ids=ids, attention_mask=mask))
        run_packed = lambda: fast(packed["input_ids"], packed["position_ids"], packed["seq_start"], packed["seq_len"], longest)  # noqa: E731
        run_padded = lambda: fast(padded["input_ids"], padded["position_ids"], padded["seq_start"], real,  # noqa: E731
                                  longest, q_len=q_len)
        mixed = min(lengths) != max(lengths)
        if mixed:
            times["ours padded"] = cuda_ms(run_padded)
        times["ours"] = cuda_ms(run_packed)
        if mixed:
            times["ours padded + CUDA graph"] = cuda_ms(graphed(run_padded))
        times["ours + CUDA graph"] = cuda_ms(graphed(run_packed))
        shape = f"batch {batch} x {'%d-%d' % (min(lengths), max(lengths)) if mixed else longest} tokens"
        unit = "ms" if batch == 1 else "seq/s"
        add(name, shape, unit, times, batch, bert_flops(cfg, lengths))
        if mixed:
            print(f"padding-free vs padded (ours): {times['ours padded'] / times['ours']:.2f}x eager, "
                  f"{times['ours padded + CUDA graph'] / times['ours + CUDA graph']:.2f}x graphed", flush=True)


def bert_model(cfg):
    from transformers import BertModel

    return BertModel(cfg, add_pooling_layer=False).eval().to(DEV)


@torch.inference_mode()
def bench_wav2vec2(use_compile: bool) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config()  # wav2vec2-base: GroupNorm feature encoder, post-norm transformer, 12 x 768
    fp32 = Wav2Vec2Model(cfg).eval().to(DEV)
    fp16 = copy.deepcopy(fp32).half()
    comp = compiled(fp16, use_compile)
    fast = FastWav2Vec2(fp16)
    gen = torch.Generator().manual_seed(0)
    cases = [(1, [2.0]), (128, [2.0] * 128), (128, (1 + 3 * torch.rand(128, generator=gen)).tolist())]
    for batch, seconds in cases:
        lengths = [int(s * 16000) for s in seconds]
        waves = torch.zeros(batch, max(lengths), device=DEV)
        for r, n in enumerate(lengths):
            waves[r, :n] = torch.randn(n, device=DEV, generator=None)
        packed = torch.cat([waves[r, :n] for r, n in enumerate(lengths)])
        w16 = waves.half()
        times = {"eager fp32": cuda_ms(lambda: fp32(waves), iters=20),
                 "eager fp16": cuda_ms(lambda: fp16(w16), iters=20)}
        if comp is not None:
            comp(w16)
            times["compile fp16"] = cuda_ms(lambda: comp(w16), iters=20)
        times["ours"] = cuda_ms(lambda: fast(packed, lengths), iters=20)
        replay = speech_graph(fast, packed, lengths, lambda samples, meta, plan: fast.forward(samples, meta, plan))
        if replay is not None:
            times["ours + CUDA graph"] = cuda_ms(replay, iters=20)
        mixed = min(lengths) != max(lengths)
        shape = f"batch {batch} x {'1-4' if mixed else '%g' % seconds[0]} s"
        audio = sum(seconds)
        if batch == 1:
            add("wav2vec2-base", shape, "ms", times, 1, wav2vec2_flops(cfg, seconds))
        else:
            add("wav2vec2-base", shape, "audio-s/s", times, audio, wav2vec2_flops(cfg, seconds))
    # the convolutional feature encoder alone
    lengths = [32000] * 32
    waves = torch.randn(32, 32000, device=DEV)
    w16 = waves.half()
    packed = waves.reshape(-1)
    comp_fe = compiled(fp16.feature_extractor, use_compile)
    times = {"eager fp32": cuda_ms(lambda: fp32.feature_extractor(waves)),
             "eager fp16": cuda_ms(lambda: fp16.feature_extractor(w16))}
    if comp_fe is not None:
        comp_fe(w16)
        times["compile fp16"] = cuda_ms(lambda: comp_fe(w16))
    plan = fast.plan(lengths)
    times["ours"] = cuda_ms(lambda: fast.features(packed, to_device(plan.meta, DEV), plan))
    times["ours + CUDA graph"] = cuda_ms(speech_graph(fast, packed, lengths, fast.features))
    fe_flops = wav2vec2_flops(cfg, [2.0] * 32, encoder=False)
    add("wav2vec2-base feature encoder", "batch 32 x 2 s", "ms", times, 1, fe_flops)


def speech_graph(fast, packed, lengths, forward):
    """A timed call as ``SpeechGraphs`` serves a batch: the host plans the lengths for the batch's graph bucket,
    copies samples and metadata into the graph's inputs and replays ``forward(samples, meta, plan)``; None
    where no bucket fits (the server runs those eagerly)."""
    shape = SpeechGraphs.bucket(lengths)
    if shape is None:
        return None
    plan = fast.plan(lengths, *shape)
    samples = torch.zeros(shape[0] * shape[1], device=DEV)
    meta = torch.from_numpy(plan.meta).to(DEV)
    replay = graphed(lambda: forward(samples, meta, plan))

    def call():
        meta.copy_(to_device(fast.plan(lengths, *shape).meta, DEV))
        samples[:packed.numel()].copy_(packed)
        replay()
    return call


@torch.inference_mode()
def profile(minilm) -> None:
    """GPU time per kernel of our MiniLM-L6 at 1024 x 32 tokens and wav2vec2-base at 128 x 2 s."""
    from torch.profiler import ProfilerActivity
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    fast = FastBert(bert_model(minilm).half())
    batch = pack_token_rows([{"input_ids": list(range(1000, 1032))}] * 1024, DEV)
    wav = FastWav2Vec2(Wav2Vec2Model(Wav2Vec2Config()).eval().to(DEV).half())
    audio = torch.randn(128 * 32000, device=DEV)
    for name, fn in (("MiniLM-L6 1024 x 32", lambda: fast(batch["input_ids"], batch["position_ids"], batch["seq_start"],
                                                          batch["seq_len"], 32)),
                     ("wav2vec2-base 128 x 2 s", lambda: wav(audio, [32000] * 128))):
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"--- {name}: GPU time per kernel over 5 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main() -> None:
    from transformers import BertConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--only", default="minilm,bert,wav2vec2")
    parser.add_argument("--profile", action="store_true", help="also print where our kernels' time goes")
    args = parser.parse_args()
    use_compile = not args.skip_compile
    only = args.only.split(",")
    print(machine(), flush=True)
    gen = torch.Generator().manual_seed(0)
    minilm = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    if "minilm" in only:
        mixed = torch.randint(8, 65, (1024,), generator=gen).tolist()
        bench_bert("MiniLM-L6", minilm, [(1, [32]), (1024, [32] * 1024), (1024, mixed)], use_compile)
    if "bert" in only:
        bench_bert("BERT-base", BertConfig(), [(256, [64] * 256)], use_compile)
    if "wav2vec2" in only:
        bench_wav2vec2(use_compile)
    if args.profile:
        profile(minilm)
    print()
    print(machine())
    print(table(["model", "shape", "variant", "speed", "vs eager fp16", "of fp16 GEMM ceiling"], ROWS))


if __name__ == "__main__":
    main()
