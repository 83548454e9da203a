"""Unix-socket listeners for Envoy's pipes (Istio's pkg/uds NewListener): a stale file is removed, the directory
made (0750), and the socket opened to everyone (0666): Envoy may run as another user than the agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import grpc.aio

# sun_path holds 108 bytes with its terminating NUL.
MAX_PATH = 107


class SocketError(Exception):
    """The socket cannot be made: the message names the path and why."""


def listen_unix(server: grpc.aio.Server, path: str) -> None:
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
