"""The termination message: what kubelet shows in `kubectl describe pod` after the agent gives up on Envoy."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.proxy.process import ExitInfo

log = logging.getLogger("agent.proxy")

# kubelet reads at most 4096 bytes of terminationMessagePath.
MAX_BYTES = 4096


def termination_message(last: ExitInfo, crashes: int, *, gave_up: bool) -> str:
    head = f"{last.describe()}; {crashes} unexpected Envoy exit(s)"
    head += "; restart budget exhausted, the agent gave up" if gave_up else "; the agent exits with Envoy"
    lines = [head, "last Envoy output:", *last.stderr_tail]
    text = "\n".join(lines) + "\n"
    data = text.encode("utf-8", "replace")
    if len(data) > MAX_BYTES:
        # Keep the head line and the newest output: the cause is usually in the last lines.
        keep = MAX_BYTES - len(head.encode()) - 10
        data = head.encode() + b"\n...\n" + data[-keep:]
    return data.decode("utf-8", "ignore")


def write_termination_log(path: Path | None, message: str) -> bool:
    """Write `message` to `path` (normally /dev/termination-log). An unwritable path is a warning, never fatal."""
    if path is None:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, message.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)
        return False
    return True
