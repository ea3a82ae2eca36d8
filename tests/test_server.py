"""The real gRPC server on 127.0.0.1 (port 0) with the real engine, through the real client."""
from __future__ import annotations

import asyncio

import grpc
import pytest
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
    assert {"queue", "embed", "rank", "total"} <= set(answer.timings_ms)
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


def test_talk_is_unimplemented_with_a_clear_message(server):
    with grpc.insecure_channel(server[0]) as channel:
        stub = pb_grpc.NpcQAStub(channel)
        config = pb.TalkRequest(config=pb.TalkConfig(npc="innkeeper", sample_rate=16000, encoding=pb.PCM16,
                                                     channels=1))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Talk(iter([config]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "Ask or Chat" in err.value.details()


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
    settings = Settings(kb_dir=kb_dir, device="cpu", port=0, workers=1, max_queue=2)

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
