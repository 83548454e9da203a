"""A stand-in Envoy for the supervision policy's fast tests, as Istio's TestProxy stands in for its Proxy.

Nothing real runs here, on purpose: these tests are about the policy in agent/proxy/epochs.py and the supervisor's
shutdown (budget, backoff, coalescing, recovery, drain order), which depends only on what Envoy answers, so each
test takes milliseconds. What only a real Envoy proves (it really hot-restarts, really rejects a bootstrap, really
crashes) stays in test_epochs.py, test_crash.py, test_shutdown.py and the agent's end-to-end tests.

`FakeLauncher.calls` records every call the policy makes, in order ("start 0", "validate 1", "stop 0", "drain",
"forget 0", "forget family", ...), so a test asserts on the order and waits for a call instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.proxy.desired import DesiredState
from agent.proxy.launcher import EnvoyHandle, EnvoyUnreachable, EnvoyUnresponsive, Verdict
from agent.proxy.process import ExitInfo
from agent.proxy.spawn import BootstrapWriteError, EnvoyExecError

_pids = itertools.count(4_000_000)


@dataclass(frozen=True)
class Behaviour:
    """What a fake Envoy started on a given bootstrap does."""

    # Answers LIVE on its admin API as soon as it runs.
    live: bool = True
    # Exits with this code (negative: killed by that signal) as soon as it runs, before answering LIVE.
    exits_with: int | None = None
    output: tuple[str, ...] = ()
    # `envoy --mode validate` says no, with `output`.
    invalid: bool = False


class FakeEnvoy:
    """One fake epoch (agent.proxy.launcher.EnvoyHandle)."""

    def __init__(self, launcher: FakeLauncher, epoch: int, behaviour: Behaviour) -> None:
        self.launcher = launcher
        self.epoch = epoch
        self.behaviour = behaviour
        self.exited = asyncio.Event()
        self.exit_info: ExitInfo | None = None
        self.pid = next(_pids)
        self.signals: list[int] = []
        self._exit = asyncio.get_running_loop().create_future()

    @property
    def running(self) -> bool:
        return not self.exited.is_set()

    @property
    def live(self) -> bool:
        return self.running and self.behaviour.live and self.behaviour.exits_with is None

    def crash(self, returncode: int = -signal.SIGKILL) -> None:
        """The test kills it (or it dies on its own)."""
        self._end(returncode, aborted=False)

    def _end(self, returncode: int, *, aborted: bool) -> None:
        if not self._exit.done():
            self._exit.set_result((returncode, aborted))

    async def run(self, on_exit: Callable[[Any], None] | None = None) -> ExitInfo:
        if self.behaviour.exits_with is not None:
            self._end(self.behaviour.exits_with, aborted=False)
        returncode, aborted = await self._exit
        self.exit_info = ExitInfo(self.epoch, self.pid, returncode, aborted, 0.0, self.behaviour.output)
        self.exited.set()
        self.launcher.record(f"exited {self.epoch}")
        if on_exit is not None:
            on_exit(self)
        return self.exit_info

    async def stop(self, grace: float) -> ExitInfo:
        if not self.exited.is_set():
            self.launcher.record(f"stop {self.epoch}")
            self._end(-signal.SIGTERM, aborted=True)
            await self.exited.wait()
        assert self.exit_info is not None
        return self.exit_info

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


@dataclass
class FakeLauncher:
    """agent.proxy.launcher.Launcher without Envoy. Bootstraps map to behaviours; the default goes LIVE."""

    hot_restart: bool = True
    behaviours: dict[bytes, Behaviour] = field(default_factory=dict)
    # live_epoch() raises EnvoyUnresponsive (a SIGSTOPped Envoy) while set.
    unresponsive: bool = False
    # A parent whose child is LIVE exits (0) at once, as after --parent-shutdown-time-s; or, set, when the test says.
    parents_linger: bool = False
    # What active_connections() answers, one value per call (the last one repeats).
    connections: list[int | None] = field(default_factory=lambda: [0])
    # Raised by start() instead of starting (a full disk, a missing binary).
    start_error: BootstrapWriteError | EnvoyExecError | None = None
    known_failure: str | None = None
    # Another agent's Envoy on the same admin port answers LIVE at epoch 0 (whatever ours do).
    foreign_live: bool = False
    calls: list[str] = field(default_factory=list)
    started: list[FakeEnvoy] = field(default_factory=list)
    _recorded: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, call: str) -> None:
        self.calls.append(call)
        self._recorded.set()

    async def wait_for(self, call: str, count: int = 1, timeout: float = 5.0) -> None:
        """Until `call` has been recorded `count` times."""
        async with asyncio.timeout(timeout):
            while self.calls.count(call) < count:
                self._recorded.clear()
                await self._recorded.wait()

    def behaviour(self, state: DesiredState) -> Behaviour:
        return self.behaviours.get(state.bootstrap, Behaviour())

    @property
    def newest(self) -> FakeEnvoy:
        return self.started[-1]

    # ---- the Launcher protocol ----

    async def start(self, epoch: int, state: DesiredState) -> FakeEnvoy:
        self.record(f"start {epoch}")
        if self.start_error is not None:
            raise self.start_error
        envoy = FakeEnvoy(self, epoch, self.behaviour(state))
        self.started.append(envoy)
        return envoy

    async def validate(self, epoch: int, state: DesiredState) -> Verdict:
        self.record(f"validate {epoch}")
        behaviour = self.behaviour(state)
        return Verdict(not behaviour.invalid, behaviour.output)

    async def live_epoch(self) -> int | None:
        await asyncio.sleep(0)
        if self.unresponsive:
            raise EnvoyUnresponsive("no answer within 0.5s")
        live = [envoy.epoch for envoy in self.started if envoy.live]
        if not live:
            return 0 if self.foreign_live else None
        if not self.parents_linger:
            for parent in self.started:
                if parent.running and parent.epoch < max(live):
                    parent.crash(0)
        return max(live)

    async def serves_admin(self, envoy: EnvoyHandle) -> bool:
        return isinstance(envoy, FakeEnvoy) and envoy.live

    async def drain_listeners(self, *, inbound_only: bool) -> None:
        self.record("drain inbound" if inbound_only else "drain")
        if self.unresponsive:
            raise EnvoyUnreachable("no answer")

    async def active_connections(self, excluded_ports: tuple[int, ...]) -> int | None:
        self.record("connections?")
        return self.connections.pop(0) if len(self.connections) > 1 else self.connections[0]

    def diagnose(self, info: ExitInfo) -> str | None:
        return self.known_failure

    def forget(self, epoch: int) -> None:
        self.record(f"forget {epoch}")

    def forget_family(self) -> None:
        self.record("forget family")

    def own_pids(self) -> set[int]:
        return set()


@dataclass
class FakeGate:
    """agent.proxy.start_gate.StartGate (in the agent: LocalXds and its files). `problem` is what it reports; a test
    changes it with change() (the watcher's report) and waits for the policy to ask again with wait_asked()."""

    problem: str | None = None
    asked: int = 0
    _change: asyncio.Event = field(default_factory=asyncio.Event)
    _asked: asyncio.Event = field(default_factory=asyncio.Event)

    def start_problem(self) -> str | None:
        self.asked += 1
        self._asked.set()
        return self.problem

    def next_change(self) -> asyncio.Event:
        return self._change

    def change(self, problem: str | None) -> None:
        self.problem = problem
        self._change.set()
        self._change = asyncio.Event()

    async def wait_asked(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while self.asked < count:
                self._asked.clear()
                await self._asked.wait()


def disk_full(path: str = "/etc/istio/proxy/envoy-rev0.json") -> BootstrapWriteError:
    from pathlib import Path  # noqa: PLC0415

    return BootstrapWriteError(Path(path), OSError(errno.ENOSPC, "No space left on device"))


class LogWaiter(logging.Handler):
    """Records the agent's log lines so a test can wait for one (an outcome) instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._event.set()

    async def wait_for(self, fragment: str, count: int = 1, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while sum(fragment in m for m in self.messages) < count:
                self._event.clear()
                await self._event.wait()


@contextlib.contextmanager
def recording_logs(name: str = "agent") -> Iterator[LogWaiter]:
    """Record logger `name`'s lines, debug included, for the duration."""
    waiter = LogWaiter()
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(waiter)
    try:
        yield waiter
    finally:
        logger.removeHandler(waiter)
        logger.setLevel(level)
