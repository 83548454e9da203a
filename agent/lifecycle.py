"""The agent's shared lifecycle state: is Envoy up, is shutdown requested, and why.

One instance is built at start-up and handed to the supervisor (which writes it) and to the status server (which
reads it for readiness and writes it from /quitquitquit and /drain). Shutdown is a request carrying a cause, not a
signal sent to the process, so tests trigger it directly.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

log = logging.getLogger("agent.lifecycle")


@dataclass
class Lifecycle:
    shutdown_requested: asyncio.Event = field(default_factory=asyncio.Event)
    shutdown_cause: str | None = None
    # Set by /drain and /quitquitquit: the later shutdown must not wait for a drain period.
    skip_drain: bool = False
    # Set once a second shutdown request arrives (second SIGTERM): stop everything now.
    immediate: bool = False
    # None while the supervisor believes an Envoy epoch is running; otherwise why it is not.
    envoy_down_reason: str | None = "Envoy has not been started yet"
    # Envoy cold starts so far (first start, crash restart, recovery of a wedged hot-restart family), counted by the
    # supervisor. A reader caching what it verified about Envoy (config received) must verify again when it changes:
    # the new Envoy knows nothing yet, even if no probe happened to land while it was down.
    envoy_starts: int = 0

    def request_shutdown(self, cause: str, *, skip_drain: bool = False) -> None:
        if self.shutdown_requested.is_set():
            if not self.immediate:
                log.warning("second shutdown request (%s): stopping now", cause)
            self.immediate = True
        else:
            log.info("shutdown requested: %s", cause)
            self.shutdown_cause = cause
        self.skip_drain = self.skip_drain or skip_drain
        self.shutdown_requested.set()

    def envoy_up(self) -> None:
        self.envoy_down_reason = None

    def envoy_down(self, reason: str) -> None:
        self.envoy_down_reason = reason

    def not_ready_reason(self) -> str | None:
        """What the agent itself knows makes the pod unready (before asking Envoy anything)."""
        if self.shutdown_requested.is_set():
            return f"server is terminated: {self.shutdown_cause}"
        return self.envoy_down_reason
