"""The restart budget, as a tenacity retry sequence (the policy in epochs.py runs a hot-restart family inside it).

One sequence is one period of trouble: attempt 1 is the family that was running, each crash is a failed attempt,
the wait before the next is tenacity's exponential backoff (restart_initial_delay doubling) and the sequence stops
after restart_budget restarts. A family that earns the budget back (healthy_period without a crash, or a new
desired state) ends its sequence as a success, and the next one starts with the whole budget. The backoff races
the injectable sleep against a shutdown and against a change (a fixed configuration should not wait 100 s).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.aio import first_of
from agent.proxy.events import SupervisionSettings
from agent.proxy.process import ExitInfo

if TYPE_CHECKING:
    # Only types: tenacity and prometheus_client load after Envoy's exec (see agent/commands/proxy.py).
    from tenacity import AsyncRetrying, RetryCallState

    from agent.lifecycle import Lifecycle
    from agent.metrics import AgentMetrics

log = logging.getLogger("agent.proxy")


class EnvoyCrashed(Exception):
    """The newest epoch exited on its own: a failed attempt of the sequence."""

    def __init__(self, info: ExitInfo) -> None:
        super().__init__(info.describe())
        self.info = info


@dataclass
class RestartBudget:
    settings: SupervisionSettings
    metrics: AgentMetrics
    lifecycle: Lifecycle
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    # Set by every change request: cuts a backoff short.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.metrics.restart_budget.set(self.settings.restart_budget)

    def retrying(self) -> AsyncRetrying:
        """The sequence; iterate it again (`async for`) for a fresh budget."""
        # Lazy: see the TYPE_CHECKING imports.
        from tenacity import (  # noqa: PLC0415
            AsyncRetrying,
            retry_if_exception_type,
            retry_never,
            stop_after_attempt,
            wait_exponential,
        )

        return AsyncRetrying(
            # Istio's current behaviour (exit with Envoy) is the same loop with no retry.
            retry=retry_never if self.settings.exit_on_envoy_exit else retry_if_exception_type(EnvoyCrashed),
            stop=stop_after_attempt(self.settings.restart_budget + 1),
            wait=wait_exponential(multiplier=self.settings.restart_initial_delay, exp_base=2),
            sleep=self._backoff,
            before_sleep=self._before_restart,
            reraise=True,
        )

    def restored(self, why: str) -> None:
        log.info("restart budget reset: %s", why)
        self.metrics.restart_budget.set(self.settings.restart_budget)

    def _before_restart(self, state: RetryCallState) -> None:
        left = self.settings.restart_budget - state.attempt_number
        self.metrics.restart_budget.set(left)
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning("restarting Envoy in %.1fs (restart budget left: %d)", delay, left)

    async def _backoff(self, delay: float) -> None:
        self.changed.clear()
        await first_of(self.sleep(delay), self.lifecycle.wait_shutdown(), self.changed.wait())
