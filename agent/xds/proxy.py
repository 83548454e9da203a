"""The xDS proxy: Envoy's ADS on the unix socket `<configPath>/XDS`, forwarded to istiod (Istio's
pkg/istio-agent/xds_proxy.go and xds_proxy_delta.go).

- Both ADS methods, state of the world and delta; bytes pass through untouched (gRPC generic handlers, no
  (de)serializers); a few fields are peeked at (agent.xds.wire) to count, log and route responses.
- One active Envoy stream: a new one ends the previous one (cleanly).
- A new upstream channel per Envoy stream (a new istiod may not share the old one's state): TLS, token and
  headers are read then, so a changed root or token applies to the next stream (agent.security.credentials).
- No retry loop of its own: an upstream failure ends Envoy's stream with istiod's status, and Envoy's own ADS
  backoff reconnects, each time through a fresh upstream connection.
- Agent-side handlers: responses whose type has a handler (`register_handler`) are not forwarded to Envoy; the
  handler gets the first resource (an empty response is ignored, not ACKed) and its outcome is ACKed or NACKed
  upstream. On Envoy's first LDS request of a stream, each handled type is subscribed to (the DNS proxy's
  NameTable, say).
- Responses of types outside `envoy.*` (and not `istio.workload.Workload`) are dropped with a log line.
Readiness: `not_ready_reason()` says which side fails ("istiod unreachable: ...", "istiod refused the
credentials: ...") until istiod has answered once since the last failure.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2

from agent.security.credentials import CredentialsError, call_metadata, open_sync_channel
from agent.security.uds import UnixGrpcServer
from agent.xds import wire
from agent.xds.metrics import CANCELLED, ERROR, XdsMetrics
from agent.xds.settings import XdsProxySettings
from agent.xds.upstream import UpstreamCall

log = logging.getLogger("agent.xds")

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
_ENVOY_PREFIX = "type.googleapis.com/envoy."
_WORKLOAD_TYPE = "type.googleapis.com/istio.workload.Workload"

# The outcome of an agent handler: None (ACK), or raise to NACK with the exception's message.
ResponseHandler = Callable[[any_pb2.Any], Awaitable[None] | None]

# Istio's expectedGrpcFailureMessages: UNAVAILABLE with these is a peer going away, not an error.
_EXPECTED_MESSAGES = ("client disconnected", "error reading from server: EOF", "transport is closing")


@dataclass(frozen=True)
class _Protocol:
    name: str
    method: str
    request: Any  # the wire peek class of this protocol's requests

    def subscribe(self, type_url: str) -> bytes:
        return bytes(self.request(type_url=type_url).SerializeToString())

    def ack(self, response: Any, error: str | None) -> bytes:
        request = self.request(type_url=response.type_url, response_nonce=response.nonce)
        if self.name == "sotw":
            request.version_info = response.version_info
        if error is not None:
            request.error_detail.code = grpc.StatusCode.INTERNAL.value[0]
            request.error_detail.message = error
        return bytes(request.SerializeToString())

    def first_resource(self, raw: bytes) -> Any | None:
        if self.name == "sotw":
            resources = wire.SotwResources.FromString(raw).resources
            return resources[0] if resources else None
        delta = wire.DeltaResources.FromString(raw).resources
        return delta[0].resource if delta else None


SOTW = _Protocol("sotw", f"/{SERVICE}/StreamAggregatedResources", wire.SotwRequest)
DELTA = _Protocol("delta", f"/{SERVICE}/DeltaAggregatedResources", wire.DeltaRequest)


@dataclass(eq=False)
class _Connection:
    id: int
    protocol: _Protocol
    replaced: asyncio.Event = field(default_factory=asyncio.Event)
    answered: bool = False  # istiod sent at least one response on this stream


class _Ended(Exception):
    """A pump stopped: which side, and the gRPC error if it was one (None: that side closed cleanly). Errors are
    grpc.aio.AioRpcError (Envoy's side) or grpc.RpcError (istiod's): both have code() and details()."""

    def __init__(self, side: str, error: Any = None) -> None:
        super().__init__(side)
        self.side = side
        self.error = error


class XdsProxy:
    def __init__(self, settings: XdsProxySettings, metrics: XdsMetrics, listener: UnixGrpcServer) -> None:
        """`listener`: agent.mesh.listen.xds_listener(settings.socket_path), started already or not."""
        self.settings = settings
        self.metrics = metrics
        self.listener = listener
        self.handlers: dict[str, ResponseHandler] = {}
        self._ids = itertools.count(1)
        self._active: _Connection | None = None
        # Readers of Envoy's streams, each left to end with its stream (see _read_envoy).
        self._readers: set[asyncio.Task[None]] = set()
        # Readiness: istiod answered at least once since the agent started; the last upstream failure, until
        # istiod answers again.
        self.answered = False
        self._failure: str | None = None
        self._logged_failure: str | None = None

    def register_handler(self, type_url: str, handler: ResponseHandler) -> None:
        """Consume responses of `type_url` in the agent (see the module docstring). Register before start()."""
        self.handlers[type_url] = handler

    def not_ready_reason(self) -> str | None:
        return self._failure

    async def start(self) -> None:
        """Listen on the socket (if not yet) and serve it. Raises SocketError."""
        await self.listener.start()
        self.listener.attach({"StreamAggregatedResources": self._sotw, "DeltaAggregatedResources": self._delta})
        log.info("xDS proxy listening on %s, upstream %s", self.settings.socket_path, self.settings.upstream.describe())

    async def stop(self) -> None:
        if self._active is not None:
            self._active.replaced.set()
        await self.listener.stop()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def _sotw(self, _requests: Any, context: grpc.aio.ServicerContext) -> None:
        await self._serve(SOTW, context)

    async def _delta(self, _requests: Any, context: grpc.aio.ServicerContext) -> None:
        await self._serve(DELTA, context)

    # -- one Envoy stream ------------------------------------------------------------------------------------

    async def _serve(self, protocol: _Protocol, context: grpc.aio.ServicerContext) -> None:
        """Exit paths: returns (Envoy's stream ends OK) when Envoy or istiod closed cleanly or a newer Envoy stream
        replaced this one; aborts with istiod's status when istiod failed, UNAVAILABLE when it could not be
        dialled."""
        connection = _Connection(next(self._ids), protocol)
        if self._active is not None:
            log.warning("registered overlapping stream; closing previous")
            self._active.replaced.set()
        self._active = connection
        upstream = self.settings.upstream
        try:
            try:
                channel = open_sync_channel(upstream)
            except CredentialsError as exc:
                self.metrics.istiod_connection_failures.inc()
                self._failed(f"istiod unreachable: {exc}")
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"failed to connect to upstream: {exc}")
                return  # abort() raises; this only says so
            call = UpstreamCall(channel, protocol.method, call_metadata(upstream))
            try:
                ended = await self._pump(connection, context, call)
            finally:
                call.cancel()
                await asyncio.to_thread(channel.close)
            await self._finish(connection, context, ended)
        except asyncio.CancelledError:
            # grpc cancels the handler when Envoy's stream goes away underneath it.
            self.metrics.envoy_terminations.labels(CANCELLED).inc()
            raise
        finally:
            if self._active is connection:
                self._active = None

    def _read_envoy(self, context: grpc.aio.ServicerContext) -> asyncio.Queue[bytes | _Ended]:
        """Envoy's requests, read into a queue by a task that is never cancelled: cancelling a pending
        `context.read()` can leave grpc's server call unable to send its final status (seen with grpcio 1.85: the
        client waited forever). The task ends with the stream, whoever ends it; stop() waits for the last ones."""
        queue: asyncio.Queue[bytes | _Ended] = asyncio.Queue()

        async def read() -> None:
            while True:
                try:
                    raw = await context.read()
                except grpc.aio.AioRpcError as exc:
                    queue.put_nowait(_Ended("envoy", exc))
                    return
                except (asyncio.InvalidStateError, grpc.aio.UsageError, grpc.aio.AbortError):
                    queue.put_nowait(_Ended("envoy"))  # the stream already ended (or this side aborted it)
                    return
                if raw is grpc.aio.EOF:
                    queue.put_nowait(_Ended("envoy"))
                    return
                queue.put_nowait(raw)

        task = asyncio.ensure_future(read())
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        return queue

    async def _pump(self, connection: _Connection, context: grpc.aio.ServicerContext, call: UpstreamCall) -> _Ended:
        # Envoy -> istiod is unbounded (UpstreamCall.write never waits); istiod -> Envoy is one response at a
        # time: the next is read from istiod only once Envoy took the previous one.
        tasks = [
            asyncio.ensure_future(self._from_envoy(connection, self._read_envoy(context), call)),
            asyncio.ensure_future(self._from_istiod(connection, context, call)),
            asyncio.ensure_future(connection.replaced.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        first = done.pop()
        if first is tasks[2]:
            return _Ended("replaced")
        error = first.exception()
        if isinstance(error, _Ended):
            return error
        if error is not None:
            raise error
        raise AssertionError("a pump returned without saying why")

    async def _from_envoy(
        self, connection: _Connection, envoy: asyncio.Queue[bytes | _Ended], call: UpstreamCall
    ) -> None:
        first_listener_request = True
        while True:
            raw = await envoy.get()
            if isinstance(raw, _Ended):
                raise raw
            self._send(call, raw)
            if first_listener_request and self.handlers:
                type_url = connection.protocol.request.FromString(raw).type_url
                if type_url == LISTENER_TYPE:
                    first_listener_request = False
                    for handled in self.handlers:
                        self._send(call, connection.protocol.subscribe(handled))

    def _send(self, call: UpstreamCall, raw: bytes) -> None:
        self.metrics.requests.inc()
        call.write(raw)

    async def _from_istiod(
        self, connection: _Connection, context: grpc.aio.ServicerContext, call: UpstreamCall
    ) -> None:
        while True:
            try:
                raw = await call.read()
            except grpc.RpcError as exc:
                raise _Ended("istiod", exc) from None
            if raw is None:
                raise _Ended("istiod")
            self.metrics.responses.inc()
            if not connection.answered:
                connection.answered = True
                self._recovered()
            response = wire.Response.FromString(raw)
            handler = self.handlers.get(response.type_url)
            if handler is not None:
                await self._handle(connection.protocol, handler, response, raw, call)
            elif response.type_url.startswith(_ENVOY_PREFIX) or response.type_url == _WORKLOAD_TYPE:
                try:
                    await context.write(raw)
                except grpc.aio.AioRpcError as exc:
                    raise _Ended("envoy", exc) from None
            else:
                log.error("Skipping forwarding type url %s to Envoy as is not a valid Envoy type", response.type_url)

    async def _handle(
        self, protocol: _Protocol, handler: ResponseHandler, response: Any, raw: bytes, call: UpstreamCall
    ) -> None:
        resource = protocol.first_resource(raw)
        if resource is None:
            return  # an empty response: nothing to do, and (as Istio) no ACK
        error: str | None = None
        try:
            outcome = handler(resource)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:  # any handler failure is a NACK carrying its message
            error = str(exc) or type(exc).__name__
            log.warning("agent handler for %s rejected the response: %s", response.type_url, error)
        self._send(call, protocol.ack(response, error))

    async def _finish(self, connection: _Connection, context: grpc.aio.ServicerContext, ended: _Ended) -> None:
        if ended.side == "replaced":
            return
        if ended.side == "envoy":
            kind = CANCELLED if ended.error is None or _expected(ended.error) else ERROR
            self.metrics.envoy_terminations.labels(kind).inc()
            if kind == ERROR:
                log.warning("downstream terminated with unexpected error %s", _describe(ended.error))
            return
        error = ended.error
        if error is None or _expected(error):
            self.metrics.istiod_terminations.labels(CANCELLED).inc()
            log.debug("upstream terminated with status %s", _describe(error))
        else:
            self.metrics.istiod_terminations.labels(ERROR).inc()
        if error is None:
            return
        if not connection.answered:
            refused = error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            side = "istiod refused the credentials" if refused else "istiod unreachable"
            self._failed(f"{side}: {_describe(error)} ({self.settings.upstream.describe()})")
        elif not _expected(error):
            log.warning("upstream terminated with unexpected error %s", _describe(error))
        # Envoy learns istiod's status and reconnects with its own backoff.
        await context.abort(error.code(), error.details() or "")

    def _failed(self, reason: str) -> None:
        self._failure = reason
        if reason != self._logged_failure:
            self._logged_failure = reason
            log.error("%s", reason)

    def _recovered(self) -> None:
        self.answered = True
        log.info("connected to upstream XDS server: %s", self.settings.upstream.address)
        self._failure = None
        self._logged_failure = None


def _expected(error: Any) -> bool:
    """Istio's GRPCErrorType: a peer going away is not an error."""
    code = error.code()
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    return code == grpc.StatusCode.UNAVAILABLE and any(m in (error.details() or "") for m in _EXPECTED_MESSAGES)


def _describe(error: Any) -> str:
    if error is None:
        return "closed"
    return f"{error.code().name}: {error.details()}"
