"""/quitquitquit, /drain (against a real Envoy), loopback-only access, routing, and the server's start-up errors."""

from __future__ import annotations

import dataclasses
import http.client
import socket
import subprocess

import aiohttp
import pytest

from agent.errors import AgentError, ExitCode
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient
from agent.status import StatusServer
from agent.status.server import is_loopback
from tests.status.conftest import running_agent, settings_for
from tests.status.envoy_stack import EnvoyStack
from tests.support.envoy import free_port


def non_loopback_ipv4() -> str | None:
    """An address of this host that is not loopback, to be a non-local peer without leaving the host."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None


def connection_close_on(port: int) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.getheader("connection")
    finally:
        conn.close()


async def post(session: aiohttp.ClientSession, url: str, method: str = "POST") -> tuple[int, str]:
    async with session.request(method, url) as response:
        return response.status, await response.text()


async def test_quitquitquit_requests_shutdown_without_drain() -> None:
    async with running_agent(settings_for(None)) as agent:
        assert await post(agent.session, agent.base + "/quitquitquit", "GET") == (405, "Method Not Allowed")
        assert not agent.lifecycle.shutting_down
        assert await post(agent.session, agent.base + "/quitquitquit") == (200, "OK")
        assert agent.lifecycle.shutting_down
        assert agent.lifecycle.shutdown_cause == "/quitquitquit called"
        assert agent.lifecycle.skip_drain


@pytest.mark.envoy
async def test_drain_drains_inbound_listeners_keeps_envoy_and_skips_the_later_drain(stack: EnvoyStack) -> None:
    async with running_agent(settings_for(stack)) as agent:
        assert connection_close_on(stack.inbound_port) is None
        assert await post(agent.session, agent.base + "/drain", "PUT") == (405, "Method Not Allowed")
        assert await post(agent.session, agent.base + "/drain") == (200, "OK")
        assert agent.lifecycle.skip_drain and not agent.lifecycle.shutting_down
        # Inbound listeners close connections now; the others (kubelet's status listener) do not; Envoy stays LIVE.
        assert connection_close_on(stack.inbound_port) == "close"
        assert connection_close_on(stack.status_listener_port) is None
        assert await AdminClient(port=stack.admin_port).server_state() == "LIVE"


async def test_drain_with_envoy_unreachable_answers_500_and_still_skips_the_drain() -> None:
    async with running_agent(settings_for(None, admin_port=free_port())) as agent:
        status, body = await post(agent.session, agent.base + "/drain")
    assert status == 500 and body.startswith("drain failed")
    assert agent.lifecycle.skip_drain


async def test_lifecycle_endpoints_and_local_metrics_refuse_non_loopback_peers() -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to act as a remote peer")
    settings = settings_for(None, listen_host="", metrics_localhost_only=True, merge_envoy_stats=False)
    async with running_agent(settings) as agent:
        connector = aiohttp.TCPConnector(local_addr=(address, 0))
        async with aiohttp.ClientSession(connector=connector) as remote:
            base = f"http://{address}:{agent.port}"
            assert await post(remote, base + "/quitquitquit") == (403, "Only requests from localhost are allowed")
            assert (await post(remote, base + "/drain"))[0] == 403
            assert (await post(remote, base + "/stats/prometheus", "GET"))[0] == 403
            # Readiness stays open to anyone (kubelet probes from the node's address).
            assert (await post(remote, base + "/healthz/ready", "GET"))[0] == 503
        assert (await post(agent.session, agent.base + "/stats/prometheus", "GET"))[0] == 200
    assert not agent.lifecycle.shutting_down and not agent.lifecycle.skip_drain


async def test_unknown_paths_are_404() -> None:
    async with running_agent(settings_for(None)) as agent:
        assert (await post(agent.session, agent.base + "/debug/pprof/", "GET"))[0] == 404


async def test_port_in_use_is_a_clear_startup_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = dataclasses.replace(settings_for(None), status_port=port)
        server = StatusServer(settings, Lifecycle(), AgentMetrics(), AdminClient())
        with pytest.raises(AgentError) as error:
            await server.start()
    assert error.value.exit_code == ExitCode.STARTUP_FAILED
    assert str(error.value) == f"status server: cannot listen on port {port}: address already in use"
    await server.stop()


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.6", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        (None, False),
        ("garbage", False),
    ],
)
def test_loopback_rule(remote: str | None, loopback: bool) -> None:
    assert is_loopback(remote) is loopback
