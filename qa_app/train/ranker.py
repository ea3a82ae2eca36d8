"""``qa-app train-ranker``: train the cross-encoder from the MiniLM weights, calibrate rejection, ship.

Steps, all seeded: build groups from the training games (``ranker_data``), train with a listwise loss
(the right entry against its recalled neighbours) plus a pointwise loss (absolute scores, so refusals
are learnt), save fp16 safetensors, then fit the rejector's calibration on a game kept out of training
and report the held-out metrics.
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
from transformers import AutoTokenizer, BertForSequenceClassification

from qa_app.config import Settings
from qa_app.engine import QAEngine, candidate_features
from qa_app.evaluate import evaluate
from qa_app.kb import load_kb, load_queries
from qa_app.models.loading import ASSETS_DIR, pick_device, resolve_model
from qa_app.models.text_encoder import TextEncoder
from qa_app.reject import FEATURES, Fusion, Rejector
from qa_app.train.loop import adamw_with_warmup, seed_everything, step
from qa_app.train.ranker_data import CALIBRATION_GAMES, Group, build_groups, general_questions, load_corpora

log = logging.getLogger(__name__)


@dataclass
class RankerTrainConfig:
    corpora: str = str(ASSETS_DIR / "train")
    general_chat: str = str(ASSETS_DIR / "train" / "general_chat.txt")
    # Games kept out of training (the encoder's too): the fusion, rejector and threshold are fitted on them
    # together, so the operating point reflects several unseen games rather than one.
    calibration_games: tuple[str, ...] = CALIBRATION_GAMES
    eval_kb_dir: str = str(ASSETS_DIR / "kb")     # bundled NPCs, never trained on: reported only
    eval_dir: str = str(ASSETS_DIR / "eval")
    # The ranker starts from MiniLM weights: those of the fine-tuned bi-encoder (qa-app train-encoder), whose
    # recall it also learns to re-rank. "all-MiniLM-L6-v2" for both trains from the untouched weights.
    base_model: str = "text-encoder"
    text_encoder: str = "text-encoder"
    output: str = str(ASSETS_DIR / "models" / "ranker")
    device: str = "auto"
    seed: int = 13
    rank_k: int = 6                            # candidates per training group (inference shortlists fewer)
    passage: str = "question_answer"           # what the ranker reads per candidate: question | question_answer
    epochs: int = 2
    groups_per_batch: int = 32
    learning_rate: float = 4e-5
    warmup_fraction: float = 0.1
    max_length: int = 128                      # long rambling questions put the ask last: keep it
    pointwise_weight: float = 1.0
    target_false_accept: float = 0.10          # threshold chosen for this rate on the calibration games
    limit_groups: int = 0                      # >0: train on this many groups only (CPU smoke test)
    calibrate_only: bool = False               # keep the model at `output`, refit fusion, rejector, threshold


def ranking_loss(logits: torch.Tensor, batch: list[Group], pointwise_weight: float) -> torch.Tensor:
    """Pointwise BCE on every candidate plus listwise softmax CE over each answerable group (the right
    entry as the target). logits: [candidates of the batch], in group order."""
    labels = torch.tensor([l for g in batch for l in g.labels], dtype=torch.float32, device=logits.device)
    pointwise = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    listwise, n_lists, offset = logits.new_zeros(()), 0, 0
    for g in batch:
        size = len(g.passages)
        if 1 in g.labels:
            listwise = listwise + torch.nn.functional.cross_entropy(
                logits[offset:offset + size].unsqueeze(0), torch.tensor([g.labels.index(1)], device=logits.device))
            n_lists += 1
        offset += size
    return pointwise_weight * pointwise + listwise / max(1, n_lists)


def train_model(groups: list[Group], config: RankerTrainConfig, device: torch.device):
    source = resolve_model(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32).to(device)
    model.train()
    steps_per_epoch = math.ceil(len(groups) / config.groups_per_batch)
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = adamw_with_warmup(model, config.learning_rate, total_steps, config.warmup_fraction)
    use_amp = device.type == "cuda"
    rng = random.Random(config.seed)
    history = []
    bar = tqdm(total=total_steps, desc="train ranker", unit="step")
    for epoch in range(config.epochs):
        rng.shuffle(groups)
        for start in range(0, len(groups), config.groups_per_batch):
            batch = groups[start:start + config.groups_per_batch]
            queries = [g.query for g in batch for _ in g.passages]
            passages = [p for g in batch for p in g.passages]
            enc = tokenizer(queries, passages, padding=True, truncation="longest_first",
                            max_length=config.max_length, return_tensors="pt").to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(**enc).logits[:, 0].float()
            loss = ranking_loss(logits, batch, config.pointwise_weight)
            step(loss, model, optimizer, scheduler)
            bar.update(1)
            if bar.n % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
                history.append({"step": bar.n, "epoch": epoch + 1, "loss": round(loss.item(), 4)})
    bar.close()
    model.eval()
    return model, tokenizer, history


def save_model(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    model.to(torch.float32)


def calibrate(engine: QAEngine, games: dict[str, list], target_far: float,
              audio: dict[str, list[np.ndarray]] | None = None) -> tuple[Rejector, Fusion, dict]:
    """Fit the candidate fusion, then the rejector and its threshold, on games the ranker never saw.

    games: NPC name -> its labelled queries; every NPC must be loaded in the engine.
    audio: NPC name -> the queries spoken (16 kHz, in the same order): calibrate the speech path instead,
    whose fusion and rejector are its own (the ranker reads a CTC transcript there).
    """
    queries = [q for qs in games.values() for q in qs]

    def ask_all():
        if audio is None:
            return [a for npc, qs in games.items() for a in engine.ask_batch(npc, [q.query for q in qs])]
        return [a for npc in games for start in range(0, len(audio[npc]), 32)
                for a in engine.ask_speech_batch(npc, audio[npc][start:start + 32])]

    answers = ask_all()
    lists, gold = [], []
    for q, a in zip(queries, answers):
        ids = [c.id for c in a.candidates]
        if q.expected_id in ids:
            lists.append(np.array([[c.ranker_logit, c.recall_score, c.answer_score] for c in a.candidates]))
            gold.append(ids.index(q.expected_id))
    fusion = Fusion.fit(lists, gold)
    if audio is None:
        engine.fusion = fusion
    else:
        engine.speech.fusion = fusion

    answers = ask_all()
    kept = [(q, a) for q, a in zip(queries, answers) if a.candidates]  # unreadable text is refused anyway
    feats = np.stack([candidate_features(a.candidates) for _, a in kept])
    correct = np.array([q.expected_id is not None and a.candidates[0].id == q.expected_id for q, a in kept])
    rejector = Rejector.fit(feats, correct)
    confidence = rejector.confidence(feats)
    must_reject = np.array([q.expected_id is None for q, _ in kept])
    # Lowest threshold whose false-accept rate on the calibration game stays within the target.
    candidates = np.unique(np.concatenate([[0.5], confidence]))
    ok = [t for t in candidates if (confidence[must_reject] >= t).mean() <= target_far]
    threshold = float(min(ok)) if ok else 0.5
    rejector = Rejector(rejector.weights, rejector.bias, rejector.mean, rejector.std, threshold)
    return rejector, fusion, {
        "calibration_queries": len(kept), "threshold": threshold,
        "fusion_weights": fusion.weights.round(4).tolist(),
        "calibration_false_accept": float((confidence[must_reject] >= threshold).mean())}


def train_ranker(config: RankerTrainConfig) -> dict:
    seed_everything(config.seed)
    device = pick_device(config.device)
    began = time.time()
    corpora = load_corpora(config.corpora)
    missing = [g for g in config.calibration_games if g not in corpora]
    if missing:
        raise ValueError(f"calibration games {missing} not among {sorted(corpora)}")
    calibration = {g: corpora.pop(g) for g in config.calibration_games}
    output = Path(config.output)
    report = {"config": asdict(config), "device": str(device), "trained_on": sorted(corpora)}
    if config.calibrate_only:  # keep what the training run recorded; redo calibration and held-out numbers
        report = {**json.loads((output / "training_report.json").read_text()), "recalibration": asdict(config)}
    else:
        encoder = TextEncoder(config.text_encoder, str(device))
        groups = build_groups(corpora, encoder, general_questions(config.general_chat), config.rank_k,
                              config.seed, config.passage)
        if config.limit_groups:
            groups = groups[: config.limit_groups]
        sources: dict[str, int] = {}
        for g in groups:
            sources[g.source] = sources.get(g.source, 0) + 1
        log.info("training groups: %d (%s)", len(groups), sources)
        model, tokenizer, history = train_model(groups, config, device)
        save_model(model, tokenizer, output)
        report.update(training_groups=len(groups), group_sources=sources, loss_history=history[-10:])
    # Placeholder calibration (rank by the ranker alone) so the engine can load the model to calibrate it.
    n = len(FEATURES)
    Rejector(np.zeros(n), 0.0, np.zeros(n), np.ones(n), 0.5).save(
        output, Fusion(np.array([1.0, 0.0, 0.0])), {"passage": config.passage, "max_length": config.max_length})

    # Calibrated as served: on CPU that means the INT8 ranker (Settings' default).
    settings = Settings(text_encoder=config.text_encoder, ranker=str(output), device=str(device))
    engine = QAEngine(kbs={c.kb.npc: c.kb for c in calibration.values()}, settings=settings)
    rejector, fusion, calibration_report = calibrate(
        engine, {c.kb.npc: c.queries for c in calibration.values()}, config.target_false_accept)
    report.update(calibrated_on=list(config.calibration_games), **calibration_report)
    rejector.save(output, fusion, {"passage": config.passage, "max_length": config.max_length,
                                   "trained_on": report["trained_on"],
                                   "calibrated_on": list(config.calibration_games)})

    engine.rejector = rejector
    report["held_out"] = {c.kb.npc: _summary(evaluate(engine, c.kb.npc, c.queries, batch_size=64))
                          for c in calibration.values()}
    for kb_file in sorted(Path(config.eval_kb_dir).glob("*.jsonl")):
        query_file = Path(config.eval_dir) / kb_file.name
        if query_file.is_file():
            kb = load_kb(kb_file)
            engine.reload(kb)
            report["held_out"][kb.npc] = _summary(evaluate(engine, kb.npc, load_queries(query_file), batch_size=64))
    report["minutes"] = round((time.time() - began) / 60, 1)
    (output / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _summary(metrics: dict) -> dict:
    keys = ("in_scope_top1", "answered_correctly", "false_accept_rate", "false_reject_rate", "auroc",
            "typo_top1", "typo_clean_top1")
    return {k: round(metrics[k], 4) for k in keys if k in metrics}
