"""Envoy's hot-restart shared memory: its name, and whether Envoy can create it here.

A container whose /dev/shm is missing or read-only (some runtimes and hardened pod specs) makes every
hot-restart-enabled Envoy abort at start (SIGABRT in its shared-memory set-up), which would look like a crash loop.
The agent checks once at start and runs Envoy with --disable-hot-restart instead (Istio's own mode), with a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")

log = logging.getLogger("agent.proxy")


def shm_path(base_id: int) -> Path:
    """The segment of the hot-restart family on `base_id`: Envoy scales the base id by 10 and names its shared
    memory after it (hot_restart_impl.cc). Envoy leaves it behind when the family ends."""
    return SHM_DIR / f"envoy_shared_memory_{base_id * 10}"


SegmentIdentity = tuple[int, int]


def segment_identity(base_id: int) -> SegmentIdentity | None:
    """(inode, ctime) of the family's segment as it is now, or None when there is none."""
    try:
        st = shm_path(base_id).lstat()
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


def remove_segment(base_id: int, foreign: SegmentIdentity | None) -> None:
    """Remove the family's segment once every epoch has exited, unless it is `foreign`: the one that was there
    before our epoch 0 started and is still there, so ours never replaced it. That is another Envoy's on the same
    base id (ours failed at its hot-restart socket, before touching shared memory), or not a segment at all."""
    path = shm_path(base_id)
    if (current := segment_identity(base_id)) is None or current == foreign:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def shared_memory_unusable(directory: Path = SHM_DIR) -> str | None:
    """None when a file can be created in `directory`; otherwise why not (one short phrase)."""
    if not directory.is_dir():
        return f"{directory} does not exist"
    probe = directory / f".pilot-agent-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        return f"{directory} is not writable ({exc.strerror})"
    os.close(fd)
    probe.unlink(missing_ok=True)
    return None
