"""Hot-restart epochs: reconcile the desired state (bootstrap + dependency files) with the running Envoy family.

Policy (Envoy's restarter/hot-restarter.py and Istio's 2019 pkg/envoy/agent.go, adapted):
- Epochs rise by one, same --base-id; epoch N+1 starts only when N is LIVE and no older epoch is still draining
  (starting N+2 while N drains makes Envoy kill N early, cutting its in-flight requests).
- Never trade a healthy epoch for a doubtful one: the new bootstrap is checked with `envoy --mode validate` first;
  an invalid one is logged and counted, the running epoch stays, and it is retried when the inputs change again.
- A child epoch that fails anyway wedges the family (the parent already shut its admin listener down; every later
  hot restart on that base id fails). Recovery: stop the whole family and cold-start epoch 0 on the last
  configuration that went LIVE; the failed configuration is retried only when the inputs change again.
- The newest epoch exiting unexpectedly is a crash: readiness goes 503 at once, every other epoch is stopped, and
  the family is restarted at epoch 0 after an exponential backoff (tenacity; 200 ms doubling, budget 10). The
  budget is reset after a healthy period or when the desired state changes. When it is spent, the termination
  message is written and run() returns ENVOY_RESTART_BUDGET_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shlex
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.errors import AgentError, ExitCode
from agent.proxy.argv import LaunchSettings, envoy_argv, validate_argv
from agent.proxy.process import EnvoyProcess, ExitInfo, remove_file
from agent.proxy.termination import termination_message, write_termination_log

if TYPE_CHECKING:
    # Only types here: `pilot-agent proxy` imports this module (DesiredState) before it execs Envoy, and tenacity,
    # prometheus_client and aiohttp load after the exec, overlapping Envoy's own start.
    from tenacity import RetryCallState

    from agent.lifecycle import Lifecycle
    from agent.metrics import AgentMetrics
    from agent.proxy.admin import AdminClient

log = logging.getLogger("agent.proxy")


@dataclass(frozen=True)
class DesiredState:
    """What Envoy should run: the rendered bootstrap and the (path, sha256) of every file it depends on."""

    bootstrap: bytes
    dependencies: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> str:
        h = hashlib.sha256(self.bootstrap)
        for path, content_hash in self.dependencies:
            h.update(f"\0{path}\0{content_hash}".encode())
        return h.hexdigest()


DesiredStateFn = Callable[[], DesiredState]
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


@dataclass(frozen=True)
class SupervisionSettings:
    restart_initial_delay: float = 0.2
    restart_budget: int = 10
    # An epoch running this long without a crash earns the full restart budget back.
    healthy_period: float = 60.0
    # Istio's 2019 agent waited 20 s for the parent to be LIVE ("Envoy internally uses a 15s timer").
    live_timeout: float = 20.0
    # Istio's current behaviour: the agent exits when Envoy exits, no restarts (ENVOY_RESTART_POLICY=exit).
    exit_on_envoy_exit: bool = False
    termination_log: Path | None = Path("/dev/termination-log")
    stop_grace: float = 5.0
    validate: bool = True
    stderr_tail_lines: int = 20


class EnvoyCrashed(Exception):
    def __init__(self, info: ExitInfo) -> None:
        super().__init__(info.describe())
        self.info = info


class _Stop(Exception):
    """Shutdown requested: leave the retry loop without restarting anything."""


def shm_path(base_id: int) -> Path:
    # Envoy scales the base id by 10 and names its hot-restart shared memory after it (see hot_restart_impl.cc).
    return Path(f"/dev/shm/envoy_shared_memory_{base_id * 10}")


class Epochs:
    """Owns the Envoy processes. `run()` is the reconcile loop; the supervisor owns the tasks (`spawn`)."""

    def __init__(
        self,
        launch: LaunchSettings,
        settings: SupervisionSettings,
        desired_state: DesiredStateFn,
        *,
        lifecycle: Lifecycle,
        metrics: AgentMetrics,
        admin: AdminClient,
        spawn: Spawn,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        sink: BinaryIO | None = None,
    ) -> None:
        self.launch = launch
        self.settings = settings
        self._desired_state = desired_state
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.admin = admin
        self._spawn = spawn
        self._sleep = sleep
        self._sink = sink
        self._events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.procs: dict[int, EnvoyProcess] = {}
        self.current: EnvoyProcess | None = None
        self._retiring: set[EnvoyProcess] = set()
        # The state of the newest epoch seen LIVE: what a crash restart or a recovery starts on.
        self.last_good: DesiredState | None = None
        # The state the current (newest) epoch runs on, LIVE or not yet.
        self._current_state: DesiredState | None = None
        # Set by every change request: cuts a crash backoff short (a fixed config should not wait 100 s).
        self._changed = asyncio.Event()
        self._last_desired_digest: str | None = None
        self._rejected: str | None = None
        self._budget_left = settings.restart_budget
        self._crashes = 0
        self._validators: set[int] = set()
        self._adopted: tuple[EnvoyProcess, DesiredState] | None = None
        metrics.restart_budget.set(self._budget_left)

    # ---- inputs (called from the watcher, the signal dispatcher, tests) ----

    def notify_change(self, reason: str = "inputs changed") -> None:
        self._events.put_nowait(("change", reason))
        self._changed.set()

    def request_hot_restart(self) -> None:
        """SIGHUP: restart into a new epoch even when the desired state has not changed."""
        self._events.put_nowait(("restart", "hot restart requested"))
        self._changed.set()

    def wake(self) -> None:
        self._events.put_nowait(("wake", None))

    def forward_signal(self, sig: int) -> None:
        for proc in list(self.procs.values()):
            proc.send_signal(sig)

    def own_pids(self) -> set[int]:
        pids = {proc.pid for proc in self.procs.values()}
        return pids | self._validators

    # ---- the loop ----

    async def run(self) -> int | None:
        """Exit paths: None when shutdown was requested (the supervisor drains and stops the epochs);
        ENVOY_RESTART_BUDGET_EXHAUSTED after the termination message when crashes used up the budget;
        with exit_on_envoy_exit, OK or ENVOY_EXITED as soon as Envoy exits on its own."""
        from tenacity import AsyncRetrying, retry_if_exception  # noqa: PLC0415 (lazy: see the TYPE_CHECKING imports)

        retrying = AsyncRetrying(
            sleep=self._backoff_sleep,
            stop=lambda _state: self._budget_left <= 0,
            wait=self._delay,
            before_sleep=self._consume_budget,
            # Istio's current behaviour (exit with Envoy) is the same loop with no retry.
            retry=retry_if_exception(lambda e: isinstance(e, EnvoyCrashed) and not self.settings.exit_on_envoy_exit),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._run_family()
        except _Stop:
            return None
        except EnvoyCrashed as crash:
            info = crash.info
            if self.settings.exit_on_envoy_exit:
                write_termination_log(self.settings.termination_log, termination_message(info, 1, gave_up=False))
                log.error("%s; exiting with it (ENVOY_RESTART_POLICY=exit)", info.describe())
                return ExitCode.OK if info.returncode == 0 else ExitCode.ENVOY_EXITED
            message = termination_message(info, self._crashes, gave_up=True)
            write_termination_log(self.settings.termination_log, message)
            log.error("Envoy restart budget exhausted after %d crashes: %s", self._crashes, info.describe())
            return ExitCode.ENVOY_RESTART_BUDGET_EXHAUSTED
        return None

    def _delay(self, _state: RetryCallState) -> float:
        # tenacity computes the wait before it asks `stop`, so the budget is consumed in before_sleep instead.
        used = self.settings.restart_budget - self._budget_left
        return float(self.settings.restart_initial_delay * 2**used)

    def _consume_budget(self, state: RetryCallState) -> None:
        self._budget_left -= 1
        self.metrics.restart_budget.set(self._budget_left)
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning("restarting Envoy in %.1fs (restart budget left: %d)", delay, self._budget_left)

    async def _backoff_sleep(self, delay: float) -> None:
        # The backoff must not delay a shutdown, nor the fix of a config that made Envoy crash: race the
        # (injectable) sleep against both.
        self._changed.clear()
        sleeper = asyncio.ensure_future(self._sleep(delay))
        stopper = asyncio.ensure_future(self.lifecycle.shutdown_requested.wait())
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({sleeper, stopper, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper, changed):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _reset_budget(self, why: str) -> None:
        if self._budget_left != self.settings.restart_budget:
            log.info("restart budget reset: %s", why)
        self._budget_left = self.settings.restart_budget
        self.metrics.restart_budget.set(self._budget_left)

    async def _cold_start_state(self, fallback: DesiredState) -> DesiredState:
        """With hot restart off, a change can only be applied when Envoy starts: start on the desired state if it
        renders and validates, else on `fallback` (the last state that went LIVE)."""
        try:
            desired = self._desired_state()
        except AgentError:
            return fallback
        if desired.digest == fallback.digest:
            return fallback
        if self.settings.validate and not await self._validate(0, desired):
            return fallback
        return desired

    def _state_for_start(self) -> DesiredState:
        """A (re)start runs the last state seen LIVE, then reconciles to the desired one through a validated hot
        restart. With none seen LIVE yet (first start, or crashing since), it renders the desired state afresh,
        so fixing a config that crashes Envoy at start takes effect. A config error with nothing to fall back on
        is raised (fatal: the supervisor exits CONFIG_ERROR)."""
        try:
            desired = self._desired_state()
        except AgentError as exc:
            if self.last_good is None:
                raise
            self.metrics.config_errors.labels("render").inc()
            log.error("configuration does not render (%s): restarting on the last good one", exc)
            return self.last_good
        if self._last_desired_digest is not None and desired.digest != self._last_desired_digest:
            self._reset_budget("desired state changed")
        self._last_desired_digest = desired.digest
        return self.last_good if self.last_good is not None else desired

    async def _run_family(self) -> None:
        """One hot-restart family, from epoch 0 until a crash (raises EnvoyCrashed) or shutdown (raises _Stop).
        A crash ends the whole family: a parent still draining after a hot restart would keep the base id's
        hot-restart sockets, and the next family's epoch 0 could not start ("unable to bind domain socket")."""
        try:
            await self._family()
        except EnvoyCrashed:
            await self.stop_all(self.settings.stop_grace)
            raise

    async def _family(self) -> None:
        if self.lifecycle.shutdown_requested.is_set():
            raise _Stop
        self._drain_stale_events()
        state = self._state_for_start()
        if not self.launch.hot_restart:
            state = await self._cold_start_state(state)
        proc = await self._start_epoch(0, state)
        self.current = proc
        self.lifecycle.envoy_up()
        family_started = time.monotonic()
        # Learn whether this state goes LIVE (then it is the one to fall back on). Exits and shutdown end the
        # wait at once; without a control plane Envoy may never be LIVE, and the loop goes on after the timeout.
        if await self._wait_live(proc, self.settings.live_timeout) == "live":
            self.last_good = state
            log.info("Envoy epoch 0 is LIVE")
        # Right after a (re)start the desired state may differ from what we started on (last good): reconcile.
        pending, forced = True, False
        retry_at: float | None = None
        while True:
            if self.lifecycle.shutdown_requested.is_set():
                raise _Stop
            now = time.monotonic()
            healthy_for = now - family_started
            if self._budget_left < self.settings.restart_budget and healthy_for >= self.settings.healthy_period:
                self._reset_budget(f"Envoy healthy for {self.settings.healthy_period:.0f}s")
            if pending and not self._retiring and (retry_at is None or now >= retry_at):
                outcome = await self._apply(forced)
                if outcome == "postponed":
                    retry_at = time.monotonic() + 1.0
                else:
                    pending, forced, retry_at = False, False, None
                if outcome == "recovered":
                    family_started = time.monotonic()
                continue
            timeout: float | None = None
            if self._budget_left < self.settings.restart_budget:
                timeout = max(0.0, self.settings.healthy_period - (now - family_started))
            if pending and retry_at is not None:
                timeout = max(0.0, min(retry_at - now, timeout if timeout is not None else retry_at - now))
            kind, payload = await self._next_event(timeout)
            if kind == "exit":
                assert isinstance(payload, EnvoyProcess)
                self._on_exit(payload)
            elif kind in ("change", "restart"):
                if self._retiring:
                    draining = ", ".join(str(p.epoch) for p in self._retiring)
                    log.info(
                        "%s: applied once epoch %s has drained and exited (parentShutdownDuration)", payload, draining
                    )
                pending = True
                forced = forced or kind == "restart"
                log.info("%s: reconciling", payload)

    async def _next_event(self, timeout: float | None) -> tuple[str, object]:
        getter = asyncio.ensure_future(self._events.get())
        stopper = asyncio.ensure_future(self.lifecycle.shutdown_requested.wait())
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
        return ("wake", None)

    def _drain_stale_events(self) -> None:
        """Keep change requests, drop exit events of processes that are no longer ours."""
        kept = []
        while not self._events.empty():
            kind, payload = self._events.get_nowait()
            if kind != "exit" or payload in self.procs.values():
                kept.append((kind, payload))
        for item in kept:
            self._events.put_nowait(item)

    def _on_exit(self, proc: EnvoyProcess) -> None:
        info = proc.exit_info
        assert info is not None
        if self.procs.get(proc.epoch) is not proc:
            return  # already accounted for (stopped by us during recovery)
        del self.procs[proc.epoch]
        remove_file(self.launch.bootstrap_path(proc.epoch))
        if proc in self._retiring:
            self._retiring.discard(proc)
            self.metrics.envoy_exits.labels("clean" if info.returncode == 0 else info.cause).inc()
            log.info("Envoy epoch %d retired (%s)", proc.epoch, info.describe())
            return
        if proc is not self.current:
            self.metrics.envoy_exits.labels(info.cause).inc()
            return
        self.current = None
        if self.lifecycle.shutdown_requested.is_set():
            self.metrics.envoy_exits.labels(info.cause).inc()
            raise _Stop
        self._crashes += 1
        self.metrics.envoy_exits.labels(info.cause).inc()
        self.lifecycle.envoy_down(f"Envoy exited: {info.describe()}")
        log.error("%s; last output:\n%s", info.describe(), "\n".join(info.stderr_tail[-5:]))
        raise EnvoyCrashed(info)

    # ---- epochs ----

    def adopt(self, proc: EnvoyProcess, state: DesiredState) -> None:
        """Take over an epoch 0 exec'd (by `exec_epoch`) before the supervisor existed: at start-up Envoy is
        started before the agent's heavy imports, so the two overlap. Its exit is collected from now on, and the
        first family runs on it instead of starting another."""
        self._register(proc, state)
        self._adopted = (proc, state)

    def _register(self, proc: EnvoyProcess, state: DesiredState) -> None:
        self.procs[proc.epoch] = proc
        if proc.epoch == 0:
            self.lifecycle.envoy_starts += 1
        self._spawn(proc.run(on_exit=lambda p: self._events.put_nowait(("exit", p))))
        self.metrics.envoy_epoch.set(proc.epoch)
        self._current_state = state

    async def _start_epoch(self, epoch: int, state: DesiredState) -> EnvoyProcess:
        """Write envoy-rev<epoch>.json and exec Envoy. A failure to exec counts as a crash (EnvoyCrashed)."""
        adopted, self._adopted = self._adopted, None
        if adopted is not None:
            proc, adopted_state = adopted
            if epoch == 0 and self.procs.get(0) is proc and adopted_state.digest == state.digest:
                return proc
            await self.stop_all(self.settings.stop_grace)  # not what should run: one family per base id
        try:
            proc = await exec_epoch(
                self.launch, epoch, state, tail_lines=self.settings.stderr_tail_lines, sink=self._sink
            )
        except OSError as exc:
            if epoch > 0:
                raise  # a hot-restart child: _apply keeps the running parent
            info = ExitInfo(epoch, 0, 127, False, 0.0, (f"cannot execute {self.launch.binary}: {exc}",))
            self._crashes += 1
            self.metrics.envoy_exits.labels("error").inc()
            self.lifecycle.envoy_down(f"cannot start Envoy: {exc}")
            raise EnvoyCrashed(info) from exc
        self._register(proc, state)
        return proc

    async def _apply(self, forced: bool) -> str:
        """Bring the family to the desired state. Returns done, unchanged, invalid, postponed or recovered."""
        try:
            desired = self._desired_state()
        except AgentError as exc:
            self.metrics.config_errors.labels("render").inc()
            log.error("new configuration rejected, Envoy keeps its current one: %s", exc)
            return "invalid"
        if desired.digest != self._last_desired_digest:
            self._last_desired_digest = desired.digest
            self._reset_budget("desired state changed")
        current = self.current
        assert current is not None
        running = self._current_state
        if not forced and running is not None and desired.digest == running.digest:
            return "unchanged"
        if not forced and desired.digest == self._rejected:
            return "unchanged"
        if not self.launch.hot_restart:
            log.warning("configuration changed but hot restart is disabled: it applies at Envoy's next start")
            return "unchanged"
        live = await self._wait_live(current, self.settings.live_timeout)
        if live == "live" and running is not None:
            self.last_good = running
        if live != "live":
            if live == "timeout":
                log.warning("Envoy epoch %d is not LIVE yet: postponing the hot restart", current.epoch)
            return "postponed"
        epoch = current.epoch + 1
        if self.settings.validate and not await self._validate(epoch, desired):
            self._rejected = desired.digest
            return "invalid"
        if self.lifecycle.shutdown_requested.is_set():
            remove_file(self.launch.bootstrap_path(epoch))
            raise _Stop  # asked to stop while validating: do not start an epoch only to stop it
        log.info("hot restart: starting Envoy epoch %d", epoch)
        # Readiness stays as it is: the parent epoch keeps serving until the child is LIVE and then drains, so the
        # pod is as ready as before. If the child fails, _recover() takes readiness down for the cold start.
        try:
            child = await self._start_epoch(epoch, desired)
        except OSError as exc:
            # Its bootstrap could not be written (disk full) or Envoy not executed: the parent keeps serving.
            remove_file(self.launch.bootstrap_path(epoch))
            self._rejected = desired.digest
            self.metrics.hot_restarts.labels("failed").inc()
            self.metrics.config_errors.labels("start").inc()
            log.error("cannot start Envoy epoch %d (%s): epoch %d keeps serving", epoch, exc, current.epoch)
            return "invalid"
        outcome = await self._wait_live(child, self.settings.live_timeout)
        if outcome == "live":
            self._retiring.add(current)
            self.current = child
            self.last_good = desired
            self._rejected = None
            self.metrics.hot_restarts.labels("done").inc()
            log.info("Envoy epoch %d is LIVE; epoch %d drains and exits", epoch, current.epoch)
            return "done"
        if outcome == "shutdown":
            raise _Stop
        return await self._recover(child, desired)

    async def _recover(self, child: EnvoyProcess, failed: DesiredState) -> str:
        """The child epoch failed: the family is wedged. Stop it all and cold-start epoch 0 on the last good state."""
        self.metrics.hot_restarts.labels("failed").inc()
        self.metrics.config_errors.labels("start").inc()
        self._rejected = failed.digest
        await child.stop(self.settings.stop_grace)
        self._current_state = self.last_good
        info = child.exit_info
        assert info is not None
        log.error(
            "Envoy epoch %d failed to start (%s); last output:\n%s",
            child.epoch,
            info.describe(),
            "\n".join(info.stderr_tail[-5:]),
        )
        log.warning("the hot-restart family is wedged: stopping it and cold-starting epoch 0 on the last good config")
        self.lifecycle.envoy_down("recovering from a failed hot restart")
        await self.stop_all(self.settings.stop_grace)
        good = self.last_good
        assert good is not None
        proc = await self._start_epoch(0, good)
        self.current = proc
        self.lifecycle.envoy_up()
        return "recovered"

    async def _validate(self, epoch: int, state: DesiredState) -> bool:
        path = self.launch.bootstrap_path(epoch)
        try:
            _write_atomic(path, state.bootstrap)
            process = await asyncio.create_subprocess_exec(
                *validate_argv(self.launch, path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            remove_file(path)
            self.metrics.hot_restarts.labels("invalid").inc()
            self.metrics.config_errors.labels("validate").inc()
            log.error("cannot validate the new Envoy configuration (%s): the running epoch stays", exc)
            return False
        self._validators.add(process.pid)
        try:
            output, _ = await process.communicate()
        finally:
            self._validators.discard(process.pid)
        if process.returncode == 0:
            return True
        remove_file(path)
        self.metrics.hot_restarts.labels("invalid").inc()
        self.metrics.config_errors.labels("validate").inc()
        lines = output.decode("utf-8", "replace").strip().splitlines()[-5:]
        log.error("new Envoy configuration is invalid, the running epoch stays: %s", " | ".join(lines))
        return False

    async def _wait_live(self, proc: EnvoyProcess, timeout: float) -> str:
        """live, exited, shutdown or timeout. Polls the admin API for this epoch's number in state LIVE: every
        20 ms at first (a hot-restarted epoch is LIVE in about 0.1 s), slowing to 250 ms (an Envoy waiting for its
        control plane may take long, and each poll costs both processes a little)."""
        deadline = time.monotonic() + timeout
        interval = 0.02
        while True:
            if proc.exited.is_set():
                return "exited"
            if self.lifecycle.shutdown_requested.is_set():
                return "shutdown"
            if await self.admin.live_epoch(timeout=0.5) == proc.epoch or (
                not self.launch.hot_restart and await self.admin.is_live()
            ):
                return "live"
            if time.monotonic() >= deadline:
                return "timeout"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await proc.exited.wait()
            interval = min(0.25, interval * 1.25)

    async def stop_all(self, grace: float) -> None:
        """Stop every epoch (SIGTERM, SIGKILL after `grace`), remove their files and the shared memory segment."""
        procs = list(self.procs.values())
        await asyncio.gather(*(p.stop(grace) for p in procs))
        for proc in procs:
            info = proc.exit_info
            assert info is not None
            if self.procs.get(proc.epoch) is proc:
                del self.procs[proc.epoch]
                self.metrics.envoy_exits.labels(info.cause).inc()
            remove_file(self.launch.bootstrap_path(proc.epoch))
        self._retiring.clear()
        self.current = None
        if self.launch.hot_restart:
            # Envoy leaves its segment behind; epoch 0 of the next family would unlink it, but nothing else would.
            remove_file(shm_path(self.launch.base_id))

    async def wait_all_exited(self, timeout: float | None) -> bool:
        procs = list(self.procs.values())
        try:
            async with asyncio.timeout(timeout):
                for proc in procs:
                    await proc.exited.wait()
        except TimeoutError:
            return False
        return True

    def running(self) -> list[EnvoyProcess]:
        return [p for p in self.procs.values() if p.running]


async def exec_epoch(
    launch: LaunchSettings, epoch: int, state: DesiredState, *, tail_lines: int = 20, sink: BinaryIO | None = None
) -> EnvoyProcess:
    """Write envoy-rev<epoch>.json and exec Envoy. Raises OSError when it cannot be executed (the file is removed).
    The caller must hand the process to `Epochs` (`adopt`) or stop it: nobody collects its exit otherwise."""
    path = launch.bootstrap_path(epoch)
    _write_atomic(path, state.bootstrap)
    proc = EnvoyProcess(envoy_argv(launch, path, epoch), epoch, tail_lines=tail_lines, sink=sink)
    log.info("Envoy command: %s", " ".join(shlex.quote(arg) for arg in proc.argv))
    try:
        await proc.start()
    except OSError:
        remove_file(path)
        raise
    return proc


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
