"""The agent's shared lifecycle state: is Envoy up, is shutdown requested, and why.

One instance is built at start-up and handed to the supervisor (which reports Envoy's starts and exits) and to the
status server (which reads it for readiness and requests shutdown from /quitquitquit and /drain). It changes only
through its methods; readers get properties and awaitables. Shutdown is a request carrying a cause, not a signal
sent to the process, so tests trigger it directly.
"""

from __future__ import annotations

import asyncio
import logging

from agent.aio import first_of

log = logging.getLogger("agent.lifecycle")


class Lifecycle:
    def __init__(self) -> None:
        self._shutdown = asyncio.Event()
        self._immediate = asyncio.Event()
        self._shutdown_cause: str | None = None
        self._skip_drain = False
        self._envoy_down_reason: str | None = "Envoy has not been started yet"
        self._envoy_starts = 0
        self._next_envoy_start = asyncio.Event()  # set (and replaced) at each cold start
        self._ready_once = asyncio.Event()

    # ---- shutdown ----

    def request_shutdown(self, cause: str, *, skip_drain: bool = False) -> None:
        """The first request starts the shutdown (readiness flips at once); a second one makes it immediate."""
        if self._shutdown.is_set():
            if not self._immediate.is_set():
                log.info("second shutdown request (%s): stopping now", cause)
            self._immediate.set()
        else:
            log.info("shutdown requested: %s", cause)
            self._shutdown_cause = cause
        self._skip_drain = self._skip_drain or skip_drain
        self._shutdown.set()

    def skip_drain_at_shutdown(self) -> None:
        """Listeners were drained already (/drain): the later shutdown must not wait for a drain period."""
        self._skip_drain = True

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    @property
    def shutdown_cause(self) -> str | None:
        return self._shutdown_cause

    @property
    def skip_drain(self) -> bool:
        return self._skip_drain

    @property
    def immediate(self) -> bool:
        """A second shutdown request came (second SIGTERM): stop everything now, no drain, no grace."""
        return self._immediate.is_set()

    async def wait_shutdown(self) -> None:
        await self._shutdown.wait()

    async def wait_immediate(self) -> None:
        await self._immediate.wait()

    # ---- start-up ----

    def reported_ready(self) -> None:
        """Readiness answered "ready" (the first time is the end of the pod's start-up)."""
        self._ready_once.set()

    async def wait_started(self, limit: float) -> None:
        """Until the start-up is over: readiness said "ready" once, a shutdown was requested, or `limit` seconds
        went by (an Envoy that is not ready yet, or nobody asking). Start-up work that no probe waits for (the file
        watchers, the start-up log line) waits for this: the event loop answers the first readiness probes first."""
        await first_of(self._ready_once.wait(), self._shutdown.wait(), timeout=limit)

    # ---- Envoy, as the supervisor sees it ----

    def envoy_started(self) -> None:
        """A cold start of Envoy (first start, crash restart, recovery of a wedged hot-restart family)."""
        self._envoy_starts += 1
        self._next_envoy_start.set()
        self._next_envoy_start = asyncio.Event()

    def envoy_up(self) -> None:
        self._envoy_down_reason = None

    def envoy_down(self, reason: str) -> None:
        self._envoy_down_reason = reason

    @property
    def envoy_down_reason(self) -> str | None:
        """None while the supervisor believes an Envoy epoch is running; otherwise why it is not."""
        return self._envoy_down_reason

    @property
    def envoy_starts(self) -> int:
        """Envoy cold starts so far. A reader caching what it verified about Envoy (config received) must verify
        again when it changes: the new Envoy knows nothing yet, even if no probe happened to land while it was down."""
        return self._envoy_starts

    async def wait_envoy_start(self, after: int) -> int:
        """Wait until Envoy has been cold-started more than `after` times; the new count."""
        while self._envoy_starts <= after:
            await self._next_envoy_start.wait()
        return self._envoy_starts

    def not_ready_reason(self) -> str | None:
        """What the agent itself knows makes the pod unready (before asking Envoy anything)."""
        if self._shutdown.is_set():
            return f"server is terminated: {self._shutdown_cause}"
        return self._envoy_down_reason
