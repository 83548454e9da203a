"""The SDS server's stream rules, case by case as Istio's sdsservice_test.go lists them, over the real unix socket.

"No response" is never asserted with a sleep: after the request that must go unanswered, the test sends one that
must be answered with something distinguishable (a name not asked for before). The server handles a stream's
requests in order, so an answer to the first would arrive before the answer to the second.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from agent.mesh.listen import sds_listener
from agent.security import sds_wire
from agent.security.caclient import CaError
from agent.security.metrics import SecurityMetrics
from agent.security.sds import SdsServer, to_envoy_secret
from agent.security.secret_cache import SecretCache
from agent.security.secrets import SecretItem
from agent.security.settings import SecretCacheSettings
from agent.security.uds import socket_is_healthy
from tests.security.conftest import IDENTITY, StubSigner
from tests.security.sds_client import SdsStream, sds_channel, secrets_of
from tests.support.mesh_pki import MeshCa, serial_of, uri_sans


class Rig:
    def __init__(self, server: SdsServer, signer: StubSigner, open_stream: Callable[[], SdsStream], roots: Path):
        self.server = server
        self.signer = signer
        self.open = open_stream
        self.roots = roots  # a directory of root files: file-root:<path> names that are always answerable
        self._extra = 0

    def new_root_name(self) -> str:
        """A name never requested before, whose answer proves nothing else was pending on the stream."""
        self._extra += 1
        path = self.roots / f"root{self._extra}.pem"
        path.write_bytes(self.signer.ca.root_pem)
        return f"file-root:{path}"


@pytest.fixture
async def rig(short_dir: Path, mesh_ca: MeshCa) -> AsyncIterator[Rig]:
    signer = StubSigner(mesh_ca)
    cache = SecretCache(
        SecretCacheSettings(identity=IDENTITY, cert_chain_file=str(short_dir / "none/cert-chain.pem")),
        signer,
        SecurityMetrics(CollectorRegistry()),
    )
    server = SdsServer(cache, sds_listener(str(short_dir / "sds/socket")))
    await server.start()
    roots = short_dir / "roots"
    roots.mkdir()
    try:
        async with sds_channel(server.socket_path) as open_stream:
            yield Rig(server, signer, open_stream, roots)
    finally:
        await server.stop()


def assert_cert(response: Any, ca: MeshCa) -> bytes:
    secrets = secrets_of(response)
    assert list(secrets) == ["default"]
    chain = secrets["default"].tls_certificate.certificate_chain.inline_bytes
    assert uri_sans(chain) == [IDENTITY]
    assert chain.endswith(ca.root_pem)  # leaf, intermediate, root: everything the CA returned
    assert b"PRIVATE KEY" in secrets["default"].tls_certificate.private_key.inline_bytes
    return bytes(chain)


def assert_root(response: Any, ca: MeshCa, name: str = "ROOTCA") -> None:
    secrets = secrets_of(response)
    assert list(secrets) == [name]
    assert secrets[name].validation_context.trusted_ca.inline_bytes == ca.root_pem


async def assert_silent(stream: SdsStream, rig: Rig, last: Any, names: list[str]) -> Any:
    """Nothing else is pending on `stream`: a request adding a fresh name is answered with that name alone."""
    fresh = rig.new_root_name()
    response = await stream.request_response_ack([*names, fresh], nonce=last.nonce, version=last.version_info)
    assert list(secrets_of(response)) == [fresh]
    return response


async def test_socket_is_open_to_everyone_and_healthy(rig: Rig) -> None:
    assert os.stat(rig.server.socket_path).st_mode & 0o777 == 0o666
    assert await socket_is_healthy(rig.server.socket_path)


async def test_multiplexed_second_request_gets_only_the_added_name(rig: Rig, mesh_ca: MeshCa) -> None:
    stream = rig.open()
    first = await stream.request_response_ack(["default"])
    assert_cert(first, mesh_ca)
    second = await stream.request_response_ack(["default", "ROOTCA"], nonce=first.nonce)
    assert_root(second, mesh_ca)
    await assert_silent(stream, rig, second, ["default", "ROOTCA"])
    assert rig.signer.calls == 1  # one CSR served both names


async def test_root_first_then_cert_without_nonce(rig: Rig, mesh_ca: MeshCa) -> None:
    stream = rig.open()
    assert_root(await stream.request_response_ack(["ROOTCA"]), mesh_ca)
    # No nonce: a fresh subscription, answered with everything it names.
    response = await stream.request_response_ack(["default"])
    assert_cert(response, mesh_ca)
    await assert_silent(stream, rig, response, ["default"])


async def test_same_name_again_with_the_nonce_is_not_answered(rig: Rig, mesh_ca: MeshCa) -> None:
    stream = rig.open()
    first = await stream.request_response_ack(["ROOTCA"])
    assert_root(first, mesh_ca)
    # request_response_ack already sent the ACK; a second identical ACK changes nothing either.
    await stream.request(["ROOTCA"], nonce=first.nonce)
    await assert_silent(stream, rig, first, ["ROOTCA"])


async def test_parallel_streams_each_get_their_names(rig: Rig, mesh_ca: MeshCa) -> None:
    cert, root = rig.open(), rig.open()
    cert_response = await cert.request_response_ack(["default"])
    root_response = await root.request_response_ack(["ROOTCA"])
    assert_cert(cert_response, mesh_ca)
    assert_root(root_response, mesh_ca)
    await assert_silent(cert, rig, cert_response, ["default"])
    await assert_silent(root, rig, root_response, ["ROOTCA"])


async def test_secret_that_cannot_be_made_ends_the_stream_then_a_new_one_works(rig: Rig, mesh_ca: MeshCa) -> None:
    rig.signer.fail_with = CaError("create certificate: UNAVAILABLE: CA down", grpc.StatusCode.UNAVAILABLE)
    stream = rig.open()
    await stream.request(["default"])
    error = await stream.error()
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert "failed to generate workload certificate" in (error.details() or "")
    rig.signer.fail_with = None
    assert_cert(await rig.open().request_response_ack(["default"]), mesh_ca)


async def test_push_goes_only_to_streams_watching_the_name(rig: Rig, mesh_ca: MeshCa) -> None:
    cert, root = rig.open(), rig.open()
    first = await cert.request_response_ack(["default"])
    root_response = await root.request_response_ack(["ROOTCA"])
    old = serial_of(assert_cert(first, mesh_ca))
    # What the rotation timer does: forget the certificate and tell SDS.
    rig.server.cache._workload = None
    rig.server.push("default")
    pushed = await cert.response()
    assert serial_of(assert_cert(pushed, mesh_ca)) != old
    await root.request(["ROOTCA"], nonce=root_response.nonce)
    await assert_silent(root, rig, root_response, ["ROOTCA"])


async def test_push_after_the_secret_fails_ends_the_stream(rig: Rig, mesh_ca: MeshCa) -> None:
    stream = rig.open()
    assert_cert(await stream.request_response_ack(["default"]), mesh_ca)
    rig.signer.fail_with = CaError("create certificate: UNAVAILABLE: CA down", grpc.StatusCode.UNAVAILABLE)
    rig.server.cache._workload = None
    rig.server.push("default")
    assert "failed to generate" in ((await stream.error()).details() or "")


@pytest.mark.parametrize("close_first", [True, False], ids=["reconnect", "concurrent-reconnect"])
async def test_reconnect_with_an_old_nonce_is_answered(rig: Rig, mesh_ca: MeshCa, close_first: bool) -> None:
    stream = rig.open()
    first = await stream.request_response_ack(["default"])
    if close_first:
        stream.call.cancel()
    again = await rig.open().request_response_ack(["default"], nonce=first.nonce, version=first.version_info)
    assert_cert(again, mesh_ca)


async def test_unsubscribe_is_not_answered(rig: Rig, mesh_ca: MeshCa) -> None:
    stream = rig.open()
    first = await stream.request_response_ack(["default"])
    await stream.request([], nonce=first.nonce, version=first.version_info)
    # Unsubscribed: the stream watches nothing, so the next request is a fresh subscription (answered in full).
    fresh = rig.new_root_name()
    response = await stream.request_response_ack([fresh], nonce=first.nonce)
    assert list(secrets_of(response)) == [fresh]


async def test_nack_is_not_answered(rig: Rig, mesh_ca: MeshCa) -> None:
    stream = rig.open()
    await stream.request(["ROOTCA"])
    response = await stream.response()
    await stream.request(["ROOTCA"], nonce=response.nonce, error="bad secret")
    await assert_silent(stream, rig, response, ["ROOTCA"])


async def test_stale_nonce_is_ignored(rig: Rig, mesh_ca: MeshCa) -> None:
    stream = rig.open()
    first = await stream.request_response_ack(["ROOTCA"])
    fresh = rig.new_root_name()
    await stream.request(["ROOTCA", fresh], nonce="not-the-last-nonce")
    # The stale request added `fresh` but was ignored: asked again with the real nonce, it is answered.
    response = await stream.request_response_ack(["ROOTCA", fresh], nonce=first.nonce)
    assert list(secrets_of(response)) == [fresh]


async def test_first_request_without_node_is_refused(rig: Rig) -> None:
    stream = rig.open()
    await stream.request(["default"], node=False)
    error = await stream.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "missing node information"


async def test_delta_and_fetch_are_unimplemented(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(f"unix:{rig.server.socket_path}") as channel:
        fetch = channel.unary_unary("/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await fetch(b"")
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        delta = channel.stream_stream("/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets")()
        await delta.write(b"")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await delta.read()
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_request_before_the_server_is_attached_waits_for_it(short_dir: Path, mesh_ca: MeshCa) -> None:
    """`pilot-agent proxy` listens before Envoy's exec and attaches the SDS server after it."""
    listener = sds_listener(str(short_dir / "early/socket"))
    await listener.start()
    metrics = SecurityMetrics(CollectorRegistry())
    cache = SecretCache(SecretCacheSettings(identity=IDENTITY), StubSigner(mesh_ca), metrics)
    server = SdsServer(cache, listener)
    try:
        async with sds_channel(listener.path) as open_stream:
            stream = open_stream()
            await stream.request(["ROOTCA"])
            await server.start()
            assert_root(await stream.response(), mesh_ca)
    finally:
        await server.stop()


@pytest.mark.parametrize(("make", "error"), [("device", "not a regular file"), ("huge", "larger than 4194304 bytes")])
async def test_file_names_from_istiods_config_are_read_bounded(
    rig: Rig, mesh_ca: MeshCa, short_dir: Path, make: str, error: str
) -> None:
    # `file-root:<path>` comes from istiod's config (a DestinationRule's caCertificates): `/dev/zero` was read on
    # the event loop until the agent was OOM-killed, a FIFO blocked it for good. /dev/null and a sparse 64 MiB file
    # take the same paths without the harm.
    path = "/dev/null"
    if make == "huge":
        with (short_dir / "huge.pem").open("wb") as huge:
            huge.truncate(64 * 1024 * 1024)
        path = str(short_dir / "huge.pem")
    stream = rig.open()
    await stream.request([f"file-root:{path}"])
    failed = await stream.error()
    assert error in (failed.details() or "")
    other = rig.open()  # the server keeps serving
    assert_root(await other.request_response_ack(["ROOTCA"]), mesh_ca)


def test_the_light_sds_messages_write_and_read_the_bytes_of_envoys_own(tmp_path: Path) -> None:
    # agent.security.sds_wire stands in for the generated Envoy messages: the secrets it writes are byte for byte
    # the generated ones, and it reads what Envoy sends (the rest of the node kept as unknown fields).
    crl = tmp_path / "ca-crl.pem"
    crl.write_text("crl")
    workload = SecretItem("default", b"chain", b"key")
    expected = secret_pb2.Secret(name="default")
    expected.tls_certificate.certificate_chain.inline_bytes = b"chain"
    expected.tls_certificate.private_key.inline_bytes = b"key"
    assert to_envoy_secret(workload).SerializeToString() == expected.SerializeToString()
    root = SecretItem("ROOTCA", root_cert=b"roots")
    expected = secret_pb2.Secret(
        name="ROOTCA",
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=b"roots"), crl=base_pb2.DataSource(filename=str(crl))
        ),
    )
    assert to_envoy_secret(root, str(crl)).SerializeToString() == expected.SerializeToString()

    request = discovery_pb2.DiscoveryRequest(
        version_info="v1", node=base_pb2.Node(id="sidecar~1", cluster="c"), resource_names=["default", "ROOTCA"],
        type_url="t", response_nonce="n", error_detail=status_pb2.Status(code=13, message="bad"),
    )  # fmt: skip
    read = sds_wire.DiscoveryRequest.FromString(request.SerializeToString())
    assert (read.node.id, list(read.resource_names), read.response_nonce) == ("sidecar~1", ["default", "ROOTCA"], "n")
    assert read.HasField("error_detail") and (read.error_detail.code, read.error_detail.message) == (13, "bad")
    response = sds_wire.DiscoveryResponse(version_info="v", type_url="t", nonce="n")
    response.resources.add(type_url="u", value=b"x")
    generated = discovery_pb2.DiscoveryResponse(version_info="v", type_url="t", nonce="n")
    generated.resources.add(type_url="u", value=b"x")
    assert response.SerializeToString() == generated.SerializeToString()
