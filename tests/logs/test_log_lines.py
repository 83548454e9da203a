"""One log vocabulary: the agent's lines and Envoy's share shape and level names and come out in order; a start says
what runs; a routine start and stop warn about nothing; debug shows the agent's decisions, not library noise."""

from __future__ import annotations

import datetime as dt
import logging
import signal
from collections.abc import Iterator

import pytest

from agent.logs import IstioJsonFormatter, IstioTextFormatter, configure
from agent.versions import ISTIO_MODULE_VERSION
from tests.supervisor.agent_process import StartAgent
from tests.support.envoy import http_get, wait_until

LEVELS = {"trace", "debug", "info", "warning", "error", "critical"}  # Envoy's names (spdlog)


def _record(level: int) -> logging.LogRecord:
    return logging.LogRecord("agent.proxy", level, __file__, 1, "hello", None, None)


def test_the_agent_uses_envoys_level_names() -> None:
    assert IstioTextFormatter().format(_record(logging.WARNING)).split("\t")[1:] == ["warning", "proxy", "hello"]
    assert '"level": "warning"' in IstioJsonFormatter().format(_record(logging.WARNING))
    assert IstioTextFormatter().format(_record(logging.CRITICAL)).split("\t")[1] == "critical"


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root, agent = logging.getLogger(), logging.getLogger("agent")
    saved = root.handlers[:], root.level, agent.level
    yield
    root.handlers[:], _, _ = saved
    root.setLevel(saved[1])
    agent.setLevel(saved[2])


@pytest.mark.usefixtures("restored_logging")
def test_default_debug_is_the_agents_debug_not_the_libraries() -> None:
    configure("default:debug")
    assert logging.getLogger("agent.status").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("asyncio").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("watchdog.observers.inotify_buffer").isEnabledFor(logging.DEBUG)
    configure("default:warn")
    assert not logging.getLogger("agent.status").isEnabledFor(logging.INFO)
    assert not logging.getLogger("aiohttp.client").isEnabledFor(logging.INFO)


def _time(line: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(line.split("\t", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None  # a continuation line (Envoy's multi-line messages)


@pytest.mark.envoy
def test_a_local_run_logs_what_runs_envoys_lines_in_order_and_no_warning_for_a_routine_stop(
    start_agent: StartAgent,
) -> None:
    # Envoy at info: it writes dozens of lines while the agent is still importing its own parts.
    agent = start_agent("--proxyLogLevel", "info")
    wait_until(lambda: http_get(f"http://127.0.0.1:{agent.ports['status']}/healthz/ready")[0] == 200)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait() == 0
    lines = [line for line in agent.stderr().splitlines() if _time(line) is not None]

    startup = [line for line in lines if "\tcli\tpilot-agent " in line]
    assert len(startup) == 1, lines
    assert f"follows Istio istio.io/istio@{ISTIO_MODULE_VERSION}" in startup[0]
    assert "Envoy 1.40." in startup[0] and f"admin {agent.ports['admin']}" in startup[0]

    assert {line.split("\t")[1] for line in lines} <= LEVELS
    envoy_lines = [line for line in lines if line.split("\t")[2].startswith("envoy ")]
    assert len(envoy_lines) > 10
    # In order: no line is printed after a line stamped more than 0.25 s later (Envoy's start-up lines used to
    # wait for the agent's imports, up to seconds, behind lines stamped after them).
    latest = dt.datetime(2000, 1, 1)
    for line in lines:
        stamp = _time(line)
        assert stamp is not None and stamp >= latest - dt.timedelta(seconds=0.25), line
        latest = max(latest, stamp)

    agents_own = [line for line in lines if not line.split("\t")[2].startswith("envoy ")]
    assert [line for line in agents_own if line.split("\t")[1] != "info"] == []  # no missing-directory warnings
