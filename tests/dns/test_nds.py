"""NDS through the xDS proxy into the DNS proxy: the name table istiod sends on an Envoy stream is subscribed on
Envoy's first LDS request, consumed by the agent (not forwarded to Envoy), ACKed, and answered from at once; a
table that does not parse is NACKed and the one served before stays. State of the world and delta.

The xDS proxy (agent.xds) and the DNS proxy (agent.dns) are the real ones; "Envoy" is a gRPC client on the
proxy's socket and istiod the scripted upstream of the xDS tests (tests/xds/fake_upstream.py): the end-to-end
test with the real Envoy and istiod is in tests/mesh."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import grpc.aio
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from prometheus_client import CollectorRegistry

from agent.dns.metrics import DnsMetrics
from agent.dns.service import NDS_TYPE_URL, DnsService, build_dns_service, name_table_handler
from agent.dns.settings import DnsSettings
from agent.dns.table import name_table_from
from agent.mesh.listen import xds_listener
from agent.security.settings import UpstreamSettings
from agent.xds.metrics import XdsMetrics
from agent.xds.proxy import LISTENER_TYPE, XdsProxy
from agent.xds.settings import XdsProxySettings
from tests.xds.fake_upstream import FakeUpstream, UpstreamStream, fake_upstream

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
METHODS = {"sotw": "StreamAggregatedResources", "delta": "DeltaAggregatedResources"}


def request_type(protocol: str) -> Any:
    return discovery_pb2.DiscoveryRequest if protocol == "sotw" else discovery_pb2.DeltaDiscoveryRequest


def name_table_response(protocol: str, nonce: str, hosts: dict[str, Any] | None, raw: bytes = b"") -> bytes:
    resource = any_pb2.Any()
    if hosts is not None:
        resource.Pack(name_table_from(hosts))
    else:
        resource.type_url, resource.value = NDS_TYPE_URL, raw
    if protocol == "sotw":
        message: Any = discovery_pb2.DiscoveryResponse(type_url=NDS_TYPE_URL, nonce=nonce, version_info=nonce)
        message.resources.append(resource)
    else:
        message = discovery_pb2.DeltaDiscoveryResponse(type_url=NDS_TYPE_URL, nonce=nonce)
        message.resources.append(discovery_pb2.Resource(name="", resource=resource))
    return bytes(message.SerializeToString())


@dataclass
class Rig:
    xds: XdsProxy
    service: DnsService
    upstream: FakeUpstream
    channel: grpc.aio.Channel

    async def ask(self, name: str) -> dns.message.Message:
        query = dns.message.make_query(name, "A")
        return await dns.asyncquery.udp(query, "127.0.0.1", timeout=5, port=self.service.server.port())


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    directory = Path(tempfile.mkdtemp(prefix="nds", dir="/tmp"))  # a unix socket path must stay short
    resolv = directory / "resolv.conf"
    resolv.write_text("search ns1.svc.cluster.local\nnameserver 127.0.0.1\n")
    registry = CollectorRegistry()
    settings = DnsSettings(
        "127.0.0.1:0", resolv_conf=resolv, proxy_namespace="ns1", proxy_domain="ns1.svc.cluster.local"
    )
    service = build_dns_service(settings, DnsMetrics(registry))
    await service.server.start()
    try:
        async with fake_upstream() as upstream:
            upstream_settings = UpstreamSettings(address=f"127.0.0.1:{upstream.port}", tls=None)
            xds_settings = XdsProxySettings(str(directory / "XDS"), upstream_settings)
            xds = XdsProxy(xds_settings, XdsMetrics(registry), xds_listener(xds_settings.socket_path))
            xds.register_handler(NDS_TYPE_URL, name_table_handler(service.proxy))
            await xds.start()
            channel = grpc.aio.insecure_channel(f"unix:{xds_settings.socket_path}")
            try:
                yield Rig(xds, service, upstream, channel)
            finally:
                await channel.close()
                await xds.stop()
    finally:
        await service.server.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def envoy_asks_for_listeners(rig: Rig, protocol: str) -> tuple[Any, UpstreamStream]:
    """An Envoy stream sending CDS then LDS; the upstream sees them and then the proxy's NDS subscription."""
    envoy = rig.channel.stream_stream(f"/envoy.service.discovery.v3.AggregatedDiscoveryService/{METHODS[protocol]}")()
    kind = request_type(protocol)
    await envoy.write(kind(type_url=CLUSTER).SerializeToString())
    stream = await rig.upstream.next_stream()
    assert kind.FromString(await stream.request()).type_url == CLUSTER
    await envoy.write(kind(type_url=LISTENER_TYPE).SerializeToString())
    assert kind.FromString(await stream.request()).type_url == LISTENER_TYPE
    assert kind.FromString(await stream.request()).type_url == NDS_TYPE_URL
    return envoy, stream


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_name_table_from_istiod_is_served_and_acked(rig: Rig, protocol: str) -> None:
    envoy, stream = await envoy_asks_for_listeners(rig, protocol)
    assert (await rig.ask("db.example.com.")).rcode() == dns.rcode.SERVFAIL  # no table yet
    kind = request_type(protocol)

    stream.send(name_table_response(protocol, "nds-1", {"db.example.com": {"ips": ["10.1.2.3"], "registry": "X"}}))
    ack = kind.FromString(await stream.request())
    assert (ack.type_url, ack.response_nonce, ack.HasField("error_detail")) == (NDS_TYPE_URL, "nds-1", False)
    assert rig.service.proxy.ready
    answer = await rig.ask("db.example.com.ns1.svc.cluster.local.")
    assert [rrset.to_text() for rrset in answer.answer] == [
        "db.example.com.ns1.svc.cluster.local. 30 IN CNAME db.example.com.",
        "db.example.com. 30 IN A 10.1.2.3",
    ]

    stream.send(name_table_response(protocol, "nds-2", None, raw=b"\x0a\x05broken"))
    nack = kind.FromString(await stream.request())
    assert (nack.response_nonce, nack.HasField("error_detail")) == ("nds-2", True)
    assert "does not parse" in nack.error_detail.message
    assert [rrset.to_text() for rrset in (await rig.ask("db.example.com.")).answer] == [
        "db.example.com. 30 IN A 10.1.2.3"
    ]

    stream.send(name_table_response(protocol, "nds-3", {"db.example.com": {"ips": ["10.9.9.9"], "registry": "X"}}))
    assert kind.FromString(await stream.request()).response_nonce == "nds-3"
    assert [rrset.to_text() for rrset in (await rig.ask("db.example.com.")).answer] == [
        "db.example.com. 30 IN A 10.9.9.9"
    ]
    # None of it reached Envoy: its next message is the cluster response sent afterwards.
    clusters = discovery_pb2.DiscoveryResponse(type_url=CLUSTER, nonce="c1") if protocol == "sotw" else (
        discovery_pb2.DeltaDiscoveryResponse(type_url=CLUSTER, nonce="c1"))  # fmt: skip
    stream.send(bytes(clusters.SerializeToString()))
    async with asyncio.timeout(10):
        raw = await envoy.read()
    assert raw == bytes(clusters.SerializeToString())
