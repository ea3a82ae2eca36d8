"""The speech vectoriser: loading (shipped name, folder, wav2vec2 checkpoint + head), batching, training."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ASSETS
from qa_app.models.loading import ModelNotFoundError
from qa_app.models.speech_encoder import (HEAD_CONFIG, HEAD_WEIGHTS, SpeechEncoder, SpeechVectoriser, ctc_greedy,
                                          small_wav2vec2_config)


@pytest.fixture(scope="module")
def speech():
    return SpeechEncoder("speech-encoder", device="cpu")


@pytest.fixture(scope="module")
def waves():
    from qa_app.audio.io import read_audio_file
    from qa_app.train.speech_data import read_manifest

    lines = read_manifest(ASSETS / "eval" / "spoken" / "innkeeper.jsonl")[:6]
    return [read_audio_file(line["audio"]) for line in lines]


def test_shipped_model_is_a_small_fp16_wav2vec2_with_our_head():
    folder = ASSETS / "models" / "speech-encoder"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "wav2vec2"
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size <= 60 * 2**20  # the limit
    assert json.loads((folder / HEAD_CONFIG).read_text())["text_dim"] == 384


def test_vectors_are_unit_length_in_the_text_space_with_transcripts(speech, waves):
    vectors, transcripts = speech.encode(waves)
    assert vectors.shape == (len(waves), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert all(isinstance(t, str) for t in transcripts) and any(transcripts)


def test_a_batch_of_mixed_lengths_matches_each_utterance_alone(speech, waves):
    together, texts = speech.encode(waves)
    for i, wave in enumerate(waves):
        alone, text = speech.encode([wave])
        assert float(alone[0] @ together[i]) > 0.999
        assert text[0] == texts[i]


def test_loads_from_a_folder_and_from_a_wav2vec2_checkpoint_plus_a_head(tmp_path, speech, waves):
    folder = tmp_path / "copy"
    shutil.copytree(ASSETS / "models" / "speech-encoder", folder)
    expected, _ = speech.encode(waves[:2])
    from_folder, _ = SpeechEncoder(str(folder), device="cpu").encode(waves[:2])
    np.testing.assert_allclose(from_folder, expected, atol=1e-5)
    # A plain wav2vec2 checkpoint (no head) is refused unless a head folder is given.
    checkpoint = tmp_path / "wav2vec2"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, checkpoint / name)
    with pytest.raises(ModelNotFoundError, match="speech head"):
        SpeechEncoder(str(checkpoint), device="cpu")
    combined, _ = SpeechEncoder(str(checkpoint), device="cpu", head=str(folder)).encode(waves[:2])
    np.testing.assert_allclose(combined, expected, atol=1e-5)


def test_a_head_that_does_not_fit_the_model_is_refused(tmp_path):
    from transformers import Wav2Vec2Model

    from qa_app.models.speech_encoder import HeadConfig

    SpeechVectoriser(Wav2Vec2Model(small_wav2vec2_config(2, 128, 64)), HeadConfig()).save(tmp_path / "small")
    SpeechVectoriser(Wav2Vec2Model(small_wav2vec2_config(2, 192, 64)), HeadConfig()).save(tmp_path / "wide")
    with pytest.raises(ModelNotFoundError, match="does not fit"):
        SpeechEncoder(str(tmp_path / "small"), device="cpu", head=str(tmp_path / "wide"))
    assert (tmp_path / "small" / HEAD_WEIGHTS).is_file()


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    # frames: h h _ i _ _ ' ' t t  -> "hi t" (class 0 is the blank, class k is ALPHABET[k - 1])
    ids = [9, 9, 0, 10, 0, 0, 1, 21, 21]
    logits = torch.nn.functional.one_hot(torch.tensor([ids]), 39).float()
    assert ctc_greedy(logits, torch.ones(1, len(ids), dtype=torch.bool)) == ["hi t"]


def test_training_runs_on_cpu_and_saves_a_loadable_model(tmp_path):
    pytest.importorskip("espeakng_loader")
    from qa_app.train.speech import SpeechTrainConfig, train_speech

    config = SpeechTrainConfig(output=str(tmp_path / "speech"), device="cpu", limit_texts=12, espeak_copies=1,
                               synth_workers=2, layers=2, hidden=128, conv_dim=64, steps=3, batch_seconds=20,
                               held_out_texts=3)
    report = train_speech(config)
    assert report["steps"] == 3 and report["utterances"] >= 10 and report["held_out_voices"]["utterances"] >= 3
    metrics = [json.loads(line) for line in (tmp_path / "speech" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["total"]) for m in metrics)
    vectors, _ = SpeechEncoder(str(tmp_path / "speech"), device="cpu").encode([np.zeros(16000, np.float32) + 0.01])
    assert vectors.shape == (1, 384)


def test_graph_buckets():
    """Speech CUDA-graph buckets round a batch up to (utterances, longest utterance) and refuse batches past
    the largest bucket or the audio bound (those run eagerly)."""
    from qa_app.models.speech_encoder import GRAPH_MAX_AUDIO_S, SpeechGraphs

    second = 16_000
    assert SpeechGraphs.bucket([int(1.7 * second)]) == (1, 2 * second)
    assert SpeechGraphs.bucket([second, 3 * second, 100]) == (4, 3 * second)
    assert SpeechGraphs.bucket([2 * second] * 128) == (128, 2 * second)
    assert SpeechGraphs.bucket([2 * second] * 129) is None       # more utterances than any bucket
    assert SpeechGraphs.bucket([17 * second]) is None              # longer than any bucket
    assert SpeechGraphs.bucket([3 * second] * 128) is None         # 128 x 3 s > GRAPH_MAX_AUDIO_S
    assert 128 * 3 > GRAPH_MAX_AUDIO_S >= 16 * 16


def test_frame_slots_send_scratch_rows_to_the_dropped_row():
    """Unpacking packed frames to [utterances, longest]: each utterance's frames go to its row, and a graph
    bucket's scratch rows (past the utterances' frames) all go to the one extra row that is dropped."""
    from qa_app.models.fast_encoders import SpeechPlan
    from qa_app.models.speech_encoder import _frame_slots

    meta = np.zeros((1, 4, 3), dtype=np.int32)
    meta[-1, 1] = [2, 0, 3]  # frames per utterance; the middle one has none
    exact, longest = _frame_slots(SpeechPlan(meta, [(3, 5)]), 3)
    assert longest == 3 and exact.tolist() == [0, 1, 6, 7, 8]
    bucket, _ = _frame_slots(SpeechPlan(meta, [(4, 12)]), 3, 4)
    assert bucket.tolist() == [0, 1, 8, 9, 10] + [12] * 7
