"""`qa-app serve` as a process: SIGTERM drains in-flight requests, loses none, and exits 0."""
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conftest import ROOT
from qa_app.client import NpcClient


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits_zero(tmp_path):
    log = tmp_path / "serve.log"
    env = {**os.environ, "QA_DEVICE": "cpu", "QA_WORKERS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "qa_app", "serve", "--port", "0"], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while "serving NPCs" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.5)
        port = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()).group(1)
        with NpcClient(f"127.0.0.1:{port}", timeout=60, retries=0) as client, ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(client.ask, "quartermaster", "how do i revive my teammate") for _ in range(12)]
            time.sleep(0.3)  # the requests are queued behind the single worker
            process.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert all(a.id == "qb_revive_teammate" for a in answers)
        assert process.wait(timeout=60) == 0
        with pytest.raises(grpc.RpcError):  # and it really stopped listening
            NpcClient(f"127.0.0.1:{port}", timeout=2, retries=0).ask("quartermaster", "hello")
    finally:
        if process.poll() is None:
            process.kill()
