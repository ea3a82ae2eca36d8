"""``qa-app distill``: TinyBERT-style layer-wise distillation of a teacher into a student with fewer layers.

The four TinyBERT losses (Jiao et al. 2020), weighted and summed:
- embedding layer: the student's embedding output (BERT: word + position + type after LayerNorm; wav2vec2: the
  convolutional feature encoder's normalised output) against the teacher's, through a learned projection where
  the widths differ;
- attention matrices: each student layer's attention distributions against its mapped teacher layer's, as a
  KL divergence per query row over real tokens (the probabilities are what transformers exposes; the KL form,
  as in MiniLM, needs no rescaling across sequence lengths, where an MSE on probabilities shrinks as 1/length);
- hidden states: each student layer's output against its mapped teacher layer's, projected where widths differ;
- output: the ranker's scores (listwise KL within each candidate list and MSE on the logits, which keeps their
  absolute scale for rejection) or the speech vectoriser's vector (1 - cosine) and CTC distributions (KL).
The true labels (the ranker's relevance labels; the text target and characters for speech) are added with
their own weight, as TinyBERT's task stage does with its hard labels.

MSEs are divided by the teacher's mean square: pre-norm residual streams grow with depth, and a raw MSE would
let the deepest layer outweigh all others.

Students start from the teacher: its embeddings, heads and the mapped layers' weights; a narrower wav2vec2
convolutional front end starts fresh and learns from the embedding-layer loss.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qa_app.models.loading import ASSETS_DIR, pick_device, resolve_model
from qa_app.train.loop import adamw_with_warmup, seed_everything, step, steps_within

log = logging.getLogger(__name__)

DISTILL_REPORT = "distill_report.json"


# ---------------------------------------------------------------------------------------------------------
# Layer mapping and student construction


def uniform_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """TinyBERT's uniform strategy: student layer m (1-based) learns from teacher layer round(m * N / M)."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student needs 1..{teacher_layers} layers (the teacher's), not {student_layers}")
    return [round((m + 1) * teacher_layers / student_layers) for m in range(student_layers)]


def parse_layer_map(spec: str, teacher_layers: int, student_layers: int) -> list[int]:
    """"2,4,6": the teacher layer (1-based) each student layer learns from; empty: uniform."""
    if not spec:
        return uniform_layer_map(teacher_layers, student_layers)
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"layer map {spec!r}: comma-separated teacher layer numbers, e.g. '2,4,6'") from None
    if len(layers) != student_layers:
        raise ValueError(f"layer map {spec!r} names {len(layers)} teacher layers for a {student_layers}-layer student")
    if any(not 1 <= x <= teacher_layers for x in layers) or layers != sorted(set(layers)):
        raise ValueError(f"layer map {spec!r}: increasing teacher layers within 1..{teacher_layers}")
    return layers


def student_state(teacher_state: dict[str, torch.Tensor], layer_prefix: str, layer_map: list[int],
                  fresh_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The teacher's weights renumbered for the student: student layer m takes teacher layer layer_map[m].

    Teacher layers not in the map are dropped, as are weights under ``fresh_prefixes`` (parts the student
    reshapes and learns anew).
    """
    source_of = {teacher - 1: student for student, teacher in enumerate(layer_map)}
    state = {}
    for key, value in teacher_state.items():
        if key.startswith(fresh_prefixes):
            continue
        if key.startswith(layer_prefix):
            number, rest = key[len(layer_prefix):].split(".", 1)
            if int(number) not in source_of:
                continue
            key = f"{layer_prefix}{source_of[int(number)]}.{rest}"
        state[key] = value.clone()
    return state


def bert_student(teacher, layer_map: list[int]):
    """A BertForSequenceClassification with len(layer_map) layers, started from the teacher's weights."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layer_map)
    # No dropout: it would add noise to every layer-matching target (the teacher runs without it).
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    student = type(teacher)(config)
    state = student_state(teacher.state_dict(), "bert.encoder.layer.", layer_map)
    student.load_state_dict(state, strict=True)
    return student


def speech_student(teacher, layer_map: list[int], conv_dim: int = 0):
    """A SpeechVectoriser with len(layer_map) transformer layers (and conv_dim channels in its front end, 0:
    the teacher's), started from the teacher's weights where the shapes allow."""
    from transformers import Wav2Vec2Model

    from qa_app.models.speech_encoder import SpeechVectoriser

    config = copy.deepcopy(teacher.wav2vec2.config)
    config.num_hidden_layers = len(layer_map)
    # No dropout (see bert_student); SpecAugment's time masks stay: recovering the teacher's view of masked
    # frames is useful practice.
    config.hidden_dropout = config.attention_dropout = config.activation_dropout = config.feat_proj_dropout = 0.0
    fresh: tuple[str, ...] = ()
    if conv_dim and conv_dim != config.conv_dim[0]:
        config.conv_dim = [conv_dim] * len(config.conv_dim)
        fresh = ("wav2vec2.feature_extractor.", "wav2vec2.feature_projection.")
    student = SpeechVectoriser(Wav2Vec2Model(config), teacher.head_config)
    state = student_state(teacher.state_dict(), "wav2vec2.encoder.layers.", layer_map, fresh)
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(fresh) for k in missing):
        raise RuntimeError(f"student does not fit the teacher: missing {missing}, unexpected {unexpected}")
    return student


# ---------------------------------------------------------------------------------------------------------
# The TinyBERT losses


@dataclass
class LayerOutputs:
    """What the losses read from one forward pass (teacher or student)."""
    embedding: torch.Tensor         # [batch, positions, embedding width]
    hidden: list[torch.Tensor]      # per layer, its output [batch, positions, hidden]
    attentions: list[torch.Tensor]  # per layer [batch, heads, positions, positions], rows sum to 1
    mask: torch.Tensor              # [batch, positions] True on real tokens / frames


class Projections(nn.Module):
    """TinyBERT's learned W_e and W_h: student widths into the teacher's (identity where they agree)."""

    def __init__(self, student_embedding: int, teacher_embedding: int, student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.embedding = (nn.Linear(student_embedding, teacher_embedding) if student_embedding != teacher_embedding
                          else nn.Identity())
        self.hidden = nn.Linear(student_hidden, teacher_hidden) if student_hidden != teacher_hidden else nn.Identity()


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real positions, divided by the teacher's mean square there."""
    student, teacher = student.float()[mask], teacher.float()[mask]
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp(min=1e-6)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each real query row's attention distribution, averaged over rows and heads."""
    teacher, student = teacher.float(), student.float()
    keys = mask[:, None, None, :]  # padded keys carry no probability in either
    kl = (teacher * (teacher.clamp(min=1e-9).log() - student.clamp(min=1e-9).log())).masked_fill(~keys, 0).sum(-1)
    rows = mask[:, None, :].expand_as(kl)
    return kl[rows].mean()


def tinybert_losses(student: LayerOutputs, teacher: LayerOutputs, layer_map: list[int],
                    projections: Projections) -> dict[str, torch.Tensor]:
    """Embedding-layer, attention and hidden-state losses (the output loss is the model's own)."""
    pairs = [(m, t - 1) for m, t in enumerate(layer_map)]
    return {
        "embedding": relative_mse(projections.embedding(student.embedding), teacher.embedding, teacher.mask),
        "attention": sum(attention_kl(student.attentions[m], teacher.attentions[t], teacher.mask)
                         for m, t in pairs) / len(pairs),
        "hidden": sum(relative_mse(projections.hidden(student.hidden[m]), teacher.hidden[t], teacher.mask)
                      for m, t in pairs) / len(pairs),
    }


def bert_outputs(model, encodings: dict) -> tuple[torch.Tensor, LayerOutputs]:
    """Logits [batch] and the layer outputs of a BertForSequenceClassification (eager attention)."""
    out = model(**encodings, output_hidden_states=True, output_attentions=True)
    return out.logits[:, 0].float(), LayerOutputs(out.hidden_states[0], list(out.hidden_states[1:]),
                                                 list(out.attentions), encodings["attention_mask"].bool())


def speech_outputs(model, samples: torch.Tensor, mask: torch.Tensor):
    """(embeddings, CTC logits, frame mask) and the layer outputs of a SpeechVectoriser (eager attention).

    wav2vec2's hidden states are the residual stream before each layer, then the final LayerNorm's output:
    entry m + 1 is what layer m produced.
    """
    out = model.wav2vec2(samples, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    frames = model.frame_mask(mask, out.last_hidden_state.shape[1])
    head = model.head(out.last_hidden_state, frames)
    return head, LayerOutputs(out.extract_features, list(out.hidden_states[1:]), list(out.attentions), frames)


@dataclass
class LossWeights:
    embedding: float = 1.0
    attention: float = 1.0
    hidden: float = 1.0
    output: float = 1.0
    labels: float = 1.0   # the task's own loss on the true labels

    @classmethod
    def of(cls, config) -> "LossWeights":
        """The ``*_weight`` fields of a distillation config."""
        return cls(config.embedding_weight, config.attention_weight, config.hidden_weight, config.output_weight,
                   config.label_weight)

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self, name) * value for name, value in parts.items())


# ---------------------------------------------------------------------------------------------------------
# Ranker


@dataclass
class RankerDistillConfig:
    teacher: str = "ranker"
    text_encoder: str = "text-encoder"          # recalls the candidates each training group holds
    corpora: str = str(ASSETS_DIR / "train")
    general_chat: str = str(ASSETS_DIR / "train" / "general_chat.txt")
    output: str = str(ASSETS_DIR / "models" / "ranker-l3")
    layers: int = 3
    layer_map: str = ""                         # teacher layers (1-based) per student layer; empty: uniform
    device: str = "auto"
    seed: int = 13
    epochs: int = 2
    steps: int = 2335                           # >0: at most this many steps (the shipped student had 1.2 epochs)
    groups_per_batch: int = 32
    learning_rate: float = 1e-4                 # higher than fine-tuning: the student has far to move
    warmup_fraction: float = 0.06
    embedding_weight: float = 1.0
    attention_weight: float = 1.0
    hidden_weight: float = 1.0
    output_weight: float = 1.0
    label_weight: float = 1.0
    limit_groups: int = 0                       # >0: this many groups only (CPU smoke test)
    max_train_minutes: float = 0.0              # >0: fewer steps if the measured speed would overrun this
    # The 30k-row word table is most of a small student's weights and already tuned in the teacher: kept.
    freeze_word_embeddings: bool = True
    calibrate: bool = True                      # fit fusion, rejector and threshold afterwards (train-ranker's)


def ranker_output_loss(student: torch.Tensor, teacher: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Listwise KL to the teacher's softmax within each candidate list, plus MSE on the raw logits."""
    kl = student.new_zeros(())
    for s, t in zip(student.split(sizes), teacher.split(sizes)):
        kl = kl + nn.functional.kl_div(s.log_softmax(0), t.log_softmax(0), log_target=True, reduction="sum")
    return kl / len(sizes) + nn.functional.mse_loss(student, teacher)


def distill_ranker(config: RankerDistillConfig) -> dict:
    from transformers import AutoTokenizer, BertForSequenceClassification

    from qa_app.models.text_encoder import TextEncoder
    from qa_app.reject import Rejector
    from qa_app.train.ranker import RankerTrainConfig, ranking_loss, save_model, train_ranker
    from qa_app.train.ranker_data import CALIBRATION_GAMES, build_groups, general_questions, load_corpora

    seed_everything(config.seed)
    device = pick_device(config.device)
    began = time.time()
    source = resolve_model(config.teacher)
    _, _, calibration = Rejector.load(source)  # the student reads what the teacher was trained to read
    passage = calibration.get("passage", "question")
    max_length = int(calibration.get("max_length", 128))
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = BertForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32,
                                                            attn_implementation="eager").to(device).eval()
    layer_map = parse_layer_map(config.layer_map, teacher.config.num_hidden_layers, config.layers)
    student = bert_student(teacher, layer_map).to(device).train()
    student.bert.embeddings.word_embeddings.weight.requires_grad_(not config.freeze_word_embeddings)
    width = teacher.config.hidden_size
    projections = Projections(width, width, width, width).to(device)
    corpora = load_corpora(config.corpora)
    for game in CALIBRATION_GAMES:  # kept out of training, as for the teacher
        corpora.pop(game, None)
    encoder = TextEncoder(config.text_encoder, str(device))
    groups = build_groups(corpora, encoder, general_questions(config.general_chat), 6, config.seed, passage)
    del encoder
    if config.limit_groups:
        groups = groups[: config.limit_groups]
    log.info("distilling %d-layer ranker into %d layers %s on %d groups", teacher.config.num_hidden_layers,
             config.layers, layer_map, len(groups))

    trained = nn.ModuleList([student, projections])
    weights = LossWeights.of(config)
    use_amp = device.type == "cuda"
    rng = random.Random(config.seed)

    def losses(batch):
        enc = tokenizer([g.query for g in batch for _ in g.passages], [p for g in batch for p in g.passages],
                        padding=True, truncation="longest_first", max_length=max_length, return_tensors="pt").to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            with torch.no_grad():
                teacher_logits, teacher_layers = bert_outputs(teacher, enc)
            logits, student_layers = bert_outputs(student, enc)
        parts = tinybert_losses(student_layers, teacher_layers, layer_map, projections)
        parts["output"] = ranker_output_loss(logits, teacher_logits, [len(g.passages) for g in batch])
        parts["labels"] = ranking_loss(logits, batch, 1.0)
        return parts

    batches = [groups[start:start + config.groups_per_batch]
               for start in range(0, len(groups), config.groups_per_batch)]
    total_steps = len(batches) * config.epochs
    total_steps = min(config.steps, total_steps) if config.steps else total_steps
    if config.max_train_minutes > 0:
        probe = iter(batches * 10)
        total_steps = steps_within(lambda: weights.total(losses(next(probe))).backward(), device,
                                   config.max_train_minutes, total_steps)
        trained.zero_grad(set_to_none=True)
    optimizer, scheduler = adamw_with_warmup(trained, config.learning_rate, total_steps, config.warmup_fraction)
    history: list[dict] = []
    bar = tqdm(total=total_steps, desc=f"distill ranker ({config.layers} layers)", unit="step")
    for epoch in range(math.ceil(total_steps / len(batches))):
        rng.shuffle(batches)
        for batch in batches[: total_steps - bar.n]:
            parts = losses(batch)
            loss = weights.total(parts)
            step(loss, trained, optimizer, scheduler)
            bar.update(1)
            if bar.n % 20 == 0 or bar.n == total_steps:
                record = {"step": bar.n, "epoch": epoch + 1, "loss": round(loss.item(), 4),
                          **{k: round(v.item(), 4) for k, v in parts.items()}}
                history.append(record)
                bar.set_postfix(loss=record["loss"], out=record["output"])
    bar.close()
    student.eval()
    output = Path(config.output)
    student.config._attn_implementation = "sdpa"  # eager was only needed for the attention maps
    save_model(student, tokenizer, output)
    report = {"config": asdict(config), "device": _device_name(device), "teacher": config.teacher,
              "teacher_layers": teacher.config.num_hidden_layers, "student_layers": config.layers,
              "layer_map": layer_map, "parameters": sum(p.numel() for p in student.parameters()),
              "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
              "training_groups": len(groups), "steps": total_steps,
              "minutes": round((time.time() - began) / 60, 1)}
    _write_metrics(output, report, history)
    # train-ranker's calibration (fusion, rejector, threshold on the held-out games) reads training_report.json.
    (output / "training_report.json").write_text(
        json.dumps({"trained_on": sorted(corpora), "distilled": report}, indent=2) + "\n")
    if config.calibrate:
        calibration = train_ranker(RankerTrainConfig(
            corpora=config.corpora, general_chat=config.general_chat, text_encoder=config.text_encoder,
            output=str(output), device=config.device, seed=config.seed, passage=passage, max_length=max_length,
            calibrate_only=True))
        report.update(threshold=calibration["threshold"], held_out=calibration["held_out"])
    return report


# ---------------------------------------------------------------------------------------------------------
# Speech vectoriser


@dataclass
class SpeechDistillConfig:
    teacher: str = "speech-encoder"
    text_encoder: str = "text-encoder"          # the text targets (true labels) and held-out report
    target_cache: str = ""                      # .npz from save_target_cache (skips loading the text encoder)
    corpora: str = str(ASSETS_DIR / "train")
    general_chat: str = str(ASSETS_DIR / "train" / "general_chat.txt")
    output: str = str(ASSETS_DIR / "models" / "speech-encoder-l3")
    layers: int = 3
    layer_map: str = ""
    conv_dim: int = 0                           # channels of the student's conv front end; 0: the teacher's
    init_from: str = ""                         # a saved student to continue distilling (a second session)
    device: str = "auto"
    seed: int = 17                              # another draw of voices than the teacher heard
    espeak_copies: int = 2
    synth_workers: int = 0
    limit_texts: int = 0
    steps: int = 6000
    batch_seconds: float = 480.0
    learning_rate: float = 5e-4
    warmup_fraction: float = 0.03
    max_train_minutes: float = 0.0              # >0: fewer steps if the measured speed would overrun this
    embedding_weight: float = 1.0
    attention_weight: float = 1.0
    hidden_weight: float = 1.0
    output_weight: float = 1.0
    label_weight: float = 0.5
    held_out_texts: int = 300


def speech_output_loss(student_head, teacher_head) -> torch.Tensor:
    """1 - cosine to the teacher's vector, plus KL to its CTC distribution on each real frame."""
    (embeddings, logits, frames), (teacher_embeddings, teacher_logits, _) = student_head, teacher_head
    cosine = (embeddings * teacher_embeddings).sum(-1).mean()
    kl = nn.functional.kl_div(logits.float().log_softmax(-1)[frames], teacher_logits.float().log_softmax(-1)[frames],
                              log_target=True, reduction="batchmean")
    return (1 - cosine) + kl


def distill_speech(config: SpeechDistillConfig) -> dict:
    from qa_app.models.speech_encoder import SpeechVectoriser
    from qa_app.train.speech import (AudioBank, Augmenter, SpeechTrainConfig, build_data, ctc_labels,
                                     held_out_report, length_batches, objective, text_targets)
    from qa_app.train.speech_data import SAMPLE_RATE

    seed_everything(config.seed)
    rng = random.Random(config.seed)
    device = pick_device(config.device)
    began = time.time()
    data_config = SpeechTrainConfig(
        corpora=config.corpora, general_chat=config.general_chat, text_encoder=config.text_encoder,
        target_cache=config.target_cache, seed=config.seed, espeak_copies=config.espeak_copies,
        synth_workers=config.synth_workers, limit_texts=config.limit_texts, held_out_texts=config.held_out_texts)
    utterances, held_out = build_data(data_config, device, rng)
    texts = sorted({u.text for u in utterances} | {u.text for u in held_out})
    text_index = {t: i for i, t in enumerate(texts)}
    targets_np = text_targets(texts, data_config, device)
    targets = torch.from_numpy(targets_np).to(device)
    log.info("distillation audio: %d utterances (%.1f h)", len(utterances),
             sum(len(u.samples) for u in utterances) / SAMPLE_RATE / 3600)

    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # see train_speech: per-shape plans cost ~100 ms a step
    teacher = SpeechVectoriser.load(config.teacher)
    teacher.wav2vec2.set_attn_implementation("eager")
    teacher.to(device).eval()
    layer_map = parse_layer_map(config.layer_map, teacher.wav2vec2.config.num_hidden_layers, config.layers)
    student = (SpeechVectoriser.load(config.init_from) if config.init_from
               else speech_student(teacher, layer_map, config.conv_dim))
    if student.wav2vec2.config.num_hidden_layers != len(layer_map):
        raise ValueError(f"{config.init_from}: {student.wav2vec2.config.num_hidden_layers} layers, not {config.layers}")
    student.wav2vec2.set_attn_implementation("eager")
    student.to(device).train()
    conv_t, conv_s = teacher.wav2vec2.config.conv_dim[-1], student.wav2vec2.config.conv_dim[-1]
    hidden = teacher.wav2vec2.config.hidden_size
    projections = Projections(conv_s, conv_t, hidden, hidden).to(device)
    trained = nn.ModuleList([student, projections])

    bank = AudioBank(utterances, device)
    utterance_text = torch.tensor([text_index[u.text] for u in utterances], device=device)
    labels = [ctc_labels(u.text) for u in utterances]
    augment = Augmenter(rng)
    weights = LossWeights.of(config)
    batches: list[list[int]] = []

    def losses():
        if not batches:
            batches.extend(length_batches(bank.lengths, int(config.batch_seconds * SAMPLE_RATE), rng))
        idx = batches.pop()
        samples, mask = augment(*bank.batch(idx))
        ids = utterance_text[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                teacher_head, teacher_layers = speech_outputs(teacher, samples, mask)
            head, student_layers = speech_outputs(student, samples, mask)
        parts = tinybert_losses(student_layers, teacher_layers, layer_map, projections)
        parts["output"] = speech_output_loss(head, teacher_head)
        parts["labels"] = objective(*head, targets[ids], ids, [labels[i] for i in idx], data_config)["total"]
        return parts

    total_steps = config.steps
    if config.max_train_minutes > 0:
        total_steps = steps_within(lambda: weights.total(losses()).backward(), device, config.max_train_minutes,
                                    config.steps)
        trained.zero_grad(set_to_none=True)
    optimizer, scheduler = adamw_with_warmup(trained, config.learning_rate, total_steps, config.warmup_fraction)
    history, recent = [], []
    bar = tqdm(range(total_steps), desc=f"distill speech ({config.layers} layers)", unit="step")
    for number in bar:
        parts = losses()
        step(weights.total(parts), trained, optimizer, scheduler)
        recent.append(torch.stack(list(parts.values())).detach())  # no host sync per step
        if number % 50 == 0 or number == total_steps - 1:
            means = torch.stack(recent[-50:]).float().mean(0).tolist()
            record = {"step": number, **{k: round(v, 4) for k, v in zip(parts, means)}}
            history.append(record)
            bar.set_postfix(out=record["output"], hid=record["hidden"])
            del recent[:-50]
    student.eval()
    output = Path(config.output)
    student.wav2vec2.config._attn_implementation = "sdpa"
    student.save(output)
    report = {"config": asdict(config), "device": _device_name(device), "teacher": config.teacher,
              "teacher_layers": teacher.wav2vec2.config.num_hidden_layers, "student_layers": config.layers,
              "layer_map": layer_map, "conv_dim": conv_s,
              "parameters": sum(p.numel() for p in student.parameters()),
              "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
              "utterances": len(utterances), "steps": total_steps,
              "held_out_voices": {
                  "student": held_out_report(student, held_out, targets_np[[text_index[u.text] for u in held_out]],
                                             device),
                  "teacher": held_out_report(teacher, held_out, targets_np[[text_index[u.text] for u in held_out]],
                                             device)},
              "minutes": round((time.time() - began) / 60, 1)}
    for part in report["held_out_voices"].values():
        part.pop("examples", None)
    _write_metrics(output, report, history)
    return report


# ---------------------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name} (torch {torch.__version__}, transformers {transformers.__version__})"


def _write_metrics(output: Path, report: dict, history: list[dict]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / DISTILL_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (output / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
