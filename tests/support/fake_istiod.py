"""A FAKE istiod for tests: a minimal ADS server on a unix socket, speaking to a real Envoy.

This is a fake, standing in for istiod only because no control plane can run here (no istiod, no Kubernetes).
Everything on the other side of it is real: the agent's rendered default bootstrap, the real Envoy, the agent's
status port. In Istio, Envoy's `xds-grpc` cluster is a pipe at `<configPath>/XDS` where the agent's XDS proxy
listens and forwards to istiod; here the fake listens on that pipe itself.

What it does:
- serves `envoy.service.discovery.v3.AggregatedDiscoveryService`, both StreamAggregatedResources (state of the
  world, `ISTIO_DELTA_XDS=false`) and DeltaAggregatedResources (incremental, Istio's default);
- answers every type URL Envoy subscribes to: the configured resources of that type (default: none, i.e. empty
  CDS and LDS; for EDS/RDS names nobody configured, an empty resource of that name, as istiod sends), so Envoy's
  initialization never waits on a type the test did not think of;
- `hold=True` (or `hold()` later) withholds responses until `release()`: Envoy connected, istiod not answering;
- records the node Envoy sent (id, cluster, metadata: what istiod would see), and every ACK and NACK per type;
- `set_resources()` replaces a type's resources and pushes them to every open stream (an istiod config push).
- behind the agent's xDS proxy it listens on TCP (`listen="127.0.0.1:0"`), with TLS (`tls=(chain, key, client
  root)`: istiod's serving certificate; `require_client_cert=True` for mTLS), authenticates callers as
  Istio's FakeAuthenticator does (`tokens={bearer token: identity}`, or a client certificate's spiffe SAN;
  `require_auth=True` refuses unauthenticated ADS streams with UNAUTHENTICATED) and, with `ca=MeshCa(...)`, serves
  `istio.v1.auth.IstioCertificateService/CreateCertificate`: identities from authentication, never the CSR.

It is not istiod: no ordering of CDS before LDS, no EDS/RDS semantics beyond answering by name, no debouncing.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

# Imported so JSON resources may name these types in `@type` (json_format resolves Any by the descriptor pool).
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format

from agent.protos.istio_ca import CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse
from tests.support.mesh_pki import MeshCa

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

# Types Envoy asks for by name, and the empty resource of a name that is valid Envoy config.
_EMPTY_BY_NAME: dict[str, Callable[[str], Any]] = {
    ENDPOINT: lambda name: endpoint_pb2.ClusterLoadAssignment(cluster_name=name),
    ROUTE: lambda name: route_pb2.RouteConfiguration(name=name),
}

_END = object()  # wakes a stream's sender when the stream or the server ends


@dataclass(frozen=True)
class SeenNode:
    """The node Envoy identified itself with, as istiod would see it."""

    id: str
    cluster: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """Envoy's answer to one response: an ACK (accepted) or a NACK (rejected, with Envoy's error message)."""

    protocol: str  # "sotw" or "delta"
    type_url: str
    nonce: str
    version: str
    accepted: bool
    error: str


@dataclass(frozen=True)
class _Resource:
    name: str
    version: str
    body: Any  # google.protobuf.Any


def listener(config: Mapping[str, Any]) -> Any:
    """An Envoy v3 Listener from its JSON/YAML form (the shape of an LDS resource, without `@type`)."""
    return json_format.ParseDict(dict(config), listener_pb2.Listener())


def cluster(config: Mapping[str, Any]) -> Any:
    """An Envoy v3 Cluster from its JSON/YAML form."""
    return json_format.ParseDict(dict(config), cluster_pb2.Cluster())


@dataclass
class _Stream:
    protocol: str
    outbox: queue.Queue[object] = field(default_factory=queue.Queue)
    # type URL -> the resource names Envoy asked for; None: a wildcard subscription (all of them, as LDS and CDS)
    subscribed: dict[str, set[str] | None] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)  # subscribed while held: answered at release()
    last_nonce: dict[str, str] = field(default_factory=dict)
    last_version: dict[str, str] = field(default_factory=dict)
    sent_names: dict[str, set[str]] = field(default_factory=dict)  # delta: what Envoy holds, for removals


class FakeIstiod:
    """Use as a context manager: `with FakeIstiod(config_path / "XDS") as istiod: ...` (a unix socket), or
    `FakeIstiod("127.0.0.1:0", tls=..., ca=...)` (TCP; `istiod.address` is where it listens)."""

    def __init__(
        self,
        listen: Path | str,
        resources: Mapping[str, Sequence[Any]] | None = None,
        *,
        hold: bool = False,
        tls: tuple[bytes, bytes, bytes] | None = None,
        ca: MeshCa | None = None,
        tokens: Mapping[str, str] | None = None,
        require_auth: bool = False,
        require_client_cert: bool = False,
    ):
        if isinstance(listen, Path):
            # sun_path is 108 bytes; a longer path would fail inside grpc with a less obvious message.
            assert len(str(listen)) < 100, f"unix socket path too long: {listen}"
        self.listen = listen
        self.address = ""  # host:port once listening on TCP
        self.tls = tls
        self.ca = ca
        self.tokens = dict(tokens or {})
        self.require_auth = require_auth
        # Python's gRPC either requires client certificates or never asks for them (istiod asks and verifies
        # any given): a test of client-certificate authentication asks for them to be required.
        self.require_client_cert = require_client_cert
        self.ca_failure: grpc.StatusCode | None = None  # set: every CSR fails with this code (a CA outage)
        self.csr_ttls: list[int] = []  # validity asked for, per CSR signed
        self.auth_failures = 0
        self.metadata: list[dict[str, str]] = []  # the headers of every ADS stream and CSR
        self._lock = threading.Lock()
        self._nonces = itertools.count(1)
        self._versions: dict[str, int] = {}  # per type URL; a type never set is served empty at version 0
        self._resources: dict[str, list[_Resource]] = {}
        for type_url, items in (resources or {}).items():
            self._versions[type_url] = 1
            self._resources[type_url] = self._pack(items, "1")
        self._held = hold
        self._streams: list[_Stream] = []
        self._nodes: list[SeenNode] = []
        self._replies: list[Reply] = []
        self._server: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> FakeIstiod:
        # A stream takes one pool thread (its sender) and a reader thread of its own; Envoy opens one ADS stream
        # at a time (a restarted Envoy a new one, after the old one ended).
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        if self.ca is not None:
            handler = grpc.unary_unary_rpc_method_handler(
                self._create_certificate,
                request_deserializer=IstioCertificateRequest.FromString,
                response_serializer=IstioCertificateResponse.SerializeToString,
            )
            service, method = CREATE_CERTIFICATE.strip("/").split("/")
            self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: handler})])
        if isinstance(self.listen, Path):
            self.listen.parent.mkdir(parents=True, exist_ok=True)
            self.listen.unlink(missing_ok=True)
            target = f"unix:{self.listen}"
        else:
            target = self.listen
        if self.tls is not None:
            chain, key, client_root = self.tls
            credentials = grpc.ssl_server_credentials(
                [(key, chain)], root_certificates=client_root, require_client_auth=self.require_client_cert
            )
            bound = self._server.add_secure_port(target, credentials)
        else:
            bound = self._server.add_insecure_port(target)
        assert bound, f"could not listen on {target}"
        if not isinstance(self.listen, Path):
            self.address = f"{self.listen.rsplit(':', 1)[0]}:{bound}"
        self._server.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.outbox.put(_END)
        self._server.stop(grace=None).wait(5)
        if isinstance(self.listen, Path):
            self.listen.unlink(missing_ok=True)

    # -- what tests drive ------------------------------------------------------------------------------------

    def hold(self) -> None:
        """Withhold answers to subscriptions from now on (open streams keep what they have) until `release()`."""
        with self._lock:
            self._held = True

    def release(self) -> None:
        """Stop withholding: answer every subscription made so far, and every later one at once."""
        with self._lock:
            self._held = False
            for stream in self._streams:
                for type_url in sorted(stream.pending):
                    self._send(stream, type_url)
                stream.pending.clear()

    def set_resources(self, type_url: str, items: Iterable[Any]) -> None:
        """Replace the resources of a type (protos or google.protobuf.Any) and push them to every open stream."""
        with self._lock:
            version = self._versions.get(type_url, 0) + 1
            self._versions[type_url] = version
            self._resources[type_url] = self._pack(items, str(version))
            for stream in self._streams:
                if type_url not in stream.subscribed:
                    continue
                if self._held:
                    stream.pending.add(type_url)  # pushed at release()
                else:
                    self._send(stream, type_url)

    # -- what tests read -------------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[SeenNode]:
        with self._lock:
            return list(self._nodes)

    @property
    def protocols(self) -> list[str]:
        """The protocol of every stream Envoy opened, in order."""
        with self._lock:
            return [stream.protocol for stream in self._streams]

    def replies(self, type_url: str | None = None) -> list[Reply]:
        with self._lock:
            return [r for r in self._replies if type_url is None or r.type_url == type_url]

    def acked(self, type_url: str) -> bool:
        """Envoy ACKed the current version of `type_url` (what the last set_resources, or the start, gave it)."""
        with self._lock:
            version = str(self._versions.get(type_url, 0))
            return any(r.accepted and r.version == version for r in self._replies if r.type_url == type_url)

    def nacks(self, type_url: str) -> list[Reply]:
        return [r for r in self.replies(type_url) if not r.accepted]

    # -- the gRPC service (called by grpc's threads) ---------------------------------------------------------

    def StreamAggregatedResources(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        return self._serve("sotw", request_iterator, context)

    def DeltaAggregatedResources(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        return self._serve("delta", request_iterator, context)

    def _authenticate(self, context: Any) -> list[str]:
        """The caller's identities (Istio's FakeAuthenticator): a known bearer token, or the spiffe SANs of a
        verified client certificate; [] when neither."""
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self._lock:
            self.metadata.append(metadata)
        token = metadata.get("authorization", "").removeprefix("Bearer ")
        if token in self.tokens:
            return [self.tokens[token]]
        sans = context.auth_context().get("x509_subject_alternative_name", [])
        identities = [san.decode() for san in sans if san.startswith(b"spiffe://")]
        if not identities:
            with self._lock:
                self.auth_failures += 1
        return identities

    def _create_certificate(self, request: Any, context: Any) -> Any:
        assert self.ca is not None
        identities = self._authenticate(context)
        if not identities:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "request authenticate failure")
        if self.ca_failure is not None:
            context.abort(self.ca_failure, "CA is down (test)")
        with self._lock:
            self.csr_ttls.append(request.validity_duration)
        chain = self.ca.issue(request.csr.encode(), identities, request.validity_duration)
        return IstioCertificateResponse(cert_chain=chain)

    def _serve(self, protocol: str, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        if self.require_auth and not self._authenticate(context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "authentication failure")
        elif not self.require_auth and self.tls is not None:
            self._authenticate(context)  # only to record the headers
        stream = _Stream(protocol)
        with self._lock:
            self._streams.append(stream)
        context.add_callback(lambda: stream.outbox.put(_END))
        reader = threading.Thread(target=self._read, args=(stream, requests), daemon=True)
        reader.start()
        while True:
            item = stream.outbox.get()
            if item is _END:
                return
            yield item

    def _read(self, stream: _Stream, requests: Iterator[Any]) -> None:
        try:
            for request in requests:
                with self._lock:
                    self._on_request(stream, request)
        except grpc.RpcError:
            pass  # Envoy went away or the server is stopping
        finally:
            stream.outbox.put(_END)

    def _on_request(self, stream: _Stream, request: Any) -> None:
        if request.HasField("node"):
            metadata = json_format.MessageToDict(request.node.metadata) if request.node.HasField("metadata") else {}
            self._nodes.append(SeenNode(request.node.id, request.node.cluster, metadata))
        type_url = request.type_url
        nonce = request.response_nonce
        if nonce:
            if nonce != stream.last_nonce.get(type_url):
                return  # a reply to a response already superseded: xDS says ignore it
            failed = request.HasField("error_detail")
            self._replies.append(
                Reply(
                    stream.protocol,
                    type_url,
                    nonce,
                    stream.last_version[type_url],
                    accepted=not failed,
                    error=request.error_detail.message if failed else "",
                )
            )
        # A first request for a type is answered; later ones only when they change what Envoy asks for (an ACK
        # that also subscribes a new EDS cluster's name, say).
        first = type_url not in stream.subscribed
        changed = self._subscribe(stream, request)
        if not (first or changed):
            return
        if self._held:
            stream.pending.add(type_url)
        else:
            self._send(stream, type_url)

    @staticmethod
    def _subscribe(stream: _Stream, request: Any) -> bool:
        """Update what `stream` asked for of request's type; True if that changed."""
        type_url = request.type_url
        before = stream.subscribed.get(type_url, set())
        if stream.protocol == "sotw":
            names = set(request.resource_names)  # SotW: every request carries the full set
            after = None if not names or "*" in names else names
        elif type_url not in stream.subscribed:
            names = set(request.resource_names_subscribe)  # delta: the first request subscribes, empty = wildcard
            after = None if not names or "*" in names else names
        elif before is None:
            after = None  # a wildcard already covers every name
        else:
            after = (before | set(request.resource_names_subscribe)) - set(request.resource_names_unsubscribe)
        stream.subscribed[type_url] = after
        return after != before

    def _answer(self, stream: _Stream, type_url: str) -> list[_Resource]:
        resources = self._resources.get(type_url, [])
        names = stream.subscribed.get(type_url)
        if names is None:
            return resources
        chosen = [r for r in resources if r.name in names]
        empty = _EMPTY_BY_NAME.get(type_url)
        if empty is not None:
            # What istiod does for a name it knows nothing better about: an empty resource of that name (a
            # ClusterLoadAssignment without endpoints). Envoy would otherwise wait for it (initial_fetch_timeout).
            missing = sorted(names - {r.name for r in chosen})
            chosen += [_Resource(name, "0", _to_any(empty(name))) for name in missing]
        return chosen

    def _send(self, stream: _Stream, type_url: str) -> None:
        resources = self._answer(stream, type_url)
        nonce = str(next(self._nonces))
        version = str(self._versions.get(type_url, 0))
        stream.last_nonce[type_url] = nonce
        stream.last_version[type_url] = version
        if stream.protocol == "sotw":
            response = discovery_pb2.DiscoveryResponse(
                version_info=version, type_url=type_url, nonce=nonce, resources=[r.body for r in resources]
            )
        else:
            names = {r.name for r in resources}
            removed = sorted(stream.sent_names.get(type_url, set()) - names)
            stream.sent_names[type_url] = names
            response = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version,
                type_url=type_url,
                nonce=nonce,
                removed_resources=removed,
                resources=[discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body) for r in resources],
            )
        stream.outbox.put(response)

    @staticmethod
    def _pack(items: Iterable[Any], version: str) -> list[_Resource]:
        packed = []
        for item in items:
            body = item if isinstance(item, any_pb2.Any) else _to_any(item)
            packed.append(_Resource(_name_of(body), version, body))
        return packed


# Resource builders for tests (Envoy v3 protos, ready for set_resources).

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def demo_listener(name: str, port: int, body: str, tls: Mapping[str, Any] | None = None) -> Any:
    """An HTTP listener on 127.0.0.1:`port` answering every request 200 `body` (a direct_response route); with
    `tls` (a DownstreamTlsContext as JSON), over TLS."""
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}
    transport = {}
    if tls is not None:
        transport["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": _DOWNSTREAM_TLS, **tls},
        }
    return listener(
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {
                    **transport,
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": _HCM,
                                "stat_prefix": name,
                                "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}]},
                                "http_filters": [
                                    {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}
                                ],
                            },
                        }
                    ],
                }
            ],
        }
    )


def mtls_listener(name: str, port: int, body: str) -> Any:
    """What istiod sends for an inbound port under PeerAuthentication STRICT: TLS with the SDS secret `default`,
    client certificates verified against the SDS secret `ROOTCA` (both from the agent's SDS server)."""
    from agent.bootstrap.tls import sds_secret  # noqa: PLC0415 (only this builder needs it)

    tls = {
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [sds_secret("default")],
            "validation_context_sds_secret_config": sds_secret("ROOTCA"),
        },
    }
    return demo_listener(name, port, body, tls=tls)


def broken_listener(name: str, port: int) -> Any:
    """Valid protobuf, invalid Envoy config: a network filter whose typed_config is a type no filter registers."""
    bogus = {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "not-a-filter"}
    return listener(
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "bogus", "typed_config": bogus}]}],
        }
    )


def static_cluster(name: str, port: int) -> Any:
    """A STATIC cluster of one endpoint, 127.0.0.1:`port`."""
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    return cluster(
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
        }
    )


def _to_any(message: Any) -> Any:
    body = any_pb2.Any()
    body.Pack(message)
    return body


def _name_of(body: Any) -> str:
    # Every xDS resource type this fake serves names itself in a `name` (or `cluster_name`) field.
    message = json_format.MessageToDict(body)
    name = message.get("name", message.get("clusterName"))
    assert isinstance(name, str) and name, f"resource of {body.type_url} has no name"
    return name
