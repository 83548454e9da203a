"""How many generated cases a differential test runs, and with which seed.

CI runs a fixed seed and a count sized for its time budget (README, "Differential tests against Istio's agent").
To run more, or with fresh randomness:

    PILOT_AGENT_DIFF_EXAMPLES=3000 PILOT_AGENT_DIFF_SEED=random .venv/bin/python -m pytest tests/differential

A failure prints the shrunk input; with a fixed seed the same run reproduces it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, seed, settings

F = TypeVar("F", bound=Callable[..., object])
FIXED_SEED = 20260827


def differential(default_examples: int) -> Callable[[F], F]:
    """Hypothesis settings for a test that runs Istio's binary per example: no deadline, no example database, the
    fixed seed unless PILOT_AGENT_DIFF_SEED says otherwise, PILOT_AGENT_DIFF_EXAMPLES examples if set."""
    examples = int(os.environ.get("PILOT_AGENT_DIFF_EXAMPLES", default_examples))
    chosen = os.environ.get("PILOT_AGENT_DIFF_SEED", str(FIXED_SEED))

    def decorate(test: F) -> F:
        configured = settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )(test)
        return configured if chosen == "random" else seed(int(chosen))(configured)

    return decorate
