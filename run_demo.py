#!/usr/bin/env python3
"""Talk to an NPC through a microphone: endpointing, the speech vectoriser, the answer, live.

    python run_demo.py                       # default input device, bundled NPCs, in-process engine
    python run_demo.py --list-devices        # what sounddevice can record from
    python run_demo.py --device pulse --npc innkeeper
    python run_demo.py --server 127.0.0.1:50051   # the same, through the gRPC Talk stream of `qa-app serve`
    python run_demo.py --wav question.wav    # stream a file as if it were spoken into the microphone

Each utterance prints what was understood (the speech encoder's transcript), the answer or the refusal,
the confidence, and the latency from the end of speech to the answer.
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CHUNK_S = 0.1  # audio per chunk read from the device or file (what a game client would send)


def _sounddevice():
    try:
        import sounddevice
    except OSError as err:  # the PortAudio library itself is missing
        raise SystemExit(f"run_demo: no audio input available ({err}); install PortAudio "
                         "(apt install libportaudio2) or stream a file with --wav") from None
    return sounddevice


def list_devices() -> int:
    sd = _sounddevice()

    inputs = [(i, d) for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]
    if not inputs:
        print("no audio input devices found")
        return 1
    default = sd.default.device[0]
    for i, d in inputs:
        mark = "*" if i == default else " "
        print(f"{mark} {i:>3}  {d['name']}  ({d['max_input_channels']} ch, {d['default_samplerate']:.0f} Hz)")
    return 0


def microphone(device: str | None, seconds: float, stop: threading.Event) -> tuple[int, Iterator[np.ndarray]]:
    """Mono float32 chunks from an input device at its own rate (the engine resamples)."""
    sd = _sounddevice()

    try:
        info = sd.query_devices(int(device) if device and device.isdigit() else device, "input")
    except (ValueError, sd.PortAudioError) as err:
        raise SystemExit(f"run_demo: no usable input device ({err}); connect a microphone, pick one with "
                         "--device (see --list-devices), or stream a file with --wav") from None
    rate = int(info["default_samplerate"])
    chunks: queue.Queue[np.ndarray] = queue.Queue()

    def callback(data, frames, when, status) -> None:
        chunks.put(data[:, 0].copy())

    def generate() -> Iterator[np.ndarray]:
        with sd.InputStream(device=info["index"], channels=1, samplerate=rate, dtype="float32",
                            blocksize=int(rate * CHUNK_S), callback=callback):
            print(f"listening on {info['name']!r} at {rate} Hz; speak a question (Ctrl-C to stop)", flush=True)
            ends = time.monotonic() + seconds if seconds else float("inf")
            while not stop.is_set() and time.monotonic() < ends:
                try:
                    yield chunks.get(timeout=0.2)
                except queue.Empty:
                    continue

    return rate, generate()


def wav_file(path: Path, realtime: bool) -> tuple[int, Iterator[np.ndarray]]:
    """A file's audio in microphone-sized chunks, paced like speech unless ``realtime`` is off."""
    import soundfile as sf

    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)  # a demo accepts stereo files: mix down as a client would
    step = int(rate * CHUNK_S)
    tail = np.zeros(rate, np.float32)  # a second of silence so the last question ends

    def generate() -> Iterator[np.ndarray]:
        for audio in (samples, tail):
            for start in range(0, len(audio), step):
                if realtime:
                    time.sleep(CHUNK_S)
                yield audio[start:start + step]

    return rate, generate()


def show(heard: str, entry_id: str | None, text: str | None, confidence: float, latency_ms: float) -> None:
    print(f"  heard:      {heard!r}")
    if not entry_id:
        print(f"  NPC:        (cannot answer that)  confidence {confidence:.2f}")
    else:
        print(f"  NPC [{entry_id}]: {text}  confidence {confidence:.2f}")
    print(f"  latency:    {latency_ms:.0f} ms from end of speech to answer", flush=True)


def run_local(args, rate: int, chunks: Iterator[np.ndarray]) -> int:
    from qa_app.audio.io import resample_to_16k
    from qa_app.audio.vad import EndpointConfig, Endpointer, VoiceActivity
    from qa_app.cli import _make_engine, _pick_npc

    print("loading models ...", flush=True)
    # Compute device, threshold and the rest come from QA_* variables, as for the server.
    engine = _make_engine(argparse.Namespace(kb=args.kb, kb_dir=args.kb_dir, device=None, threshold=None,
                                             index_kind=None, rank_k=None, speech_encoder=args.speech_encoder,
                                             speech_mode=args.speech_mode))
    npc = _pick_npc(engine, args.npc)
    engine.speech  # load the speech encoder now, not on the first question
    endpointer = Endpointer(VoiceActivity(), EndpointConfig(max_utterance_s=engine.settings.max_utterance_s))
    print(f"talking to {npc} (NPCs: {', '.join(engine.npcs)})", flush=True)
    for chunk in chunks:
        for event in endpointer.push(resample_to_16k(chunk, rate)):
            handle_local(event, engine, npc)
    for event in endpointer.flush():
        handle_local(event, engine, npc)
    return 0


def handle_local(event, engine, npc: str) -> None:
    if event.kind == "started":
        print(f"[{event.time_s:6.2f} s] speech started", flush=True)
        return
    print(f"[{event.time_s:6.2f} s] speech ended", flush=True)
    if event.utterance is None:
        print("  (too short to be a question)", flush=True)
        return
    from qa_app.audio.io import AudioError

    began = time.perf_counter()
    try:
        answer = engine.ask_speech(npc, event.utterance.samples)
    except AudioError as err:
        print(f"  (not answered: {err})", flush=True)
        return
    show(answer.query, answer.id, answer.answer, answer.confidence, (time.perf_counter() - began) * 1000)


def run_remote(args, rate: int, chunks: Iterator[np.ndarray]) -> int:
    import grpc

    from qa_app.client import NpcClient
    from qa_app.proto import npc_qa_pb2 as pb

    client = NpcClient(args.server, timeout=10)
    try:
        npcs = [n.name for n in client.list_npcs()]
    except grpc.RpcError as err:
        raise SystemExit(f"run_demo: cannot reach the server at {args.server}: {err.details()}") from None
    npc = args.npc or npcs[0]
    print(f"talking to {npc} on {args.server} (NPCs: {', '.join(npcs)})", flush=True)
    ended_at = time.perf_counter()
    audio = (np.asarray(chunk, dtype="<f4").tobytes() for chunk in chunks)
    try:
        for event in client.talk(npc, audio, rate, pb.FLOAT32, player_id="run_demo"):
            kind = event.WhichOneof("event")
            if kind == "speech_started":
                print(f"[{event.speech_started.at_seconds:6.2f} s] speech started", flush=True)
            elif kind == "speech_ended":
                ended_at = time.perf_counter()
                print(f"[{event.speech_ended.at_seconds:6.2f} s] speech ended", flush=True)
            else:
                a = event.answer
                show(a.normalized_query, a.id, a.text, a.confidence, (time.perf_counter() - ended_at) * 1000)
    except grpc.RpcError as err:
        raise SystemExit(f"run_demo: the server refused the stream: {err.code().name}: {err.details()}") from None
    finally:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list-devices", action="store_true", help="list audio input devices and exit")
    parser.add_argument("--device", help="input device name or index (default: the system default)")
    parser.add_argument("--wav", type=Path, help="stream this audio file instead of the microphone")
    parser.add_argument("--no-realtime", dest="realtime", action="store_false",
                        help="with --wav: send the file as fast as possible instead of at speaking pace")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop listening after this long (0: never)")
    parser.add_argument("--server", help="HOST:PORT of `qa-app serve`: go through its Talk stream")
    parser.add_argument("--npc", help="NPC to talk to (default: the first)")
    parser.add_argument("--kb", type=Path, help="one NPC's knowledge-base file (in-process engine)")
    parser.add_argument("--kb-dir", type=Path, help="folder of knowledge bases (in-process engine)")
    parser.add_argument("--speech-encoder", help="speech model: shipped name, folder, or wav2vec2 checkpoint")
    parser.add_argument("--speech-mode", choices=["vectoriser", "asr"],
                        help="wav2vec2 vectoriser (default) or whisper + text path (asr extra)")
    args = parser.parse_args(argv)
    if args.list_devices:
        return list_devices()
    from qa_app.audio.io import AudioError
    from qa_app.engine import QueryError, UnknownNpcError
    from qa_app.kb import KnowledgeBaseError
    from qa_app.models.loading import ModelNotFoundError

    stop = threading.Event()
    if args.wav:
        if not args.wav.is_file():
            raise SystemExit(f"run_demo: no such audio file: {args.wav}")
        rate, chunks = wav_file(args.wav, args.realtime)
    else:
        rate, chunks = microphone(args.device, args.seconds, stop)
    try:
        return run_remote(args, rate, chunks) if args.server else run_local(args, rate, chunks)
    except KeyboardInterrupt:
        stop.set()
        print("\nbye")
        return 0
    except (AudioError, QueryError, UnknownNpcError, KnowledgeBaseError, ModelNotFoundError) as err:
        raise SystemExit(f"run_demo: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
