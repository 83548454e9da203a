"""The DNS proxy as the agent runs it: built from DnsSettings and resolv.conf, plus what the status server shows of
it (the readiness probe that waits for the first name table, and /debug/ndsz)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from agent.dns.metrics import DnsMetrics
from agent.dns.proxy import DnsProxy
from agent.dns.resolvconf import DNS_PORT, read_resolv_conf
from agent.dns.server import DnsServer
from agent.dns.settings import DnsSettings, listen_addresses
from agent.dns.sockets import SocketPair
from agent.dns.table import TableSettings, debug_table, load_name_table
from agent.dns.upstream import Upstream, UpstreamSettings

NOT_READY = "istio DNS capture is turned ON and DNS lookup table is not ready yet"
# The xDS type of istiod's name table: the xDS proxy subscribes to it on Envoy's first LDS request and hands its
# responses to `name_table_handler` instead of Envoy.
NDS_TYPE_URL = "type.googleapis.com/istio.networking.nds.v1.NameTable"


@dataclass
class DnsService:
    """A supervisor service (agent.supervisor.Service): start() serves the sockets, stop() closes them."""

    proxy: DnsProxy
    server: DnsServer

    async def start(self) -> None:
        """AgentError(STARTUP_FAILED) when an address cannot be bound (unless the sockets were bound before)."""
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    def readiness_probe(self) -> NameTableProbe:
        return NameTableProbe(self.proxy)

    def ndsz(self) -> str | None:
        """/debug/ndsz's body (None: 404 before the first table)."""
        return ndsz_json(self.proxy)


def build_dns_service(
    settings: DnsSettings, metrics: DnsMetrics, sockets: list[SocketPair] | None = None
) -> DnsService:
    """Reads resolv.conf (ConfigError naming it when unreadable). `sockets`: bound before (agent.dns.sockets, for
    listen_addresses(settings.address, ...)); otherwise start() binds them."""
    resolv = read_resolv_conf(settings.resolv_conf)
    upstream = Upstream(
        UpstreamSettings(
            servers=tuple((server, DNS_PORT) for server in resolv.servers),
            timeout=settings.forward_timeout,
            parallel=settings.forward_parallel,
        )
    )
    table_settings = TableSettings(settings.proxy_namespace, settings.proxy_domain, resolv.search)
    proxy = DnsProxy(table_settings, upstream, metrics, respond_before_sync=settings.respond_before_sync)
    server = DnsServer(
        proxy,
        listen_addresses(settings.address, resolv),
        max_pending_forwards=settings.max_pending_forwards,
        max_tcp_connections=settings.max_tcp_connections,
        sockets=sockets,
    )
    return DnsService(proxy, server)


def name_table_handler(proxy: DnsProxy) -> Callable[[Any], Awaitable[None]]:
    """The xDS proxy's handler for NDS responses: the resource (a google.protobuf.Any) becomes the served table
    once built; a resource that is not a NameTable raises, which the xDS proxy NACKs with the message."""

    async def handle(resource: Any) -> None:
        if resource.type_url != NDS_TYPE_URL:
            raise ValueError(f"expected a {NDS_TYPE_URL}, got {resource.type_url or 'no type'}")
        try:
            table = load_name_table(resource.value)
        except DecodeError as exc:
            raise ValueError(f"name table does not parse: {exc}") from None
        await proxy.update(table)

    return handle


class NameTableProbe:
    """A readiness probe (agent.status.readiness.Probe): not ready until the first name table arrived. Once it
    did, it stays passed: the table does not go away when Envoy restarts."""

    def __init__(self, proxy: DnsProxy) -> None:
        self.proxy = proxy

    @property
    def passed(self) -> bool:
        return self.proxy.ready

    async def check(self) -> None:
        from agent.status.readiness import NotReady  # noqa: PLC0415 (agent.status imports aiohttp)

        if not self.proxy.ready:
            raise NotReady(NOT_READY)

    def forget(self) -> None:
        """Nothing to forget: the name table comes from istiod, not from Envoy."""


def ndsz_json(proxy: DnsProxy) -> str | None:
    """/debug/ndsz's body (Istio: the table with each host's alternate names as entries of their own, protobuf
    JSON), or None before the first table (Istio answers 404 with `{}` then)."""
    table = proxy.name_table
    if table is None:
        return None
    shown = debug_table(table, proxy.table_settings)
    text: str = json_format.MessageToJson(shown, indent=None, sort_keys=True)
    return text
