"""Hot-restart epochs: reconcile the desired state (bootstrap + dependency files) with the running Envoy family.

The policy only; Envoy itself (files, processes, admin API) is behind agent/proxy/launcher.Launcher.
Policy (Envoy's restarter/hot-restarter.py and Istio's 2019 pkg/envoy/agent.go, adapted):
- Epochs rise by one, same --base-id; epoch N+1 starts only when N is LIVE and no older epoch is still draining
  (starting N+2 while N drains makes Envoy kill N early, cutting its in-flight requests).
- Never trade a healthy epoch for a doubtful one: the new bootstrap is checked with `envoy --mode validate` first;
  an invalid one (or one that does not even render) is logged and counted, the running epoch stays, and it is
  retried when the inputs change again.
- A child epoch that fails anyway wedges the family (the parent already shut its admin listener down; every later
  hot restart on that base id fails). Recovery: stop the whole family and cold-start epoch 0 on the last
  configuration that went LIVE; the failed configuration is retried only when the inputs change again.
- The newest epoch exiting unexpectedly is a crash: readiness goes 503 at once, every other epoch is stopped, and
  the family is restarted at epoch 0 after an exponential backoff (tenacity; 200 ms doubling, budget 10). A crash
  before any epoch was ever LIVE is judged first: a known start-up failure (diagnosis.py) or a bootstrap Envoy
  rejects (`--mode validate`) will never run, so the agent exits with the reason instead of crash-looping.
- The budget is one tenacity retry sequence (budget.py). After a crash the next family is on probation: once it has
  run healthy_period without a crash, or the desired state changes, the sequence ends and a fresh one (the whole
  budget) begins. When the budget is spent the termination message is written and run() returns
  ENVOY_RESTART_BUDGET_EXHAUSTED.
Its settings, records, events and outcomes are in events.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError, ExitCode, describe_error
from agent.proxy.ahead import Target, ValidationAhead
from agent.proxy.budget import EnvoyCrashed, RestartBudget
from agent.proxy.desired import DesiredState, DesiredStateFn, render_off_loop
from agent.proxy.events import (
    Applied,
    ChangeRequested,
    Epoch,
    Event,
    Exited,
    LiveWait,
    Pending,
    SupervisionSettings,
)
from agent.proxy.launcher import EnvoyHandle, EnvoyUnresponsive, Launcher
from agent.proxy.process import ExitCause, ExitInfo
from agent.proxy.spawn import BootstrapWriteError, EnvoyExecError
from agent.proxy.start_gate import StartGate, wait_until_startable
from agent.proxy.termination import termination_message, write_termination_log

if TYPE_CHECKING:
    # Only types here: `pilot-agent proxy` imports this module (its settings) before it execs Envoy, and tenacity,
    # prometheus_client and aiohttp load after the exec, overlapping Envoy's own start.
    from agent.lifecycle import Lifecycle
    from agent.metrics import AgentMetrics

log = logging.getLogger("agent.proxy")

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class _Stop(Exception):
    """Shutdown requested: leave the retry loop without restarting anything."""


class Epochs:
    """Owns the Envoy epochs. `run()` is the reconcile loop; the supervisor owns the tasks (`spawn`)."""

    def __init__(
        self,
        launcher: Launcher,
        settings: SupervisionSettings,
        desired_state: DesiredStateFn,
        *,
        lifecycle: Lifecycle,
        metrics: AgentMetrics,
        spawn: Spawn,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        start_gate: StartGate | None = None,
    ) -> None:
        self._launcher = launcher
        self._start_gate = start_gate  # a crash restart waits while it says Envoy cannot start (start_gate.py)
        self.settings = settings
        self._desired_state = desired_state
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._spawn = spawn
        self._budget = RestartBudget(settings, metrics, lifecycle, sleep=sleep)
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._running: dict[int, Epoch] = {}
        self.current: Epoch | None = None
        # The state of the newest epoch seen LIVE: what a crash restart or a recovery starts on.
        self.last_good: DesiredState | None = None
        self._ever_live = False
        self._pending: Pending | None = None
        self._last_desired_digest: str | None = None
        self._rejected: str | None = None
        self._crashes = 0
        self._family_started = 0.0
        # Why the family on probation earned the restart budget back (None: not yet).
        self._budget_earned: str | None = None
        self._adopted: Epoch | None = None
        # The state the newest epoch 0 was started on: a restart's fallback when nothing went LIVE yet.
        self._last_started: DesiredState | None = None
        self._ahead = ValidationAhead(
            launcher, desired_state, spawn=spawn, target=self._ahead_target, forget=self._forget_unless_running
        )

    # ---- inputs (called from the watcher, the signal dispatcher, tests) ----

    def notify_change(self, reason: str = "inputs changed") -> None:
        self._events.put_nowait(ChangeRequested(reason))
        self._budget.changed.set()

    def validate_ahead(self) -> None:
        """The watched files show new contents but may still change (the watcher's debounce window is open):
        validate what they render to now, so that the hot restart that follows need not (agent/proxy/ahead.py)."""
        self._ahead.request()

    def request_hot_restart(self) -> None:
        """SIGHUP: restart into a new epoch even when the desired state has not changed."""
        self._events.put_nowait(ChangeRequested("hot restart requested", forced=True))
        self._budget.changed.set()

    def forward_signal(self, sig: int) -> None:
        for epoch in list(self._running.values()):
            epoch.process.send_signal(sig)

    def own_pids(self) -> set[int]:
        pids = {epoch.process.pid for epoch in self._running.values()}
        return pids | self._launcher.own_pids()

    def numbers(self) -> list[int]:
        """The numbers of the epochs whose exit has not been collected yet."""
        return sorted(self._running)

    def idle(self) -> bool:
        """Nothing to do until the inputs change again: no change queued or waiting to be applied (a change that
        came while an epoch drained is applied after it exits, on the inputs as they are then), none draining."""
        return self._pending is None and self._events.empty() and not self._retiring()

    # ---- the loop ----

    async def run(self) -> int | None:
        """Exit paths: None when shutdown was requested (the supervisor drains and stops the epochs);
        ENVOY_RESTART_BUDGET_EXHAUSTED after the termination message when crashes used up the budget;
        with exit_on_envoy_exit, OK or ENVOY_EXITED as soon as Envoy exits on its own; raises AgentError when
        Envoy cannot start at all (a known start-up failure: STARTUP_FAILED; a bootstrap Envoy rejects:
        CONFIG_ERROR; the bootstrap cannot be written at start-up)."""
        retrying = self._budget.retrying()
        try:
            while True:
                # One iteration is one restart budget: it ends when a family on probation earns the budget back.
                async for attempt in retrying:
                    with attempt:
                        await self._run_family(probation=attempt.retry_state.attempt_number > 1)
                self._budget.restored(self._budget_earned or "")
        except _Stop:
            return None
        except EnvoyCrashed as crash:
            return self._give_up(crash.info)

    def _give_up(self, info: ExitInfo) -> int:
        if self.settings.exit_on_envoy_exit:
            write_termination_log(self.settings.termination_log, termination_message(info, 1, gave_up=False))
            log.error("%s; exiting with it (ENVOY_RESTART_POLICY=exit)", info.describe())
            return ExitCode.OK if info.returncode == 0 else ExitCode.ENVOY_EXITED
        write_termination_log(self.settings.termination_log, termination_message(info, self._crashes, gave_up=True))
        log.error("Envoy restart budget exhausted after %d crashes: %s", self._crashes, info.describe())
        return ExitCode.ENVOY_RESTART_BUDGET_EXHAUSTED

    def _note_desired(self, desired: DesiredState) -> None:
        if self._last_desired_digest is not None and desired.digest != self._last_desired_digest:
            self._budget_earned = "desired state changed"
        self._last_desired_digest = desired.digest

    async def _render(self) -> DesiredState | None:
        """The desired state, or None (logged, counted) when it cannot be rendered. Nothing outside the agent's
        control (file contents, env, disk) may end the supervisor: every error here rejects the new configuration
        and the running epoch keeps serving. Off the event loop: rendering reads files and runs jinja2 (~0.15 s).
        Raises _Stop when shutdown is requested before the render ends (it may never: an operator's template)."""
        rendering = asyncio.ensure_future(render_off_loop(self._desired_state))
        stopping = asyncio.ensure_future(self._lifecycle.wait_shutdown())
        try:
            await asyncio.wait({rendering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not rendering.done():
            # A render that does not end (a template looping for ever) must not hold up the drain and stop.
            rendering.cancel()
            log.warning("shutdown requested while the new configuration was still rendering: abandoned")
            raise _Stop
        try:
            desired = rendering.result()
        except Exception as exc:
            self._metrics.config_errors.labels("render").inc()
            log.error("new configuration rejected, Envoy keeps its current one: %s", describe_error(exc))
            log.debug("rendering failed", exc_info=True)
            return None
        self._note_desired(desired)
        return desired

    async def _state_for_start(self) -> DesiredState:
        """A (re)start runs the last state seen LIVE, then reconciles to the desired one through a validated hot
        restart. With none seen LIVE yet (first start, or crashing since), it renders the desired state afresh,
        so fixing a config that crashes Envoy at start takes effect; if that does not render, what ran last.
        With hot restart off a change can only apply at a start: the desired state then, if it validates."""
        desired = await self._render()
        if desired is None:
            state = self.last_good or self._last_started
            if state is None:  # `pilot-agent proxy` renders once before the supervisor starts; a library user may not
                raise AgentError("no configuration to start Envoy on (see the error above)", ExitCode.CONFIG_ERROR)
            return state
        if self.last_good is None:
            return desired
        if self._launcher.hot_restart or desired.digest == self.last_good.digest:
            return self.last_good
        if self.settings.validate and not await self._validate(0, desired):
            return self.last_good
        return desired

    async def _run_family(self, *, probation: bool) -> None:
        """One hot-restart family until a crash (raises EnvoyCrashed after stopping all its epochs) or shutdown
        (raises _Stop). On probation (the attempt after a crash) it returns once the family earned the restart
        budget back (healthy_period without a crash, or a new desired state), and the next call continues it.
        A crash ends the whole family: a parent still draining after a hot restart would keep the base id's
        hot-restart sockets, and the next family's epoch 0 could not start ("unable to bind domain socket")."""
        try:
            await self._family(probation)
        except EnvoyCrashed:
            await self.stop_all(self.settings.stop_grace)
            raise

    async def _family(self, probation: bool) -> None:
        self._budget_earned = None
        if self._lifecycle.shutting_down:
            raise _Stop
        if self.current is None:
            await self._start_family()
        while True:
            if self._lifecycle.shutting_down:
                raise _Stop
            now = time.monotonic()
            if probation and self._budget_earned is None and now - self._family_started >= self.settings.healthy_period:
                self._budget_earned = f"Envoy healthy for {self.settings.healthy_period:g}s"
            if probation and self._budget_earned is not None:
                return
            pending = self._pending
            if pending is not None and not self._retiring() and (pending.retry_at is None or now >= pending.retry_at):
                await self._reconcile(pending)
                continue
            timeout: float | None = None
            if probation:
                timeout = max(0.0, self.settings.healthy_period - (now - self._family_started))
            if pending is not None and pending.retry_at is not None:
                wait = max(0.0, pending.retry_at - now)
                timeout = wait if timeout is None else min(timeout, wait)
            event = await self._next_event(timeout)
            if isinstance(event, Exited):
                await self._on_exit(event.epoch)
            elif isinstance(event, ChangeRequested):
                self._request(event)

    def _request(self, event: ChangeRequested) -> None:
        if self._retiring():
            draining = ", ".join(str(e.number) for e in self._retiring())
            log.info(
                "%s: applied once epoch %s has drained and exited (parentShutdownDuration)",
                event.reason,
                draining,
            )
        else:
            log.info("%s: reconciling", event.reason)
        if self._pending is None:
            self._pending = Pending()
        self._pending.forced = self._pending.forced or event.forced
        self._pending.retry_at = None
        self._pending.reasons.append(event.reason)

    async def _reconcile(self, pending: Pending) -> None:
        outcome = await self._apply(pending.forced)
        log.debug("reconcile step (%s): %s", "; ".join(pending.reasons) or "after a start", outcome.value)
        if outcome is Applied.POSTPONED:
            pending.retry_at = time.monotonic() + self.settings.retry_interval
            return
        if self._pending is pending:
            self._pending = None
        if outcome is Applied.RECOVERED:
            self._family_started = time.monotonic()

    async def _start_family(self) -> None:
        """Epoch 0 of a new family, then wait to learn whether it goes LIVE (then it is the state to fall back on).
        Exits and shutdown end the wait at once; without a control plane Envoy may never be LIVE, and the loop
        goes on after the timeout."""
        self._drop_stale_exits()
        if self._crashes and self._start_gate and not await wait_until_startable(self._start_gate, self._lifecycle):
            raise _Stop
        epoch = await self._start_epoch(0, await self._state_for_start())
        self.current = epoch
        self._lifecycle.envoy_up()
        self._family_started = time.monotonic()
        # Right after a (re)start the desired state may differ from what we started on (last good): reconcile.
        self._pending = Pending()
        if await self._wait_live(epoch) is LiveWait.LIVE:
            self._went_live(epoch)
            log.info("Envoy epoch 0 is LIVE")

    def _went_live(self, epoch: Epoch) -> None:
        self.last_good = epoch.state
        self._ever_live = True

    def _retiring(self) -> list[Epoch]:
        return [epoch for epoch in self._running.values() if epoch.retiring]

    async def _next_event(self, timeout: float | None) -> Event | None:
        """The next event, or None after `timeout` or when shutdown is requested."""
        getter = asyncio.ensure_future(self._events.get())
        stopper = asyncio.ensure_future(self._lifecycle.wait_shutdown())
        try:
            done, _ = await asyncio.wait({getter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        if getter.done() and not getter.cancelled():  # raced: do not lose the event
            self._events.put_nowait(getter.result())
        return None

    def _drop_stale_exits(self) -> None:
        """Keep change requests, drop exit events of epochs that are no longer ours."""
        kept: list[Event] = []
        while not self._events.empty():
            event = self._events.get_nowait()
            if not isinstance(event, Exited) or self._running.get(event.epoch.number) is event.epoch:
                kept.append(event)
        for event in kept:
            self._events.put_nowait(event)

    async def _on_exit(self, epoch: Epoch) -> None:
        info = epoch.process.exit_info
        assert info is not None
        if self._running.get(epoch.number) is not epoch:
            return  # already accounted for (stopped by us during recovery)
        del self._running[epoch.number]
        self._launcher.forget(epoch.number)
        if epoch.retiring:
            self._metrics.envoy_exits.labels(info.cause).inc()
            log.info("Envoy epoch %d retired (%s)", epoch.number, info.describe())
            return
        self._metrics.envoy_exits.labels(info.cause).inc()
        if epoch is not self.current:
            return
        self.current = None
        if self._lifecycle.shutting_down:
            raise _Stop
        self._crashes += 1
        self._lifecycle.envoy_down(f"Envoy exited: {info.describe()}")
        # Envoy's own lines are on stderr already: the agent's line does not repeat them.
        log.error("%s", info.describe())
        await self._judge_early_exit(epoch, info)
        raise EnvoyCrashed(info)

    async def _judge_early_exit(self, epoch: Epoch, info: ExitInfo) -> None:
        """Before any epoch was ever LIVE, an exit may mean Envoy will never run here: raise AgentError then, with
        the reason, instead of a crash loop (a cost only on this failure path: the first start is not delayed by a
        validation). Returns when the exit is a crash like any other."""
        if self._ever_live:
            return
        known = self._launcher.diagnose(info)
        if known is not None:
            error = AgentError(known, ExitCode.STARTUP_FAILED)
        elif not self.settings.validate:
            return
        else:
            verdict = await self._launcher.validate(epoch.number, epoch.state)
            if verdict.ok:
                self._launcher.forget(epoch.number)
                return
            error = AgentError(f"Envoy rejected its configuration: {verdict.error}", ExitCode.CONFIG_ERROR)
        message = termination_message(info, self._crashes, gave_up=True)
        write_termination_log(self.settings.termination_log, f"{error}\n{message}")
        raise error

    # ---- epochs ----

    def adopt(self, process: EnvoyHandle, state: DesiredState) -> None:
        """Take over an epoch 0 started (by `launcher.start_envoy`) before the supervisor existed: at start-up Envoy
        is started before the agent's heavy imports, so the two overlap. Its exit is collected from now on, and the
        first family runs on it instead of starting another."""
        epoch = Epoch(process, state)
        self._register(epoch)
        self._adopted = epoch
        # It runs: readiness need not wait for this loop's own start (its render, its imports) to ask Envoy.
        self._lifecycle.envoy_up()

    def _register(self, epoch: Epoch) -> None:
        self._running[epoch.number] = epoch
        if epoch.number == 0:
            self._lifecycle.envoy_started()
            self._last_started = epoch.state
        self._spawn(epoch.process.run(on_exit=lambda _process: self._events.put_nowait(Exited(epoch))))
        self._metrics.envoy_epoch.set(epoch.number)

    async def _start_epoch(self, number: int, state: DesiredState) -> Epoch:
        """Write envoy-rev<number>.json and start Envoy. For epoch 0 a failure to start counts as a crash
        (EnvoyCrashed); for a child the launcher's error is raised (the parent keeps serving)."""
        adopted, self._adopted = self._adopted, None
        if adopted is not None:
            if number == 0 and self._running.get(0) is adopted and adopted.state.digest == state.digest:
                return adopted
            await self.stop_all(self.settings.stop_grace)  # not what should run: one family per base id
        try:
            process = await self._launcher.start(number, state)
        except (BootstrapWriteError, EnvoyExecError) as exc:
            if number > 0:
                raise
            if isinstance(exc, BootstrapWriteError) and not self._ever_live:
                raise exc.as_agent_error() from None  # at start-up: configPath is unusable, no restart cures it
            info = ExitInfo(0, 0, 127, False, 0.0, (str(exc),))
            self._crashes += 1
            self._metrics.envoy_exits.labels(ExitCause.ERROR).inc()
            self._lifecycle.envoy_down(f"cannot start Envoy: {exc}")
            log.error("cannot start Envoy epoch 0: %s", exc)
            raise EnvoyCrashed(info) from exc
        epoch = Epoch(process, state)
        self._register(epoch)
        return epoch

    async def _apply(self, forced: bool) -> Applied:
        """Bring the family to the desired state."""
        desired = await self._render()
        if desired is None:
            return Applied.INVALID
        current = self.current
        assert current is not None
        if not forced and desired.digest in (current.state.digest, self._rejected):
            return Applied.UNCHANGED
        if not self._launcher.hot_restart:
            log.warning("configuration changed but hot restart is disabled: it applies at Envoy's next start")
            return Applied.UNCHANGED
        live = await self._wait_live(current)
        if live is LiveWait.LIVE:
            self._went_live(current)
        elif live is LiveWait.UNRESPONSIVE:
            log.error(
                "Envoy epoch %d has not answered on its admin API for %gs (stopped or stuck?): the hot restart is "
                "abandoned; the next change or SIGHUP tries again",
                current.number,
                self.settings.live_timeout,
            )
            return Applied.ABANDONED
        else:
            if live is LiveWait.NOT_LIVE and self._pending is not None and self._pending.retry_at is None:
                log.warning("Envoy epoch %d is not LIVE yet: postponing the hot restart", current.number)
            return Applied.POSTPONED
        number = current.number + 1
        if self.settings.validate and not await self._validate(number, desired):
            self._rejected = desired.digest
            return Applied.INVALID
        if self._lifecycle.shutting_down:
            self._launcher.forget(number)
            raise _Stop  # asked to stop while validating: do not start an epoch only to stop it
        log.info("hot restart: starting Envoy epoch %d", number)
        # Readiness stays as it is: the parent epoch keeps serving until the child is LIVE and then drains, so the
        # pod is as ready as before. If the child fails, _recover() takes readiness down for the cold start.
        try:
            child = await self._start_epoch(number, desired)
        except (BootstrapWriteError, EnvoyExecError) as exc:
            # Its bootstrap could not be written (disk full) or Envoy not executed: the parent keeps serving.
            self._launcher.forget(number)
            self._rejected = desired.digest
            self._metrics.hot_restarts.labels("failed").inc()
            self._metrics.config_errors.labels("start").inc()
            log.error("cannot start Envoy epoch %d (%s): epoch %d keeps serving", number, exc, current.number)
            return Applied.INVALID
        outcome = await self._wait_live(child)
        if outcome is LiveWait.LIVE:
            current.retiring = True
            self.current = child
            self._went_live(child)
            self._rejected = None
            self._metrics.hot_restarts.labels("done").inc()
            log.info("Envoy epoch %d is LIVE; epoch %d drains and exits", number, current.number)
            return Applied.DONE
        if outcome is LiveWait.SHUTDOWN:
            raise _Stop
        return await self._recover(child)

    async def _recover(self, child: Epoch) -> Applied:
        """The child epoch failed: the family is wedged. Stop it all and cold-start epoch 0 on the last good state."""
        self._metrics.hot_restarts.labels("failed").inc()
        self._metrics.config_errors.labels("start").inc()
        self._rejected = child.state.digest
        info = await child.process.stop(self.settings.stop_grace)
        log.error("Envoy epoch %d failed to start (%s)", child.number, info.describe())
        log.warning("the hot-restart family is wedged: stopping it and cold-starting epoch 0 on the last good config")
        self._lifecycle.envoy_down("recovering from a failed hot restart")
        await self.stop_all(self.settings.stop_grace)
        good = self.last_good
        assert good is not None
        self.current = await self._start_epoch(0, good)
        self._lifecycle.envoy_up()
        return Applied.RECOVERED

    def _ahead_target(self) -> Target | None:
        """What a hot restart would start now, for the validation ahead; None when nothing is worth judging."""
        current = self.current
        if current is None or not (self.settings.validate and self._launcher.hot_restart):
            return None
        if self._lifecycle.shutting_down:
            return None
        return Target(current.number + 1, {current.state.digest, self._rejected})

    def _forget_unless_running(self, number: int) -> None:
        if number not in self._running:
            self._launcher.forget(number)

    async def _validate(self, number: int, state: DesiredState) -> bool:
        verdict = await self._ahead.take(number, state)
        if verdict is None:
            verdict = await self._launcher.validate(number, state)
        if verdict.ok:
            return True
        self._metrics.hot_restarts.labels("invalid").inc()
        self._metrics.config_errors.labels("validate").inc()
        log.error("new Envoy configuration is invalid, the running epoch stays: %s", verdict.summary)
        return False

    async def _wait_live(self, epoch: Epoch) -> LiveWait:
        """Until `epoch` is LIVE, exits, shutdown is requested, or live_timeout. Polls the launcher every 20 ms at
        first (a hot-restarted epoch is LIVE in about 0.1 s), slowing to 250 ms (an Envoy waiting for its control
        plane may take long, and each poll costs both processes a little)."""
        deadline = time.monotonic() + self.settings.live_timeout
        interval = 0.02
        answered = False
        foreign = False
        exited = epoch.process.exited
        while True:
            if exited.is_set():
                return LiveWait.EXITED
            if self._lifecycle.shutting_down:
                return LiveWait.SHUTDOWN
            try:
                live = await self._launcher.live_epoch()
                answered = True
            except EnvoyUnresponsive:
                live = None
            if live == epoch.number:
                if await self._owns_admin(epoch):
                    return LiveWait.LIVE
                if not foreign and not exited.is_set():
                    foreign = True
                    log.warning(
                        "another process answers LIVE on Envoy's admin port, not Envoy epoch %d itself (pid %d "
                        "does not listen there): waiting for its own answer",
                        epoch.number,
                        epoch.process.pid,
                    )
            if time.monotonic() >= deadline:
                return LiveWait.NOT_LIVE if answered else LiveWait.UNRESPONSIVE
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await exited.wait()
            interval = min(0.25, interval * 1.25)

    async def _owns_admin(self, epoch: Epoch) -> bool:
        """The LIVE answer on the admin port is the epoch's own. Another agent's Envoy on this host with the same
        proxyAdminPort answers LIVE too, while ours is about to fail to bind the port: counted LIVE, that failure
        would be a crash (a crash loop) instead of the start-up failure it is. Once seen, known for the epoch."""
        if not epoch.owns_admin:
            epoch.owns_admin = await self._launcher.serves_admin(epoch.process)
        return epoch.owns_admin

    async def stop_all(self, grace: float) -> None:
        """Stop every epoch (SIGTERM, SIGKILL after `grace`), remove their files and the shared memory segment."""
        await self._ahead.cancel()
        epochs = list(self._running.values())
        await asyncio.gather(*(epoch.process.stop(grace) for epoch in epochs))
        for epoch in epochs:
            info = epoch.process.exit_info
            assert info is not None
            if self._running.get(epoch.number) is epoch:
                del self._running[epoch.number]
                self._metrics.envoy_exits.labels(info.cause).inc()
            self._launcher.forget(epoch.number)
        self.current = None
        self._launcher.forget_family()

    async def wait_all_exited(self) -> None:
        """Return once every epoch's process has exited (collected or not)."""
        for epoch in list(self._running.values()):
            await epoch.process.exited.wait()

    def running(self) -> list[Epoch]:
        return [epoch for epoch in self._running.values() if epoch.process.running]
