"""The agent's own metrics under Istio's names, read from Istio's declarations at the pinned version.

Istio declares each metric of its agent once (`monitoring.NewSum("xds_proxy_requests", ...)`), and its exporter
writes it as `istio_agent_` + that name exactly: no `_total` added to a counter, none removed. Every family this agent
can expose whose name is one of those, give or take `_total`, must have Istio's exact name and type; a family only
this agent has follows Prometheus' conventions (a counter ends in `_total`) and says "not in Istio" in the
reference. The running agents are compared in test_status_differential.py (side by side, no istiod) and
tests/dns/test_mesh_dns.py (a pod joined to a real istiod, DNS capture on).
"""

from __future__ import annotations

import re

import pytest

from tests.support.agent_metrics import declared_families
from tests.support.istio import istio_source
from tests.test_docs import reference_table

pytestmark = pytest.mark.istio

# The packages of Istio's pilot-agent that declare metrics (its agent registry: pilot-agent/status/server.go).
DECLARING_FILES = (
    "pilot/cmd/pilot-agent/metrics/metrics.go",
    "pkg/istio-agent/metrics/metrics.go",
    "pkg/dns/client/monitoring.go",
    "security/pkg/nodeagent/cache/monitoring.go",
    "security/pkg/monitoring/monitoring.go",
    "pkg/wasm/monitoring.go",
)
_DECLARATION = re.compile(r'monitoring\.New(Sum|Gauge|DerivedGauge|Distribution)\(\s*"([a-z0-9_]+)"')
_TYPES = {"Sum": "counter", "Gauge": "gauge", "DerivedGauge": "gauge", "Distribution": "histogram"}


def istio_families() -> dict[str, str]:
    """Istio's agent's declared metrics: exposed name -> type."""
    found = {}
    for relative in DECLARING_FILES:
        for kind, name in _DECLARATION.findall(istio_source(relative).read_text()):
            found["istio_agent_" + name] = _TYPES[kind]
    return found


def _base(name: str) -> str:
    return name.removesuffix("_total")


def test_istios_declarations_are_found() -> None:
    """The parse reads what it should: a change in Istio's declaration style must fail here, not pass vacuously."""
    istio = istio_families()
    assert istio["istio_agent_xds_proxy_requests"] == "counter"
    assert istio["istio_agent_scrapes_total"] == "counter"
    assert istio["istio_agent_dns_upstream_request_duration_seconds"] == "histogram"
    assert istio["istio_agent_cert_expiry_seconds"] == "gauge"
    assert len(istio) >= 20


def test_every_metric_istio_has_is_exposed_under_istios_name_and_type() -> None:
    istio = istio_families()
    by_base = {_base(name): name for name in istio}
    ours = declared_families()
    shared = {name: by_base[_base(name)] for name in ours if _base(name) in by_base}
    assert {name: (ours[name]) for name in shared} == {name: istio[istios] for name, istios in shared.items()}
    assert {name: name for name in shared} == shared, "names that differ from Istio's only by `_total`"
    # What a drop-in must have (the agent implements these parts of Istio's agent).
    assert {
        "istio_agent_scrapes_total",
        "istio_agent_scrape_failures_total",
        "istio_agent_startup_duration_seconds",
        "istio_agent_xds_proxy_requests",
        "istio_agent_xds_proxy_responses",
        "istio_agent_istiod_connection_failures",
        "istio_agent_istiod_connection_terminations",
        "istio_agent_envoy_connection_terminations",
        "istio_agent_num_outgoing_requests",
        "istio_agent_num_failed_outgoing_requests",
        "istio_agent_num_outgoing_retries",
        "istio_agent_outgoing_latency",
        "istio_agent_num_file_secret_failures_total",
        "istio_agent_cert_expiry_seconds",
        "istio_agent_dns_requests_total",
        "istio_agent_dns_upstream_requests_total",
        "istio_agent_dns_upstream_failures_total",
        "istio_agent_dns_upstream_request_duration_seconds",
    } <= set(shared)


def test_metrics_only_this_agent_has_follow_prometheus_conventions_and_say_so() -> None:
    istio_bases = {_base(name) for name in istio_families()}
    own = {
        name: kind
        for name, kind in declared_families().items()
        if _base(name) not in istio_bases and not name.startswith("istio_agent_process_")
    }
    assert {name for name, kind in own.items() if kind == "counter" and not name.endswith("_total")} == set()
    marked = {re.findall(r"`([^`]+)`", row[0])[0] for row in reference_table("Metrics") if "(not in Istio)" in row[3]}
    assert marked == set(own)
