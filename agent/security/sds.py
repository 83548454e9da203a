"""The SDS server Envoy's `sds-grpc` cluster talks to (Istio's security/pkg/nodeagent/sds and pkg/xds/server.go).

`envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets`, state of the world, with Istio's stream rules:
- the first request must carry `node.id`, else the stream ends INVALID_ARGUMENT "missing node information";
- a NACK (error_detail) and an empty name list (unsubscribe) are answered with silence;
- a request without nonce, or the first one, is answered with every name it asks for;
- a reply carrying a nonce other than the last one sent is stale and ignored;
- an ACK that adds names is answered with the added names only; one that adds none, with silence;
- a secret that changes (rotation, a file rewritten) is pushed only to the streams that watch its name;
- a secret that cannot be produced ends the stream with the reason (Envoy retries with backoff).
`DeltaSecrets` and `FetchSecrets` answer UNIMPLEMENTED, as Istio's.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2

from agent.security import sds_wire
from agent.security.secret_cache import SecretCache
from agent.security.secrets import ROOT, SecretError, SecretItem, parse_file_name
from agent.security.uds import UnixGrpcServer

log = logging.getLogger("agent.security.sds")

SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# Istio's plugged-in CA CRL (security.CACRLFilePath): an absolute path, mounted by istiod's injector.
CRL_FILE = "/var/run/secrets/istio/crl/ca-crl.pem"
_END = object()


def to_envoy_secret(item: SecretItem, crl_file: str = CRL_FILE) -> Any:
    """Istio's toEnvoySecret: roots as a validation context (with the CA's CRL file when there is one), anything
    else as a certificate chain and key, both inline."""
    secret = sds_wire.Secret(name=item.name)
    ref = parse_file_name(item.name)
    if item.name == ROOT or (ref is not None and ref.root):
        context = sds_wire.CertificateValidationContext(trusted_ca=sds_wire.DataSource(inline_bytes=item.root_cert))
        if crl_file and Path(crl_file).is_file():
            context.crl.filename = crl_file
        secret.validation_context.CopyFrom(context)
    else:
        secret.tls_certificate.certificate_chain.inline_bytes = item.certificate_chain
        secret.tls_certificate.private_key.inline_bytes = item.private_key
    return secret


@dataclass(eq=False)
class _Stream:
    events: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    watched: set[str] | None = None  # None: nothing subscribed
    nonce_sent: str = ""

    def watches(self, name: str) -> bool:
        return self.watched is not None and name in self.watched


class SdsServer:
    """Serves `cache` on the unix socket `socket_path`. start() listens; stop() closes every stream."""

    def __init__(self, cache: SecretCache, listener: UnixGrpcServer, *, crl_file: str = CRL_FILE) -> None:
        """`listener`: agent.mesh.listen.sds_listener(socket path), started already or not."""
        self.cache = cache
        self.socket_path = listener.path
        self.crl_file = crl_file
        self.listener = listener
        self._streams: set[_Stream] = set()
        self._readers: set[asyncio.Task[None]] = set()
        self._versions = itertools.count(1)
        cache.on_update = self.push

    async def start(self) -> None:
        """Listen (if not yet) and serve. Raises SocketError."""
        await self.listener.start()
        self.listener.attach(
            {
                "StreamSecrets": self._stream_secrets,
                "DeltaSecrets": self._unimplemented_stream,
                "FetchSecrets": self._unimplemented_unary,
            }
        )
        log.info("Starting SDS server for workload certificates, will listen on %r", self.socket_path)

    async def stop(self) -> None:
        for stream in list(self._streams):
            stream.events.put_nowait(_END)
        await self.listener.stop()
        await asyncio.gather(*self._readers, return_exceptions=True)

    def push(self, name: str) -> None:
        """A secret changed: send it again to every stream watching it."""
        for stream in self._streams:
            if stream.watches(name):
                stream.events.put_nowait(name)

    async def _unimplemented_stream(self, _requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "DeltaSecrets not implemented")

    async def _unimplemented_unary(self, _request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "FetchSecrets not implemented")

    async def _stream_secrets(self, _requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        stream = _Stream()
        # Never cancelled (cancelling a pending context.read() can keep grpc from sending the stream's status):
        # it ends with the stream; stop() waits for the last ones.
        reader = asyncio.ensure_future(self._read(context, stream))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        try:
            while True:
                event = await stream.events.get()
                if event is _END:
                    return
                if isinstance(event, _Abort):
                    await context.abort(event.code, event.details)
                try:
                    if isinstance(event, str):
                        if stream.watches(event):
                            await self._send(context, stream, [event])
                    else:
                        names = self._should_respond(stream, event)
                        if names:
                            await self._send(context, stream, names)
                except SecretError as exc:
                    # Istio ends the stream: the failure is usually the CA's, and Envoy retries with backoff.
                    log.warning("SDS: %s", exc)
                    await context.abort(grpc.StatusCode.UNKNOWN, str(exc))
        finally:
            self._streams.discard(stream)

    async def _read(self, context: grpc.aio.ServicerContext, stream: _Stream) -> None:
        first = True
        try:
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    break
                request = sds_wire.DiscoveryRequest.FromString(raw)
                if first:
                    first = False
                    if not request.node.id:
                        stream.events.put_nowait(_Abort(grpc.StatusCode.INVALID_ARGUMENT, "missing node information"))
                        return
                    self._streams.add(stream)
                stream.events.put_nowait(request)
        except (grpc.aio.AioRpcError, grpc.aio.AbortError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # Envoy went away, or the stream ended
        stream.events.put_nowait(_END)

    @staticmethod
    def _should_respond(stream: _Stream, request: Any) -> list[str]:
        """Istio's xds.ShouldRespond for a non-wildcard type: the names to send now ([] = nothing)."""
        if request.HasField("error_detail"):
            log.warning("SDS: ACK ERROR %s: %s", request.error_detail.code, request.error_detail.message)
            return []
        names = list(request.resource_names)
        if not names:
            stream.watched = None  # unsubscribe
            return []
        if not request.response_nonce or stream.watched is None:
            stream.watched = set(names)
            return names
        if request.response_nonce != stream.nonce_sent:
            log.debug("SDS: expired nonce %s (sent %s)", request.response_nonce, stream.nonce_sent)
            return []
        previous, stream.watched = stream.watched, set(names)
        return [name for name in names if name not in previous]

    async def _send(self, context: grpc.aio.ServicerContext, stream: _Stream, names: list[str]) -> None:
        resources = []
        for name in names:
            item = await self.cache.generate(name)
            secret = to_envoy_secret(item, self.crl_file)
            resources.append(any_pb2.Any(type_url=SECRET_TYPE, value=secret.SerializeToString()))
        now = datetime.datetime.now(datetime.UTC).astimezone().replace(microsecond=0).isoformat()
        response = sds_wire.DiscoveryResponse(
            type_url=SECRET_TYPE,
            version_info=f"{now}/{next(self._versions)}",
            nonce=str(uuid.uuid4()),
            resources=resources,
        )
        await context.write(response.SerializeToString())
        stream.nonce_sent = response.nonce
        log.info("SDS: PUSH resources %s", ",".join(names))


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
