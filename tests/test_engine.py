"""End to end through the real models on the bundled knowledge bases."""
import pytest

from qa_app import QAEngine, QueryError, UnknownNpcError
from qa_app.config import Settings
from qa_app.kb import KnowledgeBase, load_kb

from conftest import ASSETS


def test_answers_a_plain_question_with_its_entry(engine):
    answer = engine.ask("quartermaster", "how do i pick my teammate back up when they get knocked")
    assert not answer.rejected
    assert answer.id == "qb_revive_teammate"
    assert answer.answer == engine.knowledge_base("quartermaster").by_id[answer.id].answer
    assert 0.0 <= answer.confidence <= 1.0


def test_close_entries_are_told_apart(engine):
    revive = engine.ask("quartermaster", "how do i revive my squadmate")
    revived = engine.ask("quartermaster", "i got knocked how do i get revived")
    assert revive.candidates[0].id == "qb_revive_teammate"
    assert revived.candidates[0].id == "qb_getting_revived"


def test_refuses_what_the_kb_cannot_answer(engine):
    for text in ("what's the capital of peru", "asdkjh qweoiu zxcmn", "can you give me a recipe for lasagna"):
        answer = engine.ask("quartermaster", text)
        assert answer.rejected, text
        assert answer.id is None and answer.answer is None


def test_finds_entities_and_fixes_typos(engine):
    answer = engine.ask("quartermaster", "wher do i find the longshto sniper")
    assert "longshot" in answer.normalized_query
    assert any(m.name.startswith("Longshot") for m in answer.entities)


def test_reports_per_stage_timings(engine):
    timings = engine.ask("innkeeper", "how much is a room").timings_ms
    for stage in ("normalize", "spelling", "entities", "embed", "recall", "rank", "reject", "total"):
        assert timings[stage] >= 0
    assert timings["total"] >= timings["rank"]


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_is_a_clear_error(engine, text):
    with pytest.raises(QueryError, match="empty"):
        engine.ask("quartermaster", text)


def test_punctuation_only_text_is_refused_not_crashed(engine):
    answer = engine.ask("quartermaster", "??? !!!")
    assert answer.rejected and answer.candidates == [] and answer.confidence == 0.0


def test_huge_text_is_truncated_with_a_warning(engine, caplog):
    answer = engine.ask("quartermaster", "how do i revive a teammate " * 400)  # ~10,800 characters
    assert answer.warnings and "truncated" in answer.warnings[0]
    assert "truncated" in caplog.text


def test_unknown_npc_lists_the_known_ones(engine):
    with pytest.raises(UnknownNpcError) as err:
        engine.ask("dragon", "hello")
    assert "innkeeper" in str(err.value) and "quartermaster" in str(err.value)


def test_batch_gives_the_same_answers_as_one_by_one(engine):
    texts = ["how much for a room tonight", "where can i buy a horse", "hello marta", "what does resting do"]
    batch = engine.ask_batch("innkeeper", texts)
    single = [engine.ask("innkeeper", t) for t in texts]
    assert [a.id for a in batch] == [a.id for a in single]
    assert [a.confidence for a in batch] == pytest.approx([a.confidence for a in single], abs=1e-4)


def test_reload_swaps_the_knowledge_base(engine, tmp_path):
    path = tmp_path / "smith.jsonl"
    path.write_text('{"id": "forge", "questions": ["where is the forge"], "answer": "Behind the mill.", "tags": []}\n')
    engine.reload(load_kb(path))
    assert engine.ask("smith", "where's the forge at").id == "forge"
    path.write_text('{"id": "anvil", "questions": ["can i borrow your anvil"], "answer": "No.", "tags": []}\n')
    engine.reload(load_kb(path))
    assert engine.ask("smith", "can i use the anvil").candidates[0].id == "anvil"


def test_saved_index_is_reused_only_while_the_kb_is_unchanged(tmp_path):
    from qa_app.engine import NpcIndex

    path = tmp_path / "smith.jsonl"
    path.write_text('{"id": "forge", "questions": ["where is the forge"], "answer": "Behind the mill.", "tags": []}\n')
    engine = QAEngine.from_kb_file(path, settings=Settings(device="cpu", ranker=None))
    index = engine._index("smith")
    index.save(engine.encoder, "flat")
    assert NpcIndex(load_kb(path), engine.encoder)._saved_index(load_kb(path), engine.encoder, "flat") is not None
    path.write_text(path.read_text().replace("mill", "church"))
    assert NpcIndex(load_kb(path), engine.encoder)._saved_index(load_kb(path), engine.encoder, "flat") is None


def test_speech_in_asr_mode_answers_whisper_transcripts_through_the_text_path():
    pytest.importorskip("faster_whisper", reason="the whisper speech mode needs the asr extra")
    from qa_app.audio.io import read_audio_file
    from qa_app.train.speech_data import read_manifest

    engine = QAEngine(settings=Settings(kb_dir=ASSETS / "kb", device="cpu", speech_mode="asr"))
    lines = [x for x in read_manifest(ASSETS / "eval" / "spoken" / "innkeeper.jsonl") if x["expected_id"]][:4]
    answers = engine.ask_speech_batch("innkeeper", [read_audio_file(x["audio"]) for x in lines])
    assert all(a.query and "transcribe" in a.timings_ms and "embed" in a.timings_ms for a in answers)
    typed = engine.ask_batch("innkeeper", [a.query for a in answers])
    assert [a.candidates[0].id for a in answers] == [t.candidates[0].id for t in typed]
    assert engine.speech_threshold == engine.threshold

    # The server's batched pipeline takes the same path: whisper's transcript, embedded by the text encoder.
    import asyncio

    from qa_app.runtime.pipeline import BatchedEngine

    pipeline = BatchedEngine(engine)
    try:
        batched = asyncio.run(pipeline.ask_speech("innkeeper", read_audio_file(lines[0]["audio"])))
    finally:
        pipeline.close()
    assert batched.query == answers[0].query and batched.id == answers[0].id
    assert {"speech", "embed", "rank"} <= set(batched.timings_ms)
