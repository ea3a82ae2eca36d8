"""Recall: an inner-product index over the unit-length embeddings of every KB question.

On CPU the index is faiss: ``flat`` (exact) by default, ``ivf`` or ``hnsw`` for KBs of 100k+ questions,
trading a little recall for speed. A CUDA engine's exact index is ``TorchFlatIndex``: a matrix product on
the GPU for KBs of 100k+ questions (faiss-gpu's wheel cannot be installed everywhere), on the CPU below
that. Inner product equals cosine on unit vectors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

INDEX_KINDS = ("flat", "ivf", "hnsw")


class TorchFlatIndex:
    """Exact inner-product search with torch (on a GPU for large KBs); same ``search``/``ntotal`` as a faiss
    index."""

    def __init__(self, vectors: np.ndarray, device: torch.device) -> None:
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
        self.ntotal = len(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.vectors.device.type == "cpu":  # a small KB: plain numpy, no torch dispatch or thread pool
            scores = np.ascontiguousarray(queries, dtype=np.float32) @ self.vectors.numpy().T  # [queries, n]
            ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, ids, axis=1), ids
        scores = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.vectors.device)
        top = torch.topk(scores @ self.vectors.T, k, dim=1)  # [queries, k]
        return top.values.cpu().numpy(), top.indices.cpu().numpy()


# Below this many questions an exact search is microseconds on the CPU, while one on the GPU waits behind
# every batch queued there (its result must come back to the CPU): a GPU engine keeps small KBs on the CPU.
GPU_SEARCH_MIN_VECTORS = 100_000


def build_index(vectors: np.ndarray, kind: str = "flat", device: torch.device | None = None):
    """vectors: [n, dim] float32, unit length."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    if device is not None and device.type == "cuda" and kind == "flat":
        big = len(vectors) >= GPU_SEARCH_MIN_VECTORS
        return TorchFlatIndex(vectors, device if big else torch.device("cpu"))
    import faiss

    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
    else:
        # About 4*sqrt(n) lists, each trained on at least 39 points as faiss asks.
        lists = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, min(lists, 16))
    index.add(vectors)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each [len(queries), k]; ids are -1 where an approximate index finds fewer."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def save_index(index, path: str | Path) -> None:
    import faiss

    if isinstance(index, TorchFlatIndex):
        index = build_index(index.vectors.cpu().numpy(), "flat")
    faiss.write_index(index, str(path))


def load_index(path: str | Path):
    import faiss

    return faiss.read_index(str(path))
