"""``qa-app train-speech``: train the wav2vec2 speech vectoriser from scratch on synthetic speech.

No pretrained wav2vec2 weights exist offline, so everything is learnt here, in one seeded run:
1. texts from the training games and general chat (``speech_data``), spoken by espeak-ng voices drawn at
   random (synthesised in parallel processes) plus any audio manifests given (piper's neural voice);
2. targets: the text bi-encoder's embedding of what was said (the engine's own normalised text);
3. training on the GPU with augmentation done there too (speed, reverberation, noise and other speech,
   8 kHz band-limiting, leading/trailing silence), loss = (1 - cosine) + in-batch contrastive + CTC;
4. fp16 safetensors + head, a metrics log, and a report of the cosine to the text embedding on
   utterances of held-out voices.
It also runs (slowly) on CPU with ``limit_texts`` for a smoke test.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchaudio
from tqdm import tqdm
from transformers import Wav2Vec2Model

from qa_app.models.loading import ASSETS_DIR, pick_device
from qa_app.models.speech_encoder import (ALPHABET, HeadConfig, SpeechVectoriser, ctc_greedy,
                                          small_wav2vec2_config)
from qa_app.text.normalize import normalize
from qa_app.train.loop import adamw_with_warmup, seed_everything, step, steps_within
from qa_app.train.speech_data import (HELD_OUT_ESPEAK_VARIANTS, HELD_OUT_ESPEAK_VOICES, ESPEAK_VARIANTS,
                                      ESPEAK_VOICES, SAMPLE_RATE, Utterance, load_manifest_audio,
                                      synthesize_espeak, training_texts)

log = logging.getLogger(__name__)


@dataclass
class SpeechTrainConfig:
    corpora: str = str(ASSETS_DIR / "train")
    general_chat: str = str(ASSETS_DIR / "train" / "general_chat.txt")
    audio_manifests: list[str] = field(default_factory=list)  # extra speech: {"audio", "text"} lines
    text_encoder: str = "text-encoder"      # the space to land in (the engine's bi-encoder)
    target_cache: str = ""                  # .npz of {texts, vectors} from text_encoder (skips loading it)
    output: str = str(ASSETS_DIR / "models" / "speech-encoder")
    device: str = "auto"
    seed: int = 13
    espeak_copies: int = 2                  # each text spoken by this many random espeak voices
    synth_workers: int = 0                  # 0: one per CPU core
    limit_texts: int = 0                    # >0: this many texts only (CPU smoke test)
    layers: int = 8
    hidden: int = 384
    conv_dim: int = 256
    steps: int = 13000
    batch_seconds: float = 480.0            # audio per batch (sum of padded lengths)
    learning_rate: float = 5e-4
    warmup_fraction: float = 0.03
    # The text targets share a large common direction: a strong, sharp contrastive term pushes speech vectors
    # off it and holds the cosine to the target down (measured: 0.27 after 5k steps at weight 1.0 and
    # temperature 0.05; 0.49 after 2k more at 0.2 and 0.1).
    contrastive_weight: float = 0.2
    contrastive_temperature: float = 0.1
    ctc_weight: float = 0.5
    max_seconds: float = 8.0                # longer training utterances are dropped
    max_train_minutes: float = 0.0          # >0: fewer steps if the measured speed would overrun this
    init_from: str = ""                     # a saved speech model to continue training
    held_out_texts: int = 300               # texts spoken by held-out voices for the report


LOSS_PARTS = ("total", "cosine", "contrastive", "ctc")
SHAPE_STEP = SAMPLE_RATE // 4


def text_targets(texts: list[str], config: SpeechTrainConfig, device: torch.device) -> np.ndarray:
    """[len(texts), dim] unit vectors of the engine's text encoder for each text as the engine reads it."""
    keys = [normalize(t) for t in texts]
    if config.target_cache:
        cache = np.load(config.target_cache, allow_pickle=False)
        lookup = {k: i for i, k in enumerate(cache["texts"].tolist())}
        missing = [k for k in keys if k not in lookup]
        if missing:
            raise ValueError(f"{config.target_cache}: no target for {len(missing)} texts, e.g. {missing[0]!r}")
        vectors = cache["vectors"].astype(np.float32)
        if "scales" in cache:  # int8 rows with one scale each (a quarter of fp32's size, cosine > 0.999)
            vectors *= cache["scales"].astype(np.float32)[:, None]
        vectors = vectors[[lookup[k] for k in keys]]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    from qa_app.models.text_encoder import TextEncoder

    return TextEncoder(config.text_encoder, str(device)).encode(keys, batch_size=256)


def save_target_cache(texts: list[str], text_encoder: str, path: str | Path, device: str = "auto") -> None:
    """Precompute targets where the text encoder is (so a GPU job need not carry it)."""
    from qa_app.models.text_encoder import TextEncoder

    keys = sorted({normalize(t) for t in texts})
    vectors = TextEncoder(text_encoder, device).encode(keys, batch_size=256, progress=True)
    scales = np.abs(vectors).max(axis=1) / 127
    quantized = np.round(vectors / scales[:, None]).astype(np.int8)
    np.savez_compressed(path, texts=np.array(keys), vectors=quantized, scales=scales.astype(np.float32))


def ctc_labels(text: str) -> list[int]:
    spoken = " ".join("".join(c if c in ALPHABET else " " for c in normalize(text)).split())
    return [ALPHABET.index(c) + 1 for c in spoken]


class AudioBank:
    """Every utterance in one flat int16 tensor on the device, with offsets: no loader, no copies."""

    def __init__(self, utterances: list[Utterance], device: torch.device) -> None:
        lengths = np.array([len(u.samples) for u in utterances])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate([(np.clip(u.samples, -1, 1) * 32767).astype(np.int16) for u in utterances])
        self.audio = torch.from_numpy(flat).to(device)
        self.lengths = lengths

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, longest] float32 and a 0/1 mask, gathered in one indexing operation."""
        lengths = torch.as_tensor(self.lengths[indices], device=self.audio.device)
        starts = torch.as_tensor(self.offsets[indices], device=self.audio.device)
        # Widths rounded up to a quarter second: a few dozen shapes, so cuDNN's per-shape plans are reused.
        width = -(-int(lengths.max()) // SHAPE_STEP) * SHAPE_STEP
        positions = torch.arange(width, device=self.audio.device)
        mask = positions[None, :] < lengths[:, None]
        where = (starts[:, None] + positions[None, :]).clamp(max=len(self.audio) - 1)
        samples = self.audio[where].float().div_(32767) * mask
        return samples, mask.long()


def length_batches(lengths: np.ndarray, batch_samples: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar lengths (little padding) whose padded size stays within ``batch_samples``."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_samples:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


class Augmenter:
    """Random acoustic conditions applied to a padded batch on its device."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def __call__(self, samples: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self.rng
        if rng.random() < 0.5:  # speed: resampling at another rate changes tempo and pitch together
            factor = rng.choice([0.9, 0.95, 1.05, 1.1])
            new_rate = int(SAMPLE_RATE * factor) // 100 * 100
            samples = torchaudio.functional.resample(samples, SAMPLE_RATE, new_rate)
            lengths = (mask.sum(-1).float() * new_rate / SAMPLE_RATE).long().clamp(max=samples.shape[1])
            mask = (torch.arange(samples.shape[1], device=samples.device)[None] < lengths[:, None]).long()
            samples = samples * mask
        if rng.random() < 0.3:  # silence before and after, as the endpointer leaves it
            lead, trail = rng.randint(0, SAMPLE_RATE // 4), rng.randint(0, SAMPLE_RATE // 4)
            lengths = mask.sum(-1) + lead + trail
            samples = torch.nn.functional.pad(samples, (lead, trail))
            mask = (torch.arange(samples.shape[1], device=samples.device)[None] < lengths[:, None]).long()
        if rng.random() < 0.35:  # reverberation: a synthetic exponentially decaying room response
            rt60 = rng.uniform(0.15, 0.7)
            n = int(SAMPLE_RATE * min(rt60, 0.4))
            t = torch.arange(n, device=samples.device) / SAMPLE_RATE
            rir = torch.randn(n, device=samples.device) * torch.exp(-6.9 * t / rt60)
            rir[0] = 1.0
            rir = rir / rir.norm()
            samples = torchaudio.functional.fftconvolve(samples, rir[None].expand(samples.shape[0], -1))
            samples = samples[:, : mask.shape[1]] * mask
        if rng.random() < 0.2:  # telephone / voice-chat band: down to 8 kHz and back
            samples = torchaudio.functional.resample(torchaudio.functional.resample(samples, SAMPLE_RATE, 8000),
                                                     8000, SAMPLE_RATE)[:, : mask.shape[1]] * mask
        power = samples.pow(2).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        if rng.random() < 0.3:  # other players talking underneath
            other = samples.roll(1, 0) * mask
            snr_db = rng.uniform(8, 20)
            other_power = other.pow(2).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
            samples = samples + other * torch.sqrt(power / other_power.clamp(min=1e-8) / 10 ** (snr_db / 10))
        if rng.random() < 0.6:  # white or brown-ish noise at 5-35 dB SNR
            noise = torch.randn_like(samples)
            if rng.random() < 0.5:  # darker noise (rumble, fans): low-pass in the frequency domain
                spectrum = torch.fft.rfft(noise)
                cutoff = rng.uniform(300, 2000) / (SAMPLE_RATE / 2) * spectrum.shape[-1]
                bins = torch.arange(spectrum.shape[-1], device=noise.device)
                noise = torch.fft.irfft(spectrum / (1 + (bins / cutoff) ** 4), n=noise.shape[-1])
            snr_db = rng.uniform(5, 35)
            noise_power = noise.pow(2).mean(-1, keepdim=True)
            samples = samples + noise * torch.sqrt(power / noise_power / 10 ** (snr_db / 10)) * mask
        return _normalized(samples, mask), mask


def _normalized(samples: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-utterance zero mean, unit variance over real samples, as at inference (normalize_waveform)."""
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (samples * mask).sum(-1, keepdim=True) / count
    var = ((samples - mean) * mask).pow(2).sum(-1, keepdim=True) / count
    return (samples - mean) / torch.sqrt(var + 1e-7) * mask


def objective(embeddings: torch.Tensor, logits: torch.Tensor, frames: torch.Tensor, targets: torch.Tensor,
              target_ids: torch.Tensor, labels: list[list[int]], config: SpeechTrainConfig) -> dict[str, torch.Tensor]:
    """The training loss of a vectoriser's outputs (see SpeechVectoriser.forward) against the text targets
    [batch, dim], their text ids [batch] and the characters said (CTC labels)."""
    device = embeddings.device
    cosine = (embeddings * targets).sum(-1)
    # In-batch contrastive: each utterance against every other text in the batch (copies of its own
    # text, spoken by other voices, are not negatives).
    similarity = embeddings @ targets.T / config.contrastive_temperature
    same_text = (target_ids[:, None] == target_ids[None, :]) & ~torch.eye(len(target_ids), dtype=torch.bool,
                                                                           device=device)
    similarity = similarity.float().masked_fill(same_text, float("-inf"))
    contrastive = torch.nn.functional.cross_entropy(similarity, torch.arange(len(target_ids), device=device))
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # [frames, batch, classes]
    flat = torch.tensor([c for lab in labels for c in lab], dtype=torch.long, device=device)
    ctc = torch.nn.functional.ctc_loss(log_probs, flat, frames.sum(-1),
                                       torch.tensor([len(lab) for lab in labels], device=device),
                                       blank=0, zero_infinity=True)
    total = (1 - cosine).mean() + config.contrastive_weight * contrastive + config.ctc_weight * ctc
    return {"total": total, "cosine": cosine.float().mean().detach(), "contrastive": contrastive.detach().float(),
            "ctc": ctc.detach().float()}


def build_data(config: SpeechTrainConfig, device: torch.device, rng: random.Random):
    texts = training_texts(config.corpora, config.general_chat)
    if config.target_cache:  # texts added to the corpora after the cache was made wait for the next cache
        cached = set(np.load(config.target_cache, allow_pickle=False)["texts"].tolist())
        texts = [t for t in texts if normalize(t) in cached]
    rng.shuffle(texts)
    if config.limit_texts:
        texts = texts[: config.limit_texts]
    workers = config.synth_workers or max(1, __import__("os").cpu_count() or 1)
    utterances = synthesize_espeak(texts, config.espeak_copies, config.seed, workers)
    for manifest in config.audio_manifests:
        extra = [u for u in load_manifest_audio(manifest) if u.text]
        log.info("%s: %d utterances", manifest, len(extra))
        utterances += extra
    utterances = [u for u in utterances if SAMPLE_RATE // 10 < len(u.samples) <= config.max_seconds * SAMPLE_RATE]
    # Held-out report: texts spoken by voices and variants no training utterance used.
    held_texts = texts[: config.held_out_texts]
    held_out = synthesize_espeak(held_texts, 1, config.seed + 1, workers, voices=ESPEAK_VOICES,
                                 variants=HELD_OUT_ESPEAK_VARIANTS)
    held_out += synthesize_espeak(held_texts[: config.held_out_texts // 3], 1, config.seed + 2, workers,
                                  voices=HELD_OUT_ESPEAK_VOICES, variants=ESPEAK_VARIANTS)
    return utterances, held_out


@torch.no_grad()
def held_out_report(model: SpeechVectoriser, held_out: list[Utterance], targets: np.ndarray,
                    device: torch.device) -> dict:
    model.eval()
    bank = AudioBank(held_out, device)
    cosines, transcripts = [], []
    for start in range(0, len(held_out), 32):
        idx = list(range(start, min(start + 32, len(held_out))))
        samples, mask = bank.batch(idx)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            embeddings, logits, frames = model(_normalized(samples, mask), mask)
        cosines += (embeddings.float().cpu().numpy() * targets[idx]).sum(-1).tolist()
        transcripts += ctc_greedy(logits.float(), frames)
    model.train()
    cos = np.array(cosines)
    return {"utterances": len(held_out), "cosine_median": round(float(np.median(cos)), 4),
            "cosine_p10": round(float(np.percentile(cos, 10)), 4),
            "cosine_p90": round(float(np.percentile(cos, 90)), 4),
            "examples": [{"said": u.text, "heard": t, "voice": u.voice, "cosine": round(float(c), 3)}
                         for u, t, c in list(zip(held_out, transcripts, cos))[:8]]}


def train_speech(config: SpeechTrainConfig) -> dict:
    seed_everything(config.seed)
    rng = random.Random(config.seed)
    device = pick_device(config.device)
    began = time.time()
    utterances, held_out = build_data(config, device, rng)
    log.info("training utterances: %d (%.1f h); held-out: %d", len(utterances),
             sum(len(u.samples) for u in utterances) / SAMPLE_RATE / 3600, len(held_out))
    texts = sorted({u.text for u in utterances} | {u.text for u in held_out})
    text_index = {t: i for i, t in enumerate(texts)}
    targets_np = text_targets(texts, config, device)
    targets = torch.from_numpy(targets_np).to(device)
    synth_minutes = (time.time() - began) / 60

    if device.type == "cuda":
        # cuDNN attention builds a plan per sequence length, costing ~100 ms of CPU per step at these
        # varied lengths (measured on the H100); the flash / memory-efficient kernels need none.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if config.init_from:  # continue training a saved model (a second session on the GPU)
        model = SpeechVectoriser.load(config.init_from)
    else:
        wav2vec2 = Wav2Vec2Model(small_wav2vec2_config(config.layers, config.hidden, config.conv_dim))
        model = SpeechVectoriser(wav2vec2, HeadConfig(text_dim=targets.shape[1], text_encoder=config.text_encoder))
    model.to(device).train()
    bank = AudioBank(utterances, device)
    utterance_text = torch.tensor([text_index[u.text] for u in utterances], device=device)
    labels = [ctc_labels(u.text) for u in utterances]
    augment = Augmenter(rng)
    batches: list[list[int]] = []

    def next_batch():
        if not batches:
            batches.extend(length_batches(bank.lengths, int(config.batch_seconds * SAMPLE_RATE), rng))
        idx = batches.pop()
        samples, mask = augment(*bank.batch(idx))
        return idx, samples, mask

    def forward(idx, samples, mask):
        ids = utterance_text[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return objective(*model(samples, mask), targets[ids], ids, [labels[i] for i in idx], config)

    total_steps = config.steps
    if config.max_train_minutes > 0:  # time a few steps (no update) and fit the schedule to the budget
        total_steps = steps_within(lambda: forward(*next_batch())["total"].backward(), device,
                                   config.max_train_minutes, config.steps)
        model.zero_grad(set_to_none=True)
    optimizer, scheduler = adamw_with_warmup(model, config.learning_rate, total_steps, config.warmup_fraction)
    history, metrics_log = [], []
    bar = tqdm(range(total_steps), desc="train speech", unit="step")
    for number in bar:
        idx, samples, mask = next_batch()
        parts = forward(idx, samples, mask)
        step(parts["total"], model, optimizer, scheduler)
        history.append(torch.stack([parts[k] for k in LOSS_PARTS]).detach())  # no host sync per step
        if number % 50 == 0 or number == total_steps - 1:
            recent = torch.stack(history[-50:]).float().mean(0).tolist()
            recent = {k: round(v, 4) for k, v in zip(LOSS_PARTS, recent)}
            metrics_log.append({"step": number, "batch": len(idx), **recent})
            bar.set_postfix(cos=recent["cosine"], ctc=recent["ctc"])
            del history[:-50]
    model.eval()
    output = Path(config.output)
    model.save(output)
    report = {"config": asdict(config), "device": str(device), "utterances": len(utterances),
              "hours": round(sum(len(u.samples) for u in utterances) / SAMPLE_RATE / 3600, 2),
              "voices": len({u.voice for u in utterances}), "texts": len(texts),
              "parameters": sum(p.numel() for p in model.parameters()), "steps": total_steps,
              "synthesis_minutes": round(synth_minutes, 1),
              "held_out_voices": held_out_report(model, held_out,
                                                 targets_np[[text_index[u.text] for u in held_out]], device),
              "minutes": round((time.time() - began) / 60, 1)}
    (output / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics_log))
    return report


def calibrate_speech(manifests: list[str], speech_encoder: str, target_false_accept: float = 0.10,
                     corpora: str = str(ASSETS_DIR / "train"), device: str = "auto") -> dict:
    """Fit the speech path's own fusion, rejector and threshold on spoken questions of training games, and
    write them into the speech model's folder (``calibration.json``).

    Each manifest is one game's labelled queries read aloud (``qa-app synth-speech``), named after the
    game: ``survivor_trader.jsonl`` is answered from ``CORPORA/kb/survivor_trader.jsonl``. Speak them with
    voices the vectoriser never trained on (flite), so the threshold holds for new players' voices.
    """
    from qa_app.audio.io import read_audio_file
    from qa_app.config import Settings
    from qa_app.engine import QAEngine
    from qa_app.kb import LabelledQuery, load_kb
    from qa_app.train.ranker import calibrate
    from qa_app.train.speech_data import read_manifest

    games: dict[str, list[LabelledQuery]] = {}
    audio: dict[str, list[np.ndarray]] = {}
    kbs = {}
    for manifest in manifests:
        npc = Path(manifest).stem
        kb_file = Path(corpora) / "kb" / f"{npc}.jsonl"
        if not kb_file.is_file():
            raise FileNotFoundError(f"{manifest}: no knowledge base {kb_file} for the game it is named after")
        kbs[npc] = load_kb(kb_file)
        lines = read_manifest(manifest)
        games[npc] = [LabelledQuery(line.get("text", ""), line.get("expected_id"), line.get("kind", "speech"))
                      for line in lines]
        audio[npc] = [read_audio_file(line["audio"]) for line in tqdm(lines, desc=f"read {npc}", unit="utt")]
    engine = QAEngine(kbs=kbs, settings=Settings(speech_encoder=speech_encoder, device=device))
    folder = engine.speech.encoder.source
    rejector, fusion, report = calibrate(engine, games, target_false_accept, audio)
    rejector.save(folder, fusion, {"calibrated_on": sorted(games), "target_false_accept": target_false_accept,
                                   "device": str(engine.speech.encoder.device)})
    log.info("speech calibration written to %s: %s", folder, report)
    return {"folder": str(folder), "calibrated_on": sorted(games), **report}
