"""The real agent as a subprocess, for the tests that must run it as kubelet does (start-up, signals, exits).

`start_agent(*args, proxy_config=..., **env)` (the fixture, in conftest.py) starts `python -m agent proxy router`
in its own directory with free ports, its own base id, a local xDS directory (one listener) and a short drain;
`prepare(work)` writes files into the agent's working directory before it starts (its downward-API files live under
`./etc/istio/pod/`); `leftovers(agent)` lists what an exited agent must not leave behind.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
import pytest

from tests.support.envoy import admin_ready, direct_response_lds, free_port, http_get, new_base_id, shm_segment

ROOT = Path(__file__).resolve().parents[2]
# Generous: a drain of 0.5 s plus Envoy's stop grace; exceeding it means the agent hung.
EXIT_BOUND = 20.0


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    base_id: int
    config_dir: Path
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = EXIT_BOUND) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agent did not exit within {timeout}s; its stderr:\n{self.stderr()[-4000:]}")


def envoys_of(base_id: int) -> list[psutil.Process]:
    """Live (non-zombie) processes run with `--base-id <base_id>`: every Envoy of this test, whoever its parent."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(a == "--base-id" and b == str(base_id) for a, b in itertools.pairwise(cmdline)):
            found.append(proc)
    return found


def envoy_child(agent_pid: int) -> int | None:
    """Pid of the agent's child once it has exec'd Envoy (before the exec the forked child still runs Python)."""
    try:
        children = psutil.Process(agent_pid).children()
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if os.path.basename(os.readlink(f"/proc/{child.pid}/exe")) == "envoy":
                return child.pid
        except OSError:  # gone, or not exec'd far enough to read
            continue
    return None


def leftovers(agent: Agent) -> list[str]:
    """What an exited agent must not leave behind."""
    found = [f"envoy pid {p.pid}" for p in envoys_of(agent.base_id)]
    if shm_segment(agent.base_id).exists():
        found.append(str(shm_segment(agent.base_id)))
    found += [str(p) for p in agent.config_dir.glob("envoy-rev*")]
    return found


def test_proxy_config(work: Path, ports: dict[str, int], **overrides: object) -> dict[str, object]:
    """PROXY_CONFIG of an agent under test: configPath under `work`, its ports, short drain and parent shutdown."""
    return {
        "configPath": str(work / "proxy"),
        "proxyAdminPort": ports["admin"],
        "statusPort": ports["status"],
        "terminationDrainDuration": "1s",
        "drainDuration": "1s",
        "parentShutdownDuration": "2s",
        **overrides,
    }


def agent_env(work: Path, base_id: int, ports: dict[str, int], **extra: str) -> dict[str, str]:
    """The environment of an agent under test: the caller's, less Istio's own settings, plus its PROXY_CONFIG,
    ports and base id; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG"))}
    env.update(
        PROXY_CONFIG=json.dumps(test_proxy_config(work, ports)),
        ENVOY_STATUS_PORT=str(ports["envoy_status"]),
        ENVOY_PROMETHEUS_PORT=str(ports["prom"]),
        ENVOY_BASE_ID=str(base_id),
        TERMINATION_LOG_PATH=str(work / "termination-log"),
        POD_NAME="e2e",
        POD_NAMESPACE="test",
        INSTANCE_IP="127.0.0.1",
    )
    env.update(extra)
    return env


def local_xds(work: Path, app_port: int) -> Path:
    """A directory for --local-xds-dir: one listener on 127.0.0.1:`app_port` answering 200, no clusters."""
    xds = work / "xds"
    xds.mkdir()
    (xds / "lds.yaml").write_text(direct_response_lds(app_port))
    (xds / "cds.yaml").write_text("resources: []\n")
    return xds


class StartAgent(Protocol):
    def __call__(
        self,
        *args: str,
        proxy_config: dict[str, object] | None = None,
        prepare: Callable[[Path], object] | None = None,
        **env_extra: str,
    ) -> Agent: ...


def agents(tmp_path: Path) -> Iterator[StartAgent]:
    """The start_agent fixture's body: starts agents; on exit kills what is left of them."""
    started: list[Agent] = []

    def start(
        *args: str,
        proxy_config: dict[str, object] | None = None,
        prepare: Callable[[Path], object] | None = None,
        **env_extra: str,
    ) -> Agent:
        ports = {name: free_port() for name in ("admin", "status", "envoy_status", "prom", "app")}
        base_id = new_base_id()
        work = tmp_path / f"agent{len(started)}"
        work.mkdir()
        xds = local_xds(work, ports["app"])
        # A short drain, so that a SIGTERM's drain does not dominate the file's runtime.
        config = test_proxy_config(work, ports, **{"terminationDrainDuration": "0.5s", **(proxy_config or {})})
        env = agent_env(work, base_id, ports, PROXY_CONFIG=json.dumps(config), POD_NAME="startup", **env_extra)
        env["PYTHONPATH"] = str(ROOT)
        if prepare is not None:
            prepare(work)  # files the agent reads at start, in its working directory
        base_id = int(env["ENVOY_BASE_ID"])
        config_dir = Path(str(config["configPath"]))
        argv = [sys.executable, "-m", "agent", "proxy", "router", "--local-xds-dir", str(xds)]
        argv += ["--meshConfig", str(work / "none"), *args]
        stderr_path = work / "stderr"
        # A file, not a pipe: a test that reads late must not stall the agent (and through it Envoy).
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(argv, env=env, cwd=work, stdin=subprocess.DEVNULL, stderr=stderr)
        agent = Agent(proc, ports, base_id, config_dir, stderr_path)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
        for envoy in envoys_of(agent.base_id):
            envoy.kill()
        shm_segment(agent.base_id).unlink(missing_ok=True)


def wait_for_envoy(agent: Agent, timeout: float = 15.0) -> int:
    """Poll /proc (tight loop: the window after the exec is a fraction of a second) until Envoy is the agent's child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = envoy_child(agent.proc.pid)
        if pid is not None:
            return pid
        if agent.proc.poll() is not None:
            pytest.fail(f"agent exited with {agent.proc.returncode} before Envoy appeared:\n{agent.stderr()[-4000:]}")
        time.sleep(0.001)
    pytest.fail(f"no Envoy child within {timeout}s:\n{agent.stderr()[-4000:]}")


def watch_for_envoy_until_exit(agent: Agent) -> bool:
    """Poll until the agent exits; True if an Envoy of its base id was ever seen meanwhile."""
    seen_envoy = False
    while agent.proc.poll() is None:
        seen_envoy = seen_envoy or bool(envoys_of(agent.base_id))
        time.sleep(0.005)
    return seen_envoy


def only_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def ready(agent: Agent) -> bool:
    """Envoy LIVE on its admin port and the agent's readiness 200 on the status port."""
    if not admin_ready(agent.ports["admin"]):
        return False
    try:
        return http_get(f"http://127.0.0.1:{agent.ports['status']}/healthz/ready", timeout=1.0)[0] == 200
    except OSError:
        return False
