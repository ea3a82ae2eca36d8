"""Audio in: PCM chunks from the network and files from disk, checked, mono, resampled to 16 kHz.

Every problem is an ``AudioError`` saying what was wrong and what is accepted, so a game client's
developer can fix their capture code from the message alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio

SAMPLE_RATE = 16_000
MIN_RATE, MAX_RATE = 8_000, 48_000
ENCODINGS = ("pcm16", "f32")  # little-endian signed 16-bit integers; little-endian 32-bit floats


class AudioError(ValueError):
    """Audio that cannot be used: wrong format, rate, channel count, or broken samples."""


def check_rate(sample_rate: int) -> None:
    if not isinstance(sample_rate, int) or not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AudioError(f"sample rate {sample_rate} Hz is not supported; send {MIN_RATE}-{MAX_RATE} Hz mono")


def decode_pcm(data: bytes, encoding: str, channels: int = 1) -> np.ndarray:
    """Raw little-endian PCM bytes -> float32 samples in [-1, 1]. Mono only: mix down on the client."""
    if channels != 1:
        raise AudioError(f"{channels}-channel audio is not supported; send mono (mix the channels down)")
    if encoding == "pcm16":
        if len(data) % 2:
            raise AudioError(f"truncated pcm16 chunk: {len(data)} bytes is not a whole number of 2-byte samples")
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if encoding == "f32":
        if len(data) % 4:
            raise AudioError(f"truncated f32 chunk: {len(data)} bytes is not a whole number of 4-byte samples")
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        check_finite(samples)
        return samples
    raise AudioError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")


def check_finite(samples: np.ndarray) -> None:
    if not np.isfinite(samples).all():
        raise AudioError("audio contains NaN or infinite samples")


def resample_to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 mono at ``sample_rate`` -> float32 mono at 16 kHz (torchaudio's windowed-sinc resampler)."""
    check_rate(sample_rate)
    samples = np.asarray(samples, dtype=np.float32)
    if sample_rate == SAMPLE_RATE or len(samples) == 0:
        return samples
    return torchaudio.functional.resample(torch.from_numpy(samples), sample_rate, SAMPLE_RATE).numpy()


def read_audio_file(path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """A WAV, FLAC or OGG file -> float32 mono samples at 16 kHz."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: not a readable WAV/FLAC/OGG file ({err})") from None
    if samples.shape[1] != 1:
        raise AudioError(f"{path}: {samples.shape[1]}-channel audio is not supported; use mono")
    samples = samples[:, 0]
    if len(samples) == 0:
        raise AudioError(f"{path}: the file has no samples")
    check_finite(samples)
    if max_seconds is not None and len(samples) > max_seconds * rate:
        raise AudioError(f"{path}: {len(samples) / rate:.1f} s is longer than the {max_seconds:g} s limit")
    try:
        return resample_to_16k(samples, int(rate))
    except AudioError as err:
        raise AudioError(f"{path}: {err}") from None
