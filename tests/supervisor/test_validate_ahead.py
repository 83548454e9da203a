"""Validation ahead: a changed desired state is rendered and validated while the watcher's debounce window is still
open (agent/proxy/ahead.py), and the hot restart takes that verdict when the window closes on the same contents.
The supervision policy with the fake Envoy of fake_launcher.py; each test waits for a recorded outcome.
"""

from __future__ import annotations

from pathlib import Path

from tests.supervisor.fake_launcher import Behaviour, FakeLauncher
from tests.supervisor.test_policy import supervised


async def test_a_change_judged_ahead_is_not_validated_again(tmp_path: Path) -> None:
    async with supervised(tmp_path) as run:
        await run.judged_ahead(b"rotated")
        run.epochs.notify_change("test")  # the window closed on the same contents
        await run.logs.wait_for("Envoy epoch 1 is LIVE")
        assert run.launcher.calls.count("validate 1") == 1
        assert run.epochs.current is not None and run.epochs.current.state.bootstrap == b"rotated"


async def test_more_events_for_contents_judged_already_are_not_validated_again(tmp_path: Path) -> None:
    """A rotation writes its files one by one, each an event; the first render may have seen them all."""
    async with supervised(tmp_path) as run:
        await run.judged_ahead(b"rotated")
        await run.logs.wait_for("validation ahead of epoch 1: valid")
        run.epochs.validate_ahead()  # the next file's event: the same contents
        await run.logs.wait_for("validation ahead of epoch 1: contents judged already")
        run.epochs.notify_change("test")
        await run.logs.wait_for("Envoy epoch 1 is LIVE")
        assert run.launcher.calls.count("validate 1") == 1


async def test_contents_that_changed_again_are_validated_as_they_are_applied(tmp_path: Path) -> None:
    """A half-written state judged ahead (invalid) is neither logged nor counted, nor used for the final one."""
    launcher = FakeLauncher(behaviours={b"half": Behaviour(invalid=True, output=("truncated certificate",))})
    async with supervised(tmp_path, launcher) as run:
        await run.judged_ahead(b"half")
        run.change(b"whole")
        await run.logs.wait_for("Envoy epoch 1 is LIVE")
        assert launcher.calls.count("validate 1") == 2
        assert run.epochs.current is not None and run.epochs.current.state.bootstrap == b"whole"
        assert run.value("istio_agent_config_errors_total", stage="validate") == 0
        assert not [m for m in run.logs.messages if "is invalid" in m]


async def test_an_invalid_state_judged_ahead_is_rejected_once_when_applied(tmp_path: Path) -> None:
    launcher = FakeLauncher(behaviours={b"bad": Behaviour(invalid=True, output=("bad certificate",))})
    async with supervised(tmp_path, launcher) as run:
        await run.judged_ahead(b"bad")
        run.epochs.notify_change("test")
        await run.logs.wait_for("new Envoy configuration is invalid, the running epoch stays: bad certificate")
        assert launcher.calls.count("validate 1") == 1 and "start 1" not in launcher.calls
        assert run.value("istio_agent_config_errors_total", stage="validate") == 1


async def test_a_judgement_left_unused_leaves_no_bootstrap_file_behind(tmp_path: Path) -> None:
    async with supervised(tmp_path) as run:
        await run.judged_ahead(b"briefly")
        run.change(b"good")  # back to what runs: nothing to apply
        await run.logs.wait_for("reconcile step (test): unchanged")
        run.lifecycle.request_shutdown("test done", skip_drain=True)
        assert await run.exit_code() == 0
        assert "forget 1" in run.launcher.calls and "start 1" not in run.launcher.calls
