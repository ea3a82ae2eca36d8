"""Training data for the speech vectoriser: varied text, spoken by many synthetic voices.

- Text: every KB question and labelled player query of the training games (all kinds, refusals too: they
  are spoken to NPCs as well), and general English chat lines. Never the bundled NPCs: those are the
  held-out evaluation.
- Voices: espeak-ng voices x variants x speed x pitch (a few variants are held out of training for
  evaluation), and piper's neural "joe" voice at varied speed and noise scales.
- Audio manifests: JSONL lines ``{"audio": path relative to the manifest, "text": str}`` (the eval
  manifests also carry ``expected_id``), so audio made elsewhere (another machine, another engine) is
  used the same way.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qa_app.audio.synth import ESPEAK_VARIANTS, ESPEAK_VOICES, EspeakVoice, PiperVoiceStyle
from qa_app.kb import KnowledgeBaseError, jsonl_objects, load_kb, load_queries
from qa_app.text.normalize import normalize

SAMPLE_RATE = 16_000
# Held out of training: evaluation speaks with these, so "held-out voices" is a measured claim.
HELD_OUT_ESPEAK_VARIANTS = ("f4", "klatt3", "Storm", "linda", "quincy", "Annie", "norbert")
HELD_OUT_ESPEAK_VOICES = ("en-029",)
TRAIN_ESPEAK_VARIANTS = tuple(v for v in ESPEAK_VARIANTS if v not in HELD_OUT_ESPEAK_VARIANTS)
TRAIN_ESPEAK_VOICES = tuple(v for v in ESPEAK_VOICES if v not in HELD_OUT_ESPEAK_VOICES)


@dataclass(frozen=True)
class Utterance:
    text: str            # what is said
    voice: str           # the synthesiser voice's name (for the metrics log and held-out checks)
    samples: np.ndarray  # float32 mono at 16 kHz


def training_texts(corpora: str | Path, general_chat: str | Path | None) -> list[str]:
    """Unique spoken-style texts: KB questions and player queries of every training game, chat lines."""
    corpora = Path(corpora)
    texts: list[str] = []
    for kb_file in sorted((corpora / "kb").glob("*.jsonl")):
        texts += [q for e in load_kb(kb_file).entries for q in e.questions]
        query_file = corpora / "queries" / kb_file.name
        if query_file.is_file():
            # Typo queries are typed, not spoken: their clean form is what a player would say.
            texts += [q.clean or q.query for q in load_queries(query_file) if q.kind != "gibberish"]
    if general_chat and Path(general_chat).is_file():
        texts += [line.strip() for line in Path(general_chat).read_text(encoding="utf-8").splitlines()]
    seen: set[str] = set()
    unique = []
    for text in texts:
        key = normalize(text)
        if key and len(key) <= 200 and key not in seen:
            seen.add(key)
            unique.append(text)
    return unique


def random_espeak_voice(rng: random.Random, voices=TRAIN_ESPEAK_VOICES, variants=TRAIN_ESPEAK_VARIANTS) -> EspeakVoice:
    return EspeakVoice(voice=rng.choice(voices), variant=rng.choice(variants),
                       words_per_minute=rng.randint(120, 210), pitch=rng.randint(20, 80),
                       pitch_range=rng.randint(20, 90))


def random_piper_style(rng: random.Random) -> PiperVoiceStyle:
    return PiperVoiceStyle(length_scale=rng.uniform(0.8, 1.3), noise_scale=rng.uniform(0.4, 0.9),
                           noise_w_scale=rng.uniform(0.5, 1.0))


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    import torch
    import torchaudio

    if rate == SAMPLE_RATE:
        return samples.astype(np.float32)
    return torchaudio.functional.resample(torch.from_numpy(samples), rate, SAMPLE_RATE).numpy()


_ESPEAK = None


def _espeak_job(job: tuple[str, EspeakVoice]) -> tuple[str, str, np.ndarray]:
    """One synthesis in a worker process (libespeak-ng keeps global state: one instance per process)."""
    global _ESPEAK
    from qa_app.audio.synth import Espeak

    if _ESPEAK is None:
        _ESPEAK = Espeak()
    text, voice = job
    samples = to_16k(_ESPEAK.synthesize(text, voice), _ESPEAK.sample_rate)
    return text, voice.name, (np.clip(samples, -1, 1) * 32767).astype(np.int16)


def synthesize_espeak(texts: list[str], copies: int, seed: int, workers: int,
                      voices=TRAIN_ESPEAK_VOICES, variants=TRAIN_ESPEAK_VARIANTS) -> list[Utterance]:
    """Each text spoken ``copies`` times, each time by a freshly drawn voice, in parallel processes."""
    import multiprocessing

    import torch
    from tqdm import tqdm

    rng = random.Random(seed)
    jobs = [(t, random_espeak_voice(rng, voices, variants)) for t in texts for _ in range(copies)]
    torch.set_num_threads(1)
    context = multiprocessing.get_context("fork")
    with context.Pool(workers) as pool:
        results = list(tqdm(pool.imap(_espeak_job, jobs, chunksize=64), total=len(jobs), desc="espeak", unit="utt"))
    return [Utterance(text, voice, samples.astype(np.float32) / 32767) for text, voice, samples in results]


def synthesize_piper(texts: list[str], seed: int) -> list[Utterance]:
    """Each text once by piper's "joe" voice at a random speed and expressiveness."""
    from tqdm import tqdm

    from qa_app.audio.synth import Piper

    rng = random.Random(seed)
    piper = Piper()
    out = []
    for text in tqdm(texts, desc="piper", unit="utt"):
        style = random_piper_style(rng)
        out.append(Utterance(text, style.name, to_16k(piper.synthesize(text, style), piper.sample_rate)))
    return out


FLITE_VOICES = ("kal16", "slt", "rms", "awb")


def synthesize_flite(texts: list[str], seed: int) -> list[Utterance]:
    """Each text once by a random voice of CMU flite, a third engine no model trains on (``apt install flite``)."""
    import subprocess
    import tempfile

    import soundfile as sf

    rng = random.Random(seed)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "utt.wav"
        for text in texts:
            voice = rng.choice(FLITE_VOICES)
            subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True, capture_output=True)
            samples, rate = sf.read(wav, dtype="float32")
            out.append(Utterance(text, f"flite:{voice}", to_16k(samples, rate)))
    return out


def write_manifest(utterances: list[Utterance], folder: str | Path, name: str, subtype: str = "OPUS",
                   extra: list[dict] | None = None) -> Path:
    """Audio files plus ``name.jsonl`` in ``folder``; OGG/Opus keeps a few hours of speech in tens of MB."""
    import soundfile as sf

    folder = Path(folder)
    (folder / name).mkdir(parents=True, exist_ok=True)
    manifest = folder / f"{name}.jsonl"
    suffix = ".ogg" if subtype in ("OPUS", "VORBIS") else ".flac"
    with manifest.open("w", encoding="utf-8") as out:
        for i, u in enumerate(utterances):
            relative = f"{name}/{i:06d}{suffix}"
            fmt = "OGG" if suffix == ".ogg" else "FLAC"
            sf.write(folder / relative, u.samples, SAMPLE_RATE, format=fmt, subtype=subtype)
            line = {"audio": relative, "text": u.text, "voice": u.voice, **((extra or [{}] * len(utterances))[i])}
            out.write(json.dumps(line) + "\n")
    return manifest


def read_manifest(path: str | Path) -> list[dict]:
    """Manifest lines with ``audio`` resolved against the manifest's folder."""
    path = Path(path)
    lines = []
    for number, line in jsonl_objects(path):
        if not isinstance(line, dict) or not isinstance(line.get("audio"), str):
            raise KnowledgeBaseError(f"{path.name}:{number}: expected an object with an 'audio' path")
        line["audio"] = str(path.parent / line["audio"])
        lines.append(line)
    return lines


def load_manifest_audio(path: str | Path) -> list[Utterance]:
    from qa_app.audio.io import read_audio_file

    return [Utterance(line.get("text", ""), line.get("voice", "manifest"), read_audio_file(line["audio"]))
            for line in read_manifest(path)]


def spoken_query_set(queries_file: str | Path, folder: str | Path, name: str, engines: tuple[str, ...],
                     seed: int, limit: int = 0) -> Path:
    """A labelled query set read aloud: a manifest of ``{"audio", "text", "expected_id", "kind", "voice"}``.

    Typo queries are spoken in their clean form and gibberish is left out (nobody says keyboard mash).
    engines: any of "flite" (an engine no model trains on), "espeak-held-out" (voices and variants kept
    out of training), "espeak", "piper"; queries are dealt round-robin between them.
    """
    rng = random.Random(seed)
    queries = [q for q in load_queries(queries_file) if q.kind != "gibberish"]
    rng.shuffle(queries)
    if limit:
        queries = queries[:limit]
    texts = [q.clean or q.query for q in queries]
    utterances: list[Utterance | None] = [None] * len(queries)
    for k, engine in enumerate(engines):
        picked = list(range(k, len(queries), len(engines)))
        chunk = [texts[i] for i in picked]
        if engine == "flite":
            made = synthesize_flite(chunk, seed + k)
        elif engine == "piper":
            made = synthesize_piper(chunk, seed + k)
        elif engine in ("espeak", "espeak-held-out"):
            held = engine == "espeak-held-out"
            rng_voice = random.Random(seed + k)
            made = synthesize_espeak(chunk, 1, rng_voice.randint(0, 10**6), workers=2,
                                     voices=ESPEAK_VOICES if held else TRAIN_ESPEAK_VOICES,
                                     variants=HELD_OUT_ESPEAK_VARIANTS if held else TRAIN_ESPEAK_VARIANTS)
        else:
            raise ValueError(f"unknown speech engine {engine!r}")
        for i, u in zip(picked, made):
            utterances[i] = u
    kept = [(q, u) for q, u in zip(queries, utterances) if u is not None]
    return write_manifest([u for _, u in kept], folder, name,
                          extra=[{"expected_id": q.expected_id, "kind": q.kind} for q, _ in kept])
