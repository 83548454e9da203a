"""The agent as a subprocess, as kubelet runs it: ready through Envoy, SIGHUP, SIGTERM; `wait`; bad settings."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.errors import ExitCode
from agent.proxy.shm import shm_path
from tests.supervisor.agent_process import ROOT, agent_env, local_xds
from tests.support.envoy import free_port, http_get, new_base_id, wait_until

WAIT = [sys.executable, "-m", "agent", "wait"]


def kill_agent(proc: subprocess.Popen[bytes], base_id: int) -> None:
    """Test teardown: SIGKILL the agent if it still runs and every process it had under it; remove Envoy's shm."""
    children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for child in children:
        child.kill()
    shm_path(base_id).unlink(missing_ok=True)


def agent(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", *args], env={**env, "PYTHONPATH": str(ROOT)}, cwd=cwd, stderr=subprocess.PIPE
    )


@pytest.fixture
def running_agent(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int], int]]:
    ports = {name: free_port() for name in ("admin", "status", "envoy_status", "prom", "app")}
    base_id = new_base_id()
    xds = local_xds(tmp_path, ports["app"])
    env = agent_env(tmp_path, base_id, ports)
    proc = agent(
        "proxy", "router", "--local-xds-dir", str(xds), "--meshConfig", str(tmp_path / "none"), env=env, cwd=tmp_path
    )
    try:
        yield proc, ports, base_id
    finally:
        kill_agent(proc, base_id)
        if proc.stderr is not None:
            proc.stderr.close()


def _server_epoch(admin_port: int) -> int:
    _status, body = http_get(f"http://127.0.0.1:{admin_port}/server_info")
    info = json.loads(body)
    return int(info["command_line_options"]["restart_epoch"]) if info["state"] == "LIVE" else -1


@pytest.mark.envoy
@pytest.mark.slow
def test_agent_ready_sighup_then_sigterm(
    running_agent: tuple[subprocess.Popen[bytes], dict[str, int], int], tmp_path: Path
) -> None:
    proc, ports, base_id = running_agent
    waited = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "wait",
            "--url",
            f"http://127.0.0.1:{ports['envoy_status']}/healthz/ready",
            "--timeoutSeconds",
            "30",
            "--periodMillis",
            "100",
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert waited.returncode == 0, waited.stderr.decode()
    envoy = [p for p in psutil.Process(proc.pid).children() if "envoy" in p.name()]
    assert len(envoy) == 1
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _server_epoch(ports["admin"]) == 1, timeout=20)
    assert http_get(f"http://127.0.0.1:{ports['app']}/")[0] == 200
    # Fully started and past a hot restart, the agent runs two threads: its event loop and the copier of the
    # running Envoy's stderr (file events are read on the loop; blocking work runs on threads that end with it).
    agent = psutil.Process(proc.pid)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: agent.num_threads() == 2, timeout=10)
    assert agent.num_threads() == 2, [t.id for t in agent.threads()]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not psutil.pid_exists(envoy[0].pid) or psutil.Process(envoy[0].pid).status() == psutil.STATUS_ZOMBIE
    assert not shm_path(base_id).exists()
    assert not list((tmp_path / "proxy").glob("envoy-rev*"))


def test_wait_times_out_with_its_exit_code() -> None:
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "wait",
            "--url",
            f"http://127.0.0.1:{port}/healthz/ready",
            "--timeoutSeconds",
            "1",
            "--periodMillis",
            "100",
            "--requestTimeoutMillis",
            "100",
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == ExitCode.WAIT_TIMEOUT
    assert "timeout waiting for Envoy proxy to become ready. Last error:" in result.stderr.decode()


def test_bad_restart_policy_is_one_clear_line(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("admin", "status", "envoy_status", "prom")}
    env = agent_env(tmp_path, new_base_id(), ports, ENVOY_RESTART_POLICY="sometimes")
    proc = agent("proxy", "router", "--meshConfig", str(tmp_path / "none"), env=env, cwd=tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.CONFIG_ERROR
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "env ENVOY_RESTART_POLICY" in lines[0], lines
    assert "Traceback" not in err.decode()
