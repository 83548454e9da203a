"""Fixtures of the status-server tests: one real Envoy per module, a StatusServer per test, real exporters."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, start_http_server

from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient
from agent.status import StatusServer, StatusSettings
from agent.status.connections import ConnectionLimits
from tests.status.envoy_stack import EnvoyStack, envoy_stack
from tests.support.envoy import free_port
from tests.support.http_server import stopped_on_exit


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyStack]:
    with envoy_stack(tmp_path_factory.mktemp("envoy"), free_port()) as running:
        yield running


@dataclass
class Agent:
    server: StatusServer
    lifecycle: Lifecycle
    metrics: AgentMetrics
    settings: StatusSettings
    session: aiohttp.ClientSession
    port: int = 0
    base: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.base = f"http://127.0.0.1:{self.port}"

    async def get(self, path: str, **kwargs: object) -> tuple[int, bytes, dict[str, str]]:
        async with self.session.get(self.base + path, **kwargs) as response:  # type: ignore[arg-type]
            return response.status, await response.read(), dict(response.headers)

    def failures(self, kind: str) -> float:
        value = self.metrics.registry.get_sample_value("istio_agent_scrape_failures_total", {"type": kind})
        return value or 0.0


def settings_for(stack: EnvoyStack | None, **overrides: object) -> StatusSettings:
    base = StatusSettings(
        # 0: the kernel picks a free port at bind time (a port from free_port() can be taken by someone else's
        # ephemeral connection before we bind it). With a stack, Envoy already points at agent_port.
        status_port=stack.agent_port if stack else 0,
        envoy_prometheus_port=stack.prometheus_port if stack else free_port(),
        admin_port=stack.admin_port if stack else free_port(),
        listen_host="127.0.0.1",
        probe_host="127.0.0.1",
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


@asynccontextmanager
async def running_agent(
    settings: StatusSettings, *, envoy_up: bool = True, limits: ConnectionLimits | None = None
) -> AsyncIterator[Agent]:
    lifecycle = Lifecycle()
    if envoy_up:
        lifecycle.envoy_up()
    metrics = AgentMetrics()
    server = StatusServer(settings, lifecycle, metrics, AdminClient(port=settings.admin_port), limits=limits)
    await server.start()
    try:
        async with aiohttp.ClientSession(auto_decompress=False, headers={"Accept-Encoding": "identity"}) as session:
            assert server.port is not None
            yield Agent(server, lifecycle, metrics, settings, session, server.port)
    finally:
        await server.stop()


@contextmanager
def exporter(registry: CollectorRegistry) -> Iterator[int]:
    """prometheus_client's own HTTP exporter (honours Accept: text or OpenMetrics), on a free port."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    with stopped_on_exit(server, thread) as port:
        yield port


@contextmanager
def raw_http_server(handler: object) -> Iterator[int]:
    """A tiny threaded socket server whose `handler(conn)` answers (or does not); for faulty applications."""
    assert callable(handler)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=handler, args=(conn, stop), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(2)
        listener.close()
        for conn in conns:
            conn.close()


def root_dir() -> Path:
    return Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    """tests/status/server_process.py running: its process, its port, and (once it has ended) its stderr."""

    process: subprocess.Popen[str]
    port: int
    stderr: str = ""


@contextmanager
def server_process(*args: str, prlimit: str | None = None) -> Iterator[ServerProcess]:
    """A StatusServer in its own process (for memory and descriptor limits); stopped when the block ends."""
    argv = [sys.executable, "-m", "tests.status.server_process", *args]
    if prlimit is not None:
        argv = ["prlimit", prlimit, *argv]
    process = subprocess.Popen(
        argv,
        cwd=root_dir(),
        env={**os.environ, "PYTHONPATH": str(root_dir())},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    running = ServerProcess(process, 0)
    try:
        running.port = int(process.stdout.readline())
        yield running
    finally:
        process.stdin.close()
        running.stderr = process.stderr.read()
        process.wait(20)
        process.stdout.close()
        process.stderr.close()
