"""Shared fixtures: the real models and the bundled knowledge bases, loaded once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"

# Tests never touch a model hub; everything they load ships with the project.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engine():
    from qa_app import QAEngine
    from qa_app.config import Settings

    return QAEngine(settings=Settings(kb_dir=ASSETS / "kb", device="cpu"))


@pytest.fixture(scope="session")
def encoder():
    from qa_app.config import Settings
    from qa_app.models.text_encoder import TextEncoder

    return TextEncoder(Settings().text_encoder, device="cpu")


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
