"""The ranker's training data: augmentation and groups built the way the engine recalls."""
import random

from qa_app.kb import Entry, KnowledgeBase
from qa_app.train.ranker_data import GroupBuilder, gibberish, misspell

KB = KnowledgeBase("guide", (
    Entry("revive", ("How do I revive a teammate?", "How can I pick up a downed squadmate?"), "Hold E.", ()),
    Entry("get_revived", ("How do I get revived?",), "Wait for your team.", ()),
    Entry("storm_damage", ("How much damage does the storm do?",), "2 per second.", ()),
    Entry("storm_speed", ("How fast does the storm move?",), "Slowly at first.", ()),
))


def test_misspell_changes_only_long_words_and_is_seeded():
    text = "how do i revive my teammate quickly"
    a = misspell(text, random.Random(1), rate=1.0)
    assert a != text and a.split()[:3] == ["how", "do", "i"]
    assert a == misspell(text, random.Random(1), rate=1.0)


def test_gibberish_is_never_empty():
    rng = random.Random(0)
    assert all(gibberish(rng).strip() for _ in range(200))


def test_groups_label_the_gold_entry_and_respect_exclusions(encoder):
    builder = GroupBuilder(KB, encoder, rank_k=3, passage_mode="question")
    held_out = 0  # "How do I revive a teammate?" must be matched by the entry's other phrasing
    groups = builder.groups([
        ("how do i revive a teammate", "revive", "paraphrase", {held_out}, set()),
        ("how do i revive a teammate", None, "gold_removed", set(), {0}),
        ("storm dmg per sec", "storm_damage", "paraphrase", set(), set()),
    ])
    leave_one_out, removed, storm = groups
    assert len(leave_one_out.passages) == 3 and sum(leave_one_out.labels) == 1
    gold = leave_one_out.passages[leave_one_out.labels.index(1)]
    assert gold == "how can i pick up a downed squadmate"
    assert removed.labels == [0, 0, 0] and "how can i pick up a downed squadmate" not in removed.passages
    assert storm.labels.count(1) == 1
    assert storm.passages[storm.labels.index(1)] == "how much damage does the storm do"


def test_answer_passages_carry_the_answer(encoder):
    builder = GroupBuilder(KB, encoder, rank_k=2, passage_mode="question_answer")
    group = builder.groups([("storm speed", "storm_speed", "terse", set(), set())])[0]
    assert any(p == "how fast does the storm move | slowly at first" for p in group.passages)
