"""Clients for the NpcQA gRPC service: ``NpcClient`` (blocking) and ``AsyncNpcClient`` (asyncio).

Both set a deadline on every call and retry only UNAVAILABLE (server starting, restarting or unreachable),
with exponential back-off; every other status is the server's answer and is raised at once.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import grpc

from qa_app.proto import npc_qa_pb2 as pb
from qa_app.proto import npc_qa_pb2_grpc as pb_grpc


def _channel_args(target: str, token: str | None, tls_ca: str | Path | None):
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()) if tls_ca else None
    return metadata, credentials


class NpcClient:
    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | None = None,
                 timeout: float = 5.0, retries: int = 3, backoff: float = 0.2) -> None:
        self.metadata, credentials = _channel_args(target, token, tls_ca)
        self.channel = (grpc.secure_channel(target, credentials) if credentials
                        else grpc.insecure_channel(target))
        self.stub = pb_grpc.NpcQAStub(self.channel)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def _call(self, method, request, timeout: float | None = None):
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise
                time.sleep(self.backoff * 2 ** attempt)

    def ask(self, npc: str, text: str, player_id: str = "", debug: bool = False, top_k: int = 0,
            timeout: float | None = None) -> pb.Answer:
        request = pb.AskRequest(npc=npc, text=text, player_id=player_id, debug=debug, top_k=top_k)
        return self._call(self.stub.Ask, request, timeout)

    def chat(self, requests: Iterable[pb.AskRequest], timeout: float | None = None) -> Iterator[pb.Answer]:
        """One stream for a whole conversation (not retried: a stream cannot be replayed safely)."""
        return self.stub.Chat(iter(requests), timeout=timeout, metadata=self.metadata)

    def talk(self, npc: str, chunks: Iterable[bytes], sample_rate: int, encoding: int = pb.PCM16,
             player_id: str = "", timeout: float | None = None) -> Iterator[pb.TalkEvent]:
        """Voice: mono audio chunks (raw little-endian PCM16 or float32 bytes) in, speech events out."""
        def requests():
            yield pb.TalkRequest(config=pb.TalkConfig(npc=npc, player_id=player_id, sample_rate=sample_rate,
                                                      encoding=encoding, channels=1))
            for chunk in chunks:
                yield pb.TalkRequest(audio=chunk)

        return self.stub.Talk(requests(), timeout=timeout, metadata=self.metadata)

    def list_npcs(self) -> list[pb.NpcInfo]:
        return list(self._call(self.stub.ListNpcs, pb.ListNpcsRequest()).npcs)

    def reload(self, npc: str, timeout: float = 120.0) -> pb.ReloadResponse:
        return self._call(self.stub.ReloadKnowledgeBase, pb.ReloadRequest(npc=npc), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "NpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncNpcClient:
    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | None = None,
                 timeout: float = 5.0, retries: int = 3, backoff: float = 0.2) -> None:
        self.metadata, credentials = _channel_args(target, token, tls_ca)
        self.channel = (grpc.aio.secure_channel(target, credentials) if credentials
                        else grpc.aio.insecure_channel(target))
        self.stub = pb_grpc.NpcQAStub(self.channel)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    async def _call(self, method, request, timeout: float | None = None):
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise
                await asyncio.sleep(self.backoff * 2 ** attempt)

    async def ask(self, npc: str, text: str, player_id: str = "", debug: bool = False, top_k: int = 0,
                  timeout: float | None = None) -> pb.Answer:
        request = pb.AskRequest(npc=npc, text=text, player_id=player_id, debug=debug, top_k=top_k)
        return await self._call(self.stub.Ask, request, timeout)

    def chat(self, requests, timeout: float | None = None) -> AsyncIterator[pb.Answer]:
        return self.stub.Chat(requests, timeout=timeout, metadata=self.metadata)

    async def list_npcs(self) -> list[pb.NpcInfo]:
        return list((await self._call(self.stub.ListNpcs, pb.ListNpcsRequest())).npcs)

    async def reload(self, npc: str, timeout: float = 120.0) -> pb.ReloadResponse:
        return await self._call(self.stub.ReloadKnowledgeBase, pb.ReloadRequest(npc=npc), timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncNpcClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
