"""The async gRPC servicer: validation, status codes, deadlines, load shedding, health, reflection, auth."""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from grpc_reflection.v1alpha import reflection

from qa_app.audio.io import AudioError, check_rate, decode_pcm, resample_to_16k
from qa_app.audio.vad import EndpointConfig, Endpointer, VoiceActivity
from qa_app.config import Settings
from qa_app.engine import Answer, QAEngine, QueryError, SpeechUnavailableError, UnknownNpcError
from qa_app.models.loading import ModelNotFoundError
from qa_app.kb import KnowledgeBaseError, load_kb
from qa_app.proto import npc_qa_pb2 as pb
from qa_app.proto import npc_qa_pb2_grpc as pb_grpc
from qa_app.runtime.batcher import DeadlinePassed, QueueFull
from qa_app.runtime.pipeline import BatchedEngine

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NpcQA"].full_name  # "npcqa.v1.NpcQA"


def answer_message(answer: Answer, request_id: str, debug: bool) -> pb.Answer:
    message = pb.Answer(
        id=answer.id or "", text=answer.answer or "", confidence=answer.confidence, rejected=answer.rejected,
        normalized_query=answer.normalized_query, npc=answer.npc, warnings=answer.warnings, request_id=request_id,
        entities=[pb.Entity(name=m.name, text=m.text, score=m.score, entry_ids=m.entry_ids)
                  for m in answer.entities])
    message.timings_ms.update(answer.timings_ms)
    if debug:
        message.candidates.extend(pb.Candidate(id=c.id, question=c.question, recall_score=c.recall_score,
                                               answer_score=c.answer_score, ranker_logit=c.ranker_logit,
                                               rank_score=c.rank_score) for c in answer.candidates)
    return message


class ServerMetrics:
    """Prometheus metrics of one server, in their own registry (several servers may share a process)."""

    STAGE_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500)

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("npcqa_requests", "Questions handled, by RPC method and status code",
                                ["method", "code"], registry=self.registry)
        self.stage_ms = Histogram("npcqa_stage_latency_ms", "Server-side time per pipeline stage (ms)",
                                  ["stage"], buckets=self.STAGE_BUCKETS_MS, registry=self.registry)
        self.queue_depth = Gauge("npcqa_queue_depth", "Requests in flight (admitted, not yet answered)",
                                 registry=self.registry)

    def serve_http(self, host: str, port: int) -> int:
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return httpd.server_port


class NpcQAService(pb_grpc.NpcQAServicer):
    """Answers typed and spoken questions through one batched engine; sheds load instead of queueing
    without bound."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: QAEngine | None = None      # set once loaded; until then calls get UNAVAILABLE
        self.pipeline: BatchedEngine | None = None
        # Decoding and resampling of every Talk stream's chunks: off the event loop (voice activity is batched
        # across streams by the pipeline).
        self._audio_executor = ThreadPoolExecutor(max_workers=settings.workers or None, thread_name_prefix="audio")
        self.voice_activity: VoiceActivity | None = None  # loaded with the engine
        self._in_flight = 0
        self.metrics = ServerMetrics()

    def attach(self, engine: QAEngine, voice_activity: VoiceActivity) -> None:
        """Serve this engine: its model stages get batchers whose metrics join the server's."""
        self.voice_activity = voice_activity
        self.pipeline = BatchedEngine(engine, self.settings, self.metrics.registry, voice_activity)
        self.engine = engine

    async def _abort(self, context, code: grpc.StatusCode, message: str, request_id: str, method: str):
        log.info("request=%s %s: %s", request_id, code.name, message)
        # Counted before the status goes out: a client that reads the metrics next must see it.
        self.metrics.requests.labels(method, code.name).inc()
        await context.abort(code, message)

    async def _answer(self, request: pb.AskRequest, context, method: str = "Ask") -> pb.Answer:
        """One question, counted in the metrics by its outcome."""
        try:
            return await self._answer_or_abort(request, context, method)
        except asyncio.CancelledError:
            self.metrics.requests.labels(method, "CANCELLED").inc()
            raise

    async def _answer_or_abort(self, request: pb.AskRequest, context, method: str) -> pb.Answer:
        request_id = uuid.uuid4().hex[:12]
        if self.engine is None:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, "the server is still loading its models",
                              request_id, method)
        if not request.npc:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "npc is required (see ListNpcs)",
                              request_id, method)
        if not request.text.strip():
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "text is empty: send the player's question",
                              request_id, method)
        if len(request.text) > self.settings.max_text_chars:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"text is {len(request.text)} characters; the limit is {self.settings.max_text_chars}",
                              request_id, method)
        if request.npc not in self.engine.npcs:
            await self._abort(context, grpc.StatusCode.NOT_FOUND,
                              f"unknown NPC {request.npc!r}; known NPCs: {', '.join(self.engine.npcs)}", request_id, method)
        answer = await self._run(context, request_id, method,
                                 lambda deadline: self.pipeline.ask(request.npc, request.text, request.top_k or None,
                                                                    deadline))
        log.info("request=%s npc=%s player=%s id=%s confidence=%.3f rejected=%s total_ms=%.1f", request_id,
                 request.npc, request.player_id, answer.id, answer.confidence, answer.rejected,
                 answer.timings_ms.get("total", 0.0))
        self.metrics.requests.labels(method, "OK").inc()
        for stage, ms in answer.timings_ms.items():
            self.metrics.stage_ms.labels(stage).observe(ms)
        return answer_message(answer, request_id, request.debug)

    async def _run(self, context, request_id: str, method: str,
                   work: Callable[[float | None], Awaitable[Answer]]) -> Answer:
        """One question through the batched pipeline: admission, deadline, errors as status codes.

        work(deadline) runs the pipeline; deadline is the client's, as ``time.monotonic()``."""
        if self._in_flight >= self.settings.max_queue:
            await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server busy ({self._in_flight} requests in flight); retry after a short back-off",
                              request_id, method)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        self._in_flight += 1
        self.metrics.queue_depth.set(self._in_flight)
        try:
            return await work(deadline)
        except (QueryError, AudioError) as err:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err), request_id, method)
        except UnknownNpcError as err:  # removed by a reload after the check above
            await self._abort(context, grpc.StatusCode.NOT_FOUND, str(err), request_id, method)
        except QueueFull as err:
            await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server busy: {err}; retry after a short back-off", request_id, method)
        except DeadlinePassed as err:  # the client has given up: its work was dropped before the model
            await self._abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(err), request_id, method)
        finally:
            self._in_flight -= 1
            self.metrics.queue_depth.set(self._in_flight)

    async def Ask(self, request, context):
        return await self._answer(request, context)

    async def Chat(self, request_iterator, context):
        async for request in request_iterator:
            yield await self._answer(request, context, "Chat")

    async def Talk(self, request_iterator, context):
        """Voice: TalkConfig first, then audio chunks; speech started / ended and answer events back."""
        request_id, method = uuid.uuid4().hex[:12], "Talk"
        try:
            async for event in self._talk(request_iterator, context, request_id):
                yield event
        except asyncio.CancelledError:
            self.metrics.requests.labels(method, "CANCELLED").inc()
            raise
        self.metrics.requests.labels(method, "OK").inc()

    async def _talk(self, request_iterator, context, request_id: str):
        method = "Talk"
        if self.engine is None:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, "the server is still loading its models",
                              request_id, method)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "config":
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              "the first Talk message must be a TalkConfig (npc, sample_rate, encoding)",
                              request_id, method)
        config = first.config
        encoding = {pb.PCM16: "pcm16", pb.FLOAT32: "f32"}.get(config.encoding)
        problem = None
        if not config.npc:
            problem = (grpc.StatusCode.INVALID_ARGUMENT, "npc is required (see ListNpcs)")
        elif config.npc not in self.engine.npcs:
            problem = (grpc.StatusCode.NOT_FOUND,
                       f"unknown NPC {config.npc!r}; known NPCs: {', '.join(self.engine.npcs)}")
        elif encoding is None:
            problem = (grpc.StatusCode.INVALID_ARGUMENT, "encoding must be PCM16 or FLOAT32")
        elif config.channels not in (0, 1):
            problem = (grpc.StatusCode.INVALID_ARGUMENT,
                       f"{config.channels}-channel audio is not supported; send mono (mix the channels down)")
        else:
            try:
                check_rate(config.sample_rate)
            except AudioError as err:
                problem = (grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if problem:
            await self._abort(context, *problem, request_id, method)
        try:
            await asyncio.get_running_loop().run_in_executor(self._audio_executor, lambda: self.engine.speech)
        except (SpeechUnavailableError, ModelNotFoundError) as err:
            await self._abort(context, grpc.StatusCode.UNIMPLEMENTED, f"this server has no speech model: {err}",
                              request_id, method)
        endpointer = Endpointer(self.voice_activity, EndpointConfig(max_utterance_s=self.settings.max_utterance_s))
        loop = asyncio.get_running_loop()

        def decode(chunk: bytes):
            return resample_to_16k(decode_pcm(chunk, encoding), config.sample_rate)

        async for message in request_iterator:
            if message.WhichOneof("message") != "audio":
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                  "only the first Talk message may be a TalkConfig; send audio chunks after it",
                                  request_id, method)
            try:
                samples = await loop.run_in_executor(self._audio_executor, decode, message.audio)
            except AudioError as err:
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err), request_id, method)
            try:
                events = await self.pipeline.hear(endpointer, samples)
            except QueueFull as err:
                await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"server busy: {err}; retry after a short back-off", request_id, method)
            for event in events:
                async for out in self._speech_events(event, config, context, request_id):
                    yield out
        for event in endpointer.flush():
            async for out in self._speech_events(event, config, context, request_id):
                yield out

    async def _speech_events(self, event, config, context, request_id: str):
        if event.kind == "started":
            yield pb.TalkEvent(speech_started=pb.SpeechStarted(at_seconds=event.time_s))
            return
        utterance = event.utterance
        duration = 0.0 if utterance is None else len(utterance.samples) / 16000
        yield pb.TalkEvent(speech_ended=pb.SpeechEnded(at_seconds=event.time_s, duration_seconds=duration))
        if utterance is None:  # a click or a cough: too short to be a question
            return
        answer = await self._run(context, request_id, "Talk",
                                 lambda deadline: self.pipeline.ask_speech(config.npc, utterance.samples,
                                                                           deadline=deadline))
        log.info("request=%s npc=%s player=%s heard=%r id=%s confidence=%.3f rejected=%s total_ms=%.1f",
                 request_id, config.npc, config.player_id, answer.query, answer.id, answer.confidence,
                 answer.rejected, answer.timings_ms.get("total", 0.0))
        for stage, ms in answer.timings_ms.items():
            self.metrics.stage_ms.labels(stage).observe(ms)
        yield pb.TalkEvent(answer=answer_message(answer, request_id, False))

    async def ListNpcs(self, request, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its models")
        return pb.ListNpcsResponse(npcs=[self._npc_info(npc) for npc in self.engine.npcs])

    def _npc_info(self, npc: str) -> pb.NpcInfo:
        index = self.engine._index(npc)
        return pb.NpcInfo(name=npc, entries=len(index.kb), questions=len(index.questions))

    async def ReloadKnowledgeBase(self, request, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its models")
        if not request.npc or "/" in request.npc or "\\" in request.npc or request.npc.startswith("."):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "npc must be a knowledge-base file stem")
        path = self.settings.kb_dir / f"{request.npc}.jsonl"
        if not path.is_file():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no knowledge base {path.name} in the server's KB folder")
        began = time.perf_counter()
        try:
            kb = load_kb(path)
        except KnowledgeBaseError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"knowledge base rejected, old one kept: {err}")
        # Indexing runs on a worker thread; the swap itself is atomic, so in-flight asks finish on the old index.
        await asyncio.get_running_loop().run_in_executor(self.pipeline.cpu, self.engine.reload, kb)
        log.info("reloaded NPC %s from %s (%d entries)", kb.npc, path, len(kb))
        return pb.ReloadResponse(npc=self._npc_info(kb.npc), build_ms=(time.perf_counter() - began) * 1000)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health checks must carry ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") == self._expected:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata "
                            "'authorization: Bearer <token>')")

    async def refuse_stream(request_or_iterator, context):
        await refuse(request_or_iterator, context)
        yield  # pragma: no cover - abort raises first

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                 handler.response_serializer)


class NpcServer:
    """The gRPC server around one engine: bind, load, serve, drain."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        interceptors = [BearerTokenInterceptor(settings.auth_token)] if settings.auth_token else []
        options = [("grpc.max_receive_message_length", settings.max_message_bytes),
                   ("grpc.max_send_message_length", settings.max_message_bytes),
                   ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
                   ("grpc.so_reuseport", 1)]  # several server processes may share the port (serve_processes)
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        self.service = NpcQAService(settings)
        pb_grpc.add_NpcQAServicer_to_server(self.service, self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{settings.host}:{settings.port}"
        if settings.tls_cert or settings.tls_key:
            if not (settings.tls_cert and settings.tls_key):
                raise ValueError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
            credentials = grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self.metrics_port = (self.service.metrics.serve_http(settings.host, settings.metrics_port)
                             if settings.metrics_port is not None else None)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def start(self, engine: QAEngine | None = None) -> None:
        """Bind and answer health checks (NOT_SERVING) at once; load the engine; then SERVING."""
        await self._set_serving(False)
        await self.server.start()
        log.info("listening on %s:%d (%s)", self.settings.host, self.port,
                 "TLS" if self.settings.tls_cert else "plaintext")
        loop = asyncio.get_running_loop()
        if engine is None:
            engine = await loop.run_in_executor(None, lambda: QAEngine(settings=self.settings))
        voice_activity = await loop.run_in_executor(None, VoiceActivity)
        self.service.attach(engine, voice_activity)
        await self._set_serving(True)
        log.info("serving NPCs: %s", ", ".join(engine.npcs))

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period."""
        await self._set_serving(False)
        await self.server.stop(self.settings.shutdown_grace_s if grace is None else grace)
        if self.service.pipeline is not None:
            self.service.pipeline.close()
        self.service._audio_executor.shutdown(wait=False, cancel_futures=True)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    import signal

    server = NpcServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.info("shutting down: draining in-flight requests (grace %.0f s)", settings.shutdown_grace_s)
    await server.stop()


def _serve_process(settings: Settings) -> None:
    """One of ``serve_processes``' servers (a spawned interpreter: logging as ``qa-app serve`` sets it up)."""
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qa_app").setLevel(logging.INFO)
    asyncio.run(serve(settings))


def serve_processes(settings: Settings, processes: int) -> int:
    """Run ``processes`` servers on one port until SIGTERM or SIGINT; returns an exit status.

    Each is a whole server (engine, batchers, GPU context) in its own process, and the kernel spreads new
    connections over them (SO_REUSEPORT): one Python process serialises its gRPC handling, CPU stages and GPU
    launches on one GIL, which kept the GPU idle under many players (benchmarks/RESULTS.md, issue 5); N processes
    use N cores, each batching its own players. Process i serves metrics on ``metrics_port + i``. A signal is
    passed on to every process (each drains); if one exits on its own, the others are stopped too.
    """
    import multiprocessing
    import signal
    from dataclasses import replace
    from multiprocessing.connection import wait

    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if settings.port == 0 and processes > 1:
        raise ValueError("--processes > 1 needs a fixed --port: with 0 each process would pick its own")
    spawn = multiprocessing.get_context("spawn")  # CUDA cannot be initialised in forked children
    children = [spawn.Process(target=_serve_process, name=f"qa-app-serve-{i}", args=(replace(
        settings, metrics_port=None if settings.metrics_port is None else settings.metrics_port + i),))
        for i in range(processes)]
    for child in children:
        child.start()

    def pass_on(sig, frame):
        for child in children:
            if child.is_alive():
                os.kill(child.pid, sig)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        wait([child.sentinel for child in children])  # the first to exit (a signal: all of them, drained)
        if any(child.exitcode not in (None, 0) for child in children):
            log.error("a server process exited with %s: stopping the others",
                      [child.exitcode for child in children])
        pass_on(signal.SIGTERM, None)
        for child in children:
            child.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max(abs(child.exitcode or 0) for child in children)
