"""Shared fixtures: the real models and the bundled knowledge bases, loaded once per test session."""
from __future__ import annotations

import asyncio
import os
import shutil
import threading
from contextlib import contextmanager
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


@contextmanager
def running_server(engine, settings):
    """Start NpcServer on its own event loop in a thread; yield (target, server); drain on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    from qa_app.server.service import NpcServer

    async def start():
        server = NpcServer(settings)
        await server.start(engine)
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=60)
    try:
        yield f"127.0.0.1:{server.port}", server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=5), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def kb_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kb")
    for path in (ASSETS / "kb").glob("*.jsonl"):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="session")
def server(engine, kb_dir):
    from qa_app.config import Settings

    settings = Settings(kb_dir=kb_dir, device="cpu", port=0, workers=2, max_text_chars=2000)
    with running_server(engine, settings) as (target, srv):
        yield target, srv


@pytest.fixture()
def client(server):
    from qa_app.client import NpcClient

    with NpcClient(server[0], timeout=30) as c:
        yield c
