"""``qa-app loadtest``: many simulated players asking a running server, checking every answer's label.

Each player is an asyncio task with its own stream (``--mode chat``) or unary calls (``--mode ask``),
sending questions from a labelled query file in its own shuffled order, optionally paced (``--rate``
questions per second per player). In ``--mode talk`` each player is a voice stream: labelled spoken
questions from a manifest, sent in real time in 100 ms chunks with 0.6-1.5 s of silence between them, so
the server's endpointer decides where each ends; latency is from the ``speech_ended`` event to the answer.
The report has throughput, latency percentiles, errors by status code, and the answers' quality against
the labels, so load never silently degrades quality.
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
CHUNK_S = 0.1          # a voice player's audio per message
SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class SpokenQuestion:
    pcm16: bytes                # mono 16 kHz little-endian PCM16
    expected_id: str | None
    kind: str = ""

    @property
    def seconds(self) -> float:
        return len(self.pcm16) / 2 / SAMPLE_RATE


def load_spoken_questions(manifest: str, min_s: float = 2.0, max_s: float = 4.0) -> list[SpokenQuestion]:
    """Labelled utterances of a spoken manifest ({audio, expected_id}) between min_s and max_s long."""
    from qa_app.audio.io import read_audio_file
    from qa_app.train.speech_data import read_manifest

    spoken = []
    for line in read_manifest(manifest):
        samples = read_audio_file(line["audio"])
        if min_s <= len(samples) / SAMPLE_RATE <= max_s:
            pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
            spoken.append(SpokenQuestion(pcm, line.get("expected_id"), line.get("kind", "")))
    if not spoken:
        raise ValueError(f"{manifest}: no utterance between {min_s:g} and {max_s:g} s")
    return spoken


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    in_scope: int = 0
    answered_correctly: int = 0
    must_reject: int = 0
    false_accepts: int = 0
    decisions: dict = field(default_factory=dict)  # query -> {answer id, "" when refused}: answers must not vary

    def record(self, query: "LabelledQuery | SpokenQuestion", answer: pb.Answer, latency_ms: float) -> None:
        self.latencies_ms.append(latency_ms)
        self.decisions.setdefault(query, set()).add("" if answer.rejected else answer.id)
        if query.expected_id is None:
            self.must_reject += 1
            self.false_accepts += not answer.rejected
        else:
            self.in_scope += 1
            self.answered_correctly += (not answer.rejected) and answer.id == query.expected_id


def _decision_right(query, answer_id: str) -> bool:
    return answer_id == "" if query.expected_id is None else answer_id == query.expected_id


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


async def _speaker(client: AsyncNpcClient, npc: str, questions: list[SpokenQuestion], seed: int, until: float,
                   tally: Tally) -> None:
    """One voice stream in real time: utterance, silence, utterance, ... until the time is up."""
    rng = random.Random(seed)
    chunk_bytes = int(CHUNK_S * SAMPLE_RATE) * 2
    spoken: list[tuple[float, float, SpokenQuestion]] = []  # (start s, end s in the stream, question)

    async def audio():
        yield pb.TalkRequest(config=pb.TalkConfig(npc=npc, player_id=f"speaker-{seed}", sample_rate=SAMPLE_RATE,
                                                  encoding=pb.PCM16, channels=1))
        await asyncio.sleep(rng.uniform(0, 1.0))  # players do not all start speaking together
        began, sent = time.perf_counter(), 0  # sent: bytes so far; the stream runs at real time
        while time.perf_counter() < until:
            question = rng.choice(questions)
            pause = bytes(2 * int(rng.uniform(0.6, 1.5) * SAMPLE_RATE))
            spoken.append((sent / 2 / SAMPLE_RATE, (sent + len(question.pcm16)) / 2 / SAMPLE_RATE, question))
            for data in (question.pcm16, pause):
                for start in range(0, len(data), chunk_bytes):
                    yield pb.TalkRequest(audio=data[start:start + chunk_bytes])
                    sent += len(data[start:start + chunk_bytes])
                    await asyncio.sleep(max(0.0, began + sent / 2 / SAMPLE_RATE - time.perf_counter()))

    call = client.stub.Talk(audio(), timeout=max(1.0, until - time.perf_counter() + 30), metadata=client.metadata)
    ended_at, answered = 0.0, set()
    try:
        async for event in call:
            kind = event.WhichOneof("event")
            if kind == "speech_ended":
                ended_at, ended_s = time.perf_counter(), event.speech_ended.at_seconds
            elif kind == "answer":
                # The utterance that was being spoken when this speech ended: the last to start before it.
                owners = [i for i, (start, _, _) in enumerate(spoken) if start <= ended_s]
                if not owners or owners[-1] in answered:
                    tally.errors["extra_answer"] += 1  # the endpointer split an utterance in two
                    continue
                answered.add(owners[-1])
                tally.record(spoken[owners[-1]][2], event.answer, (time.perf_counter() - ended_at) * 1000)
    except grpc.aio.AioRpcError as err:
        tally.errors[err.code().name] += 1
    # Utterances finished well before the end that got no answer: the endpointer missed them.
    tally.errors["unanswered"] += sum(1 for i, (_, end, _) in enumerate(spoken) if i not in answered
                                      and end < spoken[-1][0]) if spoken else 0


async def run_load(target: str, npc: str, queries: list, players: int, duration: float,
                   rate: float = 0.0, mode: str = "ask", token: str | None = None, tls_ca: str | None = None,
                   channels: int = 4, keep_latencies: bool = False) -> dict:
    """queries: LabelledQuery for ask/chat, SpokenQuestion for talk."""
    if mode not in ("ask", "chat", "talk"):
        raise ValueError("mode must be 'ask', 'chat' or 'talk'")
    # A few channels (HTTP/2 connections) shared by the players, as a game server's fleet would.
    clients = [AsyncNpcClient(target, token=token, tls_ca=tls_ca, timeout=30, retries=0)
               for _ in range(max(1, min(channels, players)))]
    tally = Tally()
    began = time.perf_counter()
    until = began + duration
    try:
        if mode == "talk":
            await asyncio.gather(*(_speaker(clients[p % len(clients)], npc, queries, p, until, tally)
                                   for p in range(players)))
        else:
            await asyncio.gather(*(_player(clients[p % len(clients)], npc, queries, p, until, rate, mode, tally)
                                   for p in range(players)))
    finally:
        for c in clients:
            await c.close()
    elapsed = time.perf_counter() - began
    lat = np.array(tally.latencies_ms) if tally.latencies_ms else np.array([float("nan")])
    answered = len(tally.latencies_ms)
    tally.errors = Counter({k: v for k, v in tally.errors.items() if v})
    report = {
        "players": players, "duration_s": round(elapsed, 2), "mode": mode, "requests": answered + sum(tally.errors.values()),
        "answered": answered, "qps": answered / elapsed,
        "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
        "errors": dict(tally.errors),
        # Decisions right: accepted with the labelled entry, or refused when it must be.
        "accuracy": (tally.answered_correctly + tally.must_reject - tally.false_accepts) / answered if answered else 0.0,
        "answered_correctly": tally.answered_correctly / tally.in_scope if tally.in_scope else float("nan"),
        "false_accept_rate": tally.false_accepts / tally.must_reject if tally.must_reject else float("nan"),
        "correct": tally.answered_correctly + tally.must_reject - tally.false_accepts,
        # Each distinct question once, as ``qa-app eval`` counts (comparable once every question was asked),
        # and the questions whose answer changed from one asking to the next (batching must not do that).
        "distinct_queries": len(tally.decisions),
        "per_query_accuracy": (float(np.mean([_decision_right(q, min(d)) for q, d in tally.decisions.items()]))
                               if tally.decisions else float("nan")),
        "inconsistent_queries": sum(len(d) > 1 for d in tally.decisions.values()),
    }
    if keep_latencies:
        report["latencies_ms"] = tally.latencies_ms
    return report
