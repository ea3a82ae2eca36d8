"""Serving benchmark: the real gRPC server under the ``qa-app loadtest`` generator, batching off vs on.

For each batching setting a fresh ``qa-app serve`` process is started on this host; load generator
processes (each an asyncio loop of simulated players) drive it with typed questions (closed loop: every
player asks again as soon as answered) and with real-time voice streams. Per run it prints QPS, latency
percentiles, accuracy against the labels (and against ``qa-app eval`` run on the same device), mean batch
size and busy fraction per model stage, and where a request's time goes, from the server's own metrics.

    python benchmarks/bench_serving.py --device cuda --players 1,16,64,256,1024 --voice-players 16,64,256
    python benchmarks/bench_serving.py --device cpu --players 64 --voice-players 0
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT_STAGES = ("normalize", "spelling", "entities", "tokenize", "embed_queue", "embed", "recall", "rank_queue",
               "rank", "reject", "total")
VOICE_STAGES = ("speech_queue", "speech", "transcript", "spelling", "entities", "recall", "rank_queue", "rank",
                "reject", "total")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n consecutive free ports (``qa-app serve --processes n`` serves metrics on port + i)."""
    while True:
        first = free_port()
        try:
            for port in range(first + 1, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return list(range(first, first + n))
        except OSError:
            continue


def scrape(ports: list[int]) -> dict[tuple[str, tuple], float]:
    """Every sample of the servers' metrics, summed over the server processes."""
    from prometheus_client.parser import text_string_to_metric_families

    total: dict[tuple[str, tuple], float] = defaultdict(float)
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                total[(sample.name, tuple(sorted(sample.labels.items())))] += sample.value
    return dict(total)


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _loadgen(args: tuple) -> dict:
    target, npc, queries_path, mode, players, duration, seed = args
    from qa_app.kb import load_queries
    from qa_app.loadtest import load_spoken_questions, run_load

    queries = load_spoken_questions(queries_path) if mode == "talk" else load_queries(queries_path)
    return asyncio.run(run_load(target, npc, queries, players, duration, mode=mode, channels=4,
                                keep_latencies=True))


def run_load_procs(pool, target: str, npc: str, queries: Path, mode: str, players: int, duration: float,
                   procs: int) -> dict:
    """Players spread over load-generator processes (one Python process cannot drive thousands)."""
    procs = max(1, min(procs, players))
    shares = [players // procs + (i < players % procs) for i in range(procs)]
    reports = pool.map(_loadgen, [(target, npc, str(queries), mode, n, duration, i) for i, n in enumerate(shares)])
    latencies = np.array([x for r in reports for x in r["latencies_ms"]] or [np.nan])
    errors: dict[str, int] = defaultdict(int)
    for r in reports:
        for k, v in r["errors"].items():
            errors[k] += v
    answered = sum(r["answered"] for r in reports)
    elapsed = max(r["duration_s"] for r in reports)
    return {"players": players, "answered": answered, "qps": answered / elapsed, "errors": dict(errors),
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "mean_ms": float(np.mean(latencies)),
            "accuracy": sum(r["correct"] for r in reports) / answered if answered else float("nan"),
            "per_query_accuracy": float(np.mean([r["per_query_accuracy"] for r in reports])),
            "inconsistent_queries": sum(r["inconsistent_queries"] for r in reports)}


class Server:
    """``qa-app serve`` in its own process, with Prometheus metrics."""

    def __init__(self, device: str, batch_size: int, extra: list[str], log: Path, processes: int = 1) -> None:
        self.port, self.metrics_ports = free_port(), free_ports(processes)
        command = [sys.executable, "-m", "qa_app", "serve", "--port", str(self.port), "--device", device,
                   "--metrics-port", str(self.metrics_ports[0]), "--max-batch-size", str(batch_size),
                   "--processes", str(processes), *extra]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.log = log.open("w")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.target = f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 300) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.time() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.time() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log.name}")
                try:
                    # one process answering is not all of them: each logs "serving NPCs" once it is SERVING
                    if (stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1
                            and Path(self.log.name).read_text().count("serving NPCs") >= len(self.metrics_ports)):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise TimeoutError("server did not become SERVING")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def server_breakdown(after: dict, before: dict, stages: tuple[str, ...], elapsed: float) -> dict:
    out = {"stage_mean_ms": {}, "batch_mean": {}, "busy": {}, "batch_queue_ms": {}}
    for stage in stages:
        count = delta(after, before, "npcqa_stage_latency_ms_count", stage=stage)
        if count:
            out["stage_mean_ms"][stage] = delta(after, before, "npcqa_stage_latency_ms_sum", stage=stage) / count
    for stage in ("embed", "rank", "speech", "vad"):
        batches = delta(after, before, "npcqa_batch_size_count", stage=stage)
        if batches:
            out["batch_mean"][stage] = delta(after, before, "npcqa_batch_size_sum", stage=stage) / batches
            out["busy"][stage] = delta(after, before, "npcqa_stage_busy_seconds_total", stage=stage) / elapsed
            waits = delta(after, before, "npcqa_batch_queue_delay_ms_count", stage=stage)
            out["batch_queue_ms"][stage] = delta(after, before, "npcqa_batch_queue_delay_ms_sum", stage=stage) / waits
    return out


def eval_accuracy(device: str, kb: Path, queries: Path) -> dict:
    """``qa-app eval`` on the same device: the accuracy that load must not change."""
    out = subprocess.run([sys.executable, "-m", "qa_app", "eval", "--kb", str(kb), "--queries", str(queries),
                          "--device", device, "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--players", default="1,16,64,256,1024", help="typed players per run (comma list)")
    parser.add_argument("--voice-players", default="16,64,256", help="voice streams per run (0: none)")
    parser.add_argument("--batch-sizes", default="1,64", help="--max-batch-size settings to compare (1: off)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per typed run")
    parser.add_argument("--voice-duration", type=float, default=20.0, help="seconds per voice run")
    parser.add_argument("--loadgen-procs", type=int, default=max(1, (os.cpu_count() or 2) // 4))
    parser.add_argument("--npc", default="quartermaster")
    parser.add_argument("--processes", type=int, default=1,
                        help="qa-app serve --processes (metrics summed over them; busy fractions can exceed 1)")
    parser.add_argument("--server-args", default="", help="extra qa-app serve flags, e.g. '--max-queue-delay-ms 1'")
    parser.add_argument("--out", type=Path, help="write all results as JSON here")
    args = parser.parse_args()

    import grpc
    import torch
    import transformers

    kb = ROOT / "assets" / "kb" / f"{args.npc}.jsonl"
    queries = ROOT / "assets" / "eval" / f"{args.npc}.jsonl"
    spoken = ROOT / "assets" / "eval" / "spoken" / "innkeeper.jsonl"
    players = [int(p) for p in args.players.split(",") if int(p) > 0]
    voice_players = [int(p) for p in args.voice_players.split(",") if int(p) > 0]
    print(f"date {datetime.date.today()}  device {describe_device(args.device)}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}  grpcio {grpc.__version__}  python {platform.python_version()}")
    print(f"typed: {args.npc} ({queries.name}), closed loop, {args.duration:g} s per run; voice: {spoken.name} "
          f"utterances of 2-4 s in real time, 100 ms chunks, 0.6-1.5 s pauses, {args.voice_duration:g} s per run; "
          f"{args.loadgen_procs} load-generator processes on the same host")
    reference = eval_accuracy(args.device, kb, queries)
    print(f"qa-app eval on this device: accuracy {reference['accuracy']:.4f}  answered_correctly "
          f"{reference['answered_correctly']:.4f}  false_accept_rate {reference['false_accept_rate']:.4f}")
    results = {"device": describe_device(args.device), "torch": torch.__version__, "eval": reference, "runs": []}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.loadgen_procs) as pool:
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serving_server_b{batch_size}.log"
            server = Server(args.device, batch_size, args.server_args.split(), log, args.processes)
            try:
                server.wait_serving()
                run_load_procs(pool, server.target, args.npc, queries, "ask", 8, 3.0, args.loadgen_procs)  # warm-up
                plan = [("text", "ask", n, args.duration, queries, TEXT_STAGES) for n in players]
                plan += [("voice", "talk", n, args.voice_duration, spoken, VOICE_STAGES) for n in voice_players]
                for kind, mode, n, duration, source, stages in plan:
                    npc = args.npc if kind == "text" else "innkeeper"
                    before, began = scrape(server.metrics_ports), time.perf_counter()
                    load = run_load_procs(pool, server.target, npc, source, mode, n, duration, args.loadgen_procs)
                    elapsed = time.perf_counter() - began
                    load.update(kind=kind, batch_size=batch_size,
                                **server_breakdown(scrape(server.metrics_ports), before, stages, elapsed))
                    results["runs"].append(load)
                    print(json.dumps(load), flush=True)
            finally:
                server.stop()
    print_tables(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def print_tables(results: dict) -> None:
    runs = results["runs"]
    for kind in ("text", "voice"):
        chosen = [r for r in runs if r["kind"] == kind]
        if not chosen:
            continue
        print(f"\n{kind}: {results['device']}  (latency: {'client round trip' if kind == 'text' else 'speech_ended event to answer'})")
        print("players batch      QPS  vs off   p50 ms   p99 ms  accuracy  per-q acc  varied  errors  "
              "mean batch (embed/rank/speech/vad)  busy (embed/rank/speech)")
        off = {r["players"]: r["qps"] for r in chosen if r["batch_size"] == 1}
        for r in sorted(chosen, key=lambda r: (r["players"], r["batch_size"])):
            ratio = r["qps"] / off[r["players"]] if off.get(r["players"]) else float("nan")
            batches = "/".join(f"{r['batch_mean'].get(s, 0):.1f}" for s in ("embed", "rank", "speech", "vad"))
            busy = "/".join(f"{r['busy'].get(s, 0):.2f}" for s in ("embed", "rank", "speech"))
            errors = sum(r["errors"].values())
            print(f"{r['players']:7d} {r['batch_size']:5d} {r['qps']:8.1f} {ratio:6.2f}x {r['p50_ms']:8.1f} "
                  f"{r['p99_ms']:8.1f}  {r['accuracy']:8.3f}  {r['per_query_accuracy']:8.3f}  "
                  f"{r['inconsistent_queries']:6d}  {errors:6d}  {batches:>34}  {busy}")
        print("where the time goes (server means, ms; client mean minus server total = gRPC, event loop, network):")
        for r in sorted(chosen, key=lambda r: (r["players"], r["batch_size"])):
            stages = "  ".join(f"{k} {v:.2f}" for k, v in r["stage_mean_ms"].items())
            grpc_ms = r["mean_ms"] - r["stage_mean_ms"].get("total", 0.0)
            print(f"  {r['players']:5d} players, batch {r['batch_size']:3d}: {stages}  | grpc+loop {grpc_ms:.2f}")


if __name__ == "__main__":
    sys.exit(main())
