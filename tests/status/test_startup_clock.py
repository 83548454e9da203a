"""Where istio_agent_startup_duration_seconds (and "Readiness succeeded in ...") is measured from.

Real processes: a bash that runs a setup step and then execs Python, as `sh -c 'setup && exec pilot-agent'` and
the README's Quick start (`pip install ... && pilot-agent ...`, whose last command bash runs in place) do.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = (
    "import agent; from agent.status.readiness import process_start_monotonic as start; "
    "print(start(exec_gap={gap}) == agent.IMPORTED_AT, start(exec_gap={gap}) < agent.IMPORTED_AT)"
)


def _run(command: list[str]) -> list[str]:
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout.split()


def test_a_parent_shells_setup_before_the_exec_is_not_counted_as_the_agents_start_up() -> None:
    # The kernel's start of this process is bash's, 1.5 s before Python runs: measured from the agent's import.
    exec_d = _run(["bash", "-c", f'sleep 1.5 && exec {sys.executable} -c "{PROBE.format(gap=1.0)}"'])
    assert exec_d == ["True", "False"]


def test_a_process_started_for_the_agent_counts_its_interpreters_start_up() -> None:
    # Started directly: the kernel's start (before the interpreter's own start-up) is kept, as before.
    direct = _run([sys.executable, "-c", PROBE.format(gap=5.0)])
    assert direct == ["False", "True"]
