"""Normalisation, spelling correction and entity recognition, each on its own."""
from qa_app.kb import Entry, KnowledgeBase
from qa_app.text.entities import EntityRecognizer, aliases
from qa_app.text.normalize import normalize, tokens
from qa_app.text.spelling import SpellingCorrector

KB = KnowledgeBase("guide", (
    Entry("sniper", ("Where can I find the Longshot sniper rifle?",), "Supply drops on Ashfall Island.",
          ("weapons",), ("Longshot .50", "Ashfall Island")),
    Entry("heal", ("What does a Medkit do?",), "Restores full health.", ("items",), ("Medkit",)),
    Entry("viper", ("Is the K-47 Viper good?",), "Yes.", ("weapons",), ("K-47 Viper", "The Storm")),
))


def test_normalize_folds_unicode_case_punctuation_and_space():
    assert normalize("  Wh\u00e9re's   the\tLONGSHOT?!?  ") == "wh\u00e9re's the longshot"
    assert normalize("\uff37\uff28\uff21\uff34") == "what"          # full-width letters (NFKC)
    assert normalize("it\u2019s a \u201cmedkit\u201d") == "it's a medkit"
    assert normalize("k-47 viper, .50 cal...") == "k-47 viper 50 cal"
    assert normalize("pleeeeease help") == "pleease help"
    assert normalize("?!...") == ""
    assert tokens("it's a k-47") == ["it's", "a", "k-47"]


def test_spelling_prefers_the_games_own_words():
    speller = SpellingCorrector(KB)
    assert speller.correct("wher is the longshto snipr on ashfal") == "where is the longshot sniper on ashfall"
    assert speller.correct("what does a medkti do") == "what does a medkit do"


def test_spelling_leaves_known_short_and_numeric_words_alone():
    speller = SpellingCorrector(KB)
    for text in ("bp worth it lol", "k-47 viper", "is 50 cal good", "gg ez"):
        assert speller.correct(text) == text


def test_spelling_expands_chat_spellings_unless_the_game_uses_the_word():
    speller = SpellingCorrector(KB)
    assert speller.correct("wat does a medkit do") == "what does a medkit do"
    assert speller.correct("wer is the longshot pls") == "where is the longshot please"
    assert speller.correct("press r to reload") == "press r to reload"   # single letters are keys
    game = KnowledgeBase("raider", (Entry("dat", ("What is a DAT file?",), "A data tape.", (), ("DAT",)),))
    assert SpellingCorrector(game).correct("wat is a dat") == "what is a dat"


def test_entity_aliases_drop_articles_and_codes():
    assert {"longshot 50", "longshot"} <= aliases("Longshot .50")
    assert {"the storm", "storm"} <= aliases("The Storm")


def test_entities_are_found_fuzzily_with_their_entries():
    found = EntityRecognizer(KB).find(normalize("is the longshto better than a k47 viper on ashfal island"))
    names = {m.name: m for m in found}
    assert set(names) == {"Longshot .50", "K-47 Viper", "Ashfall Island"}
    assert names["Longshot .50"].entry_ids == ("sniper",)
    assert names["Ashfall Island"].text == "ashfal island"


def test_entities_ignore_unrelated_words():
    assert EntityRecognizer(KB).find(normalize("how do i cook pasta")) == []
