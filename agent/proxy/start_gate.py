"""A crash restart waits while the agent knows Envoy cannot start: what the policy (epochs.py) asks, and the wait.

Some inputs Envoy reads itself, outside the desired state: the no-control-plane mode's `lds.yaml` and `cds.yaml`
(agent/local_xds.py). When one is deleted while Envoy runs, the running Envoy keeps what it had, but a new one fails
at its start ("paths must refer to an existing path"): a crash restart would fail again and again until the restart
budget is spent (exit 70, minutes later), although the agent knows why. The restart waits instead: readiness says
why (503), one line is logged, and Envoy starts as soon as the input is whole again (the watcher that sees it says
so). Nothing is waited for at the agent's start: the same check stops it there (exit 78, agent/config/local_xds.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from agent.aio import first_of

if TYPE_CHECKING:
    from agent.lifecycle import Lifecycle

log = logging.getLogger("agent.proxy")


class StartGate(Protocol):
    """Inputs Envoy needs at its start, which the agent can check (LocalXds; a test's fake)."""

    def start_problem(self) -> str | None:
        """Why an Envoy started now could not start (names the input and what is wrong with it), else None."""
        ...

    def next_change(self) -> asyncio.Event:
        """An event set at the next change of what start_problem() reads. Taken before asking start_problem(), so
        that a change in between is not missed."""
        ...


async def wait_until_startable(gate: StartGate, lifecycle: Lifecycle) -> bool:
    """True at once when nothing stops a start; otherwise once the problem is gone (readiness says why meanwhile).
    False when shutdown is requested first."""
    changed = gate.next_change()
    problem = gate.start_problem()
    if problem is None:
        return True
    logged = None
    while problem is not None:
        reason = f"Envoy is not restarted while {problem}"
        lifecycle.envoy_down(reason)
        if problem != logged:
            log.warning("%s: a new Envoy would fail at its start; it is restarted as soon as that is fixed", reason)
            logged = problem
        await first_of(changed.wait(), lifecycle.wait_shutdown())
        if lifecycle.shutting_down:
            return False
        changed = gate.next_change()
        problem = gate.start_problem()
    log.info("what kept Envoy from restarting is fixed: restarting it")
    return True
