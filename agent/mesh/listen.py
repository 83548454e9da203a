"""The sockets Envoy dials, made before Envoy's exec (light imports: grpc and the socket helper only).

Istio's Agent.Run order: the SDS socket check (Istio's checkSocket), the SDS socket, the xDS socket, then Envoy.
The services behind the sockets (agent.mesh.service) are built after the exec and attach to them. The workload key
is asked for before this module (and grpc) loads: agent.security.key_worker.ask_key_ahead.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from agent.mesh.settings import FILES_SOCKET, MeshSettings
from agent.security.key_worker import KeyWorker
from agent.security.uds import STREAM, UNARY, SocketError, UnixGrpcServer, remove_socket, socket_is_healthy

log = logging.getLogger("agent.mesh")

XDS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
# Istio's pilot/pkg/grpc ServerOptions with its keepalive defaults.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.max_receive_message_length", 4 << 20),
    ("grpc.max_send_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 15_000),
)


def xds_listener(socket_path: str) -> UnixGrpcServer:
    """The socket Envoy's `xds-grpc` cluster dials (served by agent.xds.proxy.XdsProxy)."""
    methods = {"StreamAggregatedResources": STREAM, "DeltaAggregatedResources": STREAM}
    return UnixGrpcServer(socket_path, XDS_SERVICE, methods, SERVER_OPTIONS)


def sds_listener(socket_path: str) -> UnixGrpcServer:
    """The socket Envoy's `sds-grpc` cluster dials (served by agent.security.sds.SdsServer)."""
    methods = {"StreamSecrets": STREAM, "DeltaSecrets": STREAM, "FetchSecrets": UNARY}
    return UnixGrpcServer(socket_path, SDS_SERVICE, methods, [("grpc.max_concurrent_streams", 100_000)])


@dataclass
class MeshListeners:
    """The sockets Envoy dials, listening. `serve_only_files`: another identity provider owns the SDS socket;
    ours serves only file certificates, on Istio's files socket. `key_ahead`: with a CA, the worker already making
    the workload key (agent.security.key_worker), for the secret cache's first CSR."""

    sds: UnixGrpcServer
    xds: UnixGrpcServer | None
    serve_only_files: bool
    key_ahead: KeyWorker | None = None

    async def stop(self) -> None:
        for listener in (self.xds, self.sds):
            if listener is not None:
                await listener.stop()
        if self.key_ahead is not None:
            await self.key_ahead.close()


async def listen(settings: MeshSettings, key_ahead: KeyWorker | None = None) -> MeshListeners:
    """Istio's checkSocket, then the SDS and xDS sockets. Raises SocketError (the agent does not start).
    `key_ahead`: the worker asked for the workload key (with a CA); kept in the result, or ended if unused."""
    try:
        listeners = await _listen(settings)
    except BaseException:
        if key_ahead is not None:
            await key_ahead.close()
        raise
    if key_ahead is not None and listeners.serve_only_files:
        await key_ahead.close()  # another identity provider serves the workload certificate
        key_ahead = None
    listeners.key_ahead = key_ahead
    return listeners


async def _listen(settings: MeshSettings) -> MeshListeners:
    sds_path = settings.sds_socket
    serve_only_files = False
    if _is_socket(sds_path):
        if await socket_is_healthy(sds_path):
            log.info(
                "Existing workload SDS socket found at %s. Default Istio SDS Server will only serve files", sds_path
            )
            serve_only_files = True
            sds_path = FILES_SOCKET
        else:
            log.info("removing the unhealthy SDS socket at %s", sds_path)
            remove_socket(sds_path)
    elif settings.custom_sds_socket:
        raise SocketError(f"agent configured for non-default SDS socket path: {sds_path} but no socket found")
    sds = sds_listener(sds_path)
    await sds.start()
    xds = None
    if settings.xds is not None:
        xds = xds_listener(settings.xds.socket_path)
        try:
            await xds.start()
        except SocketError:
            await sds.stop()
            raise
    return MeshListeners(sds, xds, serve_only_files)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False
