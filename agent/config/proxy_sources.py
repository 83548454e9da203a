"""Istio's ConstructProxyConfig: the effective ProxyConfig from its sources (defaults < mesh config `defaultConfig`
< PROXY_CONFIG < the `proxy.istio.io/config` annotation), the overriding flags and annotations, and the statsd
address resolved to an IP as Envoy's statsd sink needs."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.config import env_settings as E
from agent.config.documents import parse_yaml, read_file_if_present, utf8_text
from agent.config.durations import format_proto
from agent.config.envvars import Environment
from agent.config.flags import ProxyFlags
from agent.config.proxyconfig import DEFAULTS, ProxyConfig, merge, parse_text
from agent.config.schema import normalise_proxy_config
from agent.errors import ConfigError
from agent.flag_values import go_atoi

log = logging.getLogger("agent.config")

ANNOTATION_PROXY_CONFIG = "proxy.istio.io/config"
ANNOTATION_DISCOVERY_ADDRESS = "sidecar.istio.io/discoveryAddress"
ANNOTATION_STATUS_PORT = "status.sidecar.istio.io/port"
# Envoy's --drain-time-s, --parent-shutdown-time-s, --file-flush-interval-msec and --concurrency are uint32.
UINT32_MAX = 2**32 - 1
# Envoy runs a thread per worker; tens of thousands fail at start (out of file descriptors), not in validation.
MAX_CONCURRENCY = 1024
# ISTIO_META_<key> values that name files (the TLS client/server material Envoy loads through the agent's SDS).
TLS_FILE_METADATA = (
    "TLS_CLIENT_CERT_CHAIN",
    "TLS_CLIENT_KEY",
    "TLS_CLIENT_ROOT_CERT",
    "TLS_SERVER_CERT_CHAIN",
    "TLS_SERVER_KEY",
    "TLS_SERVER_ROOT_CERT",
)


def read_mesh_config(path: Path) -> dict[str, Any]:
    """The mesh config file's `defaultConfig`, normalised; {} when the file does not exist."""
    data = read_file_if_present(path, str(path))
    if data is None:
        return {}
    mesh = parse_yaml(utf8_text(data, str(path)), str(path))
    if mesh is None:
        return {}
    if not isinstance(mesh, Mapping):
        raise ConfigError(str(path), "", "mesh config must be a YAML mapping")
    default = mesh.get("defaultConfig", mesh.get("default_config"))
    return normalise_proxy_config(default, f"{path} defaultConfig")


def pilot_san(proxy: ProxyConfig) -> tuple[str, ...]:
    if proxy.control_plane_auth_policy != "MUTUAL_TLS":
        return ()
    # Istio's GetPilotSan: the host part; a local-debugging "localhost" still gets istiod's certificate name.
    host = proxy.discovery_address.split(":")[0]
    if host == "localhost":
        host = "istiod.istio-system.svc"
    return (host,)


def assemble_proxy_config(
    flags: ProxyFlags,
    env: Environment,
    annotations: Mapping[str, str],
    annotations_path: Path,
    resolve: Callable[[str], str],
) -> ProxyConfig:
    """Istio's ConstructProxyConfig: defaults < mesh config < PROXY_CONFIG < annotation, then overrides.
    `resolve` turns statsdUdpAddress into what Envoy gets ("" drops it): `resolve_statsd`, or a memo of it."""
    raw = dict(DEFAULTS)
    raw = merge(raw, read_mesh_config(Path(flags.mesh_config)))
    proxy_config = env[E.PROXY_CONFIG]
    if proxy_config.strip():
        raw = merge(raw, parse_text(proxy_config, E.PROXY_CONFIG.source))
    anno_source = f"{annotations_path} annotation {ANNOTATION_PROXY_CONFIG}"
    if annotations.get(ANNOTATION_PROXY_CONFIG, "").strip():
        raw = merge(raw, parse_text(annotations[ANNOTATION_PROXY_CONFIG], anno_source))
    # Concurrency: the CPU limit when unset, then the legacy --concurrency flag wins.
    cpu_limit = env[E.ISTIO_CPU_LIMIT]
    if "concurrency" not in raw and cpu_limit > 0:
        raw["concurrency"] = cpu_limit
    if flags.concurrency:
        raw["concurrency"] = flags.concurrency
    if flags.termination_drain_duration:
        raw["terminationDrainDuration"] = flags.termination_drain_duration
    if not raw.get("serviceCluster") and not raw.get("tracingServiceName"):
        raw["serviceCluster"] = flags.service_cluster
    if flags.template_file and not raw.get("customConfigFile"):
        raw["proxyBootstrapTemplatePath"] = flags.template_file
    if ANNOTATION_DISCOVERY_ADDRESS in annotations:
        raw["discoveryAddress"] = annotations[ANNOTATION_DISCOVERY_ADDRESS]
    if ANNOTATION_STATUS_PORT in annotations:
        value = annotations[ANNOTATION_STATUS_PORT].strip()
        try:
            port = go_atoi(value)
        except ValueError:
            port = 0
        if not 0 < port <= 65535:
            raise ConfigError(f"{annotations_path}", ANNOTATION_STATUS_PORT, f"{value!r} is not a valid port")
        raw["statusPort"] = port
    if raw.get("statsdUdpAddress"):
        raw["statsdUdpAddress"] = resolve(raw["statsdUdpAddress"])
        if not raw["statsdUdpAddress"]:
            del raw["statsdUdpAddress"]
    proxy = ProxyConfig.from_raw(normalise_proxy_config(raw, "effective ProxyConfig"))
    _validate(proxy)
    return proxy


def resolve_statsd(address: str) -> str:
    """Istio resolves statsdUdpAddress once at start (Envoy's statsd sink needs an IP) and drops it, with a
    warning, when the name does not resolve."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep:
        return address  # left for the bootstrap's host:port check to report
    try:
        ipaddress.ip_address(host)
        return address
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port or None, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError, ValueError) as exc:
        log.warning("statsdUdpAddress %s does not resolve (%s): statsd sink disabled", address, exc)
        return ""
    ip = str(infos[0][4][0])
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _validate(proxy: ProxyConfig) -> None:
    """What Istio's ValidateMeshConfigProxyConfig checks that the agent uses, and what Envoy would refuse only
    after it started (its command-line flags are 32-bit)."""
    src = "effective ProxyConfig"
    if not proxy.config_path:
        raise ConfigError(src, "configPath", "must not be empty")
    for name, port in (("proxyAdminPort", proxy.proxy_admin_port), ("statusPort", proxy.status_port)):
        if not 0 < port <= 65535:
            raise ConfigError(src, name, f"{port} is not a valid port (1-65535)")
    if proxy.concurrency is not None and not 0 <= proxy.concurrency <= MAX_CONCURRENCY:
        raise ConfigError(
            src,
            "concurrency",
            f"{proxy.concurrency} is not in [0, {MAX_CONCURRENCY}] (ProxyConfig, ISTIO_CPU_LIMIT or --concurrency;"
            " Envoy starts one thread per worker)",
        )
    if proxy.stat_name_length < 0:
        raise ConfigError(src, "statNameLength", "must not be negative")
    # Istio's ValidateDrainDuration.
    drain_ms = round(proxy.drain_duration * 1000, 6)
    if drain_ms < 1 or drain_ms % 1000:
        raise ConfigError(src, "drainDuration", f"{format_proto(proxy.drain_duration)}: must be whole seconds, >= 1s")
    for name, seconds, flag in (
        ("drainDuration", proxy.drain_duration, "--drain-time-s"),
        ("parentShutdownDuration", proxy.parent_shutdown_duration, "--parent-shutdown-time-s"),
    ):
        if int(seconds) > UINT32_MAX:
            raise ConfigError(src, name, f"{format_proto(seconds)} is more than Envoy's {flag} takes ({UINT32_MAX}s)")
    flush = proxy.file_flush_interval
    if flush is not None and int(flush * 1000) > UINT32_MAX:
        raise ConfigError(
            src, "fileFlushInterval", f"{format_proto(flush)} is more than Envoy's --file-flush-interval-msec takes"
        )
    for key in TLS_FILE_METADATA:
        if "\0" in proxy.proxy_metadata.get(f"ISTIO_META_{key}", ""):
            raise ConfigError(src, f"proxyMetadata.ISTIO_META_{key}", "a path must not contain a NUL byte")
