"""Spelling correction against the knowledge base's own vocabulary plus a general English word list.

SymSpell (symspellpy) does the edit-distance search; its bundled 82k-word English frequency list is the
general vocabulary. Words from the KB are added with a count above any English word, so a misspelt game
term ("longshto") is corrected to the game's own word rather than an English neighbour.
"""
from __future__ import annotations

import importlib.resources
from collections import Counter
from functools import lru_cache

from symspellpy import SymSpell, Verbosity

from qa_app.kb import KnowledgeBase
from qa_app.text.normalize import normalize, tokens

_ENGLISH_LIST = "frequency_dictionary_en_82_765.txt"
# Words this short are too ambiguous to correct (and are often slang: "gg", "bp", "xp").
MIN_CORRECTABLE_LENGTH = 4
# Chat spellings too short or too far for edit distance ("wat" is one edit from "was", "at" and "what").
# Only unambiguous ones: single letters stay, as players name keys with them ("press r").
CHAT_SPELLINGS = {
    "wat": "what", "wut": "what", "wht": "what", "hw": "how", "wen": "when", "wer": "where", "whr": "where",
    "wich": "which", "ur": "your", "pls": "please", "plz": "please", "thx": "thanks", "ppl": "people",
    "cuz": "because", "coz": "because", "bcuz": "because", "becuz": "because", "tho": "though",
    "thru": "through", "gonna": "going to", "wanna": "want to", "gotta": "got to", "dunno": "don't know",
    "kinda": "kind of", "sorta": "sort of", "dis": "this", "dat": "that", "teh": "the", "hav": "have",
    "giv": "give", "gud": "good", "sum1": "someone", "some1": "someone", "any1": "anyone", "ne1": "anyone",
    "b4": "before", "l8r": "later", "gr8": "great", "idk": "i don't know",
}


@lru_cache(maxsize=1)
def english_frequencies() -> dict[str, int]:
    """The general English word list shipped with symspellpy: word -> corpus count."""
    words: dict[str, int] = {}
    with importlib.resources.files("symspellpy").joinpath(_ENGLISH_LIST).open(encoding="utf-8") as f:
        for line in f:
            word, _, count = line.partition(" ")
            if count.strip().isdigit():
                words[word] = int(count)
    return words


def kb_vocabulary(kb: KnowledgeBase) -> Counter[str]:
    """Every word the KB uses in its questions, answers, tags and entity names."""
    counts: Counter[str] = Counter()
    for entry in kb.entries:
        for text in (*entry.questions, entry.answer, *entry.tags, *entry.entities):
            counts.update(tokens(normalize(text)))
    return counts


@lru_cache(maxsize=1)
def _english_symspell(max_edit_distance: int) -> SymSpell:
    # Built once per process (a few seconds) and shared by every NPC's corrector.
    symspell = SymSpell(max_dictionary_edit_distance=max_edit_distance, prefix_length=7)
    for word, count in english_frequencies().items():
        symspell.create_dictionary_entry(word, count)
    return symspell


class SpellingCorrector:
    """Corrects each unknown word of a normalised query to the closest known word.

    Two dictionaries: the KB's own words (small, built per NPC) and general English (shared). The game's
    word wins whenever it is at least as close as the English one.
    """

    def __init__(self, kb: KnowledgeBase, max_edit_distance: int = 2) -> None:
        self.max_edit_distance = max_edit_distance
        self._english = _english_symspell(max_edit_distance)
        self._game = SymSpell(max_dictionary_edit_distance=max_edit_distance, prefix_length=7)
        vocabulary = kb_vocabulary(kb)
        for word, count in vocabulary.items():
            self._game.create_dictionary_entry(word, count)
        self.game_words = frozenset(vocabulary)
        self._english_words = english_frequencies()

    def is_known(self, word: str) -> bool:
        return word in self.game_words or word in self._english_words

    def correct_word(self, word: str) -> str:
        if word in CHAT_SPELLINGS and word not in self.game_words:
            return CHAT_SPELLINGS[word]
        if len(word) < MIN_CORRECTABLE_LENGTH or not word.isalpha() or self.is_known(word):
            return word
        # Longer words tolerate two edits; shorter ones one, or "ammo" would become anything.
        distance = self.max_edit_distance if len(word) >= 6 else 1
        game = self._game.lookup(word, Verbosity.TOP, max_edit_distance=distance)
        english = self._english.lookup(word, Verbosity.TOP, max_edit_distance=distance)
        if game and (not english or game[0].distance <= english[0].distance):
            return game[0].term
        return english[0].term if english else word

    def correct(self, text: str) -> str:
        """Correct a normalised text word by word; known words and short words are left alone."""
        return " ".join(self.correct_word(w) for w in text.split(" ")) if text else text
