"""The QA pipeline: text -> normalised -> spelled -> entities -> recall -> ranked -> answer or refusal."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qa_app.audio.io import AudioError
from qa_app.config import Settings
from qa_app.kb import KnowledgeBase, load_kb, load_kb_dir
from qa_app.models.ranker import Ranker
from qa_app.models.text_encoder import TextEncoder
from qa_app.reject import Fusion, Rejector, features
from qa_app.retrieval.index import build_index, load_index, save_index, search
from qa_app.text.entities import EntityMention, EntityRecognizer
from qa_app.text.normalize import normalize
from qa_app.text.spelling import SpellingCorrector

log = logging.getLogger(__name__)

# Shortlist order before ranking: question cosine plus half the answer cosine. The answer text carries
# detail the FAQ phrasings lack; on the bundled and training sets this mix lifts plain top-1 by ~3 points.
ANSWER_WEIGHT = 0.5
PASSAGE_MODES = ("question", "question_answer")
SPEECH_MIN_SAMPLES = 1600  # 0.1 s at 16 kHz: less cannot hold a question


class QueryError(ValueError):
    """The player's text cannot be answered as given (empty, or only punctuation)."""


class UnknownNpcError(KeyError):
    """No knowledge base is loaded for this NPC."""

    def __init__(self, npc: str, known: list[str]) -> None:
        super().__init__(npc)
        self.npc, self.known = npc, known

    def __str__(self) -> str:
        return f"unknown NPC {self.npc!r}; known NPCs: {', '.join(self.known) or '(none)'}"


@dataclass(frozen=True)
class Candidate:
    id: str
    question: str          # the KB question of this entry closest to the player's question
    answer: str
    recall_score: float    # bi-encoder cosine with that question
    answer_score: float    # bi-encoder cosine with the entry's answer
    ranker_logit: float    # cross-encoder logit (0 when no ranker is loaded)
    rank_score: float      # final score: fusion of the three above


@dataclass(frozen=True)
class Answer:
    npc: str
    query: str
    normalized_query: str
    id: str | None                 # the answering entry; None when rejected
    answer: str | None
    confidence: float              # calibrated probability that the top candidate answers the question
    rejected: bool
    candidates: list[Candidate]
    entities: list[EntityMention]
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class SpeechPath:
    """How spoken questions become answers, by ``Settings.speech_mode``:

    - "vectoriser": the wav2vec2 speech encoder puts the audio straight into the text space; its CTC
      transcript is what the ranker reads. Fusion and rejector calibrated on spoken questions (they differ
      from typed ones: speech vectors sit further from the KB).
    - "asr": whisper transcribes and the text path answers the transcript (the baseline, selectable where
      its accuracy matters more than its latency); the text path's own calibration applies.
    """
    encoder: "SpeechEncoder | None"
    transcriber: "WhisperTranscriber | None"
    fusion: Fusion | None
    rejector: Rejector | None

    @classmethod
    def load(cls, settings: Settings, text_fusion: Fusion | None, text_rejector: Rejector | None) -> "SpeechPath":
        if settings.speech_mode == "asr":
            from qa_app.audio.asr import WhisperTranscriber

            device = "cuda" if settings.device.startswith("cuda") else "cpu"
            return cls(None, WhisperTranscriber(settings.asr_model, device), text_fusion, text_rejector)
        if settings.speech_mode != "vectoriser":
            raise SpeechUnavailableError(f"unknown speech mode {settings.speech_mode!r}; use vectoriser or asr")
        from qa_app.models.speech_encoder import SpeechEncoder

        if not settings.speech_encoder:
            raise SpeechUnavailableError("no speech encoder is configured (QA_SPEECH_ENCODER)")
        encoder = SpeechEncoder(settings.speech_encoder, settings.device)
        if encoder.text_encoder and Path(encoder.text_encoder).name != Path(settings.text_encoder).name:
            log.warning("speech encoder %s was trained for text encoder %s, not %s: answers will suffer",
                        settings.speech_encoder, encoder.text_encoder, settings.text_encoder)
        try:
            rejector, fusion, _ = Rejector.load(encoder.source)
        except FileNotFoundError:
            log.warning("speech encoder %s has no spoken-question calibration; using the text one",
                        settings.speech_encoder)
            rejector, fusion = text_rejector, text_fusion
        return cls(encoder, None, fusion, rejector)


class SpeechUnavailableError(RuntimeError):
    """This engine has no speech encoder."""


class NpcIndex:
    """Everything built from one NPC's knowledge base: question vectors in faiss, speller, gazetteer."""

    def __init__(self, kb: KnowledgeBase, encoder: TextEncoder, index_kind: str = "flat",
                 spelling: bool = True) -> None:
        self.kb = kb
        self.original_questions: list[str] = []
        owners: list[int] = []
        for number, entry in enumerate(kb.entries):
            self.original_questions.extend(entry.questions)
            owners.extend([number] * len(entry.questions))
        self.questions = [normalize(q) for q in self.original_questions]
        self.answers = [normalize(e.answer) for e in kb.entries]
        self.owner = np.array(owners)  # [questions] -> entry number
        self.index = self._saved_index(kb, encoder, index_kind)
        if self.index is None:
            vectors = encoder.encode(self.questions, progress=len(self.questions) > 5000)
            self.index = build_index(vectors, index_kind, encoder.device)
        self.answer_vectors = encoder.encode(self.answers)  # [entries, dim]
        self.speller = SpellingCorrector(kb) if spelling else None
        self.entities = EntityRecognizer(kb)

    def passage(self, question_number: int, mode: str) -> str:
        """What the ranker reads for a candidate: its KB question, or the question and its answer."""
        if mode == "question":
            return self.questions[question_number]
        return f"{self.questions[question_number]} | {self.answers[int(self.owner[question_number])]}"

    def shortlist(self, vector: np.ndarray, hits: list[tuple[int, float]], rank_k: int,
                  skip_questions: set[int] = frozenset(), skip_entries: set[int] = frozenset()):
        """The rank_k best entries among recalled questions, as (entry, question, question cos, answer cos).

        hits: (question number, cosine) best first; each entry keeps its closest question.
        """
        best: dict[int, tuple[int, float]] = {}
        for qid, score in hits:
            entry = int(self.owner[qid])
            if qid in skip_questions or entry in skip_entries or entry in best:
                continue
            best[entry] = (qid, float(score))
        if not best:
            return []
        entries = list(best)
        answer_cos = self.answer_vectors[entries] @ vector
        scored = [(e, best[e][0], best[e][1], float(a)) for e, a in zip(entries, answer_cos)]
        scored.sort(key=lambda c: -(c[2] + ANSWER_WEIGHT * c[3]))
        return scored[:rank_k]

    @staticmethod
    def index_paths(kb_source: Path) -> tuple[Path, Path]:
        """Where ``qa-app build-index`` saves a KB's index: beside the KB file."""
        return kb_source.with_suffix(".faiss"), kb_source.with_suffix(".index.json")

    @staticmethod
    def fingerprint(kb_source: Path, encoder: TextEncoder, index_kind: str) -> dict:
        return {"kb_sha256": hashlib.sha256(kb_source.read_bytes()).hexdigest(),
                "encoder": encoder.name, "index_kind": index_kind}

    def _saved_index(self, kb: KnowledgeBase, encoder: TextEncoder, index_kind: str):
        """A saved index is reused only if it was built from these very bytes with this encoder."""
        if kb.source is None:
            return None
        index_file, meta_file = self.index_paths(kb.source)
        if not (index_file.is_file() and meta_file.is_file()):
            return None
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") != self.fingerprint(kb.source, encoder, index_kind):
            log.warning("%s is stale (KB, encoder or index kind changed); rebuilding in memory", index_file)
            return None
        index = load_index(index_file)
        if index.ntotal != len(self.questions):
            return None
        if encoder.device.type == "cuda" and index_kind == "flat":
            return build_index(index.reconstruct_n(0, index.ntotal), "flat", encoder.device)
        return index

    def save(self, encoder: TextEncoder, index_kind: str) -> Path:
        index_file, meta_file = self.index_paths(self.kb.source)
        save_index(self.index, index_file)
        meta_file.write_text(json.dumps({"fingerprint": self.fingerprint(self.kb.source, encoder, index_kind),
                                         "questions": len(self.questions)}, indent=2) + "\n")
        return index_file


def candidate_features(candidates: list[Candidate]) -> np.ndarray:
    """The rejector's features of one ranked candidate list."""
    return features(*(np.array([getattr(c, name) for c in candidates])
                      for name in ("rank_score", "recall_score", "ranker_logit", "answer_score")))


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class QAEngine:
    """Answers players' questions from NPC knowledge bases. Thread-safe for concurrent ``ask`` calls."""

    def __init__(self, kb_dir: str | Path | None = None, kbs: dict[str, KnowledgeBase] | None = None,
                 settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        if kbs is None:
            kbs = load_kb_dir(kb_dir or self.settings.kb_dir)
        self.encoder = TextEncoder(self.settings.text_encoder, self.settings.device)
        self.ranker = (Ranker(self.settings.ranker, self.settings.device, cpu_int8=self.settings.cpu_int8)
                       if self.settings.ranker else None)
        self.rejector: Rejector | None = None
        self.fusion: Fusion | None = None
        self.passage_mode = "question"
        if self.ranker:
            self.rejector, self.fusion, calibration = Rejector.load(self.ranker.source)
            self.passage_mode = calibration.get("passage", "question")
            self.ranker.max_length = int(calibration.get("max_length", self.ranker.max_length))
        self._npcs: dict[str, NpcIndex] = {}
        self._speech: SpeechPath | None = None
        self._lock = threading.Lock()
        for npc, kb in kbs.items():
            self._npcs[npc] = self._build(kb)

    @classmethod
    def from_defaults(cls, **overrides) -> "QAEngine":
        """The bundled knowledge bases and models, with ``QA_*`` environment overrides."""
        return cls(settings=Settings.from_env(**overrides))

    @classmethod
    def from_kb_file(cls, path: str | Path, npc: str | None = None, settings: Settings | None = None) -> "QAEngine":
        kb = load_kb(path, npc)
        return cls(kbs={kb.npc: kb}, settings=settings)

    def _build(self, kb: KnowledgeBase) -> NpcIndex:
        start = time.perf_counter()
        index = NpcIndex(kb, self.encoder, self.settings.index_kind, self.settings.spelling)
        log.info("indexed NPC %s: %d entries, %d questions in %.0f ms", kb.npc, len(kb),
                 len(index.questions), _ms(start))
        return index

    @property
    def npcs(self) -> list[str]:
        return sorted(self._npcs)

    @property
    def threshold(self) -> float:
        if self.settings.threshold is not None:
            return self.settings.threshold
        return self.rejector.threshold if self.rejector else 0.5

    def knowledge_base(self, npc: str) -> KnowledgeBase:
        return self._index(npc).kb

    def reload(self, kb: KnowledgeBase) -> None:
        """Swap an NPC's index atomically; asks already running finish on the old one."""
        index = self._build(kb)
        with self._lock:
            self._npcs[kb.npc] = index

    def _index(self, npc: str) -> NpcIndex:
        try:
            return self._npcs[npc]
        except KeyError:
            raise UnknownNpcError(npc, self.npcs) from None

    def ask(self, npc: str, text: str, top_k: int | None = None) -> Answer:
        return self.ask_batch(npc, [text], top_k)[0]

    def ask_batch(self, npc: str, texts: list[str], top_k: int | None = None) -> list[Answer]:
        """Answer several questions to one NPC with one encoder call and one ranker call."""
        index = self._index(npc)
        total = time.perf_counter()
        timings: dict[str, float] = {}

        start = time.perf_counter()
        warnings: list[list[str]] = []
        normalized: list[str] = []
        for text in texts:
            if not isinstance(text, str):
                raise QueryError("the question must be text")
            notes = []
            if len(text) > self.settings.max_query_chars:
                notes.append(f"question truncated from {len(text)} to {self.settings.max_query_chars} characters")
                log.warning("npc=%s: %s", npc, notes[-1])
                text = text[: self.settings.max_query_chars]
            if not text.strip():
                raise QueryError("the question is empty")
            normalized.append(normalize(text))
            warnings.append(notes)
        timings["normalize"] = _ms(start)

        # Text with nothing to read once normalised ("???", emoji) is refused without running the models.
        readable = [i for i, t in enumerate(normalized) if t]
        start = time.perf_counter()
        spelled = [index.speller.correct(t) for t in normalized] if index.speller else normalized
        timings["spelling"] = _ms(start)

        start = time.perf_counter()
        mentions = [index.entities.find(t) for t in spelled]
        timings["entities"] = _ms(start)

        start = time.perf_counter()
        vectors = self.encoder.encode([spelled[i] for i in readable]) if readable else None
        timings["embed"] = _ms(start)
        return self._answer(npc, index, texts, spelled, mentions, readable, vectors, warnings, timings, total,
                            self.fusion, self.rejector, self.threshold, top_k)

    def ask_speech(self, npc: str, samples: np.ndarray, top_k: int | None = None) -> Answer:
        return self.ask_speech_batch(npc, [samples], top_k)[0]

    def ask_speech_batch(self, npc: str, utterances: list[np.ndarray], top_k: int | None = None) -> list[Answer]:
        """Answer spoken questions (float32 mono 16 kHz, one per utterance) with one speech-encoder call.

        The speech vector goes straight to recall in the text space; the encoder's CTC transcript, spelled
        against the KB, is what the ranker reads, what entities are found in, and what the player is shown.
        """
        index = self._index(npc)
        speech = self.speech
        total = time.perf_counter()
        timings: dict[str, float] = {}
        limit = self.settings.max_utterance_s
        for samples in utterances:
            if len(samples) < SPEECH_MIN_SAMPLES:
                raise AudioError(f"utterance of {len(samples) / 16000:.2f} s is too short to be a question")
            if len(samples) > limit * 16000:
                raise AudioError(f"utterance of {len(samples) / 16000:.1f} s is longer than the {limit:g} s limit")
        start = time.perf_counter()
        if speech.transcriber is not None:
            transcripts = [speech.transcriber.transcribe(u) for u in utterances]
            timings["transcribe"] = _ms(start)
        else:
            vectors, transcripts = speech.encoder.encode(utterances)
            timings["embed"] = _ms(start)
        start = time.perf_counter()
        normalized = [normalize(t) for t in transcripts]
        spelled = [index.speller.correct(t) if index.speller and t else t for t in normalized]
        mentions = [index.entities.find(t) for t in spelled]
        timings["transcript"] = _ms(start)
        readable = list(range(len(utterances)))
        if speech.transcriber is not None:  # the text path from here: embed what was heard
            readable = [i for i, t in enumerate(spelled) if t]
            start = time.perf_counter()
            vectors = self.encoder.encode([spelled[i] for i in readable]) if readable else None
            timings["embed"] = _ms(start)
        return self._answer(npc, index, transcripts, spelled, mentions, readable, vectors,
                            [[] for _ in utterances], timings, total, speech.fusion, speech.rejector,
                            self.speech_threshold, top_k)

    @property
    def speech_threshold(self) -> float:
        """Spoken answers are accepted at this confidence: QA_SPEECH_THRESHOLD, else the speech path's own
        calibrated threshold (the text one when whisper feeds the text path)."""
        if self.settings.speech_threshold is not None:
            return self.settings.speech_threshold
        speech = self.speech
        if speech.transcriber is not None or speech.rejector is None:
            return self.threshold
        return speech.rejector.threshold

    @property
    def speech(self) -> "SpeechPath":
        """The speech encoder and its calibration, loaded on first use (text-only servers never pay)."""
        with self._lock:
            if self._speech is None:
                self._speech = SpeechPath.load(self.settings, self.fusion, self.rejector)
            return self._speech

    def _answer(self, npc: str, index: NpcIndex, texts: list[str], spelled: list[str], mentions, readable: list[int],
                vectors, warnings: list[list[str]], timings: dict[str, float], total: float,
                fusion: "Fusion | None", rejector: "Rejector | None", threshold: float,
                top_k: int | None) -> list[Answer]:
        """From query vectors on: recall, rank, fuse, decide. ``readable``: which texts have vectors."""
        start = time.perf_counter()
        shortlists = self._recall(index, vectors) if readable else []
        timings["recall"] = _ms(start)

        start = time.perf_counter()
        ranked_readable = self._rank(index, [spelled[i] for i in readable], shortlists, fusion)
        ranked: list[list[Candidate]] = [[] for _ in texts]
        for i, candidates in zip(readable, ranked_readable):
            ranked[i] = candidates
        timings["rank"] = _ms(start)

        start = time.perf_counter()
        answers = []
        for i, candidates in enumerate(ranked):
            confidence = self._confidence(candidates, rejector) if candidates else 0.0
            rejected = confidence < threshold
            answers.append(Answer(
                npc=npc, query=texts[i], normalized_query=spelled[i],
                id=None if rejected else candidates[0].id, answer=None if rejected else candidates[0].answer,
                confidence=confidence, rejected=rejected,
                candidates=candidates[: top_k or len(candidates)], entities=mentions[i],
                timings_ms=timings, warnings=warnings[i]))
        timings["reject"] = _ms(start)
        timings["total"] = _ms(total)
        return answers

    def _recall(self, index: NpcIndex, vectors: np.ndarray) -> list[list[tuple[int, int, float, float]]]:
        """Per query, the best KB entries as (entry, question, question cos, answer cos), best first."""
        scores, ids = search(index.index, vectors, self.settings.recall_k)
        return [index.shortlist(vector, [(int(q), float(c)) for q, c in zip(row_ids, row_scores) if q >= 0],
                                self.settings.rank_k)
                for vector, row_scores, row_ids in zip(vectors, scores, ids)]

    def _rank(self, index: NpcIndex, queries: list[str], shortlists: list[list[tuple[int, int, float, float]]],
              fusion: "Fusion | None") -> list[list[Candidate]]:
        if not queries:
            return []
        passages = [[index.passage(qid, self.passage_mode) for _, qid, _, _ in shortlist] for shortlist in shortlists]
        logit_lists = (self.ranker.score_lists(queries, passages) if self.ranker
                       else [np.zeros(len(p), dtype=np.float32) for p in passages])
        ranked = []
        for shortlist, logits in zip(shortlists, logit_lists):
            feats = np.array([[logit, cq, ca] for logit, (_, _, cq, ca) in zip(logits, shortlist)])
            final = fusion.score(feats) if fusion else feats[:, 1] + ANSWER_WEIGHT * feats[:, 2]
            candidates = [Candidate(index.kb.entries[e].id, index.original_questions[qid], index.kb.entries[e].answer,
                                    cq, ca, float(logit), float(score))
                          for (e, qid, cq, ca), logit, score in zip(shortlist, logits, final)]
            candidates.sort(key=lambda c: -c.rank_score)
            ranked.append(candidates)
        return ranked

    @staticmethod
    def _confidence(candidates: list[Candidate], rejector: "Rejector | None") -> float:
        if rejector is None:
            return max(0.0, min(1.0, candidates[0].recall_score))
        return float(rejector.confidence(candidate_features(candidates))[0])
