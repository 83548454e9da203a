"""The DNS proxy's sockets: UDP and TCP on each listen address (Istio's dnsProxy, one per protocol and address).

`DnsServer` owns their lifetime in a fixed order: start = bind every socket unless the caller bound them already
(agent.dns.sockets: an address in use fails the start with STARTUP_FAILED before Envoy runs, as in Istio), then
serve; stop = close the sockets, cancel the forwarded queries in flight and the TCP connections. Both are
idempotent.

A table hit is answered inside the datagram callback. A forwarded query runs as a task the server owns (cancelled
at stop); at most `max_pending_forwards` at a time, the rest answered SERVFAIL at once, so a flood cannot grow
memory without bound. TCP connections (at most `max_tcp_connections`) carry length-prefixed queries answered in
order; a connection idle for longer than TCP_IDLE_TIMEOUT (the first query: TCP_READ_TIMEOUT) is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Sequence
from typing import Protocol, cast

from agent.dns.proxy import DnsProxy
from agent.dns.sockets import SocketPair, bind_dns_sockets
from agent.dns.wire import SERVFAIL, Query, reply

log = logging.getLogger("agent.dns")

# miekg/dns server defaults: 2 s for a connection's first query, 8 s between the next ones.
TCP_READ_TIMEOUT = 2.0
TCP_IDLE_TIMEOUT = 8.0
# Replies queued in a UDP socket's user-space buffer (the kernel's is full) beyond this are dropped.
UDP_SEND_BUFFER_LIMIT = 1 << 20
_LENGTH = struct.Struct("!H")
REFUSED_LOG_INTERVAL = 60.0


class _DatagramTransport(Protocol):
    """What asyncio's selector datagram transport offers (typeshed's DatagramTransport lacks the buffer size)."""

    def sendto(self, data: bytes, addr: tuple[str | int, ...]) -> None: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def get_write_buffer_size(self) -> int: ...


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: _DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(_DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        result = self.server.proxy.local_answer(data, tcp=False)
        if isinstance(result, Query):
            self.server.forward_udp(self, data, result, addr)
        elif result is not None:
            self.send(result, addr)

    def send(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > UDP_SEND_BUFFER_LIMIT:
            return  # the client gets no answer and retries: better than unbounded memory
        transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier reply (the client went away): nothing to do, keep serving.
        log.debug("udp: %s", exc)


class DnsServer:
    def __init__(
        self,
        proxy: DnsProxy,
        addresses: Sequence[tuple[str, int]],
        *,
        max_pending_forwards: int = 1024,
        max_tcp_connections: int = 256,
        sockets: list[SocketPair] | None = None,
    ) -> None:
        """`sockets`: already bound for `addresses` (bind_dns_sockets), served as they are by start()."""
        self.proxy = proxy
        self.addresses = tuple(addresses)
        self._pairs = sockets
        self.max_pending_forwards = max_pending_forwards
        self.max_tcp_connections = max_tcp_connections
        # (protocol, host, port) of every socket, as bound (port 0 resolved).
        self.bound: list[tuple[str, str, int]] = []
        self._udp: list[_UdpProtocol] = []
        self._tcp_servers: list[asyncio.Server] = []
        self._forwards: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.Task[None]] = set()
        # Queries answered SERVFAIL because max_pending_forwards were waiting, since the last log line about it.
        self._refused = 0
        self._refused_logged = -float("inf")

    async def start(self) -> None:
        """Serve on the sockets given (`sockets`), else bind them now. Raises AgentError(STARTUP_FAILED) when an
        address cannot be bound (nothing is left open then)."""
        loop = asyncio.get_running_loop()
        pairs = self._pairs if self._pairs is not None else bind_dns_sockets(self.addresses)
        self._pairs = None
        for udp_sock, tcp_sock in pairs:
            name = udp_sock.getsockname()
            _, protocol = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp_sock)
            self._udp.append(protocol)
            self._tcp_servers.append(await asyncio.start_server(self._serve_tcp, sock=tcp_sock))
            self.bound += [("udp", name[0], name[1]), ("tcp", name[0], name[1])]
            log.info("Starting local udp and tcp DNS server on %s", _join(name[0], name[1]))

    def port(self) -> int:
        """The port of the first socket (tests bind port 0)."""
        return self.bound[0][2]

    async def stop(self) -> None:
        """Stop listening, then cancel forwarded queries and TCP connections and wait for them."""
        for protocol in self._udp:
            if protocol.transport is not None:
                protocol.transport.close()
        for server in self._tcp_servers:
            server.close()
        for server in self._tcp_servers:
            await server.wait_closed()
        self._udp, self._tcp_servers = [], []
        tasks = [*self._forwards, *self._connections]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def forward_udp(self, protocol: _UdpProtocol, data: bytes, query: Query, addr: tuple[str | int, ...]) -> None:
        if len(self._forwards) >= self.max_pending_forwards:
            self._refused += 1
            now = time.monotonic()
            if now - self._refused_logged >= REFUSED_LOG_INTERVAL:
                # Once a minute, with a count: an upstream outage under an application that retries refuses
                # thousands of queries a second (upstream_failures_total counts each).
                log.warning(
                    "dns proxy: %d queries already waiting for the upstream: %d answered SERVFAIL at once since the"
                    " last such line",
                    len(self._forwards),
                    self._refused,
                )
                self._refused, self._refused_logged = 0, now
            self.proxy.metrics.upstream_failures.inc()
            protocol.send(reply(data, query, SERVFAIL), addr)
            return
        task = asyncio.get_running_loop().create_task(self._forward(protocol, data, query, addr))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def _forward(self, protocol: _UdpProtocol, data: bytes, query: Query, addr: tuple[str | int, ...]) -> None:
        try:
            answer = await self.proxy.upstream_answer(data, query, tcp=False)
        except Exception:  # a bug must not end the server: log it, the client retries
            log.exception("dns proxy: forwarding %r failed", query.name)
            return
        protocol.send(answer, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._connections) >= self.max_tcp_connections:
            writer.close()
            return
        self._connections.add(task)
        try:
            timeout = TCP_READ_TIMEOUT
            while True:
                async with asyncio.timeout(timeout):
                    (length,) = _LENGTH.unpack(await reader.readexactly(2))
                    data = await reader.readexactly(length)
                timeout = TCP_IDLE_TIMEOUT
                answer = await self.proxy.answer(data, tcp=True)
                if answer is not None:
                    writer.write(_LENGTH.pack(len(answer)) + answer)
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # idle, closed by the client, or reset: the connection ends
        except asyncio.CancelledError:
            # stop(). Ending normally: on Python 3.11 asyncio's stream callback calls exception() on this task and
            # logs a spurious traceback when the task ends cancelled. Nothing awaits this task but stop().
            pass
        except Exception:
            log.exception("dns proxy: tcp connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
