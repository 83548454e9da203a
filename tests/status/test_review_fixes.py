"""Edge cases a review found: a readiness answer from an Envoy that was replaced meanwhile, the query string
forwarded to Envoy as sent, a scrape timeout header of `inf`."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest
import yarl

from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.status.readiness import Readiness
from tests.status.conftest import raw_http_server, running_agent, settings_for


class SlowFact:
    """A readiness fact whose admin answer arrives when the test says: it stands in for a slow answer of the
    Envoy being replaced, which no real Envoy can be made to give at a chosen moment."""

    def __init__(self) -> None:
        self.passed = False
        self.answer = asyncio.Event()

    def forget(self) -> None:
        self.passed = False

    async def check(self) -> None:
        if not self.passed:
            await self.answer.wait()
            self.passed = True


async def test_an_answer_of_the_envoy_before_a_restart_does_not_make_the_new_one_ready() -> None:
    lifecycle = Lifecycle()
    lifecycle.envoy_up()
    lifecycle.envoy_started()
    fact = SlowFact()
    readiness = Readiness(lifecycle, AgentMetrics(process_metrics=False), [fact], started_at=time.monotonic())
    asking_old_envoy = asyncio.create_task(readiness.check())
    await asyncio.sleep(0.01)
    lifecycle.envoy_started()  # Envoy crashed and was cold-started while the check waited for its answer
    fact.answer.set()
    assert await asking_old_envoy is not None
    assert not fact.passed
    # The new Envoy is asked, and only its answer makes the pod ready.
    fact.answer = asyncio.Event()
    asking_new_envoy = asyncio.create_task(readiness.check())
    await asyncio.sleep(0.05)
    assert not asking_new_envoy.done()
    fact.answer.set()
    assert await asking_new_envoy is None


def _envoy_serving(body: bytes, seen: list[bytes] | None = None) -> object:
    """A stand-in for Envoy's prometheus listener: answers `body`; records each request line in `seen`."""

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        try:
            request_line = conn.recv(65536).split(b"\r\n", 1)[0]
            if seen is not None:
                seen.append(request_line)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nConnection: close\r\n"
            conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        except OSError:
            pass
        finally:
            conn.close()

    return handle


async def test_the_query_string_reaches_envoy_as_the_scraper_sent_it() -> None:
    """Istio forwards RawQuery: %23 must not become a fragment, %2B not a '+', a stray escape not be repaired."""
    seen: list[bytes] = []
    with raw_http_server(_envoy_serving(b"# TYPE envoy_up gauge\nenvoy_up 1\n", seen)) as envoy_port:
        async with running_agent(settings_for(None, admin_port=envoy_port)) as agent:
            url = yarl.URL(f"{agent.base}/stats/prometheus?filter=%5Eenvoy%2Bx%23y&a=%C3%28", encoded=True)
            async with agent.session.get(url) as response:
                assert response.status == 200
                assert b"envoy_up 1" in await response.read()
    assert seen == [b"GET /stats/prometheus?filter=%5Eenvoy%2Bx%23y&a=%C3%28 HTTP/1.1"]


async def test_an_infinite_scrape_timeout_header_still_ends_the_scrape() -> None:
    def never_answers(conn: socket.socket, stop: threading.Event) -> None:
        stop.wait()
        conn.close()

    with raw_http_server(never_answers) as envoy_port:
        settings = settings_for(None, admin_port=envoy_port, default_scrape_timeout=0.5)
        async with running_agent(settings) as agent:
            started = time.monotonic()
            status, body, _ = await agent.get(
                "/stats/prometheus", headers={"X-Prometheus-Scrape-Timeout-Seconds": "inf"}
            )
            assert status == 200 and b"istio_agent_scrapes_total" in body
            assert time.monotonic() - started < 5
            assert agent.failures("envoy") == 1


async def test_scrapers_hanging_up_mid_gzip_body_leave_no_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Prometheus asks for gzip; a scraper that gives up mid-body must not make aiohttp flush the compressor twice
    ("Unhandled exception ... zlib.error", about one hang-up in twelve before the fix)."""
    body = b"".join(b'# TYPE envoy_m%d counter\nenvoy_m%d{a="b"} 1\n' % (i, i) for i in range(3000))

    caplog.set_level(logging.DEBUG)
    with raw_http_server(_envoy_serving(body)) as envoy_port:
        async with running_agent(settings_for(None, admin_port=envoy_port)) as agent:
            for i in range(120):
                async with agent.session.get(
                    f"{agent.base}/stats/prometheus", headers={"Accept-Encoding": "gzip"}
                ) as response:
                    if i % 2:
                        await response.content.read(100)
                        response.close()
                    else:
                        await response.read()
            await asyncio.sleep(0.2)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors[:3]]
