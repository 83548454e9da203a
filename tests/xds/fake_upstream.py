"""A scripted ADS server standing in for istiod behind the proxy (a FAKE: the tests drive each stream by hand to
reach the proxy's edge cases; tests/mesh runs the real istiod). Raw bytes in and out, as the proxy forwards them."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


@dataclass(eq=False)
class UpstreamStream:
    method: str
    metadata: dict[str, str]
    requests: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    outbox: asyncio.Queue[bytes | tuple[grpc.StatusCode, str] | None] = field(default_factory=asyncio.Queue)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def request(self, timeout: float = 10.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.requests.get()

    def send(self, raw: bytes) -> None:
        self.outbox.put_nowait(raw)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        self.outbox.put_nowait((code, details))

    def close(self) -> None:
        self.outbox.put_nowait(None)


class FakeUpstream:
    def __init__(self) -> None:
        self.streams: asyncio.Queue[UpstreamStream] = asyncio.Queue()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        # Set: every new stream is refused with this status first thing (istiod rejecting the caller).
        self.refuse: tuple[grpc.StatusCode, str] | None = None

    async def next_stream(self, timeout: float = 10.0) -> UpstreamStream:
        async with asyncio.timeout(timeout):
            return await self.streams.get()

    async def start(self, port: int = 0, credentials: grpc.ServerCredentials | None = None) -> None:
        server = grpc.aio.server()
        handlers = {
            name: grpc.stream_stream_rpc_method_handler(self._handler(name))
            for name in ("StreamAggregatedResources", "DeltaAggregatedResources")
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        address = f"127.0.0.1:{port}"
        self.port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)
            self.server = None

    def _handler(self, name: str) -> Any:
        async def handle(_requests: Any, context: grpc.aio.ServicerContext) -> None:
            if self.refuse is not None:
                await context.abort(*self.refuse)
            metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            stream = UpstreamStream(name, metadata)
            self.streams.put_nowait(stream)

            async def read() -> None:
                while (raw := await context.read()) is not grpc.aio.EOF:
                    stream.requests.put_nowait(raw)

            reader = asyncio.ensure_future(read())
            try:
                while True:
                    item = await stream.outbox.get()
                    if item is None:
                        return
                    if isinstance(item, tuple):
                        await context.abort(*item)
                    await context.write(item)
            finally:
                stream.ended.set()
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

        return handle


@asynccontextmanager
async def fake_upstream(port: int = 0, credentials: grpc.ServerCredentials | None = None) -> Any:
    upstream = FakeUpstream()
    await upstream.start(port, credentials)
    try:
        yield upstream
    finally:
        await upstream.stop()
