"""Envoy node metadata, locality and cluster, with Istio's rules (pkg/bootstrap GetNodeMetaData, marshalMetadata).

The quirks are deliberate (istiod reads them): every `ISTIO_META_X=v` becomes `X: "v"`; every `ISTIO_METAJSON_*`
JSON object is merged key by key into the top level (the variable's name is ignored); typed fields win over raw
keys; LABELS and STATIC_LABELS are the same map unless a labels file exists; output is compact JSON, sorted keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.config.agent_config import AgentConfig
from agent.config.envvars import parse_go_bool
from agent.errors import ConfigError

META_PREFIX = "ISTIO_META_"
METAJSON_PREFIX = "ISTIO_METAJSON_"
LOCALITY_LABEL = "istio-locality"
# Typed model.StringBool fields: a raw "True"/"1" is rewritten to "true"; a false value is omitted by the typed
# struct and then re-added verbatim from the raw map (so "0" stays "0"); anything else fails, as in Go.
STRING_BOOL_KEYS = frozenset(
    {
        "ENABLE_HBONE",
        "DISABLE_HBONE_SEND",
        "DNS_CAPTURE",
        "DNS_AUTO_ALLOCATE",
        "HTTP10",
        "UNPRIVILEGED_POD",
        "INBOUND_LISTENER_EXACT_BALANCE",
        "OUTBOUND_LISTENER_EXACT_BALANCE",
        "ENABLE_SELF_DISCOVERY",
    }
)


@dataclass(frozen=True)
class Node:
    id: str
    cluster: str
    locality: Mapping[str, str]
    metadata: Mapping[str, Any]  # the merged metadata object, before JSON encoding
    raw: Mapping[str, Any]  # the untyped metadata map (env + proxyMetadata), for options that read it
    labels: Mapping[str, str]


def _raw_metadata(cfg: AgentConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """The untyped map and where each key came from (for error messages)."""
    raw: dict[str, Any] = dict(cfg.istio_meta())
    where = {False: "ProxyConfig proxyMetadata.", True: "env "}
    origin = {key: f"{where[key in cfg.env_metadata]}{META_PREFIX}{key}" for key in raw}
    # Go walks the env list twice: all ISTIO_META_* first, then all ISTIO_METAJSON_*.
    for name, obj in cfg.env_metadata_json:
        for k, v in obj.items():
            raw[k] = v
            origin[k] = f"env {name}"
    if cfg.dns_proxy_addr:
        raw["DNS_PROXY_ADDR"] = cfg.dns_proxy_addr
        origin["DNS_PROXY_ADDR"] = "env DNS_PROXY_ADDR"
    if cfg.node.credential_socket_exists:
        raw["credential"] = "true"
    if cfg.node.custom_credentials_file_exists:
        raw["file-credential"] = "true"
    return raw, origin


def _static_labels(cfg: AgentConfig) -> dict[str, str] | None:
    name = f"{METAJSON_PREFIX}LABELS"
    labels = dict(dict(cfg.env_metadata_json).get(name, {}))
    for k, v in labels.items():
        if not isinstance(v, str):
            raise ConfigError(f"env {name}", k, "label values must be strings")
    return labels or None


def canonical_service(labels: Mapping[str, str], workload_name: str) -> str:
    for key in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"):
        if labels.get(key):
            return labels[key]
    return workload_name


def service_cluster(cfg: AgentConfig, labels: Mapping[str, str], workload_name: str) -> str:
    """Istio's getServiceCluster / serviceClusterOrDefault."""
    ns = cfg.pod_namespace

    def or_default(name: str) -> str:
        if name and name != "istio-proxy":
            return name
        # Istio's labels.GetApp: the first of these labels present (pkg/kube/labels nameLabelsBackwardCompatible).
        for key in ("app", "app.kubernetes.io/name", "service.istio.io/canonical-name"):
            if key in labels:
                return f"{labels[key]}.{ns}"
        if workload_name:
            return f"{workload_name}.{ns}"
        return f"istio-proxy.{ns}" if ns else "istio-proxy"

    mode = cfg.proxy.tracing_service_name
    if "serviceCluster" in cfg.proxy.raw or "tracingServiceName" not in cfg.proxy.raw:
        return or_default(cfg.proxy.service_cluster)
    workload = workload_name or "istio-proxy"
    if mode == "CANONICAL_NAME_ONLY":
        return or_default(canonical_service(labels, workload))
    if mode == "CANONICAL_NAME_AND_NAMESPACE":
        cs = canonical_service(labels, workload)
        return f"{cs}.{ns}" if ns else or_default(cs)
    return or_default("istio-proxy")


def build_node(cfg: AgentConfig) -> Node:
    raw, origin = _raw_metadata(cfg)
    typed: dict[str, Any] = {}
    for key in STRING_BOOL_KEYS & raw.keys():
        value = raw[key]
        parsed = parse_go_bool(value) if isinstance(value, str) else None
        if parsed is None:
            raise ConfigError(origin.get(key, "node metadata"), key, f"expected true or false, got {value!r}")
        if parsed:
            typed[key] = "true"

    static = _static_labels(cfg)
    labels: dict[str, str] | None = static
    if cfg.labels_file_found:
        labels = dict(static or {})
        labels.update({k: v for k, v in cfg.labels.items() if k != "pod-template-hash"})
    locality: dict[str, str] = {}
    if labels and labels.get(LOCALITY_LABEL):
        sanitized = labels[LOCALITY_LABEL].replace(".", "/")
        labels[LOCALITY_LABEL] = sanitized  # also rewrites STATIC_LABELS when they are the same map, as in Go
        parts = sanitized.split("/", 2)
        for name, part in zip(("region", "zone", "sub_zone"), parts, strict=False):
            if part:
                locality[name] = part

    annotations: dict[str, str] = {}
    if cfg.annotations_file_found:
        annotations.update(cfg.annotations)

    istio_version = raw.get("ISTIO_VERSION") or cfg.node.istio_version
    hbone = typed.get("ENABLE_HBONE") == "true"
    metadata_discovery = cfg.node.metadata_discovery if cfg.node.metadata_discovery is not None else hbone
    typed.update(
        {
            "PROXY_CONFIG": cfg.proxy.to_proto_json(),
            "ISTIO_VERSION": istio_version,
            "INSTANCE_IPS": ",".join(dict.fromkeys(cfg.instance_ips)),
            "ENVOY_STATUS_PORT": cfg.envoy_status_port,
            "ENVOY_PROMETHEUS_PORT": cfg.envoy_prometheus_port,
            "ENVOY_SECURE_METRICS_PORT": cfg.envoy_secure_metrics_port,
            "ENVOY_SECURE_MERGED_METRICS_PORT": cfg.envoy_secure_merged_metrics_port,
            "STS_PORT": str(cfg.node.sts_port) if cfg.node.sts_port else "",
            "WORKLOAD_IDENTITY_SOCKET_FILE": cfg.node.workload_identity_socket_file,
            "METADATA_DISCOVERY": "true" if metadata_discovery else "false",
            "LABELS": labels,
            "STATIC_LABELS": static,
            "ANNOTATIONS": annotations,
            "NAME": cfg.pod_name or raw.get("NAME", ""),
            "NAMESPACE": cfg.pod_namespace or raw.get("NAMESPACE", ""),
            "SERVICE_ACCOUNT": cfg.service_account or raw.get("SERVICE_ACCOUNT", ""),
            "PILOT_SAN": list(cfg.node.pilot_san),
            "OUTLIER_LOG_PATH": cfg.outlier_log_path,
            "XDS_ROOT_CA": cfg.node.xds_root_cert,
        }
    )
    if cfg.node.exit_on_zero_active_connections:
        typed["EXIT_ON_ZERO_ACTIVE_CONNECTIONS"] = "true"
    if cfg.node.skip_deprecated_logs:
        typed["ENVOY_SKIP_DEPRECATED_LOGS"] = "true"
    # omitempty: empty typed fields are dropped, and then raw keys of the same name come back (marshalMetadata).
    metadata = {k: v for k, v in typed.items() if v not in (None, "", 0, [], {})}
    for key, value in raw.items():
        metadata.setdefault(key, value)
    workload_name = raw.get("WORKLOAD_NAME", "")
    effective_labels = labels or {}
    return Node(
        id=cfg.node_id,
        cluster=service_cluster(cfg, effective_labels, workload_name if isinstance(workload_name, str) else ""),
        locality=locality,
        metadata=metadata,
        raw=raw,
        labels=effective_labels,
    )
