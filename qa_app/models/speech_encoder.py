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

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from qa_app.kernels import to_device
from qa_app.models.fast_encoders import FastWav2Vec2
from qa_app.models.loading import ModelNotFoundError, pick_device, resolve_model

SAMPLE_RATE = 16_000
DEFAULT_SPEECH_ENCODER = "speech-encoder"
# CTC alphabet: index 0 is the blank; text is lower-cased and anything else becomes a space.
ALPHABET = " abcdefghijklmnopqrstuvwxyz'0123456789"
HEAD_CONFIG = "speech_head.json"
HEAD_WEIGHTS = "speech_head.safetensors"


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
        samples = to_device(np.concatenate(waves), self.device)
        hidden, packed = self.fast(samples, [len(w) for w in waves])  # [frames of all utterances, hidden]
        # Unpack to [batch, frames, hidden] for the head with indices built on the host: a boolean-mask
        # assignment would wait for the GPU (nonzero) and stall the next batch's launches behind this one.
        lengths = np.asarray(packed.lengths)
        longest = int(lengths.max(initial=1))
        slots = np.concatenate([i * longest + np.arange(n) for i, n in enumerate(lengths)] + [np.zeros(0, np.int64)])
        device_info = to_device(np.concatenate([lengths, slots]).astype(np.int64), self.device)
        mask = torch.arange(longest, device=self.device)[None, :] < device_info[:len(waves), None]
        frames = hidden.new_zeros(len(waves) * longest, hidden.shape[1])
        frames.index_copy_(0, device_info[len(waves):], hidden)
        return self.model.head(frames.view(len(waves), longest, -1), mask)
