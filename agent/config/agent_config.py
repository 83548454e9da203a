"""Everything the agent is configured by, in a frozen AgentConfig.

Sources: the `proxy` flags, the environment mapping passed in (never os.environ implicitly), the mesh config file,
the downward-API files and the files they name. `load_agent_config` reads them all once, at start: the flags, the
environment and the identity computed from them (node id, instance IPs from an interface scan, pod name) are fixed
from then on, as in Istio. `reload_files` re-reads only the files (downward API, mesh config) and what follows from
them (the ProxyConfig, the template choice); a statsd host name is resolved once per name. `NodeOverrides` lets a
caller (the conformance test) fix what the agent would otherwise compute: node id, IPs, PILOT_SAN, version, ports,
the ProxyConfig itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.config import env_settings as E
from agent.config import network
from agent.config.downward import read_downward_api
from agent.config.envvars import Environment, EnvVar, json_object
from agent.config.flags import PROXY_TYPES, ProxyFlags, split_component_log
from agent.config.local_xds import check_directory
from agent.config.proxy_sources import assemble_proxy_config, pilot_san, resolve_statsd
from agent.config.proxyconfig import ProxyConfig
from agent.errors import ConfigError
from agent.versions import ISTIO_COMPAT_VERSION

_T = TypeVar("_T")

log = logging.getLogger("agent.config")

LABELS_PATH = "./etc/istio/pod/labels"
ANNOTATIONS_PATH = "./etc/istio/pod/annotations"
CREDENTIAL_SOCKET = "./var/run/secrets/credential-uds/socket"
# ProxyConfig fields the running agent took at start: its own ports and sockets, Envoy's command line, the drain,
# istiod's address. A changed file (the `proxy.istio.io/config` or `status.sidecar.istio.io/port` annotation, the
# mesh config) does not move them while the agent runs: they apply at its next start, as Istio reads them once.
# Rendering them anyway would point a new Envoy epoch at what nobody serves: a new statusPort turns readiness
# through Envoy's 15021 listener into 503 for good; a new proxyAdminPort loses the agent its Envoy (killed and
# cold-started 20 s later); a new configPath moves the xDS socket away from the agent's.
START_ONLY_FIELDS = (
    "configPath",
    "binaryPath",
    "proxyAdminPort",
    "statusPort",
    "drainDuration",
    "parentShutdownDuration",
    "terminationDrainDuration",
    "concurrency",
    "fileFlushInterval",
    "discoveryAddress",
    "controlPlaneAuthPolicy",
)


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
    overrides: NodeOverrides = field(repr=False)
    # statsdUdpAddress as configured -> as resolved ("" = dropped): each name is looked up once.
    statsd_resolutions: Mapping[str, str] = field(repr=False)

    def istio_meta(self) -> dict[str, str]:
        """The ISTIO_META_<K> settings as {K: value}: ProxyConfig proxyMetadata, then the environment (which wins),
        as Istio's GetNodeMetaData reads them."""
        prefix = E.ISTIO_META.prefix
        meta = {k[len(prefix) :]: v for k, v in self.proxy.proxy_metadata.items() if k.startswith(prefix)}
        meta.update(self.env_metadata)
        return meta


@dataclass(frozen=True)
class _FileFacts:
    """What `reload_files` re-reads: the downward-API files, the mesh config, and what follows from them."""

    labels: dict[str, str] | None
    annotations: dict[str, str] | None
    proxy: ProxyConfig
    template_path: str
    custom_config_file: str
    pilot_san: tuple[str, ...]
    credential_socket_exists: bool
    statsd_resolutions: Mapping[str, str]


def _read_files(
    flags: ProxyFlags,
    env: Environment,
    ov: NodeOverrides,
    paths: tuple[Path, Path],
    statsd_resolutions: Mapping[str, str],
    *,
    start: ProxyConfig | None = None,
) -> _FileFacts:
    labels = read_downward_api(paths[0])
    annotations = read_downward_api(paths[1])
    resolved = dict(statsd_resolutions)

    def resolve(address: str) -> str:
        if address not in resolved:
            resolved[address] = resolve_statsd(address)
        return resolved[address]

    if ov.proxy_config is not None:
        proxy = ov.proxy_config
    else:
        proxy = assemble_proxy_config(flags, env, annotations or {}, paths[1], resolve)
        if start is not None:
            proxy = _start_values_kept(proxy, start)
    # ISTIO_BOOTSTRAP wins over customConfigFile, which wins over proxyBootstrapTemplatePath (--templateFile).
    custom_config_file = ""
    if env[E.ISTIO_BOOTSTRAP]:
        template = env[E.ISTIO_BOOTSTRAP]
    elif proxy.custom_config_file:
        template, custom_config_file = "", proxy.custom_config_file
    else:
        template = proxy.proxy_bootstrap_template_path
    return _FileFacts(
        labels=labels,
        annotations=annotations,
        proxy=proxy,
        template_path=template,
        custom_config_file=custom_config_file,
        pilot_san=ov.pilot_san if ov.pilot_san is not None else pilot_san(proxy),
        credential_socket_exists=Path(CREDENTIAL_SOCKET).is_socket(),
        statsd_resolutions=types.MappingProxyType(resolved),
    )


def _start_values_kept(proxy: ProxyConfig, start: ProxyConfig) -> ProxyConfig:
    """`proxy` (re-read from changed files) with START_ONLY_FIELDS as they were at start; a change is logged."""
    raw = proxy.to_proto_json()
    moved = []
    for key in START_ONLY_FIELDS:
        if raw.get(key) == start.raw.get(key):
            continue
        moved.append(f"{key} {raw.get(key, '(unset)')}")
        if key in start.raw:
            raw[key] = start.raw[key]
        else:
            del raw[key]
    if not moved:
        return proxy
    log.warning("changed files set %s: applies at the agent's next start", ", ".join(moved))
    return ProxyConfig.from_raw(raw)


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
    files = _read_files(flags, env, ov, (labels_path, annotations_path), {})

    pod_name = env[E.POD_NAME]
    pod_namespace = env[E.POD_NAMESPACE]
    dns_domain = flags.domain or f"{pod_namespace}.svc.cluster.local"
    ips = ov.instance_ips
    if ips is None:
        ips = tuple(network.discover_ips(env[E.INSTANCE_IP], files.annotations or {}))
    node_id = ov.node_id or f"{flags.proxy_type}~{ips[0]}~{pod_name}.{pod_namespace}~{dns_domain}"
    log_level, component_log_level = split_component_log(flags.proxy_log_level, flags.proxy_component_log_level)

    local_xds = flags.local_xds_dir or env[E.ISTIO_LOCAL_XDS_DIR]
    if local_xds:
        local_xds = _check_local_xds_dir(
            local_xds, "flag --local-xds-dir" if flags.local_xds_dir else E.ISTIO_LOCAL_XDS_DIR.source
        )

    def overridden(value: _T | None, setting: EnvVar[_T]) -> _T:
        return value if value is not None else env[setting]

    node = NodeSettings(
        istio_version=ov.istio_version if ov.istio_version is not None else ISTIO_COMPAT_VERSION,
        pilot_san=files.pilot_san,
        sts_port=flags.sts_port,
        workload_identity_socket_file=overridden(ov.workload_identity_socket_file, E.WORKLOAD_IDENTITY_SOCKET_FILE),
        compliance_policy=overridden(ov.compliance_policy, E.COMPLIANCE_POLICY),
        exit_on_zero_active_connections=env[E.EXIT_ON_ZERO_ACTIVE_CONNECTIONS],
        metadata_discovery=env[E.PEER_METADATA_DISCOVERY],
        skip_deprecated_logs=overridden(ov.skip_deprecated_logs, E.ENVOY_SKIP_DEPRECATED_LOGS),
        xds_root_cert=env[E.XDS_ROOT_CA],
        credential_socket_exists=files.credential_socket_exists,
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
        labels=types.MappingProxyType(files.labels or {}),
        annotations=types.MappingProxyType(files.annotations or {}),
        labels_file_found=files.labels is not None,
        annotations_file_found=files.annotations is not None,
        labels_path=labels_path,
        annotations_path=annotations_path,
        mesh_config_path=Path(flags.mesh_config),
        template_path=files.template_path,
        custom_config_file=files.custom_config_file,
        proxy=files.proxy,
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
        overrides=ov,
        statsd_resolutions=files.statsd_resolutions,
    )


def reload_files(cfg: AgentConfig) -> AgentConfig:
    """`cfg` with its files read again (downward API, mesh config) and what follows from them: the ProxyConfig
    (but its START_ONLY_FIELDS as they were), the template choice, PILOT_SAN. Identity and environment stay as
    they were at start. Blocking (file reads, and a DNS lookup for a statsd host name not seen before): call it off
    the event loop."""
    files = _read_files(
        cfg.flags,
        cfg.env,
        cfg.overrides,
        (cfg.labels_path, cfg.annotations_path),
        cfg.statsd_resolutions,
        start=cfg.proxy,
    )
    return dataclasses.replace(
        cfg,
        labels=types.MappingProxyType(files.labels or {}),
        annotations=types.MappingProxyType(files.annotations or {}),
        labels_file_found=files.labels is not None,
        annotations_file_found=files.annotations is not None,
        template_path=files.template_path,
        custom_config_file=files.custom_config_file,
        proxy=files.proxy,
        node=dataclasses.replace(
            cfg.node, pilot_san=files.pilot_san, credential_socket_exists=files.credential_socket_exists
        ),
        statsd_resolutions=files.statsd_resolutions,
    )


EXAMPLE_XDS_DIR = "@example"


def example_xds_dir() -> Path:
    """The bundled no-control-plane demo (lds.yaml, cds.yaml), shipped inside the package."""
    return Path(__file__).parents[1] / "examples" / "local"


def _check_local_xds_dir(directory: str, source: str) -> str:
    try:
        path = example_xds_dir() if directory == EXAMPLE_XDS_DIR else Path(directory).resolve()
        if not path.is_dir():
            given = Path(directory)
            if given.is_symlink():  # `cp -r` of the checkout's examples/local copies the link, not the files
                link = os.readlink(given)
                hint = " (copy the demo with `cp -rL examples/local DIR`)" if link.endswith("examples/local") else ""
                raise ConfigError(source, "", f"{directory!r} is a symlink to {link!r}, which is not a directory{hint}")
            what = "does not exist" if not path.exists() else "is not a directory"
            raise ConfigError(source, "", f"{directory!r} {what}")
        check_directory(path, source)  # before Envoy starts: a broken file is 78 naming it, not a LIVE Envoy without it
    except OSError as exc:  # a name too long, a loop of symlinks: is_dir() and resolve() raise
        raise ConfigError(source, "", f"{directory!r}: {exc.strerror or exc}") from None
    return str(path)
