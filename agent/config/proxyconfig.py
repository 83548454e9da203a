"""Istio's ProxyConfig: defaults, the three overlay sources, and the typed view the agent uses.

Precedence, later wins (Istio's `ConstructProxyConfig`): built-in defaults < mesh config `defaultConfig` <
`PROXY_CONFIG` < pod annotation `proxy.istio.io/config`. Each overlay replaces whole top-level fields (lists and
messages included, as the ProxyConfig API documents), except `proxyMetadata`, whose keys are merged.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.config.documents import parse_yaml
from agent.config.durations import parse_duration
from agent.config.schema import normalise_proxy_config, prune_defaults

# istio.io/istio pkg/config/mesh DefaultProxyConfig.
DEFAULTS: Mapping[str, Any] = types.MappingProxyType(
    {
        "configPath": "./etc/istio/proxy",
        "binaryPath": "/usr/local/bin/envoy",
        "serviceCluster": "istio-proxy",
        "drainDuration": "45s",
        "terminationDrainDuration": "5s",
        "proxyAdminPort": 15000,
        "controlPlaneAuthPolicy": "MUTUAL_TLS",
        "discoveryAddress": "istiod.istio-system.svc:15012",
        "statNameLength": 189,
        "statusPort": 15020,
    }
)
# Not set by Istio's defaults; Envoy's own default for --parent-shutdown-time-s is 900 s, the API doc says 60 s.
DEFAULT_PARENT_SHUTDOWN = 60.0
_ONEOFS = ({"serviceCluster", "tracingServiceName"},)


def parse_text(text: str, source: str) -> dict[str, Any]:
    """YAML or JSON text (JSON is YAML) -> normalised proto-JSON dict. Errors name `source` and line."""
    return normalise_proxy_config(parse_yaml(text, source, kind="YAML/JSON"), source)


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Istio's MergeProxyConfig on normalised dicts: fields replaced, `proxyMetadata` merged key by key."""
    out = dict(base)
    for key, value in overlay.items():
        for group in _ONEOFS:
            if key in group:
                for other in group - {key}:
                    out.pop(other, None)
        if key == "proxyMetadata":
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def _seconds(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key)
    return default if value is None else parse_duration(value, "ProxyConfig", key)


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclass(frozen=True)
class ProxyConfig:
    """The effective ProxyConfig. `raw` is its proto-JSON (what node metadata PROXY_CONFIG carries)."""

    raw: Mapping[str, Any]
    config_path: str
    binary_path: str
    service_cluster: str
    tracing_service_name: str
    discovery_address: str
    proxy_admin_port: int
    status_port: int
    drain_duration: float
    parent_shutdown_duration: float
    termination_drain_duration: float
    control_plane_auth_policy: str
    custom_config_file: str
    proxy_bootstrap_template_path: str
    concurrency: int | None
    file_flush_interval: float | None
    stat_name_length: int
    statsd_udp_address: str
    proxy_metadata: Mapping[str, str]
    runtime_values: Mapping[str, str]
    extra_stat_tags: tuple[str, ...]
    tracing: Mapping[str, Any] | None
    envoy_metrics_service: Mapping[str, Any] | None
    envoy_access_log_service: Mapping[str, Any] | None
    proxy_stats_matcher: Mapping[str, Any] | None
    stats_compression: bool | None

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> ProxyConfig:
        """Typed view of a normalised dict. No defaults are added here: `raw` is taken as the whole config."""
        frozen: Mapping[str, Any] = _frozen(prune_defaults(raw))
        concurrency = frozen.get("concurrency")
        flush = frozen.get("fileFlushInterval")
        return cls(
            raw=frozen,
            config_path=frozen.get("configPath", ""),
            binary_path=frozen.get("binaryPath", ""),
            service_cluster=frozen.get("serviceCluster", ""),
            tracing_service_name=frozen.get("tracingServiceName", "APP_LABEL_AND_NAMESPACE"),
            discovery_address=frozen.get("discoveryAddress", ""),
            proxy_admin_port=frozen.get("proxyAdminPort", 0),
            status_port=frozen.get("statusPort", 0),
            drain_duration=_seconds(frozen, "drainDuration", 0.0),
            parent_shutdown_duration=_seconds(frozen, "parentShutdownDuration", DEFAULT_PARENT_SHUTDOWN),
            termination_drain_duration=_seconds(frozen, "terminationDrainDuration", 0.0),
            control_plane_auth_policy=frozen.get("controlPlaneAuthPolicy", "NONE"),
            custom_config_file=frozen.get("customConfigFile", ""),
            proxy_bootstrap_template_path=frozen.get("proxyBootstrapTemplatePath", ""),
            concurrency=concurrency,
            file_flush_interval=None if flush is None else parse_duration(flush, "ProxyConfig", "fileFlushInterval"),
            stat_name_length=frozen.get("statNameLength", 0),
            statsd_udp_address=frozen.get("statsdUdpAddress", ""),
            proxy_metadata=frozen.get("proxyMetadata", types.MappingProxyType({})),
            runtime_values=frozen.get("runtimeValues", types.MappingProxyType({})),
            extra_stat_tags=frozen.get("extraStatTags", ()),
            tracing=frozen.get("tracing"),
            envoy_metrics_service=frozen.get("envoyMetricsService"),
            envoy_access_log_service=frozen.get("envoyAccessLogService"),
            proxy_stats_matcher=frozen.get("proxyStatsMatcher"),
            stats_compression=frozen.get("statsCompression"),
        )

    def to_proto_json(self) -> dict[str, Any]:
        """A plain (mutable) copy of the proto-JSON form."""
        result = _thawed(self.raw)
        assert isinstance(result, dict)
        return result
