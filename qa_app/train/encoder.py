"""``qa-app train-encoder``: adapt the MiniLM bi-encoder to how players ask game NPCs things.

all-MiniLM-L6-v2 already knows general paraphrase; what it lacks is the game-FAQ register (slang, terse
fragments, long rambles, misspellings) against designer-written questions. A short contrastive fine-tune
on the training games teaches that while keeping the general space: in-batch negatives plus one hard
negative per pair (the nearest *wrong* entry of the same game), a low learning rate and few epochs.
The bundled NPCs and the calibration game are never trained on.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, BertModel

from qa_app.models.loading import ASSETS_DIR, pick_device, resolve_model
from qa_app.models.text_encoder import TextEncoder, mean_pool
from qa_app.text.normalize import normalize
from qa_app.train.loop import adamw_with_warmup, seed_everything, step
from qa_app.train.ranker_data import CALIBRATION_GAMES, load_corpora, misspell

log = logging.getLogger(__name__)


@dataclass
class EncoderTrainConfig:
    corpora: str = str(ASSETS_DIR / "train")
    held_out_games: tuple[str, ...] = CALIBRATION_GAMES  # reported, never trained on (the ranker calibrates on them)
    base_model: str = "all-MiniLM-L6-v2"
    output: str = str(ASSETS_DIR / "models" / "text-encoder")
    device: str = "auto"
    seed: int = 13
    epochs: int = 2
    batch_size: int = 128
    learning_rate: float = 2e-5
    warmup_fraction: float = 0.1
    scale: float = 20.0                      # inverse temperature of the contrastive softmax
    max_length: int = 64
    typo_copies: int = 1


@dataclass
class Pair:
    anchor: str
    positive: str
    hard_negative: str
    key: tuple[str, str]      # (game, entry id): pairs of the same entry must not be each other's negatives


def make_pairs(config: EncoderTrainConfig, encoder: TextEncoder) -> list[Pair]:
    """(player question, another phrasing or the answer of its entry, a question of a wrong entry).

    The wrong entry is one the base encoder ranks highest for that very question: the confusion to unlearn.
    """
    rng = random.Random(config.seed)
    corpora = load_corpora(config.corpora)
    for game in config.held_out_games:
        corpora.pop(game, None)
    pairs: list[Pair] = []
    for game, corpus in tqdm(corpora.items(), desc="encoder pairs", unit="game"):
        entries = corpus.kb.entries
        texts = [[normalize(q) for q in e.questions] + [normalize(e.answer)] for e in entries]
        questions = [(i, normalize(q)) for i, e in enumerate(entries) for q in e.questions]
        owner = np.array([i for i, _ in questions])
        question_vectors = encoder.encode([q for _, q in questions])
        number = {e.id: i for i, e in enumerate(entries)}
        anchors: list[tuple[str, int, int | None]] = []  # (text, entry, index of the phrasing to skip)
        for q in corpus.queries:
            if q.expected_id in number:
                anchors.append((normalize(q.query), number[q.expected_id], None))
        for i, entry in enumerate(entries):
            if len(entry.questions) > 1:
                anchors += [(normalize(question), i, j) for j, question in enumerate(entry.questions)]
        sims = encoder.encode([a for a, _, _ in anchors]) @ question_vectors.T  # [anchors, questions]
        for (text, i, skip), row in zip(anchors, sims):
            options = [t for j, t in enumerate(texts[i]) if j != skip]
            wrong = [int(q) for q in np.argsort(-row) if owner[q] != i][:3]
            for variant in [text] + [misspell(text, rng) for _ in range(config.typo_copies)]:
                negative = questions[rng.choice(wrong)][1]
                pairs.append(Pair(variant, rng.choice(options), negative, (game, entries[i].id)))
    rng.shuffle(pairs)
    return pairs


def train_encoder(config: EncoderTrainConfig) -> dict:
    seed_everything(config.seed)
    device = pick_device(config.device)
    began = time.time()
    source = resolve_model(config.base_model)
    pairs = make_pairs(config, TextEncoder(config.base_model, str(device)))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertModel.from_pretrained(source, add_pooling_layer=False, dtype=torch.float32).to(device).train()
    steps = math.ceil(len(pairs) / config.batch_size) * config.epochs
    optimizer, scheduler = adamw_with_warmup(model, config.learning_rate, steps, config.warmup_fraction)

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=config.max_length,
                          return_tensors="pt").to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model(**batch).last_hidden_state
        return torch.nn.functional.normalize(mean_pool(hidden.float(), batch["attention_mask"]), dim=-1)

    rng = random.Random(config.seed)
    history = []
    bar = tqdm(total=steps, desc="train encoder", unit="step")
    for epoch in range(config.epochs):
        rng.shuffle(pairs)
        for start in range(0, len(pairs), config.batch_size):
            batch = pairs[start:start + config.batch_size]
            anchors = embed([p.anchor for p in batch])                                   # [b, dim]
            targets = embed([p.positive for p in batch] + [p.hard_negative for p in batch])  # [2b, dim]
            logits = config.scale * anchors @ targets.T
            keys = [p.key for p in batch]
            # Another pair of the same entry is no negative: mask it out (its own positive stays).
            same = torch.tensor([[a == b and i != j for j, b in enumerate(keys)] for i, a in enumerate(keys)],
                                device=device)
            logits[:, : len(batch)] = logits[:, : len(batch)].masked_fill(same, float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch), device=device))
            step(loss, model, optimizer, scheduler)
            bar.update(1)
            if bar.n % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
                history.append({"step": bar.n, "loss": round(loss.item(), 4)})
    bar.close()
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    model.eval().to(torch.float16).save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    report = {"config": asdict(config), "pairs": len(pairs), "device": str(device),
              "loss_history": history[-10:],
              "recall_top1": {"base": recall_top1(config, config.base_model, device),
                              "trained": recall_top1(config, str(output), device)},
              "minutes": round((time.time() - began) / 60, 1)}
    (output / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def recall_top1(config: EncoderTrainConfig, encoder: str, device: torch.device) -> dict[str, float]:
    """Top-1 of recall alone (no ranker) on the held-out game and the bundled NPCs."""
    from qa_app.config import Settings
    from qa_app.engine import QAEngine
    from qa_app.evaluate import evaluate
    from qa_app.kb import load_kb, load_queries

    sets = {game: (Path(config.corpora) / "kb", Path(config.corpora) / "queries") for game in config.held_out_games
            if (Path(config.corpora) / "kb" / f"{game}.jsonl").is_file()}
    for kb_file in sorted((ASSETS_DIR / "kb").glob("*.jsonl")):
        sets[kb_file.stem] = (ASSETS_DIR / "kb", ASSETS_DIR / "eval")
    engine = None
    result = {}
    for npc, (kb_dir, query_dir) in sets.items():
        kb = load_kb(kb_dir / f"{npc}.jsonl")
        if engine is None:
            engine = QAEngine(kbs={npc: kb}, settings=Settings(text_encoder=encoder, ranker=None, device=str(device)))
        else:
            engine.reload(kb)
        metrics = evaluate(engine, npc, load_queries(query_dir / f"{npc}.jsonl"), batch_size=256)
        result[npc] = round(metrics["in_scope_top1"], 4)
    return result
