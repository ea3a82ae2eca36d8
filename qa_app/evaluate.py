"""Evaluation of an NPC's answers against a labelled query set, and the plain bi-encoder baseline."""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from qa_app.engine import QAEngine
from qa_app.kb import LabelledQuery
from qa_app.models.text_encoder import TextEncoder
from qa_app.retrieval.index import build_index, search

BASELINE_TARGET_FAR = 0.10


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def score_decisions(queries: list[LabelledQuery], top_ids: list[str], confidences: np.ndarray,
                    threshold: float) -> dict:
    """The metric keys of ``qa-app eval`` from each query's top candidate and confidence."""
    confidences = np.asarray(confidences, dtype=np.float64)
    in_scope = np.array([q.expected_id is not None for q in queries])
    correct_top = np.array([q.expected_id is not None and q.expected_id == t for q, t in zip(queries, top_ids)])
    accepted = confidences >= threshold
    n_in, n_out = int(in_scope.sum()), int((~in_scope).sum())
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for q, ok_top, acc in zip(queries, correct_top, accepted):
        per_kind[q.kind].append(bool(acc and ok_top) if q.expected_id is not None else bool(not acc))
    return {
        "queries": len(queries),
        "in_scope": n_in,
        "must_reject": n_out,
        "threshold": threshold,
        # Decisions right over all queries: accepted with the labelled entry, or refused when it must be.
        "accuracy": float(((correct_top & accepted) | (~in_scope & ~accepted)).mean()) if len(queries) else float("nan"),
        "in_scope_top1": float(correct_top[in_scope].mean()) if n_in else float("nan"),
        "answered_correctly": float((correct_top & accepted)[in_scope].mean()) if n_in else float("nan"),
        "false_accept_rate": float(accepted[~in_scope].mean()) if n_out else float("nan"),
        "false_reject_rate": float((~accepted)[in_scope].mean()) if n_in else float("nan"),
        "auroc": auroc(confidences[in_scope], confidences[~in_scope]),
        "per_kind_accuracy": {k: float(np.mean(v)) for k, v in sorted(per_kind.items())},
    }


def evaluate(engine: QAEngine, npc: str, queries: list[LabelledQuery], batch_size: int = 1) -> dict:
    """Run every query through the engine. batch_size 1 measures single-question latency."""
    top_ids, confidences, latencies = [], [], []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        began = time.perf_counter()
        answers = engine.ask_batch(npc, [q.query for q in chunk])
        latencies.append((time.perf_counter() - began) * 1000.0 / len(chunk))
        top_ids += [a.candidates[0].id if a.candidates else None for a in answers]
        confidences += [a.confidence for a in answers]
    metrics = score_decisions(queries, top_ids, np.array(confidences), engine.threshold)
    metrics.update(typo_metrics(engine, npc, queries, dict(zip([q.query for q in queries], top_ids))))
    # The same numbers at the threshold that gives 10% false accepts on this set, for a like-for-like
    # comparison with the baseline (which is always scored that way).
    at_far = score_decisions(queries, top_ids, np.array(confidences), threshold_at_far(queries, np.array(confidences)))
    metrics["at_10pct_far"] = {k: at_far[k] for k in ("threshold", "answered_correctly", "false_accept_rate")}
    metrics["latency_p50_ms"] = float(np.percentile(latencies, 50))
    metrics["latency_p99_ms"] = float(np.percentile(latencies, 99))
    metrics["latency_batch_size"] = batch_size
    return metrics


def typo_metrics(engine: QAEngine, npc: str, queries: list[LabelledQuery], top_by_query: dict) -> dict:
    """Top-1 on misspelt queries against the same queries written cleanly (where the set gives them)."""
    pairs = [q for q in queries if q.kind == "typo" and q.clean and q.expected_id]
    if not pairs:
        return {}
    clean_answers = engine.ask_batch(npc, [q.clean for q in pairs])
    typo_ok = np.mean([top_by_query[q.query] == q.expected_id for q in pairs])
    clean_ok = np.mean([bool(a.candidates) and a.candidates[0].id == q.expected_id
                        for a, q in zip(clean_answers, pairs)])
    return {"typo_top1": float(typo_ok), "typo_clean_top1": float(clean_ok), "typo_pairs": len(pairs)}


def evaluate_baseline(engine: QAEngine, npc: str, queries: list[LabelledQuery],
                      model: str = "all-MiniLM-L6-v2") -> dict:
    """Plain bi-encoder cosine: stock all-MiniLM-L6-v2, the query as typed, nearest KB question, accept above
    a cosine threshold.

    The threshold is the one that gives a 10% false-accept rate on this very set: an upper bound for
    the baseline, since a deployment cannot tune on its test questions.
    """
    kb = engine.knowledge_base(npc)
    encoder = TextEncoder(model, engine.settings.device)
    questions = [(entry.id, q) for entry in kb.entries for q in entry.questions]
    index = build_index(encoder.encode([q for _, q in questions]), "flat")
    scores, ids = search(index, encoder.encode([q.query for q in queries]), 1)
    top_ids = [questions[int(i)][0] for i in ids[:, 0]]
    cosines = scores[:, 0].astype(np.float64)
    metrics = score_decisions(queries, top_ids, cosines, threshold_at_far(queries, cosines))
    metrics["threshold_rule"] = f"cosine at {BASELINE_TARGET_FAR:.0%} false accepts on this set"
    return metrics


def threshold_at_far(queries: list[LabelledQuery], confidences: np.ndarray, far: float = BASELINE_TARGET_FAR) -> float:
    """The lowest threshold that accepts at most `far` of the must-reject queries of this set."""
    rejects = np.sort([c for c, q in zip(confidences, queries) if q.expected_id is None])
    if len(rejects) == 0:
        return 0.5
    allowed = int(np.floor(far * len(rejects)))  # may accept this many
    return float(np.nextafter(rejects[len(rejects) - allowed - 1], np.inf)) if allowed < len(rejects) else 0.0


def evaluate_speech(engine: QAEngine, npc: str, manifest: str, batch_size: int = 16,
                    asr_baseline: str | None = None) -> dict:
    """Spoken questions of a manifest (``{"audio", "expected_id", "text"?, "kind"?}`` lines) through the
    speech path, scored with the text eval's keys; where lines give the text that was said, also the cosine
    between the speech vector and that text's embedding, and the CTC transcript's word error rate.

    asr_baseline: a whisper model (``whisper-base``, the bundled one) whose transcripts are scored through
    the text path and through plain bi-encoder cosine, side by side (``metrics["asr_baseline"]``).
    """
    from qa_app.audio.io import read_audio_file
    from qa_app.text.normalize import normalize
    from qa_app.train.speech_data import read_manifest

    lines = read_manifest(manifest)
    queries = [LabelledQuery(line.get("text") or line["audio"], line.get("expected_id"), line.get("kind", "speech"))
               for line in lines]
    waves = [read_audio_file(line["audio"], engine.settings.max_utterance_s) for line in lines]
    top_ids, confidences, latencies, transcripts = [], [], [], []
    for start in range(0, len(waves), batch_size):
        began = time.perf_counter()
        answers = engine.ask_speech_batch(npc, waves[start:start + batch_size])
        latencies.append((time.perf_counter() - began) * 1000.0 / len(answers))
        top_ids += [a.candidates[0].id if a.candidates else None for a in answers]
        confidences += [a.confidence for a in answers]
        transcripts += [a.query for a in answers]
    metrics = score_decisions(queries, top_ids, np.array(confidences), engine.speech_threshold)
    at_far = score_decisions(queries, top_ids, np.array(confidences), threshold_at_far(queries, np.array(confidences)))
    metrics["at_10pct_far"] = {k: at_far[k] for k in ("threshold", "answered_correctly", "false_accept_rate")}
    metrics["latency_ms_per_utterance"] = float(np.mean(latencies))
    said = [(i, normalize(line["text"])) for i, line in enumerate(lines) if line.get("text")]
    if said and engine.speech.encoder is not None:
        vectors, _ = engine.speech.encoder.encode([waves[i] for i, _ in said])
        cosines = (vectors * engine.encoder.encode([t for _, t in said])).sum(-1)
        metrics["text_cosine"] = {"median": float(np.median(cosines)), "p10": float(np.percentile(cosines, 10)),
                                  "p90": float(np.percentile(cosines, 90)), "mean": float(cosines.mean())}
    if said:
        metrics["transcript_wer"] = word_error_rate([t for _, t in said], [transcripts[i] for i, _ in said])
    if asr_baseline:
        metrics["asr_baseline"] = evaluate_asr_baseline(engine, npc, queries, waves, asr_baseline,
                                                        [line.get("text") for line in lines])
    return metrics


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Word edits (after the engine's normalisation) over reference words."""
    from rapidfuzz.distance import Levenshtein

    from qa_app.text.normalize import normalize

    pairs = [(normalize(r).split(), normalize(h).split()) for r, h in zip(references, hypotheses)]
    return sum(Levenshtein.distance(r, h) for r, h in pairs) / max(1, sum(len(r) for r, _ in pairs))


def evaluate_asr_baseline(engine: QAEngine, npc: str, queries: list[LabelledQuery], waves: list[np.ndarray],
                          model: str, said: list[str | None]) -> dict:
    """Whisper transcripts answered two ways: by our whole text path (calibrated threshold), and by plain
    bi-encoder cosine (threshold at 10% false accepts on this set, as the text baseline)."""
    from qa_app.audio.asr import WhisperTranscriber

    transcriber = WhisperTranscriber(model)
    began = time.perf_counter()
    heard = [transcriber.transcribe(w) for w in waves]
    asr_ms = (time.perf_counter() - began) * 1000.0 / max(1, len(waves))
    as_typed = [LabelledQuery(text or ".", q.expected_id, q.kind) for text, q in zip(heard, queries)]
    pipeline = evaluate(engine, npc, as_typed, batch_size=16)
    result = {"model": model, "asr_ms_per_utterance": asr_ms,
              "text_path": {k: pipeline[k] for k in ("in_scope_top1", "answered_correctly", "false_accept_rate",
                                                     "false_reject_rate", "auroc", "at_10pct_far")},
              "bi_encoder": evaluate_baseline(engine, npc, as_typed)}
    references = [(s, h) for s, h in zip(said, heard) if s]
    if references:
        result["wer"] = word_error_rate([s for s, _ in references], [h for _, h in references])
    result["examples"] = [{"said": s, "heard": h} for s, h in list(zip(said, heard))[:5]]
    return result
