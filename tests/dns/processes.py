"""Waiting for a helper process started in a namespace (tests.support.netns.Process) to say it is ready."""

from __future__ import annotations

import time

from tests.support.netns import Process


def wait_ready(process: Process, marker: str = "ready", timeout: float = 20.0) -> None:
    """Until `marker` shows in the process's log; AssertionError carrying the log when it exits or times out.
    (Polled: the log is a file the process writes, with nothing to wait on.)"""
    deadline = time.monotonic() + timeout
    while marker not in process.log():
        assert process.popen.poll() is None, f"exited: {process.log()}"
        assert time.monotonic() < deadline, f"not ready within {timeout}s: {process.log()}"
        time.sleep(0.02)
