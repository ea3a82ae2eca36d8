"""Training data for the ranker: groups of (player question, candidate KB questions, labels).

The aim is a ranker that works on knowledge bases it never saw, so the data teaches general skills,
not any one KB:
- paraphrase matching: labelled player queries and leave-one-out KB questions against the entry's
  *other* phrasings;
- hard negatives: the candidates are what the bi-encoder recalls, so close entries of the same game
  ("revive a teammate" vs "get revived") are the negatives;
- refusal: labelled out-of-scope queries, questions of other games and general chat asked of this KB,
  gibberish, and "gold removed" copies (the right entry is taken out of the KB, so the nearest
  remaining entries are same-world questions the KB cannot answer).
Candidates are chosen exactly as at inference (normalise, spell, embed, nearest questions, one per entry).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qa_app.engine import NpcIndex
from qa_app.kb import KnowledgeBase, LabelledQuery, load_kb, load_queries
from qa_app.models.text_encoder import TextEncoder
from qa_app.retrieval.index import search
from qa_app.text.normalize import normalize

_KEYBOARD_NEIGHBOURS = {
    "q": "wa", "w": "qes", "e": "wrd", "r": "etf", "t": "ryg", "y": "tuh", "u": "yij", "i": "uok", "o": "ipl",
    "p": "ol", "a": "qsz", "s": "adwx", "d": "sfec", "f": "dgrv", "g": "fhtb", "h": "gjyn", "j": "hkum",
    "k": "jlio", "l": "kp", "z": "xas", "x": "zcsd", "c": "xvdf", "v": "cbfg", "b": "vngh", "n": "bmhj",
    "m": "nk",
}


# Training games that no model trains on: the encoder reports on them, the ranker's fusion, rejector and
# threshold are fitted on them. Different genres, so the operating point is not one game's.
CALIBRATION_GAMES = ("survivor_trader", "clinic_director", "noir_informant")


@dataclass
class Group:
    query: str              # as the ranker sees it at inference: normalised and spelled
    passages: list[str]     # normalised KB questions, one per candidate entry
    labels: list[int]       # 1 where that candidate's entry answers the query
    source: str             # what kind of anchor made it (for the metrics log)


@dataclass
class Corpus:
    kb: KnowledgeBase
    queries: list[LabelledQuery]


def load_corpora(folder: str | Path) -> dict[str, Corpus]:
    """``folder/kb/NAME.jsonl`` with ``folder/queries/NAME.jsonl`` for each game."""
    folder = Path(folder)
    corpora = {}
    for kb_file in sorted((folder / "kb").glob("*.jsonl")):
        query_file = folder / "queries" / kb_file.name
        queries = load_queries(query_file) if query_file.is_file() else []
        corpora[kb_file.stem] = Corpus(load_kb(kb_file), queries)
    if not corpora:
        raise FileNotFoundError(f"{folder}: no kb/*.jsonl training corpora")
    return corpora


def misspell(text: str, rng: random.Random, rate: float = 0.25) -> str:
    """Realistic typing slips (swap, drop, double, neighbouring key) in some words of four letters or more."""
    words = text.split()
    for i, word in enumerate(words):
        if len(word) < 4 or not word.isalpha() or rng.random() > rate:
            continue
        p = rng.randrange(1, len(word) - 1)
        op = rng.choice(("swap", "drop", "double", "key"))
        if op == "swap":
            word = word[:p] + word[p + 1] + word[p] + word[p + 2:]
        elif op == "drop":
            word = word[:p] + word[p + 1:]
        elif op == "double":
            word = word[:p] + word[p] + word[p:]
        else:
            word = word[:p] + rng.choice(_KEYBOARD_NEIGHBOURS.get(word[p], word[p])) + word[p + 1:]
        words[i] = word
    return " ".join(words)


def gibberish(rng: random.Random) -> str:
    """Keyboard mash and random letter runs, the way bored players type."""
    style = rng.random()
    if style < 0.4:
        return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
                        for _ in range(rng.randint(1, 4)))
    if style < 0.7:
        row = rng.choice(("qwertyuiop", "asdfghjkl", "zxcvbnm"))
        start = rng.randrange(0, len(row) - 3)
        return row[start:start + rng.randint(3, len(row) - start)] * rng.randint(1, 2)
    return rng.choice(string.ascii_lowercase) * rng.randint(3, 9)


def general_questions(path: str | Path | None) -> list[str]:
    if path is None or not Path(path).is_file():
        return []
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class GroupBuilder:
    """Makes groups for one KB, shortlisting candidates exactly as the engine does (``NpcIndex``)."""

    def __init__(self, kb: KnowledgeBase, encoder: TextEncoder, rank_k: int, passage_mode: str,
                 recall_k: int = 48) -> None:
        self.kb = kb
        self.encoder = encoder
        self.rank_k, self.recall_k, self.passage_mode = rank_k, recall_k, passage_mode
        self.index = NpcIndex(kb, encoder)
        self.question_vectors = encoder.encode(self.index.questions)  # to place a missed gold entry
        self.entry_number = {e.id: n for n, e in enumerate(kb.entries)}

    def groups(self, anchors: list[tuple[str, str | None, str, set[int], set[int]]],
               force_gold: bool = True) -> list[Group]:
        """anchors: (text, expected id, source, excluded question numbers, excluded entry numbers)."""
        texts = [self.index.speller.correct(normalize(a[0])) for a in anchors]
        keep = [i for i, t in enumerate(texts) if t]
        vectors = self.encoder.encode([texts[i] for i in keep])
        scores, ids = search(self.index.index, vectors, self.recall_k + 8)
        out = []
        for vector, row_scores, row_ids, i in zip(vectors, scores, ids, keep):
            _, expected, source, no_questions, no_entries = anchors[i]
            hits = [(int(q), float(c)) for q, c in zip(row_ids, row_scores) if q >= 0 and q not in no_questions]
            chosen = self.index.shortlist(vector, hits[: self.recall_k], self.rank_k, no_questions, no_entries)
            gold = self.entry_number.get(expected) if expected else None
            if gold is not None and force_gold and gold not in {c[0] for c in chosen}:
                allowed = [q for q in np.flatnonzero(self.index.owner == gold) if q not in no_questions]
                if not allowed:
                    continue
                cosines = self.question_vectors[allowed] @ vector
                best = int(np.argmax(cosines))
                answer_cos = float(self.index.answer_vectors[gold] @ vector)
                chosen = chosen[: self.rank_k - 1] + [(gold, int(allowed[best]), float(cosines[best]), answer_cos)]
            if not chosen:
                continue
            out.append(Group(texts[i], [self.index.passage(qid, self.passage_mode) for _, qid, _, _ in chosen],
                             [int(e == gold) for e, _, _, _ in chosen], source))
        return out


def build_groups(corpora: dict[str, Corpus], encoder: TextEncoder, other_questions: list[str],
                 rank_k: int, seed: int, passage_mode: str = "question", gold_removed_rate: float = 0.35, typo_copies: int = 1,
                 foreign_per_kb: int = 150) -> list[Group]:
    """All training groups for these games."""
    rng = random.Random(seed)
    foreign = {name: [q.query for q in c.queries if q.expected_id] for name, c in corpora.items()}
    groups: list[Group] = []
    for name, corpus in tqdm(corpora.items(), desc="ranker data", unit="game"):
        builder = GroupBuilder(corpus.kb, encoder, rank_k, passage_mode)
        anchors: list[tuple[str, str | None, str, set[int], set[int]]] = []
        positives: list[tuple[str, str, set[int]]] = []
        for q in corpus.queries:
            if q.expected_id is None:
                anchors.append((q.query, None, f"reject_{q.kind}", set(), set()))
            elif q.expected_id in builder.entry_number:
                positives.append((q.query, q.expected_id, set()))
        qid = 0
        for entry in corpus.kb.entries:
            ids = list(range(qid, qid + len(entry.questions)))
            qid += len(entry.questions)
            if len(ids) < 2:
                continue
            # The held-out phrasing must be matched by the entry's other phrasings.
            for held_out, text in zip(ids, entry.questions):
                positives.append((text, entry.id, {held_out}))
        for text, expected, excluded in positives:
            anchors.append((text, expected, "paraphrase", excluded, set()))
            for _ in range(typo_copies):
                anchors.append((misspell(text, rng), expected, "typo", excluded, set()))
            if rng.random() < gold_removed_rate:
                anchors.append((text, None, "gold_removed", set(), {builder.entry_number[expected]}))
        others = [t for n, texts in foreign.items() if n != name for t in texts]
        for text in rng.sample(others, min(foreign_per_kb, len(others))):
            anchors.append((text, None, "other_game", set(), set()))
        for text in rng.sample(other_questions, min(foreign_per_kb, len(other_questions))):
            anchors.append((text, None, "general_chat", set(), set()))
        for _ in range(foreign_per_kb // 5):
            anchors.append((gibberish(rng), None, "gibberish", set(), set()))
        groups += builder.groups(anchors)
    rng.shuffle(groups)
    return groups
