"""Readiness with Istio's semantics, against a real Envoy, directly and through Envoy's status listener (15021)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest

from agent.lifecycle import Lifecycle
from tests.status.conftest import running_agent, settings_for
from tests.status.envoy_stack import EnvoyStack, envoy_stack
from tests.support.envoy import free_port

pytestmark = pytest.mark.envoy


async def probe(session: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{port}/healthz/ready") as response:
        return response.status, await response.text()


async def test_ready_directly_and_through_envoy_and_records_startup(stack: EnvoyStack) -> None:
    async with running_agent(settings_for(stack)) as agent:
        assert await probe(agent.session, agent.port) == (200, "")
        assert await probe(agent.session, stack.status_listener_port) == (200, "")
        registry = agent.metrics.registry
        assert registry.get_sample_value("istio_agent_envoy_ready") == 1
        assert (registry.get_sample_value("istio_agent_startup_duration_seconds") or 0) > 0


async def test_not_ready_before_envoy_runs_and_from_the_moment_shutdown_begins(stack: EnvoyStack) -> None:
    async with running_agent(settings_for(stack), envoy_up=False) as agent:
        assert await probe(agent.session, stack.status_listener_port) == (503, "Envoy has not been started yet\n")
        agent.lifecycle.envoy_up()
        assert (await probe(agent.session, agent.port))[0] == 200
        agent.lifecycle.request_shutdown("SIGTERM")
        assert await probe(agent.session, stack.status_listener_port) == (503, "server is terminated: SIGTERM\n")
        assert agent.metrics.registry.get_sample_value("istio_agent_envoy_ready") == 0


async def test_the_start_up_is_over_at_the_first_ready_answer_not_before(stack: EnvoyStack) -> None:
    # The work no probe waits for (file watchers, the start-up line) waits for this (agent/commands/proxy.py).
    async with running_agent(settings_for(stack), envoy_up=False) as agent:
        started = asyncio.ensure_future(agent.lifecycle.wait_started(60))
        assert (await probe(agent.session, agent.port))[0] == 503
        assert not started.done()
        agent.lifecycle.envoy_up()
        assert (await probe(agent.session, agent.port))[0] == 200
        await asyncio.wait_for(started, 5)


async def test_the_start_up_is_over_at_shutdown_or_at_its_limit() -> None:
    lifecycle = Lifecycle()
    await asyncio.wait_for(lifecycle.wait_started(0.01), 5)  # nobody asked, or Envoy never got ready
    started = asyncio.ensure_future(lifecycle.wait_started(60))
    lifecycle.request_shutdown("SIGTERM")
    await asyncio.wait_for(started, 5)


async def test_envoy_down_is_not_ready_and_a_restarted_envoy_must_earn_readiness_again(stack: EnvoyStack) -> None:
    async with running_agent(settings_for(stack)) as agent:
        assert (await probe(agent.session, agent.port))[0] == 200
        agent.lifecycle.envoy_down("Envoy exited (signal 9); restarting in 1s")
        assert await probe(agent.session, agent.port) == (503, "Envoy exited (signal 9); restarting in 1s\n")
        # The facts remembered about the old Envoy are forgotten: the new one is asked again.
        assert not any(p.passed for p in agent.server.readiness.probes)
        agent.lifecycle.envoy_up()
        assert (await probe(agent.session, agent.port))[0] == 200


async def test_unreachable_admin_reports_config_not_received() -> None:
    # Nothing listens on the admin port: the supervisor says Envoy is up, but it has not answered yet.
    async with running_agent(settings_for(None, admin_port=free_port())) as agent:
        status, body = await probe(agent.session, agent.port)
    assert status == 503 and body.startswith("config not received from XDS server")


async def test_rejected_lds_is_reported_as_rejected(tmp_path: Path) -> None:
    agent_port = free_port()
    with envoy_stack(tmp_path, agent_port, reject_lds=True) as rejecting:
        async with running_agent(settings_for(rejecting)) as agent:
            status, body = await probe(agent.session, rejecting.status_listener_port)
    assert status == 503
    assert body == (
        "config received from XDS server, but was rejected: cds updates: 1 successful, 0 rejected; "
        "lds updates: 0 successful, 1 rejected\n"
    )


async def test_flood_of_probes_logs_each_change_once(stack: EnvoyStack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.status")
    async with running_agent(settings_for(stack), envoy_up=False) as agent:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            first = await asyncio.gather(*(probe(session, stack.status_listener_port) for _ in range(200)))
            agent.lifecycle.envoy_up()
            second = await asyncio.gather(*(probe(session, agent.port) for _ in range(500)))
            third = await asyncio.gather(*(probe(session, stack.status_listener_port) for _ in range(200)))
    assert {status for status, _ in first} == {503}
    assert {status for status, _ in second + third} == {200}
    messages = [r.getMessage() for r in caplog.records if r.name == "agent.status"]
    assert sum(m.startswith("Envoy proxy is NOT ready") for m in messages) == 1
    assert sum(m == "Envoy proxy is ready" for m in messages) == 1
    assert sum(m.startswith("Readiness succeeded in") for m in messages) == 1
