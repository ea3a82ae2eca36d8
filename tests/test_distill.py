"""Distillation (qa-app distill): layer maps, students built from teachers, and the four TinyBERT losses on
tiny random models (shapes, zero when the student is the teacher, and decreasing under optimisation)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Wav2Vec2Model

from qa_app.models.speech_encoder import HeadConfig, SpeechVectoriser, small_wav2vec2_config
from qa_app.train.distill import (Projections, attention_kl, bert_outputs, bert_student,
                                  parse_layer_map, ranker_output_loss, speech_output_loss, speech_outputs,
                                  speech_student, tinybert_losses, uniform_layer_map)


def tiny_bert(layers: int = 4, seed: int = 0) -> BertForSequenceClassification:
    """Weights drawn wider than BERT's 0.02 so that each layer visibly changes its input."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=1, initializer_range=0.3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def eager(model):
    model.set_attn_implementation("eager")
    return model


def tiny_vectoriser(layers: int = 4, conv_dim: int = 32) -> SpeechVectoriser:
    torch.manual_seed(0)
    config = small_wav2vec2_config(layers=layers, hidden=64, conv_dim=conv_dim)
    config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups = 8, 4
    return SpeechVectoriser(Wav2Vec2Model(config), HeadConfig(text_dim=16)).eval()


def token_batch(rows: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    return {"input_ids": ids * mask, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}


def test_uniform_layer_map_spreads_the_student_over_the_teacher():
    assert uniform_layer_map(6, 3) == [2, 4, 6]
    assert uniform_layer_map(6, 2) == [3, 6]
    assert uniform_layer_map(8, 3) == [3, 5, 8]
    assert uniform_layer_map(4, 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="1..6"):
        uniform_layer_map(6, 7)


def test_layer_map_option_is_checked():
    assert parse_layer_map("", 6, 3) == [2, 4, 6]
    assert parse_layer_map("1,3,6", 6, 3) == [1, 3, 6]
    for bad, message in (("2,4", "names 2"), ("4,2,6", "increasing"), ("2,4,7", "within"), ("a,b,c", "comma")):
        with pytest.raises(ValueError, match=message):
            parse_layer_map(bad, 6, 3)


def test_bert_student_takes_the_mapped_teacher_layers():
    teacher = tiny_bert(4)
    student = bert_student(teacher, [2, 4])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t, s = teacher.state_dict(), student.state_dict()
    for student_layer, teacher_layer in ((0, 1), (1, 3)):
        for key in ("attention.self.query.weight", "intermediate.dense.weight", "output.LayerNorm.bias"):
            assert torch.equal(s[f"bert.encoder.layer.{student_layer}.{key}"], t[f"bert.encoder.layer.{teacher_layer}.{key}"])
    assert torch.equal(s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(s["classifier.weight"], t["classifier.weight"])


def test_tinybert_losses_vanish_when_the_student_is_the_teacher():
    teacher = eager(tiny_bert(3))
    batch = token_batch()
    logits, outputs = bert_outputs(teacher, batch)
    assert logits.shape == (4,)
    assert outputs.embedding.shape == (4, 12, 32) and len(outputs.hidden) == 3 and len(outputs.attentions) == 3
    assert outputs.attentions[0].shape == (4, 2, 12, 12)
    parts = tinybert_losses(outputs, outputs, [1, 2, 3], Projections(32, 32, 32, 32))
    assert all(abs(v.item()) < 1e-6 for v in parts.values()), parts
    assert ranker_output_loss(logits, logits, [2, 2]).item() < 1e-6


def test_attention_loss_ignores_padding_and_sees_real_differences():
    torch.manual_seed(3)
    mask = torch.tensor([[True, True, True, False]])
    teacher = torch.rand(1, 2, 4, 4).masked_fill(~mask[:, None, None, :], 0)
    teacher = teacher / teacher.sum(-1, keepdim=True)
    student = teacher.clone()
    student[:, :, 3] = torch.rand(2, 4)  # the padded query row: not a real token's attention
    assert attention_kl(student, teacher, mask).item() < 1e-6
    student[:, :, 0] = torch.tensor([0.7, 0.1, 0.2, 0.0])
    assert attention_kl(student, teacher, mask).item() > 1e-3


def test_ranker_distillation_losses_decrease_with_a_two_layer_student():
    teacher = eager(tiny_bert(4))
    student = eager(tiny_bert(2, seed=1)).train()  # unrelated weights: everything must be learnt
    projections = Projections(32, 32, 32, 32)
    batch = token_batch()
    with torch.no_grad():
        teacher_logits, teacher_layers = bert_outputs(teacher, batch)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)

    def loss():
        logits, layers = bert_outputs(student, batch)
        parts = tinybert_losses(layers, teacher_layers, [2, 4], projections)
        parts["output"] = ranker_output_loss(logits, teacher_logits, [2, 2])
        return parts

    first = {k: v.item() for k, v in loss().items()}
    for _ in range(40):
        optimizer.zero_grad()
        sum(loss().values()).backward()
        optimizer.step()
    last = {k: v.item() for k, v in loss().items()}
    assert sum(last.values()) < 0.5 * sum(first.values()), (first, last)
    assert last["hidden"] < first["hidden"] and last["attention"] < first["attention"]


def test_speech_student_with_a_narrower_front_end_learns_through_the_projection():
    teacher = tiny_vectoriser(layers=4, conv_dim=32)
    teacher.wav2vec2.set_attn_implementation("eager")
    student = speech_student(teacher, [2, 4], conv_dim=16)
    student.wav2vec2.set_attn_implementation("eager")
    student.train()
    config = student.wav2vec2.config
    assert config.num_hidden_layers == 2 and list(config.conv_dim) == [16] * 7
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["wav2vec2.encoder.layers.1.feed_forward.intermediate_dense.weight"],
                       t["wav2vec2.encoder.layers.3.feed_forward.intermediate_dense.weight"])
    assert torch.equal(s["project.2.weight"], t["project.2.weight"])  # the head comes along
    assert s["wav2vec2.feature_extractor.conv_layers.1.conv.weight"].shape == (16, 16, 3)

    torch.manual_seed(2)
    samples = torch.randn(3, 6400)
    mask = torch.ones(3, 6400, dtype=torch.long)
    mask[2, 4000:] = 0
    samples = samples * mask
    with torch.no_grad():
        teacher_head, teacher_layers = speech_outputs(teacher, samples, mask)
    assert teacher_layers.embedding.shape[-1] == 32 and len(teacher_layers.hidden) == 4
    assert teacher_layers.mask[2].sum() < teacher_layers.mask[0].sum()  # padded frames are not matched
    projections = Projections(16, 32, 64, 64)
    assert isinstance(projections.embedding, torch.nn.Linear)
    optimizer = torch.optim.Adam(list(student.parameters()) + list(projections.parameters()), lr=2e-3)
    student.wav2vec2.config.mask_time_prob = 0.0  # deterministic forward passes for the comparison

    def loss():
        head, layers = speech_outputs(student, samples, mask)
        parts = tinybert_losses(layers, teacher_layers, [2, 4], projections)
        parts["output"] = speech_output_loss(head, teacher_head)
        return parts

    first = {k: v.item() for k, v in loss().items()}
    for _ in range(30):
        optimizer.zero_grad()
        sum(loss().values()).backward()
        optimizer.step()
    last = {k: v.item() for k, v in loss().items()}
    assert sum(last.values()) < 0.7 * sum(first.values()), (first, last)
    assert last["embedding"] < first["embedding"]
    assert projections.embedding.weight.grad is not None


def test_ranker_distillation_runs_on_cpu_and_saves_a_loadable_student(tmp_path):
    import json
    import shutil

    from qa_app.models.loading import ASSETS_DIR
    from qa_app.models.ranker import Ranker
    from qa_app.train.distill import RankerDistillConfig, distill_ranker

    corpora = tmp_path / "corpora"
    for part in ("kb", "queries"):
        (corpora / part).mkdir(parents=True)
        shutil.copy(ASSETS_DIR / "train" / part / "arena_coach.jsonl", corpora / part)
    report = distill_ranker(RankerDistillConfig(
        corpora=str(corpora), output=str(tmp_path / "student"), layers=2, device="cpu", limit_groups=16,
        groups_per_batch=8, epochs=1, calibrate=False))
    assert report["student_layers"] == 2 and report["layer_map"] == [3, 6] and report["steps"] == 2
    assert report["parameters"] < report["teacher_parameters"]
    metrics = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[-1]) >= {"embedding", "attention", "hidden", "output", "labels"}
    scores = Ranker(str(tmp_path / "student"), device="cpu").score(["where is the armoury"], ["armoury location"])
    assert scores.shape == (1,) and np.isfinite(scores).all()


def test_speech_distillation_runs_on_cpu_and_saves_a_loadable_student(tmp_path):
    pytest.importorskip("espeakng_loader")
    from qa_app.models.speech_encoder import SpeechEncoder
    from qa_app.train.distill import SpeechDistillConfig, distill_speech

    report = distill_speech(SpeechDistillConfig(
        output=str(tmp_path / "student"), layers=2, conv_dim=64, device="cpu", limit_texts=8, espeak_copies=1,
        synth_workers=2, steps=2, batch_seconds=16, held_out_texts=3))
    assert report["student_layers"] == 2 and report["layer_map"] == [4, 8] and report["conv_dim"] == 64
    assert report["held_out_voices"]["student"]["utterances"] >= 3
    encoder = SpeechEncoder(str(tmp_path / "student"), device="cpu")
    assert encoder.model.wav2vec2.config.num_hidden_layers == 2
    vectors, _ = encoder.encode([np.zeros(16000, np.float32) + 0.01])
    assert vectors.shape == (1, 384)
