"""The qa-app command line, run as a player or a designer would run it."""
import json
import subprocess
import sys

import pytest

from conftest import ASSETS, ROOT

KB = ASSETS / "kb" / "innkeeper.jsonl"


def qa_app(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qa_app", *args], capture_output=True, text=True, input=stdin,
                          cwd=ROOT, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                      "QA_DEVICE": "cpu"})


def test_ask_json_prints_one_answer():
    result = qa_app("ask", "--kb", str(KB), "--json", "how much does a room cost for one night")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["id"] == "room_price_night" and answer["rejected"] is False
    assert set(answer["timings_ms"]) >= {"embed", "rank", "total"}


def test_malformed_kb_is_reported_with_file_and_line(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"id": "a", "questions": ["q"], "answer": "x", "tags": []}\n{"id": "b", "questions": []}\n')
    result = qa_app("ask", "--kb", str(bad), "hello")
    assert result.returncode == 2
    assert "broken.jsonl:2:" in result.stderr


def test_unknown_npc_is_an_error_listing_the_known_ones():
    result = qa_app("ask", "--npc", "dragon", "hello")
    assert result.returncode == 2 and "quartermaster" in result.stderr


def test_chat_answers_then_leaves_cleanly_on_end_of_input():
    result = qa_app("chat", "--kb", str(KB), stdin="where can i buy a horse\n\nasdfgh\n")
    assert result.returncode == 0, result.stderr
    assert "confidence" in result.stdout and "timing ms" in result.stdout
    assert "I don't know that one" in result.stdout


@pytest.mark.slow
def test_eval_json_has_every_metric_and_the_baseline(tmp_path):
    queries = tmp_path / "q.jsonl"
    lines = (ASSETS / "eval" / "innkeeper.jsonl").read_text().splitlines()
    queries.write_text("\n".join(lines[:40] + lines[-20:]) + "\n")
    result = qa_app("eval", "--kb", str(KB), "--queries", str(queries), "--json", "--baseline")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    for key in ("in_scope_top1", "answered_correctly", "false_accept_rate", "false_reject_rate", "auroc",
                "per_kind_accuracy", "latency_p50_ms", "latency_p99_ms"):
        assert key in metrics and key in metrics["baseline"] or key.startswith("latency")


@pytest.mark.slow
def test_spoken_eval_json_has_the_text_keys_and_the_whisper_baseline_beside_them(tmp_path):
    pytest.importorskip("faster_whisper", reason="the whisper baseline needs the asr extra")
    lines = (ASSETS / "eval" / "spoken" / "innkeeper.jsonl").read_text().splitlines()
    manifest = tmp_path / "spoken.jsonl"
    audio = ASSETS / "eval" / "spoken"
    manifest.write_text("\n".join(
        json.dumps({**json.loads(line), "audio": str(audio / json.loads(line)["audio"])}) for line in lines[:16]) + "\n")
    result = qa_app("eval", "--kb", str(KB), "--speech-manifest", str(manifest), "--speech-baseline", "asr", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    asr = metrics["asr_baseline"]
    for key in ("in_scope_top1", "answered_correctly", "false_accept_rate", "false_reject_rate", "auroc"):
        assert 0 <= metrics[key] <= 1 and key in asr["text_path"] and key in asr["bi_encoder"]
    assert metrics["queries"] == 16 and 0 <= asr["wer"] < 0.5 and -1 <= metrics["text_cosine"]["median"] <= 1
