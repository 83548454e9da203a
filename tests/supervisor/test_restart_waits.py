"""A crash restart that the agent knows would fail waits for its cause to be fixed, instead of spending the restart
budget: the supervision policy with the fake Envoy of fake_launcher.py (see there why) and a fake StartGate (in the
agent: the local xDS files, agent/local_xds.py; with the real agent and Envoy: tests/local_xds/test_reloads.py).
Each test waits for a recorded outcome (a launcher call, a log line, the gate being asked), never a fixed time.
"""

from __future__ import annotations

from pathlib import Path

from tests.supervisor.fake_launcher import FakeGate
from tests.supervisor.test_policy import supervised

MISSING = "local xDS file /x/cds.yaml is missing (the clusters Envoy loads)"


async def test_a_crash_restart_waits_while_envoy_could_not_start_and_restarts_once_fixed(tmp_path: Path) -> None:
    gate = FakeGate()
    async with supervised(tmp_path, start_gate=gate) as run:
        await run.logs.wait_for("Envoy epoch 0 is LIVE")
        assert gate.asked == 0  # the first start is not gated: the same check stops the agent at start (exit 78)
        gate.problem = MISSING
        run.launcher.newest.crash()
        await run.logs.wait_for(f"Envoy is not restarted while {MISSING}: a new Envoy would fail at its start")
        assert run.lifecycle.not_ready_reason() == f"Envoy is not restarted while {MISSING}"
        gate.change(MISSING)  # another change, still missing: it keeps waiting, and says so once
        await gate.wait_asked(2)
        assert run.launcher.calls.count("start 0") == 1
        gate.change(None)
        await run.launcher.wait_for("start 0", 2)
        await run.logs.wait_for("Envoy epoch 0 is LIVE", 2)
        assert run.lifecycle.not_ready_reason() is None
        assert run.value("istio_agent_envoy_restart_budget_remaining") == 9  # one restart, not a crash loop
        assert sum("is not restarted while" in m for m in run.logs.messages) == 1
    assert run.delays == [0.2]


async def test_a_shutdown_ends_the_wait_without_starting_envoy(tmp_path: Path) -> None:
    gate = FakeGate()
    async with supervised(tmp_path, start_gate=gate) as run:
        await run.logs.wait_for("Envoy epoch 0 is LIVE")
        gate.problem = MISSING
        run.launcher.newest.crash()
        await run.logs.wait_for("Envoy is not restarted while")
        run.lifecycle.request_shutdown("received signal: SIGTERM")
        assert await run.exit_code() == 0
    assert run.launcher.calls.count("start 0") == 1
