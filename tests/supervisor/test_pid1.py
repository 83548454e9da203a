"""PID 1: orphans are reaped, and the agent's own Envoy exit codes are never stolen (DESIGN habit 9)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from agent.proxy.shm import shm_path
from tests.conftest import require_root
from tests.supervisor.agent_process import agent_env, local_xds
from tests.support.envoy import envoy_binary, free_port, http_get, new_base_id, wait_until

pytestmark = [pytest.mark.envoy, pytest.mark.root, pytest.mark.slow]

NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]
ROOT = Path(__file__).resolve().parents[2]


def test_pid1_reaps_orphans_and_reports_every_envoy_exit_code(tmp_path: Path) -> None:
    require_root()
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    result = subprocess.run(
        [*NAMESPACE, sys.executable, "-m", "tests.supervisor.pid1_scenario", envoy_binary(), str(tmp_path), "240"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert report["exits"] == 240
    assert report["wrong"] == []
    assert report["reaped"] > 20  # orphans were really re-parented to PID 1 and reaped
    assert report["reaped_codes"] == [3]
    assert report["zombies_left"] == []


def test_agent_as_pid1_reaps_orphans_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """The real agent as PID 1 of a PID namespace: orphans re-parented to it are reaped; SIGTERM -> exit 0."""
    require_root()
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("unshare/nsenter not installed")
    ports = {name: free_port() for name in ("admin", "status", "envoy_status", "prom", "app")}
    base_id = new_base_id()
    xds = local_xds(tmp_path, ports["app"])
    env = {**agent_env(tmp_path, base_id, ports), "PYTHONPATH": str(ROOT)}
    argv = [*NAMESPACE, sys.executable, "-m", "agent", "proxy", "router", "--local-xds-dir", str(xds)]
    log = (tmp_path / "agent.log").open("wb")
    outer = subprocess.Popen([*argv, "--meshConfig", str(tmp_path / "none")], env=env, cwd=tmp_path, stderr=log)
    try:
        wait_until(lambda: psutil.Process(outer.pid).children(), timeout=10)
        agent = psutil.Process(outer.pid).children()[0]  # PID 1 inside the namespace
        wait_until(lambda: http_get(f"http://127.0.0.1:{ports['envoy_status']}/healthz/ready")[0] == 200, 30)
        # Processes whose parent exits inside the namespace are re-parented to its PID 1: the agent.
        orphans = "for i in 1 2 3 4 5 6 7 8; do (sleep 0.3; exit 3) & done; exit 0"
        subprocess.run(["nsenter", "-t", str(agent.pid), "-p", "-m", "sh", "-c", orphans], check=True, timeout=10)
        assert len([p for p in agent.children() if "envoy" not in p.name()]) >= 8
        # Reaped within the grace period (1 s) after they exit; Envoy untouched.
        wait_until(lambda: all("envoy" in p.name() for p in agent.children()), timeout=10)
        envoy = [p for p in agent.children() if "envoy" in p.name()]
        assert len(envoy) == 1 and envoy[0].status() != psutil.STATUS_ZOMBIE
        agent.send_signal(signal.SIGTERM)
        assert outer.wait(30) == 0, (tmp_path / "agent.log").read_text()[-2000:]
        assert not envoy[0].is_running() or envoy[0].status() == psutil.STATUS_ZOMBIE
        assert not shm_path(base_id).exists()
    finally:
        if outer.poll() is None:
            for child in psutil.Process(outer.pid).children(recursive=True):
                child.kill()
            outer.kill()
            outer.wait()
        log.close()
        shm_path(base_id).unlink(missing_ok=True)
