"""Game-entity recognition: a gazetteer built from the KB's entity names, fuzzy-matched with rapidfuzz.

Players shorten and misspell names ("longshot", "k47 viper", "ashfal"), so every name also gets short
aliases (without a leading article, without trailing numbers/codes) and spans of the query are compared
with a similarity ratio rather than for equality.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from rapidfuzz import fuzz, process

from qa_app.kb import KnowledgeBase
from qa_app.text.normalize import normalize, tokens

_ARTICLES = ("the ", "a ", "an ")
_CODE = re.compile(r"^[\d.\-]+$")


@dataclass(frozen=True)
class EntityMention:
    name: str            # canonical name as written in the KB
    text: str            # the words of the query that matched
    start: int           # token offsets in the normalised query, [start, end)
    end: int
    score: float         # similarity, 0-100
    entry_ids: tuple[str, ...]


def aliases(name: str) -> set[str]:
    """Normalised forms a player might type for one entity name."""
    base = normalize(name)
    forms = {base}
    for article in _ARTICLES:
        if base.startswith(article):
            forms.add(base[len(article):])
    words = base.split()
    # "longshot 50" -> "longshot"; "k-47 viper" keeps both words, and "viper" alone is too generic to add.
    while len(words) > 1 and _CODE.match(words[-1]):
        words = words[:-1]
        forms.add(" ".join(words))
    forms.add(base.replace("-", ""))
    return {f for f in forms if len(f) >= 3}


class EntityRecognizer:
    """Finds the KB's named things in a normalised query."""

    def __init__(self, kb: KnowledgeBase, min_score: float = 85.0) -> None:
        self.min_score = min_score
        owners: dict[str, set[str]] = {}
        canonical: dict[str, str] = {}
        for entry in kb.entries:
            for name in entry.entities:
                owners.setdefault(name, set()).add(entry.id)
        self._aliases: list[tuple[str, str, int]] = []  # (alias, canonical name, words in alias)
        for name in owners:
            for alias in aliases(name):
                if alias not in canonical:
                    canonical[alias] = name
                    self._aliases.append((alias, name, len(alias.split())))
        self._owners = {name: tuple(sorted(ids)) for name, ids in owners.items()}

    def __len__(self) -> int:
        return len(self._owners)

    def find(self, text: str) -> list[EntityMention]:
        """Best non-overlapping mentions, most similar and longest first."""
        words = tokens(text)
        alias_texts = [a for a, _, _ in self._aliases]
        longest = max((n for _, _, n in self._aliases), default=0) + 1
        candidates: list[EntityMention] = []
        for width in range(1, min(longest, len(words)) + 1):
            for start in range(0, len(words) - width + 1):
                span = " ".join(words[start:start + width])
                # rapidfuzz scans every alias in C; the cut-off keeps only close ones.
                for alias, score, index in process.extract(span, alias_texts, scorer=fuzz.ratio,
                                                            score_cutoff=self.min_score, limit=3):
                    _, name, n = self._aliases[index]
                    # Short names must match exactly: a ratio over four letters means little.
                    if abs(n - width) > 1 or (len(alias) <= 4 and span != alias):
                        continue
                    candidates.append(EntityMention(name, span, start, start + width, float(score),
                                                    self._owners[name]))
        candidates.sort(key=lambda m: (-m.score, -(m.end - m.start)))
        taken: set[int] = set()
        found: list[EntityMention] = []
        for mention in candidates:
            span = set(range(mention.start, mention.end))
            if span & taken or any(m.name == mention.name for m in found):
                continue
            taken |= span
            found.append(mention)
        return sorted(found, key=lambda m: m.start)
