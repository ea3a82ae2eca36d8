"""autotune: the row-count shape classes and the per-card tile cache."""
import json

import pytest
import torch

from qa_app.kernels import autotune
from qa_app.kernels.autotune import TileCache, row_bucket


def test_row_bucket():
    """At least 16, a power of two, never below the row count, and the smallest such: rows that share a
    bucket share a tuned tile."""
    assert [row_bucket(n) for n in (0, 1, 16, 17, 32, 33, 1000, 1024, 1025)] == [16, 16, 16, 32, 32, 64, 1024,
                                                                                    1024, 2048]
    for n in range(0, 300):
        b = row_bucket(n)
        assert b >= max(n, 16) and b & (b - 1) == 0
        assert b == 16 or b // 2 < n
        assert row_bucket(n + 1) >= b


def test_cpu_returns_first_candidate_without_timing(tmp_path):
    """Off CUDA (the interpreter) the first candidate is used and nothing is timed or written."""
    def never(name):
        raise AssertionError(f"timed {name} on a CPU")

    cache = TileCache(tmp_path)
    assert cache.choose("k", (1, 2), ["b", "a", "c"], never, torch.device("cpu")) == "b"
    assert cache.choose("k", (1, 2), ["c", "a"], never, torch.device("cpu")) == "c"
    assert list(tmp_path.iterdir()) == []


class _FakeCard(TileCache):
    """The CUDA path without a GPU: a fixed cache file instead of one named after the card."""

    def path(self, device):
        return self.directory / "card.json"


@pytest.fixture
def cuda0(monkeypatch):
    monkeypatch.setattr(autotune.torch.cuda, "is_current_stream_capturing", lambda: False)
    return torch.device("cuda", 0)


def test_cuda_path_times_once_and_persists(tmp_path, cuda0):
    """On a card: the fastest candidate wins, a failing one is skipped, the choice is kept in memory (no
    second timing) and on disk, where a fresh cache (a restart) finds it without timing."""
    timed = []
    times = {"a": 3.0, "b": 1.0, "c": 2.0}

    def time_ms(name):
        timed.append(name)
        if name == "big":
            raise RuntimeError("out of shared memory")
        return times[name]

    cache = _FakeCard(tmp_path)
    assert cache.choose("linear", (8, 16), ["a", "big", "b", "c"], time_ms, cuda0) == "b"
    assert sorted(timed) == ["a", "b", "big", "c"]
    assert cache.choose("linear", (8, 16), ["a", "big", "b", "c"], time_ms, cuda0) == "b"
    assert len(timed) == 4
    assert json.loads((tmp_path / "card.json").read_text()) == {"linear|(8, 16)": "b"}

    def never(name):
        raise AssertionError("re-timed a stored shape")

    assert _FakeCard(tmp_path).choose("linear", (8, 16), ["a", "b", "c"], never, cuda0) == "b"


def test_cuda_path_stale_entry_and_no_candidate(tmp_path, cuda0):
    """A stored winner that is no longer a candidate is re-tuned; when every candidate fails, an error."""
    (tmp_path / "card.json").write_text(json.dumps({"conv1d|(1,)": "gone"}))
    cache = _FakeCard(tmp_path)
    assert cache.choose("conv1d", (1,), ["x", "y"], {"x": 2.0, "y": 1.0}.get, cuda0) == "y"

    def fails(name):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no candidate ran"):
        _FakeCard(tmp_path / "other").choose("conv1d", (2,), ["x"], fails, cuda0)


def test_bundled_table_seeds_the_cache(tmp_path, cuda0):
    """A table shipped for this card answers without timing; this machine's own entries win over it; a shipped
    winner that is no longer a candidate is timed again, and the merged table is written to the user's cache."""
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "card.json").write_text(json.dumps({"linear|(8, 16)": "b", "linear|(9, 16)": "a",
                                                   "linear|(10, 16)": "gone"}))
    user = tmp_path / "user"
    user.mkdir()
    (user / "card.json").write_text(json.dumps({"linear|(9, 16)": "c"}))

    def never(name):
        raise AssertionError(f"timed {name} for a shape the tables cover")

    cache = _FakeCard(user, bundled=bundled)
    assert cache.choose("linear", (8, 16), ["a", "b", "c"], never, cuda0) == "b"
    assert cache.choose("linear", (9, 16), ["a", "b", "c"], never, cuda0) == "c"
    assert cache.choose("linear", (10, 16), ["a", "b"], {"a": 2.0, "b": 1.0}.get, cuda0) == "b"
    assert json.loads((user / "card.json").read_text()) == {"linear|(8, 16)": "b", "linear|(9, 16)": "c",
                                                            "linear|(10, 16)": "b"}
