"""Tile choice per GPU model and problem shape: measured once, kept on disk, so a restart does not re-tune.

The seed systems pick cuBLAS algorithms per card; we pick among Triton tile shapes (and cuBLAS itself,
where a kernel offers it) by timing each candidate on the first call of a shape class, and store the
winner in ``~/.cache/qa_app/kernels/<card>-triton<version>.json``. Shapes are classed by their fixed
dimensions and the row count rounded up to a power of two, so serving traffic of every batch size maps
onto a few dozen entries. Tables measured on the cards we run on ship in ``qa_app/kernels/tuned/`` (same
file names) and seed a card's cache, so the first start on such a card times only what they lack; its own
measurements win over them, and an entry that names no current candidate is timed again.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch
import triton

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "qa_app" / "kernels"
BUNDLED_DIR = Path(__file__).resolve().parent / "tuned"


def row_bucket(rows: int) -> int:
    return max(16, triton.next_power_of_2(max(rows, 1)))


class TileCache:
    """Winning candidate (an index into a kernel's candidate list, by name) per (kernel, shape class)."""

    def __init__(self, directory: Path | None = None, bundled: Path = BUNDLED_DIR) -> None:
        self.directory = Path(directory) if directory else DEFAULT_CACHE_DIR
        self.bundled = Path(bundled)
        self._entries: dict[str, dict[str, str]] = {}
        self._chosen: dict[tuple, str] = {}  # the hot path: one dict lookup per kernel call
        self._paths: dict[int, Path] = {}
        self._lock = threading.Lock()

    def path(self, device: torch.device) -> Path:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._paths:
            card = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(index)).strip("-")
            self._paths[index] = self.directory / f"{card}-triton{triton.__version__}.json"
        return self._paths[index]

    def _load(self, path: Path) -> dict[str, str]:
        key = str(path)
        if key not in self._entries:
            entries: dict[str, str] = {}
            for source in (self.bundled / path.name, path):  # this machine's own measurements win
                try:
                    entries.update(json.loads(source.read_text()))
                except (OSError, ValueError):  # none yet, or a damaged one: tune again
                    pass
            self._entries[key] = entries
        return self._entries[key]

    def choose(self, kernel: str, shape: Hashable, candidates: Sequence[str], time_ms: Callable[[str], float],
               device: torch.device) -> str:
        """The fastest of ``candidates`` (names) for this shape class on this card, timing them if unknown."""
        if device.type != "cuda":
            return candidates[0]  # the interpreter (tests): any valid tile will do
        chosen = self._chosen.get((device.index, kernel, shape))
        if chosen is not None:
            return chosen
        path = self.path(device)
        key = f"{kernel}|{shape}"
        with self._lock:
            entries = self._load(path)
            if entries.get(key) in candidates:
                self._chosen[(device.index, kernel, shape)] = entries[key]
                return entries[key]
            if torch.cuda.is_current_stream_capturing():
                return candidates[0]  # cannot time inside a CUDA-graph capture; warm-up tunes first
            timings = {}
            for name in candidates:
                try:
                    timings[name] = time_ms(name)
                except (RuntimeError, triton.runtime.errors.OutOfResources) as err:  # tile too big for this card
                    log.debug("%s %s: candidate %s failed: %s", kernel, shape, name, err)
            if not timings:
                raise RuntimeError(f"{kernel}: no candidate ran for shape {shape}")
            best = min(timings, key=timings.get)
            entries[key] = best
            self._chosen[(device.index, kernel, shape)] = best
            log.info("%s %s: %s (%.4f ms)", kernel, shape, best, timings[best])
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
                tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half of one
            except OSError as err:
                log.warning("kernel tile cache %s not written: %s", path, err)
            return best


def bench_ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25)


TILE_CACHE = TileCache()
