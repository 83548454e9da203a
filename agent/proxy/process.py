"""One Envoy process (one hot-restart epoch) on the event loop: collect its exit, stop it, report how it ended.
Starting it, and copying its output, is agent.proxy.spawn's (no event loop needed: epoch 0 starts before one
exists)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from agent.aio import off_loop
from agent.proxy.spawn import OutputLines, SpawnedEnvoy

log = logging.getLogger("agent.proxy")


class ExitCause(enum.StrEnum):
    """How an Envoy process ended: the `cause` label of istio_agent_envoy_exits."""

    CLEAN = "clean"
    ERROR = "error"
    SIGNAL = "signal"
    OOM = "oom"
    # The agent itself stopped it (shutdown, recovery, abort of the family): not a crash.
    ABORTED = "aborted"


@dataclass(frozen=True)
class ExitInfo:
    """How an Envoy epoch ended. `returncode` follows asyncio: negative means killed by that signal."""

    epoch: int
    pid: int
    returncode: int
    # The agent itself stopped it (shutdown, recovery, abort of the family): not a crash.
    aborted: bool
    runtime: float
    stderr_tail: tuple[str, ...] = ()

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    @property
    def cause(self) -> ExitCause:
        if self.aborted:
            return ExitCause.ABORTED
        if self.returncode == 0:
            return ExitCause.CLEAN
        if self.signal == signal.SIGKILL:
            # Nobody in the agent sent it: in a container that is almost always the kernel's OOM killer.
            return ExitCause.OOM
        return ExitCause.SIGNAL if self.signal is not None else ExitCause.ERROR

    def describe(self) -> str:
        if self.signal is not None:
            how = f"killed by signal {signal.Signals(self.signal).name}"
            if self.cause is ExitCause.OOM:
                how += " (not sent by the agent: likely the OOM killer)"
        else:
            how = f"exit code {self.returncode}"
        return f"Envoy epoch {self.epoch} (pid {self.pid}) {how} after {self.runtime:.1f}s"


class EnvoyProcess:
    """A started Envoy (agent.proxy.spawn), its exit collected on the event loop. `run()` must be awaited (as a
    task the supervisor's TaskGroup owns) to collect the exit."""

    def __init__(self, spawned: SpawnedEnvoy) -> None:
        self.spawned = spawned
        self.argv = spawned.argv
        self.epoch = spawned.epoch
        self.exited = asyncio.Event()
        self.exit_info: ExitInfo | None = None
        self._aborted = False
        self._collecting = False
        self._returncode: asyncio.Future[int] | None = None
        self._output_done = asyncio.Event()  # the stderr copier reached EOF: the tail is complete
        loop = asyncio.get_running_loop()

        def output_done() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(self._output_done.set)

        spawned.output_done.add_done_callback(lambda _: output_done())

    @property
    def pid(self) -> int:
        return self.spawned.pid

    @property
    def running(self) -> bool:
        return not self.exited.is_set()

    def _wait(self) -> asyncio.Future[int]:
        """Envoy's return code once it exits (negative: killed by that signal), learnt from a pidfd on the event
        loop: no thread blocks in waitpid for it. Where pidfds are refused (a kernel before 5.3, a seccomp
        profile), a thread of its own waits."""
        if self._returncode is None:
            popen = self.spawned.popen
            try:
                pidfd = os.pidfd_open(popen.pid)
            except OSError:
                self._returncode = asyncio.ensure_future(off_loop(popen.wait, name=f"envoy-{self.epoch}-wait"))
                return self._returncode
            loop = asyncio.get_running_loop()
            self._returncode = returncode = loop.create_future()

            def exited() -> None:
                loop.remove_reader(pidfd)
                os.close(pidfd)
                returncode.set_result(popen.wait())  # it has exited: collects at once

            loop.add_reader(pidfd, exited)
        return self._returncode

    async def run(self, on_exit: Callable[[EnvoyProcess], None] | None = None) -> ExitInfo:
        """Wait for the exit and the last of its output, record it. Exit paths: returns the ExitInfo once Envoy
        exits; if cancelled, kills Envoy first so no Envoy outlives its task."""
        self._collecting = True
        try:
            returncode = await asyncio.shield(self._wait())
            # Its stderr's end (at once, unless something Envoy started still holds the pipe).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._output_done.wait()
        except asyncio.CancelledError:
            self.kill()
            await asyncio.shield(self._wait())
            raise
        finally:
            code = self._returncode
            if code is not None and code.done() and self.exit_info is None:
                self.exit_info = ExitInfo(
                    self.epoch,
                    self.pid,
                    code.result(),
                    self._aborted,
                    time.monotonic() - self.spawned.started,
                    tuple(self.spawned.tail),
                )
                self.exited.set()
        assert self.exit_info is not None and returncode == self.exit_info.returncode
        if on_exit is not None:
            on_exit(self)
        return self.exit_info

    async def discard(self) -> bool:
        """Kill an Envoy whose exit nobody collects (start-up failed between its exec and its adoption by the
        supervisor) and wait for it; True if it did. A no-op once `run()` collects the exit: then stopping it is
        run()'s owner's job."""
        if self._collecting:
            return False
        self.kill()
        await asyncio.shield(self._wait())
        return True

    def send_signal(self, sig: int) -> None:
        if not self.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                # Popen checks first that the process was not collected (its pid may be another's by now).
                self.spawned.popen.send_signal(sig)

    def terminate(self) -> None:
        """Ask Envoy to exit (SIGTERM: Envoy stops at once, flushing access logs). Marks the exit as aborted."""
        self._aborted = True
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self._aborted = True
        self.send_signal(signal.SIGKILL)

    async def stop(self, grace: float) -> ExitInfo:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns once the exit is collected by `run()`."""
        if not self.exited.is_set():
            self.terminate()
            try:
                async with asyncio.timeout(grace):
                    await self.exited.wait()
            except TimeoutError:
                # With no grace (a second stop request: "now") the kill is what was asked for, not a surprise.
                (log.warning if grace > 0 else log.info)(
                    "Envoy epoch %d did not exit within %.1fs of SIGTERM: killing it", self.epoch, grace
                )
                self.kill()
                await self.exited.wait()
        assert self.exit_info is not None
        return self.exit_info


async def keep_tail(
    stream: asyncio.StreamReader, tail: collections.deque[str], copy_to: BinaryIO | None = None
) -> None:
    """copy_lines for an asyncio stream (a validation's output, read on the loop)."""
    lines = OutputLines(tail, copy_to)
    while chunk := await stream.read(65536):
        lines.feed(chunk)
    lines.finish()
