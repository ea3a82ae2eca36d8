"""Speech vectoriser latency: one 3-second utterance (a lone player), and throughput at larger batches.

Times ``SpeechEncoder.encode`` (normalise, pad, wav2vec2 + pooling + projection + CTC head, copy back) on
real speech from the bundled spoken eval set, cut or padded to the length asked. On CUDA the model runs in
fp16 and every timing is synchronised; on CPU in fp32. Prints the model's size and a table.

    python benchmarks/bench_speech_latency.py [--device cpu] [--model speech-encoder] [--seconds 3]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from qa_app.models.loading import ASSETS_DIR
from qa_app.models.speech_encoder import SpeechEncoder


def utterances(folder: Path, seconds: float, count: int) -> list[np.ndarray]:
    """Real spoken questions, each looped or cut to exactly ``seconds``."""
    import soundfile as sf

    from qa_app.audio.io import resample_to_16k

    files = sorted(folder.glob("*.ogg"))[:count]
    if not files:
        raise SystemExit(f"no .ogg speech in {folder}")
    out = []
    for path in files:
        samples, rate = sf.read(path, dtype="float32")
        samples = resample_to_16k(samples, rate)
        out.append(np.resize(samples, int(seconds * 16000)).astype(np.float32))
    return out


def timed(encoder: SpeechEncoder, batch: list[np.ndarray], repeats: int) -> list[float]:
    cuda = encoder.device.type == "cuda"
    for _ in range(3):
        encoder.encode(batch, batch_size=len(batch))
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        encoder.encode(batch, batch_size=len(batch))
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="speech-encoder")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batches", default="1,16,64", help="batch sizes to time")
    parser.add_argument("--audio", type=Path, default=ASSETS_DIR / "eval" / "spoken" / "innkeeper",
                        help="folder of .ogg speech to time on")
    args = parser.parse_args()

    encoder = SpeechEncoder(args.model, device=args.device)
    params = sum(p.numel() for p in encoder.model.parameters())
    disk = sum(f.stat().st_size for f in Path(encoder.source).glob("*.safetensors"))
    device = torch.cuda.get_device_name() if encoder.device.type == "cuda" else f"cpu ({platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    print(f"date {time.strftime('%Y-%m-%d')}  device {device}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}")
    print(f"model {args.model}: {params / 1e6:.1f}M parameters, {disk / 2**20:.1f} MiB on disk, "
          f"{'fp16' if encoder.device.type == 'cuda' else 'fp32'}; utterances of {args.seconds:g} s")
    print(f"{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}{'ms/utt':>10}{'audio-s/s':>12}")
    for size in (int(b) for b in args.batches.split(",")):
        batch = utterances(args.audio, args.seconds, size)
        if len(batch) < size:
            batch = (batch * size)[:size]
        repeats = args.repeats if size == 1 else max(5, args.repeats // 5)
        times = timed(encoder, batch, repeats)
        p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
        print(f"{size:>6}{p50:>10.1f}{p99:>10.1f}{p50 / size:>10.2f}{size * args.seconds / (p50 / 1000):>12.0f}")


if __name__ == "__main__":
    main()
