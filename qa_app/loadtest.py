"""``qa-app loadtest``: many simulated players asking a running server, checking every answer's label.

Each player is an asyncio task with its own stream (``--mode chat``) or unary calls (``--mode ask``),
sending questions from a labelled query file in its own shuffled order, optionally paced (``--rate``
questions per second per player). The report has throughput, latency percentiles, errors by status
code, and the answers' quality against the labels, so load never silently degrades quality.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np

from qa_app.client import AsyncNpcClient
from qa_app.kb import LabelledQuery
from qa_app.proto import npc_qa_pb2 as pb


SHED_BACKOFF_S = 0.25  # mean pause of a simulated player after RESOURCE_EXHAUSTED


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    in_scope: int = 0
    answered_correctly: int = 0
    must_reject: int = 0
    false_accepts: int = 0

    def record(self, query: LabelledQuery, answer: pb.Answer, latency_ms: float) -> None:
        self.latencies_ms.append(latency_ms)
        if query.expected_id is None:
            self.must_reject += 1
            self.false_accepts += not answer.rejected
        else:
            self.in_scope += 1
            self.answered_correctly += (not answer.rejected) and answer.id == query.expected_id


async def _player(client: AsyncNpcClient, npc: str, queries: list[LabelledQuery], seed: int, until: float,
                  rate: float, mode: str, tally: Tally) -> None:
    order = queries[:]
    random.Random(seed).shuffle(order)
    interval = 1.0 / rate if rate > 0 else 0.0
    i = 0
    if mode == "chat":
        # One stream for the player's whole session: requests go in as answers come back.
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while True:
                item = await outbox.get()
                if item is None:
                    return
                yield item

        call = client.chat(requests(), timeout=max(1.0, until - time.perf_counter() + 30))
        try:
            while time.perf_counter() < until:
                query = order[i % len(order)]
                i += 1
                began = time.perf_counter()
                await outbox.put(pb.AskRequest(npc=npc, text=query.query, player_id=f"player-{seed}"))
                answer = await call.read()
                if answer is grpc.aio.EOF:
                    tally.errors["EOF"] += 1
                    return
                tally.record(query, answer, (time.perf_counter() - began) * 1000)
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - began)))
        except grpc.aio.AioRpcError as err:
            tally.errors[err.code().name] += 1
        finally:
            await outbox.put(None)
        return
    while time.perf_counter() < until:
        query = order[i % len(order)]
        i += 1
        began = time.perf_counter()
        try:
            answer = await client.ask(npc, query.query, player_id=f"player-{seed}")
            tally.record(query, answer, (time.perf_counter() - began) * 1000)
        except grpc.aio.AioRpcError as err:
            tally.errors[err.code().name] += 1
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # As the server asks: back off before retrying, as a real client would.
                await asyncio.sleep(SHED_BACKOFF_S * (0.5 + random.random()))
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - began)))


async def run_load(target: str, npc: str, queries: list[LabelledQuery], players: int, duration: float,
                   rate: float = 0.0, mode: str = "ask", token: str | None = None, tls_ca: str | None = None,
                   channels: int = 4) -> dict:
    if mode not in ("ask", "chat"):
        raise ValueError("mode must be 'ask' or 'chat'")
    # A few channels (HTTP/2 connections) shared by the players, as a game server's fleet would.
    clients = [AsyncNpcClient(target, token=token, tls_ca=tls_ca, timeout=30, retries=0)
               for _ in range(max(1, min(channels, players)))]
    tally = Tally()
    began = time.perf_counter()
    until = began + duration
    try:
        await asyncio.gather(*(_player(clients[p % len(clients)], npc, queries, p, until, rate, mode, tally)
                               for p in range(players)))
    finally:
        for c in clients:
            await c.close()
    elapsed = time.perf_counter() - began
    lat = np.array(tally.latencies_ms) if tally.latencies_ms else np.array([float("nan")])
    answered = len(tally.latencies_ms)
    return {
        "players": players, "duration_s": round(elapsed, 2), "mode": mode, "requests": answered + sum(tally.errors.values()),
        "answered": answered, "qps": answered / elapsed,
        "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
        "errors": dict(tally.errors),
        # Decisions right: accepted with the labelled entry, or refused when it must be.
        "accuracy": (tally.answered_correctly + tally.must_reject - tally.false_accepts) / answered if answered else 0.0,
        "answered_correctly": tally.answered_correctly / tally.in_scope if tally.in_scope else float("nan"),
        "false_accept_rate": tally.false_accepts / tally.must_reject if tally.must_reject else float("nan"),
    }
