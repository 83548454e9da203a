"""The quiet start (`Supervisor(settled=...)`, agent/commands/proxy.py): while the running epoch 0 is being judged
ready, the policy loop waits for the start-up to settle, but an exit of that Envoy is handled at once. A fake
Envoy (tests/supervisor/fake_launcher.py): this is the policy's order, not Envoy's behaviour."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.desired import DesiredState
from agent.proxy.events import DrainSettings, SupervisionSettings
from agent.supervisor import Supervisor
from tests.supervisor.fake_launcher import FakeLauncher, recording_logs
from tests.supervisor.harness import supervisor_for_tests


async def _adopting(tmp: Path, launcher: FakeLauncher, settled: asyncio.Event, lifecycle: Lifecycle) -> Supervisor:
    """A supervisor adopting an epoch 0 started before it (as `pilot-agent proxy` does)."""
    state = DesiredState(b"good")
    epoch0 = await launcher.start(0, state)

    async def wait_settled() -> None:
        await settled.wait()

    return supervisor_for_tests(
        launcher,
        lambda: state,
        SupervisionSettings(termination_log=tmp / "termination-log", stop_grace=0.1),
        DrainSettings(proxy_type="router", termination_drain=0.05),
        lifecycle=lifecycle,
        metrics=AgentMetrics(process_metrics=False),
        epoch0=(epoch0, state),
        settled=wait_settled,
    )


async def test_an_epoch_0_that_exits_before_the_start_up_settled_is_restarted_at_once(tmp_path: Path) -> None:
    launcher, settled, lifecycle = FakeLauncher(), asyncio.Event(), Lifecycle()
    supervisor = await _adopting(tmp_path, launcher, settled, lifecycle)
    task = asyncio.create_task(supervisor.run())
    await asyncio.wait_for(supervisor.started.wait(), 5)
    launcher.newest.crash()
    await launcher.wait_for("start 0", 2)  # the restart, with `settled` never set
    lifecycle.request_shutdown("test done", skip_drain=True)
    assert await asyncio.wait_for(task, 5) == 0


async def test_the_policy_loop_runs_once_the_start_up_settled(tmp_path: Path) -> None:
    launcher, settled, lifecycle = FakeLauncher(), asyncio.Event(), Lifecycle()
    supervisor = await _adopting(tmp_path, launcher, settled, lifecycle)
    with recording_logs() as logs:
        task = asyncio.create_task(supervisor.run())
        await asyncio.wait_for(supervisor.started.wait(), 5)
        settled.set()
        await logs.wait_for("Envoy epoch 0 is LIVE")
    lifecycle.request_shutdown("test done", skip_drain=True)
    assert await asyncio.wait_for(task, 5) == 0
    assert launcher.calls.count("start 0") == 1  # adopted, not started again
