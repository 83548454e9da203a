"""AgentConfig -> the template's parameters. Pure: all of the bootstrap's logic lives here, none in the template.

Structured values (metadata, runtime layer, stats lists, transport sockets, addresses) are Python objects that
the template writes with its `json` filter, so the template never builds JSON by string concatenation.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.bootstrap import stats
from agent.bootstrap.metadata import build_node
from agent.bootstrap.tls import transport_socket
from agent.config.agent_config import AgentConfig
from agent.config.proxy_sources import UINT32_MAX
from agent.errors import ConfigError

LIGHTSTEP_TOKEN_FILE = "lightstep_access_token.txt"
MAX_CONNECTIONS_RUNTIME_KEY = "overload.global_downstream_max_connections"
DEFAULT_MAX_CONNECTIONS = 2147483647
INT64_MAX = 2**63 - 1
SDS_SOCKET_DIR = "./var/run/secrets/workload-spiffe-uds"
# Runtime flags Istio sets on every proxy (pkg/bootstrap extractRuntimeFlags); runtimeValues override them.
DEFAULT_RUNTIME_FLAGS: Mapping[str, Any] = {
    stats.RE2_PROGRAM_SIZE_FLAG: stats.DEFAULT_RE2_PROGRAM_SIZE,
    "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst": True,
    "envoy.reloadable_features.http_reject_path_with_fragment": False,
    "envoy.reloadable_features.fixed_heap_use_allocated": True,
    "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update": False,
}


def split_host_port(address: str, source: str, field: str, host_ip: str = "") -> dict[str, Any]:
    """Go's net.SplitHostPort, then {"address": host, "port_value": port}; `$(HOST_IP)` -> HOST_IP."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
        if ":" in host:
            raise ConfigError(source, field, f"{address!r}: too many colons (bracket IPv6 hosts: [::1]:9411)")
    if not sep or not re.fullmatch("[0-9]+", port) or int(port) > 65535:
        raise ConfigError(source, field, f"{address!r} is not host:port")
    if host == "$(HOST_IP)" and host_ip:
        host = host_ip
    return {"address": host, "port_value": int(port)}


def runtime_flags(cfg: AgentConfig) -> dict[str, Any]:
    flags = dict(DEFAULT_RUNTIME_FLAGS)
    if cfg.node.compliance_policy == "fips-140-2":
        # Limits Envoy's google_grpc client to TLS 1.2.
        flags["envoy.reloadable_features.google_grpc_disable_tls_13"] = True
    if not cfg.strip_fragment:
        # Istio's flag is backwards on purpose ("cannot be reverted").
        flags["envoy.reloadable_features.http_strip_fragment_from_path_unsafe_if_disabled"] = "false"
    for key, value in cfg.proxy.runtime_values.items():
        if value == "":
            flags.pop(key, None)  # "" means: unset a default flag
        else:
            flags[key] = {"true": True, "false": False}.get(value, value)
    return flags


def max_connections(cfg: AgentConfig) -> int:
    """proxyMetadata ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS > runtime flag > 2^31-1.

    Not `connectionSettings.globalDownstreamConnectionLimit`: Istio's agent (at the pinned version) validates that
    field but leaves it out of the bootstrap ("wired in later PR"), and so do we."""
    for source, value in (
        (
            "proxyMetadata.ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS",
            cfg.proxy.proxy_metadata.get("ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS"),
        ),
        (f"runtimeValues.{MAX_CONNECTIONS_RUNTIME_KEY}", cfg.proxy.runtime_values.get(MAX_CONNECTIONS_RUNTIME_KEY)),
    ):
        if value:
            # Go's strconv.Atoi range (int64): Istio takes nothing larger.
            if not re.fullmatch("[0-9]+", value.strip()) or int(value) > INT64_MAX:
                raise ConfigError("ProxyConfig", source, f"expected a non-negative integer (int64), got {value!r}")
            return int(value)
    return DEFAULT_MAX_CONNECTIONS


def _ip_family(ips: tuple[str, ...], dual_stack: bool) -> dict[str, Any]:
    versions = []
    for ip in ips:
        try:
            versions.append(ipaddress.ip_address(ip).version)
        except ValueError:
            versions.append(4)
    v4 = {"localhost": "127.0.0.1", "wildcard": "0.0.0.0", "dns_lookup_family": "V4_ONLY"}
    if all(v == 4 for v in versions):
        return {**v4, "dual_stack": False}
    if all(v == 6 for v in versions):
        return {"localhost": "::1", "wildcard": "::", "dns_lookup_family": "V6_ONLY", "dual_stack": False}
    if not dual_stack:
        return {**v4, "dual_stack": False}
    first_v6 = versions[0] == 6
    return {
        "localhost": "::1" if first_v6 else "127.0.0.1",
        "wildcard": "::" if first_v6 else "0.0.0.0",
        "additional_localhost": "127.0.0.1" if first_v6 else "::1",
        "additional_wildcard": "0.0.0.0" if first_v6 else "::",
        "dns_lookup_family": "ALL",
        "dual_stack": True,
    }


def _tracer(cfg: AgentConfig, meta: Mapping[str, Any], cluster: str) -> dict[str, Any] | None:
    tracing = cfg.proxy.tracing
    if tracing is None:
        return None
    src = "ProxyConfig"
    for kind in ("stackdriver", "openCensusAgent"):
        if kind in tracing:
            raise ConfigError(src, f"tracing.{kind}", "not supported: Envoy 1.40 has no OpenCensus tracer")
    for kind, cluster_name in (("zipkin", "zipkin"), ("lightstep", "lightstep"), ("datadog", "datadog_agent")):
        if kind not in tracing:
            continue
        settings = tracing[kind]
        address = split_host_port(settings.get("address", ""), src, f"tracing.{kind}.address", cfg.host_ip)
        h2 = kind == "lightstep"
        return {
            "kind": kind,
            "cluster_name": cluster_name,
            "address": address,
            "tls": transport_socket(tracing.get("tlsSettings"), cluster_name, meta, h2),
            "token_file": str(Path(cfg.proxy.config_path) / LIGHTSTEP_TOKEN_FILE) if h2 else "",
            "token": settings.get("accessToken", "") if h2 else "",
            "service_name": cluster,
        }
    return None


def _remote_service(
    cfg: AgentConfig, service: Mapping[str, Any] | None, name: str, field: str, meta: Mapping[str, Any]
) -> dict[str, Any] | None:
    if not service or not service.get("address"):
        return None
    keepalive = None
    if service.get("tcpKeepalive") is not None:
        ka = service["tcpKeepalive"]
        keepalive = {}
        if ka.get("probes"):
            keepalive["keepalive_probes"] = ka["probes"]
        for key, out in (("time", "keepalive_time"), ("interval", "keepalive_interval")):
            seconds = int(float(str(ka.get(key, "0s")).rstrip("s")))
            if seconds > UINT32_MAX:  # Envoy's keepalive_time/interval are UInt32Value seconds
                raise ConfigError(
                    "ProxyConfig", f"{field}.tcpKeepalive.{key}", f"{seconds}s is more than {UINT32_MAX}s"
                )
            if seconds > 0:
                keepalive[out] = seconds
        keepalive = {"tcp_keepalive": keepalive}
    return {
        "name": name,
        "address": split_host_port(service["address"], "ProxyConfig", f"{field}.address", cfg.host_ip),
        "tls": transport_socket(service.get("tlsSettings"), name, meta, True),
        "keepalive": keepalive,
    }


def _load_stats_config(raw: Mapping[str, Any]) -> Any:
    text = raw.get("LOAD_STATS_CONFIG_JSON")
    if not text:
        return None
    try:
        return json.loads(str(text))
    except ValueError as exc:
        raise ConfigError("node metadata", "LOAD_STATS_CONFIG_JSON", f"not valid JSON: {exc}") from None


def template_params(cfg: AgentConfig) -> dict[str, Any]:
    node = build_node(cfg)
    meta = node.metadata
    xds_type = "DELTA_GRPC" if cfg.delta_xds else "GRPC"
    metadata_discovery = meta.get("METADATA_DISCOVERY") == "true"
    if cfg.node_id.startswith("waypoint~"):
        xds_type, metadata_discovery = "DELTA_GRPC", True
    if xds_type == "GRPC" or cfg.local_xds_dir:
        metadata_discovery = False  # needs ADS with delta xDS: not on state-of-the-world, not from files
    flush, eviction = stats.intervals(cfg)
    statsd = None
    if cfg.proxy.statsd_udp_address:
        statsd = split_host_port(cfg.proxy.statsd_udp_address, "ProxyConfig", "statsdUdpAddress", cfg.host_ip)
    family = _ip_family(cfg.instance_ips, cfg.dual_stack)
    localhost_only = cfg.proxy.proxy_metadata.get("METRICS_LOCALHOST_ACCESS_ONLY") == "true"
    load_stats = _load_stats_config(node.raw)
    local_xds = None
    if cfg.local_xds_dir:
        local_xds = {
            "directory": cfg.local_xds_dir,
            "lds": str(Path(cfg.local_xds_dir) / "lds.yaml"),
            "cds": str(Path(cfg.local_xds_dir) / "cds.yaml"),
        }
    return {
        "node_id": node.id,
        "cluster": node.cluster,
        "locality": dict(node.locality),
        "metadata": node.metadata,
        "log_json": cfg.node.log_as_json,
        "runtime_flags": runtime_flags(cfg),
        "metadata_discovery": metadata_discovery,
        "stats_flush_interval": flush,
        "stats_eviction_interval": eviction,
        "stats_tags": stats.stats_tags(cfg),
        "histogram_buckets": stats.histogram_buckets(cfg),
        "stats_matcher_patterns": stats.inclusion_patterns(cfg, metadata_discovery),
        "admin_port": cfg.proxy.proxy_admin_port,
        "status_port": cfg.proxy.status_port,
        "xds_type": xds_type,
        "xds_path": f"{cfg.proxy.config_path}/XDS",
        "local_xds": local_xds,
        "sds_socket_path": f"{SDS_SOCKET_DIR}/{cfg.node.workload_identity_socket_file}",
        "tracer": _tracer(cfg, meta, node.cluster),
        "metrics_service": _remote_service(
            cfg, cfg.proxy.envoy_metrics_service, "envoy_metrics_service", "envoyMetricsService", meta
        ),
        "accesslog_service": _remote_service(
            cfg, cfg.proxy.envoy_access_log_service, "envoy_accesslog_service", "envoyAccessLogService", meta
        ),
        "statsd": statsd,
        "envoy_prometheus_port": cfg.envoy_prometheus_port,
        "envoy_status_port": cfg.envoy_status_port,
        "secure_metrics_port": cfg.envoy_secure_metrics_port,
        "secure_merged_metrics_port": cfg.envoy_secure_merged_metrics_port,
        "status_port_proxy_protocol": cfg.status_port_proxy_protocol,
        "prometheus_address": family["localhost"] if localhost_only else family["wildcard"],
        "stats_compression": cfg.proxy.stats_compression is not False,
        "max_connections": max_connections(cfg),
        "outlier_log_path": cfg.outlier_log_path,
        "load_stats_config": load_stats,
        **family,
    }
