"""Pure parts of supervision: exit classification, termination message, active connections, /proc parsing."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from agent.pid1 import zombie_children
from agent.proxy.admin import active_connections
from agent.proxy.process import ExitInfo
from agent.proxy.termination import MAX_BYTES, termination_message, write_termination_log


def test_exit_causes() -> None:
    assert ExitInfo(0, 1, 0, False, 1.0).cause == "clean"
    assert ExitInfo(0, 1, 1, False, 1.0).cause == "error"
    assert ExitInfo(0, 1, -signal.SIGSEGV, False, 1.0).cause == "signal"
    assert ExitInfo(0, 1, -signal.SIGKILL, False, 1.0).cause == "oom"
    assert ExitInfo(0, 1, -signal.SIGKILL, True, 1.0).cause == "aborted"
    assert "SIGSEGV" in ExitInfo(2, 7, -signal.SIGSEGV, False, 1.0).describe()
    assert "likely the OOM killer" in ExitInfo(2, 7, -signal.SIGKILL, False, 1.0).describe()


def test_termination_message_fits_kubelet_limit_and_keeps_the_newest_lines() -> None:
    tail = tuple(f"line {i} " + "x" * 200 for i in range(40))
    message = termination_message(ExitInfo(3, 42, 1, False, 2.5, tail), 11, gave_up=True)
    assert len(message.encode()) <= MAX_BYTES
    assert message.startswith("Envoy epoch 3 (pid 42) exit code 1 after 2.5s; 11 unexpected")
    assert "line 39" in message and "line 0 " not in message


def test_termination_log_unwritable_is_not_fatal(tmp_path: Path) -> None:
    assert write_termination_log(tmp_path / "ok", "m")
    assert (tmp_path / "ok").read_text() == "m"
    assert not write_termination_log(tmp_path / "missing" / "log", "m")
    assert not write_termination_log(None, "m")


def test_active_connections_excludes_istio_listeners_admin_and_workers() -> None:
    stats = {
        "listener.0.0.0.0_15006.downstream_cx_active": 3,
        "listener.10.0.0.1_8080.downstream_cx_active": 2,
        "listener.0.0.0.0_15006.worker_0.downstream_cx_active": 3,
        "listener.0.0.0.0_15021.downstream_cx_active": 1,
        "listener.0.0.0.0_15090.downstream_cx_active": 1,
        "listener.admin.downstream_cx_active": 1,
        "listener.admin.main_thread.downstream_cx_active": 1,
        "listener.envoy_internal_x.downstream_cx_active": 4,
        "http.inbound.downstream_cx_active": 9,
    }
    assert active_connections(stats, (15021, 15090)) == 5


def test_zombie_children_reads_proc() -> None:
    child = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
        assert child.pid in zombie_children(os.getpid())
    finally:
        child.wait()
    assert child.pid not in zombie_children(os.getpid())
