"""CUDA-graph replay of a model's forward pass, one graph per (rows, tokens) shape bucket.

An eager BERT forward is dozens to hundreds of small kernel launches, each a trip through Python: at small
batches the GPU waits on the launches, and in a server the launching thread also needs the GIL for every
one of them, competing with the event loop. A replayed graph is one launch. Batches are padded up to the
nearest bucket, each bucket is captured on first use (or at warm-up), and all of a model's graphs share
one memory pool (replays are serialised by a lock and outputs copied out, so they never overlap).

Two input layouts:
- padded (the transformers reference path): ``[rows, tokens]`` tensors; padding rows have an all-zero
  attention mask and their outputs are dropped;
- packed (the Triton fast path, ``models.fast_encoders.pack_token_rows``): per-token ``[tokens]`` and
  per-row ``[rows]`` tensors plus ``max_len``; bucket padding adds tokens that belong to no row and rows
  of length zero, which the kernels skip.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 32, 64, 128)                                     # padded: tokens per row
PACKED_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # packed: tokens in the batch
ROW_KEYS = ("seq_start", "seq_len")  # packed layout: per-row tensors; the others are per-token
# Graphs pay off where launches dominate: small batches. Larger ones run eagerly (their kernels are long
# enough), which also keeps the graphs' memory small (each captured shape holds its own activations).
MAX_GRAPH_CELLS = 8192  # padded rows x tokens, or packed tokens


def bucket(size: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= size), None)


class GraphedForward:
    """``forward(**batch) -> Tensor [rows, ...]`` replayed from CUDA graphs; eager beyond the largest bucket.

    ``packed_max_len``: None for the padded layout; for the packed one, the longest row the model takes.
    """

    def __init__(self, forward: Callable[..., torch.Tensor], device: torch.device, name: str,
                 packed_max_len: int | None = None) -> None:
        self.forward, self.device, self.name = forward, device, name
        self.packed_max_len = packed_max_len
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self._pool = None
        self._lock = threading.Lock()
        self._broken = False  # capture failed once: this model stays eager
        self._stream = torch.cuda.Stream(device)  # where captures happen (one stream: one cuBLAS workspace)

    def _shape(self, batch: dict) -> tuple[int, int]:
        """(rows, tokens) of a batch; bucketed: the graph's shape, or None where no graph fits."""
        if self.packed_max_len is None:
            return tuple(batch["input_ids"].shape)
        return batch["seq_start"].numel(), batch["input_ids"].numel()

    def _bucket(self, rows: int, tokens: int) -> tuple[int, int] | None:
        if self.packed_max_len is None:
            shape = (bucket(rows, ROW_BUCKETS), bucket(tokens, TOKEN_BUCKETS))
            ok = None not in shape and shape[0] * shape[1] <= MAX_GRAPH_CELLS
        else:
            shape = (bucket(rows, ROW_BUCKETS), bucket(tokens, PACKED_TOKEN_BUCKETS))
            ok = None not in shape and shape[1] <= MAX_GRAPH_CELLS
        return shape if ok else None

    @torch.inference_mode()
    def __call__(self, **batch) -> torch.Tensor:
        rows, tokens = self._shape(batch)
        shape = self._bucket(rows, tokens)
        if self._broken or shape is None:
            return self.forward(**batch)
        with self._lock:
            entry = self._graphs.get(shape) or self._capture(shape, sorted(k for k in batch if k != "max_len"))
            if entry is None:
                return self.forward(**batch)
            graph, inputs, output = entry
            for key, value in batch.items():
                if key == "max_len":
                    continue
                inputs[key].zero_()
                if self.packed_max_len is None:
                    inputs[key][:rows, :tokens].copy_(value)
                else:
                    inputs[key][:value.numel()].copy_(value)
            graph.replay()
            return output[:rows].clone()

    def warm_up(self, keys: list[str]) -> int:
        """Capture every bucket now (at load, not under the first players' traffic)."""
        with self._lock:
            if self.packed_max_len is None:
                shapes = [(r, t) for r in ROW_BUCKETS for t in TOKEN_BUCKETS if r * t <= MAX_GRAPH_CELLS]
            else:  # rows that fit: each row has at least one token and at most packed_max_len
                shapes = [(r, t) for r in ROW_BUCKETS for t in PACKED_TOKEN_BUCKETS
                          if r <= t <= r * self.packed_max_len]
            for shape in shapes:
                if shape not in self._graphs and not self._broken:
                    self._capture(shape, sorted(keys))
        return len(self._graphs)

    def _inputs(self, shape: tuple[int, int], keys: list[str]) -> dict:
        rows, tokens = shape
        if self.packed_max_len is None:
            inputs = {key: torch.zeros(shape, dtype=torch.long, device=self.device) for key in keys}
            inputs["attention_mask"][:, 0] = 1  # warm-up on sequences that are not entirely padding
            return inputs
        inputs = {key: torch.zeros(rows if key in ROW_KEYS else tokens, dtype=torch.long, device=self.device)
                  for key in keys}
        inputs["seq_len"][0] = 1
        return inputs

    def _capture(self, shape: tuple[int, int], keys: list[str]):
        inputs = self._inputs(shape, keys)
        extra = {} if self.packed_max_len is None else {"max_len": min(shape[1], self.packed_max_len)}
        try:
            graph, output = capture(lambda: self.forward(**inputs, **extra), self._stream, self._pool)
        except RuntimeError as err:  # a model whose forward cannot be captured still works, eagerly
            log.warning("%s: CUDA graph capture failed (%s); running eagerly", self.name, err)
            self._broken = True
            return None
        self._pool = graph.pool()
        self._graphs[shape] = (graph, inputs, output)
        log.info("%s: captured CUDA graph for %d rows x %d tokens", self.name, *shape)
        return self._graphs[shape]


def capture(forward: Callable[[], object], stream: torch.cuda.Stream, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """``forward()`` run twice on ``stream`` (lazy initialisation: cuBLAS handles, kernel compiles, tile tuning
    happen there), then captured; returns the graph and the output tensors its replays overwrite."""
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream(stream.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads (the other model stages, the server) keep using the GPU meanwhile.
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        output = forward()
    return graph, output
