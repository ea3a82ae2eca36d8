"""The real gRPC server on 127.0.0.1 (port 0) with the real engine, through the real client."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
import torchaudio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import ASSETS, running_server
from qa_app.client import AsyncNpcClient, NpcClient
from qa_app.config import Settings
from qa_app.proto import npc_qa_pb2 as pb
from qa_app.proto import npc_qa_pb2_grpc as pb_grpc
from qa_app.server.service import SERVICE_NAME, NpcServer


def test_health_reports_serving(server):
    with grpc.insecure_channel(server[0]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            status = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(server[0]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_ask_answers_with_timings_and_debug_candidates(client):
    answer = client.ask("innkeeper", "how much does a room cost for one night", debug=True, top_k=3)
    assert answer.id == "room_price_night" and not answer.rejected and answer.text
    assert 0 < answer.confidence <= 1 and answer.request_id
    assert {"embed_queue", "embed", "rank_queue", "rank", "total"} <= set(answer.timings_ms)
    assert len(answer.candidates) == 3 and answer.candidates[0].id == answer.id


def test_ask_refuses_what_the_kb_cannot_answer(client):
    answer = client.ask("quartermaster", "whats the capital of peru")
    assert answer.rejected and answer.id == "" and answer.text == ""


def test_chat_answers_each_message_in_order(client):
    texts = ["where can i buy a horse", "hello marta", "how much is a room for the night"]
    answers = list(client.chat(pb.AskRequest(npc="innkeeper", text=t) for t in texts))
    assert [a.normalized_query for a in answers] == ["where can i buy a horse", "hello marta",
                                                     "how much is a room for the night"]


def test_list_npcs(client):
    npcs = {n.name: n for n in client.list_npcs()}
    assert {"innkeeper", "quartermaster"} <= set(npcs)
    assert npcs["quartermaster"].entries == 220 and npcs["quartermaster"].questions >= 220


@pytest.mark.parametrize("npc, text, code, words", [
    ("innkeeper", "", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("innkeeper", "   \n", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("innkeeper", "x" * 2001, grpc.StatusCode.INVALID_ARGUMENT, "limit is 2000"),
    ("", "hello", grpc.StatusCode.INVALID_ARGUMENT, "npc is required"),
    ("dragon", "hello", grpc.StatusCode.NOT_FOUND, "known NPCs: innkeeper"),
])
def test_bad_requests_get_the_right_status(client, npc, text, code, words):
    with pytest.raises(grpc.RpcError) as err:
        client.ask(npc, text)
    assert err.value.code() == code and words in err.value.details()


def spoken(name: str = "innkeeper", rate: int = 22050) -> tuple[list[dict], list[np.ndarray]]:
    """Utterances of the bundled spoken eval set (manifest lines, audio at ``rate``)."""
    from qa_app.audio.io import read_audio_file
    from qa_app.train.speech_data import read_manifest

    lines = [line for line in read_manifest(ASSETS / "eval" / "spoken" / f"{name}.jsonl") if line["expected_id"]][:2]
    waves = [torchaudio.functional.resample(torch.from_numpy(read_audio_file(line["audio"])), 16000, rate).numpy()
             for line in lines]
    return lines, waves


def pcm16_chunks(samples: np.ndarray, rate: int, seconds: float = 0.1) -> list[bytes]:
    step = int(rate * seconds)
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    return [pcm[i:i + step].tobytes() for i in range(0, len(pcm), step)]


def test_talk_answers_each_utterance_of_a_stream_with_events_in_order(client):
    rate = 22050  # not 16 kHz: the server resamples
    _, waves = spoken(rate=rate)
    silence = np.zeros(rate, np.float32)
    stream = np.concatenate([silence[: rate // 2], waves[0], silence, waves[1], silence])
    events = list(client.talk("innkeeper", pcm16_chunks(stream, rate), rate, timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["speech_started", "speech_ended", "answer"] * 2
    starts = [e.speech_started.at_seconds for e in events if e.WhichOneof("event") == "speech_started"]
    assert 0.3 < starts[0] < 0.7 and starts[1] > 0.5 + len(waves[0]) / rate
    for answer in (e.answer for e in events if e.WhichOneof("event") == "answer"):
        assert answer.npc == "innkeeper" and answer.normalized_query and 0 <= answer.confidence <= 1
        assert answer.rejected == (answer.id == "") and "speech" in answer.timings_ms


def test_talk_on_silence_and_noise_floor_gives_no_events(client):
    rate = 16000
    hiss = np.random.default_rng(0).normal(0, 0.002, 3 * rate).astype(np.float32)
    assert list(client.talk("innkeeper", pcm16_chunks(hiss, rate), rate, timeout=30)) == []


def test_talk_accepts_float32_at_8khz(client):
    rate = 8000
    _, waves = spoken(rate=rate)
    stream = np.concatenate([np.zeros(rate // 2, np.float32), waves[0], np.zeros(rate, np.float32)])
    chunks = [stream[i:i + 800].astype("<f4").tobytes() for i in range(0, len(stream), 800)]
    events = list(client.talk("innkeeper", chunks, rate, encoding=pb.FLOAT32, timeout=60))
    assert [e.WhichOneof("event") for e in events] == ["speech_started", "speech_ended", "answer"]


@pytest.mark.parametrize("config, chunks, code, words", [
    (dict(npc="innkeeper", sample_rate=16000, encoding=pb.PCM16, channels=2), [], grpc.StatusCode.INVALID_ARGUMENT,
     "mono"),
    (dict(npc="innkeeper", sample_rate=4000, encoding=pb.PCM16), [], grpc.StatusCode.INVALID_ARGUMENT, "8000-48000"),
    (dict(npc="innkeeper", sample_rate=16000), [], grpc.StatusCode.INVALID_ARGUMENT, "PCM16 or FLOAT32"),
    (dict(npc="dragon", sample_rate=16000, encoding=pb.PCM16), [], grpc.StatusCode.NOT_FOUND, "known NPCs"),
    (dict(npc="", sample_rate=16000, encoding=pb.PCM16), [], grpc.StatusCode.INVALID_ARGUMENT, "npc is required"),
    (dict(npc="innkeeper", sample_rate=16000, encoding=pb.PCM16), [b"\x00" * 3201],
     grpc.StatusCode.INVALID_ARGUMENT, "truncated pcm16"),
    (dict(npc="innkeeper", sample_rate=16000, encoding=pb.FLOAT32),
     [np.array([0.1, np.nan] * 800, "<f4").tobytes()], grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
])
def test_talk_bad_streams_get_the_right_status_and_the_server_keeps_serving(client, config, chunks, code, words):
    stub = client.stub
    requests = [pb.TalkRequest(config=pb.TalkConfig(**config))] + [pb.TalkRequest(audio=c) for c in chunks]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Talk(iter(requests), timeout=30))
    assert err.value.code() == code and words in err.value.details()
    assert client.ask("innkeeper", "where can i buy a horse").id == "buy_horse"


def test_talk_must_start_with_its_config(client):
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Talk(iter([pb.TalkRequest(audio=b"\x00\x00" * 1600)]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "TalkConfig" in err.value.details()


def test_a_passed_deadline_is_reported(client):
    with pytest.raises(grpc.RpcError) as err:
        client.ask("innkeeper", "where can i buy a horse", timeout=0.0005)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_reload_adds_and_swaps_a_kb_and_keeps_the_old_one_when_the_new_is_broken(client, kb_dir):
    path = kb_dir / "smith.jsonl"
    path.write_text('{"id": "forge", "questions": ["where is the forge"], "answer": "Behind the mill.", "tags": []}\n')
    reply = client.reload("smith")
    assert reply.npc.name == "smith" and reply.npc.entries == 1 and reply.build_ms > 0
    assert client.ask("smith", "where's the forge at").id == "forge"
    path.write_text('{"id": "forge", "questions": []}\n')
    with pytest.raises(grpc.RpcError) as err:
        client.reload("smith")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "smith.jsonl:1" in err.value.details()
    assert client.ask("smith", "where's the forge at").id == "forge"
    with pytest.raises(grpc.RpcError) as err:
        client.reload("../etc/passwd")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bearer_token_is_required_when_configured(engine, kb_dir):
    settings = Settings(kb_dir=kb_dir, device="cpu", port=0, auth_token="s3cret")
    with running_server(engine, settings) as (target, _):
        with NpcClient(target, timeout=30) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.ask("innkeeper", "room price?")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with NpcClient(target, token="wrong", timeout=30) as wrong:
            with pytest.raises(grpc.RpcError) as err:
                wrong.list_npcs()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with NpcClient(target, token="s3cret", timeout=30) as player:
            assert player.ask("innkeeper", "room price?").id
        with grpc.insecure_channel(target) as channel:  # probes need no token
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_overload_is_shed_with_resource_exhausted_and_the_rest_answered(engine, kb_dir):
    settings = Settings(kb_dir=kb_dir, device="cpu", port=0, workers=1, max_queue=3)

    async def burst(target):
        async with AsyncNpcClient(target, timeout=60, retries=0) as c:
            return await asyncio.gather(*(c.ask("innkeeper", f"where can i buy a horse {i}") for i in range(24)),
                                        return_exceptions=True)

    with running_server(engine, settings) as (target, _):
        results = asyncio.run(burst(target))
        with NpcClient(target, timeout=30, retries=0) as calm:  # once the burst is over, it serves again
            assert calm.ask("innkeeper", "where can i buy a horse").id == "buy_horse"
    shed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    answered = [r for r in results if isinstance(r, pb.Answer)]
    assert shed and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in shed)
    assert len(answered) >= 3 and all(a.id == "buy_horse" for a in answered)


def test_tls_serves_only_clients_that_trust_its_certificate(engine, kb_dir, tmp_path):
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    settings = Settings(kb_dir=kb_dir, device="cpu", port=0, tls_cert=cert, tls_key=key)
    with running_server(engine, settings) as (target, _):
        with NpcClient(target, tls_ca=cert, timeout=30) as secure:
            assert secure.ask("innkeeper", "room price?").id
        with NpcClient(target, timeout=5, retries=0) as plaintext:
            with pytest.raises(grpc.RpcError) as err:
                plaintext.ask("innkeeper", "room price?")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_reload_during_traffic_fails_no_request(engine, kb_dir):
    settings = Settings(kb_dir=kb_dir, device="cpu", port=0, workers=2)

    async def traffic_and_reloads(target):
        async with AsyncNpcClient(target, timeout=60, retries=0) as c:
            asks = [c.ask("innkeeper", "where can i buy a horse") for _ in range(30)]
            reloads = [c.reload("innkeeper") for _ in range(2)]
            return await asyncio.gather(*asks, *reloads)

    with running_server(engine, settings) as (target, _):
        results = asyncio.run(traffic_and_reloads(target))
    assert all(a.id == "buy_horse" for a in results[:30])
    assert all(r.npc.name == "innkeeper" for r in results[30:])


@pytest.mark.parametrize("mode", ["ask", "chat"])
def test_loadtest_reports_throughput_latency_errors_and_label_accuracy(server, mode, tmp_path):
    from qa_app.kb import load_queries
    from qa_app.loadtest import run_load

    queries = load_queries(ASSETS / "eval" / "innkeeper.jsonl")
    report = asyncio.run(run_load(server[0], "innkeeper", queries, players=4, duration=2.0, mode=mode))
    assert report["errors"] == {} and report["answered"] == report["requests"] > 0
    assert report["p50_ms"] <= report["p90_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert 0.0 < report["accuracy"] <= 1.0 and report["qps"] > 0


def test_prometheus_metrics_count_requests_by_code_and_time_stages(engine, kb_dir):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    settings = Settings(kb_dir=kb_dir, device="cpu", port=0, metrics_port=0)
    with running_server(engine, settings) as (target, srv):
        with NpcClient(target, timeout=30) as c:
            c.ask("innkeeper", "room price?")
            with pytest.raises(grpc.RpcError):
                c.ask("dragon", "hello")
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("npcqa_requests_total", (("code", "OK"), ("method", "Ask")))] == 1.0, text
    assert samples[("npcqa_requests_total", (("code", "NOT_FOUND"), ("method", "Ask")))] == 1.0, text
    assert samples[("npcqa_stage_latency_ms_count", (("stage", "rank"),))] == 1.0, text
    assert samples[("npcqa_queue_depth", ())] == 0.0, text


def test_work_whose_deadline_passes_in_the_queue_is_dropped_not_run(engine, kb_dir):
    settings = Settings(kb_dir=kb_dir, device="cpu", port=0, workers=1, max_queue=64)

    async def scenario(target):
        async with AsyncNpcClient(target, timeout=60, retries=0) as c:
            busy = [asyncio.ensure_future(c.ask("innkeeper", "where can i buy a horse")) for _ in range(8)]
            await asyncio.sleep(0.05)  # the single worker is busy and the queue holds the rest
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.ask("innkeeper", "how much is a room", timeout=0.05)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return await asyncio.gather(*busy)

    with running_server(engine, settings) as (target, srv):
        answers = asyncio.run(scenario(target))
        counts = {(s.labels["method"], s.labels["code"]): s.value
                  for metric in srv.service.metrics.registry.collect() if metric.name == "npcqa_requests"
                  for s in metric.samples if s.name.endswith("_total")}
    assert all(a.id == "buy_horse" for a in answers)
    assert counts.get(("Ask", "OK")) == 8  # the expired question never reached the engine
    assert counts.get(("Ask", "CANCELLED"), 0) + counts.get(("Ask", "DEADLINE_EXCEEDED"), 0) == 1
