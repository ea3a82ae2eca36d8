"""run_demo.py end to end: real audio plumbing (a PulseAudio null sink recorded by sounddevice), and a
file streamed through a real gRPC server's Talk."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from conftest import ASSETS, ROOT

DEMO = [sys.executable, str(ROOT / "run_demo.py")]


def question_wav(path, index: int = 0) -> dict:
    """A bundled spoken question with silence around it, as a 16 kHz WAV; returns its manifest line."""
    from qa_app.audio.io import read_audio_file
    from qa_app.train.speech_data import read_manifest

    line = [x for x in read_manifest(ASSETS / "eval" / "spoken" / "innkeeper.jsonl") if x["expected_id"]][index]
    silence = np.zeros(8000, np.float32)
    sf.write(path, np.concatenate([silence, read_audio_file(line["audio"]), silence, silence]), 16000)
    return line


@pytest.fixture()
def pulse_sink(tmp_path):
    """A PulseAudio daemon of our own with a null sink "npc_sink"; its monitor is the default source."""
    missing = [tool for tool in ("pulseaudio", "pactl", "paplay") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs PulseAudio ({', '.join(missing)} missing): apt install pulseaudio pulseaudio-utils "
                    "libasound2-plugins libportaudio2")
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    daemon = subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--log-target=stderr",
         "--load=module-null-sink sink_name=npc_sink rate=16000", "--load=module-native-protocol-unix"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"PulseAudio did not start: {daemon.stderr.read1().decode(errors='replace')[-500:]}")
        subprocess.run(["pactl", "set-default-source", "npc_sink.monitor"], env=env, check=True)
        yield env
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def test_demo_records_a_spoken_question_from_the_microphone_and_answers(pulse_sink, tmp_path):
    wav = tmp_path / "question.wav"
    question_wav(wav)
    env = {**pulse_sink, "QA_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    listed = subprocess.run(DEMO + ["--list-devices"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "pulse" in listed.stdout
    demo = subprocess.Popen(DEMO + ["--device", "pulse", "--seconds", "20", "--npc", "innkeeper"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in demo.stdout:  # play only once the demo listens: models load first
            lines.append(line)
            if line.startswith("listening on"):
                subprocess.run(["paplay", "--device=npc_sink", str(wav)], env=pulse_sink, check=True, timeout=30)
            if "latency:" in line:
                break
    finally:
        demo.kill()
        demo.wait(timeout=10)
    out = "".join(lines)
    assert "speech started" in out and "speech ended" in out, out
    assert "heard:" in out and ("NPC [" in out or "cannot answer" in out) and "latency:" in out, out


def test_demo_without_an_input_device_says_so(tmp_path):
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), "AUDIODEV": "none", "QA_DEVICE": "cpu"}
    result = subprocess.run(DEMO + ["--device", "no-such-microphone"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "input device" in result.stderr + result.stdout


def test_demo_streams_a_file_through_the_servers_talk(server, tmp_path):
    wav = tmp_path / "question.wav"
    question_wav(wav, 1)
    result = subprocess.run(DEMO + ["--wav", str(wav), "--no-realtime", "--server", server[0], "--npc", "innkeeper"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("speech started") == 1 and "heard:" in result.stdout and "latency:" in result.stdout
