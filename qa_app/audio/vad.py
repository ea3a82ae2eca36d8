"""Endpointing: where each spoken question starts and ends in a stream of microphone audio.

Voice activity comes from silero-vad (its model ships inside the PyPI package): a speech probability per
32 ms frame of 16 kHz audio. ``VoiceActivity`` scores frames of many streams in one call, each stream
keeping its own recurrent state, so a server can batch every player's microphone together.
``Endpointer`` turns one stream's probabilities into utterances with hysteresis, pre-roll padding, a
minimum speech length (coughs and clicks are not questions) and a maximum utterance length.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

SAMPLE_RATE = 16_000
FRAME = 512  # samples per VAD decision at 16 kHz (32 ms), fixed by the silero model


@dataclass
class VadState:
    """One stream's recurrent state in the silero model."""
    state: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 1, 128))
    context: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 64))


class VoiceActivity:
    """silero-vad speech probabilities for frames of any number of streams at once."""

    def __init__(self) -> None:
        threads = torch.get_num_threads()
        from silero_vad import load_silero_vad  # importing it sets torch to 1 thread: put it back

        torch.set_num_threads(threads)
        self._model = load_silero_vad()
        self._lock = threading.Lock()  # the model holds the batch's state while it runs: one call at a time

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray, states: list[VadState]) -> np.ndarray:
        """frames: [streams, 512] float32 at 16 kHz, one frame per stream; returns [streams] probabilities."""
        if len(frames) != len(states):
            raise ValueError("one state per frame")
        model = self._model
        with self._lock:
            model._state = torch.cat([s.state for s in states], dim=1)
            model._context = torch.cat([s.context for s in states], dim=0)
            model._last_sr = SAMPLE_RATE
            model._last_batch_size = len(states)
            probs = model(torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)), SAMPLE_RATE)
            # Each stream keeps a view of its row of the batch's new state (the model replaces, never edits, the
            # tensors it stores; the next call concatenates fresh ones): per-stream copies were half the cost of
            # a call of 128 streams on 2 CPU cores.
            state, context = model._state, model._context
            for i, s in enumerate(states):
                s.state = state[:, i:i + 1]
                s.context = context[i:i + 1]
        return probs[:, 0].numpy()


@dataclass(frozen=True)
class EndpointConfig:
    threshold: float = 0.5          # speech starts when a frame's probability reaches this
    release: float = 0.35           # ... and counts as silence again below this
    min_silence_ms: int = 400       # silence this long ends an utterance
    min_speech_ms: int = 250        # shorter bursts are dropped
    pad_ms: int = 160               # audio kept before the start and after the end
    max_utterance_s: float = 15.0   # longer speech is cut here and answered


@dataclass
class Utterance:
    samples: np.ndarray   # float32 16 kHz, including the padding
    start_s: float        # stream time of the first sample
    end_s: float
    truncated: bool       # cut at max_utterance_s


@dataclass
class SpeechEvent:
    kind: str                          # "started" | "ended"
    time_s: float
    utterance: Utterance | None = None  # set on "ended" when the speech was long enough


class Endpointer:
    """One stream: feed 16 kHz audio of any chunk size, get speech started / ended events."""

    def __init__(self, vad: VoiceActivity, config: EndpointConfig = EndpointConfig()) -> None:
        self.vad = vad
        self.config = config
        self.state = VadState()
        self._pending = np.zeros(0, np.float32)   # samples not yet a whole frame
        self._frames_seen = 0
        self._pre_roll: list[np.ndarray] = []      # recent frames while idle
        self._speech: list[np.ndarray] | None = None
        self._speech_start = 0
        self._silent_frames = 0
        self._voiced_frames = 0

    @property
    def speaking(self) -> bool:
        return self._speech is not None

    def _ms_to_frames(self, ms: float) -> int:
        return max(1, int(round(ms * SAMPLE_RATE / 1000 / FRAME)))

    def push(self, samples: np.ndarray) -> list[SpeechEvent]:
        """Hear more of the stream (16 kHz float32); the events it completes, in order."""
        events: list[SpeechEvent] = []
        for frame in self.frames(samples):
            events += self.step(frame, float(self.vad(frame[None], [self.state])[0]))
        return events

    def frames(self, samples: np.ndarray) -> np.ndarray:
        """The whole VAD frames the stream now holds, [count, FRAME]; the rest waits for more samples.

        With ``step`` this lets a server get each frame's speech probability from a VAD batched across
        streams (``self.state`` is this stream's recurrent state) instead of calling ``push``."""
        self._pending = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        count = len(self._pending) // FRAME
        frames = self._pending[: count * FRAME].reshape(count, FRAME)
        self._pending = self._pending[count * FRAME:]
        return frames

    def flush(self) -> list[SpeechEvent]:
        """End of stream: close an utterance in progress."""
        return [self._end(truncated=False)] if self.speaking else []

    def step(self, frame: np.ndarray, probability: float) -> list[SpeechEvent]:
        """Advance by one frame whose speech probability is known."""
        c = self.config
        self._frames_seen += 1
        events = []
        if self._speech is None:
            self._pre_roll.append(frame)
            del self._pre_roll[: -self._ms_to_frames(c.pad_ms) - 1]
            if probability >= c.threshold:
                self._speech = list(self._pre_roll)
                self._pre_roll = []
                self._speech_start = self._frames_seen - len(self._speech)
                self._silent_frames, self._voiced_frames = 0, 1
                events.append(SpeechEvent("started", self._speech_start * FRAME / SAMPLE_RATE))
            return events
        self._speech.append(frame)
        if probability < c.release:
            self._silent_frames += 1
        else:
            self._silent_frames = 0
            self._voiced_frames += 1
        if self._silent_frames >= self._ms_to_frames(c.min_silence_ms):
            keep = len(self._speech) - self._silent_frames + self._ms_to_frames(c.pad_ms)
            self._speech = self._speech[:keep]
            events.append(self._end(truncated=False))
        elif len(self._speech) * FRAME >= c.max_utterance_s * SAMPLE_RATE:
            events.append(self._end(truncated=True))
        return events

    def _end(self, truncated: bool) -> SpeechEvent:
        frames, start = self._speech or [], self._speech_start
        self._speech = None
        voiced = self._voiced_frames
        self._voiced_frames = self._silent_frames = 0
        end_s = (start + len(frames)) * FRAME / SAMPLE_RATE
        if voiced < self._ms_to_frames(self.config.min_speech_ms):
            return SpeechEvent("ended", end_s)
        return SpeechEvent("ended", end_s, Utterance(np.concatenate(frames), start * FRAME / SAMPLE_RATE,
                                                     end_s, truncated))


def split_utterances(samples: np.ndarray, vad: VoiceActivity | None = None,
                     config: EndpointConfig = EndpointConfig()) -> list[Utterance]:
    """Every utterance in a recording (16 kHz float32), as the streaming endpointer finds them."""
    endpointer = Endpointer(vad or VoiceActivity(), config)
    events = endpointer.push(samples) + endpointer.flush()
    return [e.utterance for e in events if e.kind == "ended" and e.utterance is not None]
