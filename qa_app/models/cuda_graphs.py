"""CUDA-graph replay of a model's forward pass, one graph per padded (rows, tokens) shape bucket.

An eager BERT forward is hundreds of small kernel launches, each a trip through Python: at small batches
the GPU waits on the launches, and in a server the launching thread also needs the GIL for every one of
them, competing with the event loop. A replayed graph is one launch. Batches are padded up to the nearest
bucket (padding rows have an all-zero attention mask; their outputs are dropped), each bucket is captured
on first use, and all of a model's graphs share one memory pool (replays are serialised by a lock and
outputs copied out, so they never overlap).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 32, 64, 128)
# Graphs pay off where launches dominate: small batches. Larger ones run eagerly (their kernels are long
# enough), which also keeps the graphs' memory small (each captured shape holds its own activations).
MAX_GRAPH_CELLS = 8192  # rows x tokens


def bucket(size: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= size), None)


class GraphedForward:
    """``forward(**batch) -> Tensor [rows, ...]`` replayed from CUDA graphs; eager beyond the largest bucket."""

    def __init__(self, forward: Callable[..., torch.Tensor], device: torch.device, name: str) -> None:
        self.forward, self.device, self.name = forward, device, name
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self._pool = None
        self._lock = threading.Lock()
        self._broken = False  # capture failed once: this model stays eager
        self._stream = torch.cuda.Stream(device)  # where captures happen (one stream: one cuBLAS workspace)

    @torch.inference_mode()
    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        rows, tokens = batch["input_ids"].shape
        shape = (bucket(rows, ROW_BUCKETS), bucket(tokens, TOKEN_BUCKETS))
        if self._broken or None in shape or shape[0] * shape[1] > MAX_GRAPH_CELLS:
            return self.forward(**batch)
        with self._lock:
            entry = self._graphs.get(shape) or self._capture(shape, sorted(batch))
            if entry is None:
                return self.forward(**batch)
            graph, inputs, output = entry
            for key, value in batch.items():
                inputs[key].zero_()
                inputs[key][:rows, :tokens].copy_(value)
            graph.replay()
            return output[:rows].clone()

    def warm_up(self, keys: list[str]) -> int:
        """Capture every bucket now (at load, not under the first players' traffic)."""
        with self._lock:
            for rows in ROW_BUCKETS:
                for tokens in TOKEN_BUCKETS:
                    if rows * tokens <= MAX_GRAPH_CELLS and (rows, tokens) not in self._graphs and not self._broken:
                        self._capture((rows, tokens), sorted(keys))
        return len(self._graphs)

    def _capture(self, shape: tuple[int, int], keys: list[str]):
        inputs = {key: torch.zeros(shape, dtype=torch.long, device=self.device) for key in keys}
        inputs["attention_mask"][:, 0] = 1  # warm-up on sequences that are not entirely padding
        try:
            side = self._stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # let lazy initialisation (cuBLAS handles, kernels) happen outside capture
                    self.forward(**inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (the other model stages, the server) keep using the GPU meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                output = self.forward(**inputs)
        except RuntimeError as err:  # a model whose forward cannot be captured still works, eagerly
            log.warning("%s: CUDA graph capture failed (%s); running eagerly", self.name, err)
            self._broken = True
            return None
        self._pool = graph.pool()
        self._graphs[shape] = (graph, inputs, output)
        log.info("%s: captured CUDA graph for %d rows x %d tokens", self.name, *shape)
        return self._graphs[shape]
