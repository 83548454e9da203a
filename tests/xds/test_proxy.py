"""The xDS proxy between a gRPC client on its unix socket (as Envoy) and a scripted upstream (as istiod): the flow
and reconnect cases of Istio's xds_proxy_test.go / xds_proxy_delta_test.go, the agent-handler hook, what Envoy
and readiness learn when istiod fails. Bytes are compared end to end: the proxy must not re-encode anything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, struct_pb2
from prometheus_client import CollectorRegistry

from agent.mesh.listen import xds_listener
from agent.security.settings import TlsSettings, UpstreamSettings
from agent.xds.metrics import XdsMetrics
from agent.xds.proxy import LISTENER_TYPE, XdsProxy
from agent.xds.settings import XdsProxySettings
from tests.support.mesh_pki import MeshCa
from tests.xds.fake_upstream import FakeUpstream, UpstreamStream, fake_upstream

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
NAME_TABLE = "type.googleapis.com/istio.networking.nds.v1.NameTable"
METHODS = {"sotw": "StreamAggregatedResources", "delta": "DeltaAggregatedResources"}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="xds", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Rig:
    proxy: XdsProxy
    upstream: FakeUpstream
    channel: grpc.aio.Channel
    directory: Path

    def envoy(self, protocol: str = "sotw") -> Any:
        """A new ADS stream from "Envoy"."""
        return self.channel.stream_stream(
            f"/envoy.service.discovery.v3.AggregatedDiscoveryService/{METHODS[protocol]}"
        )()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.proxy.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def request(type_url: str, protocol: str = "sotw", **fields: Any) -> bytes:
    if protocol == "sotw":
        return bytes(discovery_pb2.DiscoveryRequest(type_url=type_url, **fields).SerializeToString())
    return bytes(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, **fields).SerializeToString())


def response(type_url: str, protocol: str = "sotw", nonce: str = "n1", resources: list[Any] | None = None) -> bytes:
    if protocol == "sotw":
        message = discovery_pb2.DiscoveryResponse(type_url=type_url, nonce=nonce, version_info="v1")
        message.resources.extend(resources or [])
    else:
        message = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce=nonce, system_version_info="v1")
        message.resources.extend(
            discovery_pb2.Resource(name=f"r{i}", resource=r) for i, r in enumerate(resources or [])
        )
    return bytes(message.SerializeToString())


async def read(call: Any, timeout: float = 10.0) -> bytes:
    async with asyncio.timeout(timeout):
        raw = await call.read()
    assert raw is not grpc.aio.EOF, "Envoy's stream ended"
    return bytes(raw)


async def open_failing(rig: Rig) -> Any:
    """An Envoy stream whose first request the proxy may refuse at once (its write may then fail: the stream's
    status is what the test looks at)."""
    envoy = rig.envoy()
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await envoy.write(request(CLUSTER))
    return envoy


async def status_of(call: Any, timeout: float = 10.0) -> grpc.StatusCode:
    async with asyncio.timeout(timeout):
        code: grpc.StatusCode = await call.code()
    return code


@asynccontextmanager
async def running_rig(directory: Path, upstream: FakeUpstream, **upstream_settings: Any) -> AsyncIterator[Rig]:
    (directory / "token").write_text("token-1\n")
    settings = XdsProxySettings(
        socket_path=str(directory / "proxy/XDS"),
        upstream=UpstreamSettings(
            address=upstream_settings.pop("address", f"127.0.0.1:{upstream.port}"),
            tls=upstream_settings.pop("tls", None),
            token_path=str(directory / "token"),
            headers=(("clusterid", "Kubernetes"), ("custom", "header")),
        ),
    )
    proxy = XdsProxy(settings, XdsMetrics(CollectorRegistry()), xds_listener(settings.socket_path))
    await proxy.start()
    rig = Rig(proxy, upstream, grpc.aio.insecure_channel(f"unix:{settings.socket_path}"), directory)
    try:
        yield rig
    finally:
        await rig.channel.close()
        await proxy.stop()


@pytest.fixture
async def rig(short_dir: Path) -> AsyncIterator[Rig]:
    async with fake_upstream() as upstream, running_rig(short_dir, upstream) as started:
        yield started


async def connected(rig: Rig, protocol: str = "sotw") -> tuple[Any, UpstreamStream]:
    envoy = rig.envoy(protocol)
    await envoy.write(request(CLUSTER, protocol))
    stream = await rig.upstream.next_stream()
    assert await stream.request() == request(CLUSTER, protocol)
    return envoy, stream


# -- flow ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_bytes_pass_through_both_ways(rig: Rig, protocol: str) -> None:
    envoy, stream = await connected(rig, protocol)
    assert stream.method == METHODS[protocol]
    cluster = any_pb2.Any(type_url=CLUSTER, value=b"\x0a\x03abc")
    stream.send(response(CLUSTER, protocol, resources=[cluster]))
    assert await read(envoy) == response(CLUSTER, protocol, resources=[cluster])
    ack = request(CLUSTER, protocol, response_nonce="n1")
    await envoy.write(ack)
    assert await stream.request() == ack
    assert rig.metric("istio_agent_xds_proxy_requests") == 2
    assert rig.metric("istio_agent_xds_proxy_responses") == 1
    # What istiod sees: the headers, and the token read from its file for this stream.
    assert stream.metadata["clusterid"] == "Kubernetes" and stream.metadata["custom"] == "header"
    assert stream.metadata["authorization"] == "Bearer token-1"


async def test_socket_replaces_a_stale_file_and_is_open_to_everyone(short_dir: Path) -> None:
    (short_dir / "proxy").mkdir()
    (short_dir / "proxy/XDS").write_text("stale")
    async with fake_upstream() as upstream, running_rig(short_dir, upstream) as rig:
        assert os.stat(rig.proxy.settings.socket_path).st_mode & 0o777 == 0o666
        await connected(rig)
    assert not Path(rig.proxy.settings.socket_path).exists()  # noqa: ASYNC240 (a test's one look)


async def test_types_outside_envoy_are_dropped(rig: Rig) -> None:
    envoy, stream = await connected(rig)
    stream.send(response("istio.io/debug/syncz"))
    stream.send(response(CLUSTER, nonce="n2"))
    # The debug response was not forwarded: the first thing Envoy gets is the cluster response.
    assert await read(envoy) == response(CLUSTER, nonce="n2")


# -- reconnects (Istio's TestXdsProxyReconnects) ---------------------------------------------------------------


async def test_envoy_closing_its_stream_ends_the_upstream_one(rig: Rig) -> None:
    envoy, stream = await connected(rig)
    envoy.cancel()
    await asyncio.wait_for(stream.ended.wait(), 10)
    again, second = await connected(rig)
    second.send(response(CLUSTER))
    assert await read(again) == response(CLUSTER)


async def test_a_second_envoy_stream_closes_the_first(rig: Rig) -> None:
    first, first_upstream = await connected(rig)
    second, second_upstream = await connected(rig)
    assert await status_of(first) == grpc.StatusCode.OK
    await asyncio.wait_for(first_upstream.ended.wait(), 10)
    second_upstream.send(response(CLUSTER))
    assert await read(second) == response(CLUSTER)


async def test_envoy_closing_its_connection_ends_the_upstream_stream(rig: Rig) -> None:
    _, stream = await connected(rig)
    await rig.channel.close()
    await asyncio.wait_for(stream.ended.wait(), 10)
    rig.channel = grpc.aio.insecure_channel(f"unix:{rig.proxy.settings.socket_path}")
    await connected(rig)


async def test_concurrent_streams_only_one_stays(rig: Rig) -> None:
    calls = [rig.envoy() for _ in range(5)]
    for i, call in enumerate(calls):
        await call.write(request(CLUSTER, resource_names=[f"stream-{i}"]))
    # The proxy sees the streams in the order they reach it (not necessarily this one): each new one ends the
    # one before it cleanly, and the last to arrive stays.
    codes = {asyncio.ensure_future(status_of(call)): i for i, call in enumerate(calls)}
    ended: set[int] = set()
    while len(ended) < 4:
        done, _ = await asyncio.wait(codes, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert done, "streams that were replaced did not end"
        for task in done:
            assert task.result() == grpc.StatusCode.OK
            ended.add(codes.pop(task))
    (survivor,) = set(range(5)) - ended
    for task in codes:
        task.cancel()
    while True:
        stream = await rig.upstream.next_stream()
        first = asyncio.ensure_future(stream.request())
        gone = asyncio.ensure_future(stream.ended.wait())
        await asyncio.wait([first, gone], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if first.done() and first.result() == request(CLUSTER, resource_names=[f"stream-{survivor}"]):
            break
        first.cancel()
    stream.send(response(CLUSTER))
    assert await read(calls[survivor]) == response(CLUSTER)


async def test_istiod_restarting_on_the_same_port(short_dir: Path) -> None:
    async with fake_upstream() as upstream, running_rig(short_dir, upstream) as rig:
        envoy, _ = await connected(rig)
        port = upstream.port
        await upstream.stop()
        assert await status_of(envoy) == grpc.StatusCode.UNAVAILABLE
        await upstream.start(port)
        again, stream = await connected(rig)
        stream.send(response(CLUSTER))
        assert await read(again) == response(CLUSTER)


# -- failures: what Envoy and readiness are told ---------------------------------------------------------------


async def test_istiod_refusing_the_token_reaches_envoy_and_readiness(rig: Rig) -> None:
    rig.upstream.refuse = (grpc.StatusCode.UNAUTHENTICATED, "authentication failure")
    envoy = await open_failing(rig)
    refused = (grpc.StatusCode.UNAUTHENTICATED, "authentication failure")
    assert (await status_of(envoy), await envoy.details()) == refused
    reason = rig.proxy.not_ready_reason()
    assert reason is not None and reason.startswith("istiod refused the credentials: UNAUTHENTICATED")
    assert rig.metric("istio_agent_istiod_connection_terminations", {"type": "error"}) == 1
    # Fixed (a new token): the next stream works and readiness forgets the failure once istiod answers.
    rig.upstream.refuse = None
    envoy, stream = await connected(rig)
    stream.send(response(CLUSTER))
    await read(envoy)
    assert rig.proxy.not_ready_reason() is None


async def test_istiod_unreachable(short_dir: Path) -> None:
    async with fake_upstream() as upstream:
        port = upstream.port
    upstream = FakeUpstream()  # never started: nothing listens on `port`
    async with running_rig(short_dir, upstream, address=f"127.0.0.1:{port}") as rig:
        envoy = await open_failing(rig)
        assert await status_of(envoy) == grpc.StatusCode.UNAVAILABLE
        reason = rig.proxy.not_ready_reason()
        assert reason is not None and reason.startswith("istiod unreachable: UNAVAILABLE")
        assert f"127.0.0.1:{port} (plaintext)" in reason
        assert rig.metric("istio_agent_istiod_connection_terminations", {"type": "error"}) == 1


async def test_wrong_root_then_the_fixed_file_applies_without_restart(short_dir: Path, mesh_ca: MeshCa) -> None:
    chain, key = mesh_ca.server(["istiod.istio-system.svc"])
    root = short_dir / "root-cert.pem"
    root.write_bytes(MeshCa("other").root_pem)
    tls = TlsSettings(root_cert=str(root), server_name="istiod.istio-system.svc")
    credentials = grpc.ssl_server_credentials([(key, chain)])
    async with (
        fake_upstream(credentials=credentials) as upstream,
        running_rig(short_dir, upstream, address=f"localhost:{upstream.port}", tls=tls) as rig,
    ):
        envoy = await open_failing(rig)
        assert await status_of(envoy) == grpc.StatusCode.UNAVAILABLE
        reason = rig.proxy.not_ready_reason()
        assert reason is not None and reason.startswith("istiod unreachable:") and str(root) in reason
        root.write_bytes(mesh_ca.root_pem)
        envoy, stream = await connected(rig)
        stream.send(response(CLUSTER))
        await read(envoy)


async def test_missing_root_file_is_a_connection_failure(short_dir: Path) -> None:
    tls = TlsSettings(root_cert=str(short_dir / "missing.pem"), server_name="istiod.istio-system.svc")
    async with fake_upstream() as upstream, running_rig(short_dir, upstream, tls=tls) as rig:
        envoy = await open_failing(rig)
        assert await status_of(envoy) == grpc.StatusCode.UNAVAILABLE
        assert rig.metric("istio_agent_istiod_connection_failures") == 1
        assert "cannot read root certificate" in (rig.proxy.not_ready_reason() or "")


# -- the agent-handler hook (the DNS proxy's NameTable) ----------------------------------------------------------


@pytest.mark.parametrize("protocol", ["sotw", "delta"])
async def test_handled_type_is_subscribed_consumed_and_acked(rig: Rig, protocol: str) -> None:
    received: list[Any] = []
    rig.proxy.register_handler(NAME_TABLE, received.append)
    envoy, stream = await connected(rig, protocol)
    await envoy.write(request(LISTENER_TYPE, protocol))
    assert await stream.request() == request(LISTENER_TYPE, protocol)
    assert await stream.request() == request(NAME_TABLE, protocol)  # subscribed on Envoy's first LDS request
    await envoy.write(request(LISTENER_TYPE, protocol, response_nonce="x"))
    assert await stream.request() == request(LISTENER_TYPE, protocol, response_nonce="x")  # only the first time
    table = any_pb2.Any()
    table.Pack(struct_pb2.Struct())
    stream.send(response(NAME_TABLE, protocol, nonce="nds-1", resources=[table]))
    ack = discovery_pb2.DiscoveryRequest if protocol == "sotw" else discovery_pb2.DeltaDiscoveryRequest
    acked = ack.FromString(await stream.request())
    assert (acked.type_url, acked.response_nonce, acked.HasField("error_detail")) == (NAME_TABLE, "nds-1", False)
    if protocol == "sotw":
        assert acked.version_info == "v1"
    assert received == [table]
    # Not forwarded: Envoy's next message is the cluster response sent after it.
    stream.send(response(CLUSTER, protocol, nonce="c1"))
    assert await read(envoy) == response(CLUSTER, protocol, nonce="c1")


async def test_handler_failure_is_a_nack_and_empty_responses_are_not_acked(rig: Rig) -> None:
    async def reject(_resource: Any) -> None:
        raise ValueError("bad table")

    rig.proxy.register_handler(NAME_TABLE, reject)
    _, stream = await connected(rig)
    stream.send(response(NAME_TABLE, nonce="empty"))
    table = any_pb2.Any(type_url=NAME_TABLE)
    stream.send(response(NAME_TABLE, nonce="nds-2", resources=[table]))
    nacked = discovery_pb2.DiscoveryRequest.FromString(await stream.request())
    assert nacked.response_nonce == "nds-2"  # nothing was sent for the empty one
    assert nacked.error_detail.code == grpc.StatusCode.INTERNAL.value[0]
    assert nacked.error_detail.message == "bad table"


@pytest.fixture(scope="session")
def mesh_ca() -> MeshCa:
    return MeshCa()
