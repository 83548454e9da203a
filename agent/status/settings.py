"""The status server's configuration: environment variables parsed into frozen data, once, at start-up.

Every bad value raises ConfigError naming the variable and the key inside it, so `pilot-agent proxy` exits with
ExitCode.CONFIG_ERROR and one line instead of serving half a configuration (Istio aborts too: NewServer fails).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config import env_settings as E
from agent.config.envvars import Environment, json_object
from agent.errors import ConfigError
from agent.flag_values import go_atoi

APP_PROBERS_ENV = E.ISTIO_KUBE_APP_PROBERS.source
ANNOTATIONS_ENV = E.ISTIO_PROMETHEUS_ANNOTATIONS.source

# Ports an application scrape target may not use: Istio's own (status/server.go, reserved for the sidecar).
RESERVED_PORTS = frozenset({15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090})
# Istio caps each scraped body at 10 MiB (status/server.go).
DEFAULT_SOURCE_CAP = 10 * 1024 * 1024
# Istio waits forever when Prometheus sends no X-Prometheus-Scrape-Timeout-Seconds; a never-answering application
# would then pin a scrape (and its sockets) for good. 10 s is Prometheus's own default scrape timeout.
DEFAULT_SCRAPE_TIMEOUT = 10.0

INT32_MAX = 2**31 - 1
_PROBE_KEY = re.compile(r"^/(app-health|app-lifecycle)/[^/]+/(livez|readyz|startupz|prestopz|poststartz)$")


@dataclass(frozen=True)
class HTTPGetAction:
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    # kubelet sends the probe's httpHeaders itself; we apply them again so a direct call behaves the same.
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TCPSocketAction:
    port: int


@dataclass(frozen=True)
class GRPCAction:
    port: int
    service: str = ""


ProbeAction = HTTPGetAction | TCPSocketAction | GRPCAction


@dataclass(frozen=True)
class AppProbe:
    action: ProbeAction
    # 0 means no timeout of our own (Istio's http.Client{Timeout: 0}); kubelet's own timeout still applies.
    timeout_seconds: float = 1.0


@dataclass(frozen=True)
class ScrapeTarget:
    port: int
    path: str = "/metrics"


@dataclass(frozen=True)
class StatusSettings:
    status_port: int = 15020
    envoy_prometheus_port: int = 15090
    admin_port: int = 15000
    proxy_type: str = "sidecar"
    # Where application probes go: INSTANCE_IP, or localhost under REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION.
    probe_host: str = "127.0.0.1"
    # Source address of probes: the capture rules RETURN traffic from 127.0.0.6 so it bypasses Envoy.
    probe_source_ip: str = "127.0.0.6"
    # Where application metrics are scraped: Istio's appMetricsURL is always http://localhost:<port><path>.
    scrape_host: str = "localhost"
    # "" = all interfaces, as Istio's net.Listen(":15020").
    listen_host: str = ""
    app_probes: Mapping[str, AppProbe] = field(default_factory=dict)
    scrape_targets: tuple[ScrapeTarget, ...] = ()
    merge_envoy_stats: bool = True
    metrics_localhost_only: bool = False
    source_cap_bytes: int = DEFAULT_SOURCE_CAP
    default_scrape_timeout: float = DEFAULT_SCRAPE_TIMEOUT

    @classmethod
    def from_env(
        cls,
        env: Environment,
        *,
        status_port: int = 15020,
        envoy_prometheus_port: int = 15090,
        proxy_type: str = "sidecar",
        instance_ip: str | None = None,
        admin_port: int = 15000,
        listen_host: str = "",
    ) -> StatusSettings:
        legacy_localhost = env[E.REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION]
        ip = instance_ip if instance_ip is not None else env[E.INSTANCE_IP]
        probe_host = "localhost" if legacy_localhost or not ip else ip
        ipv6 = ":" in ip and not legacy_localhost
        targets: tuple[ScrapeTarget, ...] = ()
        # Istio merges application metrics only for sidecars (status/server.go NewServer).
        if proxy_type == "sidecar":
            targets = parse_prometheus_annotations(env[E.ISTIO_PROMETHEUS_ANNOTATIONS], status_port)
        return cls(
            status_port=status_port,
            envoy_prometheus_port=envoy_prometheus_port,
            admin_port=admin_port,
            proxy_type=proxy_type,
            probe_host=probe_host,
            probe_source_ip="::6" if ipv6 else "127.0.0.6",
            listen_host=listen_host,
            app_probes=parse_app_probers(env[E.ISTIO_KUBE_APP_PROBERS]),
            scrape_targets=targets,
            merge_envoy_stats=env[E.PILOT_AGENT_MERGE_ENVOY_STATS],
            metrics_localhost_only=env[E.METRICS_LOCALHOST_ACCESS_ONLY],
        )


def _port(value: Any, source: str, key: str) -> int:
    """A port given as a JSON number or a numeric string (annotations are strings), 1-65535."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(source, key, f"must be an integer port, got {value!r}")
    try:
        port = value if isinstance(value, int) else go_atoi(value)
    except ValueError:
        raise ConfigError(source, key, f"must be an integer port, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(source, key, f"port {port} is out of range 1-65535")
    return port


def parse_app_probers(raw: str) -> dict[str, AppProbe]:
    """ISTIO_KUBE_APP_PROBERS: {"/app-health/<c>/readyz": {"httpGet"|"tcpSocket"|"grpc": {...}, "timeoutSeconds": 1}}"""
    if not raw.strip():
        return {}
    src = APP_PROBERS_ENV
    probes: dict[str, AppProbe] = {}
    for key, spec in json_object(raw, src).items():
        if not _PROBE_KEY.match(key):
            raise ConfigError(
                src, key, "key must look like /app-health/<container>/livez|readyz|startupz or /app-lifecycle/..."
            )
        if not isinstance(spec, dict):
            raise ConfigError(src, key, "must be an object with one of httpGet, tcpSocket, grpc")
        kinds = [k for k in ("httpGet", "tcpSocket", "grpc") if spec.get(k) is not None]
        if len(kinds) != 1:
            raise ConfigError(src, key, "must have exactly one of httpGet, tcpSocket, grpc")
        kind = kinds[0]
        body = spec[kind]
        where = f"{key}.{kind}"
        if not isinstance(body, dict):
            raise ConfigError(src, where, "must be an object")
        if "port" not in body:
            raise ConfigError(src, f"{where}.port", "is required")
        # Istio requires an integer here (the injector resolves named ports); a string is a broken injection.
        if isinstance(body["port"], str):
            raise ConfigError(src, f"{where}.port", f"must be an integer port, got {body['port']!r}")
        port = _port(body["port"], src, f"{where}.port")
        action: ProbeAction
        if kind == "httpGet":
            scheme = str(body.get("scheme") or "HTTP").upper()
            if scheme not in ("HTTP", "HTTPS"):
                raise ConfigError(src, f"{where}.scheme", f"must be HTTP or HTTPS, got {body.get('scheme')!r}")
            path = body.get("path") or "/"
            if not isinstance(path, str):
                raise ConfigError(src, f"{where}.path", "must be a string")
            action = HTTPGetAction(port, path if path.startswith("/") else "/" + path, scheme, _headers(body, where))
        elif kind == "tcpSocket":
            action = TCPSocketAction(port)
        else:
            service = body.get("service") or ""
            if not isinstance(service, str):
                raise ConfigError(src, f"{where}.service", "must be a string")
            action = GRPCAction(port, service)
        # Istio's Prober.TimeoutSeconds is an int32: Go refuses 1.5, 1e3 and anything beyond 2^31-1.
        timeout = spec.get("timeoutSeconds", 1)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout <= INT32_MAX:
            raise ConfigError(
                src, f"{key}.timeoutSeconds", f"must be a non-negative integer (seconds, int32), got {timeout!r}"
            )
        probes[key] = AppProbe(action, float(timeout))
    return probes


def _headers(body: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    raw = body.get("httpHeaders") or []
    if not isinstance(raw, list):
        raise ConfigError(APP_PROBERS_ENV, f"{where}.httpHeaders", "must be a list of {name, value}")
    headers = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ConfigError(APP_PROBERS_ENV, f"{where}.httpHeaders[{i}]", "must be {name: string, value: string}")
        headers.append((item["name"], str(item.get("value", ""))))
    return tuple(headers)


def parse_prometheus_annotations(raw: str, status_port: int) -> tuple[ScrapeTarget, ...]:
    """ISTIO_PROMETHEUS_ANNOTATIONS: {"scrape", "path", "port", "targets": [{"port", "path"}]} -> scrape targets."""
    if not raw.strip():
        return ()
    src = ANNOTATIONS_ENV
    config = json_object(raw, src)
    scrape = config.get("scrape", "")
    if not isinstance(scrape, str | bool):
        raise ConfigError(src, "scrape", f'must be "true" or "false", got {scrape!r}')
    if str(scrape).lower() == "false":
        return ()
    targets_raw = config.get("targets")
    if targets_raw:
        if not isinstance(targets_raw, list):
            raise ConfigError(src, "targets", "must be a list of {port, path}")
        targets = []
        for i, item in enumerate(targets_raw):
            key = f"targets[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(src, key, "must be an object {port, path}")
            port = _port(item.get("port"), src, f"{key}.port")
            if port == status_port or port in RESERVED_PORTS:
                raise ConfigError(src, f"{key}.port", f"port {port} is reserved by the sidecar")
            targets.append(ScrapeTarget(port, _path(item.get("path"), f"{key}.path")))
        return tuple(targets)
    port = _port(config.get("port") or "80", src, "port")
    if port == status_port:
        raise ConfigError(src, "port", f"port {port} is the status port itself")
    return (ScrapeTarget(port, _path(config.get("path"), "path")),)


def _path(value: Any, key: str) -> str:
    if value is None or value == "":
        return "/metrics"
    if not isinstance(value, str):
        raise ConfigError(ANNOTATIONS_ENV, key, f"must be a string, got {value!r}")
    return value if value.startswith("/") else "/" + value
