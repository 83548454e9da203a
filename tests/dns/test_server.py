"""The DNS proxy on real loopback sockets, forwarding to a scripted upstream server (tests/dns/resolver.py)."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client import CollectorRegistry

from agent.dns.metrics import DnsMetrics
from agent.dns.proxy import DnsProxy
from agent.dns.server import DnsServer
from agent.dns.table import LookupTable, TableSettings, name_table_from
from agent.dns.upstream import Upstream, UpstreamSettings
from tests.dns.istio_cases import CASES, SETTINGS, TABLE, Record
from tests.dns.resolver import GIANT_ADDRESSES, ScriptedResolver

UPSTREAM_RECORDS = {"www.bing.com.": ["1.1.1.1"], "upstream.example.": ["192.0.2.7", "2001:db8::7"]}


@dataclass
class Running:
    proxy: DnsProxy
    server: DnsServer
    registry: CollectorRegistry
    resolver: ScriptedResolver

    @property
    def port(self) -> int:
        return self.server.port()

    async def ask(self, name: str, rdtype: str = "A", tcp: bool = False, **kwargs: object) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
        if tcp:
            return await dns.asyncquery.tcp(query, "127.0.0.1", timeout=5, port=self.port)
        return await dns.asyncquery.udp(query, "127.0.0.1", timeout=5, port=self.port)

    def metric(self, name: str) -> float:
        value = self.registry.get_sample_value(name)
        return 0.0 if value is None else value


Starter = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start() -> AsyncIterator[Starter]:
    """start(servers=None, table=True, timeout=1.0, parallel=False, **server_kwargs): a proxy with Istio's test
    table forwarding to a fresh scripted resolver (or to `servers`)."""
    cleanup: list[Callable[[], Awaitable[None]]] = []

    async def _start(
        *,
        servers: tuple[tuple[str, int], ...] | None = None,
        table: bool = True,
        timeout: float = 1.0,
        parallel: bool = False,
        respond_before_sync: bool = False,
        settings: TableSettings = SETTINGS,
        max_pending_forwards: int = 1024,
        max_tcp_connections: int = 256,
    ) -> Running:
        resolver = ScriptedResolver(UPSTREAM_RECORDS, silent=["silent.example."], giant=["giant."],
                                    giant_unfit=["giant-unfit."])  # fmt: skip
        await resolver.start()
        cleanup.append(resolver.stop)
        registry = CollectorRegistry()
        upstream = Upstream(UpstreamSettings(servers or (resolver.address,), timeout, parallel))
        proxy = DnsProxy(settings, upstream, DnsMetrics(registry), respond_before_sync=respond_before_sync)
        if table:
            proxy.set_table(name_table_from(TABLE))
        server = DnsServer(
            proxy,
            [("127.0.0.1", 0)],
            max_pending_forwards=max_pending_forwards,
            max_tcp_connections=max_tcp_connections,
        )
        await server.start()
        cleanup.append(server.stop)
        return Running(proxy, server, registry, resolver)

    yield _start
    for stop in reversed(cleanup):
        await stop()


def records_of(message: dns.message.Message) -> list[Record]:
    return [
        (rrset.name.to_text().lower(), dns.rdatatype.to_text(rrset.rdtype), rdata.to_text().lower())
        for rrset in message.answer
        for rdata in rrset
    ]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_istio_cases_over_the_wire(start: Starter, tcp: bool) -> None:
    running = await start()
    for name, rdtype, expected in CASES:
        message = await running.ask(name, rdtype, tcp=tcp)
        if expected is None:
            # Forwarded: the upstream's answer, passed on (NXDOMAIN for what it does not know).
            assert not message.flags & dns.flags.AA, name
            wanted = [(name, "A", ip) for ip in UPSTREAM_RECORDS.get(name, []) if rdtype == "A"]
            assert records_of(message) == wanted, name
            assert message.rcode() == (dns.rcode.NOERROR if wanted else dns.rcode.NXDOMAIN), name
        else:
            assert message.rcode() == dns.rcode.NOERROR, name
            assert message.flags & dns.flags.AA, name
            assert sorted(records_of(message)) == sorted(expected), name
    forwarded = [(name, rdtype) for name, rdtype, expected in CASES if expected is None]
    protocol = "tcp" if tcp else "udp"
    assert running.resolver.queries == [(protocol, n, t) for n, t in forwarded]
    assert running.metric("istio_agent_dns_requests_total") == len(CASES)
    assert running.metric("istio_agent_dns_upstream_requests_total") == len(forwarded)
    assert running.metric("istio_agent_dns_upstream_request_duration_seconds_count") == len(forwarded)
    assert running.metric("istio_agent_dns_upstream_failures_total") == 0


async def test_servfail_until_the_first_table(start: Starter) -> None:
    running = await start(table=False)
    assert not running.proxy.ready
    for name in ("www.google.com.", "www.bing.com."):
        message = await running.ask(name)
        assert message.rcode() == dns.rcode.SERVFAIL
    assert running.resolver.queries == []
    running.proxy.set_table(name_table_from(TABLE))
    assert running.proxy.ready
    assert records_of(await running.ask("www.google.com.")) == [("www.google.com.", "A", "1.1.1.1")]


async def test_respond_before_sync_forwards_before_the_first_table(start: Starter) -> None:
    running = await start(table=False, respond_before_sync=True)
    assert records_of(await running.ask("www.bing.com.")) == [("www.bing.com.", "A", "1.1.1.1")]


async def test_truncated_udp_answer_then_tcp_retry(start: Starter) -> None:
    """A compliant upstream cuts a 64-record answer over UDP (TC, no records); the client retries over TCP and the
    proxy forwards the retry over TCP."""
    running = await start()
    over_udp = await running.ask("giant.")
    assert over_udp.flags & dns.flags.TC
    query = dns.message.make_query("giant.", "A")
    message, used_tcp = await dns.asyncquery.udp_with_fallback(query, "127.0.0.1", timeout=5, port=running.port)
    assert used_tcp
    assert sorted(r[2] for r in records_of(message)) == sorted(GIANT_ADDRESSES)
    assert [q[0] for q in running.resolver.queries] == ["udp", "udp", "tcp"]


async def test_oversized_udp_answer_is_cut_to_the_client_size(start: Starter) -> None:
    """A non-compliant upstream sends 2 KiB over UDP: the client (no EDNS) gets at most 512 bytes, TC set, and what
    fits. (Istio's agent answers SERVFAIL here: its upstream read buffer is 512 bytes.)"""
    running = await start()
    message = await running.ask("giant-unfit.")
    assert message.flags & dns.flags.TC
    assert 0 < len(records_of(message)) < 64
    assert len(message.to_wire()) <= 512


async def test_edns_client_gets_the_large_answer_over_udp(start: Starter) -> None:
    running = await start()
    message = await running.ask("giant.", use_edns=0, payload=65535)
    assert not message.flags & dns.flags.TC
    assert len(records_of(message)) == 64


async def test_a_large_table_answer_is_truncated_over_udp_and_whole_over_tcp(start: Starter) -> None:
    running = await start()
    ips = [f"10.1.{i // 250}.{i % 250}" for i in range(200)]
    running.proxy.set_table(name_table_from({"headless.example.com": {"ips": ips, "registry": "External"}}))
    over_udp = await running.ask("headless.example.com.")
    assert over_udp.flags & dns.flags.TC and over_udp.flags & dns.flags.AA
    assert 0 < len(records_of(over_udp)) < 200
    over_tcp = await running.ask("headless.example.com.", tcp=True)
    assert sorted(r[2] for r in records_of(over_tcp)) == sorted(ips)


async def test_silent_upstream_gives_servfail_after_the_timeout(start: Starter) -> None:
    running = await start(timeout=0.3)
    started = time.monotonic()
    message = await running.ask("silent.example.")
    elapsed = time.monotonic() - started
    assert message.rcode() == dns.rcode.SERVFAIL
    assert 0.3 <= elapsed < 1.5
    assert running.metric("istio_agent_dns_upstream_failures_total") == 1


async def test_unreachable_upstream_fails_fast(start: Starter) -> None:
    """Nothing listens on the upstream port: the ICMP error ends the wait long before the timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()
    running = await start(servers=(closed,), timeout=5.0)
    started = time.monotonic()
    for tcp in (False, True):
        message = await running.ask("www.bing.com.", tcp=tcp)
        assert message.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
async def test_a_dead_server_before_a_good_one(start: Starter, parallel: bool) -> None:
    """Two resolv.conf servers, one silent. Sequential: the answer comes at the latest after one timeout (the order
    is shuffled per query); parallel: at once."""
    silent = ScriptedResolver(silent=["www.bing.com."])
    await silent.start()
    try:
        good = ScriptedResolver(UPSTREAM_RECORDS)
        await good.start()
        try:
            # Parallel: a timeout far above any scheduling delay of a loaded machine, so "did not wait for the silent
            # server" is told apart from "slow" by half of it (a 0.4 s bound left a loaded machine little room).
            timeout = 3.0 if parallel else 0.5
            running = await start(servers=(silent.address, good.address), timeout=timeout, parallel=parallel)
            for _ in range(4):
                started = time.monotonic()
                message = await running.ask("www.bing.com.")
                elapsed = time.monotonic() - started
                assert records_of(message) == [("www.bing.com.", "A", "1.1.1.1")]
                assert elapsed < (timeout / 2 if parallel else 1.4)
        finally:
            await good.stop()
    finally:
        await silent.stop()


async def test_pending_forwards_are_bounded(start: Starter, caplog: pytest.LogCaptureFixture) -> None:
    """A flood of queries the upstream never answers: at most max_pending_forwards wait, the rest get SERVFAIL at
    once, and table answers keep flowing meanwhile. The log says so once, not once per query (an upstream outage
    under an application that retries wrote thousands of lines a second)."""
    running = await start(timeout=2.0, max_pending_forwards=20)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setblocking(False)
        await loop.sock_connect(client, ("127.0.0.1", running.port))
        for i in range(200):
            query = dns.message.make_query("silent.example.", "A", id=i)
            await loop.sock_sendall(client, query.to_wire())
        rcodes: list[int] = []
        async with asyncio.timeout(1.5):
            while len(rcodes) < 180:
                rcodes.append(dns.message.from_wire(await loop.sock_recv(client, 65535)).rcode())
    assert rcodes == [dns.rcode.SERVFAIL] * 180
    assert len(running.server._forwards) == 20
    assert len([r for r in caplog.records if "already waiting for the upstream" in r.getMessage()]) == 1
    assert records_of(await running.ask("www.google.com.")) == [("www.google.com.", "A", "1.1.1.1")]


async def test_malformed_packets_do_not_stop_the_server(start: Starter) -> None:
    """Random bytes, truncated and bit-flipped queries: answered FORMERR/NOTIMP or ignored, and the server keeps
    answering; its memory of queries stays within its bound."""
    running = await start()
    rng = random.Random(11)
    valid = dns.message.make_query("www.google.com.", "A", id=rng.randrange(65536)).to_wire()
    packets = [rng.randbytes(rng.randrange(0, 300)) for _ in range(600)]
    packets += [valid[: rng.randrange(len(valid))] for _ in range(300)]
    for _ in range(600):
        mutated = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        packets.append(bytes(mutated))
    rng.shuffle(packets)
    # A reply carries the id of what it answers (FORMERR and NOTIMP echo it too), and the packets made from `valid`
    # carry its id or that id with a bit flipped: the check queries take ids that no packet sent carries, so the
    # reply with a check id is the check's own answer.
    used = {int.from_bytes(packet[:2]) for packet in packets if len(packet) >= 2}
    check_ids = (i for i in range(60000, 65536) if i not in used)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setblocking(False)
        await loop.sock_connect(client, ("127.0.0.1", running.port))
        # In batches, each followed by a valid query that must be answered (and that paces the sender, so the
        # kernel's socket buffers do not drop packets).
        for batch in range(0, len(packets), 100):
            for packet in packets[batch : batch + 100]:
                await loop.sock_sendall(client, packet)
            check_id = next(check_ids)
            await loop.sock_sendall(client, struct.pack("!H", check_id) + valid[2:])
            async with asyncio.timeout(5):
                while True:
                    # Every reply is a well-formed DNS message.
                    message = dns.message.from_wire(await loop.sock_recv(client, 65535))
                    if message.id == check_id:
                        assert records_of(message) == [("www.google.com.", "A", "1.1.1.1")]
                        break
    assert len(running.proxy.reader._seen) <= running.proxy.reader.capacity
    assert records_of(await running.ask("www.google.com.", tcp=True)) == [("www.google.com.", "A", "1.1.1.1")]


async def test_tcp_carries_several_queries_and_bounds_connections(start: Starter) -> None:
    running = await start(max_tcp_connections=2)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    names = ["www.google.com.", "www.bing.com.", "productpage."]
    for i, name in enumerate(names):
        wire = dns.message.make_query(name, "A", id=i).to_wire()
        writer.write(struct.pack("!H", len(wire)) + wire)
    await writer.drain()
    for i in range(len(names)):
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        message = dns.message.from_wire(await reader.readexactly(length))
        assert message.id == i and message.answer
    second = await asyncio.open_connection("127.0.0.1", running.port)
    third = await asyncio.open_connection("127.0.0.1", running.port)
    async with asyncio.timeout(5):
        assert await third[0].read() == b""  # closed at once: two connections are open
    for w in (writer, second[1], third[1]):
        w.close()


async def test_stop_releases_the_ports_and_the_work(start: Starter) -> None:
    running = await start(timeout=5.0)
    slow = asyncio.ensure_future(running.ask("silent.example."))
    async with asyncio.timeout(2):
        await running.resolver.received.wait()
    assert running.server._forwards
    await running.server.stop()
    assert not running.server._forwards
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", running.port))
    slow.cancel()
    with pytest.raises((asyncio.CancelledError, dns.exception.Timeout)):
        await slow


async def test_a_busy_port_fails_the_start(start: Starter) -> None:
    from agent.errors import AgentError, ExitCode  # noqa: PLC0415

    running = await start()
    other = DnsServer(running.proxy, [("127.0.0.1", running.port)])
    with pytest.raises(AgentError) as raised:
        await other.start()
    assert raised.value.exit_code == ExitCode.STARTUP_FAILED
    assert "address already in use" in str(raised.value)


async def test_update_builds_off_the_loop_and_swaps(start: Starter) -> None:
    running = await start(table=False)
    await running.proxy.update(name_table_from({"late.example.com": {"ips": ["9.8.7.6"], "registry": "External"}}))
    assert running.proxy.tables_received == 1
    assert records_of(await running.ask("late.example.com.")) == [("late.example.com.", "A", "9.8.7.6")]
    assert isinstance(running.proxy.build(name_table_from({})), LookupTable)


async def test_serves_sockets_bound_before_the_loop(start: Starter) -> None:
    """`pilot-agent proxy` binds the DNS sockets before Envoy's exec; the server then serves them as they are."""
    from agent.dns.sockets import bind_dns_sockets  # noqa: PLC0415

    running = await start()
    pairs = bind_dns_sockets([("127.0.0.1", 0)])
    port = pairs[0][0].getsockname()[1]
    server = DnsServer(running.proxy, [("127.0.0.1", port)], sockets=pairs)
    await server.start()
    try:
        assert server.bound == [("udp", "127.0.0.1", port), ("tcp", "127.0.0.1", port)]
        query = dns.message.make_query("www.google.com.", "A")
        for ask in (dns.asyncquery.udp, dns.asyncquery.tcp):
            message = await ask(query, "127.0.0.1", timeout=5, port=port)
            assert records_of(message) == [("www.google.com.", "A", "1.1.1.1")]
    finally:
        await server.stop()


async def test_ipv6_listener_and_upstream() -> None:
    """A pod whose resolv.conf server is IPv6: the proxy listens on ::1 and forwards over IPv6."""
    async with ScriptedResolver(UPSTREAM_RECORDS, host="::1") as resolver:
        upstream = Upstream(UpstreamSettings((resolver.address,), 1.0))
        proxy = DnsProxy(SETTINGS, upstream, DnsMetrics(CollectorRegistry()))
        proxy.set_table(name_table_from(TABLE))
        server = DnsServer(proxy, [("::1", 0)])
        await server.start()
        try:
            for name, expected in (("www.google.com.", "1.1.1.1"), ("www.bing.com.", "1.1.1.1")):
                for ask in (dns.asyncquery.udp, dns.asyncquery.tcp):
                    message = await ask(dns.message.make_query(name, "A"), "::1", timeout=5, port=server.port())
                    assert records_of(message) == [(name, "A", expected)]
        finally:
            await server.stop()
    assert [q[:2] for q in resolver.queries] == [("udp", "www.bing.com."), ("tcp", "www.bing.com.")]
