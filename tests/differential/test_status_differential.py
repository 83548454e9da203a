"""The status port: Istio's agent and ours, on the same Envoy configuration and the same application, answer alike.

Both agents run at once (tests/support/side_by_side.py: two rigs, one application exporter), each `proxy sidecar` with
the wheel's Envoy and no istiod. Compared: readiness once started, after a drain and when Envoy dies; the families
and samples of the merged `/stats/prometheus` (apart from each agent's own `istio_agent_*` metrics); and the answers
to the rewritten application probes, for application answers drawn by hypothesis.

Deliberate difference (docs/testing.md): when Envoy dies, Istio's agent exits (kubelet restarts the container); ours
restarts Envoy with backoff. Both stop reporting ready at once, which is what kubelet relies on.
"""

from __future__ import annotations

import contextlib
import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.differential.budget import differential
from tests.support.side_by_side import (
    KINDS,
    PROBES,
    AppExporter,
    RunningAgent,
    SideBySideRig,
    probe_name,
    running_agent,
)

pytestmark = [pytest.mark.istio, pytest.mark.envoy]


@pytest.fixture(scope="module")
def exporter() -> Iterator[AppExporter]:
    app = AppExporter()
    yield app
    app.close()


@contextlib.contextmanager
def both_agents(work: Path, exporter: AppExporter) -> Iterator[dict[str, RunningAgent]]:
    with contextlib.ExitStack() as stack:
        agents = {}
        for kind in KINDS:
            (work / kind).mkdir(parents=True)
            agents[kind] = stack.enter_context(running_agent(kind, SideBySideRig(work / kind, exporter)))
        for agent in agents.values():
            agent.wait("ready")
        yield agents


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory, exporter: AppExporter) -> Iterator[dict[str, RunningAgent]]:
    with both_agents(tmp_path_factory.mktemp("status-diff"), exporter) as running:
        yield running


# Deliberate: this agent runs Envoy with hot restart (epochs), Istio's with --disable-hot-restart, so only ours has
# Envoy's hot-restart generation gauge.
HOT_RESTART_ONLY = {"envoy_server_hot_restart_generation"}


def families(text: str) -> dict[str, set[tuple[str, tuple[tuple[str, str], ...]]]]:
    """Family name -> its samples' (name, labels), without the agents' own metrics."""
    found: dict[str, set[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("istio_agent_") or family.name in HOT_RESTART_ONLY:
            continue
        found[family.name] = {(s.name, tuple(sorted(s.labels.items()))) for s in family.samples}
    return found


def test_both_ready_with_the_same_answer(agents: dict[str, RunningAgent]) -> None:
    answers = {kind: agent.status_get("/healthz/ready") for kind, agent in agents.items()}
    assert answers["istio"][0] == answers["python"][0] == 200


def test_merged_metrics_have_the_same_families_and_samples(agents: dict[str, RunningAgent]) -> None:
    scraped = {kind: families(agent.status_get("/stats/prometheus")[1]) for kind, agent in agents.items()}
    istio, ours = scraped["istio"], scraped["python"]
    # The application's families, sample for sample.
    for name in ("app_requests", "app_queue_depth"):
        assert istio[name] == ours[name], name
    # Envoy's: the same families; a sample Envoy creates lazily (a stat first touched by a scrape) may be absent on
    # one side, so samples are compared on the families both have, by name and labels.
    assert set(istio) == set(ours)
    differing = {name for name in istio if istio[name] != ours[name]}
    assert not differing, {name: istio[name] ^ ours[name] for name in differing}


@differential(default_examples=40)
@given(probe=st.sampled_from(PROBES), answer=st.sampled_from([200, 201, 204, 301, 302, 400, 403, 404, 500, 503]))
def test_rewritten_app_probes_answer_alike(
    agents: dict[str, RunningAgent], exporter: AppExporter, probe: str, answer: int
) -> None:
    exporter.answers[probe_name(probe)] = answer
    try:
        codes = {kind: agent.status_code(f"/app-health/{probe}") for kind, agent in agents.items()}
    finally:
        exporter.answers.pop(probe_name(probe), None)
    assert codes["istio"] == codes["python"], (probe, answer, codes)


def test_unknown_probe_paths_answer_alike(agents: dict[str, RunningAgent]) -> None:
    codes = {kind: agent.status_code("/app-health/nothere/readyz") for kind, agent in agents.items()}
    assert codes["istio"] == codes["python"], codes


def _post(agent: RunningAgent, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", agent.rig.ports["status"], timeout=5)
    try:
        conn.request("POST", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _first_not_ready(agent: RunningAgent, timeout: float = 10.0) -> int | None:
    """The first readiness answer that is not 200 (None: no answer at all), polled every 10 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = agent.status_code("/healthz/ready", 0.5)
        if code != 200:
            return code
        time.sleep(0.01)
    return 200


def test_drain_and_envoy_death_end_readiness_in_both(tmp_path: Path, exporter: AppExporter) -> None:
    with both_agents(tmp_path, exporter) as running:
        drained = {kind: _post(agent, "/drain") for kind, agent in running.items()}
        assert drained["istio"] == drained["python"] == 200
        after_drain = {kind: agent.status_code("/healthz/ready") for kind, agent in running.items()}
        assert after_drain["istio"] == after_drain["python"], after_drain
    with both_agents(tmp_path / "crash", exporter) as running:
        for agent in running.values():
            agent.envoy().kill()
        not_ready = {kind: _first_not_ready(agent) for kind, agent in running.items()}
        # Istio's agent exits with its Envoy (no answer); ours says 503 while it restarts Envoy.
        assert not_ready["istio"] in (None, 503)
        assert not_ready["python"] == 503
