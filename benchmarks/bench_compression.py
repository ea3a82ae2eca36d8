"""Teachers against their distilled students, timed the way the engine calls them, in one run.

Ranker: (player question, KB question | answer) pairs from the bundled quartermaster eval set, each query
with its right entry's passage, tokenised beforehand as the engine does (128 tokens at most). Speech
vectoriser: the bundled spoken eval audio (flite voices) at its natural lengths, timed twice: the model
alone (normalised waveforms in, outputs on the device) and the whole ``encode`` call (normalising and CTC
decoding on the host too). On CUDA every model runs on our FP16 fast path (Triton kernels over packed
inputs; the ranker's batch 1 from its CUDA graph, as served); on CPU the ranker runs as served there
(dynamic INT8) and the vectoriser in fp32. Timings are medians of synchronised wall-clock runs of the whole
call; on CUDA also the GPU kernel time of the batch-N call (profiler).

    python benchmarks/bench_compression.py --device cuda [--ranker ranker ranker-l3] \
        [--speech speech-encoder speech-encoder-l3] [--batch 256] [--rounds 2]

Prints one row per model: layers, parameters, size on disk, batch-1 latency, batch-N throughput, batch-N
GPU kernel time, and the speed-ups over the first model of its kind (each model is timed --rounds times in
turn and its best median kept, so tuning, clocks and caches favour none of them).
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from qa_app.kb import load_kb, load_queries
from qa_app.models.loading import ASSETS_DIR, pick_device
from qa_app.models.ranker import Ranker
from qa_app.models.speech_encoder import SpeechEncoder, normalize_waveform
from qa_app.text.normalize import normalize


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1000)
    return float(np.median(times))


def kernel_ms(fn, device: torch.device, runs: int = 10) -> float | None:
    """GPU time of one ``fn()`` call: the sum of its kernels' (and copies') durations, from the profiler. Unlike
    wall-clock time it leaves out the host's share (Python, packing, launches), which a smaller model does not
    shrink and a busy server overlaps with other players' GPU work."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / runs / 1000


def ranker_pairs(count: int) -> tuple[list[str], list[str]]:
    """Answerable eval queries with their right entry's passage, normalised as the engine reads them."""
    kb = load_kb(ASSETS_DIR / "kb" / "quartermaster.jsonl")
    entries = {e.id: e for e in kb.entries}
    queries = [q for q in load_queries(ASSETS_DIR / "eval" / "quartermaster.jsonl") if q.expected_id]
    pairs = [(normalize(q.query), normalize(f"{entries[q.expected_id].questions[0]} | {entries[q.expected_id].answer}"))
             for q in queries]
    pairs = (pairs * (count // len(pairs) + 1))[:count]
    return [q for q, _ in pairs], [p for _, p in pairs]


def speech_audio(folder: Path, count: int) -> list[np.ndarray]:
    import soundfile as sf

    from qa_app.audio.io import resample_to_16k

    files = sorted(folder.glob("*.ogg"))
    if not files:
        raise SystemExit(f"no .ogg speech in {folder}")
    waves = []
    for path in files[:count]:
        samples, rate = sf.read(path, dtype="float32")
        waves.append(resample_to_16k(samples, rate).astype(np.float32))
    return (waves * (count // len(waves) + 1))[:count]


def disk_mib(folder: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20


def stored_parameters(folder: str | Path) -> float:
    """Millions of parameters in the folder's safetensors (the INT8 CPU ranker hides its own from torch)."""
    from safetensors import safe_open

    count = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            count += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return count / 1e6


def ranker_timings(name: str, device: torch.device, pairs_text: tuple[list[str], list[str]], repeats: int):
    """(batch-1 ms, batch-N ms, batch-N GPU kernel ms, the loaded Ranker's folder and layers)."""
    queries, passages = pairs_text
    ranker = Ranker(name, str(device), max_length=128, cpu_int8=device.type == "cpu", cuda_graphs=device.type == "cuda")
    ranker.warm_up()
    pairs = ranker.tokenize(queries, passages)
    one = median_ms(lambda: ranker.score_encoded(pairs[:1]), device, repeats)
    many = median_ms(lambda: ranker.score_encoded(pairs), device, max(5, repeats // 5))
    return one, many, kernel_ms(lambda: ranker.score_encoded(pairs), device), ranker.source, \
        ranker.model.config.num_hidden_layers


def speech_timings(name: str, device: torch.device, waves: list[np.ndarray], repeats: int, stage: str):
    """stage "encode": waveforms in, vectors and transcripts on the host (normalising and CTC decoding included);
    "model": normalised waveforms in, the model's outputs on the device."""
    encoder = SpeechEncoder(name, str(device))
    if stage == "model":
        waves = [normalize_waveform(w) for w in waves]
        run = encoder.forward
    else:
        run = lambda batch: encoder.encode(batch, batch_size=len(batch))  # noqa: E731
    one = median_ms(lambda: run(waves[:1]), device, repeats)
    many = median_ms(lambda: run(waves), device, max(5, repeats // 5))
    return one, many, kernel_ms(lambda: run(waves), device), encoder.source, \
        encoder.model.wav2vec2.config.num_hidden_layers


def compare(kind: str, names: list[str], timings, work: float, rounds: int) -> list[list]:
    """Every model timed ``rounds`` times, in turn (so tuning, clocks and caches favour none of them); each
    model's best median counts. work: items (pairs, or seconds of audio) in the batch-N call."""
    best: dict[str, list] = {}
    for _ in range(rounds):
        for name in names:
            *times, source, layers = timings(name)
            old = best.get(name, [None] * 3)
            best[name] = [min(t for t in (new, was) if t is not None) if new is not None else None
                          for new, was in zip(times, old)] + [source, layers]
    rows, (base_one, base_many, base_kernel, _, _) = [], best[names[0]]
    for name in names:
        one, many, kernel, source, layers = best[name]
        rows.append([f"{kind} {name}", layers, stored_parameters(source), disk_mib(source), one, base_one / one,
                     work / many * 1000, base_many / many, kernel, base_kernel / kernel if kernel else None])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ranker", nargs="*", default=["ranker", "ranker-l3"], help="ranker models, teacher first")
    parser.add_argument("--speech", nargs="*", default=["speech-encoder", "speech-encoder-l3"],
                        help="speech models, teacher first")
    parser.add_argument("--batch", type=int, default=256, help="throughput batch")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="times each model is timed, in turn (best counts)")
    parser.add_argument("--audio", type=Path, default=ASSETS_DIR / "eval" / "spoken" / "innkeeper")
    args = parser.parse_args()

    device = pick_device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"date {time.strftime('%Y-%m-%d')} | {name} | torch {torch.__version__} | "
          f"transformers {transformers.__version__} | python {platform.python_version()}")
    path = "FP16 Triton fast path (CUDA graph at batch 1 for the ranker)" if device.type == "cuda" else \
        "ranker dynamic INT8, speech fp32"
    print(f"{path}; ranker: quartermaster (query, right passage) pairs <= 128 tokens; speech: {args.audio} "
          f"at natural lengths; throughput batch {args.batch}")
    rows = []
    if args.ranker:
        text = ranker_pairs(args.batch)
        rows += compare("ranker", args.ranker, lambda n: ranker_timings(n, device, text, args.repeats), args.batch,
                        args.rounds)
    if args.speech:
        waves = speech_audio(args.audio, args.batch)
        for stage in ("model", "encode"):
            rows += compare(f"speech {stage}", args.speech,
                            lambda n: speech_timings(n, device, waves, args.repeats, stage),
                            sum(len(w) for w in waves) / 16000, args.rounds)
    headers = ["model", "layers", "params M", "disk MiB", "batch-1 ms", "speed-up", "batch-N items/s or audio-s/s",
               "speed-up", "batch-N GPU kernel ms", "speed-up"]
    cells = [[c if isinstance(c, str) else ("-" if c is None else (f"{c:.3g}" if isinstance(c, float) else str(c)))
              for c in row] for row in rows]
    widths = [max(len(str(r[i])) for r in cells + [headers]) for i in range(len(headers))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


if __name__ == "__main__":
    main()
