"""The merged scrape's output is the same as before the performance work (issue 15: "every change keeps the merged
output valid and equal to today's for the same inputs").

Fixed inputs go through the real status server (Envoy's and the applications' endpoints are static HTTP servers
serving the bodies below), and the merged output, minus the agent's own section (its values move), is compared
by SHA-256 with the output recorded before the merge was optimised (main at 179974b). The inputs exercise what the
fast paths skip: Envoy's ~1,230 families in several 64 KiB chunks, clashes with the agent and with Envoy, invalid
and repeated lines, blank lines, comments, OpenMetrics-only types, untyped samples, escapes; text and
OpenMetrics answers; gzip. A second check merges the same inputs with a scraper's plain Accept and compares the
decoded bodies of a gzip and an identity answer.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from agent.status.settings import ScrapeTarget
from tests.status.conftest import running_agent, settings_for
from tests.support.http_server import QuietHandler, serving_http

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def envoy_body() -> bytes:
    """Envoy's formatter's shape: `# TYPE` then samples, no HELP, counters/gauges/histograms, tags as labels; the
    istio_* families of Istio's stats filter sort after envoy_*."""
    out: list[str] = []
    for i in range(1100):
        name = f"envoy_cluster_stat_{i:04d}"
        kind = ("counter", "gauge")[i % 2]
        out.append(f"# TYPE {name} {kind}\n")
        for c in range(4):
            out.append(f'{name}{{cluster_name="outbound|80||svc-{c}.default.svc.cluster.local"}} {i * c}\n')
    for i in range(120):
        name = f"envoy_http_downstream_rq_time_{i:03d}"
        out.append(f"# TYPE {name} histogram\n")
        for le in ("0.5", "1", "5", "10", "25", "+Inf"):
            out.append(f'{name}_bucket{{http_conn_manager_prefix="inbound_0.0.0.0_8080",le="{le}"}} {i}\n')
        out.append(f'{name}_sum{{http_conn_manager_prefix="inbound_0.0.0.0_8080"}} {i}.5\n')
        out.append(f'{name}_count{{http_conn_manager_prefix="inbound_0.0.0.0_8080"}} {i}\n')
    out.append("# TYPE envoy_server_live gauge\nenvoy_server_live{} 1\n")
    out.append('# TYPE istio_requests_total counter\nistio_requests_total{response_code="200",x="a\\"b"} 7\n')
    out.append("# TYPE istio_agent_scrapes counter\nistio_agent_scrapes{} 99\n")  # clashes with the agent's
    return "".join(out).encode()


def text_app_body() -> bytes:
    out = ["# a free comment\n", "\n"]
    for i in range(100):
        name = f"app_gauge_{i}"
        out.append(f"# HELP {name} A gauge with a \\n newline and a \\\\ backslash.\n# TYPE {name} gauge\n")
        out.extend(f'{name}{{instance="pod-{p}",shard="{p % 7}"}} {p}.25\n' for p in range(100))
    out.append("# TYPE app_requests counter\napp_requests_total 3\napp_requests_created 1.7e9\n")
    out.append("# TYPE envoy_server_live gauge\nenvoy_server_live 7\n")  # Envoy's family: dropped
    out.append("# TYPE istio_agent_scrapes_total counter\nistio_agent_scrapes_total 5\n")  # the agent's: dropped
    out.append('app_untyped_thing 1\napp_untyped_thing{x="y"} 2\n')
    out.append("this is not a sample\napp_gauge_0 1\n")  # an invalid line, then a repeat of an earlier family
    out.append("# TYPE app_late gauge\n\napp_late 1 1700000000000\n# TYPE app_late gauge\n")
    out.append('app_escapes{path="/a\\"b\\\\c"} +Inf\napp_nan NaN\n')
    return "".join(out).encode()


def openmetrics_app_body() -> bytes:
    return (
        b'# TYPE app_info info\napp_info{version="1.2"} 1\n'
        b'# TYPE app_build stateset\napp_build{app_build="a"} 1\n'
        b'# TYPE app_queue gaugehistogram\napp_queue_bucket{le="+Inf"} 3\napp_queue_gcount 3\napp_queue_gsum 4\n'
        b"# TYPE app_seconds counter\n# UNIT app_seconds seconds\n# HELP app_seconds Time.\n"
        b'app_seconds_total 5.5 # {trace_id="abc"} 1.0 1700000000.5\napp_seconds_created 1700000000.25\n'
        b"# TYPE app_thing unknown\napp_thing 1\n"
        b"# TYPE envoy_server_live gauge\nenvoy_server_live 7\n"
        b"# EOF\n"
    )


@contextmanager
def static(body: bytes, content_type: str) -> Iterator[int]:
    class Static(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving_http(Static) as port:
        yield port


def without_agent_section(body: bytes) -> bytes:
    """The merged output minus the agent's own lines (its counters and process metrics move between runs)."""
    own = (b"istio_agent_", b"# HELP istio_agent_", b"# TYPE istio_agent_", b"# UNIT istio_agent_")
    return b"\n".join(line for line in body.split(b"\n") if not line.startswith(own))


SCENARIOS = {
    # name: (applications, Accept, gzip) -> SHA-256 of the output without the agent's section, recorded at 179974b
    "envoy-text-gzip": ((), "text/plain", True),
    "envoy-prometheus-gzip": ((), PROMETHEUS_ACCEPT, True),
    "envoy-text-app-prometheus": ((("text",),), PROMETHEUS_ACCEPT, True),
    "envoy-openmetrics-app": ((("openmetrics",),), PROMETHEUS_ACCEPT, False),
    "envoy-both-apps": ((("text",), ("openmetrics",)), PROMETHEUS_ACCEPT, True),
    "envoy-two-text-apps-plain": ((("text",), ("text",)), "text/plain", False),
}
RECORDED = {
    "envoy-text-gzip": "a58bc276deb8a576134f9b606a6bcf91050533c859be7f9ec05443fed0783435",
    "envoy-prometheus-gzip": "a58bc276deb8a576134f9b606a6bcf91050533c859be7f9ec05443fed0783435",
    "envoy-text-app-prometheus": "5ea1a924a3e22e45fd4e94a2445cdf48fcd76d68c3276163ad35ab851cd9354b",
    "envoy-openmetrics-app": "9a9b69b6d64a01ba9875465c856fbb98c538e0d2c8cc5b690e35e5b5edf5af3f",
    "envoy-both-apps": "15d234647949255c215934f7152aee4769d266f944f4e2c6f21fb28786dc0ad0",
    "envoy-two-text-apps-plain": "5ea1a924a3e22e45fd4e94a2445cdf48fcd76d68c3276163ad35ab851cd9354b",
}


async def merged(apps: tuple[tuple[str], ...], accept: str, compressed: bool) -> bytes:
    with ExitStack() as stack:
        envoy_port = stack.enter_context(static(envoy_body(), TEXT))
        targets = []
        for (kind,) in apps:
            body, content_type = (text_app_body(), TEXT) if kind == "text" else (openmetrics_app_body(), OPENMETRICS)
            targets.append(ScrapeTarget(stack.enter_context(static(body, content_type)), "/metrics"))
        settings = settings_for(None, admin_port=envoy_port, scrape_targets=tuple(targets))
        async with running_agent(settings) as agent:
            headers = {"Accept": accept, "Accept-Encoding": "gzip" if compressed else "identity"}
            status, body, response_headers = await agent.get("/stats/prometheus", headers=headers)
            assert status == 200
            assert agent.failures("envoy") == agent.failures("application") == 0
            if compressed:
                assert response_headers["Content-Encoding"] == "gzip"
                body = gzip.decompress(body)
            return body


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_merged_output_is_todays(name: str) -> None:
    apps, accept, compressed = SCENARIOS[name]
    body = await merged(apps, accept, compressed)
    assert hashlib.sha256(without_agent_section(body)).hexdigest() == RECORDED[name]


@pytest.mark.parametrize("accept", ["text/plain", PROMETHEUS_ACCEPT], ids=["text", "prometheus"])
async def test_a_gzip_answer_decodes_to_the_identity_answer(accept: str) -> None:
    apps = (("text",), ("openmetrics",))
    plain = await merged(apps, accept, compressed=False)
    assert without_agent_section(await merged(apps, accept, compressed=True)) == without_agent_section(plain)
