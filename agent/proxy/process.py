"""One Envoy process (one hot-restart epoch): start it, copy its output, remember its last lines, report its exit.

Envoy's stdout is the agent's stdout (inherited). Its stderr, where Envoy logs, is copied to the agent's stderr as it
arrives, whole lines at a time, by a thread of its own: whatever the event loop is doing (the agent's imports right
after Envoy's exec, a large merge), Envoy's lines reach the log when Envoy writes them, in order with the agent's
own. The last lines are kept for the termination message. Envoy runs in its own process group so a Ctrl-C in a
terminal reaches only the agent, which then drains Envoy instead of Envoy dying mid-request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

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
    """A started Envoy. `run()` must be awaited (as a task the supervisor's TaskGroup owns) to collect the exit."""

    def __init__(self, argv: Sequence[str], epoch: int, *, tail_lines: int = 20, sink: BinaryIO | None = None) -> None:
        self.argv = list(argv)
        self.epoch = epoch
        self.exited = asyncio.Event()
        self.exit_info: ExitInfo | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._sink = sink
        self._proc: asyncio.subprocess.Process | None = None
        self._aborted = False
        self._started = 0.0
        self._collecting = False
        self._output_done = asyncio.Event()  # the stderr copier reached EOF: the tail is complete

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and not self.exited.is_set()

    async def start(self) -> None:
        """Exec Envoy. Raises OSError when the binary cannot be executed."""
        self._started = time.monotonic()
        read_end, write_end = os.pipe()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stderr=write_end, process_group=0
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        sink = self._sink if self._sink is not None else sys.stderr.buffer
        loop = asyncio.get_running_loop()

        def copy() -> None:
            copy_lines(read_end, self._tail, sink)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(self._output_done.set)

        threading.Thread(target=copy, name=f"envoy-{self.epoch}-stderr", daemon=True).start()
        log.info("Envoy epoch %d started (pid %d)", self.epoch, self._proc.pid)

    async def run(self, on_exit: Callable[[EnvoyProcess], None] | None = None) -> ExitInfo:
        """Wait for the exit and the last of its output, record it. Exit paths: returns the ExitInfo once Envoy
        exits; if cancelled, kills Envoy first so no Envoy outlives its task."""
        assert self._proc is not None
        proc = self._proc
        self._collecting = True
        try:
            returncode = await proc.wait()
            # Its stderr's end (at once, unless something Envoy started still holds the pipe).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._output_done.wait()
        except asyncio.CancelledError:
            self.kill()
            await asyncio.shield(proc.wait())
            raise
        finally:
            if proc.returncode is not None and self.exit_info is None:
                self.exit_info = ExitInfo(
                    self.epoch,
                    proc.pid,
                    proc.returncode,
                    self._aborted,
                    time.monotonic() - self._started,
                    tuple(self._tail),
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
        if self._proc is None or self._collecting:
            return False
        self.kill()
        await self._proc.wait()
        return True

    def send_signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.returncode is None and not self.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

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


# [2026-12-02 04:26:34.088][22393][critical][main] ...: an error Envoy logs, and may then print again bare.
_ERROR_LINE = re.compile(rb"^\[[^\]]*\]\[\d+\]\[(?:critical|error)\]")
_LOG_LINE = re.compile(rb"^\[[^\]]*\]\[\d+\]\[")


class _Lines:
    """Splits output into lines, copying whole lines on and keeping the last non-blank ones (each cut to 1000
    characters) in `tail`. Bounded memory whatever Envoy writes (one line of its usage text is kilobytes).

    Each Envoy error once: Envoy logs a start-up failure (`[critical] error ... initializing config`), then prints
    the exception again on a bare line (`cannot bind '127.0.0.1:15000': Address already in use`). A bare line that
    repeats words of the error just logged is dropped."""

    def __init__(self, tail: collections.deque[str], copy_to: BinaryIO | None) -> None:
        self.tail = tail
        self.copy_to = copy_to
        self.partial = b""
        # The last error Envoy logged, with its continuation lines (a message may hold newlines).
        self.last_error = b""

    def _repeats_an_error(self, line: bytes) -> bool:
        if _ERROR_LINE.match(line):
            self.last_error = line
            return False
        if _LOG_LINE.match(line):
            self.last_error = b""
            return False
        text = line.strip()
        if len(text) >= 16 and text in self.last_error:
            return True
        if self.last_error and len(self.last_error) < 65536:
            self.last_error += b"\n" + line
        return False

    def feed(self, chunk: bytes) -> None:
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > 65536:  # a line without end: pass it on rather than hold it
            lines.append(self.partial)
            self.partial = b""
        self._emit(lines)

    def finish(self) -> None:
        if self.partial:
            self._emit([self.partial])
            self.partial = b""

    def _emit(self, lines: list[bytes]) -> None:
        lines = [line for line in lines if not self._repeats_an_error(line)]
        if not lines:
            return
        if self.copy_to is not None:
            try:
                self.copy_to.write(b"".join(line + b"\n" for line in lines))
                self.copy_to.flush()
            except (OSError, ValueError):  # our stderr closed: keep draining so Envoy never blocks on a full pipe
                pass
        self.tail.extend(line.decode("utf-8", "replace")[:1000] for line in lines if line.strip())


def copy_lines(fd: int, tail: collections.deque[str], copy_to: BinaryIO | None = None) -> None:
    """Read the pipe `fd` to EOF (blocking: a thread's work), copying whole lines to `copy_to` as they arrive;
    closes `fd`."""
    lines = _Lines(tail, copy_to)
    try:
        while chunk := os.read(fd, 65536):
            lines.feed(chunk)
        lines.finish()
    finally:
        os.close(fd)


async def keep_tail(
    stream: asyncio.StreamReader, tail: collections.deque[str], copy_to: BinaryIO | None = None
) -> None:
    """copy_lines for an asyncio stream (a validation's output, read on the loop)."""
    lines = _Lines(tail, copy_to)
    while chunk := await stream.read(65536):
        lines.feed(chunk)
    lines.finish()
