"""Application probes (ISTIO_KUBE_APP_PROBERS) against real HTTP, HTTPS, TCP and gRPC servers in the test."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.status.settings import parse_app_probers
from tests.status.conftest import Agent, running_agent, settings_for
from tests.support.envoy import free_port


@asynccontextmanager
async def application(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[tuple[int, list[web.Request]]]:
    """A real HTTP application that records who called it and how."""
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        path = request.path
        if path == "/ok":
            return web.Response(text="fine")
        if path == "/fail":
            return web.Response(status=503, text="x" * 20000)
        if path == "/same-host":
            raise web.HTTPFound("/ok")
        if path == "/other-host":
            raise web.HTTPFound("http://other.example.invalid/ok")
        if path == "/loop":
            raise web.HTTPFound("/loop")
        if path == "/slow":
            await asyncio.sleep(5)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    port = int(runner.addresses[0][1])
    try:
        yield port, seen
    finally:
        await runner.cleanup()


def probers(port: int, **extra: object) -> str:
    def http(path: str, scheme: str = "HTTP") -> dict[str, object]:
        return {
            "httpGet": {
                "path": path,
                "port": port,
                "scheme": scheme,
                "httpHeaders": [{"name": "X-Custom", "value": "from-pod-spec"}],
            },
            "timeoutSeconds": 1,
        }

    config: dict[str, object] = {
        "/app-health/web/readyz": http("/ok"),
        "/app-health/web/livez": http("/fail"),
        "/app-health/web/startupz": http("/same-host"),
        "/app-lifecycle/web/prestopz": http("/other-host"),
        "/app-lifecycle/web/poststartz": http("/loop"),
        "/app-health/slow/readyz": http("/slow"),
        "/app-health/tls/readyz": http("/ok", "HTTPS"),
        **extra,
    }
    return json.dumps(config)


async def call(agent: Agent, path: str, **headers: str) -> tuple[int, bytes]:
    status, body, _ = await agent.get(path, headers=headers)
    return status, body


async def test_http_probes_keep_kubelet_semantics() -> None:
    async with application() as (port, seen):
        settings = settings_for(None, app_probes=parse_app_probers(probers(port)))
        async with running_agent(settings) as agent:
            assert await call(agent, "/app-health/web/readyz", **{"User-Agent": "kube-probe/1.31"}) == (200, b"fine")
            request = seen[-1]
            # From 127.0.0.6 (bypasses the capture rules), with kubelet's and the pod spec's headers.
            assert request.remote == "127.0.0.6"
            assert request.headers["User-Agent"] == "kube-probe/1.31"
            assert request.headers["X-Custom"] == "from-pod-spec"
            status, body = await call(agent, "/app-health/web/livez")
            assert status == 503 and body == b"x" * 10240  # status mirrored, body capped at 10 KiB
            assert await call(agent, "/app-health/web/startupz") == (200, b"fine")  # same host: followed
            assert seen[-1].path == "/ok"
            assert (await call(agent, "/app-lifecycle/web/prestopz"))[0] == 200  # other host: not followed
            assert seen[-1].path == "/other-host"
            assert (await call(agent, "/app-lifecycle/web/poststartz"))[0] == 500  # more than 10 redirects
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert (await call(agent, "/app-health/slow/readyz"))[0] == 500  # timeoutSeconds: 1
            assert loop.time() - started < 2


async def test_https_probe_does_not_verify_the_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(
        subprocess.run,
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=self-signed",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with (
        application(context) as (port, seen),
        running_agent(settings_for(None, app_probes=parse_app_probers(probers(port)))) as agent,
    ):
        assert await call(agent, "/app-health/tls/readyz") == (200, b"fine")
    assert seen[-1].secure


async def test_nothing_in_the_request_chooses_the_destination() -> None:
    async with (
        application() as (port, seen),
        running_agent(settings_for(None, app_probes=parse_app_probers(probers(port)))) as agent,
    ):
        assert (await call(agent, "/app-health/web/readyz/../../x"))[0] in (400, 404)
        status, _ = await call(agent, "/app-health/web/readyz?port=1&host=10.0.0.1", Host=f"other.example:{agent.port}")
        assert status == 200
        # The destination is the configured one. Like Istio, kubelet's Host goes on with the status port swapped
        # for the application's: it names the application, it does not route.
        assert seen[-1].path == "/ok" and seen[-1].host == f"other.example:{port}"
        assert seen[-1].remote == "127.0.0.6"
        await call(agent, "/app-health/web/readyz")
        assert seen[-1].host == f"127.0.0.1:{port}"
        status, body = await call(agent, "/app-health/nope/livez")
        assert (status, body) == (400, b"app prober config does not exists for /app-health/nope/livez")


async def test_tcp_probe() -> None:
    async with application() as (port, _):
        closed = free_port()
        config = {
            "/app-health/open/readyz": {"tcpSocket": {"port": port}, "timeoutSeconds": 1},
            "/app-health/closed/readyz": {"tcpSocket": {"port": closed}, "timeoutSeconds": 1},
        }
        async with running_agent(settings_for(None, app_probes=parse_app_probers(json.dumps(config)))) as agent:
            assert (await call(agent, "/app-health/open/readyz"))[0] == 200
            assert (await call(agent, "/app-health/closed/readyz"))[0] == 500


@asynccontextmanager
async def grpc_app() -> AsyncIterator[tuple[int, health.HealthServicer, list[str]]]:
    """grpcio's standard health service, recording each caller's peer address."""
    peers: list[str] = []

    class Recording(health.HealthServicer):  # type: ignore[misc]
        def Check(self, request: object, context: grpc.ServicerContext) -> object:
            peers.append(context.peer())
            return super().Check(request, context)

    servicer = Recording()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, servicer, peers
    finally:
        await server.stop(0)


async def test_grpc_probe_uses_the_standard_health_service() -> None:
    async with grpc_app() as (port, servicer, peers):
        servicer.set("ready", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("sick", health_pb2.HealthCheckResponse.NOT_SERVING)
        config = {
            f"/app-health/{name}/readyz": {"grpc": {"port": port, "service": name}, "timeoutSeconds": 1}
            for name in ("ready", "sick", "unknown")
        }
        config["/app-health/overall/livez"] = {"grpc": {"port": port}, "timeoutSeconds": 1}
        async with running_agent(settings_for(None, app_probes=parse_app_probers(json.dumps(config)))) as agent:
            assert (await call(agent, "/app-health/ready/readyz"))[0] == 200
            assert peers[-1].startswith("ipv4:127.0.0.6:")
            assert (await call(agent, "/app-health/sick/readyz"))[0] == 500
            assert (await call(agent, "/app-health/unknown/readyz"))[0] == 500  # NOT_FOUND
            assert (await call(agent, "/app-health/overall/livez"))[0] == 200  # "" = the server overall


async def test_grpc_probe_against_a_plain_http_server_fails_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    async with application() as (port, _):
        config = {"/app-health/x/readyz": {"grpc": {"port": port}, "timeoutSeconds": 1}}
        async with running_agent(settings_for(None, app_probes=parse_app_probers(json.dumps(config)))) as agent:
            assert await call(agent, "/app-health/x/readyz") == (500, b"")
    # (the test application itself logs the HTTP/2 preface it could not parse; the agent logs no traceback)
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("agent")]


async def test_grpc_probe_against_a_server_without_the_health_service_fails() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        config = {"/app-health/x/readyz": {"grpc": {"port": port}, "timeoutSeconds": 1}}
        async with running_agent(settings_for(None, app_probes=parse_app_probers(json.dumps(config)))) as agent:
            assert (await call(agent, "/app-health/x/readyz"))[0] == 500  # UNIMPLEMENTED
    finally:
        await server.stop(0)


@asynccontextmanager
async def oversized_health_answer(size: int) -> AsyncIterator[int]:
    """An h2c server whose health answer is one gRPC message of `size` bytes, every field `status: SERVING`."""
    import h2.config  # noqa: PLC0415 (h2 is the agent's own dependency; only these tests serve HTTP/2 with it)
    import h2.connection  # noqa: PLC0415
    import h2.events  # noqa: PLC0415
    import h2.exceptions  # noqa: PLC0415

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        message = b"\x00" + size.to_bytes(4, "big") + b"\x08\x01" * (size // 2)
        sent, ended = 0, False
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        conn.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
                while sent < len(message) and conn.local_flow_control_window(1) > 0:
                    chunk = min(conn.local_flow_control_window(1), conn.max_outbound_frame_size, len(message) - sent)
                    conn.send_data(1, message[sent : sent + chunk])
                    sent += chunk
                if sent == len(message) and not ended:
                    conn.send_headers(1, [("grpc-status", "0")], end_stream=True)
                    ended = True
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_grpc_probe_refuses_an_oversized_answer() -> None:
    # The answer is read and decoded on the agent's event loop: 50 MiB from an application used to cost ~200 MiB and
    # ~20 s of the loop (no readiness meanwhile), then counted as SERVING. Any answer over 64 KiB is a failure now.
    async with oversized_health_answer(2 * 1024 * 1024) as port:
        config = {"/app-health/big/readyz": {"grpc": {"port": port}, "timeoutSeconds": 10}}
        async with running_agent(settings_for(None, app_probes=parse_app_probers(json.dumps(config)))) as agent:
            assert (await call(agent, "/app-health/big/readyz"))[0] == 500


@pytest.mark.parametrize("kind", ["http", "tcp"])
async def test_flood_of_app_probes_is_answered(kind: str) -> None:
    async with application() as (port, _):
        action = {"httpGet": {"path": "/ok", "port": port}} if kind == "http" else {"tcpSocket": {"port": port}}
        config = {"/app-health/web/readyz": {**action, "timeoutSeconds": 5}}
        async with running_agent(settings_for(None, app_probes=parse_app_probers(json.dumps(config)))) as agent:
            results = await asyncio.gather(*(call(agent, "/app-health/web/readyz") for _ in range(300)))
    assert {status for status, _ in results} == {200}
