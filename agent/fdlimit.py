"""The open-files limit: raised at start as Go's runtime does, and read to size the status server's connection cap.

Container runtimes often start processes with a soft RLIMIT_NOFILE of 1024 and a much higher hard limit (a
compatibility default for programs using select()). Go raises its soft limit to the hard limit in every binary at
init (syscall/rlimit.go, go.dev/issue/46279), so Istio's agent never runs at 1024; the agent does the same first
thing. Envoy raises its own soft limit at start too, so Envoy inherits nothing it would not take itself.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("agent.cli")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft before, soft after). Never fails: where the
    kernel refuses (an unlimited hard limit above fs.nr_open), the soft limit stays as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if resource.RLIM_INFINITY in (hard, soft) or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.debug("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
        return soft, soft
    return soft, hard


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE now in force (RLIM_INFINITY as a large number)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
