"""The xDS proxy's settings: frozen data, light imports (read before Envoy's exec)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.security.settings import UpstreamSettings


@dataclass(frozen=True)
class XdsProxySettings:
    socket_path: str  # <configPath>/XDS
    upstream: UpstreamSettings  # discoveryAddress, TLS, token, clusterid and XDS_HEADER_* headers
