"""Every version of a local xDS file gets Envoy's verdict in the agent's log and metrics; readiness names the file.

The real agent and Envoy 1.40 (`pilot-agent proxy --local-xds-dir`); files are replaced the way the docs say (a new
file moved over the old one), except where the test makes the mistake the agent must explain (an in-place edit).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.supervisor.agent_process import Agent, StartAgent, ready, wait_for_envoy
from tests.support.envoy import direct_response_lds, http_get, wait_until

pytestmark = pytest.mark.envoy


def _replace(path: Path, text: str) -> None:
    """Write a new version next to `path` and move it over `path`, as the docs tell users to."""
    new = path.with_name(f".{path.name}.new")
    new.write_text(text)
    os.replace(new, path)


def _loads(agent: Agent) -> dict[tuple[str, str], float]:
    """istio_agent_local_xds_loads_total from the merged metrics on the status port: {(file, result): count}."""
    _, body = http_get(f"http://127.0.0.1:{agent.ports['status']}/stats/prometheus")
    counts = {}
    for line in body.decode().splitlines():
        if line.startswith("istio_agent_local_xds_loads_total{"):
            labels, value = line.rsplit(" ", 1)
            file = labels.split('file="')[1].split('"')[0]
            result = labels.split('result="')[1].split('"')[0]
            counts[(file, result)] = float(value)
    return counts


def _logged(agent: Agent, text: str) -> None:
    wait_until(lambda: text in agent.stderr(), timeout=20)


def test_each_reload_is_reported_with_its_result_and_a_bad_one_leaves_envoy_serving(start_agent: StartAgent) -> None:
    agent = start_agent()
    lds = agent.config_dir.parent / "xds" / "lds.yaml"
    app = f"http://127.0.0.1:{agent.ports['app']}/"
    _logged(agent, f"local xDS: Envoy loaded {lds}")
    wait_until(lambda: http_get(f"http://127.0.0.1:{agent.ports['status']}/healthz/ready")[0] == 200)

    _replace(lds, "resources: [ {broken\n")
    _logged(agent, f"local xDS: {lds} not loaded: {lds}:2: not valid YAML")
    assert "Envoy keeps the listeners it had" in agent.stderr()
    assert _loads(agent)[("lds.yaml", "rejected")] == 1
    assert http_get(app)[0] == 200  # the listener Envoy had still serves
    assert http_get(f"http://127.0.0.1:{agent.ports['status']}/healthz/ready")[0] == 200

    with lds.open("a") as edit:  # the trap: Envoy only reads a version moved into the directory
        edit.write("# edited in place\n")
    _logged(agent, f"local xDS: {lds} changed but Envoy did not reload it")
    assert _loads(agent)[("lds.yaml", "not_reloaded")] == 1

    _replace(lds, direct_response_lds(agent.ports["app"], body="second"))
    _logged(agent, f"local xDS: Envoy reloaded {lds}")
    assert _loads(agent)[("lds.yaml", "accepted")] == 2  # the first load and this one
    wait_until(lambda: http_get(app) == (200, b"second"))

    # A deleted file: Envoy keeps serving; one line says what a restarted Envoy would need, not two.
    cds = lds.with_name("cds.yaml")
    cds.unlink()
    _logged(agent, f"local xDS: {cds} was deleted: Envoy keeps the clusters it had, but a new Envoy")
    assert "put it back" in agent.stderr()
    assert f"watched file {cds} was deleted" not in agent.stderr()
    assert f"watched file {lds} changed" not in agent.stderr()  # the agent's own verdict lines say it
    assert http_get(app) == (200, b"second")


def test_readiness_names_the_file_envoy_rejected_at_start(start_agent: StartAgent) -> None:
    def reject_the_port(work: Path) -> None:
        # Passes the agent's own check (well-formed, named); Envoy refuses it (port out of range).
        (work / "xds" / "lds.yaml").write_text(direct_response_lds(80800))

    agent = start_agent(prepare=reject_the_port)
    lds = agent.config_dir.parent / "xds" / "lds.yaml"
    _logged(agent, f"local xDS: {lds} not loaded: Envoy rejected it")
    assert "Envoy runs without its listeners until a version loads" in agent.stderr()  # it had none to keep
    status, body = http_get(f"http://127.0.0.1:{agent.ports['status']}/healthz/ready")
    assert status == 503
    assert body.decode().startswith(f"local xDS file {lds} not loaded: Envoy rejected it"), body
    assert "Filesystem config update" in body.decode() and "above" not in body.decode(), body  # read with curl
    assert _loads(agent)[("lds.yaml", "rejected")] == 1


def test_a_crash_restart_waits_for_a_deleted_file_and_the_new_envoy_gets_its_own_verdicts(
    start_agent: StartAgent,
) -> None:
    """A file deleted, then Envoy killed: a new Envoy cannot start without the file, so the restart waits for it
    (readiness names it) instead of failing until the restart budget is spent. The file moved back in is no edit in
    place; the new Envoy's load of it is reported, and its next reload judged."""
    agent = start_agent()
    lds = agent.config_dir.parent / "xds" / "lds.yaml"
    cds = lds.with_name("cds.yaml")
    app = f"http://127.0.0.1:{agent.ports['app']}/"
    readiness = f"http://127.0.0.1:{agent.ports['status']}/healthz/ready"
    _logged(agent, f"local xDS: Envoy loaded {cds}")
    wait_until(lambda: ready(agent))

    cds.unlink()
    _logged(agent, f"local xDS: {cds} was deleted")
    os.kill(wait_for_envoy(agent), signal.SIGKILL)
    waiting = f"Envoy is not restarted while local xDS file {cds} is missing (the clusters Envoy loads)"
    _logged(agent, waiting)
    assert http_get(readiness) == (503, f"{waiting}\n".encode())
    assert "does not exist" not in agent.stderr()  # Envoy's own line had it been started without the file
    _replace(cds, "resources: []\n")
    # The new Envoy's load of each file (it read both at its start) is reported, as the first Envoy's was.
    wait_until(lambda: all(agent.stderr().count(f"local xDS: Envoy loaded {f}") == 2 for f in (lds, cds)), timeout=30)
    wait_until(lambda: ready(agent))
    err = agent.stderr()
    assert "did not reload it" not in err and "does not exist" not in err
    assert err.count("a new Envoy would fail at its start") == 1 and err.count("restarting Envoy in") == 1, err[-3000:]
    assert http_get(app)[0] == 200

    _replace(lds, direct_response_lds(80800))  # Envoy refuses it: judged against the new Envoy's counters
    _logged(agent, f"local xDS: {lds} not loaded: Envoy rejected it")
    assert f"local xDS: Envoy reloaded {lds}" not in agent.stderr()
    assert http_get(app)[0] == 200
