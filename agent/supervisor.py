"""The supervisor: the one TaskGroup that owns every long-running task of `pilot-agent proxy`, and the shutdown.

Start order (aiohttp's runner habit: fixed order, reversed on the way down): status server (kubelet must get
503s, not connection refused, while Envoy starts), signal dispatcher, orphan reaper (PID 1 only), file watcher,
then the Envoy epochs. Shutdown (Istio's pkg/envoy/agent.go terminate):
1. readiness is 503 from the moment the shutdown is requested (Lifecycle.not_ready_reason);
2. unless the drain is skipped (/quitquitquit, /drain) or a second SIGTERM came: POST
   /drain_listeners?inboundonly&graceful (sidecar) or ?graceful (router), then wait terminationDrainDuration, or
   with EXIT_ON_ZERO_ACTIVE_CONNECTIONS wait MINIMUM_DRAIN_DURATION and then until no downstream connection is
   active; the wait ends early when every epoch has exited or a second shutdown request arrives;
3. stop every epoch (SIGTERM, then SIGKILL after a grace), remove their bootstrap files and /dev/shm segment;
4. stop the watcher, the reaper, the signal dispatcher and the status server; return the exit code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from agent.errors import AgentError, ExitCode
from agent.lifecycle import Lifecycle
from agent.pid1 import OrphanReaper, SignalDispatcher, is_pid1
from agent.proxy.argv import LaunchSettings
from agent.proxy.epochs import DesiredState, DesiredStateFn, Epochs, SupervisionSettings
from agent.proxy.process import EnvoyProcess
from agent.watch import ChangeSet, Watcher

if TYPE_CHECKING:
    # `pilot-agent proxy` imports this module (its settings) before it execs Envoy; prometheus_client and aiohttp
    # load after the exec, overlapping Envoy's own start.
    from agent.metrics import AgentMetrics
    from agent.proxy.admin import AdminClient

log = logging.getLogger("agent.supervisor")


class StatusServerLike(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@dataclass(frozen=True)
class DrainSettings:
    proxy_type: str = "sidecar"
    termination_drain: float = 5.0
    exit_on_zero_active_connections: bool = False
    minimum_drain: float = 5.0
    # Istio's own listeners (status 15021, Prometheus 15090) are not application traffic.
    excluded_listener_ports: tuple[int, ...] = (15021, 15090)
    poll_interval: float = 1.0


@dataclass(frozen=True)
class WatchSettings:
    files: Mapping[Path, str]
    debounce: float = 0.1


def active_connections(stats: Mapping[str, int], excluded_ports: tuple[int, ...]) -> int:
    """Sum of listener downstream_cx_active, Istio's way (pkg/envoy/agent.go activeProxyConnections)."""
    total = 0
    for name, value in stats.items():
        if not name.startswith("listener.") or "worker_" in name or name.startswith("listener.admin."):
            continue
        if "envoy_internal" in name or any(f"_{port}." in name for port in excluded_ports):
            continue
        total += value
    return total


class Supervisor:
    def __init__(
        self,
        launch: LaunchSettings,
        supervision: SupervisionSettings,
        drain: DrainSettings,
        desired_state: DesiredStateFn,
        *,
        lifecycle: Lifecycle,
        metrics: AgentMetrics,
        admin: AdminClient,
        status: StatusServerLike | None = None,
        watch: WatchSettings | None = None,
        signals: bool = True,
        reap: bool | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        sink: BinaryIO | None = None,
        epoch0: tuple[EnvoyProcess, DesiredState] | None = None,
        signal_queue: asyncio.Queue[int] | None = None,
    ) -> None:
        self.launch = launch
        self.supervision = supervision
        self.drain = drain
        self.desired_state = desired_state
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.admin = admin
        self.status = status
        self.watch = watch
        self.signals = signals
        self.reap = is_pid1() if reap is None else reap
        self.sleep = sleep
        self.sink = sink
        # Start-up: an epoch 0 exec'd before the supervisor existed, and the queue its early signal handlers fill
        # (the dispatcher reads it: a signal whose handler call is already scheduled when install() replaces the
        # handlers still lands there).
        self.epoch0 = epoch0
        self.signal_queue = signal_queue
        self.epochs: Epochs | None = None
        self.watcher: Watcher | None = None
        self.reaper: OrphanReaper | None = None
        self.started = asyncio.Event()

    async def run(self) -> int:
        """Exit paths: 0 after a requested shutdown; ENVOY_RESTART_BUDGET_EXHAUSTED, or with the exit policy OK /
        ENVOY_EXITED, when Envoy is gone for good; raises AgentError (config error at first render, status port
        in use) after stopping whatever had started."""
        error: AgentError | None = None
        code: int = ExitCode.OK
        async with asyncio.TaskGroup() as tg:
            epochs = Epochs(
                self.launch,
                self.supervision,
                self.desired_state,
                lifecycle=self.lifecycle,
                metrics=self.metrics,
                admin=self.admin,
                spawn=tg.create_task,
                sleep=self.sleep,
                sink=self.sink,
            )
            self.epochs = epochs
            if self.epoch0 is not None:
                epochs.adopt(*self.epoch0)
            background: list[asyncio.Task[Any]] = []
            dispatcher = SignalDispatcher(
                self.lifecycle, on_hot_restart=epochs.request_hot_restart, forward=epochs.forward_signal
            )
            if self.signal_queue is not None:
                dispatcher.queue = self.signal_queue
            status_started = False
            try:
                if self.status is not None:
                    await self.status.start()
                    status_started = True
                if self.signals:
                    dispatcher.install()
                    background.append(tg.create_task(dispatcher.run()))
                if self.reap:
                    self.reaper = OrphanReaper(epochs.own_pids)
                    background.append(tg.create_task(self.reaper.run()))
                if self.watch is not None:
                    self.watcher = Watcher(
                        self.watch.files, self._on_files_changed, metrics=self.metrics, debounce=self.watch.debounce
                    )
                    background.append(tg.create_task(self.watcher.run()))
                self.started.set()
                result = await epochs.run()
                if result is None:
                    await self._shutdown(epochs)
                else:
                    code = result
            except AgentError as exc:
                error = exc
            finally:
                # Whatever happened, no Envoy outlives the agent.
                await epochs.stop_all(0 if self.lifecycle.immediate else self.supervision.stop_grace)
                for task in background:
                    task.cancel()
                if self.signals:
                    dispatcher.uninstall()
                if status_started and self.status is not None:
                    await self.status.stop()
        if error is not None:
            raise error
        if code in (None, 0):
            log.info("Agent has successfully terminated")
        return code

    def _on_files_changed(self, changes: ChangeSet) -> None:
        if changes.changed and self.epochs is not None:
            self.epochs.notify_change(f"files changed: {', '.join(str(p) for p in changes.changed)}")

    async def _shutdown(self, epochs: Epochs) -> None:
        from agent.proxy.admin import AdminError  # noqa: PLC0415 (lazy: see the TYPE_CHECKING imports)

        if not epochs.running():
            return
        if self.lifecycle.immediate or self.lifecycle.skip_drain:
            log.info("shutdown without drain (%s)", self.lifecycle.shutdown_cause)
            # Still SIGTERM first (Envoy flushes its access logs), unless a second request asked for "now".
            await epochs.stop_all(0 if self.lifecycle.immediate else self.supervision.stop_grace)
            return
        try:
            await self.admin.drain_listeners(inbound_only=self.drain.proxy_type == "sidecar", graceful=True)
        except AdminError as exc:
            log.warning("draining listeners failed: %s", exc)
        if self.drain.exit_on_zero_active_connections:
            await self._drain_until_idle(epochs)
        else:
            log.info("Graceful termination period is %gs, starting...", self.drain.termination_drain)
            await self._wait_draining(epochs, self.drain.termination_drain)
            log.info("Graceful termination period complete, terminating remaining proxies.")
        await epochs.stop_all(0 if self.lifecycle.immediate else self.supervision.stop_grace)

    async def _wait_draining(self, epochs: Epochs, seconds: float) -> bool:
        """Wait up to `seconds`; False when cut short (second shutdown request, or every Envoy exited)."""
        deadline = asyncio.get_running_loop().time() + seconds
        # Polled: Lifecycle has no event for "immediate", and a 100 ms reaction to a second SIGTERM is enough.
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            if self.lifecycle.immediate or not epochs.running():
                return False
            await asyncio.sleep(min(0.1, remaining))
        return True

    async def _drain_until_idle(self, epochs: Epochs) -> None:
        log.info("Exit on zero active connections: waiting %gs first", self.drain.minimum_drain)
        if not await self._wait_draining(epochs, self.drain.minimum_drain):
            return
        from agent.proxy.admin import AdminError  # noqa: PLC0415 (lazy: see the TYPE_CHECKING imports)

        errors = 0
        while True:
            try:
                stats = await self.admin.stats("downstream_cx_active$")
            except AdminError as exc:
                errors += 1
                log.warning("reading active connections failed (%d/5): %s", errors, exc)
                if errors >= 5:
                    return
            else:
                errors = 0
                if not stats:
                    log.info("stats are not enabled: stopping now")
                    return
                active = active_connections(stats, self.drain.excluded_listener_ports)
                if active == 0:
                    log.info("no active connections left")
                    return
                log.info("%d active connections, waiting", active)
            if not await self._wait_draining(epochs, self.drain.poll_interval):
                return
