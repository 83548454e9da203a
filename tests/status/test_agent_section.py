"""The agent's own section of the merged scrape: Istio's names (no `_total` added, no `_created`), valid text and
OpenMetrics, numbers as Go writes them, and the same claims the merge's filter would make for those lines."""

from __future__ import annotations

import math
import subprocess

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AgentMetrics, UnsuffixedCounter
from agent.status.agent_section import AgentSection, go_float
from agent.status.exposition import FamilyFilter

# strconv.FormatFloat(v, 'g', -1, 64) of each value, as Go 1.26 printed them (client_golang's text encoder).
GO_FORMATTED = [
    (0.0, "0"), (-0.0, "-0"), (1.0, "1"), (-1.0, "-1"), (2.5, "2.5"), (0.001, "0.001"), (0.005, "0.005"),
    (0.1, "0.1"), (12.0, "12"), (20000.0, "20000"), (999999.0, "999999"), (1e6, "1e+06"), (1234567.0, "1.234567e+06"),
    (1929003008.0, "1.929003008e+09"), (9.223372036854776e18, "9.223372036854776e+18"), (0.0001, "0.0001"),
    (1e-05, "1e-05"), (1.5e-07, "1.5e-07"), (0.589047002, "0.589047002"),
    (1796195993.6734953, "1.7961959936734953e+09"),
    (1e21, "1e+21"), (1e100, "1e+100"), (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
    (123.456, "123.456"), (-0.25, "-0.25"), (1 / 3, "0.3333333333333333"), (47944001763.0, "4.7944001763e+10"),
    (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN"),
]  # fmt: skip


def test_numbers_are_written_as_go_writes_them() -> None:
    assert [go_float(value) for value, _ in GO_FORMATTED] == [text for _, text in GO_FORMATTED]


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_read_back_exactly(value: float) -> None:
    assert float(go_float(value)) == value


def sample_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    UnsuffixedCounter("istio_agent_xds_proxy_requests", "Istio's name has no _total.", registry=registry).inc(3)
    terminations = UnsuffixedCounter("istio_agent_conn_terms", "Labelled.", ["type"], registry=registry)
    terminations.labels("error").inc()
    Counter("istio_agent_scrapes_total", "Istio's name has _total.", registry=registry).inc(2)
    Counter("istio_agent_never", "A labelled family with no child yet.", ["why"], registry=registry)
    Gauge("istio_agent_cert_expiry_seconds", 'Quote " backslash \\ newline \n.', ["resource_name"], registry=registry)
    Gauge("istio_agent_cert_expiry_seconds_x", "A gauge.", registry=registry).set(1929003008)
    Histogram("istio_agent_dns_seconds", "A histogram.", buckets=(0.005, 1.0), registry=registry).observe(0.5)
    return registry


def test_text_has_istios_names_and_no_created_series() -> None:
    registry = sample_registry()
    registry_gauge = next(m for m in registry.collect() if m.name == "istio_agent_cert_expiry_seconds")
    assert registry_gauge.samples == []
    body, _ = AgentSection(registry).encode(openmetrics=False)
    text = body.decode()
    assert "_created" not in text
    assert "istio_agent_never" not in text  # promhttp writes no family without samples
    lines = text.splitlines()
    assert "# TYPE istio_agent_xds_proxy_requests counter" in lines
    assert "istio_agent_xds_proxy_requests 3" in lines
    assert 'istio_agent_conn_terms{type="error"} 1' in lines
    assert "# TYPE istio_agent_scrapes_total counter" in lines and "istio_agent_scrapes_total 2" in lines
    assert "istio_agent_cert_expiry_seconds_x 1.929003008e+09" in lines
    assert 'istio_agent_dns_seconds_bucket{le="0.005"} 0' in lines
    assert 'istio_agent_dns_seconds_bucket{le="1"} 1' in lines
    promtool = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
    assert "error while linting" not in promtool.stderr.decode(), promtool.stderr
    parsed = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert parsed["istio_agent_xds_proxy_requests"] == "counter"


def test_openmetrics_keeps_the_series_names_and_parses() -> None:
    body, _ = AgentSection(sample_registry()).encode(openmetrics=True)
    text = body.decode()
    assert "_created" not in text
    families = {f.name: f for f in om_parse(text + "# EOF\n")}  # type: ignore[no-untyped-call]
    # OpenMetrics wants `_total` on a counter's samples: without it the family is `unknown`, the series unchanged.
    assert families["istio_agent_xds_proxy_requests"].type == "unknown"
    assert [s.name for s in families["istio_agent_xds_proxy_requests"].samples] == ["istio_agent_xds_proxy_requests"]
    assert families["istio_agent_scrapes"].type == "counter"
    assert [s.name for s in families["istio_agent_scrapes"].samples] == ["istio_agent_scrapes_total"]
    assert families["istio_agent_dns_seconds"].type == "histogram"


@given(st.text(st.characters(codec="utf-8"), max_size=20))
def test_label_values_read_back(value: str) -> None:
    registry = CollectorRegistry()
    Gauge("istio_agent_g", "A gauge.", ["resource_name"], registry=registry).labels(value).set(1)
    body, _ = AgentSection(registry).encode(openmetrics=False)
    (family,) = text_string_to_metric_families(body.decode())
    assert family.samples[0].labels == {"resource_name": value}


def test_claims_are_the_merge_filters_claims_for_the_same_lines() -> None:
    """Later sources repeating one of the agent's families are dropped as before: the section claims exactly the
    names exposition.FamilyFilter claims when it reads these lines."""
    metrics = AgentMetrics()
    metrics.scrapes.inc()
    metrics.hot_restarts.labels("done").inc()
    for registry in (sample_registry(), metrics.registry):
        for openmetrics in (False, True):
            body, claims = AgentSection(registry).encode(openmetrics)
            filt = FamilyFilter(frozenset(), openmetrics, validate=False)
            out: list[bytes] = []
            filt.feed(body.split(b"\n"), out)
            filt.finish(out)
            assert claims == filt.new_claims
            assert b"\n".join(out) + b"\n" == body  # and the filter passes them unchanged
