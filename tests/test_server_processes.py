"""``qa-app serve --processes 2``: two real server processes on one port (SO_REUSEPORT), each answering; a
SIGTERM to the parent drains both and exits cleanly."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ASSETS
from qa_app.client import NpcClient


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _answered(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("npcqa_requests_total{") and 'code="OK"' in line)


def test_processes_share_the_port_and_drain_on_sigterm(tmp_path):
    kb_dir = tmp_path / "kb"
    kb_dir.mkdir()
    shutil.copy(ASSETS / "kb" / "innkeeper.jsonl", kb_dir)
    port = _free_ports(1)[0]
    metrics = next(p for p in iter(lambda: _free_ports(1)[0], None) if _bindable(p + 1))  # process i: metrics + i
    server = subprocess.Popen(
        [sys.executable, "-m", "qa_app", "serve", "--processes", "2", "--port", str(port), "--metrics-port",
         str(metrics), "--kb-dir", str(kb_dir), "--device", "cpu"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(server.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        target = f"127.0.0.1:{port}"
        deadline = time.time() + 240
        while sum("serving NPCs" in line for line in log) < 2:  # each process logs it once it is SERVING
            assert server.poll() is None and time.time() < deadline, "".join(log)[-3000:]
            time.sleep(0.5)
        with grpc.insecure_channel(target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        for _ in range(24):  # each question on a new connection: the kernel picks a process per connection
            client = NpcClient(target, timeout=30)
            try:
                assert client.ask("innkeeper", "how much does a room cost for one night").id == "room_price_night"
            finally:
                client.channel.close()
        counts = [_answered(metrics), _answered(metrics + 1)]
        assert sum(counts) == 24 and min(counts) > 0, counts
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 0
        reader.join(timeout=10)
        assert sum("shutting down" in line for line in log) == 2  # each process drained
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_bad_process_counts_are_clear_errors():
    """No process, or several on a port each would choose for itself: refused before anything starts."""
    for args, message in ((["--processes", "0"], "--processes must be >= 1"),
                          (["--processes", "2", "--port", "0"], "needs a fixed --port")):
        result = subprocess.run([sys.executable, "-m", "qa_app", "serve", *args], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
