"""The DNS proxy's listening sockets, bound with plain sockets (no DNS library imported): `pilot-agent proxy` binds
them before it execs Envoy, so an address in use stops the start before Envoy runs (Istio starts DNS first)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

from agent.errors import AgentError, ExitCode

SocketPair = tuple[socket.socket, socket.socket]  # (UDP, TCP) on one address and port


def _bind(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6 and host == "":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # every address, both families
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "::", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_pair(host: str, port: int, attempts: int = 20) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same host and port. Port 0 picks a port free for both (tests)."""
    for _ in range(attempts if port == 0 else 1):
        udp = _bind(host, port, socket.SOCK_DGRAM)
        try:
            return udp, _bind(host, udp.getsockname()[1], socket.SOCK_STREAM)
        except OSError:
            udp.close()
            if port != 0:
                raise
    raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")


def bind_dns_sockets(addresses: Sequence[tuple[str, int]]) -> list[SocketPair]:
    """A UDP and a TCP socket on each address. AgentError(STARTUP_FAILED) naming the address when one cannot be
    bound (nothing is left open then)."""
    pairs: list[SocketPair] = []
    try:
        for host, port in addresses:
            pairs.append(bind_pair(host, port))
    except OSError as exc:
        for udp, tcp in pairs:
            udp.close()
            tcp.close()
        host, port = addresses[len(pairs)]
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise AgentError(f"dns proxy: cannot listen on {where}: {why}", ExitCode.STARTUP_FAILED) from None
    return pairs
