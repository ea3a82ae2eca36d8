"""Every model in assets/models loads by its name and does its job on CPU; the defaults are among them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qa_app.config import Settings
from qa_app.models.loading import ASSETS_DIR, shipped_models

SHIPPED = sorted(p.name for p in (ASSETS_DIR / "models").iterdir() if (p / "config.json").is_file())


def kind_of(folder) -> str:
    if (folder / "speech_head.json").is_file():
        return "speech"
    architectures = json.loads((folder / "config.json").read_text()).get("architectures", [])
    return "ranker" if "BertForSequenceClassification" in architectures else "text"


def test_the_defaults_are_shipped_models():
    defaults = Settings()
    for name in (defaults.text_encoder, defaults.ranker, defaults.speech_encoder):
        assert name in shipped_models(), f"default model {name!r} does not ship in assets/models"
    assert kind_of(ASSETS_DIR / "models" / defaults.ranker) == "ranker"
    assert kind_of(ASSETS_DIR / "models" / defaults.speech_encoder) == "speech"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_loads_by_name_and_works(name):
    folder = ASSETS_DIR / "models" / name
    kind = kind_of(folder)
    if kind == "speech":
        from qa_app.models.speech_encoder import SpeechEncoder

        t = np.arange(16000 * 2) / 16000
        wave = (0.1 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
        vectors, transcripts = SpeechEncoder(name, device="cpu").encode([wave])
        assert vectors.shape == (1, 384) and abs(np.linalg.norm(vectors[0]) - 1) < 1e-4
        assert isinstance(transcripts[0], str)
    elif kind == "ranker":
        from qa_app.models.ranker import Ranker

        ranker = Ranker(name, device="cpu", max_length=128)
        right, wrong = ranker.score(["how do i revive a teammate"] * 2,
                                    ["how do i revive a downed teammate | hold the interact key beside them",
                                     "what is the best sniper rifle | the longbow at long range"])
        assert right > wrong, f"{name}: ranks an unrelated question above a paraphrase"
    else:
        from qa_app.models.text_encoder import TextEncoder

        vectors = TextEncoder(name, device="cpu").encode(["where do i buy ammo", "where can i get bullets",
                                                          "what time is it in tokyo"])
        assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
