"""The merged scrape against a real Envoy and prometheus_client's real exporter: valid, ordered, degrading."""

from __future__ import annotations

import asyncio
import gzip
import socket
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from agent.status.settings import ScrapeTarget
from tests.status.conftest import exporter, raw_http_server, running_agent, settings_for
from tests.status.envoy_stack import EnvoyStack, envoy_stack
from tests.supervisor.harness import until
from tests.support.envoy import free_port

pytestmark = pytest.mark.envoy

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def check_valid(body: bytes) -> list[str]:
    """promtool (no parse error; lint remarks allowed) and prometheus_client's parser; returns the TYPE'd names.

    Family names are taken from the exposition's own `# TYPE` lines: prometheus_client's parser folds `x_total`
    counters into `x`, and Envoy itself exposes both `envoy_cluster_upstream_rq` and `..._rq_total` counters.
    """
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
    errors = [line for line in result.stderr.decode().splitlines() if "error while linting" in line]
    assert not errors, errors
    assert list(text_string_to_metric_families(body.decode()))
    return [line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE ")]


def app_registry(*, clash: bool = False) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("app_requests", "Requests served.", ["code"], registry=registry).labels("200").inc(3)
    Gauge("app_temperature_celsius", "A gauge.", registry=registry).set(21.5)
    Histogram("app_latency_seconds", "A histogram.", registry=registry).observe(0.2)
    if clash:
        # Families the agent and Envoy already expose, spelled as an application would.
        Counter("istio_agent_scrapes", "Clashes with the agent's counter.", registry=registry).inc()
        Gauge("envoy_server_live", "Clashes with Envoy's gauge.", registry=registry).set(7)
    return registry


@pytest.mark.parametrize("accept", ["text/plain", PROMETHEUS_ACCEPT], ids=["text", "openmetrics"])
@pytest.mark.parametrize("clash", [False, True], ids=["distinct", "clashing"])
async def test_merged_output_is_one_valid_exposition(stack: EnvoyStack, accept: str, clash: bool) -> None:
    with exporter(app_registry(clash=clash)) as app_port:
        settings = settings_for(stack, scrape_targets=(ScrapeTarget(app_port, "/metrics"),))
        async with running_agent(settings) as agent:
            status, body, headers = await agent.get("/stats/prometheus", headers={"Accept": accept})
    assert status == 200
    names = check_valid(body)
    assert len(names) == len(set(names)), [n for n in set(names) if names.count(n) > 1]
    text = body.decode()
    # Order: agent, then Envoy, then the application.
    assert text.index("istio_agent_scrapes") < text.index("envoy_server_live") < text.index("app_temperature_celsius")
    openmetrics = accept != "text/plain"
    assert headers["Content-Type"].startswith("application/openmetrics-text" if openmetrics else "text/plain")
    assert text.count("# EOF") == (1 if openmetrics else 0)
    if openmetrics:
        assert text.endswith("# EOF\n")
    if clash:
        # The earlier source wins: Envoy's value of envoy_server_live (1), not the application's 7.
        live = [line for line in text.splitlines() if line.startswith("envoy_server_live")]
        assert live in (["envoy_server_live 1"], ["envoy_server_live{} 1"])
        assert [line for line in text.splitlines() if line.startswith("istio_agent_scrapes_total")] == [
            "istio_agent_scrapes_total 1"
        ]
        # The app's istio_agent_scrapes and envoy_server_live. (In text its counter is two families, `_total` and a
        # `_created` gauge: the agent writes no `_created` series, so that gauge clashes with nothing and stays.)
        dropped = agent.metrics.registry.get_sample_value(
            "istio_agent_scrape_dropped_total", {"type": "application", "reason": "duplicate_family"}
        )
        assert dropped == 2


async def test_two_targets_of_one_exporter_do_not_duplicate_families(stack: EnvoyStack) -> None:
    with exporter(app_registry()) as app_port:
        targets = (ScrapeTarget(app_port, "/metrics"), ScrapeTarget(app_port, "/other"))
        async with running_agent(settings_for(stack, scrape_targets=targets)) as agent:
            status, body, _ = await agent.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert status == 200
    names = check_valid(body)
    assert len(names) == len(set(names))
    assert body.decode().count("app_temperature_celsius 21.5") == 1


async def test_openmetrics_application_section_parses_as_openmetrics(stack: EnvoyStack) -> None:
    """With Envoy's merge off, agent + application is strict OpenMetrics (Envoy's text families are not)."""
    with exporter(app_registry(clash=True)) as app_port:
        settings = settings_for(stack, merge_envoy_stats=False, scrape_targets=(ScrapeTarget(app_port, "/metrics"),))
        async with running_agent(settings) as agent:
            _, body, _ = await agent.get("/stats/prometheus", headers={"Accept": PROMETHEUS_ACCEPT})
    names = [family.name for family in om_parse(body.decode())]  # type: ignore[no-untyped-call]
    assert "app_requests" in names and "istio_agent_scrapes" in names
    assert len(names) == len(set(names))


async def test_gzip_when_asked_and_query_forwarded_to_envoy(stack: EnvoyStack) -> None:
    async with running_agent(settings_for(stack)) as agent:
        status, body, headers = await agent.get(
            "/stats/prometheus?filter=server%5C.live", headers={"Accept-Encoding": "gzip"}
        )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(body).decode()
    check_valid(text.encode())
    envoy_lines = [line for line in text.splitlines() if line.startswith("envoy_")]
    assert envoy_lines in (["envoy_server_live 1"], ["envoy_server_live{} 1"])


async def test_envoy_down_is_counted_and_the_rest_served(stack: EnvoyStack) -> None:
    with exporter(app_registry()) as app_port:
        closed = settings_for(stack, admin_port=1, scrape_targets=(ScrapeTarget(app_port, "/metrics"),))
        async with running_agent(closed) as agent:
            status, body, _ = await agent.get("/stats/prometheus")
            assert agent.failures("envoy") == 1
            _, second, _ = await agent.get("/stats/prometheus")
    assert status == 200
    check_valid(body)
    assert b"app_temperature_celsius" in body and b"\nenvoy_" not in body
    # The agent's section is encoded while the sources are being opened: it shows the failures before this scrape.
    assert b'istio_agent_scrape_failures_total{type="envoy"} 1\n' in second


def _slow_app(delay_before: float, delay_during: float) -> object:
    def handle(conn: socket.socket, stop: threading.Event) -> None:
        try:
            conn.recv(65536)
            if stop.wait(delay_before):
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\r\n# TYPE slow_one gauge\n")
            conn.sendall(b"slow_one 1\n")
            if stop.wait(delay_during):
                return
            conn.sendall(b"slow_two 2\n")
        except OSError:
            pass
        finally:
            conn.close()

    return handle


@pytest.mark.parametrize(("before", "during"), [(30.0, 0.0), (0.0, 30.0)], ids=["never-answers", "stalls-mid-body"])
async def test_slow_application_is_cut_at_the_scrape_timeout(stack: EnvoyStack, before: float, during: float) -> None:
    """Prometheus's 1 s: the agent gives the application 0.75 s (a margin to write the answer), then answers with
    what it has. Not the application's 30 s, nor the agent's 10 s default when Prometheus names no timeout: the upper
    bound tells those apart with room for a loaded machine (a 1.5 s bound failed under load); the lower one shows the
    agent did wait its budget."""
    with raw_http_server(_slow_app(before, during)) as app_port:
        settings = settings_for(stack, scrape_targets=(ScrapeTarget(app_port, "/metrics"),))
        async with running_agent(settings) as agent:
            started = time.monotonic()
            status, body, _ = await agent.get("/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "1"})
            elapsed = time.monotonic() - started
            assert agent.failures("application") == 1
    assert status == 200
    assert 0.75 <= elapsed < 0.75 + 2.0 < settings.default_scrape_timeout, elapsed
    check_valid(body)
    assert b"envoy_server_live" in body and b"slow_two" not in body
    # What arrived before the stall is kept: complete lines only.
    assert (b"slow_one 1" in body) == (before == 0.0)


def _fixed_app(payload: bytes, content_type: bytes = b"text/plain; version=0.0.4") -> object:
    def handle(conn: socket.socket, stop: threading.Event) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nConnection: close\r\n\r\n")
            conn.sendall(payload)
        except OSError:
            pass
        finally:
            conn.close()

    return handle


@pytest.mark.parametrize(
    "payload",
    [
        b"<html><body>Whitelabel Error Page</body></html>\n",
        bytes(range(256)) * 40,
        b"\n\n\x00\x01garbage",
    ],
    ids=["html", "binary", "nul"],
)
async def test_garbage_application_is_left_out(stack: EnvoyStack, payload: bytes) -> None:
    with raw_http_server(_fixed_app(payload)) as app_port:
        settings = settings_for(stack, scrape_targets=(ScrapeTarget(app_port, "/metrics"),))
        async with running_agent(settings) as agent:
            status, body, _ = await agent.get("/metrics")
            assert agent.failures("application") == 1
    assert status == 200
    check_valid(body)
    assert b"envoy_server_live" in body


async def test_invalid_lines_inside_a_valid_exposition_are_dropped(stack: EnvoyStack) -> None:
    payload = (
        b"# HELP good_one A gauge.\n# TYPE good_one gauge\ngood_one 1\n"
        b'bad line with spaces\ngood_two{a="x"} 2\nbroken{a="unterminated} 3\ngood_three 3 1700000000000\n'
    )
    with raw_http_server(_fixed_app(payload)) as app_port:
        settings = settings_for(stack, scrape_targets=(ScrapeTarget(app_port, "/metrics"),))
        async with running_agent(settings) as agent:
            _, body, _ = await agent.get("/metrics")
            dropped = agent.metrics.registry.get_sample_value(
                "istio_agent_scrape_dropped_total", {"type": "application", "reason": "invalid_line"}
            )
    check_valid(body)
    assert b"good_one 1" in body and b'good_two{a="x"} 2' in body and b"good_three 3 1700000000000" in body
    assert b"\nbad line" not in body and b"\nbroken{" not in body
    assert dropped == 2


async def test_huge_application_is_capped_and_output_stays_valid(stack: EnvoyStack) -> None:
    payload = b"".join(b'huge_metric_%d{i="%d"} %d\n' % (i, i, i) for i in range(100_000))
    with raw_http_server(_fixed_app(payload)) as app_port:
        settings = settings_for(
            stack, source_cap_bytes=256 * 1024, scrape_targets=(ScrapeTarget(app_port, "/metrics"),)
        )
        async with running_agent(settings) as agent:
            status, body, _ = await agent.get("/metrics")
            assert agent.failures("application") == 1
    assert status == 200
    check_valid(body)
    app_bytes = sum(len(line) + 1 for line in body.split(b"\n") if line.startswith(b"huge_metric_"))
    assert 0 < app_bytes <= 256 * 1024


async def test_localhost_only_metrics_refuse_other_peers(stack: EnvoyStack) -> None:
    async with running_agent(settings_for(stack, metrics_localhost_only=True)) as agent:
        status, _, _ = await agent.get("/stats/prometheus")
    assert status == 200


@pytest.mark.parametrize("lines", [100_000, 200_000])
async def test_a_100k_line_source_is_streamed_not_buffered(stack: EnvoyStack, lines: int) -> None:
    """Python allocations while merging a 5-10 MB application body stay under 2 MiB, whatever the body's size."""
    payload = b"".join(b'big_family_%d{pod="pod-%d",shard="%d"} %d\n' % (i // 100, i, i % 7, i) for i in range(lines))
    with raw_http_server(_fixed_app(payload)) as app_port:
        settings = settings_for(stack, scrape_targets=(ScrapeTarget(app_port, "/metrics"),))
        async with running_agent(settings) as agent:
            await agent.get("/metrics")  # warm: connection pools, regex caches
            tracemalloc.start()
            try:
                received = 0
                async with agent.session.get(agent.base + "/metrics") as response:
                    async for chunk in response.content.iter_chunked(65536):
                        received += len(chunk)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert agent.failures("application") == 0
    assert received > len(payload)
    assert peak < 2 * 2**20, f"peak {peak} bytes while merging a {len(payload)}-byte source"


async def test_envoy_killed_between_scrapes_is_counted(tmp_path: Path) -> None:
    agent_port = free_port()
    with envoy_stack(tmp_path, agent_port) as doomed:
        async with running_agent(settings_for(doomed)) as agent:
            assert b"\nenvoy_server_live" in (await agent.get("/stats/prometheus"))[1]
            doomed.process.kill()
            doomed.process.wait()
            status, body, _ = await agent.get("/stats/prometheus")
            assert status == 200 and agent.failures("envoy") == 1
    check_valid(body)
    assert b"\nenvoy_" not in body and b"istio_agent_scrapes_total 2" in body


async def test_scraper_hanging_up_mid_scrape_is_harmless(stack: EnvoyStack, caplog: pytest.LogCaptureFixture) -> None:
    with raw_http_server(_slow_app(0.0, 30.0)) as app_port:
        settings = settings_for(stack, scrape_targets=(ScrapeTarget(app_port, "/metrics"),))
        async with running_agent(settings) as agent:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await agent.get("/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "1.2"})
            # The abandoned handler ends at the scrape's deadline, counting the application it had to cut: wait for
            # that (a fixed sleep let a late error slip past the assertion below on a slow machine).
            await until(lambda: agent.failures("application") >= 1, 10)
            status, body, _ = await agent.get("/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "1"})
    assert status == 200 and b"slow_one 1" in body
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
