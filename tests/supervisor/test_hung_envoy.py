"""A hung Envoy (SIGSTOP, or a main thread stuck): readiness says so, and a hot restart does not wait for ever.

Envoy keeps its LIVE stats while stopped, so the readiness facts remembered once true would keep 15020 at 200, and a
SIGHUP waited for "LIVE" from an admin API that never answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient, AdminError, AdminTimeout
from agent.status.readiness import EnvoyResponding, NotReady, Readiness
from tests.supervisor.fake_launcher import LogWaiter
from tests.supervisor.harness import Rig, bootstrap, envoy_children, supervised, until


class SilentAdmin(AdminClient):
    """An admin client whose answers the test decides: "answer", "timeout" or "refused"."""

    def __init__(self) -> None:
        super().__init__(port=1)
        self.mode = "answer"
        self.requests = 0

    async def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 2.0
    ) -> tuple[int, bytes]:
        self.requests += 1
        if self.mode == "timeout":
            raise AdminTimeout(f"{method} {path}: no answer within {timeout:g}s")
        if self.mode == "refused":
            raise AdminError(f"{method} {path}: connection refused")
        return 200, b"LIVE\n"


async def test_silence_is_tolerated_briefly_then_reported_and_an_answer_clears_it() -> None:
    now = [100.0]
    admin = SilentAdmin()
    responding = EnvoyResponding(admin, interval=1.0, unresponsive_after=5.0, clock=lambda: now[0])
    await responding.check()
    assert responding.fresh() and admin.requests == 1
    await responding.check()  # within the interval: not asked again
    assert admin.requests == 1
    admin.mode = "timeout"
    now[0] += 2.0
    await responding.check()  # one slow answer is not a hang: it answered 2 s ago
    now[0] += 2.0
    await responding.check()
    now[0] += 2.0
    with pytest.raises(NotReady, match=r"Envoy is not responding: its admin API has not answered for 6s"):
        await responding.check()
    admin.mode = "refused"  # a refused connection is not a hang either
    await responding.check()
    admin.mode = "answer"
    now[0] += 1.0
    await responding.check()
    assert responding.fresh()
    # A probe long after the last answer (kubelet probes every 15 s): the first silent request already says so.
    admin.mode = "timeout"
    now[0] += 15.0
    with pytest.raises(NotReady, match=r"has not answered for 15s"):
        await responding.check()
    # A restarted Envoy (forget) gets the benefit of the doubt from its first unanswered request.
    responding.forget()
    await responding.check()
    now[0] += 5.0
    with pytest.raises(NotReady, match=r"has not answered for 5s"):
        await responding.check()


async def test_once_ready_readiness_still_asks_envoy_at_most_once_a_second() -> None:
    lifecycle = Lifecycle()
    lifecycle.envoy_started()
    lifecycle.envoy_up()
    admin = SilentAdmin()
    responding = EnvoyResponding(admin, interval=60.0, unresponsive_after=0.0)
    readiness = Readiness(lifecycle, AgentMetrics(process_metrics=False), [], responding=responding)
    assert await asyncio.gather(*(readiness.check() for _ in range(50))) == [None] * 50
    assert admin.requests == 1
    responding.forget()
    admin.mode = "timeout"
    assert (
        await readiness.check() == "Envoy is not responding: its admin API has not answered for 0s (stopped or stuck?)"
    )


@pytest.mark.envoy
async def test_a_stopped_envoy_is_not_ready_and_does_not_hold_a_hot_restart(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port))
    logs = LogWaiter()
    logging.getLogger("agent.proxy").addHandler(logs)
    try:
        async with supervised(rig, supervision={"live_timeout": 1.0}) as run:
            await run.wait_epoch_live(0)
            responding = EnvoyResponding(run.admin, timeout=0.2, unresponsive_after=0.5)
            readiness = Readiness(run.lifecycle, run.metrics, [], responding=responding)
            assert await readiness.check() is None
            (envoy,) = envoy_children()
            os.kill(envoy.pid, signal.SIGSTOP)
            try:
                responding.forget()
                assert await readiness.check() is None  # a first silence: not yet
                reasons: list[str | None] = []

                async def unready() -> bool:
                    reasons.append(await readiness.check())
                    return reasons[-1] is not None

                await until(unready, 5)
                assert (reasons[-1] or "").startswith("Envoy is not responding"), reasons
                assert run.supervisor.epochs is not None
                run.supervisor.epochs.request_hot_restart()
                await logs.wait_for("has not answered on its admin API for 1s (stopped or stuck?)")
                assert run.supervisor.epochs.numbers() == [0]
            finally:
                os.kill(envoy.pid, signal.SIGCONT)
            # Answering again, it is ready again (the hot restart that follows is in test_policy.py).
            responding.forget()
            assert await readiness.check() is None
    finally:
        logging.getLogger("agent.proxy").removeHandler(logs)
