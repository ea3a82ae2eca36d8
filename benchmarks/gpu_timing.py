"""Shared by the GPU benchmarks: CUDA-event timing, the machine's description, and a plain table printer."""
from __future__ import annotations

import platform

import numpy as np
import torch
import transformers
import triton

H100_FP16_GEMM_TFLOPS = 765.0  # measured fp16 dense GEMM ceiling on the team's H100 80GB (issue 6)


def cuda_ms(fn, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, timed with CUDA events after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def graphed(fn):
    """``fn`` captured in a CUDA graph (after two eager runs): returns a function that replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def machine() -> str:
    return (f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
            f"transformers {transformers.__version__} | CUDA {torch.version.cuda} | python {platform.python_version()}")


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:.4g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
