"""The dynamic batcher with the real text encoder on CPU: size, delay, padded-token budget, bucketing by
length, queue limit, deadlines and cancellation. A gate holds the model thread while a test fills the
queue, so what is asserted is the batches formed, never how fast they ran."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from qa_app.runtime.batcher import Batcher, BatchPolicy, Cost, DeadlinePassed, QueueFull, padded_cost

TEXTS = ["where is the medkit", "how do i revive my teammate after he goes down in the storm zone",
         "ammo", "what does the golden scar do and where can i find one on the map", "hi",
         "how do ranks work", "best landing spot", "can i drive the tank across the river bridge"]


class GatedModel:
    """The real encoder behind a gate: the first batch waits until the test opens it."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.batches: list[list[list[int]]] = []
        self.entered, self.gate = threading.Event(), threading.Event()

    def __call__(self, rows: list[list[int]]) -> np.ndarray:
        self.entered.set()
        self.gate.wait(timeout=60)
        self.batches.append(rows)
        return self.encoder.encode_tokens(rows)


def gated_batcher(encoder, **policy) -> tuple[Batcher, GatedModel, list[list[int]]]:
    model = GatedModel(encoder)
    batcher = Batcher("embed", model, lambda ids: Cost(1, len(ids)), BatchPolicy(**policy))
    return batcher, model, encoder.tokenize(TEXTS)


def hold_first(batcher: Batcher, model: GatedModel, first: list[int]):
    """Submit one request and wait until the model thread is held inside its batch."""
    future = batcher.submit(first)
    assert model.entered.wait(timeout=30)
    return future


def test_waiting_requests_share_batches_up_to_the_size_limit_and_match_unbatched_vectors(encoder):
    batcher, model, rows = gated_batcher(encoder, max_batch_size=3, max_queue_delay_s=0.0, max_batch_cost=10_000)
    try:
        first = hold_first(batcher, model, rows[0])
        futures = [batcher.submit(r) for r in rows[1:]]
        model.gate.set()
        vectors = [first.result(30)] + [f.result(30) for f in futures]
    finally:
        batcher.close()
    assert [len(b) for b in model.batches] == [1, 3, 3, 1]
    alone = encoder.encode(TEXTS)
    assert np.allclose(np.stack(vectors), alone, atol=1e-5)  # a player's vector does not depend on batch mates


def test_a_batch_never_exceeds_the_padded_token_budget(encoder):
    batcher, model, rows = gated_batcher(encoder, max_batch_size=64, max_queue_delay_s=0.0, max_batch_cost=60)
    try:
        first = hold_first(batcher, model, rows[0])
        futures = [batcher.submit(r) for r in rows[1:]]
        model.gate.set()
        [f.result(30) for f in [first, *futures]]
    finally:
        batcher.close()
    assert sum(len(b) for b in model.batches) == len(rows)
    for batch in model.batches:
        assert len(batch) == 1 or padded_cost([Cost(1, len(r)) for r in batch]) <= 60


def test_requests_are_grouped_with_others_of_similar_length(encoder):
    batcher, model, _ = gated_batcher(encoder, max_batch_size=2, max_queue_delay_s=0.0, max_batch_cost=10_000)
    short, long = [101, 2000, 102], [101] + [2000] * 40 + [102]
    try:
        first = hold_first(batcher, model, short)
        futures = [batcher.submit(r) for r in (short, long, short, long)]  # arrival order alternates
        model.gate.set()
        [f.result(30) for f in [first, *futures]]
    finally:
        batcher.close()
    # The oldest waiting request anchors each batch and takes the waiting one nearest its length.
    assert [sorted(len(r) for r in b) for b in model.batches] == [[3], [3, 3], [42, 42]]


def test_a_lone_request_waits_its_queue_delay_for_company_and_then_runs(encoder):
    batcher = Batcher("embed", encoder.encode_tokens, lambda ids: Cost(1, len(ids)),
                      BatchPolicy(max_batch_size=8, max_queue_delay_s=0.2))
    try:
        began = time.monotonic()
        vector = batcher.submit(encoder.tokenize(["where is the medkit"])[0]).result(30)
        waited = time.monotonic() - began
    finally:
        batcher.close()
    assert vector.shape == (encoder.dim,)
    assert waited >= 0.2  # it waited the delay (a lower bound: no claim on speed)


def test_a_full_queue_refuses_with_queue_full(encoder):
    batcher, model, rows = gated_batcher(encoder, max_batch_size=1, max_queue_delay_s=0.0, max_queue=2)
    try:
        first = hold_first(batcher, model, rows[0])
        waiting = [batcher.submit(rows[1]), batcher.submit(rows[2])]
        with pytest.raises(QueueFull):
            batcher.submit(rows[3])
        model.gate.set()
        assert all(f.result(30) is not None for f in [first, *waiting])
    finally:
        batcher.close()


def test_expired_and_cancelled_requests_never_reach_the_model(encoder):
    batcher, model, rows = gated_batcher(encoder, max_batch_size=8, max_queue_delay_s=0.0)
    try:
        first = hold_first(batcher, model, rows[0])
        expired = batcher.submit(rows[1], deadline=time.monotonic() - 1)
        cancelled = batcher.submit(rows[2])
        kept = batcher.submit(rows[3])
        assert cancelled.cancel()
        model.gate.set()
        with pytest.raises(DeadlinePassed):
            expired.result(30)
        assert kept.result(30) is not None and first.result(30) is not None
    finally:
        batcher.close()
    seen = [r for b in model.batches for r in b]
    assert rows[1] not in seen and rows[2] not in seen and rows[3] in seen


def test_an_awaiting_task_cancelled_drops_its_request(encoder):
    batcher, model, rows = gated_batcher(encoder, max_batch_size=8, max_queue_delay_s=0.0)

    async def scenario():
        task = asyncio.ensure_future(batcher.run(rows[1]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        first = hold_first(batcher, model, rows[0])
        asyncio.run(scenario())
        model.gate.set()
        first.result(30)
        assert batcher.submit(rows[2]).result(30) is not None
    finally:
        batcher.close()
    assert rows[1] not in [r for b in model.batches for r in b]


def test_a_failing_model_fails_its_batch_and_the_batcher_keeps_serving(encoder):
    calls = []

    def flaky(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("CUDA error: device-side assert")
        return encoder.encode_tokens(rows)

    batcher = Batcher("embed", flaky, lambda ids: Cost(1, len(ids)), BatchPolicy(max_queue_delay_s=0.0))
    try:
        with pytest.raises(RuntimeError, match="device-side"):
            batcher.submit([101, 102]).result(30)
        assert batcher.submit([101, 2000, 102]).result(30).shape == (encoder.dim,)
    finally:
        batcher.close()


def test_batching_off_runs_one_request_per_model_call(encoder):
    batcher, model, rows = gated_batcher(encoder, max_batch_size=1, max_queue_delay_s=0.01)
    try:
        first = hold_first(batcher, model, rows[0])
        futures = [batcher.submit(r) for r in rows[1:4]]
        model.gate.set()
        [f.result(30) for f in [first, *futures]]
    finally:
        batcher.close()
    assert [len(b) for b in model.batches] == [1, 1, 1, 1]
    assert [b[0] for b in model.batches] == rows[:4]  # in arrival order


def test_batched_pipeline_answers_concurrent_players_as_the_engine_answers_each_alone(engine):
    from qa_app.kb import load_queries
    from qa_app.models.loading import ASSETS_DIR
    from qa_app.runtime.pipeline import BatchedEngine

    queries = [q.query for q in load_queries(ASSETS_DIR / "eval" / "innkeeper.jsonl")][:24]
    pipeline = BatchedEngine(engine)
    try:
        async def everyone():
            return await asyncio.gather(*(pipeline.ask("innkeeper", q) for q in queries))

        together = asyncio.run(everyone())
        sizes = [s for metric in pipeline.metrics.registry.collect() if metric.name == "npcqa_batch_size"
                 for s in metric.samples if s.name.endswith("_sum") and s.labels["stage"] == "embed"]
    finally:
        pipeline.close()
    alone = [engine.ask("innkeeper", q) for q in queries]
    assert [a.id for a in together] == [a.id for a in alone]
    assert np.allclose([a.confidence for a in together], [a.confidence for a in alone], atol=1e-4)
    assert sizes and sizes[0].value == len(queries)  # every question went through the embed batcher
    assert {"embed_queue", "embed", "rank_queue", "rank", "total"} <= set(together[0].timings_ms)
