"""An upstream DNS server for the tests, on real UDP and TCP sockets (one port), answering from what the test
scripts: `records` (A/AAAA by name), NXDOMAIN for the rest, and names that misbehave on purpose:

- `silent`: never answered (the forwarder must time out);
- `giant`: 64 A records (about 2 KiB): over UDP the answer is cut to the client's size with TC set and no records,
  as a compliant server does; a name in `giant_unfit` is sent whole over UDP anyway, as a non-compliant one does.

It stands in for the resolv.conf server of a pod (kube-dns), which cannot run here; the proxy under test reaches
it exactly as it would reach a real one. In-process (`async with ScriptedResolver(...)`) or as a process inside
a network namespace (`python -m tests.dns.resolver HOST PORT name=ip ...`: prints "ready", then a line
`query PROTOCOL NAME TYPE PEER` per query; silent.test is silent, giant.test giant).
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import sys
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from agent.dns.sockets import bind_pair

GIANT_ADDRESSES = tuple(f"240.0.0.{i}" for i in range(64))


class ScriptedResolver:
    def __init__(
        self,
        records: Mapping[str, Iterable[str]] | None = None,
        *,
        silent: Iterable[str] = (),
        giant: Iterable[str] = (),
        giant_unfit: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        log_queries: bool = False,
    ) -> None:
        self.records = {_absolute(k): list(v) for k, v in (records or {}).items()}
        self.silent = {_absolute(n) for n in silent}
        self.giant = {_absolute(n) for n in giant} | {_absolute(n) for n in giant_unfit}
        self.giant_unfit = {_absolute(n) for n in giant_unfit}
        self.host = host
        self.port = port
        # (protocol, lower-case name, type) of every query received, in order.
        self.queries: list[tuple[str, str, str]] = []
        self.received = asyncio.Event()
        self.log_queries = log_queries
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedResolver:
        await self.start()
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        resolver = self

        class _Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                answer = resolver.answer(data, tcp=False, peer=str(addr[0]))
                if answer is not None:
                    self.transport.sendto(answer, addr)

        udp, tcp = bind_pair(self.host, self.port)
        self.port = udp.getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(_Udp, sock=udp)
        self._udp = transport
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                peer = str(writer.get_extra_info("peername")[0])
                answer = self.answer(await reader.readexactly(length), tcp=True, peer=peer)
                if answer is not None:
                    writer.write(struct.pack("!H", len(answer)) + answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def answer(self, data: bytes, tcp: bool, peer: str = "") -> bytes | None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().lower()
        seen = ("tcp" if tcp else "udp", name, dns.rdatatype.to_text(question.rdtype))
        self.queries.append(seen)
        self.received.set()
        if self.log_queries:
            print("query", *seen, peer, flush=True)
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        addresses = GIANT_ADDRESSES if name in self.giant else self.records.get(name)
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        wanted = [a for a in addresses if ipaddress.ip_address(a).version == (6 if question.rdtype == 28 else 4)]
        if wanted and question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            rrset = dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN, question.rdtype, wanted)
            response.answer.append(rrset)
        if tcp or name in self.giant_unfit:
            return response.to_wire()
        limit = query.payload if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=max(limit, 512))
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()


def _absolute(name: str) -> str:
    return name.lower() if name.endswith(".") else name.lower() + "."


async def _main(argv: list[str]) -> None:
    host, port, *specs = argv
    records: dict[str, list[str]] = {}
    for spec in specs:
        name, _, address = spec.partition("=")
        records.setdefault(name, []).append(address)
    async with ScriptedResolver(
        records, host=host, port=int(port), silent=["silent.test"], giant=["giant.test"], log_queries=True
    ):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
