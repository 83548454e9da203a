"""Small parts of supervision: exit classification, termination message, active connections, /proc parsing, the
atomic writer, the diagnosis of Envoy's start failures, the shared-memory cleanup, the reaper's bookkeeping."""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from agent.files import remove_file, write_atomic
from agent.pid1 import OrphanReaper, zombie_children
from agent.proxy.admin import active_connections
from agent.proxy.diagnosis import StartContext, diagnose_start_failure, envoy_error
from agent.proxy.ports import port_taken, static_listener_addresses
from agent.proxy.process import ExitInfo
from agent.proxy.shm import remove_segment, segment_identity, shm_path
from agent.proxy.spawn import copy_lines
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


# ---- the atomic writer (agent/files.py) ----


def test_write_atomic_makes_private_directories_and_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "envoy-rev0.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert sorted(p.name for p in target.parent.iterdir()) == ["envoy-rev0.json"]


def test_write_atomic_that_fails_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the new bytes are flushed (simulated: a real full disk is in test_full_disk.py)."""
    target = tmp_path / "envoy-rev1.json"
    write_atomic(target, b"old")

    def no_space(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as info:
        write_atomic(target, b"new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["envoy-rev1.json"]


def test_remove_file_is_quiet_about_a_missing_file(tmp_path: Path) -> None:
    remove_file(tmp_path / "never-written")
    (tmp_path / "x").write_text("x")
    remove_file(tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- known Envoy start failures (agent/proxy/diagnosis.py), on Envoy 1.40's own lines ----

CONTEXT = StartContext(admin_port=15000, base_id=7, hot_restart=True)
ADMIN_IN_USE = (
    "[2026-12-02 04:25:44.084][19307][critical][main] [source/server/server.cc:449] error `cannot bind "
    "'127.0.0.1:15000': Address already in use` initializing config 'goo.gle/debugstr   ",
    "  ok.json'",
    "cannot bind '127.0.0.1:15000': Address already in use",
)
BASE_ID_TAKEN = (
    "[2026-12-02 04:25:48.046][19570][debug][init] [source/common/init/watcher_impl.cc:31] init manager Server "
    "destroyed",
    "unable to bind domain socket with base_id=70, id=0, errno=98 (see --base-id option)",
)
SHM_CLASH = (
    "[2026-12-02 04:26:28.666][22070][critical][assert] [source/server/hot_restart_impl.cc:44] panic: cannot open "
    "shared memory region /envoy_shared_memory_70 check user permissions. Error: Permission denied",
)


def test_known_start_failures_name_the_fix() -> None:
    admin = diagnose_start_failure(ADMIN_IN_USE, CONTEXT)
    assert admin is not None and "admin port 127.0.0.1:15000 is already in use" in admin and "proxyAdminPort" in admin
    listener = diagnose_start_failure(ADMIN_IN_USE, StartContext(admin_port=15001, base_id=7, hot_restart=True))
    assert listener is not None and "where its bootstrap listens" in listener and "proxyAdminPort" not in listener
    base_id = diagnose_start_failure(BASE_ID_TAKEN, CONTEXT)
    assert base_id is not None and "already runs with base id 7" in base_id and "ENVOY_BASE_ID" in base_id
    shm = diagnose_start_failure(SHM_CLASH, CONTEXT)
    assert shm is not None and "/dev/shm/envoy_shared_memory_70 (Permission denied)" in shm
    assert "ENVOY_BASE_ID" in shm
    assert diagnose_start_failure(("error: invalid component specified 'nosuch'",), CONTEXT) is None


def test_envoy_error_is_envoys_own_message() -> None:
    critical = "[2026-12-02 04:26:34.088][22393][critical][main] [source/server/config_validation/server.cc:76] "
    assert envoy_error((critical + "error initializing configuration 'x': bad", "")) == (
        "error initializing configuration 'x': bad"
    )
    assert envoy_error(("USAGE: ...", "error: invalid component specified 'nosuch'")) == (
        "error: invalid component specified 'nosuch'"
    )
    assert envoy_error(("(--drain-time-s) -- Couldn't read argument value",)) == (
        "(--drain-time-s) -- Couldn't read argument value"
    )
    assert envoy_error(()) == "no output"


def test_an_error_envoy_logs_and_prints_again_bare_is_copied_once(tmp_path: Path) -> None:
    """Envoy's output on an admin port in use, as it writes it: the critical line (its message holds a newline),
    then the exception again on a bare line. The bare repeat is dropped; other bare lines are kept."""
    output = (
        b"[2026-12-02 07:46:18.761][7247][critical][main] [source/server/server.cc:449] error `cannot bind "
        b"'127.0.0.1:24570': Address already in use` initializing config 'goo.gle/debugonly    \n"
        b"  /tmp/agent1/proxy/envoy-rev0.json'\n"
        b"cannot bind '127.0.0.1:24570': Address already in use\n"
        b"[2026-12-02 07:46:18.762][7247][info][main] [source/server/server.cc:1] exiting\n"
        b"cannot bind '127.0.0.1:24570': Address already in use\n"
    )
    read_end, write_end = os.pipe()
    os.write(write_end, output)
    os.close(write_end)
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with (tmp_path / "copy").open("wb") as sink:
        copy_lines(read_end, tail, sink)
    copied = (tmp_path / "copy").read_text().splitlines()
    assert copied == [line.decode() for line in output.splitlines() if line][:2] + copied[2:]
    assert len(copied) == 4 and copied[2].startswith("[2026-12-02 07:46:18.762]"), copied
    # Not after another log line: that one is no repeat.
    assert copied[3] == "cannot bind '127.0.0.1:24570': Address already in use"
    assert list(tail) == copied


# ---- the family's shared memory is removed only when it is ours ----


def test_a_segment_that_was_there_before_our_epoch_0_is_not_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.proxy.shm.SHM_DIR", Path(tempfile.mkdtemp()))
    segment = shm_path(7)
    segment.write_bytes(b"another Envoy's")
    foreign = segment_identity(7)
    remove_segment(7, foreign)
    assert segment.exists()
    segment.unlink()
    segment.write_bytes(b"ours: our epoch 0 replaced it")
    remove_segment(7, foreign)
    assert not segment.exists()
    remove_segment(7, None)  # none left: nothing to do


# ---- PID 1 bookkeeping ----


def test_the_reaper_remembers_a_bounded_number_of_reaped_orphans() -> None:
    reaper = OrphanReaper(set, grace=0.0, remember=3)
    pids = [os.posix_spawnp("true", ["true"], dict(os.environ)) for _ in range(5)]
    for pid in pids:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # a zombie now, not reaped yet
    reaper.reap_once()
    assert reaper.reaped_count == 5
    assert len(reaper.reaped) == 3 and {pid for pid, _ in reaper.reaped} <= set(pids)
    assert not set(pids) & zombie_children(os.getpid())


def test_write_atomic_under_a_file_says_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "config").write_text("a file where configPath should be")
    with pytest.raises(NotADirectoryError) as info:
        write_atomic(tmp_path / "config" / "proxy" / "envoy-rev0.json", b"{}")
    assert info.value.filename == str(tmp_path / "config")


def test_the_listener_addresses_checked_before_the_exec_are_the_bootstraps_own() -> None:
    def listener(address: str, port: int, extra: str | None = None) -> dict[str, object]:
        head: dict[str, object] = {"address": {"socket_address": {"address": address, "port_value": port}}}
        if extra is not None:
            head["additional_addresses"] = [{"address": {"socket_address": {"address": extra, "port_value": port}}}]
        return head

    listeners = [listener("127.0.0.1", 15090), listener("::", 15021, extra="0.0.0.0"), listener("0.0.0.0", 8080)]
    bootstrap = json.dumps({"static_resources": {"listeners": listeners}}).encode()
    found = static_listener_addresses(bootstrap, [15021, 15090, 0])
    assert found == [("127.0.0.1", 15090), ("::", 15021), ("0.0.0.0", 15021)]
    assert static_listener_addresses(b"static_resources: {}", [15021]) == []  # YAML from a custom template


def test_a_port_another_envoy_listens_on_with_so_reuseport_is_taken() -> None:
    with socket.socket() as envoys:  # as Envoy binds its listeners
        envoys.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        envoys.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        envoys.bind(("0.0.0.0", 0))
        envoys.listen()
        port = envoys.getsockname()[1]
        assert port_taken("0.0.0.0", port) and port_taken("127.0.0.1", port)
    assert not port_taken("0.0.0.0", port)
