"""Crashes with a real Envoy: SIGKILL -> 503 at once -> restart with backoff; a missing binary -> budget -> exit code.

The budget arithmetic, a fix during a crash loop and the termination log on its own are in test_policy.py (fast).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from agent.errors import ExitCode
from tests.supervisor.harness import Rig, bootstrap, envoy_children, supervised, until

pytestmark = [pytest.mark.envoy]


async def test_sigkill_turns_readiness_off_and_envoy_comes_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port))
    delays: list[float] = []
    reasons: list[str | None] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)
        reasons.append(run.lifecycle.not_ready_reason())

    async with supervised(rig, sleep=record) as run:
        await run.wait_epoch_live(0)
        (victim,) = envoy_children()
        os.kill(victim.pid, signal.SIGKILL)
        await run.wait_epoch_live(0)
        # Readiness was off (with the reason) from the exit until the restart, during the backoff.
        assert reasons and "SIGKILL" in (reasons[0] or "")
        assert [p.pid for p in envoy_children()] != [victim.pid]
        assert delays == [0.2]
        assert run.lifecycle.envoy_starts == 2  # readers of Lifecycle learn that this is a new Envoy
        assert run.value("istio_agent_envoy_exits_total", cause="oom") == 1
        assert run.value("istio_agent_envoy_restart_budget_remaining") == 9
        # A second crash doubles the delay.
        os.kill(envoy_children()[0].pid, signal.SIGKILL)
        await until(lambda: len(delays) == 2)
        await run.wait_epoch_live(0)
        assert delays == [0.2, 0.4]


async def test_exit_policy_exits_with_envoy(tmp_path: Path) -> None:
    """ENVOY_RESTART_POLICY=exit (Istio's current behaviour): no restart; non-zero Envoy exit -> ENVOY_EXITED."""
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port))
    async with supervised(rig, supervision={"exit_on_envoy_exit": True}) as run:
        await run.wait_epoch_live(0)
        os.kill(envoy_children()[0].pid, signal.SIGKILL)
        code = await asyncio.wait_for(run.task, 10)
    assert code == ExitCode.ENVOY_EXITED
    assert "SIGKILL" in (tmp_path / "termination-log").read_text()


async def test_envoy_binary_gone_counts_as_crash_and_gives_up(tmp_path: Path) -> None:
    """The binary vanished after start-up (an image or volume problem): the same budget, then exit 70."""
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port))
    missing = str(tmp_path / "no-envoy")
    async with supervised(rig, launch={"binary": missing}, supervision={"restart_budget": 2}) as run:
        code = await asyncio.wait_for(run.task, 10)
    assert code == ExitCode.ENVOY_RESTART_BUDGET_EXHAUSTED
    assert f"cannot execute {missing}" in (tmp_path / "termination-log").read_text()
    assert run.value("istio_agent_envoy_exits_total", cause="error") == 3


async def test_crash_while_the_parent_drains_restarts_the_whole_family(tmp_path: Path) -> None:
    """Epoch 1 dies while epoch 0 is still draining after the hot restart: the draining parent holds the base id's
    hot-restart sockets, so it must go too, or no new epoch 0 could ever start (and it would be orphaned)."""
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="zero"))
    async with supervised(rig, launch={"parent_shutdown_duration": 60, "drain_duration": 30}) as run:
        await run.wait_epoch_live(0)
        (parent,) = envoy_children()
        rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="one"))
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await run.wait_epoch_live(1)
        child = next(p for p in envoy_children() if p.pid != parent.pid)
        assert parent.is_running()  # draining for up to 60 s
        os.kill(child.pid, signal.SIGKILL)
        await until(lambda: run.lifecycle.envoy_starts == 2, 20)
        await run.wait_epoch_live(0)
        assert not parent.is_running() or parent.status() == "zombie"
        assert [p.pid for p in envoy_children()] not in ([parent.pid], [child.pid])
        assert len(envoy_children()) == 1
        assert run.value("istio_agent_envoy_exits_total", cause="oom") == 1
