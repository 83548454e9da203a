"""gRPC servers on unix sockets for Envoy's pipes (Istio's pkg/uds NewListener): a stale file is removed, the
directory made (0750), and the socket opened to everyone (0666): Envoy may run as another user than the agent.

`UnixGrpcServer` listens first and serves later: `pilot-agent proxy` binds the xDS and SDS sockets before it execs
Envoy (Envoy must find them listening, and grpc cannot adopt a socket bound elsewhere), while the services behind
them are built after the exec, overlapping Envoy's start. A call that arrives in between waits for `attach()`.
Messages are bytes both ways; each service parses what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from agent.errors import AgentError

# sun_path holds 108 bytes with its terminating NUL.
MAX_PATH = 107

STREAM = "stream"  # stream-stream
UNARY = "unary"  # unary-unary

# A method's behaviour: (request bytes or the call's request iterator, context) -> None (streams write through
# the context) or the response bytes (unary).
Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class SocketError(AgentError):
    """The socket cannot be made: the message names the path and why (the agent does not start)."""


class UnixGrpcServer:
    def __init__(
        self, path: str, service: str, methods: Mapping[str, str], options: Sequence[tuple[str, int]] = ()
    ) -> None:
        """`methods`: {method name: STREAM or UNARY} of `service` (a fully qualified gRPC service name)."""
        self.path = path
        self.service = service
        self.methods = dict(methods)
        self.options = list(options)
        self._behaviours: dict[str, Behaviour] = {}
        self._attached = asyncio.Event()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Listen (idempotent). Raises SocketError."""
        if self._server is not None:
            return
        server = grpc.aio.server(options=self.options)
        handlers = {name: self._handler(name, kind) for name, kind in self.methods.items()}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(self.service, handlers)])
        _listen_unix(server, self.path)
        await server.start()
        self._server = server

    def attach(self, behaviours: Mapping[str, Behaviour]) -> None:
        """Serve: calls waiting so far, and every later one, go to `behaviours` ({method name: behaviour})."""
        self._behaviours = dict(behaviours)
        self._attached.set()

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)
            remove_socket(self.path)

    def _handler(self, name: str, kind: str) -> grpc.RpcMethodHandler:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._attached.wait()
            return await self._behaviours[name](request, context)

        if kind == STREAM:
            return grpc.stream_stream_rpc_method_handler(call)
        return grpc.unary_unary_rpc_method_handler(call)


def _listen_unix(server: grpc.aio.Server, path: str) -> None:
    """Bind `server` to the unix socket `path` (relative paths are relative to the agent's cwd, as Istio's)."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise SocketError(f"unix socket path {path} is longer than {MAX_PATH} bytes")
    socket_path = Path(path)
    try:
        socket_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
    except OSError as exc:
        raise SocketError(f"cannot prepare unix socket {path}: {exc.strerror or exc}") from None
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    except RuntimeError as exc:
        raise SocketError(f"cannot listen on unix socket {path}: {exc}") from None
    if not bound:
        raise SocketError(f"cannot listen on unix socket {path}")
    try:
        socket_path.chmod(0o666)
    except OSError as exc:
        raise SocketError(f"cannot open unix socket {path} to other users: {exc.strerror or exc}") from None


def remove_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()


async def socket_is_healthy(path: str, timeout: float = 1.0) -> bool:
    """Something serves gRPC on `path` (Istio's socketHealthCheck: a blocking dial within a second)."""
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except (TimeoutError, grpc.aio.AioRpcError):
            return False
    return True
