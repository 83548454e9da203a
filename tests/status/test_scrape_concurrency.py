"""Merged scrapes under concurrency (issue 12 item 3): at most MAX_MERGES merges run at once and the rest are
answered 503 at once; a merge stalled on a scraper that does not read gives way to a new scrape; Envoy's and the
applications' connections are separate pools; memory and readiness stay bounded.

The agent's status server runs in a process of its own (tests/status/server_process.py) so that its memory is
measured alone; Envoy is real (the module's stack); the application is a static 100,000-line exposition (~4.8 MB)
served at full speed, so that every merge has a large body to push.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiohttp
import psutil

from agent.status.scrape_slots import MAX_MERGES
from tests.status.conftest import ServerProcess, server_process
from tests.status.envoy_stack import EnvoyStack
from tests.support.envoy import http_get
from tests.support.http_server import QuietHandler, serving_http

MiB = 1024 * 1024
# Memory the agent may grow by while serving any number of parallel scrapes of this application (before the cap:
# +110 MiB here at 300 scrapes, ~+430 MiB in the run).
MEMORY_BOUND = 40 * MiB
# Istio's injected readiness probe on 15021 times out after 3 s (injection-template.yaml); the slowest probe must
# stay well inside it, the typical one fast. (On this shared 2-core machine the first probe of a 300-scrape burst
# has taken up to 1.4 s, the test's own client competing for the same cores.)
READINESS_BOUND = 2.0
READINESS_MEDIAN_BOUND = 0.3


def large_exposition(lines: int) -> bytes:
    out = []
    for family in range(lines // 100):
        out.append(f"# HELP app_gauge_{family} A gauge family.\n# TYPE app_gauge_{family} gauge\n")
        out.extend(f'app_gauge_{family}{{instance="pod-{i}",shard="{i % 7}"}} {i}.0\n' for i in range(100))
    return "".join(out).encode()


@contextmanager
def static_exporter(body: bytes) -> Iterator[int]:
    class Exporter(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def handle(self) -> None:
            with contextlib.suppress(OSError):  # the agent gave up on a merge (it was preempted)
                super().handle()

    with serving_http(Exporter, daemon_threads=True) as port:
        yield port


@contextmanager
def agent_merging(stack: EnvoyStack, app_port: int) -> Iterator[ServerProcess]:
    with server_process(
        "--port",
        str(stack.agent_port),
        "--merge-envoy",
        "--admin-port",
        str(stack.admin_port),
        "--app-port",
        str(app_port),
    ) as agent:
        yield agent


@dataclass
class Watch:
    """Samples the agent's RSS and times readiness through Envoy's status listener (kubelet's path) meanwhile, from
    a thread of its own with a plain blocking client, as kubelet would: the test's event loop is busy with the
    scrapes, and its delays must not count as the agent's."""

    pid: int
    readiness_url: str
    idle_rss: int = 0
    peak_rss: int = 0
    readiness: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Watch:
        process = psutil.Process(self.pid)
        self.idle_rss = self.peak_rss = process.memory_info().rss

        def watch() -> None:
            next_probe = time.monotonic()
            while not self._stop.is_set():
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)
                if time.monotonic() >= next_probe:
                    started = time.monotonic()
                    assert http_get(self.readiness_url, timeout=10)[0] == 200
                    self.readiness.append(time.monotonic() - started)
                    next_probe = time.monotonic() + 0.1
                self._stop.wait(0.02)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(15)


async def scrape(session: aiohttp.ClientSession, port: int) -> tuple[int, bytes, float]:
    started = time.monotonic()
    # Prometheus' own headers: gzip, and the scrape timeout.
    headers = {"Accept-Encoding": "gzip", "X-Prometheus-Scrape-Timeout-Seconds": "10"}
    async with session.get(f"http://127.0.0.1:{port}/stats/prometheus", headers=headers) as response:
        body = await response.read()
        return response.status, body, time.monotonic() - started


def has_both_sources(body: bytes) -> bool:
    envoy = b"\nenvoy_server_live " in body or b"\nenvoy_server_live{} " in body
    return envoy and b'\napp_gauge_999{instance="pod-99",shard="1"} 99.0\n' in body


async def test_hundreds_of_parallel_scrapes_are_capped_and_memory_stays_bounded(stack: EnvoyStack) -> None:
    with static_exporter(large_exposition(100_000)) as app_port, agent_merging(stack, app_port) as agent:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            status, body, _ = await scrape(session, agent.port)
            assert status == 200 and has_both_sources(body)
            with Watch(agent.process.pid, f"http://127.0.0.1:{stack.status_listener_port}/healthz/ready") as watch:
                results = await asyncio.gather(*(scrape(session, agent.port) for _ in range(300)))
                status, body, _ = await scrape(session, agent.port)
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= MAX_MERGES
    rejected = [(body, took) for status, body, took in results if status == 503]
    assert rejected and all(body.startswith(b"Limit of concurrent requests reached") for body, _ in rejected)
    assert max(took for _, took in rejected) < 1.0
    assert all(has_both_sources(body) for status, body, _ in results if status == 200)
    assert status == 200 and has_both_sources(body)
    assert watch.peak_rss - watch.idle_rss < MEMORY_BOUND, (watch.idle_rss / MiB, watch.peak_rss / MiB)
    assert max(watch.readiness) < READINESS_BOUND, watch.readiness
    assert statistics.median(watch.readiness) < READINESS_MEDIAN_BOUND, watch.readiness


def slow_reader(port: int) -> socket.socket:
    """A scraper that asks for the whole (uncompressed) merge and never reads it. Its receive buffer is made small
    before connecting, so the kernel cannot absorb the answer for it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /stats/prometheus HTTP/1.1\r\nHost: test\r\n\r\n")
    return sock


async def test_slow_readers_do_not_cost_normal_scrapes_their_sources(stack: EnvoyStack) -> None:
    with static_exporter(large_exposition(100_000)) as app_port, agent_merging(stack, app_port) as agent:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            with Watch(agent.process.pid, f"http://127.0.0.1:{stack.status_listener_port}/healthz/ready") as watch:
                readers = [slow_reader(agent.port) for _ in range(70)]
                # While the first merges still push to the slow readers (not stalled yet) a scrape may find every
                # slot busy (503); once they stall, every new scrape takes the place of one of them.
                deadline = time.monotonic() + 15
                while (result := await scrape(session, agent.port))[0] != 200:
                    assert time.monotonic() < deadline, "no normal scrape served"
                    await asyncio.sleep(0.2)
                normal = [result] + [await scrape(session, agent.port) for _ in range(5)]
            for reader in readers:
                reader.close()
    assert all(status == 200 and has_both_sources(body) for status, body, _ in normal)
    assert watch.peak_rss - watch.idle_rss < MEMORY_BOUND, (watch.idle_rss / MiB, watch.peak_rss / MiB)
    assert max(watch.readiness) < READINESS_BOUND, watch.readiness
    assert statistics.median(watch.readiness) < READINESS_MEDIAN_BOUND, watch.readiness
