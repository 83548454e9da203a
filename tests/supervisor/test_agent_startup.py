"""`pilot-agent proxy`'s start-up window, with the real agent as a subprocess and a real Envoy.

At start-up the agent execs Envoy epoch 0 before its heavy imports and before the supervisor exists; the supervisor
takes the running Envoy over later. Between the two, signals are only queued and nobody reads Envoy's stderr. These
tests hold the agent to what a user relies on whatever the moment: a SIGTERM/SIGINT is a clean exit 0 that leaves
no Envoy, no /dev/shm segment and no bootstrap file; start-up errors exit with their code before any Envoy exists;
Envoy's early output reaches the agent's stderr and does not stop Envoy from becoming ready.

The signal tests send at several moments after Envoy's exec appears in /proc; whether a given send lands before or
after the takeover varies from run to run, so the assertions are about the outcome only.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
import pytest

from agent.errors import ExitCode
from tests.support.envoy import (
    admin_ready,
    direct_response_lds,
    free_port,
    http_get,
    new_base_id,
    shm_segment,
    wait_until,
)

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


class StartAgent(Protocol):
    def __call__(self, *args: str, proxy_config: dict[str, object] | None = None, **env_extra: str) -> Agent: ...


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[StartAgent]:
    started: list[Agent] = []

    def start(*args: str, proxy_config: dict[str, object] | None = None, **env_extra: str) -> Agent:
        ports = {name: free_port() for name in ("admin", "status", "envoy_status", "prom", "app")}
        base_id = new_base_id()
        work = tmp_path / f"agent{len(started)}"
        work.mkdir()
        xds = work / "xds"
        xds.mkdir()
        (xds / "lds.yaml").write_text(direct_response_lds(ports["app"]))
        (xds / "cds.yaml").write_text("resources: []\n")
        config_dir = work / "proxy"
        config: dict[str, object] = {
            "configPath": str(config_dir),
            "proxyAdminPort": ports["admin"],
            "statusPort": ports["status"],
            # Short, so that a SIGTERM's drain does not dominate the file's runtime.
            "terminationDrainDuration": "0.5s",
            "drainDuration": "1s",
            "parentShutdownDuration": "2s",
            **(proxy_config or {}),
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG"))}
        env.update(
            PYTHONPATH=str(ROOT),
            PROXY_CONFIG=json.dumps(config),
            ENVOY_STATUS_PORT=str(ports["envoy_status"]),
            ENVOY_PROMETHEUS_PORT=str(ports["prom"]),
            ENVOY_BASE_ID=str(base_id),
            TERMINATION_LOG_PATH=str(work / "termination-log"),
            POD_NAME="startup",
            POD_NAMESPACE="test",
            INSTANCE_IP="127.0.0.1",
            **env_extra,
        )
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


@pytest.mark.envoy
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("delay", [0.0, 0.03, 0.1, 0.25], ids=lambda d: f"{int(d * 1000)}ms")
def test_signal_in_the_startup_window_is_a_clean_exit(start_agent: StartAgent, sig: int, delay: float) -> None:
    agent = start_agent()
    envoy = wait_for_envoy(agent)
    if delay:
        time.sleep(delay)
    agent.proc.send_signal(sig)
    code = agent.wait()
    err = agent.stderr()
    assert code == ExitCode.OK, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    # The Envoy we saw is gone (reaped by us or, if orphaned, by whoever is PID 1; a zombie is not running).
    assert not psutil.pid_exists(envoy) or psutil.Process(envoy).status() == psutil.STATUS_ZOMBIE
    assert leftovers(agent) == []


def watch_for_envoy_until_exit(agent: Agent) -> bool:
    """Poll until the agent exits; True if an Envoy of its base id was ever seen meanwhile."""
    seen_envoy = False
    while agent.proc.poll() is None:
        seen_envoy = seen_envoy or bool(envoys_of(agent.base_id))
        time.sleep(0.005)
    return seen_envoy


def _only_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.envoy
def test_status_port_in_use_fails_before_envoy(start_agent: StartAgent) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen(1)
        agent = start_agent(proxy_config={"statusPort": port})
        seen_envoy = watch_for_envoy_until_exit(agent)
        code = agent.wait()
    err = agent.stderr()
    assert code == ExitCode.STARTUP_FAILED, err
    assert "Traceback" not in err
    lines = _only_lines(err)
    assert len(lines) == 1 and str(port) in lines[0], lines
    assert not seen_envoy
    assert leftovers(agent) == []


@pytest.mark.envoy
def test_bad_configuration_fails_before_envoy(start_agent: StartAgent) -> None:
    agent = start_agent(proxy_config={"terminationDrainDuration": "5 fortnights"})
    seen_envoy = watch_for_envoy_until_exit(agent)
    code = agent.wait()
    err = agent.stderr()
    assert code == ExitCode.CONFIG_ERROR, err
    assert "Traceback" not in err
    lines = _only_lines(err)
    assert len(lines) == 1 and "PROXY_CONFIG" in lines[0] and "terminationDrainDuration" in lines[0], lines
    assert not seen_envoy
    assert "Envoy command" not in err
    assert leftovers(agent) == []


def _ready(agent: Agent) -> bool:
    if not admin_ready(agent.ports["admin"]):
        return False
    try:
        return http_get(f"http://127.0.0.1:{agent.ports['status']}/healthz/ready", timeout=1.0)[0] == 200
    except OSError:
        return False


def _stamp(line: str) -> str:
    """The agent's log timestamp (ISO 8601 UTC, fixed width: compares as text)."""
    return line.split("\t", 1)[0]


# Envoy's own first lines, in the order it writes them within milliseconds of its exec (the first two before it
# has parsed the bootstrap, so still in Envoy's default log format).
EARLY_ENVOY_LINES = (
    "initializing epoch 0 (base id=",
    "statically linked extensions:",
    "HTTP header map info:",
    "runtime: layers:",
)


@pytest.mark.envoy
def test_early_envoy_output_is_kept_and_does_not_stall_startup(start_agent: StartAgent) -> None:
    # Debug logging: Envoy writes tens of KiB while it starts, much of it before the supervisor exists to read
    # the pipe (unread, a pipe holds 64 KiB before Envoy's writes block).
    agent = start_agent("--proxyLogLevel", "debug")
    wait_until(lambda: _ready(agent) or agent.proc.poll() is not None, timeout=30)
    assert agent.proc.poll() is None, agent.stderr()[-4000:]
    err = agent.stderr()
    positions = [err.find(marker) for marker in EARLY_ENVOY_LINES]
    assert -1 not in positions and positions == sorted(positions), list(zip(EARLY_ENVOY_LINES, positions, strict=True))
    assert f"initializing epoch 0 (base id={agent.base_id}," in err
    # The takeover: the supervisor adopts epoch 0 (and starts reading its stderr) just before the status server
    # starts. Envoy lines stamped before that were written while nobody read the pipe, and still arrived.
    lines = err.splitlines()
    takeover = next((_stamp(line) for line in lines if "\tstatus server listening on port" in line), None)
    assert takeover is not None, "the status server's start line is missing"
    envoy_lines = [line for line in lines if "\tenvoy " in line]
    assert any(_stamp(line) < takeover for line in envoy_lines), (takeover, envoy_lines[:5])
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait() == ExitCode.OK
    assert leftovers(agent) == []
