"""Forwarding a query to the resolv.conf servers (Istio's queryUpstream / queryUpstreamParallel).

A query that came over UDP goes upstream over UDP, one over TCP over TCP, each on a socket of its own (a fresh
source port per query, as miekg/dns's Exchange does). Sequential (default): the servers in a shuffled order, each
given `timeout` seconds, until one answers. Parallel (DNS_FORWARD_PARALLEL): all at once, the first answer wins.
An answer is any reply with the query's id, whatever its rcode (an upstream NXDOMAIN or SERVFAIL is passed on);
a timeout, a refused or reset connection, a short or mismatched reply is a failure. A truncated (TC) UDP answer
is passed on as it is: the client retries over TCP, and that retry is forwarded over TCP.

The agent's own queries leave as uid 1337, which the capture rules exclude from the DNS redirect.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from agent.dns.wire import HEADER_SIZE, QR

log = logging.getLogger("agent.dns")

_LENGTH = struct.Struct("!H")


@dataclass(frozen=True)
class UpstreamSettings:
    servers: tuple[tuple[str, int], ...]  # (IP, port): the resolv.conf servers, port 53
    timeout: float = 5.0  # DNS_FORWARD_TIMEOUT, per server
    parallel: bool = False  # DNS_FORWARD_PARALLEL


class UpstreamError(Exception):
    """One server gave no usable answer."""


def _is_answer(reply: bytes, query: bytes) -> bool:
    return len(reply) >= HEADER_SIZE and reply[:2] == query[:2] and bool(reply[2] & QR >> 8)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def _exchange_udp(server: tuple[str, int], query: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(_family(server[0]), socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        # Connected: the kernel drops datagrams from anyone else, and an ICMP port-unreachable fails the read at
        # once instead of waiting for the timeout. Connecting a UDP socket and sending one datagram on a fresh
        # socket do not block: done directly, without the event loop's round trips (a third of the CPU per query).
        sock.connect(server)
        try:
            sock.send(query)
        except BlockingIOError:
            await loop.sock_sendall(sock, query)
        while True:
            reply = await loop.sock_recv(sock, 65535)
            if _is_answer(reply, query):
                return reply
            # A late answer to an earlier query on this port, or junk: keep waiting (miekg/dns does the same).


async def _exchange_tcp(server: tuple[str, int], query: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(server[0], server[1])
    try:
        writer.write(_LENGTH.pack(len(query)) + query)
        await writer.drain()
        (length,) = _LENGTH.unpack(await reader.readexactly(2))
        reply = await reader.readexactly(length)
    finally:
        writer.close()
    if not _is_answer(reply, query):
        raise UpstreamError("reply does not answer the query")
    return reply


class Upstream:
    def __init__(self, settings: UpstreamSettings, shuffle: random.Random | None = None) -> None:
        self.settings = settings
        self._random = shuffle or random.Random()

    async def forward(self, query: bytes, tcp: bool) -> bytes | None:
        """The first answer from a server, or None when every server failed (the caller answers SERVFAIL)."""
        servers = list(self.settings.servers)
        if not servers:
            return None
        if self.settings.parallel and len(servers) > 1:
            return await self._parallel(servers, query, tcp)
        self._random.shuffle(servers)
        for server in servers:
            try:
                return await self._exchange(server, query, tcp)
            except UpstreamError as exc:
                log.info("upstream failure: %s", exc)
        return None

    async def _exchange(self, server: tuple[str, int], query: bytes, tcp: bool) -> bytes:
        """One server's answer within the timeout; UpstreamError naming the server otherwise."""
        where = f"{'tcp' if tcp else 'udp'} {server[0]}:{server[1]}"
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await (_exchange_tcp if tcp else _exchange_udp)(server, query)
        except TimeoutError:
            raise UpstreamError(f"{where}: no answer within {self.settings.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError(f"{where}: {exc}") from None
        except UpstreamError as exc:
            raise UpstreamError(f"{where}: {exc}") from None

    async def _parallel(self, servers: Sequence[tuple[str, int]], query: bytes, tcp: bool) -> bytes | None:
        pending = {asyncio.ensure_future(self._exchange(server, query, tcp)) for server in servers}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        return task.result()
                    log.info("parallel querying upstream failure: %s", exc)
            log.info("all upstream failed")
            return None
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
