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

import signal
import socket
import time

import psutil
import pytest

from agent.errors import ExitCode
from tests.supervisor.agent_process import (
    StartAgent,
    leftovers,
    only_lines,
    ready,
    wait_for_envoy,
    watch_for_envoy_until_exit,
)
from tests.support.envoy import free_port, wait_until


# Each moment once, the two signals alternating: SIGTERM and SIGINT take the same path (request_shutdown) from the
# same early handlers, so the moments, not the signal, are what varies the outcome.
@pytest.mark.envoy
@pytest.mark.parametrize(
    ("sig", "delay"),
    [(signal.SIGTERM, 0.0), (signal.SIGINT, 0.03), (signal.SIGTERM, 0.1), (signal.SIGINT, 0.25)],
    ids=["SIGTERM-0ms", "SIGINT-30ms", "SIGTERM-100ms", "SIGINT-250ms"],
)
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
    lines = only_lines(err)
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
    lines = only_lines(err)
    assert len(lines) == 1 and "PROXY_CONFIG" in lines[0] and "terminationDrainDuration" in lines[0], lines
    assert not seen_envoy
    assert "Envoy command" not in err
    assert leftovers(agent) == []


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
    wait_until(lambda: ready(agent) or agent.proc.poll() is not None, timeout=30)
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
