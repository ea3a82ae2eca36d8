"""The engine's pipeline for a server: CPU stages on a thread pool, every model stage behind a batcher.

One request flows: read (validate, normalise, spell, entities, tokenise; CPU pool) -> embed batcher ->
recall and ranker tokenisation (CPU pool) -> rank batcher -> decide. Spoken questions start at the speech
batcher instead. Each model stage has one batcher shared by every request on the server, so concurrent
players' questions share a forward pass; the event loop only awaits futures and never runs a model.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import CollectorRegistry

from qa_app.audio.vad import FRAME, Endpointer, SpeechEvent, VoiceActivity
from qa_app.config import Settings
from qa_app.engine import Answer, Candidate, QAEngine, Reading, SpeechUnavailableError
from qa_app.runtime.batcher import Batcher, BatchMetrics, BatchPolicy, Cost

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000
# Batching defaults per device (Settings value 0), tuned with benchmarks/bench_serving.py (RESULTS.md).
DEFAULT_BATCH = {"cuda": (256, 65_536), "cpu": (64, 8_192)}  # (max batch size, max padded tokens)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class BatchedEngine:
    """Asks an engine from many concurrent callers, batching their model work dynamically."""

    def __init__(self, engine: QAEngine, settings: Settings | None = None,
                 registry: CollectorRegistry | None = None, voice_activity: VoiceActivity | None = None) -> None:
        self.engine = engine
        self.settings = settings = settings or engine.settings
        self.metrics = BatchMetrics(registry)
        # On a CPU the model stages share the cores: one runs at a time (two at once only thrash the caches).
        self.device_lock = threading.Lock() if engine.encoder.device.type == "cpu" else None
        # Few threads: the CPU stages are short Python steps that hold the GIL; more threads than this only
        # trade it back and forth (and delay the model threads, which need it to launch work).
        self.cpu = ThreadPoolExecutor(max_workers=settings.workers or min(4, os.cpu_count() or 2),
                                      thread_name_prefix="cpu-stage")
        delay = settings.max_queue_delay_ms / 1000
        size, tokens = DEFAULT_BATCH["cuda" if engine.encoder.device.type == "cuda" else "cpu"]
        size = settings.max_batch_size or size
        tokens = settings.max_batch_tokens or tokens
        text_policy = BatchPolicy(size, delay, tokens, settings.max_queue)
        # CUDA graphs for small batches are captured now, not under the first players.
        engine.encoder.warm_up()
        if engine.ranker:
            engine.ranker.warm_up()
        if engine.encoder.device.type == "cuda":
            import torch

            self._warm_up_speech()
            log.info("model stages ready: %.2f GiB of GPU memory allocated",
                     torch.cuda.memory_allocated(engine.encoder.device) / 2**30)
        self.embed = Batcher("embed", engine.encoder.encode_tokens, lambda ids: Cost(1, len(ids)),
                             text_policy, self.metrics, self.device_lock)
        self.rank = (Batcher("rank", engine.ranker.score_encoded_lists,
                             lambda pairs: Cost(len(pairs), max(len(p["input_ids"]) for p in pairs)),
                             text_policy, self.metrics, self.device_lock)
                     if engine.ranker else None)
        self.speech_policy = BatchPolicy(size, delay,
                                         int(settings.max_batch_audio_s * SAMPLE_RATE), settings.max_queue)
        self._speech: Batcher | None = None  # made on the first spoken question (the model loads then)
        # Voice activity of every Talk stream: each stream's next frame joins one VAD call across streams
        # (frames are tiny: four times the model stages' batch).
        frames = size * 4 if size > 1 else 1
        self.vad = (Batcher("vad", lambda items: list(voice_activity(np.stack([f for f, _ in items]),
                                                                     [s for _, s in items])),
                            lambda item: Cost(1, FRAME),
                            BatchPolicy(frames, delay, frames * FRAME,
                                        settings.max_queue * 4),
                            self.metrics)
                    if voice_activity is not None else None)

    def batchers(self) -> list[Batcher]:
        return [b for b in (self.embed, self.rank, self._speech, self.vad) if b is not None]

    def close(self) -> None:
        for batcher in self.batchers():
            batcher.close()
        self.cpu.shutdown(wait=False, cancel_futures=True)

    async def _cpu(self, work, *args):
        return await asyncio.get_running_loop().run_in_executor(self.cpu, work, *args)

    async def ask(self, npc: str, text: str, top_k: int | None = None, deadline: float | None = None) -> Answer:
        """One typed question. deadline: ``time.monotonic()`` after which model stages drop it unrun."""
        total = time.perf_counter()
        reading, tokens = await self._cpu(self._read, self.engine.read, npc, text, True)
        stage_ms: dict[str, float] = {}
        candidates = []
        if reading.spelled:
            vector = await self._stage(self.embed, tokens, deadline, stage_ms)
            candidates = await self._rank(reading, vector, deadline, stage_ms, spoken=False)
        return self._decide(reading, candidates, False, top_k, stage_ms, total)

    async def hear(self, endpointer: Endpointer, samples: np.ndarray) -> list[SpeechEvent]:
        """Push 16 kHz samples of one stream through its endpointer, the VAD batched across streams."""
        events: list[SpeechEvent] = []
        for frame in endpointer.frames(samples):
            events += endpointer.step(frame, float(await self.vad.run((frame, endpointer.state))))
        return events

    async def ask_speech(self, npc: str, samples: np.ndarray, top_k: int | None = None,
                         deadline: float | None = None) -> Answer:
        """One spoken question: float32 mono 16 kHz samples of one endpointed utterance."""
        total = time.perf_counter()
        self.engine.check_utterance(samples)
        speech = await self._speech_stage()
        stage_ms: dict[str, float] = {}
        vector, transcript = await self._stage(speech, samples, deadline, stage_ms)
        asr = self.engine.speech.transcriber is not None  # asr mode: the text path answers the transcript
        reading, tokens = await self._cpu(self._read, self.engine.read_transcript, npc, transcript, asr)
        candidates = []
        if asr and reading.spelled:
            vector = await self._stage(self.embed, tokens, deadline, stage_ms)
        if vector is not None:  # asr mode with nothing understood has no vector: refused
            candidates = await self._rank(reading, vector, deadline, stage_ms, spoken=True)
        return self._decide(reading, candidates, True, top_k, stage_ms, total)

    def _read(self, read, npc: str, text: str, tokenize: bool) -> tuple[Reading, list[int]]:
        """``read`` (typed text or a transcript), and the text encoder's tokens when it will embed it."""
        reading = read(npc, text)
        if not (tokenize and reading.spelled):
            return reading, []
        start = time.perf_counter()
        tokens = self.engine.encoder.tokenize([reading.spelled])[0]
        reading.timings_ms["tokenize"] = _ms(start)
        return reading, tokens

    async def _rank(self, reading: Reading, vector: np.ndarray, deadline: float | None,
                    stage_ms: dict[str, float], spoken: bool) -> list[Candidate]:
        shortlist, pairs = await self._cpu(self._shortlist, reading, vector, stage_ms)
        if self.rank is None or not pairs:
            logits = np.zeros(len(shortlist), dtype=np.float32)
        else:
            logits = await self._stage(self.rank, pairs, deadline, stage_ms)
        return self.engine.candidates(reading, shortlist, logits, spoken)

    def _shortlist(self, reading: Reading, vector: np.ndarray, stage_ms: dict[str, float]):
        start = time.perf_counter()
        shortlist = self.engine.shortlist(reading, vector)
        stage_ms["recall"] = _ms(start)
        pairs = []
        if self.engine.ranker is not None and shortlist:
            passages = self.engine.passages(reading, shortlist)
            pairs = self.engine.ranker.tokenize([reading.spelled] * len(passages), passages)
        return shortlist, pairs

    async def _stage(self, batcher: Batcher, item, deadline: float | None, stage_ms: dict[str, float]):
        """One model call through its batcher; records the request's wait and the batch's run time."""
        result, queue_ms, run_ms = await batcher.run_timed(item, deadline)
        stage_ms[f"{batcher.name}_queue"] = stage_ms.get(f"{batcher.name}_queue", 0.0) + queue_ms
        stage_ms[batcher.name] = stage_ms.get(batcher.name, 0.0) + run_ms
        return result

    def _warm_up_speech(self) -> None:
        """On a GPU, load the speech vectoriser and capture its CUDA graphs now: the first capture of a bucket
        tunes and records it (seconds each), which would otherwise land on the first players' voices."""
        if not self.settings.speech_encoder or self.settings.speech_mode != "vectoriser":
            return
        began = time.perf_counter()
        try:
            speech = self.engine.speech
        except (SpeechUnavailableError, OSError, ValueError) as err:  # text keeps serving; Talk reports it
            log.warning("speech path not loaded at start: %s", err)
            return
        speech.encoder.warm_up()
        log.info("speech encoder ready (CUDA graphs captured) in %.1f s", time.perf_counter() - began)

    async def _speech_stage(self) -> Batcher:
        if self._speech is None:
            speech = await self._cpu(lambda: self.engine.speech)  # loads the model on first use
            if self._speech is None:
                if speech.transcriber is not None:
                    run = lambda waves: [(None, speech.transcriber.transcribe(w)) for w in waves]  # noqa: E731
                else:
                    run = lambda waves: list(zip(*speech.encoder.encode(waves)))  # noqa: E731
                self._speech = Batcher("speech", run, lambda w: Cost(1, len(w)), self.speech_policy, self.metrics,
                                       self.device_lock)
        return self._speech

    def _decide(self, reading: Reading, candidates: list[Candidate], spoken: bool, top_k: int | None,
                stage_ms: dict[str, float], total: float) -> Answer:
        start = time.perf_counter()
        answer = self.engine.decide(reading, candidates, spoken, top_k, stage_ms)
        answer.timings_ms.update(reject=_ms(start), total=_ms(total))
        return answer
