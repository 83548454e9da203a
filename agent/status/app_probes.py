"""Application probes rewritten by the injector: `/app-health/<c>/<kind>` and `/app-lifecycle/<c>/<kind>`.

kubelet cannot reach the application directly when mTLS is STRICT, so the injector points its probes at the
agent, which runs them from source address 127.0.0.6: the capture rules RETURN that address, so the probe
bypasses Envoy. The destination (INSTANCE_IP or localhost, port from ISTIO_KUBE_APP_PROBERS) is fixed by
configuration; nothing in the incoming request chooses it, so the endpoint cannot be used as an open proxy.

HTTP probes keep kubelet's semantics (pkg/probe/http): headers passed on, HTTPS without verification, up to 10
redirects followed when they stay on the same host, a redirect to another host not followed and counted as
success, status mirrored, at most 10 KiB of body copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp import web

from agent.status.settings import AppProbe, GRPCAction, HTTPGetAction, StatusSettings, TCPSocketAction

log = logging.getLogger("agent.status.probes")

MAX_REDIRECTS = 10
MAX_BODY = 10 * 1024
# Statuses whose answer must have no body (RFC 9110): the application's is passed on without its body.
_NO_BODY_STATUSES = {204, 304}
# Headers that describe the hop to the agent, not the probe; the rest of kubelet's request is passed on.
_HOP_HEADERS = {
    "host",
    "connection",
    "keep-alive",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-connection",
    "accept-encoding",
}
GRPC_SERVING = 1
# A HealthCheckResponse is a few bytes (grpc-go, Istio's prober, refuses any message over 4 MiB). The answer is read
# and decoded on the agent's event loop: an application streaming an endless or a 50 MiB answer used to cost
# hundreds of MiB and, decoded, seconds of the loop (no readiness answered meanwhile). Beyond this: a failed probe.
MAX_GRPC_RESPONSE = 64 * 1024


def source_address_usable(address: str) -> bool:
    """Whether probes can be sent from `address` (127.0.0.6 always on Linux; ::6 only if configured)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


class AppProber:
    def __init__(self, settings: StatusSettings) -> None:
        self.settings = settings
        self.host = settings.probe_host
        # The port kubelet called us on, swapped out of the Host header it sent (the server sets the bound one).
        self.status_port = settings.status_port
        self.source: str | None = settings.probe_source_ip
        if settings.app_probes and not source_address_usable(settings.probe_source_ip):
            # Without it the probe is captured by Envoy like any inbound connection (fails under STRICT mTLS),
            # which beats not probing at all; say so once.
            log.warning(
                "cannot bind probe source address %s; probing from the default address", settings.probe_source_ip
            )
            self.source = None

    def _local_addr(self) -> tuple[str, int] | None:
        return (self.source, 0) if self.source else None

    async def handle(self, request: web.Request) -> web.Response:
        probe = self.settings.app_probes.get(request.path)
        if probe is None:
            return web.Response(status=400, text=f"app prober config does not exists for {request.path}")
        action = probe.action
        if isinstance(action, HTTPGetAction):
            return await self._http(request, probe, action)
        if isinstance(action, TCPSocketAction):
            ok = await self._tcp(probe, action)
        else:
            ok = await self._grpc(request, probe, action)
        return web.Response(status=200 if ok else 500)

    def _timeout(self, probe: AppProbe) -> float | None:
        return probe.timeout_seconds or None

    async def _tcp(self, probe: AppProbe, action: TCPSocketAction) -> bool:
        try:
            async with asyncio.timeout(self._timeout(probe)):
                _, writer = await asyncio.open_connection(self.host, action.port, local_addr=self._local_addr())
        except (OSError, TimeoutError) as exc:
            log.debug("tcp probe %s:%d failed: %s", self.host, action.port, exc)
            return False
        _linger(writer)
        writer.close()
        return True

    def _url(self, action: HTTPGetAction) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{action.scheme.lower()}://{host}:{action.port}{action.path}"

    async def _http(self, request: web.Request, probe: AppProbe, action: HTTPGetAction) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        # Istio passes kubelet's Host on (podIP:15020 by default), with the status port swapped for the app's.
        # It names the application, never the destination, which stays the configured address and port.
        host, _, port = request.host.rpartition(":")
        if host and port == str(self.status_port):
            headers["Host"] = f"{host}:{action.port}"
        elif request.host:
            headers["Host"] = request.host
        for name, value in action.headers:
            headers[name] = value
        headers.setdefault("User-Agent", "kube-probe/istio")
        url = self._url(action)
        first_host = urlsplit(url).hostname
        # Keep-alives off (Istio's default): a probe every few seconds must not pin a connection in the app.
        # ssl=False: HTTPS without verification, on the context aiohttp built at import (a context of our own would
        # load the system CA bundle once more: ~30 ms and ~1-2 MiB, for certificates that are never checked).
        connector = aiohttp.TCPConnector(local_addr=self._local_addr(), force_close=True, ssl=False)
        timeout = aiohttp.ClientTimeout(total=self._timeout(probe))
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
                for _ in range(MAX_REDIRECTS + 1):
                    async with session.get(url, headers=headers, allow_redirects=False) as response:
                        location = response.headers.get("Location")
                        if 300 <= response.status < 400 and not location:
                            # Istio: a redirect without a Location cannot be passed on as one; it answers 200.
                            return web.Response(status=200)
                        if 300 <= response.status < 400:
                            target = urljoin(url, location)
                            if urlsplit(target).hostname != first_host:
                                # kubelet: a redirect off the host is not followed, and is a success.
                                log.debug("probe %s redirected to another host (%s): success", request.path, target)
                                return web.Response(status=200)
                            url = target
                            continue
                        body = await response.content.read(MAX_BODY)
                        if response.status in _NO_BODY_STATUSES:  # aiohttp refuses a body on these (a 500 before)
                            return web.Response(status=response.status)
                        return web.Response(status=response.status, body=body)
                log.debug("probe %s: more than %d redirects", request.path, MAX_REDIRECTS)
                return web.Response(status=500, text="too many redirects")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:  # ValueError: a malformed Location
            log.debug("http probe %s failed: %s: %s", url, type(exc).__name__, exc)
            return web.Response(status=500, text=f"probe failed: {type(exc).__name__}")

    async def _grpc(self, request: web.Request, probe: AppProbe, action: GRPCAction) -> bool:
        # h2 (~1.2 MiB, ~10 ms) is loaded by the first gRPC probe, not by every agent.
        import h2.exceptions  # noqa: PLC0415

        try:
            async with asyncio.timeout(self._timeout(probe)):
                status = await grpc_health_check(
                    self.host,
                    action.port,
                    action.service,
                    local_addr=self._local_addr(),
                    user_agent=request.headers.get("User-Agent", "kube-probe/istio"),
                    timeout=self._timeout(probe),
                )
        except (OSError, TimeoutError, GRPCError, h2.exceptions.H2Error) as exc:
            log.info("grpc probe %s:%d (service %r) failed: %s", self.host, action.port, action.service, exc)
            return False
        if status != GRPC_SERVING:
            log.debug("grpc probe %s:%d: health status %d", self.host, action.port, status)
        return status == GRPC_SERVING


def _linger(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER {on, 1 s}: Istio's probe dialer sets it (status/dialer_others.go, copied from kubelet's prober),
    kept for parity in how probe connections are torn down."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 1))


class GRPCError(Exception):
    """The health call failed: gRPC status not OK (Unimplemented, NotFound...), or a protocol error."""


def _encode_request(service: str) -> bytes:
    # grpc.health.v1.HealthCheckRequest{string service = 1}, length-prefixed gRPC message (not compressed).
    data = service.encode()
    body = b""
    if data:
        body = b"\x0a" + _varint(len(data)) + data
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _decode_status(message: bytes) -> int:
    """HealthCheckResponse{ServingStatus status = 1}: scan for field 1 (varint); absent means UNKNOWN (0)."""
    i = 0
    status = 0
    while i < len(message):
        tag = message[i]
        i += 1
        if tag == 0x08:
            value, shift = 0, 0
            while i < len(message):
                byte = message[i]
                i += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            status = value
        else:
            raise GRPCError(f"unexpected field tag {tag:#x} in HealthCheckResponse")
    return status


async def grpc_health_check(
    host: str,
    port: int,
    service: str,
    *,
    local_addr: tuple[str, int] | None = None,
    user_agent: str = "kube-probe/istio",
    timeout: float | None = None,
) -> int:
    """One `grpc.health.v1.Health/Check` over plaintext HTTP/2 (h2c); returns the ServingStatus number.

    Hand-rolled on h2 rather than grpcio because grpcio cannot bind the source address, and the probe must leave
    from 127.0.0.6 to bypass the capture rules (Istio's Go dialer does the same with LocalAddr).
    """
    import h2.config  # noqa: PLC0415 (lazy: see AppProber._grpc)
    import h2.connection  # noqa: PLC0415
    import h2.events  # noqa: PLC0415

    reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr)
    _linger(writer)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", user_agent),
        ]
        if timeout:
            headers.append(("grpc-timeout", f"{max(1, int(timeout * 1000))}m"))
        conn.send_headers(stream, headers)
        conn.send_data(stream, _encode_request(service), end_stream=True)
        writer.write(conn.data_to_send())
        body = bytearray()
        grpc_status: str | None = None
        grpc_message = ""
        ended = False
        while not ended:
            data = await reader.read(65536)
            if not data:
                raise GRPCError("connection closed before the response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    fields = {bytes(k): bytes(v).decode("utf-8", "replace") for k, v in event.headers or []}
                    if fields.get(b":status", "200") != "200":
                        raise GRPCError(f"HTTP status {fields[b':status']}")
                    grpc_status = fields.get(b"grpc-status", grpc_status)
                    grpc_message = fields.get(b"grpc-message", grpc_message)
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    if len(body) > MAX_GRPC_RESPONSE:
                        raise GRPCError(f"response larger than {MAX_GRPC_RESPONSE} bytes")
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    raise GRPCError(f"stream reset: {event}")
            writer.write(conn.data_to_send())
            await writer.drain()  # an application that sends (pings, settings) but never reads: bounded, not buffered
        if grpc_status != "0":
            raise GRPCError(f"grpc-status {grpc_status}: {grpc_message}")
        if len(body) < 5:
            raise GRPCError("empty response")
        return _decode_status(bytes(body[5 : 5 + int.from_bytes(body[1:5], "big")]))
    finally:
        writer.close()
