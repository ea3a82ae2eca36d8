"""Audio in (chunks, files, rates, broken samples) and endpointing on real synthesised speech."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from qa_app.audio.io import AudioError, decode_pcm, read_audio_file, resample_to_16k


def test_pcm16_and_f32_decode_to_the_same_samples():
    wave = np.sin(np.linspace(0, 200, 1600)).astype(np.float32) * 0.5
    pcm16 = (wave * 32767).astype("<i2").tobytes()
    assert np.allclose(decode_pcm(pcm16, "pcm16"), wave, atol=1e-4)
    assert np.array_equal(decode_pcm(wave.astype("<f4").tobytes(), "f32"), wave)


@pytest.mark.parametrize("data, encoding, channels, message", [
    (b"\x00\x01\x02", "pcm16", 1, "truncated pcm16"),
    (b"\x00" * 6, "f32", 1, "truncated f32"),
    (np.array([0.1, np.nan], "<f4").tobytes(), "f32", 1, "NaN or infinite"),
    (np.array([np.inf], "<f4").tobytes(), "f32", 1, "NaN or infinite"),
    (b"\x00" * 8, "pcm16", 2, "mono"),
    (b"\x00" * 8, "mp3", 1, "unknown encoding"),
])
def test_bad_chunks_are_clear_errors(data, encoding, channels, message):
    with pytest.raises(AudioError, match=message):
        decode_pcm(data, encoding, channels)


@pytest.mark.parametrize("rate", [4000, 7999, 48001, 96000])
def test_rates_outside_8_to_48_khz_are_refused(rate):
    with pytest.raises(AudioError, match="8000-48000 Hz"):
        resample_to_16k(np.zeros(100, np.float32), rate)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_duration_and_pitch(rate):
    t = np.arange(rate) / rate
    out = resample_to_16k(np.sin(2 * np.pi * 440 * t).astype(np.float32), rate)
    assert abs(len(out) - 16000) <= 1
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * 16000 / len(out)
    assert abs(peak_hz - 440) < 3


def test_files_wav_flac_ogg_read_as_16k_mono(tmp_path):
    wave = (np.sin(np.linspace(0, 300, 22050)) * 0.3).astype(np.float32)
    for name, fmt, subtype in [("a.wav", "WAV", "PCM_16"), ("a.flac", "FLAC", "PCM_16"), ("a.ogg", "OGG", "VORBIS")]:
        sf.write(tmp_path / name, wave, 22050, format=fmt, subtype=subtype)
        out = read_audio_file(tmp_path / name)
        assert out.dtype == np.float32 and abs(len(out) - 16000) <= 2, name


def test_bad_files_are_clear_errors(tmp_path):
    sf.write(tmp_path / "stereo.wav", np.zeros((800, 2), np.float32), 16000)
    with pytest.raises(AudioError, match="2-channel"):
        read_audio_file(tmp_path / "stereo.wav")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(AudioError, match="not a readable"):
        read_audio_file(tmp_path / "corrupt.wav")
    sf.write(tmp_path / "low.wav", np.zeros(800, np.float32), 4000)
    with pytest.raises(AudioError, match="sample rate 4000"):
        read_audio_file(tmp_path / "low.wav")
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
    with pytest.raises(AudioError, match="longer than the 2 s limit"):
        read_audio_file(tmp_path / "long.wav", max_seconds=2)
    with pytest.raises(AudioError, match="no such audio file"):
        read_audio_file(tmp_path / "missing.wav")


# --- endpointing ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vad():
    from qa_app.audio.vad import VoiceActivity

    return VoiceActivity()


@pytest.fixture(scope="module")
def spoken():
    """Three questions spoken by espeak-ng with silences of 0.8-1.5 s between them, over faint noise."""
    pytest.importorskip("espeakng_loader")
    from qa_app.audio.synth import Espeak, EspeakVoice
    from qa_app.train.speech_data import to_16k

    espeak = Espeak()
    rng = np.random.default_rng(0)
    parts, spans, position = [], [], 0
    for text in ["where can i buy a sword", "how do i get to the harbour", "what time does the inn close"]:
        gap = np.zeros(int(16000 * rng.uniform(0.8, 1.5)), np.float32)
        speech = to_16k(espeak.synthesize(text, EspeakVoice()), espeak.sample_rate)
        parts += [gap, speech]
        spans.append(((position + len(gap)) / 16000, (position + len(gap) + len(speech)) / 16000))
        position += len(gap) + len(speech)
    parts.append(np.zeros(16000, np.float32))
    audio = np.concatenate(parts)
    return audio + rng.normal(0, 0.002, len(audio)).astype(np.float32), spans


def test_endpointer_finds_each_utterance_of_a_stream(vad, spoken):
    from qa_app.audio.vad import split_utterances

    audio, spans = spoken
    found = split_utterances(audio, vad)
    assert len(found) == len(spans)
    for utterance, (start, end) in zip(found, spans):
        assert utterance.start_s <= start + 0.1 and utterance.end_s >= end - 0.1  # the whole question
        assert utterance.start_s >= start - 0.4 and utterance.end_s <= end + 0.6  # and not the silences
        assert not utterance.truncated


def test_chunk_size_does_not_change_the_result(vad, spoken):
    from qa_app.audio.vad import Endpointer

    audio, _ = spoken
    results = []
    for chunk in (160, 512, 4096):
        endpointer = Endpointer(vad)
        events = [e for i in range(0, len(audio), chunk) for e in endpointer.push(audio[i:i + chunk])]
        events += endpointer.flush()
        results.append([(e.kind, round(e.time_s, 3)) for e in events])
    assert results[0] == results[1] == results[2]
    assert [k for k, _ in results[0]] == ["started", "ended"] * 3


def test_silence_and_noise_alone_give_no_utterance(vad):
    from qa_app.audio.vad import split_utterances

    rng = np.random.default_rng(1)
    assert split_utterances(np.zeros(16000 * 3, np.float32), vad) == []
    assert split_utterances(rng.normal(0, 0.01, 16000 * 3).astype(np.float32), vad) == []


def test_long_speech_is_cut_at_the_limit(vad, spoken):
    from qa_app.audio.vad import EndpointConfig, split_utterances

    audio, spans = spoken
    start, end = spans[2]
    speech = audio[int(start * 16000):int(end * 16000)]
    cut = split_utterances(speech, vad, EndpointConfig(max_utterance_s=0.5))
    assert cut and cut[0].truncated and len(cut[0].samples) <= 0.5 * 16000 + 512


def test_streams_batched_together_match_streams_run_alone(vad):
    from qa_app.audio.vad import FRAME, VadState

    rng = np.random.default_rng(2)
    frames = rng.normal(0, 0.1, (6, 3, FRAME)).astype(np.float32)
    together, alone = [VadState() for _ in range(3)], [VadState() for _ in range(3)]
    for step in frames:
        batched = vad(step, together)
        single = np.array([vad(step[i:i + 1], [alone[i]])[0] for i in range(3)])
        assert np.allclose(batched, single, atol=1e-5)


def test_stream_state_survives_changing_batch_mates(vad, spoken):
    """A stream whose frames go through batches of changing size and company gets the probabilities silero
    gives it streaming alone (its own model instance, its own internal state): each stream's recurrent state
    is carried from batch to batch, untouched by the batches it is no longer in."""
    import torch
    from silero_vad import load_silero_vad

    from qa_app.audio.vad import FRAME, VadState

    audio, spans = spoken
    start = int(spans[0][0] * 16000) - 8 * FRAME  # silence, then speech: probabilities that move
    frames = audio[start:start + 40 * FRAME].reshape(40, FRAME)
    reference = load_silero_vad()
    reference.reset_states()
    with torch.inference_mode():
        expected = np.array([reference(torch.from_numpy(f[None].copy()), 16000).item() for f in frames])
    rng = np.random.default_rng(3)
    stream, mates = VadState(), [VadState() for _ in range(4)]
    got = []
    for frame in frames:
        company = [mates[i] for i in rng.choice(4, size=int(rng.integers(0, 5)), replace=False)]
        noise = rng.normal(0, 0.05, (len(company), FRAME)).astype(np.float32)
        position = int(rng.integers(0, len(company) + 1))
        batch = list(noise[:position]) + [frame] + list(noise[position:])
        got.append(vad(np.stack(batch), company[:position] + [stream] + company[position:])[position])
    assert expected.max() > 0.5 > expected.min()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_audio_manifests_resolve_paths_and_report_bad_lines_with_file_and_line(tmp_path):
    from qa_app.kb import KnowledgeBaseError
    from qa_app.train.speech_data import read_manifest

    good = tmp_path / "set.jsonl"
    good.write_text('{"audio": "a/1.wav", "expected_id": "x"}\n\n{"audio": "/abs/2.wav", "expected_id": null}\n')
    lines = read_manifest(good)
    assert [line["audio"] for line in lines] == [str(tmp_path / "a" / "1.wav"), "/abs/2.wav"]
    for text, message in [('{"audio": "1.wav"}\n{"audio": \n', "set.jsonl:2: bad JSON"),
                          ('{"expected_id": "x"}\n', "set.jsonl:1: expected an object with an 'audio' path")]:
        good.write_text(text)
        with pytest.raises(KnowledgeBaseError, match=message):
            read_manifest(good)
