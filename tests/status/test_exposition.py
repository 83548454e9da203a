"""The pure parts of the merge: Accept negotiation, output format, and the family filter's guarantees."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_om
from prometheus_client.parser import text_string_to_metric_families

from agent.status.exposition import (
    OPENMETRICS_0,
    OPENMETRICS_1,
    TEXT_ACCEPT,
    TEXT_CONTENT_TYPE,
    FamilyFilter,
    SourceGarbage,
    negotiate,
    output_content_type,
)


@pytest.mark.parametrize(
    ("accept", "app_accept", "openmetrics"),
    [
        (None, TEXT_ACCEPT, False),
        ("", TEXT_ACCEPT, False),
        ("application/json", TEXT_ACCEPT, False),
        ("*/*", "text/plain;version=0.0.4;q=1", False),
        ("application/*;q=0.5", "application/openmetrics-text;version=0.0.1;q=0.5", True),
        (
            "text/plain;version=0.0.4;q=0.3,application/openmetrics-text;version=1.0.0",
            "application/openmetrics-text;version=1.0.0;q=1,text/plain;version=0.0.4;q=0.3",
            True,
        ),
        ("application/openmetrics-text;q=0, text/plain", "text/plain;q=1", False),
        ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily", TEXT_ACCEPT, False),
    ],
)
def test_negotiate(accept: str | None, app_accept: str, openmetrics: bool) -> None:
    negotiated = negotiate(accept)
    assert negotiated.app_accept == app_accept
    assert negotiated.wants_openmetrics is openmetrics


def test_output_content_type_follows_istio() -> None:
    om = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    assert output_content_type([]) == TEXT_CONTENT_TYPE
    assert output_content_type([None]) == TEXT_CONTENT_TYPE
    assert output_content_type([om]) == OPENMETRICS_1
    assert output_content_type(["application/openmetrics-text; version=0.0.1"]) == OPENMETRICS_0
    assert output_content_type([None, om]) == OPENMETRICS_1
    assert output_content_type([om, "text/plain; version=0.0.4"]) == TEXT_CONTENT_TYPE


def run_filter(sources: list[bytes], openmetrics: bool) -> bytes:
    claimed: set[bytes] = set()
    out: list[bytes] = []
    for index, body in enumerate(sources):
        filt = FamilyFilter(frozenset(claimed), openmetrics, record=index < len(sources) - 1)
        filt.feed(body.split(b"\n"), out)
        filt.finish(out)
        claimed |= filt.new_claims
    if openmetrics:
        out.append(b"# EOF")
    return b"\n".join(out) + b"\n"


def test_garbage_first_line_raises_and_eof_is_stripped() -> None:
    with pytest.raises(SourceGarbage):
        FamilyFilter(set(), False).feed([b"<html>"], [])
    out: list[bytes] = []
    FamilyFilter(set(), True).feed([b"# TYPE a gauge", b"a 1", b"# EOF", b"# free comment"], out)
    assert out == [b"# TYPE a gauge", b"a 1"]


def test_text_specific_rewrites() -> None:
    om_source = b'# TYPE a unknown\na 1\n# TYPE b info\nb_info{x="y"} 1\n# UNIT c seconds\n# TYPE c gauge\nc 1\n'
    text = run_filter([om_source], openmetrics=False)
    assert text == b'# TYPE a untyped\na 1\nb_info{x="y"} 1\n# TYPE c gauge\nc 1\n'
    assert run_filter([b"# TYPE a untyped\na 1\n"], openmetrics=True) == b"# TYPE a unknown\na 1\n# EOF\n"


NAMES = st.sampled_from(["alpha", "beta", "gamma", "delta", "eps_total", "zeta_count", "eta_info"])
KINDS = st.sampled_from([Counter, Gauge, Histogram, Summary])


def registry_of(families: list[tuple[str, type]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    for name, kind in families:
        try:
            metric = kind(name, "help", registry=registry)
        except ValueError:
            continue  # a clash inside one registry: prometheus_client refuses it, as a real exporter would
        if kind is Gauge:
            metric.set(1)
    return registry


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.tuples(NAMES, KINDS), max_size=6), min_size=1, max_size=3),
    st.booleans(),
)
def test_any_mix_of_real_exporters_merges_into_one_valid_exposition(
    sources: list[list[tuple[str, type]]], openmetrics: bool
) -> None:
    encode = generate_om if openmetrics else generate_latest
    body = run_filter([encode(registry_of(families)) for families in sources], openmetrics)
    types = [line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    list(text_string_to_metric_families(body.decode()))
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
    assert "error while linting" not in result.stderr.decode(), (body, result.stderr)


def test_repeated_metadata_and_late_type_lines_are_dropped() -> None:
    source = (
        b"# HELP a x\n# HELP a y\n# TYPE a gauge\n# TYPE a counter\na 1\n# TYPE b gauge\nb 1\nc 2\n# TYPE c gauge\n"
    )
    body = run_filter([source], openmetrics=False)
    assert body == b"# HELP a x\n# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\nc 2\n"
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
    assert "error while linting" not in result.stderr.decode()


JUNK = st.one_of(
    st.text(max_size=40).map(lambda s: s.replace("\n", " ").encode()),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
    st.sampled_from(
        [
            b'half{a="b',
            b"# TYPE x bogus",
            b"# TYPE alpha counter",
            b"# HELP bad \\q escape",
            b"x 1 2 3",
            b"y{a=b} 1",
            b"z NaNx",
            b'w{a="\\x"} 1',
            b"v 1 1.5",
            b"u{} 1",
            b"# EOF",
            b't 1 # {trace="1"} 1',
        ]
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(NAMES, KINDS), max_size=5),
    st.lists(st.tuples(st.integers(min_value=1), JUNK), max_size=8),
    st.booleans(),
)
def test_junk_inside_an_application_body_never_reaches_the_output(
    families: list[tuple[str, type]], junk: list[tuple[int, bytes]], openmetrics: bool
) -> None:
    encode = generate_om if openmetrics else generate_latest
    agent = generate_latest(registry_of([("alpha", Gauge)]))
    lines = encode(registry_of(families)).split(b"\n")
    for position, line in junk:
        lines.insert(1 + position % max(len(lines), 1), line)  # after the first line: a garbage FIRST line is
    app = b"\n".join(lines)  # a different rule (the source is left out), tested above
    try:
        body = run_filter([agent, app], openmetrics)
    except SourceGarbage:
        return
    types = [line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    list(text_string_to_metric_families(body.decode()))
    if not openmetrics:  # promtool parses the text format only (OpenMetrics exemplars are not text)
        result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
        assert "error while linting" not in result.stderr.decode(), (body, result.stderr)


def test_a_source_repeating_its_own_family_keeps_the_first() -> None:
    source = b"# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\na 2\nc 1\nd 1\nc 2\n"
    body = run_filter([b"# TYPE z gauge\nz 1\n", source], openmetrics=False)
    assert body == b"# TYPE z gauge\nz 1\n# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\nc 1\nd 1\n"
