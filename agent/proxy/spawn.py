"""Start one Envoy process without an event loop: `pilot-agent proxy` execs epoch 0 before it imports asyncio and
the rest of the agent (their cost then overlaps Envoy's own start); the supervisor starts later epochs the same way.

Envoy's stdout is the agent's stdout (inherited). Its stderr, where Envoy logs, is copied to the agent's stderr as it
arrives, whole lines at a time, by a thread of its own: whatever the agent is doing (its imports right after the
exec, a large merge), Envoy's lines reach the log when Envoy writes them, in order with the agent's own. The last
lines are kept for the termination message. Envoy runs in its own process group so a Ctrl-C in a terminal reaches
only the agent, which then drains Envoy instead of Envoy dying mid-request. Collecting the exit is
agent.proxy.process's (on the event loop).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO

from agent.errors import AgentError
from agent.files import remove_file, write_atomic, write_error
from agent.proxy.argv import LaunchSettings, envoy_argv
from agent.proxy.desired import DesiredState

log = logging.getLogger("agent.proxy")


class EnvoyExecError(Exception):
    """Envoy could not be executed (binary gone or not executable): nothing was started."""


class BootstrapWriteError(Exception):
    """The epoch's bootstrap file could not be written: nothing was started."""

    def __init__(self, path: Path, error: OSError) -> None:
        super().__init__(f"cannot write {path}: {error.strerror or error}")
        self.path = path
        self.error = error

    def as_agent_error(self) -> AgentError:
        """At start-up: the disk (full, quota, I/O error) is 73, anything else about configPath is bad input, 78."""
        return write_error(self.path, self.error)


# [2026-12-02 04:26:34.088][22393][critical][main] ...: an error Envoy logs, and may then print again bare.
_ERROR_LINE = re.compile(rb"^\[[^\]]*\]\[\d+\]\[(?:critical|error)\]")
_LOG_LINE = re.compile(rb"^\[[^\]]*\]\[\d+\]\[")


class OutputLines:
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
    lines = OutputLines(tail, copy_to)
    try:
        while chunk := os.read(fd, 65536):
            lines.feed(chunk)
        lines.finish()
    finally:
        os.close(fd)


class SpawnedEnvoy:
    """A running Envoy process and the thread copying its stderr. Whoever spawned it must collect its exit
    (agent.proxy.process.EnvoyProcess adopts it) or kill it."""

    def __init__(self, argv: Sequence[str], epoch: int, *, tail_lines: int = 20, sink: BinaryIO | None = None) -> None:
        self.argv = list(argv)
        self.epoch = epoch
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.started = time.monotonic()
        read_end, write_end = os.pipe()
        try:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stderr=write_end, process_group=0)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        # Done once the copier reached the end of Envoy's stderr: the tail is complete. Its callbacks run on the
        # copier's thread (or at once, for one added after).
        self.output_done: Future[None] = Future()
        copy_to = sink if sink is not None else sys.stderr.buffer
        threading.Thread(target=self._copy, args=(read_end, copy_to), name=f"envoy-{epoch}-stderr", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill_and_wait(self) -> None:
        """For a start-up that fails before anyone collects the exit: no Envoy outlives the agent."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def _copy(self, fd: int, copy_to: BinaryIO) -> None:
        try:
            copy_lines(fd, self.tail, copy_to)
        finally:
            self.output_done.set_result(None)


def spawn_envoy(
    launch: LaunchSettings, epoch: int, state: DesiredState, *, tail_lines: int = 20, sink: BinaryIO | None = None
) -> SpawnedEnvoy:
    """Write envoy-rev<epoch>.json and exec Envoy. Raises BootstrapWriteError or EnvoyExecError (then nothing was
    started and nothing is left behind)."""
    path = launch.bootstrap_path(epoch)
    try:
        # Not durable: every epoch's file is written afresh when it starts (see agent.files).
        write_atomic(path, state.bootstrap, durable=False)
    except OSError as exc:
        raise BootstrapWriteError(path, exc) from None
    argv = envoy_argv(launch, path, epoch)
    log.info("Envoy command: %s", " ".join(shlex.quote(arg) for arg in argv))
    try:
        spawned = SpawnedEnvoy(argv, epoch, tail_lines=tail_lines, sink=sink)
    except OSError as exc:
        remove_file(path)
        raise EnvoyExecError(f"cannot execute {launch.binary}: {exc.strerror or exc}") from None
    log.info("Envoy epoch %d started (pid %d)", epoch, spawned.pid)
    return spawned
