"""Shutdown and signals with a real Envoy: drain with requests in flight, second request, during a hot restart."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.errors import AgentError, ExitCode
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.pid1 import SignalDispatcher
from agent.proxy.admin import AdminClient
from agent.proxy.events import DrainSettings, SupervisionSettings
from agent.proxy.launcher import EnvoyLauncher
from agent.proxy.shm import shm_path
from agent.status.server import StatusServer
from agent.status.settings import StatusSettings
from agent.supervisor import Supervisor
from tests.supervisor.harness import Rig, bootstrap, envoy_children, supervised, until
from tests.support.envoy import free_port

pytestmark = [pytest.mark.envoy]


@dataclass
class SlowUpstream:
    port: int
    arrived: asyncio.Event  # set when a request reached the application (through Envoy)


@pytest.fixture
async def slow_upstream() -> AsyncIterator[SlowUpstream]:
    """An application answering after 1.5 s, so a request is in flight when the shutdown starts."""
    arrived = asyncio.Event()

    async def handler(_request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(1.5)
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield SlowUpstream(port, arrived)
    finally:
        await runner.cleanup()


async def _get(port: int) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as response:
        return response.status, await response.text()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_shutdown_drains_and_in_flight_request_completes(tmp_path: Path, slow_upstream: SlowUpstream) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, upstream_port=slow_upstream.port))
    async with supervised(rig, drain={"termination_drain": 2.0}) as run:
        await run.wait_epoch_live(0)
        request = asyncio.create_task(_get(rig.listener_port))
        await asyncio.wait_for(slow_upstream.arrived.wait(), 10)  # in flight, however busy the machine
        started = time.monotonic()
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        assert run.lifecycle.not_ready_reason() is not None
        assert await request == (200, "slow")
        # The listeners were drained: after --drain-time-s (1 s here) Envoy closed them while the agent waits.
        await until(lambda: _refused(rig.listener_port), 2)
        assert not run.task.done()
        assert await asyncio.wait_for(run.task, 10) == 0
        assert time.monotonic() - started >= 1.9  # the termination drain period was honoured
        assert not envoy_children()


async def test_second_shutdown_request_stops_at_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port))
    async with supervised(rig, drain={"termination_drain": 60.0}) as run:
        await run.wait_epoch_live(0)
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        await asyncio.sleep(0.3)
        started = time.monotonic()
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        assert await asyncio.wait_for(run.task, 5) == 0
        assert time.monotonic() - started < 3


async def test_exit_on_zero_active_connections(tmp_path: Path, slow_upstream: SlowUpstream) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, upstream_port=slow_upstream.port))
    drain = {"exit_on_zero_active_connections": True, "minimum_drain": 0.2, "poll_interval": 0.2}
    async with supervised(rig, drain=drain) as run:
        await run.wait_epoch_live(0)
        request = asyncio.create_task(_get(rig.listener_port))
        await asyncio.wait_for(slow_upstream.arrived.wait(), 10)  # in flight: the count must see its connection
        started = time.monotonic()
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        assert await request == (200, "slow")
        assert await asyncio.wait_for(run.task, 10) == 0
        # It waited for the connection (about 1.5 s left on it) and not much longer.
        assert 0.9 < time.monotonic() - started < 5


async def test_status_port_in_use_fails_before_envoy_starts(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    lifecycle = Lifecycle()
    metrics = AgentMetrics(process_metrics=False)
    admin = AdminClient(port=rig.admin_port)
    settings = StatusSettings(status_port=blocker.getsockname()[1], listen_host="127.0.0.1", admin_port=rig.admin_port)
    supervisor = Supervisor(
        EnvoyLauncher(rig.launch(), admin),
        SupervisionSettings(termination_log=None),
        DrainSettings(),
        rig.desired_state,
        lifecycle=lifecycle,
        metrics=metrics,
        services=[StatusServer(settings, lifecycle, metrics, admin)],
        signals=False,
        reap=False,
    )
    try:
        with pytest.raises(AgentError) as info:
            await supervisor.run()
    finally:
        blocker.close()
    assert info.value.exit_code == ExitCode.STARTUP_FAILED
    assert not envoy_children()
    assert not shm_path(rig.base_id).exists()


async def test_shutdown_during_hot_restart_stops_every_epoch(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="a"))
    async with supervised(rig, drain={"termination_drain": 0.2}) as run:
        await run.wait_epoch_live(0)
        rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="b"))
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await until(lambda: 1 in run.supervisor.epochs.numbers())  # type: ignore[union-attr]
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        assert await asyncio.wait_for(run.task, 15) == 0
        assert not envoy_children()
        assert not shm_path(rig.base_id).exists()


async def test_sighup_hot_restarts_and_sigusr1_is_forwarded(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    access_log = tmp_path / "access.log"
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, access_log=access_log))
    async with supervised(rig) as run:
        await run.wait_epoch_live(0)
        epochs = run.supervisor.epochs
        assert epochs is not None
        dispatcher = SignalDispatcher(
            run.lifecycle, on_hot_restart=epochs.request_hot_restart, forward=epochs.forward_signal
        )
        dispatcher.dispatch(signal.SIGHUP)
        await run.wait_epoch_live(1)
        # Log rotation: the file is moved away; after SIGUSR1 Envoy reopens the path and logs there again.
        assert (await _get(rig.listener_port))[0] == 200
        await until(access_log.exists)
        access_log.rename(tmp_path / "access.log.1")
        dispatcher.dispatch(signal.SIGUSR1)
        await asyncio.sleep(0.3)
        assert (await _get(rig.listener_port))[0] == 200
        await until(lambda: access_log.exists() and access_log.stat().st_size > 0, 5)
        assert await run.admin.live_epoch() == 1
        dispatcher.dispatch(signal.SIGTERM)
        assert run.lifecycle.shutdown_cause == "received signal: SIGTERM"
        assert await asyncio.wait_for(run.task, 10) == 0
