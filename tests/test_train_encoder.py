"""Contrastive pairs for the bi-encoder fine-tune."""
import json

from qa_app.train.encoder import EncoderTrainConfig, make_pairs


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_pairs_pair_a_question_with_its_own_entry_against_a_confusable_one(tmp_path, encoder):
    (tmp_path / "kb").mkdir()
    (tmp_path / "queries").mkdir()
    write(tmp_path / "kb" / "guide.jsonl", [
        {"id": "revive", "questions": ["How do I revive a teammate?", "How do I pick up my squadmate?"],
         "answer": "Hold E next to them.", "tags": []},
        {"id": "get_revived", "questions": ["How do I get revived?"], "answer": "Wait for your team.", "tags": []},
        {"id": "fish", "questions": ["Where can I fish?"], "answer": "At the lake.", "tags": []},
    ])
    write(tmp_path / "queries" / "guide.jsonl", [{"query": "help my duo is down", "expected_id": "revive",
                                                  "kind": "slang"}])
    pairs = make_pairs(EncoderTrainConfig(corpora=str(tmp_path), held_out_games=(), typo_copies=0), encoder)
    assert len(pairs) == 3  # one labelled query + two leave-one-out phrasings of 'revive'
    for pair in pairs:
        assert pair.key == ("guide", "revive")
        assert pair.positive in ("how do i revive a teammate", "how do i pick up my squadmate", "hold e next to them")
        assert pair.positive != pair.anchor
        assert pair.hard_negative in ("how do i get revived", "where can i fish")
