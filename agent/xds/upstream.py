"""istiod's end of one proxied ADS stream, over grpc's synchronous API driven from asyncio.

Why not grpc.aio: a write that is in flight when the server ends the stream (istiod refusing the caller's
credentials does so at once) makes grpc.aio replace the server's status with "INTERNAL: Internal error from
Core" (grpc/grpc#36066; grpcio 1.85 here). The proxy must report istiod's real status, to Envoy and in the
readiness reason. The synchronous API keeps it: it consumes the requests from a queue on its own thread and
reports the status the server sent. Each read waits on a worker thread; one stream at a time is active.
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import grpc


class UpstreamCall:
    def __init__(self, channel: grpc.Channel, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        # Unbounded, as Istio's request channel (istio#39209): Envoy's requests never wait on istiod.
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._responses: Any = channel.stream_stream(method)(iter(self._requests.get, None), metadata=metadata)

    def write(self, raw: bytes) -> None:
        """Queue a request; never blocks."""
        self._requests.put(raw)

    async def read(self) -> bytes | None:
        """The next response; None when istiod ended the stream cleanly. Raises grpc.RpcError (with code() and
        details()) when it ended with an error."""
        raw: bytes | None = await asyncio.to_thread(next, self._responses, None)
        return raw

    def cancel(self) -> None:
        """End the stream (the request thread and a pending read return)."""
        self._responses.cancel()
        self._requests.put(None)
