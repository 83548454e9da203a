"""Envoy that cannot start, with the real agent and a real Envoy: a fast exit with the reason, not a crash loop.

Before any epoch was ever LIVE, an Envoy exit is judged: a known start-up failure (admin port in use, another Envoy
on the base id, a shared-memory clash) exits 73 with the fix; a bootstrap `envoy --mode validate` rejects exits 78
with Envoy's own words. Before, each of these crash-looped for about 200 s (ten restarts with backoff) and exited 70.
A customConfigFile in YAML is handed to Envoy with its own extension, so Envoy parses it as YAML.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from agent.errors import ExitCode
from agent.proxy.shm import shm_path
from tests.supervisor.agent_process import Agent, StartAgent, leftovers, only_lines, ready
from tests.support.envoy import admin_ready, envoy_binary, free_port, new_base_id, running_envoy, wait_until

pytestmark = [pytest.mark.envoy]

# The judgement takes Envoy's failed start (~0.1 s) and, for a bootstrap, one validation (~0.1 s); a crash loop
# would take minutes. Generous for a loaded 2-core machine.
FAST = 10.0


def exit_of(agent: Agent) -> tuple[int, float, str]:
    started = time.monotonic()
    code = agent.wait(timeout=60)
    return code, time.monotonic() - started, agent.stderr()


def assert_one_envoy_start_and_no_leftovers(agent: Agent, err: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert err.count("Envoy epoch 0 (pid") == 1, err[-3000:]  # one start, its exit: no restart
    assert leftovers(agent) == []


def test_a_bootstrap_envoy_rejects_exits_78_at_once_with_envoys_words(start_agent: StartAgent) -> None:
    """customConfigFile is Envoy's to judge (the agent passes it as it is)."""

    def bad_bootstrap(work: Path) -> None:
        (work / "custom.json").write_text('{"admin": {"address": {"socket_address": {"port_value": "x"}}}}')

    agent = start_agent(proxy_config={"customConfigFile": "custom.json"}, prepare=bad_bootstrap)
    code, took, err = exit_of(agent)
    assert code == ExitCode.CONFIG_ERROR, err[-3000:]
    assert took < FAST, took
    last = only_lines(err)[-1]
    # Envoy varies the spaces in its protobuf errors on purpose: match the words.
    assert "Envoy rejected its configuration: " in last and re.search(r"invalid\s+number", last), last
    assert_one_envoy_start_and_no_leftovers(agent, err)
    assert re.search(r"invalid\s+number", (agent.stderr_path.parent / "termination-log").read_text())


def test_a_command_line_envoy_rejects_exits_78(start_agent: StartAgent) -> None:
    """Validation runs Envoy's real command line: the ISTIO_BOOTSTRAP_OVERRIDE Envoy gets as --config-yaml is Envoy's
    to judge (the agent only turns the file into JSON)."""

    def bad_override(work: Path) -> None:
        (work / "override.yaml").write_text("node:\n  id: [not, a, string]\n")

    agent = start_agent(prepare=bad_override, ISTIO_BOOTSTRAP_OVERRIDE="override.yaml")
    code, took, err = exit_of(agent)
    assert code == ExitCode.CONFIG_ERROR, err[-3000:]
    assert took < FAST, took
    last = only_lines(err)[-1]
    assert "Envoy rejected its configuration: " in last and "node.id" in last, last
    assert "Traceback" not in err and leftovers(agent) == []


def test_admin_port_in_use_exits_73_naming_proxy_admin_port(start_agent: StartAgent) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        agent = start_agent(proxy_config={"proxyAdminPort": port})
        code, took, err = exit_of(agent)
    assert code == ExitCode.STARTUP_FAILED, err[-3000:]
    assert took < FAST, took
    last = only_lines(err)[-1]
    assert f"its admin port 127.0.0.1:{port} is already in use" in last and "proxyAdminPort" in last, last
    # Found before Envoy's exec: no Envoy started, so none of its errors to print.
    assert "Envoy command" not in err and "Traceback" not in err, err[-3000:]
    assert leftovers(agent) == []


def first_agent_up(start_agent: StartAgent) -> Agent:
    """The first of two agents on one host, up and serving. The second gets its own base id and status ports
    (start_agent's) but the first one's proxyAdminPort, as a user who moved only the status ports."""
    first = start_agent()
    wait_until(lambda: ready(first) or first.proc.poll() is not None, timeout=30)
    assert ready(first), first.stderr()[-3000:]
    return first


def assert_the_first_agent_still_serves(first: Agent) -> None:
    assert first.proc.poll() is None and ready(first), first.stderr()[-3000:]
    assert "Traceback" not in first.stderr()


def test_a_second_agent_on_the_same_admin_port_exits_73_before_starting_envoy(start_agent: StartAgent) -> None:
    """Its admin client would reach the first agent's Envoy: found before the exec (the port is taken)."""
    first = first_agent_up(start_agent)
    port = first.ports["admin"]
    second = start_agent(proxy_config={"proxyAdminPort": port})
    code, took, err = exit_of(second)
    assert code == ExitCode.STARTUP_FAILED, err[-3000:]
    assert took < FAST, took
    last = only_lines(err)[-1]
    assert f"its admin port 127.0.0.1:{port} is already in use" in last and "proxyAdminPort" in last, last
    assert "Envoy command" not in err and "Traceback" not in err and "is LIVE" not in err, err[-3000:]
    assert leftovers(second) == []
    assert_the_first_agent_still_serves(first)


def test_a_second_agent_on_the_same_readiness_or_prometheus_port_exits_73_before_starting_envoy(
    start_agent: StartAgent,
) -> None:
    """A user who moved the status port, the admin port and the base id but not ENVOY_STATUS_PORT (then not
    ENVOY_PROMETHEUS_PORT): Envoy binds its listeners with SO_REUSEPORT, so the second Envoy would start and share
    the first one's 0.0.0.0:15021 (probes answering for either agent). Found before the exec: one line naming the
    setting, no Envoy started, the first agent untouched."""
    first = first_agent_up(start_agent)
    clashes = [
        ("ENVOY_STATUS_PORT", first.ports["envoy_status"], free_port(), "readiness listener"),
        ("ENVOY_PROMETHEUS_PORT", free_port(), first.ports["prom"], "Prometheus listener"),
    ]
    for setting, status, prom, what in clashes:
        port = status if setting == "ENVOY_STATUS_PORT" else prom
        second = start_agent(ENVOY_STATUS_PORT=str(status), ENVOY_PROMETHEUS_PORT=str(prom))
        code, took, err = exit_of(second)
        assert code == ExitCode.STARTUP_FAILED, err[-3000:]
        assert took < FAST, took
        last = only_lines(err)[-1]
        assert f"its {what} 0.0.0.0:{port} is already in use on this host" in last, last
        assert f"set {setting} to a free port (e.g. {setting}=" in last, last
        assert "Envoy command" not in err and "Traceback" not in err, err[-3000:]
        assert leftovers(second) == []
    assert_the_first_agent_still_serves(first)


def test_another_envoys_live_answer_on_the_admin_port_is_not_taken_for_ours(start_agent: StartAgent) -> None:
    """When the check before the exec cannot see the clash (a customConfigFile: its admin port is Envoy's to bind),
    the second agent's Envoy starts, and the first one's Envoy answers LIVE on the shared admin port. That answer is
    not our epoch 0 going LIVE: our Envoy's failure to bind the port is the start-up failure it is (exit 73 with the
    fix, Envoy's error printed once), not a crash after LIVE and a crash loop.

    Envoy binds its admin port about 0.1 s after its exec, usually before the agent's first poll; under load it may
    be later, as it was when this was found. To make that order certain, Envoy is exec'd (by a shell wrapper as
    binaryPath) only once the agent has logged what it made of the first answer on the admin port."""
    first = first_agent_up(start_agent)
    port = first.ports["admin"]

    def prepare(work: Path) -> None:
        address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
        (work / "custom.json").write_text(json.dumps({"admin": {"address": address}}))
        wrapper = work / "envoy"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"while ! grep -q 'answers LIVE\\|is LIVE' {work / 'stderr'}; do sleep 0.01; done\n"
            f'exec {envoy_binary()} "$@"\n'
        )
        wrapper.chmod(0o755)

    config = {"proxyAdminPort": port, "customConfigFile": "custom.json", "binaryPath": "./envoy"}
    second = start_agent(proxy_config=config, prepare=prepare)
    code, took, err = exit_of(second)
    assert code == ExitCode.STARTUP_FAILED, err[-3000:]
    assert took < FAST, took
    last = only_lines(err)[-1]
    assert f"its admin port 127.0.0.1:{port} is already in use" in last and "proxyAdminPort" in last, last
    assert "another process answers LIVE on Envoy's admin port, not Envoy epoch 0" in err, err[-3000:]
    assert "is LIVE" not in err and "restarting Envoy" not in err, err[-3000:]
    assert err.count(f"cannot bind '127.0.0.1:{port}'") == 1, err[-3000:]
    assert_one_envoy_start_and_no_leftovers(second, err)
    assert_the_first_agent_still_serves(first)


def test_another_envoy_on_the_base_id_exits_73_naming_envoy_base_id(start_agent: StartAgent, tmp_path: Path) -> None:
    other_admin = free_port()
    other = tmp_path / "other.yaml"
    other.write_text(f"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {other_admin}}}}}}}\n")
    base_id = new_base_id()
    with running_envoy(other, other_admin, base_id=base_id) as envoy:
        agent = start_agent(ENVOY_BASE_ID=str(base_id))
        code, took, err = exit_of(agent)
        assert code == ExitCode.STARTUP_FAILED, err[-3000:]
        assert took < FAST, took
        last = only_lines(err)[-1]
        assert f"another Envoy on this host already runs with base id {base_id}" in last, last
        assert "ENVOY_BASE_ID" in last
        # The other Envoy's shared memory is not ours to remove.
        assert shm_path(base_id).exists()
        assert envoy.poll() is None
    assert "Traceback" not in err and err.count("Envoy epoch 0 (pid") == 1


def test_a_shared_memory_clash_exits_73_naming_envoy_base_id(start_agent: StartAgent) -> None:
    """As root nothing is refused for permissions, so a directory stands in for another user's segment: Envoy
    fails to open it with the same message (`cannot open shared memory region ... check user permissions`)."""
    base_id = new_base_id()
    segment = shm_path(base_id)
    segment.mkdir()
    try:
        agent = start_agent(ENVOY_BASE_ID=str(base_id))
        code, took, err = exit_of(agent)
        assert code == ExitCode.STARTUP_FAILED, err[-3000:]
        assert took < FAST, took
        last = only_lines(err)[-1]
        assert "cannot open its hot-restart shared memory" in last and "ENVOY_BASE_ID" in last, last
        assert segment.is_dir()  # not ours: left as it was
        assert "Traceback" not in err and err.count("Envoy epoch 0 (pid") == 1
        assert not list(agent.config_dir.glob("envoy-rev*"))
    finally:
        segment.rmdir()


def test_a_yaml_custom_config_file_starts(start_agent: StartAgent) -> None:
    """Envoy picks its parser by the file's extension: the copy keeps the user's `.yaml` (block style, not JSON)."""
    admin = free_port()

    def yaml_bootstrap(work: Path) -> None:
        (work / "custom.yaml").write_text(
            f"admin:\n  address:\n    socket_address:\n      address: 127.0.0.1\n      port_value: {admin}\n"
        )

    agent = start_agent(proxy_config={"customConfigFile": "custom.yaml"}, prepare=yaml_bootstrap)
    wait_until(lambda: admin_ready(admin) or agent.proc.poll() is not None, timeout=30)
    assert agent.proc.poll() is None, agent.stderr()[-3000:]
    assert [p.name for p in agent.config_dir.glob("envoy-rev*")] == ["envoy-rev0.yaml"]
