"""The status port's connections: a deadline for request headers, a cap, and no log flood when file descriptors run out.

Port 15020 is reachable by every pod (it is excluded from capture), and kubelet's readiness and liveness probes go
through it: a peer that opens connections and sends nothing (or half a request) must not starve the probes. Istio's
Go server has no limit here and relies on Go's raised file limit; a Python server at a soft limit of 1024 stopped
answering at ~1,000 idle connections and logged asyncio's "socket.accept() out of system resource" ~40,000 times a
second (issue 12). The guard:

* closes a connection that has not delivered complete request headers HEADER_TIMEOUT seconds after it opened or
  after its first byte of a next request (slowloris, idle sockets). A kept-alive connection BETWEEN requests is
  left alone: Envoy's pool behind 15021 keeps its connection for an hour, and closing it under Envoy's feet turns
  a probe into a 503;
* caps open connections at `max_connections` (lowered to fit the open-files limit): a new connection over the cap
  closes the connection waiting longest for its headers, else the longest idle kept-alive one, so that a probe's
  new connection is always served; a request in progress is never closed for it;
* when accept() fails for lack of descriptors anyway (something else used them), closes a waiting or idle
  connection per failure and accepts again at the loop's next turn; one log line a minute at most;
* logs malformed requests (answered 400 by aiohttp, which logs each at ERROR) once a minute with a count: any peer
  could otherwise write the agent's log at line rate. Go's server, Istio's, logs none.

It hooks aiohttp at public seams only: a delegating asyncio protocol around each RequestHandler, a middleware that
marks requests in progress, and a BaseSite that accepts from a pre-bound socket itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from agent.metrics import AgentMetrics
from agent.status.listen import BACKLOG

log = logging.getLogger("agent.status")

HEADER_TIMEOUT = 10.0
MAX_CONNECTIONS = 1024
# Descriptors kept for everything else the agent opens (Envoy's pipes, admin and scrape connections, watches, logs).
FD_RESERVE = 128
# Never below this many connections, whatever the limit says (a limit that low fails elsewhere first).
MIN_CONNECTIONS = 32
# At most one summary line per this many seconds about closed connections or failed accepts.
LOG_INTERVAL = 60.0
# When accept() fails and no connection can be shed (all have a request in progress): asyncio's own retry delay.
ACCEPT_RETRY_DELAY = 1.0
# Connections accepted per turn of the loop before the other callbacks (asyncio's server takes its backlog, 100).
ACCEPTS_PER_TURN = 128
_OUT_OF_RESOURCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = HEADER_TIMEOUT
    max_connections: int = MAX_CONNECTIONS

    def fitted(self, open_files: int) -> ConnectionLimits:
        """The cap lowered to what `open_files` descriptors allow: half of what the reserve leaves, since a
        request in progress may hold one upstream descriptor (an application probe) besides its own."""
        fits = max(MIN_CONNECTIONS, (open_files - FD_RESERVE) // 2)
        return replace(self, max_connections=min(self.max_connections, fits))


class _Connection(asyncio.Protocol):
    """Delegates every transport callback to aiohttp's RequestHandler and reports its state to the guard."""

    __slots__ = ("guard", "handler", "state", "timer")

    def __init__(self, handler: RequestHandler, guard: ConnectionGuard) -> None:
        self.handler = handler
        self.guard = guard
        self.timer: asyncio.TimerHandle | None = None
        self.state = "new"  # new -> waiting (for headers) -> busy (request in progress) -> idle -> waiting ...

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)
        self.guard.opened(self)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)
        if self.state == "idle":
            self.guard.waiting(self)

    def eof_received(self) -> None:
        self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        self.handler.connection_lost(exc)


class ConnectionGuard:
    """Book-keeping of the status server's connections, oldest first per state; see the module docstring."""

    def __init__(self, limits: ConnectionLimits, metrics: AgentMetrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self._waiting: OrderedDict[_Connection, None] = OrderedDict()
        self._idle: OrderedDict[_Connection, None] = OrderedDict()
        self._busy: set[_Connection] = set()
        self._by_handler: dict[RequestHandler, _Connection] = {}
        self._closed: dict[str, int] = {}
        self._accept_failures = 0
        self._last_log = -float("inf")

    # ------------------------------------------------------------------------------------------ state changes
    @property
    def open(self) -> int:
        return len(self._waiting) + len(self._idle) + len(self._busy)

    @property
    def in_progress(self) -> int:
        return len(self._busy)

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            handler = server()
            connection = _Connection(handler, self)
            self._by_handler[handler] = connection
            return connection

        return make

    def opened(self, connection: _Connection) -> None:
        if self.open >= self.limits.max_connections and not self._close_one("connection_limit"):
            # Every connection has a request in progress: refuse the newcomer rather than run out of descriptors.
            self._close(connection, "connection_limit")
            return
        self.waiting(connection)

    def waiting(self, connection: _Connection) -> None:
        self._leave(connection)
        connection.state = "waiting"
        self._waiting[connection] = None
        loop = asyncio.get_running_loop()
        connection.timer = loop.call_at(loop.time() + self.limits.header_timeout, self._header_timeout, connection)

    def busy(self, connection: _Connection) -> None:
        self._leave(connection)
        connection.state = "busy"
        self._busy.add(connection)

    def idle(self, connection: _Connection) -> None:
        if connection.state != "busy":
            return  # closed meanwhile
        self._leave(connection)
        connection.state = "idle"
        self._idle[connection] = None

    def forget(self, connection: _Connection) -> None:
        self._leave(connection)
        self._by_handler.pop(connection.handler, None)
        connection.state = "closed"

    def _leave(self, connection: _Connection) -> None:
        """Out of whichever state it was in, its header deadline cancelled."""
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None
        self._waiting.pop(connection, None)
        self._idle.pop(connection, None)
        self._busy.discard(connection)

    def _header_timeout(self, connection: _Connection) -> None:
        connection.timer = None
        if connection.state == "waiting":
            self._close(connection, "header_timeout")

    def _close_one(self, reason: str) -> bool:
        """Close the connection waiting longest for its headers, else the one idle longest. False if none."""
        for pool in (self._waiting, self._idle):
            if pool:
                victim = next(iter(pool))
                self._close(victim, reason)
                return True
        return False

    def _close(self, connection: _Connection, reason: str) -> None:
        self.forget(connection)
        connection.handler.force_close()
        self.metrics.status_connections_closed.labels(reason).inc()
        self._closed[reason] = self._closed.get(reason, 0) + 1
        self._log_summary()

    def _log_summary(self) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL:
            return
        self._last_log = now
        parts = []
        limits = self.limits
        if timed_out := self._closed.get("header_timeout"):
            parts.append(f"{timed_out} sent no complete request within {limits.header_timeout:g}s")
        if over := self._closed.get("connection_limit"):
            parts.append(f"{over} closed over the limit of {limits.max_connections} connections")
        if self._accept_failures:
            parts.append(f"{self._accept_failures} accept() failures for lack of file descriptors")
        log.warning("status server: connections shed to keep serving probes: %s", "; ".join(parts))
        self._closed.clear()
        self._accept_failures = 0

    # ------------------------------------------------------------------------------------------ aiohttp hooks
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = self._by_handler.get(request.protocol)
        if connection is None:  # not one of ours (a test calling the app directly)
            return await handler(request)
        self.busy(connection)
        try:
            return await handler(request)
        finally:
            self.idle(connection)

    def out_of_descriptors(self) -> bool:
        """accept() failed for lack of descriptors: close the connection waiting longest for its headers, else the
        one idle longest (its descriptor is free once its transport closes, at the loop's next turn). False when
        every connection has a request in progress."""
        self._accept_failures += 1
        self.metrics.status_accept_failures.inc()
        if self._close_one("accept_failed"):
            return True
        self._log_summary()
        return False


class MalformedRequests(logging.Filter):
    """On the status server's own aiohttp logger: a malformed request (aiohttp's HttpProcessingError, answered 400)
    becomes one summary line a minute; everything else (a handler's exception) passes as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.suppressed = 0
        self._last_log = -float("inf")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self.suppressed += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            log.warning(
                "status server: %d malformed requests answered %d (last: %s)", self.suppressed, exc.code, exc.message
            )
            self.suppressed = 0
        return False


def server_logger(parent: logging.Logger) -> logging.Logger:
    """A logger for aiohttp's request handlers with MalformedRequests on it: a private instance (not in logging's
    registry, so no filter outlives its server), whose records propagate to `parent`'s handlers."""
    logger = logging.Logger(f"{parent.name}.http")
    logger.parent = parent
    logger.addFilter(MalformedRequests())
    return logger


class GuardedSite(web.BaseSite):
    """Serves one pre-bound listening socket: accepts connections itself and hands them to aiohttp through the guard.

    Why not loop.create_server(): on EMFILE, asyncio's accept loop reports once per remaining backlog slot (to the
    loop's exception handler, which logs each with a traceback), keeps trying, and only retries a second later;
    here a failed accept sheds one idle connection and tries again at the loop's next turn, so a probe queued
    behind a backlog of idle peers is accepted in milliseconds, and nothing is logged per attempt.
    """

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, guard: ConnectionGuard) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self.sock = sock
        self._guard = guard
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._retry: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._factory = self._guard.protocol_factory(server)
        self.sock.setblocking(False)
        self.sock.listen(self._backlog)
        self._resume()

    async def stop(self) -> None:
        """Stop accepting, close the socket, drop connections still being set up; aiohttp's runner then closes the
        established ones."""
        if self._retry is not None:
            self._retry.cancel()
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        await super().stop()

    def _resume(self) -> None:
        self._retry = None
        if self.sock.fileno() < 0:
            return
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    def _pause(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        # call_later(0) runs after the shed connection's transport has released its descriptor (scheduled earlier).
        self._retry = loop.call_later(delay, self._resume)

    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._factory is not None
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCE:
                    log.warning("status server: accept() failed: %s", exc)
                self._pause(0.0 if self._guard.out_of_descriptors() else ACCEPT_RETRY_DELAY)
                return
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(self._factory, conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[Any]) -> None:
        self._handshakes.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("status server: a connection failed while being set up: %s", exc)
