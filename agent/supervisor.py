"""The supervisor: the one TaskGroup that owns every long-running task of `pilot-agent proxy`, and the shutdown.

Start order (aiohttp's runner habit: fixed order, reversed on the way down): the services in the order given (the
status server first: kubelet must get 503s, not connection refused, while Envoy starts; then whatever Envoy must
find listening), signal dispatcher, orphan reaper (PID 1 only), file watcher (its events flow once `settled`), then
the Envoy epochs. Shutdown
(Istio's pkg/envoy/agent.go terminate):
1. readiness is 503 from the moment the shutdown is requested (Lifecycle.not_ready_reason);
2. unless the drain is skipped (/quitquitquit, /drain) or a second SIGTERM came: POST
   /drain_listeners?inboundonly&graceful (sidecar) or ?graceful (router), then wait terminationDrainDuration, or
   with EXIT_ON_ZERO_ACTIVE_CONNECTIONS wait MINIMUM_DRAIN_DURATION and then until no downstream connection is
   active; the wait ends early when every epoch has exited or a second shutdown request arrives;
3. stop every epoch (SIGTERM, then SIGKILL after a grace), remove their bootstrap files and /dev/shm segment;
4. stop the watcher, the reaper, the signal dispatcher, then the services in reverse order; return the exit code.

A service is anything with `start()` and `stop()` (the Service protocol); one that also has `run()` (LongRunning)
gets that coroutine run as a task of the TaskGroup from its start until just before its stop. A `run()` (or the
watcher's, the reaper's, the signal dispatcher's) that raises is not a traceback: the agent shuts down as on SIGTERM
(drain, stop Envoy, stop the services) and run() raises AgentError naming the part and the cause (SERVICE_FAILED,
or the AgentError's own code). A service names itself in that line with a `name` attribute (else its class name).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent.aio import first_of
from agent.errors import AgentError, ExitCode, describe_error
from agent.lifecycle import Lifecycle
from agent.pid1 import OrphanReaper, SignalDispatcher, is_pid1
from agent.proxy.desired import DesiredState, DesiredStateFn
from agent.proxy.epochs import Epochs
from agent.proxy.events import DrainSettings, SupervisionSettings, WatchSettings
from agent.proxy.launcher import EnvoyHandle, EnvoyUnreachable, Launcher
from agent.proxy.start_gate import StartGate
from agent.watch import ChangeSet, Watcher

if TYPE_CHECKING:
    # `pilot-agent proxy` imports this module (its settings) before it execs Envoy; prometheus_client and aiohttp
    # load after the exec, overlapping Envoy's own start.
    from agent.metrics import AgentMetrics

log = logging.getLogger("agent.supervisor")


def service_name(service: object) -> str:
    """How the log names a service: its `name` attribute ("status server", "DNS proxy"), else its class name."""
    name = getattr(service, "name", None)
    return name if isinstance(name, str) and name else type(service).__name__


class Service(Protocol):
    """A part of the agent that serves beside Envoy (the status server; the xDS proxy, SDS server, DNS proxy)."""

    async def start(self) -> None:
        """Listen. Called in order, before Envoy is started or adopted. Raises AgentError: the agent stops."""

    async def stop(self) -> None:
        """Close. Called in reverse order, after every Envoy epoch has stopped; only if start() returned."""


@runtime_checkable
class LongRunning(Protocol):
    async def run(self) -> None:
        """Work until cancelled (a refresh loop, an upstream connection). An exception shuts the agent down."""


class Supervisor:
    def __init__(
        self,
        launcher: Launcher,
        supervision: SupervisionSettings,
        drain: DrainSettings,
        desired_state: DesiredStateFn,
        *,
        lifecycle: Lifecycle,
        metrics: AgentMetrics,
        services: Sequence[Service] = (),
        watch: WatchSettings | None = None,
        signals: bool = True,
        signal_queue: asyncio.Queue[int] | None = None,
        reap: bool | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        epoch0: tuple[EnvoyHandle, DesiredState] | None = None,
        start_gate: StartGate | None = None,
        settled: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`settled`: what the start-up work no probe waits for (the file watcher's observer, the policy loop while an
        adopted epoch 0 runs) waits for first, so that the status server answers the first readiness probes without
        it (None: nothing)."""
        self.launcher = launcher
        self.supervision = supervision
        self.drain = drain
        self.desired_state = desired_state
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.services = tuple(services)
        self.watch = watch
        self.signals = signals
        # Start-up: the queue the early signal handlers fill (the dispatcher reads it: a signal whose handler call
        # is already scheduled when install() replaces the handlers still lands there), and an epoch 0 started
        # before the supervisor existed.
        self.signal_queue = signal_queue
        self.reap = is_pid1() if reap is None else reap
        self.sleep = sleep
        self.epoch0 = epoch0
        # Inputs Envoy reads itself (the local xDS files): a crash restart waits while they are broken.
        self.start_gate = start_gate
        self.settled = settled
        self.epochs: Epochs | None = None
        self.watcher: Watcher | None = None
        self.reaper: OrphanReaper | None = None
        self.started = asyncio.Event()
        # The first long-running part that failed (raised out of its run()): the agent shuts down and reports it.
        self.failure: AgentError | None = None

    async def run(self) -> int:
        """Exit paths: 0 after a requested shutdown; ENVOY_RESTART_BUDGET_EXHAUSTED, or with the exit policy OK /
        ENVOY_EXITED, when Envoy is gone for good; raises AgentError (a service cannot listen, Envoy cannot start
        at all) after stopping whatever had started."""
        error: AgentError | None = None
        code: int = ExitCode.OK
        async with asyncio.TaskGroup() as tg:
            epochs = Epochs(
                self.launcher,
                self.supervision,
                self.desired_state,
                lifecycle=self.lifecycle,
                metrics=self.metrics,
                spawn=tg.create_task,
                sleep=self.sleep,
                start_gate=self.start_gate,
            )
            self.epochs = epochs
            if self.epoch0 is not None:
                epochs.adopt(*self.epoch0)
            background: list[asyncio.Task[Any]] = []
            started: list[tuple[Service, asyncio.Task[None] | None]] = []
            dispatcher = SignalDispatcher(
                self.lifecycle,
                on_hot_restart=epochs.request_hot_restart,
                forward=epochs.forward_signal,
                queue=self.signal_queue,
            )
            try:
                for service in self.services:
                    await service.start()
                    work = None
                    if isinstance(service, LongRunning):
                        work = tg.create_task(self._guarded(service_name(service), service.run()))
                    started.append((service, work))
                if self.signals:
                    dispatcher.install()
                    background.append(tg.create_task(self._guarded("signal dispatcher", dispatcher.run())))
                if self.reap:
                    self.reaper = OrphanReaper(epochs.own_pids)
                    background.append(tg.create_task(self._guarded("orphan reaper", self.reaper.run())))
                if self.watch is not None:
                    self.watcher = Watcher(
                        self.watch.files,
                        self._on_files_changed,
                        metrics=self.metrics,
                        debounce=self.watch.debounce,
                        max_delay=self.watch.max_delay,
                        on_changing=epochs.validate_ahead,
                        missing_dir_level=logging.DEBUG if self.watch.quiet_missing_dirs else logging.WARNING,
                    )
                    # Watched from the contents seen now (the watcher hashes them again once its events flow).
                    watching = self._after_start(self.watcher.run())
                    background.append(tg.create_task(self._guarded("file watcher", watching)))
                self.started.set()
                if self.settled is not None and self.epoch0 is not None:
                    # The policy loop (its imports, its first render and LIVE polls) waits while the running epoch 0
                    # is being judged ready; an exit of Envoy meanwhile is handled at once.
                    await first_of(self.settled(), epochs.wait_all_exited())
                result = await epochs.run()
                if result is None:
                    await self._shutdown(epochs)
                else:
                    code = result
            except AgentError as exc:
                error = exc
            finally:
                # Whatever happened, no Envoy outlives the agent, and services close only after it has stopped.
                await epochs.stop_all(0 if self.lifecycle.immediate else self.supervision.stop_grace)
                for task in background:
                    task.cancel()
                if self.signals:
                    dispatcher.uninstall()
                for service, work in reversed(started):
                    if work is not None:
                        work.cancel()
                        await asyncio.wait([work])
                    await service.stop()
        error = error or self.failure
        if error is not None:
            raise error
        if code in (None, 0):
            log.info("Agent has successfully terminated")
        return code

    async def _after_start(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            if self.settled is not None:
                await self.settled()
        except BaseException:
            work.close()  # cancelled before it began
            raise
        await work

    async def _guarded(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a long-running part. If it raises, shut down as on SIGTERM (Envoy drains and stops, the services
        stop) and remember why, for run() to raise: one line naming the part, never a traceback and exit 1."""
        try:
            await work
        except Exception as exc:  # any bug in a part ends the agent cleanly, with its name
            if self.failure is None:
                code = exc.exit_code if isinstance(exc, AgentError) else ExitCode.SERVICE_FAILED
                self.failure = AgentError(f"{name} failed: {describe_error(exc)}", code)
            log.debug("%s failed", name, exc_info=True)
            if not self.lifecycle.shutting_down:  # a second request would cut a drain already under way short
                self.lifecycle.request_shutdown(f"{name} failed")

    def _on_files_changed(self, changes: ChangeSet) -> None:
        if changes.changed and self.epochs is not None:
            self.epochs.notify_change(f"files changed: {', '.join(str(p) for p in changes.changed)}")

    async def _shutdown(self, epochs: Epochs) -> None:
        if not epochs.running():
            return
        if self.lifecycle.immediate or self.lifecycle.skip_drain:
            log.info("shutdown without drain (%s)", self.lifecycle.shutdown_cause)
            # Still SIGTERM first (Envoy flushes its access logs), unless a second request asked for "now".
            await epochs.stop_all(0 if self.lifecycle.immediate else self.supervision.stop_grace)
            return
        try:
            await self.launcher.drain_listeners(inbound_only=self.drain.proxy_type == "sidecar")
        except EnvoyUnreachable as exc:
            log.warning("draining listeners failed: %s", exc)
        if self.drain.exit_on_zero_active_connections:
            await self._drain_until_idle(epochs)
        else:
            log.info("Graceful termination period is %gs, starting...", self.drain.termination_drain)
            await self._wait_draining(epochs, self.drain.termination_drain)
            log.info("Graceful termination period complete, terminating remaining proxies.")
        await epochs.stop_all(0 if self.lifecycle.immediate else self.supervision.stop_grace)

    async def _wait_draining(self, epochs: Epochs, seconds: float) -> bool:
        """Wait up to `seconds`; False when cut short (a second shutdown request, or every Envoy exited)."""
        return not await first_of(epochs.wait_all_exited(), self.lifecycle.wait_immediate(), timeout=seconds)

    async def _drain_until_idle(self, epochs: Epochs) -> None:
        log.info("Exit on zero active connections: waiting %gs first", self.drain.minimum_drain)
        if not await self._wait_draining(epochs, self.drain.minimum_drain):
            return
        errors = 0
        while True:
            try:
                active = await self.launcher.active_connections(self.drain.excluded_listener_ports)
            except EnvoyUnreachable as exc:
                errors += 1
                log.warning("reading active connections failed (%d/5): %s", errors, exc)
                if errors >= 5:
                    return
            else:
                errors = 0
                if active is None:
                    log.info("stats are not enabled: stopping now")
                    return
                if active == 0:
                    log.info("no active connections left")
                    return
                log.info("%d active connections, waiting", active)
            if not await self._wait_draining(epochs, self.drain.poll_interval):
                return
