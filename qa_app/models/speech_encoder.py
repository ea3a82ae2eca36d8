"""The speech vectoriser: a spoken question straight into the text bi-encoder's 384-d space.

Architecture: the transformers ``Wav2Vec2Model`` (convolutional feature encoder + transformer), attention
pooling over the frames, and a projection to the text space, L2-normalised; an auxiliary CTC character
head on the frames (it teaches the encoder the words, and its greedy transcript is shown to players and
used for entities and logs). No ASR step is needed for the vector: one faiss index serves typed and spoken
questions alike.

On disk a speech model folder is a plain Hugging Face wav2vec2 checkpoint (``config.json`` +
``model.safetensors``) plus our head (``speech_head.json`` + ``speech_head.safetensors``), so any
wav2vec2 checkpoint can be combined with a trained head.
"""
from __future__ import annotations

import bisect
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from qa_app.kernels import to_device
from qa_app.models.cuda_graphs import capture
from qa_app.models.fast_encoders import FastWav2Vec2, SpeechPlan
from qa_app.models.loading import ModelNotFoundError, pick_device, resolve_model

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
DEFAULT_SPEECH_ENCODER = "speech-encoder"
# CTC alphabet: index 0 is the blank; text is lower-cased and anything else becomes a space.
ALPHABET = " abcdefghijklmnopqrstuvwxyz'0123456789"
HEAD_CONFIG = "speech_head.json"
HEAD_WEIGHTS = "speech_head.safetensors"
# CUDA graphs on the fast path, one per bucket of (utterances, longest utterance): a batch launches ~100
# kernels, and on the H100 the host took ~10 ms to launch them, whether the GPU then ran for 0.8 ms (one 2 s
# utterance) or 10 ms (128 of them). Buckets hold at most GRAPH_MAX_AUDIO_S seconds of (padded) audio: a
# graph keeps its activations, and the graphs share one pool, so that bounds the memory (~2 GB); larger
# batches run eagerly.
GRAPH_UTTERANCES = (1, 2, 4, 8, 16, 32, 64, 128)
GRAPH_SECONDS = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16)
GRAPH_MAX_AUDIO_S = 256


def small_wav2vec2_config(layers: int = 6, hidden: int = 384, conv_dim: int = 256) -> Wav2Vec2Config:
    """A wav2vec2 small enough for a 2-core CPU: narrower convolutions, 384-d transformer.

    Same 7-layer convolutional front end as wav2vec2-base (20 ms frames, 25 ms receptive field), layer norm
    in the feature encoder and pre-norm transformer layers (stable when trained from scratch).
    """
    return Wav2Vec2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        intermediate_size=hidden * 4, conv_dim=(conv_dim,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16, hidden_dropout=0.05,
        attention_dropout=0.05, activation_dropout=0.0, feat_proj_dropout=0.05, layerdrop=0.0,
        mask_time_prob=0.05, mask_time_length=5, mask_feature_prob=0.0, apply_spec_augment=True,
        vocab_size=len(ALPHABET) + 1)


@dataclass
class HeadConfig:
    text_dim: int = 384       # the text bi-encoder's embedding size
    alphabet: str = ALPHABET  # CTC characters after the blank
    text_encoder: str = ""    # which text encoder's space this head targets (recorded, checked on load)


class SpeechVectoriser(nn.Module):
    """wav2vec2 frames -> attention pooling -> projection (unit vector) and CTC logits."""

    def __init__(self, wav2vec2: Wav2Vec2Model, head: HeadConfig) -> None:
        super().__init__()
        self.wav2vec2 = wav2vec2
        self.head_config = head
        hidden = wav2vec2.config.hidden_size
        self.pool_score = nn.Linear(hidden, 1)
        self.project = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, head.text_dim))
        self.ctc = nn.Linear(hidden, len(head.alphabet) + 1)

    def frame_mask(self, attention_mask: torch.Tensor, frames: int) -> torch.Tensor:
        lengths = self.wav2vec2._get_feat_extract_output_lengths(attention_mask.sum(-1))
        return torch.arange(frames, device=attention_mask.device)[None, :] < lengths[:, None]

    def forward(self, samples: torch.Tensor, attention_mask: torch.Tensor):
        """samples: [batch, time] at 16 kHz, zero-padded; attention_mask: [batch, time] 1 on real samples.

        Returns (embeddings [batch, text_dim] unit length, ctc logits [batch, frames, alphabet+1],
        frame mask [batch, frames]).
        """
        hidden = self.wav2vec2(samples, attention_mask=attention_mask).last_hidden_state  # [batch, frames, hidden]
        return self.head(hidden, self.frame_mask(attention_mask, hidden.shape[1]))

    def head(self, hidden: torch.Tensor, mask: torch.Tensor):
        """Pooling, projection and CTC over encoder frames [batch, frames, hidden] with a 0/1 frame mask."""
        scores = self.pool_score(hidden).squeeze(-1).float().masked_fill(~mask, float("-inf"))
        weights = scores.softmax(-1).to(hidden.dtype)                                         # [batch, frames]
        pooled = torch.einsum("bf,bfh->bh", weights, hidden)
        embeddings = nn.functional.normalize(self.project(pooled).float(), dim=-1)
        return embeddings, self.ctc(hidden), mask

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("wav2vec2.")}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.wav2vec2.to(torch.float16).save_pretrained(folder, safe_serialization=True)
        self.wav2vec2.to(torch.float32)
        save_file({k: v.to(torch.float16).contiguous() for k, v in self.head_state().items()}, folder / HEAD_WEIGHTS)
        (folder / HEAD_CONFIG).write_text(json.dumps(asdict(self.head_config), indent=2) + "\n")

    @classmethod
    def load(cls, source: str | Path, head: str | Path | None = None) -> "SpeechVectoriser":
        """A speech model folder (or shipped name), or any wav2vec2 checkpoint with ``head`` = a folder
        holding our trained head."""
        model_dir = resolve_model(source)
        head_dir = Path(head) if head is not None else Path(model_dir)
        if not (head_dir / HEAD_CONFIG).is_file():
            raise ModelNotFoundError(f"{head_dir}: no {HEAD_CONFIG}; a wav2vec2 checkpoint needs a trained "
                                     "speech head (pass the folder of one)")
        head_config = HeadConfig(**json.loads((head_dir / HEAD_CONFIG).read_text()))
        wav2vec2 = Wav2Vec2Model.from_pretrained(model_dir, dtype=torch.float32)
        model = cls(wav2vec2, head_config)
        state = {k: v.float() for k, v in load_file(head_dir / HEAD_WEIGHTS).items()}
        expected = model.head_state()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
                 if k in expected and v.shape != expected[k].shape]
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if wrong or missing or unexpected:
            raise ModelNotFoundError(f"{head_dir}: speech head does not fit the model {model_dir} (shapes: {wrong}, "
                                     f"missing: {missing}, unexpected: {unexpected})")
        model.load_state_dict(state, strict=False)
        return model


def ctc_greedy(logits: torch.Tensor, mask: torch.Tensor, alphabet: str = ALPHABET) -> list[str]:
    """Best path decoding: argmax per frame, merge repeats, drop blanks. logits: [batch, frames, classes]."""
    best = logits.argmax(-1).cpu().numpy()
    lengths = mask.sum(-1).cpu().numpy()
    texts = []
    for row, length in zip(best, lengths):
        row = row[:length]
        keep = row[(row != 0) & np.concatenate([[True], row[1:] != row[:-1]])]
        texts.append(" ".join("".join(alphabet[i - 1] for i in keep).split()))
    return texts


def pad_batch(waves: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad mono 16 kHz waveforms into [batch, longest] with a 0/1 mask of real samples."""
    longest = max(len(w) for w in waves)
    samples = torch.zeros(len(waves), longest)
    mask = torch.zeros(len(waves), longest, dtype=torch.long)
    for i, w in enumerate(waves):
        samples[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
        mask[i, : len(w)] = 1
    return samples.to(device), mask.to(device)


def normalize_waveform(wave: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance, as wav2vec2's feature extractor does."""
    wave = np.asarray(wave, dtype=np.float32)
    return (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)


class SpeechEncoder:
    """Batched inference: 16 kHz utterances in, unit vectors in the text space (and transcripts) out."""

    def __init__(self, model: str = DEFAULT_SPEECH_ENCODER, device: str = "auto", head: str | None = None,
                 fast_kernels: bool = True) -> None:
        """On a CUDA device, fast_kernels runs wav2vec2 on the FP16 Triton kernels over packed utterances (no
        padding anywhere; the transformers model stays the reference)."""
        self.device = pick_device(device)
        self.source = resolve_model(model)
        self.model = SpeechVectoriser.load(model, head).eval().to(self.device)
        if self.device.type == "cuda":
            self.model.half()
        self.fast = FastWav2Vec2(self.model.wav2vec2) if fast_kernels and self.device.type == "cuda" else None
        self.graphs = SpeechGraphs(self) if self.fast is not None else None
        self.dim = self.model.head_config.text_dim
        self.text_encoder = self.model.head_config.text_encoder
        self.name = str(model)

    @torch.inference_mode()
    def encode(self, waves: list[np.ndarray], batch_size: int | None = None) -> tuple[np.ndarray, list[str]]:
        """Embeddings [len(waves), dim] float32 and greedy CTC transcripts, one per utterance.

        batch_size: utterances per forward pass; default 32 on CUDA and 1 on CPU, where batching gains
        nothing and the convolutional front end's activations (256 channels at 3.2 kHz) of a padded batch
        outgrow the caches: measured 58 ms per 3 s utterance alone, 73 ms in batches of 16 (2 cores).
        """
        batch_size = batch_size or (32 if self.device.type == "cuda" else 1)
        out = np.zeros((len(waves), self.dim), dtype=np.float32)
        texts = [""] * len(waves)
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))  # similar lengths pad little
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            embeddings, logits, frames = self.forward([normalize_waveform(waves[i]) for i in chunk])
            out[chunk] = embeddings.float().cpu().numpy()
            for i, text in zip(chunk, ctc_greedy(logits.float(), frames, self.model.head_config.alphabet)):
                texts[i] = text
        return out, texts

    @torch.inference_mode()
    def forward(self, waves: list[np.ndarray]):
        """The model alone on normalised waveforms: (embeddings [batch, dim], CTC logits [batch, frames,
        classes], frame mask [batch, frames]) on the device; packed on the fast path, padded otherwise."""
        if self.fast:
            return self._forward_packed(waves)
        samples, mask = pad_batch(waves, self.device)
        return self.model(samples.to(next(self.model.parameters()).dtype), mask)

    def _forward_packed(self, waves: list[np.ndarray]):
        lengths = [len(w) for w in waves]
        if self.graphs is not None:
            out = self.graphs(waves, lengths)
            if out is not None:
                return out
        plan = self.fast.plan(lengths)
        samples = to_device(np.concatenate(waves), self.device)
        meta = to_device(plan.meta, self.device)
        slots, longest = _frame_slots(plan, len(waves))
        return self._head(self.fast.forward(samples, meta, plan), meta, to_device(slots, self.device), len(waves),
                          longest)

    def _head(self, hidden: torch.Tensor, meta: torch.Tensor, slots: torch.Tensor, utterances: int, longest: int):
        """Pooling, projection and CTC on packed frames: unpacked to [utterances, longest, hidden] with indices
        built on the host (a boolean-mask assignment would wait for the GPU); ``slots`` sends rows that are
        not an utterance's frames (a graph bucket's scratch) to one extra row, dropped."""
        frames = hidden.new_zeros(utterances * longest + 1, hidden.shape[1])
        frames.index_copy_(0, slots, hidden)
        mask = torch.arange(longest, device=hidden.device)[None, :] < meta[-1, 1, :utterances, None]
        return self.model.head(frames[:-1].view(utterances, longest, -1), mask)

    def warm_up(self) -> None:
        """Capture every graph bucket now (at server start, not under the first players' voices)."""
        if self.graphs is not None:
            self.graphs.warm_up()


def _frame_slots(plan: SpeechPlan, utterances: int, longest: int | None = None) -> tuple[np.ndarray, int]:
    """Where each packed frame row goes in [utterances, longest] (row-major), for all ``plan.frame_rows``
    rows: rows past the utterances' frames go to slot ``utterances * longest`` (dropped)."""
    lengths = plan.meta[-1, 1, :utterances].astype(np.int64)
    longest = longest or max(int(lengths.max(initial=0)), 1)
    slots = np.full(plan.frame_rows, utterances * longest, dtype=np.int64)
    real = np.concatenate([i * longest + np.arange(n) for i, n in enumerate(lengths)] + [np.zeros(0, np.int64)])
    slots[:len(real)] = real
    return slots, longest


class SpeechGraphs:
    """The fast speech forward (encoder + head) replayed from CUDA graphs, one per bucket of (utterances,
    longest utterance); the batch's lengths reach the graph as device metadata (``FastWav2Vec2.plan``), so
    a bucket serves any lengths within it. Replays are serialised by a lock and outputs copied out; all
    graphs share one memory pool."""

    def __init__(self, encoder: "SpeechEncoder") -> None:
        self.encoder, self.device = encoder, encoder.device
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None
        self._lock = threading.Lock()
        self._broken = False  # capture failed once: run eagerly from then on
        self._stream = torch.cuda.Stream(self.device)

    @staticmethod
    def bucket(lengths: list[int]) -> tuple[int, int] | None:
        """(utterances, longest samples) of the graph serving these lengths, or None."""
        utterances = bisect.bisect_left(GRAPH_UTTERANCES, len(lengths))
        seconds = bisect.bisect_left(GRAPH_SECONDS, max(lengths) / SAMPLE_RATE)
        if utterances == len(GRAPH_UTTERANCES) or seconds == len(GRAPH_SECONDS):
            return None
        if GRAPH_UTTERANCES[utterances] * GRAPH_SECONDS[seconds] > GRAPH_MAX_AUDIO_S:
            return None
        return GRAPH_UTTERANCES[utterances], int(GRAPH_SECONDS[seconds] * SAMPLE_RATE)

    def __call__(self, waves: list[np.ndarray], lengths: list[int]):
        """(embeddings, CTC logits, frame mask) as ``SpeechEncoder.forward``, or None: no bucket fits."""
        shape = self.bucket(lengths)
        if shape is None or self._broken:
            return None
        with self._lock:
            entry = self._graphs.get(shape) or self._capture(shape)
            if entry is None:
                return None
            graph, samples, meta, slots, (embeddings, logits, mask) = entry
            plan = self.encoder.fast.plan(lengths, *shape)  # the bucket's bounds, this batch's lengths
            samples[:sum(lengths)].copy_(to_device(np.concatenate(waves), self.device))
            meta.copy_(to_device(plan.meta, self.device))
            slots.copy_(to_device(_frame_slots(plan, shape[0], plan.bounds[-1][0])[0], self.device))
            graph.replay()
            n = len(waves)
            longest = max(int(plan.meta[-1, 1, :n].max()), 1)
            return embeddings[:n].clone(), logits[:n, :longest].clone(), mask[:n, :longest].clone()

    def warm_up(self) -> int:
        with self._lock:
            for utterances in GRAPH_UTTERANCES:
                for seconds in GRAPH_SECONDS:
                    shape = (utterances, int(seconds * SAMPLE_RATE))
                    if utterances * seconds <= GRAPH_MAX_AUDIO_S and shape not in self._graphs and not self._broken:
                        self._capture(shape)
        return len(self._graphs)

    def _capture(self, shape: tuple[int, int]):
        utterances, longest = shape
        fast = self.encoder.fast
        plan = fast.plan([longest] * utterances, utterances, longest)  # any lengths in the bucket: the fullest
        samples = torch.zeros(utterances * longest, dtype=torch.float32, device=self.device)
        meta = torch.from_numpy(plan.meta).to(self.device)
        frames_bound = plan.bounds[-1][0]
        slots = torch.from_numpy(_frame_slots(plan, utterances, frames_bound)[0]).to(self.device)

        def forward():
            hidden = fast.forward(samples, meta, plan)
            return self.encoder._head(hidden, meta, slots, utterances, frames_bound)

        try:
            graph, outputs = capture(forward, self._stream, self._pool)
        except RuntimeError as err:  # the eager path still works
            log.warning("speech encoder: CUDA graph capture failed (%s); running eagerly", err)
            self._broken = True
            return None
        self._pool = graph.pool()
        self._graphs[shape] = (graph, samples, meta, slots, outputs)
        log.info("speech encoder: captured CUDA graph for %d utterances of up to %.1f s", utterances,
                 longest / SAMPLE_RATE)
        return self._graphs[shape]
