"""Hot restart needs /dev/shm. Where it is read-only or missing, the agent runs Envoy without hot restart instead of
letting it abort at start (which would look like a crash loop and end with exit 70 after minutes of backoff)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.proxy.shm import shared_memory_unusable
from tests.conftest import require_root
from tests.supervisor.agent_process import ROOT, agent_env, local_xds
from tests.supervisor.test_agent_e2e import kill_agent
from tests.support.envoy import free_port, http_get, new_base_id, wait_until


def test_a_writable_directory_is_usable(tmp_path: Path) -> None:
    assert shared_memory_unusable(tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_a_missing_directory_is_not(tmp_path: Path) -> None:
    assert shared_memory_unusable(tmp_path / "absent") == f"{tmp_path / 'absent'} does not exist"


@pytest.mark.envoy
@pytest.mark.root
def test_read_only_dev_shm_runs_envoy_without_hot_restart(tmp_path: Path) -> None:
    require_root()
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    ports = {name: free_port() for name in ("admin", "status", "envoy_status", "prom", "app")}
    base_id = new_base_id()
    xds = local_xds(tmp_path, ports["app"])
    env = {**agent_env(tmp_path, base_id, ports), "PYTHONPATH": str(ROOT)}
    agent_argv = [sys.executable, "-m", "agent", "proxy", "router", "--local-xds-dir", str(xds)]
    agent_argv += ["--meshConfig", str(tmp_path / "none")]
    # A private mount namespace whose /dev/shm is an empty read-only tmpfs, as in a hardened container.
    script = 'mount -t tmpfs -o ro tmpfs /dev/shm && exec "$@"'
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *agent_argv],
        env=env,
        cwd=tmp_path,
        stderr=log,
    )

    def ready() -> bool:
        if proc.poll() is not None:  # not 30 s of "connection refused" for an agent that is gone: its reason
            pytest.fail(f"the agent exited with {proc.returncode}:\n{agent_log()}")
        return http_get(f"http://127.0.0.1:{ports['status']}/healthz/ready")[0] == 200

    def agent_log() -> str:
        return (tmp_path / "agent.log").read_text(errors="replace")[-4000:]

    try:
        try:
            wait_until(ready, timeout=30)
        except AssertionError as exc:
            pytest.fail(f"{exc}; the agent's log:\n{agent_log()}")
        assert http_get(f"http://127.0.0.1:{ports['app']}/")[0] == 200
        text = (tmp_path / "agent.log").read_text()
        assert "hot restart disabled: /dev/shm is not writable" in text
        assert "--disable-hot-restart" in text  # the Envoy command line the agent logs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        kill_agent(proc, base_id)
        log.close()
