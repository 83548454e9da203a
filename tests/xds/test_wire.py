"""The proxy's peek messages read and write the same bytes as the real ADS messages (xds-protos), and the CA
messages are what the CA client sends."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent.xds import wire
from agent.xds.proxy import DELTA, SOTW

BODY = any_pb2.Any(type_url="type.googleapis.com/x", value=b"\x01\x02")


def test_sotw_peeks() -> None:
    full = discovery_pb2.DiscoveryRequest(version_info="v", type_url="t", response_nonce="n", resource_names=["a"])
    full.node.id = "node"
    full.error_detail.message = "bad"
    peek = wire.SotwRequest.FromString(full.SerializeToString())
    assert (peek.version_info, peek.type_url, peek.response_nonce, peek.error_detail.message) == ("v", "t", "n", "bad")
    response = discovery_pb2.DiscoveryResponse(version_info="v", type_url="t", nonce="n", resources=[BODY])
    raw = response.SerializeToString()
    assert (wire.Response.FromString(raw).type_url, wire.Response.FromString(raw).nonce) == ("t", "n")
    assert SOTW.first_resource(raw) == BODY
    ack = discovery_pb2.DiscoveryRequest.FromString(SOTW.ack(wire.Response.FromString(raw), "no"))
    assert (ack.version_info, ack.type_url, ack.response_nonce, ack.error_detail.code, ack.error_detail.message) == (
        "v",
        "t",
        "n",
        13,
        "no",
    )
    assert discovery_pb2.DiscoveryRequest.FromString(SOTW.subscribe("t")) == discovery_pb2.DiscoveryRequest(
        type_url="t"
    )


def test_delta_peeks() -> None:
    full = discovery_pb2.DeltaDiscoveryRequest(type_url="t", response_nonce="n", resource_names_subscribe=["a"])
    full.error_detail.message = "bad"
    peek = wire.DeltaRequest.FromString(full.SerializeToString())
    assert (peek.type_url, peek.response_nonce, peek.error_detail.message) == ("t", "n", "bad")
    response = discovery_pb2.DeltaDiscoveryResponse(system_version_info="v", type_url="t", nonce="n")
    response.resources.append(discovery_pb2.Resource(name="r", version="1", resource=BODY))
    raw = response.SerializeToString()
    assert DELTA.first_resource(raw) == BODY
    ack = discovery_pb2.DeltaDiscoveryRequest.FromString(DELTA.ack(wire.Response.FromString(raw), None))
    assert (ack.type_url, ack.response_nonce, ack.HasField("error_detail")) == ("t", "n", False)
    assert DELTA.first_resource(discovery_pb2.DeltaDiscoveryResponse(type_url="t").SerializeToString()) is None
