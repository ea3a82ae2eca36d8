"""Text normalisation: unicode, case, punctuation and whitespace, the same for KB text and queries."""
from __future__ import annotations

import re
import unicodedata

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "`": "'", "\u00b4": "'",
                         "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})
# Keep letters, digits, apostrophes inside words, and the dot/hyphen inside tokens such as ".50" or "k-47".
_DROP = re.compile(r"[^\w\s'.\-]+")
_LOOSE = re.compile(r"(?<![\w])['.\-]+|['.\-]+(?![\w])")
_REPEATS = re.compile(r"(\w)\1{3,}")
_SPACE = re.compile(r"\s+")
_TOKEN = re.compile(r"[\w][\w'.\-]*")


def normalize(text: str) -> str:
    """Canonical form of a player's text: NFKC, casefolded, punctuation dropped, single spaces.

    Letters repeated more than three times ("pleeeease") are cut to two, as players stretch words.
    """
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    text = text.casefold()
    text = _DROP.sub(" ", text)
    text = _LOOSE.sub(" ", text)
    text = _REPEATS.sub(r"\1\1", text)
    return _SPACE.sub(" ", text).strip()


def tokens(text: str) -> list[str]:
    """Word tokens of already-normalised text."""
    return _TOKEN.findall(text)
