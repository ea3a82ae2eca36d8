"""Single-question latency of the text pipeline, end to end, on the bundled knowledge base.

Runs every query of an eval set one at a time (the way a lone player asks) through
(a) the full pipeline (normalise, spell, entities, embed, recall, rank, reject) and
(b) the plain bi-encoder baseline (embed + nearest question), in the same process, and prints
p50/p99 per stage and the ratio to the baseline.

    python benchmarks/bench_text_latency.py [--npc quartermaster] [--device cpu] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import transformers

from qa_app import QAEngine
from qa_app.config import Settings
from qa_app.kb import load_queries
from qa_app.models.loading import ASSETS_DIR
from qa_app.retrieval.index import search
from qa_app.text.normalize import normalize


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--npc", default="quartermaster")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--limit", type=int, default=400, help="queries to time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = QAEngine(settings=Settings(device=args.device))
    queries = [q.query for q in load_queries(ASSETS_DIR / "eval" / f"{args.npc}.jsonl")][: args.limit]
    index = engine._index(args.npc)
    for text in queries[:20]:  # warm-up: first calls pay for lazy initialisation
        engine.ask(args.npc, text)

    totals, stages = [], {}
    for text in queries:
        began = time.perf_counter()
        answer = engine.ask(args.npc, text)
        totals.append((time.perf_counter() - began) * 1000)
        for stage, ms in answer.timings_ms.items():
            stages.setdefault(stage, []).append(ms)

    baseline = []
    for text in queries:
        began = time.perf_counter()
        search(index.index, engine.encoder.encode([normalize(text) or text]), 1)
        baseline.append((time.perf_counter() - began) * 1000)

    print(f"date {time.strftime('%Y-%m-%d')}  device {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads)  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"npc {args.npc}: {len(index.kb)} entries, {len(index.questions)} questions; {len(queries)} queries, "
          f"one at a time; rank_k {engine.settings.rank_k}, ranker passage '{engine.passage_mode}'")
    print(f"{'stage':<12}{'p50 ms':>10}{'p99 ms':>10}")
    for stage, values in stages.items():
        p50, p99 = percentiles(values)
        print(f"{stage:<12}{p50:>10.2f}{p99:>10.2f}")
    p50, p99 = percentiles(totals)
    b50, b99 = percentiles(baseline)
    print(f"{'end to end':<12}{p50:>10.2f}{p99:>10.2f}")
    print(f"{'baseline':<12}{b50:>10.2f}{b99:>10.2f}   (plain bi-encoder: embed + nearest question)")
    print(f"pipeline / baseline p50: {p50 / b50:.2f}x")


if __name__ == "__main__":
    main()
