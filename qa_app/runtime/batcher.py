"""A dynamic batcher: many players' requests to one model stage become one batch on the model's thread.

Requests wait in a bounded queue. The model thread takes the oldest request, waits at most the queue delay
for company, and fills the batch with the waiting requests closest to it in length, up to the batch size
and a budget of padded cost (rows x longest row, in tokens or audio samples), so a batch wastes little on
padding and the oldest request is never passed over. Requests whose deadline has passed or whose caller
has cancelled are dropped before the model sees them. ``max_batch_size=1`` turns batching off: one
request per model call, in arrival order.

The batcher knows nothing of gRPC or of the model: it calls ``run_batch(items) -> results`` (same
length, same order) and resolves each request's future.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(RuntimeError):
    """The stage's queue is at its limit: the caller should back off and retry."""


class DeadlinePassed(TimeoutError):
    """The request's deadline passed while it waited, so it never reached the model."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 64        # requests per model call; 1 turns batching off
    max_queue_delay_s: float = 0.002  # how long the oldest request may wait for others to join it
    max_batch_cost: int = 16_384    # padded cost per batch: rows x longest row (tokens or audio samples)
    max_queue: int = 2048           # waiting requests; more are refused with QueueFull

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_cost < 1 or self.max_queue < 1:
            raise ValueError("max batch size, max batch cost and max queue must be at least 1")
        if self.max_queue_delay_s < 0:
            raise ValueError("max queue delay cannot be negative")


@dataclass(frozen=True)
class Cost:
    """What one request adds to a batch: rows (sequences) of at most ``length`` tokens or samples each."""
    rows: int
    length: int


def padded_cost(costs: Sequence[Cost]) -> int:
    """The batch's size once padded to its longest row: what the model actually computes."""
    return sum(c.rows for c in costs) * max((c.length for c in costs), default=0)


class BatchMetrics:
    """Histograms of batch size, padded cost and queue delay, and the busy fraction, per stage."""

    SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    COST_BUCKETS = tuple(2 ** i for i in range(4, 24))
    DELAY_BUCKETS_MS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 50, 100, 250, 1000)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.registry = registry
        self.batch_size = Histogram("npcqa_batch_size", "Requests per model call", ["stage"],
                                    buckets=self.SIZE_BUCKETS, registry=registry)
        self.batch_cost = Histogram("npcqa_batch_cost", "Padded rows x length per model call", ["stage"],
                                    buckets=self.COST_BUCKETS, registry=registry)
        self.queue_delay_ms = Histogram("npcqa_batch_queue_delay_ms", "Time a request waited for its batch (ms)",
                                        ["stage"], buckets=self.DELAY_BUCKETS_MS, registry=registry)
        self.busy_seconds = Counter("npcqa_stage_busy_seconds", "Time the stage's model spent on batches",
                                    ["stage"], registry=registry)
        self.dropped = Counter("npcqa_batch_dropped", "Requests dropped before the model, by reason",
                               ["stage", "reason"], registry=registry)
        self.queue_depth = Gauge("npcqa_batch_queue_depth", "Requests waiting for a batch", ["stage"],
                                 registry=registry)


@dataclass
class _Request(Generic[Item]):
    item: Item
    cost: Cost
    future: Future
    enqueued: float
    deadline: float | None  # time.monotonic() after which the result is worthless
    started: float = 0.0    # when its batch began running (time.monotonic())
    finished: float = 0.0   # when its batch finished


class Batcher(Generic[Item, Result]):
    """One model stage shared by every request on the server; the model runs on this batcher's thread."""

    def __init__(self, name: str, run_batch: Callable[[list[Item]], Sequence[Result]],
                 cost: Callable[[Item], Cost], policy: BatchPolicy = BatchPolicy(),
                 metrics: BatchMetrics | None = None, device_lock: threading.Lock | None = None) -> None:
        """device_lock: held while a batch runs; stages sharing a CPU share one, so their batches take turns
        instead of fighting over the same cores."""
        self.name, self.policy = name, policy
        self._device_lock = device_lock or contextlib.nullcontext()
        self._run_batch, self._cost = run_batch, cost
        self.metrics = metrics or BatchMetrics()
        self._pending: list[_Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: Item, deadline: float | None = None) -> Future:
        """Queue one request; its future resolves to the model's result for it.

        deadline: ``time.monotonic()`` value after which the request is dropped unrun (DeadlinePassed).
        Raises QueueFull when the queue is at its limit. Cancelling the future drops the request.
        """
        return self._submit(item, deadline).future

    def _submit(self, item: Item, deadline: float | None) -> _Request:
        request = _Request(item, self._cost(item), Future(), time.monotonic(), deadline)
        with self._wake:
            if self._closed:
                raise RuntimeError(f"the {self.name} batcher is closed")
            if len(self._pending) >= self.policy.max_queue:
                self.metrics.dropped.labels(self.name, "queue_full").inc()
                raise QueueFull(f"{self.name} queue is full ({len(self._pending)} requests waiting)")
            self._pending.append(request)
            self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            self._wake.notify()
        return request

    async def run(self, item: Item, deadline: float | None = None) -> Result:
        """``submit`` for asyncio callers: cancelling the awaiting task drops the request."""
        return await asyncio.wrap_future(self.submit(item, deadline))

    async def run_timed(self, item: Item, deadline: float | None = None) -> tuple[Result, float, float]:
        """``run``, also returning the ms the request waited for its batch and the ms its batch ran."""
        request = self._submit(item, deadline)
        result = await asyncio.wrap_future(request.future)
        return result, (request.started - request.enqueued) * 1000, (request.finished - request.started) * 1000

    def close(self) -> None:
        """Stop taking requests; waiting ones are cancelled; the thread ends after its current batch."""
        with self._wake:
            self._closed = True
            for request in self._pending:
                request.future.cancel()
            self._pending.clear()
            self._wake.notify()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Request] | None:
        policy = self.policy
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            # Wait for company until the oldest request has waited its delay, or a full batch is here.
            due = self._pending[0].enqueued + policy.max_queue_delay_s
            while not self._closed and len(self._pending) < policy.max_batch_size:
                left = due - time.monotonic()
                if left <= 0 or padded_cost([r.cost for r in self._pending]) >= policy.max_batch_cost:
                    break
                self._wake.wait(left)
            if self._closed:
                return None
            batch = self._take()
            self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            return batch

    def _take(self) -> list[_Request]:
        """The oldest request and the waiting ones nearest it in length, within size and cost budget.

        Only the oldest few batches' worth of requests are considered: this runs on the model's thread for
        every batch, and sorting a long queue there would delay the model."""
        policy = self.policy
        oldest = self._pending[0]
        window = self._pending[1: 1 + 4 * policy.max_batch_size]
        chosen, rows, longest = [oldest], oldest.cost.rows, oldest.cost.length
        for request in sorted(window, key=lambda r: abs(r.cost.length - oldest.cost.length)):
            if len(chosen) >= policy.max_batch_size:
                break
            grown_rows, grown_longest = rows + request.cost.rows, max(longest, request.cost.length)
            if grown_rows * grown_longest <= policy.max_batch_cost:
                chosen.append(request)
                rows, longest = grown_rows, grown_longest
        taken = {id(r) for r in chosen}
        self._pending = [r for r in self._pending if id(r) not in taken]
        return chosen

    def _run(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        live = []
        for request in batch:
            if request.deadline is not None and now > request.deadline:
                self.metrics.dropped.labels(self.name, "deadline").inc()
                if request.future.set_running_or_notify_cancel():
                    request.future.set_exception(DeadlinePassed(
                        f"deadline passed after {(now - request.enqueued) * 1000:.1f} ms in the {self.name} queue"))
            elif not request.future.set_running_or_notify_cancel():
                self.metrics.dropped.labels(self.name, "cancelled").inc()
            else:
                live.append(request)
        if not live:
            return
        for request in live:
            request.started = now
            self.metrics.queue_delay_ms.labels(self.name).observe((now - request.enqueued) * 1000)
        self.metrics.batch_size.labels(self.name).observe(len(live))
        self.metrics.batch_cost.labels(self.name).observe(padded_cost([r.cost for r in live]))
        with self._device_lock:
            self._run_live(live, now)

    def _run_live(self, live: list[_Request], now: float) -> None:
        began = time.perf_counter()
        try:
            results = self._run_batch([r.item for r in live])
            if len(results) != len(live):
                raise RuntimeError(f"{self.name} returned {len(results)} results for {len(live)} requests")
        except BaseException as err:  # the model failed: every request of the batch learns why
            log.exception("%s batch of %d failed", self.name, len(live))
            for request in live:
                request.future.set_exception(err)
            return
        finally:
            elapsed = time.perf_counter() - began
            for request in live:
                request.finished = request.started + elapsed
            self.metrics.busy_seconds.labels(self.name).inc(elapsed)
        for request, result in zip(live, results):
            request.future.set_result(result)
