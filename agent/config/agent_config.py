"""Everything the agent is configured by, read once into a frozen AgentConfig (re-read on every call).

Sources: the `proxy` flags, the environment mapping passed in (never os.environ implicitly), the mesh config file,
the downward-API files and the files they name. `NodeOverrides` lets a caller (the conformance test) fix what the
agent would otherwise compute: node id, IPs, PILOT_SAN, version, ports, the ProxyConfig itself.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from agent.config import env_settings as E
from agent.config import network
from agent.config.downward import read_downward_api
from agent.config.envvars import Environment, EnvVar, json_object
from agent.config.flags import ProxyFlags, split_component_log
from agent.config.proxyconfig import DEFAULTS, ProxyConfig, merge, parse_text
from agent.config.schema import normalise_proxy_config
from agent.errors import ConfigError

log = logging.getLogger("agent.config")
_T = TypeVar("_T")

LABELS_PATH = "./etc/istio/pod/labels"
ANNOTATIONS_PATH = "./etc/istio/pod/annotations"
PROXY_TYPES = ("sidecar", "router", "waypoint", "ztunnel", "agentgateway")
# The Istio release whose agent behaviour (bootstrap, metadata) this one reproduces; istiod gates features on
# node metadata ISTIO_VERSION, so we report an Istio version rather than our package version.
ISTIO_COMPAT_VERSION = "1.28.0"
ANNOTATION_PROXY_CONFIG = "proxy.istio.io/config"
ANNOTATION_DISCOVERY_ADDRESS = "sidecar.istio.io/discoveryAddress"
ANNOTATION_STATUS_PORT = "status.sidecar.istio.io/port"


@dataclass(frozen=True)
class NodeOverrides:
    """Inputs the agent normally computes; None means "compute as Istio does"."""

    proxy_config: ProxyConfig | None = None  # used as-is: no defaults, mesh config, PROXY_CONFIG or annotation
    node_id: str | None = None
    instance_ips: tuple[str, ...] | None = None
    pilot_san: tuple[str, ...] | None = None
    istio_version: str | None = None
    outlier_log_path: str | None = None
    envoy_status_port: int | None = None
    envoy_prometheus_port: int | None = None
    envoy_secure_metrics_port: int | None = None
    envoy_secure_merged_metrics_port: int | None = None
    workload_identity_socket_file: str | None = None
    skip_deprecated_logs: bool | None = None
    compliance_policy: str | None = None
    labels_path: str | None = None
    annotations_path: str | None = None


@dataclass(frozen=True)
class NodeSettings:
    """What Istio passes to GetNodeMetaData besides env and ProxyConfig."""

    istio_version: str
    pilot_san: tuple[str, ...]
    sts_port: int
    workload_identity_socket_file: str
    compliance_policy: str
    exit_on_zero_active_connections: bool
    metadata_discovery: bool | None
    skip_deprecated_logs: bool
    xds_root_cert: str
    credential_socket_exists: bool
    custom_credentials_file_exists: bool
    log_as_json: bool


@dataclass(frozen=True)
class AgentConfig:
    proxy_type: str
    node_id: str
    instance_ips: tuple[str, ...]
    pod_name: str
    pod_namespace: str
    dns_domain: str
    service_account: str
    labels: Mapping[str, str]  # from the downward-API labels file ({} when absent)
    annotations: Mapping[str, str]  # from the downward-API annotations file ({} when absent)
    labels_file_found: bool
    annotations_file_found: bool
    labels_path: Path
    annotations_path: Path
    mesh_config_path: Path
    template_path: str  # jinja2 template to render ("" = the packaged one); unused with custom_config_file
    custom_config_file: str  # customConfigFile, used as Envoy's config as it is; "" when ISTIO_BOOTSTRAP is set
    proxy: ProxyConfig
    log_level: str  # Envoy -l
    component_log_level: str  # Envoy --component-log-level ("" for none)
    outlier_log_path: str
    bootstrap_override: str  # ISTIO_BOOTSTRAP_OVERRIDE file, passed to Envoy as --config-yaml
    envoy_status_port: int
    envoy_prometheus_port: int
    envoy_secure_metrics_port: int
    envoy_secure_merged_metrics_port: int
    local_xds_dir: str  # absolute, or "" when ADS to the control plane is used
    delta_xds: bool
    dual_stack: bool
    status_port_proxy_protocol: bool
    strip_fragment: bool
    host_ip: str
    dns_proxy_addr: str | None
    env_metadata: Mapping[str, str]  # ISTIO_META_<K>=v as {K: v}, in the environment's order
    env_metadata_json: tuple[tuple[str, Mapping[str, Any]], ...]  # (ISTIO_METAJSON_<K>, its JSON object)
    node: NodeSettings
    flags: ProxyFlags
    env: Environment = field(repr=False)  # settings read by other parts (supervision, status server)

    def istio_meta(self) -> dict[str, str]:
        """The ISTIO_META_<K> settings as {K: value}: ProxyConfig proxyMetadata, then the environment (which wins),
        as Istio's GetNodeMetaData reads them."""
        prefix = E.ISTIO_META.prefix
        meta = {k[len(prefix) :]: v for k, v in self.proxy.proxy_metadata.items() if k.startswith(prefix)}
        meta.update(self.env_metadata)
        return meta


def _read_mesh_config(path: Path) -> dict[str, Any]:
    """The mesh config file's `defaultConfig`, normalised; {} when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    try:
        mesh = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(where, "", f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(str(path), "", f"not valid YAML: {exc}") from None
    if mesh is None:
        return {}
    if not isinstance(mesh, Mapping):
        raise ConfigError(str(path), "", "mesh config must be a YAML mapping")
    default = mesh.get("defaultConfig", mesh.get("default_config"))
    return normalise_proxy_config(default, f"{path} defaultConfig")


def _pilot_san(proxy: ProxyConfig) -> tuple[str, ...]:
    if proxy.control_plane_auth_policy != "MUTUAL_TLS":
        return ()
    # Istio's GetPilotSan: the host part; a local-debugging "localhost" still gets istiod's certificate name.
    host = proxy.discovery_address.split(":")[0]
    if host == "localhost":
        host = "istiod.istio-system.svc"
    return (host,)


def assemble_proxy_config(
    flags: ProxyFlags, env: Environment, annotations: Mapping[str, str], annotations_path: Path
) -> ProxyConfig:
    """Istio's ConstructProxyConfig: defaults < mesh config < PROXY_CONFIG < annotation, then overrides."""
    raw = dict(DEFAULTS)
    raw = merge(raw, _read_mesh_config(Path(flags.mesh_config)))
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
    if not raw.get("serviceCluster") and not raw.get("tracingServiceName"):
        raw["serviceCluster"] = flags.service_cluster
    if flags.template_file and not raw.get("customConfigFile"):
        raw["proxyBootstrapTemplatePath"] = flags.template_file
    if ANNOTATION_DISCOVERY_ADDRESS in annotations:
        raw["discoveryAddress"] = annotations[ANNOTATION_DISCOVERY_ADDRESS]
    if ANNOTATION_STATUS_PORT in annotations:
        value = annotations[ANNOTATION_STATUS_PORT].strip()
        if not value.isdigit() or not 0 < int(value) <= 65535:
            raise ConfigError(f"{annotations_path}", ANNOTATION_STATUS_PORT, f"{value!r} is not a valid port")
        raw["statusPort"] = int(value)
    if raw.get("statsdUdpAddress"):
        raw["statsdUdpAddress"] = resolve_statsd(raw["statsdUdpAddress"])
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
    except (OSError, UnicodeError) as exc:
        log.warning("statsdUdpAddress %s does not resolve (%s): statsd sink disabled", address, exc)
        return ""
    ip = str(infos[0][4][0])
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _validate(proxy: ProxyConfig) -> None:
    src = "effective ProxyConfig"
    if not proxy.config_path:
        raise ConfigError(src, "configPath", "must not be empty")
    for name, port in (("proxyAdminPort", proxy.proxy_admin_port), ("statusPort", proxy.status_port)):
        if not 0 < port <= 65535:
            raise ConfigError(src, name, f"{port} is not a valid port (1-65535)")
    if proxy.concurrency is not None and proxy.concurrency < 0:
        raise ConfigError(src, "concurrency", "must not be negative")
    if proxy.stat_name_length < 0:
        raise ConfigError(src, "statNameLength", "must not be negative")


def load_agent_config(
    flags: ProxyFlags, environ: Mapping[str, str] | None = None, overrides: NodeOverrides | None = None
) -> AgentConfig:
    """Read every source and return the agent's configuration. Raises ConfigError naming source and field."""
    env = Environment(os.environ if environ is None else environ)
    ov = overrides or NodeOverrides()
    if flags.proxy_type not in PROXY_TYPES:
        raise ConfigError(
            "argument proxy type", flags.proxy_type, f"invalid proxy Type; one of {', '.join(PROXY_TYPES)}"
        )
    env_metadata = {name[len(E.ISTIO_META.prefix) :]: value for name, value in env.with_prefix(E.ISTIO_META)}
    env_metadata_json = tuple(
        (name, types.MappingProxyType(json_object(value, f"env {name}")))
        for name, value in env.with_prefix(E.ISTIO_METAJSON)
    )
    labels_path = Path(ov.labels_path or LABELS_PATH)
    annotations_path = Path(ov.annotations_path or ANNOTATIONS_PATH)
    pod_labels = read_downward_api(labels_path)
    pod_annotations = read_downward_api(annotations_path)
    labels = pod_labels or {}
    annotations = pod_annotations or {}

    if ov.proxy_config is not None:
        proxy = ov.proxy_config
    else:
        proxy = assemble_proxy_config(flags, env, annotations, annotations_path)

    pod_name = env[E.POD_NAME]
    pod_namespace = env[E.POD_NAMESPACE]
    dns_domain = flags.domain or f"{pod_namespace}.svc.cluster.local"
    ips = ov.instance_ips
    if ips is None:
        ips = tuple(network.discover_ips(env[E.INSTANCE_IP], annotations))
    node_id = ov.node_id or f"{flags.proxy_type}~{ips[0]}~{pod_name}.{pod_namespace}~{dns_domain}"
    log_level, component_log_level = split_component_log(flags.proxy_log_level, flags.proxy_component_log_level)

    # ISTIO_BOOTSTRAP wins over customConfigFile, which wins over proxyBootstrapTemplatePath (--templateFile).
    custom_config_file = ""
    if env[E.ISTIO_BOOTSTRAP]:
        template = env[E.ISTIO_BOOTSTRAP]
    elif proxy.custom_config_file:
        template, custom_config_file = "", proxy.custom_config_file
    else:
        template = proxy.proxy_bootstrap_template_path

    local_xds = flags.local_xds_dir or env[E.ISTIO_LOCAL_XDS_DIR]
    if local_xds:
        local_xds = _check_local_xds_dir(
            local_xds, "flag --local-xds-dir" if flags.local_xds_dir else E.ISTIO_LOCAL_XDS_DIR.source
        )

    def overridden(value: _T | None, setting: EnvVar[_T]) -> _T:
        return value if value is not None else env[setting]

    node = NodeSettings(
        istio_version=ov.istio_version if ov.istio_version is not None else ISTIO_COMPAT_VERSION,
        pilot_san=ov.pilot_san if ov.pilot_san is not None else _pilot_san(proxy),
        sts_port=flags.sts_port,
        workload_identity_socket_file=overridden(ov.workload_identity_socket_file, E.WORKLOAD_IDENTITY_SOCKET_FILE),
        compliance_policy=overridden(ov.compliance_policy, E.COMPLIANCE_POLICY),
        exit_on_zero_active_connections=env[E.EXIT_ON_ZERO_ACTIVE_CONNECTIONS],
        metadata_discovery=env[E.PEER_METADATA_DISCOVERY],
        skip_deprecated_logs=overridden(ov.skip_deprecated_logs, E.ENVOY_SKIP_DEPRECATED_LOGS),
        xds_root_cert=env[E.XDS_ROOT_CA],
        credential_socket_exists=Path("./var/run/secrets/credential-uds/socket").is_socket(),
        custom_credentials_file_exists=False,
        log_as_json=flags.log_as_json,
    )

    return AgentConfig(
        proxy_type=flags.proxy_type,
        node_id=node_id,
        instance_ips=tuple(ips),
        pod_name=pod_name,
        pod_namespace=pod_namespace,
        dns_domain=dns_domain,
        service_account=env[E.SERVICE_ACCOUNT],
        labels=types.MappingProxyType(labels),
        annotations=types.MappingProxyType(annotations),
        labels_file_found=pod_labels is not None,
        annotations_file_found=pod_annotations is not None,
        labels_path=labels_path,
        annotations_path=annotations_path,
        mesh_config_path=Path(flags.mesh_config),
        template_path=template,
        custom_config_file=custom_config_file,
        proxy=proxy,
        log_level=log_level,
        component_log_level=component_log_level,
        outlier_log_path=ov.outlier_log_path if ov.outlier_log_path is not None else flags.outlier_log_path,
        bootstrap_override=env[E.ISTIO_BOOTSTRAP_OVERRIDE],
        envoy_status_port=overridden(ov.envoy_status_port, E.ENVOY_STATUS_PORT),
        envoy_prometheus_port=overridden(ov.envoy_prometheus_port, E.ENVOY_PROMETHEUS_PORT),
        envoy_secure_metrics_port=overridden(ov.envoy_secure_metrics_port, E.ENVOY_SECURE_METRICS_PORT),
        envoy_secure_merged_metrics_port=overridden(
            ov.envoy_secure_merged_metrics_port, E.ENVOY_SECURE_MERGED_METRICS_PORT
        ),
        local_xds_dir=local_xds,
        delta_xds=env[E.ISTIO_DELTA_XDS],
        dual_stack=env[E.ISTIO_DUAL_STACK],
        status_port_proxy_protocol=env[E.ENVOY_STATUS_PORT_ENABLE_PROXY_PROTOCOL],
        strip_fragment=env[E.HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED],
        host_ip=env[E.HOST_IP],
        dns_proxy_addr=env[E.DNS_PROXY_ADDR] or None,
        env_metadata=types.MappingProxyType(env_metadata),
        env_metadata_json=env_metadata_json,
        node=node,
        flags=flags,
        env=env,
    )


EXAMPLE_XDS_DIR = "@example"


def example_xds_dir() -> Path:
    """The bundled no-control-plane demo (lds.yaml, cds.yaml), shipped inside the package."""
    return Path(str(resources.files("agent").joinpath("examples", "local")))


def _check_local_xds_dir(directory: str, source: str) -> str:
    path = example_xds_dir() if directory == EXAMPLE_XDS_DIR else Path(directory).resolve()
    if not path.is_dir():
        raise ConfigError(source, "", f"{directory!r} is not a directory")
    for name in ("lds.yaml", "cds.yaml"):
        if not (path / name).is_file():
            raise ConfigError(source, name, f"missing {path / name} (the listeners and clusters Envoy loads)")
    return str(path)
