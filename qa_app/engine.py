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
class Reading:
    """A question as the engine read it, before any model ran: what every later stage works from."""
    npc: str
    index: "NpcIndex"
    text: str                       # as the player typed it, or as the speech encoder heard it
    spelled: str                    # normalised and spell-corrected: what the models read ("": nothing to read)
    mentions: list[EntityMention]
    warnings: list[str]
    timings_ms: dict[str, float]


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
        encoder = SpeechEncoder(settings.speech_encoder, settings.device, fast_kernels=settings.fast_kernels)
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
        graphs, fast = self.settings.cuda_graphs, self.settings.fast_kernels
        self.encoder = TextEncoder(self.settings.text_encoder, self.settings.device, cuda_graphs=graphs,
                                   fast_kernels=fast)
        self.ranker = (Ranker(self.settings.ranker, self.settings.device, cpu_int8=self.settings.cpu_int8,
                              cuda_graphs=graphs, fast_kernels=fast)
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

    def read(self, npc: str, text: str) -> Reading:
        """Validate, normalise, spell-correct and find entities: everything before the models run."""
        index = self._index(npc)
        if not isinstance(text, str):
            raise QueryError("the question must be text")
        start = time.perf_counter()
        warnings = []
        said = text
        if len(said) > self.settings.max_query_chars:
            warnings.append(f"question truncated from {len(said)} to {self.settings.max_query_chars} characters")
            log.warning("npc=%s: %s", npc, warnings[-1])
            said = said[: self.settings.max_query_chars]
        if not said.strip():
            raise QueryError("the question is empty")
        return self._read(npc, index, text, said, warnings, start, "normalize")

    def read_transcript(self, npc: str, transcript: str) -> Reading:
        """What a spoken question said, read like typed text (it may be empty: nothing was understood)."""
        return self._read(npc, self._index(npc), transcript, transcript, [], time.perf_counter(), "transcript")

    def _read(self, npc: str, index: NpcIndex, text: str, said: str, warnings: list[str], start: float,
              first_stage: str) -> Reading:
        timings = {}
        normalized = normalize(said)
        timings[first_stage] = _ms(start)
        start = time.perf_counter()
        # Text with nothing to read once normalised ("???", emoji) is refused without running the models.
        spelled = index.speller.correct(normalized) if index.speller and normalized else normalized
        timings["spelling"] = _ms(start)
        start = time.perf_counter()
        mentions = index.entities.find(spelled)
        timings["entities"] = _ms(start)
        return Reading(npc, index, text, spelled, mentions, warnings, timings)

    def ask_batch(self, npc: str, texts: list[str], top_k: int | None = None) -> list[Answer]:
        """Answer several questions to one NPC with one encoder call and one ranker call."""
        total = time.perf_counter()
        readings = [self.read(npc, text) for text in texts]
        start = time.perf_counter()
        readable = [r for r in readings if r.spelled]
        vectors = self.encoder.encode([r.spelled for r in readable])
        stage_ms = {"embed": _ms(start)}
        return self._answer(readings, readable, vectors, stage_ms, total, spoken=False, top_k=top_k)

    def ask_speech(self, npc: str, samples: np.ndarray, top_k: int | None = None) -> Answer:
        return self.ask_speech_batch(npc, [samples], top_k)[0]

    def check_utterance(self, samples: np.ndarray) -> None:
        """Refuse audio too short to hold a question or longer than the configured limit."""
        limit = self.settings.max_utterance_s
        if len(samples) < SPEECH_MIN_SAMPLES:
            raise AudioError(f"utterance of {len(samples) / 16000:.2f} s is too short to be a question")
        if len(samples) > limit * 16000:
            raise AudioError(f"utterance of {len(samples) / 16000:.1f} s is longer than the {limit:g} s limit")

    def ask_speech_batch(self, npc: str, utterances: list[np.ndarray], top_k: int | None = None) -> list[Answer]:
        """Answer spoken questions (float32 mono 16 kHz, one per utterance) with one speech-encoder call.

        The speech vector goes straight to recall in the text space; the encoder's CTC transcript, spelled
        against the KB, is what the ranker reads, what entities are found in, and what the player is shown.
        """
        self._index(npc)
        speech = self.speech
        total = time.perf_counter()
        for samples in utterances:
            self.check_utterance(samples)
        start = time.perf_counter()
        stage_ms = {}
        if speech.transcriber is not None:
            transcripts = [speech.transcriber.transcribe(u) for u in utterances]
            stage_ms["transcribe"] = _ms(start)
        else:
            vectors, transcripts = speech.encoder.encode(utterances)
            stage_ms["embed"] = _ms(start)
        readings = [self.read_transcript(npc, t) for t in transcripts]
        readable = readings
        if speech.transcriber is not None:  # the text path from here: embed what was heard
            readable = [r for r in readings if r.spelled]
            start = time.perf_counter()
            vectors = self.encoder.encode([r.spelled for r in readable])
            stage_ms["embed"] = _ms(start)
        return self._answer(readings, readable, vectors, stage_ms, total, spoken=True, top_k=top_k)

    def _answer(self, readings: list[Reading], readable: list[Reading], vectors: np.ndarray,
                stage_ms: dict[str, float], total: float, spoken: bool, top_k: int | None) -> list[Answer]:
        """From query vectors on, for a batch: recall, rank, fuse, decide. ``readable``: readings with vectors."""
        start = time.perf_counter()
        shortlists = [self.shortlist(r, v) for r, v in zip(readable, vectors)]
        stage_ms["recall"] = _ms(start)
        start = time.perf_counter()
        logit_lists = self.score([r.spelled for r in readable],
                                 [self.passages(r, s) for r, s in zip(readable, shortlists)])
        ranked = {id(r): self.candidates(r, s, logits, spoken) for r, s, logits in zip(readable, shortlists, logit_lists)}
        stage_ms["rank"] = _ms(start)
        start = time.perf_counter()
        answers = [self.decide(r, ranked.get(id(r), []), spoken, top_k, stage_ms) for r in readings]
        stage_ms["reject"] = _ms(start)
        for answer in answers:
            answer.timings_ms.update(reject=stage_ms["reject"], total=_ms(total))
        return answers

    def shortlist(self, reading: Reading, vector: np.ndarray) -> list[tuple[int, int, float, float]]:
        """Recall: the best KB entries for a query vector as (entry, question, question cos, answer cos)."""
        scores, ids = search(reading.index.index, vector[None, :], self.settings.recall_k)
        hits = [(int(q), float(c)) for q, c in zip(ids[0], scores[0]) if q >= 0]
        return reading.index.shortlist(vector, hits, self.settings.rank_k)

    def passages(self, reading: Reading, shortlist: list[tuple[int, int, float, float]]) -> list[str]:
        """What the ranker reads for each shortlisted entry."""
        return [reading.index.passage(qid, self.passage_mode) for _, qid, _, _ in shortlist]

    def score(self, queries: list[str], passages: list[list[str]]) -> list[np.ndarray]:
        """Ranker logits per query for its passages (zeros when no ranker is loaded)."""
        if not queries:
            return []
        if self.ranker is None:
            return [np.zeros(len(p), dtype=np.float32) for p in passages]
        return self.ranker.score_lists(queries, passages)

    def candidates(self, reading: Reading, shortlist: list[tuple[int, int, float, float]], logits: np.ndarray,
                   spoken: bool) -> list[Candidate]:
        """The shortlist scored by the fusion of ranker logit and recall cosines, best first."""
        fusion = self.speech.fusion if spoken else self.fusion
        index = reading.index
        feats = np.array([[logit, cq, ca] for logit, (_, _, cq, ca) in zip(logits, shortlist)]).reshape(-1, 3)
        final = fusion.score(feats) if fusion else feats[:, 1] + ANSWER_WEIGHT * feats[:, 2]
        candidates = [Candidate(index.kb.entries[e].id, index.original_questions[qid], index.kb.entries[e].answer,
                                cq, ca, float(logit), float(score))
                      for (e, qid, cq, ca), logit, score in zip(shortlist, logits, final)]
        candidates.sort(key=lambda c: -c.rank_score)
        return candidates

    def decide(self, reading: Reading, candidates: list[Candidate], spoken: bool, top_k: int | None,
               stage_ms: dict[str, float]) -> Answer:
        """Accept the best candidate if its calibrated confidence reaches the threshold, else refuse."""
        rejector = self.speech.rejector if spoken else self.rejector
        threshold = self.speech_threshold if spoken else self.threshold
        confidence = self._confidence(candidates, rejector) if candidates else 0.0
        rejected = confidence < threshold
        return Answer(
            npc=reading.npc, query=reading.text, normalized_query=reading.spelled,
            id=None if rejected else candidates[0].id, answer=None if rejected else candidates[0].answer,
            confidence=confidence, rejected=rejected, candidates=candidates[: top_k or len(candidates)],
            entities=reading.mentions, timings_ms={**reading.timings_ms, **stage_ms}, warnings=reading.warnings)

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

    @staticmethod
    def _confidence(candidates: list[Candidate], rejector: "Rejector | None") -> float:
        if rejector is None:
            return max(0.0, min(1.0, candidates[0].recall_score))
        return float(rejector.confidence(candidate_features(candidates))[0])
