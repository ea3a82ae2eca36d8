import json

import pytest

from conftest import ASSETS, write_jsonl
from qa_app.kb import KnowledgeBaseError, load_kb, load_kb_dir, load_queries

GOOD = json.dumps({"id": "medkit", "questions": ["what does a medkit do"], "answer": "Heals you.", "tags": ["items"]})


def entry(**fields):
    base = {"id": "x", "questions": ["q?"], "answer": "a", "tags": []}
    base.update(fields)
    return json.dumps(base)


def test_loads_entries_and_names_npc_after_file(tmp_path):
    kb = load_kb(write_jsonl(tmp_path / "guard.jsonl", [GOOD, entry(id="y", entities=["Medkit"])]))
    assert kb.npc == "guard"
    assert [e.id for e in kb.entries] == ["medkit", "y"]
    assert kb.by_id["y"].entities == ("Medkit",)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "bad JSON"),
    (entry(answer=""), "has no answer"),
    (entry(answer="   "), "has no answer"),
    (entry(questions=[]), "has no questions"),
    (entry(questions=["ok", ""]), "empty string"),
    (entry(questions="just a string"), "list of strings"),
    (entry(tags=[1, 2]), "list of strings"),
    (entry(id=5), "'id' must be a non-empty string"),
    (json.dumps({"id": "x", "questions": ["q"], "tags": []}), "missing key(s) answer"),
    (entry(colour="red"), "unknown key(s) colour"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_entry_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "guard.jsonl", [GOOD, bad_line])
    with pytest.raises(KnowledgeBaseError) as err:
        load_kb(path)
    assert str(err.value).startswith("guard.jsonl:2: ")
    assert message in str(err.value)


def test_duplicate_id_points_at_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "guard.jsonl", [GOOD, entry(id="other"), GOOD])
    with pytest.raises(KnowledgeBaseError, match=r"guard.jsonl:3: duplicate id 'medkit' \(first on line 1\)"):
        load_kb(path)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "guard.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"id": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(KnowledgeBaseError, match=r"guard.jsonl:2: not valid UTF-8"):
        load_kb(path)


def test_empty_and_missing_files_are_errors(tmp_path):
    with pytest.raises(KnowledgeBaseError, match="no entries"):
        load_kb(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(KnowledgeBaseError, match="no such knowledge-base file"):
        load_kb(tmp_path / "missing.jsonl")
    empty_folder = tmp_path / "no_kbs"
    empty_folder.mkdir()
    with pytest.raises(KnowledgeBaseError, match="no \\*.jsonl"):
        load_kb_dir(empty_folder)
    with pytest.raises(KnowledgeBaseError, match="no such knowledge-base folder"):
        load_kb_dir(tmp_path / "missing")


def test_folder_serves_one_npc_per_file(tmp_path):
    write_jsonl(tmp_path / "guard.jsonl", [GOOD])
    write_jsonl(tmp_path / "smith.jsonl", [entry(id="sword")])
    assert sorted(load_kb_dir(tmp_path)) == ["guard", "smith"]


def test_bundled_kbs_meet_the_size_and_label_rules():
    kbs = load_kb_dir(ASSETS / "kb")
    assert len(kbs["quartermaster"]) >= 150 and len(kbs["innkeeper"]) >= 60
    for npc, kb in kbs.items():
        queries = load_queries(ASSETS / "eval" / f"{npc}.jsonl")
        assert all(q.expected_id is None or q.expected_id in kb.by_id for q in queries)
        assert sum(q.expected_id is None for q in queries) / len(queries) >= 0.30
        per_entry = {}
        for q in queries:
            if q.expected_id:
                per_entry[q.expected_id] = per_entry.get(q.expected_id, 0) + 1
        assert set(per_entry) == set(kb.by_id) and min(per_entry.values()) >= 3
