"""Signals and, when the agent is PID 1, reaping of orphaned zombies.

Signal handlers only enqueue (gunicorn's arbiter, DESIGN habit 3); one task dispatches them:
- SIGTERM, SIGINT: `lifecycle.request_shutdown(...)`; a second one makes the shutdown immediate.
- SIGHUP: ask for a hot restart into a new epoch (even if nothing changed).
- SIGUSR1: forwarded to every Envoy epoch (Envoy reopens its access logs).

Reaping (tini's checklist): processes re-parented to PID 1 become our zombies when they exit. On CPython 3.11,
asyncio's child watcher waits for each of its children by pid; a `waitpid(-1)` loop here would race it and steal
exit statuses (then asyncio reports 255). So the reaper never waits on "any child": it lists our zombie children in
/proc and reaps, by pid, only those that are not the agent's own (the Envoy epochs, validations) and that stayed
zombies for a grace period (an owner that waits for its child does so within milliseconds).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.lifecycle import Lifecycle
from agent.signals import HANDLED

log = logging.getLogger("agent.pid1")


class SignalDispatcher:
    """Installs the handlers on start; `run()` dispatches until cancelled, then restores default handling."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        *,
        on_hot_restart: Callable[[], None],
        forward: Callable[[int], None],
        queue: asyncio.Queue[int] | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.on_hot_restart = on_hot_restart
        self.forward = forward
        # Given at start-up: the queue the early handlers (installed before Envoy's exec) already fill.
        self.queue: asyncio.Queue[int] = queue if queue is not None else asyncio.Queue()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in HANDLED:
            loop.add_signal_handler(sig, self.queue.put_nowait, sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in HANDLED:
            loop.remove_signal_handler(sig)

    async def run(self) -> None:
        """Exit paths: only cancellation (the supervisor cancels it when the agent stops)."""
        while True:
            self.dispatch(await self.queue.get())

    def dispatch(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.lifecycle.request_shutdown(f"received signal: {name}")
        elif sig == signal.SIGHUP:
            log.info("SIGHUP: hot restart requested")
            self.on_hot_restart()
        elif sig == signal.SIGUSR1:
            log.info("SIGUSR1: forwarding to Envoy (reopen access logs)")
            self.forward(sig)


def zombie_children(parent: int, proc: Path = Path("/proc")) -> set[int]:
    """Pids of `parent`'s children in state Z, read from /proc/<pid>/stat."""
    zombies: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited and reaped meanwhile
        # The command name is in parentheses and may contain spaces or ')': split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 2 and fields[0] == "Z" and int(fields[1]) == parent:
            zombies.add(int(entry.name))
    return zombies


class OrphanReaper:
    """Reaps zombies that are not the agent's own children. Run it only when the agent is PID 1 (or a subreaper)."""

    def __init__(
        self, own_pids: Callable[[], set[int]], *, grace: float = 1.0, interval: float = 1.0, remember: int = 100
    ) -> None:
        self.own_pids = own_pids
        self.grace = grace
        self.interval = interval
        # The latest (pid, exit code) pairs reaped, for tests and debugging; bounded: PID 1 runs for months.
        self.reaped: collections.deque[tuple[int, int]] = collections.deque(maxlen=remember)
        self.reaped_count = 0
        self._seen: dict[int, float] = {}
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Exit paths: only cancellation. Wakes on SIGCHLD and every `interval` seconds."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self._wake.set)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await self._wake.wait()
                self._wake.clear()
                self.reap_once()
                if self._seen:
                    # A zombie is waiting out its grace period: look again when it ends.
                    await asyncio.sleep(self.grace / 2)
                    self._wake.set()
        finally:
            loop.remove_signal_handler(signal.SIGCHLD)

    def reap_once(self) -> None:
        now = time.monotonic()
        zombies = zombie_children(os.getpid()) - self.own_pids()
        self._seen = {pid: self._seen.get(pid, now) for pid in zombies}
        for pid, first_seen in list(self._seen.items()):
            if now - first_seen < self.grace:
                continue
            with contextlib.suppress(ChildProcessError):
                # By pid, WNOHANG: never "any child" (see the module docstring).
                waited, status = os.waitpid(pid, os.WNOHANG)
                if waited == pid:
                    code = os.waitstatus_to_exitcode(status)
                    self.reaped.append((pid, code))
                    self.reaped_count += 1
                    log.debug("reaped orphan %d (exit %d)", pid, code)
            del self._seen[pid]


@contextlib.contextmanager
def children_waited_on_the_loop() -> Iterator[None]:
    """While in the block, asyncio learns of its children's exits from pidfds on the event loop, not a thread each.

    CPython 3.11's default ThreadedChildWatcher blocks a thread in waitpid(pid) for every Envoy epoch and every
    validation; PidfdChildWatcher (Linux 5.3+, the default from 3.12 on) waits for the same pids on the loop, with
    no thread. Both wait by pid, never for "any child" (see the module docstring). Enter it before the loop exists
    (asyncio.run attaches the watcher to its loop); where pidfds are unavailable the threaded watcher stays."""
    if sys.version_info >= (3, 12) or not _pidfd_usable():
        yield
        return
    policy = asyncio.get_event_loop_policy()
    policy.set_child_watcher(asyncio.PidfdChildWatcher())
    try:
        yield
    finally:
        policy.set_child_watcher(asyncio.ThreadedChildWatcher())  # 3.11's default, for whatever runs next here


def _pidfd_usable() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # kernel before 5.3, or a seccomp profile that refuses pidfd_open
        return False
    return True


def is_pid1() -> bool:
    return os.getpid() == 1
