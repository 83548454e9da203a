"""Binding the status port. Light on purpose: `pilot-agent proxy` binds it before it execs Envoy and before aiohttp
is imported, so that a port in use is a start-up error before any Envoy runs and kubelet's probes wait in the
backlog meanwhile."""

from __future__ import annotations

import errno
import socket

from agent.errors import AgentError, ExitCode

# Go's net.Listen (Istio's status port) asks for net.core.somaxconn; the kernel caps any larger value to it. A deep
# queue lets a probe wait out a burst of other connections (or the agent's start) instead of having its SYN
# dropped and retried a second later.
BACKLOG = 65535


def bind_status_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for the status server, bound as aiohttp's TCPSite would bind them (one per address of
    `host`; "" = every interface, IPv4 and IPv6, the IPv6 one v6-only). Raises AgentError(STARTUP_FAILED) when the
    port cannot be bound."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # IPv4 first, as StatusServer reports the IPv4 port (with port 0 each family gets its own).
        for family, kind, proto, _, address in sorted(set(infos), key=lambda i: i[0] != socket.AF_INET):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)
        raise AgentError(f"status server: cannot listen on port {port}: {why}", ExitCode.STARTUP_FAILED) from None
    return sockets
