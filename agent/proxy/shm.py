"""Envoy's hot-restart shared memory: its name, and whether Envoy can create it here.

A container whose /dev/shm is missing or read-only (some runtimes and hardened pod specs) makes every
hot-restart-enabled Envoy abort at start (SIGABRT in its shared-memory set-up), which would look like a crash loop.
The agent checks once at start and runs Envoy with --disable-hot-restart instead (Istio's own mode), with a warning.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def shm_path(base_id: int) -> Path:
    """The segment of the hot-restart family on `base_id`: Envoy scales the base id by 10 and names its shared
    memory after it (hot_restart_impl.cc). Envoy leaves it behind when the family ends."""
    return SHM_DIR / f"envoy_shared_memory_{base_id * 10}"


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
