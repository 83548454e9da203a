"""The supervision policy in milliseconds: budget, backoff, coalescing, recovery, judging a failed start, drain order.

Envoy is the fake of fake_launcher.py (see there why); the supervisor, the epochs policy, tenacity and the asyncio
timing are the real ones. Each test waits for a recorded outcome (a launcher call, a log line, a metric), never for a
fixed time.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from agent.errors import AgentError, ConfigError, ExitCode
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.desired import DesiredState
from agent.proxy.epochs import Epochs
from agent.proxy.events import DrainSettings, SupervisionSettings
from agent.proxy.spawn import EnvoyExecError
from agent.proxy.start_gate import StartGate
from agent.supervisor import Service, Supervisor
from tests.supervisor.fake_launcher import Behaviour, FakeLauncher, LogWaiter, disk_full, recording_logs
from tests.supervisor.harness import supervisor_for_tests

CRITICAL = "[2026-12-02 04:26:34.088][7][critical][main] [source/server/server.cc:449] "


@dataclass
class Inputs:
    """The desired-state function: returns `bootstrap`, or raises `error`."""

    bootstrap: bytes = b"good"
    error: Exception | None = None

    def __call__(self) -> DesiredState:
        if self.error is not None:
            raise self.error
        return DesiredState(self.bootstrap)


@dataclass
class Run:
    supervisor: Supervisor
    task: asyncio.Task[int]
    launcher: FakeLauncher
    inputs: Inputs
    lifecycle: Lifecycle
    metrics: AgentMetrics
    logs: LogWaiter
    delays: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> Epochs:
        assert self.supervisor.epochs is not None
        return self.supervisor.epochs

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def change(self, bootstrap: bytes) -> None:
        self.inputs.bootstrap = bootstrap
        self.epochs.notify_change("test")

    async def judged_ahead(self, bootstrap: bytes) -> None:
        """New contents seen while the watcher's window is open (it calls validate_ahead): validated as epoch 1."""
        await self.logs.wait_for("reconcile step (after a start): unchanged")
        self.inputs.bootstrap = bootstrap
        self.epochs.validate_ahead()
        await self.launcher.wait_for("validate 1")

    async def exit_code(self) -> int:
        async with asyncio.timeout(5):
            return await self.task


@dataclass
class RecordingService:
    name: str
    calls: list[str]
    fail: AgentError | None = None

    async def start(self) -> None:
        self.calls.append(f"{self.name} start")
        if self.fail is not None:
            raise self.fail

    async def stop(self) -> None:
        self.calls.append(f"{self.name} stop")


@dataclass
class LongRunningService(RecordingService):
    async def run(self) -> None:
        self.calls.append(f"{self.name} runs")
        try:
            await asyncio.Event().wait()
        finally:
            self.calls.append(f"{self.name} run cancelled")


@dataclass
class FailingService(RecordingService):
    """Its run() raises `error` once `breaks` is set (a bug in a refresh loop, a socket that died)."""

    error: Exception = field(default_factory=lambda: RuntimeError("boom"))
    breaks: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        await self.breaks.wait()
        self.calls.append(f"{self.name} raises")
        raise self.error


@asynccontextmanager
async def supervised(
    tmp: Path,
    launcher: FakeLauncher | None = None,
    *,
    supervision: dict[str, Any] | None = None,
    drain: dict[str, Any] | None = None,
    services: tuple[Service, ...] = (),
    sleep: Callable[[Run, float], Awaitable[None]] | None = None,
    start_gate: StartGate | None = None,
) -> AsyncIterator[Run]:
    launcher = launcher or FakeLauncher()
    lifecycle = Lifecycle()
    metrics = AgentMetrics(process_metrics=False)
    settings = SupervisionSettings(
        termination_log=tmp / "termination-log", live_timeout=0.2, stop_grace=0.1, retry_interval=0.01
    )

    async def record_sleep(seconds: float) -> None:
        run.delays.append(seconds)
        if sleep is not None:
            await sleep(run, seconds)
        await asyncio.sleep(0)

    inputs = Inputs()
    supervision_settings = replace(settings, **(supervision or {}))
    drain_settings = replace(DrainSettings(proxy_type="router", termination_drain=0.05), **(drain or {}))
    collaborators = {"lifecycle": lifecycle, "metrics": metrics, "services": services, "sleep": record_sleep}
    collaborators["start_gate"] = start_gate
    supervisor = supervisor_for_tests(launcher, inputs, supervision_settings, drain_settings, **collaborators)
    with recording_logs() as logs:
        task = asyncio.create_task(supervisor.run())
        run = Run(supervisor, task, launcher, inputs, lifecycle, metrics, logs)
        try:
            await launcher.wait_for("start 0")
            yield run
        finally:
            await _stopped(run)


async def _stopped(run: Run) -> None:
    """Stop what the test left running; no fake epoch may outlive the supervisor."""
    if not run.task.done():
        run.lifecycle.request_shutdown("test done", skip_drain=True)
        async with asyncio.timeout(5):
            await asyncio.gather(run.task, return_exceptions=True)
    assert not [envoy for envoy in run.launcher.started if envoy.running], "an epoch was left running"


# ---- crashes: budget and backoff ----


async def test_crash_loop_spends_the_budget_with_doubling_delays_then_exits_70(tmp_path: Path) -> None:
    launcher = FakeLauncher(behaviours={b"good": Behaviour(exits_with=1, output=(CRITICAL + "boom",))})
    async with supervised(tmp_path, launcher, supervision={"restart_budget": 4}) as run:
        assert await run.exit_code() == ExitCode.ENVOY_RESTART_BUDGET_EXHAUSTED
    assert run.delays == [0.2, 0.4, 0.8, 1.6]
    assert launcher.calls.count("start 0") == 5
    # Never LIVE, so each exit was judged first: the bootstrap validates, so it is a crash like any other.
    assert launcher.calls.count("validate 0") == 5
    assert run.value("istio_agent_envoy_exits_total", cause="error") == 5
    assert run.value("istio_agent_envoy_restart_budget_remaining") == 0
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("Envoy epoch 0") and "5 unexpected Envoy exit(s)" in message
    assert "restart budget exhausted" in message and "boom" in message


async def test_unwritable_termination_log_still_exits_with_the_code(tmp_path: Path) -> None:
    bad = tmp_path / "no-such-dir" / "termination-log"
    launcher = FakeLauncher(behaviours={b"good": Behaviour(exits_with=1)})
    async with supervised(tmp_path, launcher, supervision={"restart_budget": 1, "termination_log": bad}) as run:
        assert await run.exit_code() == ExitCode.ENVOY_RESTART_BUDGET_EXHAUSTED
    assert not bad.exists()


async def test_a_fix_during_the_crash_loop_is_started_at_once_and_earns_the_budget_back(tmp_path: Path) -> None:
    launcher = FakeLauncher(behaviours={b"bad": Behaviour(exits_with=1)})

    async def fix_on_second_backoff(run: Run, _seconds: float) -> None:
        if len(run.delays) == 2:
            run.change(b"good")

    async with supervised(tmp_path, launcher, sleep=fix_on_second_backoff) as run:
        run.change(b"bad")  # the first start already began on b"good": crash it onto the bad one
        run.launcher.newest.crash()
        await run.logs.wait_for("restart budget reset: desired state changed")
        assert run.value("istio_agent_envoy_restart_budget_remaining") == 10
        assert run.epochs.current is not None and run.epochs.current.state.bootstrap == b"good"
        assert not run.task.done()


async def test_budget_is_earned_back_after_the_healthy_period(tmp_path: Path) -> None:
    async with supervised(tmp_path, supervision={"healthy_period": 0.05}) as run:
        run.launcher.newest.crash()
        await run.launcher.wait_for("start 0", 2)
        assert run.value("istio_agent_envoy_restart_budget_remaining") == 9
        await run.logs.wait_for("restart budget reset: Envoy healthy for 0.05s")
        assert run.value("istio_agent_envoy_restart_budget_remaining") == 10
        # The next crash starts from the first delay again.
        run.launcher.newest.crash()
        await run.launcher.wait_for("start 0", 3)
    assert run.delays == [0.2, 0.2]


async def test_crashes_within_the_healthy_period_keep_spending_the_budget(tmp_path: Path) -> None:
    async with supervised(tmp_path) as run:
        for starts in (2, 3):
            await run.logs.wait_for("Envoy epoch 0 is LIVE", starts - 1)
            run.launcher.newest.crash(-signal.SIGSEGV)
            await run.launcher.wait_for("start 0", starts)
        assert run.value("istio_agent_envoy_restart_budget_remaining") == 8
        assert run.value("istio_agent_envoy_exits_total", cause="signal") == 2
    assert run.delays == [0.2, 0.4]
    assert run.lifecycle.envoy_starts == 3


async def test_exit_policy_exits_with_envoy(tmp_path: Path) -> None:
    for returncode, expected in ((-signal.SIGKILL, ExitCode.ENVOY_EXITED), (0, ExitCode.OK)):
        async with supervised(tmp_path, supervision={"exit_on_envoy_exit": True}) as run:
            await run.logs.wait_for("Envoy epoch 0 is LIVE")
            run.launcher.newest.crash(returncode)
            assert await run.exit_code() == expected
        assert run.delays == []


async def test_envoy_that_cannot_be_executed_counts_as_a_crash(tmp_path: Path) -> None:
    launcher = FakeLauncher(start_error=EnvoyExecError("cannot execute /no/envoy: No such file or directory"))
    async with supervised(tmp_path, launcher, supervision={"restart_budget": 2}) as run:
        assert await run.exit_code() == ExitCode.ENVOY_RESTART_BUDGET_EXHAUSTED
    assert run.value("istio_agent_envoy_exits_total", cause="error") == 3
    assert "cannot execute /no/envoy" in (tmp_path / "termination-log").read_text()


# ---- a start that can never work: judged, not crash-looped ----


async def test_a_known_start_failure_exits_73_with_the_fix_at_once(tmp_path: Path) -> None:
    fix = "Envoy cannot start: its admin port 127.0.0.1:15000 is already in use; set ProxyConfig proxyAdminPort"
    launcher = FakeLauncher(behaviours={b"good": Behaviour(exits_with=1)}, known_failure=fix)
    async with supervised(tmp_path, launcher) as run:
        with pytest.raises(AgentError) as info:
            await run.exit_code()
    assert info.value.exit_code == ExitCode.STARTUP_FAILED and str(info.value) == fix
    assert run.delays == [] and "validate 0" not in launcher.calls
    assert (tmp_path / "termination-log").read_text().startswith(fix)


async def test_a_live_answer_from_another_envoy_on_the_admin_port_is_not_ours(tmp_path: Path) -> None:
    """Another agent's Envoy on the same proxyAdminPort answers LIVE while ours has not bound the port yet (and
    will fail to): that is not our epoch going LIVE, so our Envoy's exit is still judged as a start-up failure."""
    fix = "Envoy cannot start: its admin port 127.0.0.1:15000 is already in use; set ProxyConfig proxyAdminPort"
    launcher = FakeLauncher(behaviours={b"good": Behaviour(live=False)}, known_failure=fix, foreign_live=True)
    async with supervised(tmp_path, launcher) as run:
        await run.logs.wait_for("another process answers LIVE on Envoy's admin port, not Envoy epoch 0")
        launcher.newest.crash(1)
        with pytest.raises(AgentError) as info:
            await run.exit_code()
    assert info.value.exit_code == ExitCode.STARTUP_FAILED and str(info.value) == fix
    assert not any("is LIVE" in line for line in run.logs.messages)
    assert sum("another process answers LIVE" in line for line in run.logs.messages) == 1
    assert run.delays == [] and launcher.calls.count("start 0") == 1


async def test_a_bootstrap_envoy_rejects_exits_78_with_envoys_own_words(tmp_path: Path) -> None:
    output = ("some earlier line", CRITICAL + "error initializing configuration 'x.json': bad port")
    launcher = FakeLauncher(behaviours={b"good": Behaviour(exits_with=1, invalid=True, output=output)})
    async with supervised(tmp_path, launcher) as run:
        with pytest.raises(AgentError) as info:
            await run.exit_code()
    assert info.value.exit_code == ExitCode.CONFIG_ERROR
    assert str(info.value) == "Envoy rejected its configuration: error initializing configuration 'x.json': bad port"
    assert run.delays == []


async def test_once_envoy_was_live_an_early_exit_is_a_crash_not_a_verdict(tmp_path: Path) -> None:
    launcher = FakeLauncher(known_failure="would be fatal at start-up")
    async with supervised(tmp_path, launcher) as run:
        await run.logs.wait_for("Envoy epoch 0 is LIVE")
        launcher.behaviours[b"good"] = Behaviour(exits_with=1)
        launcher.newest.crash()
        await launcher.wait_for("start 0", 3)
        launcher.behaviours.clear()
        await run.logs.wait_for("Envoy epoch 0 is LIVE", 2)
        assert not run.task.done()
    assert "validate 0" not in launcher.calls
    assert run.delays[:2] == [0.2, 0.4]


async def test_nothing_to_start_on_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    supervisor = supervisor_for_tests(
        FakeLauncher(),
        Inputs(error=ValueError("bad")),
        SupervisionSettings(termination_log=None),
        DrainSettings(),
        lifecycle=Lifecycle(),
        metrics=AgentMetrics(process_metrics=False),
        sleep=asyncio.sleep,
    )
    with pytest.raises(AgentError) as info:
        await supervisor.run()
    assert info.value.exit_code == ExitCode.CONFIG_ERROR


async def test_a_bootstrap_that_cannot_be_written_at_start_up_is_one_line(tmp_path: Path) -> None:
    async with supervised(tmp_path, FakeLauncher(start_error=disk_full())) as run:
        with pytest.raises(AgentError) as info:
            await run.exit_code()
    assert info.value.exit_code == ExitCode.STARTUP_FAILED
    assert "No space left on device" in str(info.value)


# ---- configuration changes ----


async def test_a_change_hot_restarts_and_the_same_state_does_not(tmp_path: Path) -> None:
    async with supervised(tmp_path) as run:
        run.change(b"one")
        await run.logs.wait_for("Envoy epoch 1 is LIVE; epoch 0 drains")
        run.change(b"one")
        await run.logs.wait_for("reconcile step (test): unchanged")
        assert run.launcher.calls.count("validate 1") == 1 and "start 2" not in run.launcher.calls
        assert run.value("istio_agent_hot_restarts_total", outcome="done") == 1


async def test_changes_while_the_parent_drains_coalesce_into_one_hot_restart(tmp_path: Path) -> None:
    async with supervised(tmp_path, FakeLauncher(parents_linger=True)) as run:
        await run.logs.wait_for("reconcile step (after a start): unchanged")
        run.change(b"one")
        await run.launcher.wait_for("start 1")
        parent = run.launcher.started[0]
        run.change(b"two")
        run.change(b"three")
        await run.logs.wait_for("applied once epoch 0 has drained", 2)
        assert "validate 2" not in run.launcher.calls
        parent.crash(0)  # --parent-shutdown-time-s is over: the parent exits by itself
        await run.logs.wait_for("Envoy epoch 2 is LIVE")
        await run.logs.wait_for("reconcile step (test; test): done")
        assert run.launcher.calls.count("start 2") == 1 and "start 3" not in run.launcher.calls
        assert run.epochs.current is not None and run.epochs.current.state.bootstrap == b"three"
        assert run.value("istio_agent_envoy_exits_total", cause="clean") == 1


async def test_an_invalid_change_is_rejected_once_and_the_running_epoch_stays(tmp_path: Path) -> None:
    launcher = FakeLauncher(behaviours={b"bad": Behaviour(invalid=True, output=("bad certificate",))})
    async with supervised(tmp_path, launcher) as run:
        run.change(b"bad")
        await run.logs.wait_for("new Envoy configuration is invalid, the running epoch stays: bad certificate")
        run.change(b"bad")
        await run.logs.wait_for("reconcile step (test): unchanged")
        assert launcher.calls.count("validate 1") == 1
        assert run.value("istio_agent_hot_restarts_total", outcome="invalid") == 1
        assert run.lifecycle.not_ready_reason() is None
        run.change(b"fixed")
        await run.logs.wait_for("Envoy epoch 1 is LIVE")


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("file ./etc/istio/pod/annotations", "status.sidecar.istio.io/port", "not a port"),
        ValueError("invalid literal for int() with base 10: '²'"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["config-error", "unexpected-error", "disk-full"],
)
async def test_a_change_that_does_not_render_keeps_the_running_epoch(tmp_path: Path, error: Exception) -> None:
    async with supervised(tmp_path) as run:
        await run.logs.wait_for("Envoy epoch 0 is LIVE")
        run.inputs.error = error
        run.epochs.notify_change("test")
        await run.logs.wait_for("new configuration rejected, Envoy keeps its current one:")
        assert run.value("istio_agent_config_errors_total", stage="render") == 1
        assert run.lifecycle.not_ready_reason() is None and not run.task.done()
        run.inputs.error = None
        run.change(b"fixed")
        await run.logs.wait_for("Envoy epoch 1 is LIVE")


async def test_a_failed_child_recovers_the_family_on_the_last_good_state(tmp_path: Path) -> None:
    launcher = FakeLauncher(behaviours={b"dies": Behaviour(exits_with=1)})
    async with supervised(tmp_path, launcher) as run:
        run.change(b"dies")
        await run.logs.wait_for("Envoy epoch 0 is LIVE", 1)
        await launcher.wait_for("start 0", 2)
        calls = launcher.calls
        assert calls.index("start 1") < calls.index("stop 0") < calls.index("forget family") < len(calls) - 1
        assert run.value("istio_agent_hot_restarts_total", outcome="failed") == 1
        assert run.epochs.current is not None and run.epochs.current.state.bootstrap == b"good"
        assert run.lifecycle.envoy_starts == 2
        # The same failed state is not retried; a new one hot-restarts the recovered family.
        run.change(b"next")
        await run.logs.wait_for("Envoy epoch 1 is LIVE")
        assert launcher.calls.count("start 1") == 2


async def test_a_hot_restart_waits_for_a_parent_that_is_not_live_yet(tmp_path: Path) -> None:
    launcher = FakeLauncher(behaviours={b"good": Behaviour(live=False)})
    async with supervised(tmp_path, launcher) as run:
        run.change(b"next")
        await run.logs.wait_for("Envoy epoch 0 is not LIVE yet: postponing the hot restart")
        assert "validate 1" not in launcher.calls
        launcher.started[0].behaviour = Behaviour()  # its control plane answered
        await run.logs.wait_for("Envoy epoch 1 is LIVE")
        assert sum("not LIVE yet" in m for m in run.logs.messages) == 1


async def test_a_hung_envoy_does_not_hold_a_hot_restart_for_ever(tmp_path: Path) -> None:
    launcher = FakeLauncher()
    async with supervised(tmp_path, launcher) as run:
        await run.logs.wait_for("Envoy epoch 0 is LIVE")
        launcher.unresponsive = True  # SIGSTOP
        run.epochs.request_hot_restart()
        await run.logs.wait_for("has not answered on its admin API for 0.2s (stopped or stuck?)")
        assert "validate 1" not in launcher.calls
        launcher.unresponsive = False
        run.epochs.request_hot_restart()
        await run.logs.wait_for("Envoy epoch 1 is LIVE")


async def test_a_bootstrap_that_cannot_be_written_at_a_hot_restart_keeps_the_parent(tmp_path: Path) -> None:
    launcher = FakeLauncher()
    async with supervised(tmp_path, launcher) as run:
        await run.logs.wait_for("Envoy epoch 0 is LIVE")
        launcher.start_error = disk_full("/etc/istio/proxy/envoy-rev1.json")
        run.change(b"next")
        await run.logs.wait_for("cannot start Envoy epoch 1 (cannot write /etc/istio/proxy/envoy-rev1.json")
        assert run.epochs.current is not None and run.epochs.current.number == 0
        assert run.lifecycle.not_ready_reason() is None


async def test_with_hot_restart_off_a_change_waits_for_the_next_start(tmp_path: Path) -> None:
    async with supervised(tmp_path, FakeLauncher(hot_restart=False)) as run:
        run.change(b"new")
        await run.logs.wait_for("hot restart is disabled: it applies at Envoy's next start")
        assert "start 1" not in run.launcher.calls
        run.launcher.newest.crash()
        await run.launcher.wait_for("start 0", 2)
        assert run.epochs.current is not None and run.epochs.current.state.bootstrap == b"new"


# ---- shutdown: drain order, services ----


async def test_shutdown_drains_waits_stops_envoy_then_the_services_in_reverse(tmp_path: Path) -> None:
    launcher = FakeLauncher()
    services = (RecordingService("status", launcher.calls), LongRunningService("xds", launcher.calls))
    async with supervised(tmp_path, launcher, drain={"proxy_type": "sidecar"}, services=services) as run:
        await run.logs.wait_for("Envoy epoch 0 is LIVE")
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        assert run.lifecycle.not_ready_reason() is not None
        assert await run.exit_code() == 0
    calls = launcher.calls
    assert calls.index("xds start") < calls.index("xds runs") < calls.index("xds run cancelled")
    order = [call for call in calls if not call.startswith(("validate", "forget 0", "exited", "xds runs"))]
    assert order == [
        "status start",
        "xds start",
        "start 0",
        "drain inbound",
        "stop 0",
        "forget family",
        "forget family",
        "xds run cancelled",
        "xds stop",
        "status stop",
    ]


async def test_a_second_shutdown_request_cuts_the_drain_short(tmp_path: Path) -> None:
    async with supervised(tmp_path, drain={"termination_drain": 60}) as run:
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        await run.launcher.wait_for("drain")
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        assert await run.exit_code() == 0
    assert run.launcher.calls.index("drain") < run.launcher.calls.index("stop 0")


async def test_the_drain_ends_when_every_epoch_has_exited(tmp_path: Path) -> None:
    async with supervised(tmp_path, drain={"termination_drain": 60}) as run:
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        await run.launcher.wait_for("drain")
        run.launcher.newest.crash(0)
        assert await run.exit_code() == 0
    assert "stop 0" not in run.launcher.calls


async def test_exit_on_zero_active_connections_waits_until_idle(tmp_path: Path) -> None:
    launcher = FakeLauncher(connections=[3, 1, 0])
    drain = {"exit_on_zero_active_connections": True, "minimum_drain": 0.01, "poll_interval": 0.01}
    async with supervised(tmp_path, launcher, drain=drain) as run:
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        assert await run.exit_code() == 0
    assert launcher.calls.count("connections?") == 3
    assert launcher.calls.index("drain") < launcher.calls.index("connections?") < launcher.calls.index("stop 0")


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (RuntimeError("upstream stream reset"), ExitCode.SERVICE_FAILED, "RuntimeError: upstream stream reset"),
        (
            OSError(errno.EMFILE, "Too many open files", "/var/run/x"),
            ExitCode.SERVICE_FAILED,
            "/var/run/x: Too many open files",
        ),
        (ConfigError("lds.yaml", "resources", "not a list"), ExitCode.CONFIG_ERROR, "lds.yaml: resources: not a list"),
    ],
)
async def test_a_service_whose_run_raises_drains_and_stops_envoy_and_exits_with_one_line(
    tmp_path: Path, error: Exception, code: ExitCode, line: str
) -> None:
    launcher = FakeLauncher()
    failing = FailingService("xds proxy", launcher.calls, error=error)
    services = (RecordingService("status", launcher.calls), failing)
    async with supervised(tmp_path, launcher, drain={"proxy_type": "sidecar"}, services=services) as run:
        await run.logs.wait_for("Envoy epoch 0 is LIVE")
        failing.breaks.set()
        with pytest.raises(AgentError) as info:
            await run.exit_code()
    assert info.value.exit_code == code
    assert str(info.value) == f"xds proxy failed: {line}"
    assert "shutdown requested: xds proxy failed" in run.logs.messages
    # As on SIGTERM: drain, Envoy stopped, then the services in reverse order.
    order = [call for call in launcher.calls if call in ("xds proxy raises", "drain inbound", "stop 0")]
    assert order == ["xds proxy raises", "drain inbound", "stop 0"]
    stops = [call for call in launcher.calls if call.endswith(" stop")]
    assert stops == ["xds proxy stop", "status stop"]
    assert launcher.calls.index("stop 0") < launcher.calls.index("xds proxy stop")


async def test_a_service_that_cannot_listen_stops_the_agent_before_envoy(tmp_path: Path) -> None:
    launcher = FakeLauncher()
    failing = AgentError("status server: cannot listen on port 15020: address already in use", ExitCode.STARTUP_FAILED)
    services = (RecordingService("first", launcher.calls), RecordingService("status", launcher.calls, fail=failing))
    supervisor = supervisor_for_tests(
        launcher,
        Inputs(),
        SupervisionSettings(termination_log=None),
        DrainSettings(),
        lifecycle=Lifecycle(),
        metrics=AgentMetrics(process_metrics=False),
        services=services,
        sleep=asyncio.sleep,
    )
    with pytest.raises(AgentError) as info:
        await supervisor.run()
    assert info.value is failing
    assert launcher.calls == ["first start", "status start", "forget family", "first stop"]
