"""`pilot-agent proxy` runs the DNS proxy when asked (a real agent subprocess with a real Envoy, no istiod): it
listens before Envoy starts, answers SERVFAIL and keeps readiness at 503 until a name table arrives, shows
/debug/ndsz, exports its metrics, and fails the start cleanly when its address is taken or a setting is bad.
The table itself comes from istiod over the xDS proxy (tests/dns/test_nds.py, tests/dns/test_mesh_dns.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from agent.dns.service import NOT_READY
from agent.errors import ExitCode
from tests.supervisor.agent_process import Agent, StartAgent, agents, envoys_of, only_lines
from tests.support.envoy import admin_ready, free_port, http_get, wait_until

pytestmark = [pytest.mark.envoy]


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[StartAgent]:
    yield from agents(tmp_path)


def start_with_dns(start_agent: StartAgent, address: str, timeout: str = "5s") -> Agent:
    # The agent under test is a gateway ("router"): ISTIO_META_ENABLE_DNS_SERVER turns the proxy on for any type.
    return start_agent(ISTIO_META_ENABLE_DNS_SERVER="true", DNS_PROXY_ADDR=address, DNS_FORWARD_TIMEOUT=timeout)


def test_dns_proxy_runs_with_the_agent_and_waits_for_the_name_table(start_agent: StartAgent) -> None:
    port = free_port()
    agent = start_with_dns(start_agent, f"127.0.0.1:{port}")
    status = f"http://127.0.0.1:{agent.ports['status']}"
    wait_until(lambda: admin_ready(agent.ports["admin"]), timeout=30)
    query = dns.message.make_query("www.example.com.", "A")
    for ask in (dns.query.udp, dns.query.tcp):
        answer = ask(query, "127.0.0.1", port=port, timeout=5)
        assert answer.rcode() == dns.rcode.SERVFAIL  # no name table: Istio answers SERVFAIL, forwards nothing
    code, body = http_get(status + "/healthz/ready")
    assert (code, body.decode().strip()) == (503, NOT_READY)  # Envoy is LIVE; the name table is what is missing
    assert http_get(status + "/debug/ndsz") == (404, b"{}")
    _, metrics = http_get(status + "/stats/prometheus")
    assert b"istio_agent_dns_requests_total 2" in metrics
    agent.proc.terminate()
    assert agent.wait() == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))  # released


def test_dns_address_in_use_stops_the_start_before_envoy(start_agent: StartAgent) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        agent = start_with_dns(start_agent, f"127.0.0.1:{port}")
        assert agent.wait() == ExitCode.STARTUP_FAILED
    last = only_lines(agent.stderr())[-1]
    assert last.endswith(f"dns proxy: cannot listen on 127.0.0.1:{port}: address already in use")
    assert envoys_of(agent.base_id) == []


@pytest.mark.parametrize(
    ("address", "timeout", "named"),
    [("127.0.0.1:0", "soon", "env DNS_FORWARD_TIMEOUT"), ("nowhere", "5s", "env DNS_PROXY_ADDR")],
)
def test_bad_dns_setting_is_a_config_error(start_agent: StartAgent, address: str, timeout: str, named: str) -> None:
    agent = start_with_dns(start_agent, address, timeout)
    assert agent.wait() == ExitCode.CONFIG_ERROR
    assert named in only_lines(agent.stderr())[-1]
    assert envoys_of(agent.base_id) == []
