"""Knowledge bases: one JSONL file per NPC, one entry per line, validated on load.

Every error names the file and the line, so a game designer can fix the data without reading code:
``KnowledgeBaseError: guard.jsonl:17: entry 'medkit' has no answer``.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_KEYS = ("id", "questions", "answer", "tags")
OPTIONAL_KEYS = ("entities",)


class KnowledgeBaseError(ValueError):
    """A knowledge-base file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Entry:
    id: str
    questions: tuple[str, ...]
    answer: str
    tags: tuple[str, ...] = ()
    entities: tuple[str, ...] = ()


@dataclass(frozen=True)
class KnowledgeBase:
    npc: str
    entries: tuple[Entry, ...]
    source: Path | None = None
    by_id: dict[str, Entry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {e.id: e for e in self.entries})

    def __len__(self) -> int:
        return len(self.entries)


def _fail(path: Path, line: int, message: str) -> KnowledgeBaseError:
    return KnowledgeBaseError(f"{path.name}:{line}: {message}")


def jsonl_objects(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; errors name the file and line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _fail(path, data[: err.start].count(b"\n") + 1, f"not valid UTF-8 (byte {err.start})") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _fail(path, number, f"bad JSON: {err.msg} (column {err.colno})") from None
        yield number, value


def _string_list(path: Path, line: int, entry_id: str, key: str, value, *, allow_empty: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, line, f"entry {entry_id!r}: '{key}' must be a list of strings")
    items = tuple(v.strip() for v in value)
    if any(not v for v in items):
        raise _fail(path, line, f"entry {entry_id!r}: '{key}' contains an empty string")
    if not items and not allow_empty:
        raise _fail(path, line, f"entry {entry_id!r} has no {key}")
    return items


def parse_entry(path: Path, line: int, obj) -> Entry:
    if not isinstance(obj, dict):
        raise _fail(path, line, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise _fail(path, line, f"missing key(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise _fail(path, line, f"unknown key(s) {', '.join(unknown)}")
    entry_id = obj["id"]
    if not isinstance(entry_id, str) or not entry_id.strip():
        raise _fail(path, line, "'id' must be a non-empty string")
    entry_id = entry_id.strip()
    answer = obj["answer"]
    if not isinstance(answer, str):
        raise _fail(path, line, f"entry {entry_id!r}: 'answer' must be a string")
    if not answer.strip():
        raise _fail(path, line, f"entry {entry_id!r} has no answer")
    return Entry(
        id=entry_id,
        questions=_string_list(path, line, entry_id, "questions", obj["questions"], allow_empty=False),
        answer=answer.strip(),
        tags=_string_list(path, line, entry_id, "tags", obj["tags"], allow_empty=True),
        entities=_string_list(path, line, entry_id, "entities", obj.get("entities", []), allow_empty=True),
    )


def load_kb(path: str | Path, npc: str | None = None) -> KnowledgeBase:
    """Load and validate one NPC's knowledge base; the NPC name defaults to the file stem."""
    path = Path(path)
    if not path.is_file():
        raise KnowledgeBaseError(f"{path}: no such knowledge-base file")
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for number, obj in jsonl_objects(path):
        entry = parse_entry(path, number, obj)
        if entry.id in seen:
            raise _fail(path, number, f"duplicate id {entry.id!r} (first on line {seen[entry.id]})")
        seen[entry.id] = number
        entries.append(entry)
    if not entries:
        raise KnowledgeBaseError(f"{path.name}: the knowledge base has no entries")
    return KnowledgeBase(npc=npc or path.stem, entries=tuple(entries), source=path)


def load_kb_dir(directory: str | Path) -> dict[str, KnowledgeBase]:
    """Load every ``*.jsonl`` in a folder: one NPC per file, named by the file stem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise KnowledgeBaseError(f"{directory}: no such knowledge-base folder")
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise KnowledgeBaseError(f"{directory}: no *.jsonl knowledge bases in this folder")
    return {f.stem: load_kb(f) for f in files}


@dataclass(frozen=True)
class LabelledQuery:
    query: str
    expected_id: str | None
    kind: str
    clean: str | None = None


def load_queries(path: str | Path) -> list[LabelledQuery]:
    """Load a labelled query set: ``{"query", "expected_id": str|null, "kind"}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise KnowledgeBaseError(f"{path}: no such query file")
    queries = []
    for number, obj in jsonl_objects(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("query"), str) or "expected_id" not in obj:
            raise _fail(path, number, "expected {'query': str, 'expected_id': str|null, 'kind': str}")
        expected = obj["expected_id"]
        if expected is not None and not isinstance(expected, str):
            raise _fail(path, number, "'expected_id' must be a string or null")
        queries.append(LabelledQuery(obj["query"], expected, str(obj.get("kind", "unknown")), obj.get("clean")))
    return queries
