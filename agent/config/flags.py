"""The `pilot-agent proxy` flags Istio's injector passes, with Istio's names, defaults and meaning."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from agent.config.durations import format_proto, parse_duration
from agent.errors import ConfigError
from agent.flag_values import non_negative_int_flag

PROXY_TYPES = ("sidecar", "router", "waypoint", "ztunnel", "agentgateway")

# Envoy's -l / --component-log-level levels ("warn" is Envoy's alias of "warning").
ENVOY_LOG_LEVELS = frozenset({"trace", "debug", "info", "warning", "warn", "error", "critical", "off"})
DEFAULT_MESH_CONFIG = "./etc/istio/config/mesh"
# Envoy 1.40's logger names (admin `/logging`): --component-log-level with any other name stops Envoy at start
# ("invalid component specified"). tests/bootstrap/test_envoy.py compares this list with the running Envoy's.
ENVOY_COMPONENTS = frozenset(
    {
        *("a2a", "admin", "ai_protocol_manager", "alternate_protocols_cache", "assert", "aws", "backtrace"),
        *("basic_auth", "cache_filter", "client", "compression", "config", "conn_handler", "connection"),
        *("credential_injector", "decompression", "dns", "dubbo", "dynamic_modules", "envoy_bug", "ext_authz"),
        *("ext_proc", "file", "filter", "forward_proxy", "geolocation", "golang", "grpc", "happy_eyeballs", "hc"),
        *("health_checker", "http", "http2", "hystrix", "init", "io", "ip_tagging", "json_rpc", "jwt", "kafka"),
        *("key_value_store", "local_rate_limit", "lua", "main", "matcher", "mcp", "misc", "mongo"),
        *("multi_connection", "notification", "oauth2", "pool", "quic", "quic_stream", "rate_limit_quota", "rbac"),
        *("rds", "redis", "rocketmq", "router", "runtime", "secret", "sse", "stats", "stats_sinks", "tap"),
        *("testing", "thrift", "tracing", "udp", "upstream", "wasm", "websocket"),
    }
)


@dataclass(frozen=True)
class ProxyFlags:
    proxy_type: str = "sidecar"
    domain: str = ""
    mesh_config: str = DEFAULT_MESH_CONFIG
    service_cluster: str = "istio-proxy"
    proxy_log_level: str = "warning"
    proxy_component_log_level: str = ""
    concurrency: int = 0
    template_file: str = ""
    outlier_log_path: str = ""
    sts_port: int = 0
    token_manager_plugin: str = ""
    local_xds_dir: str = ""
    termination_drain_duration: str = ""  # a Go duration overriding ProxyConfig terminationDrainDuration
    log_as_json: bool = False


def add_proxy_flags(parser: argparse.ArgumentParser) -> None:
    """Add the proxy flags to `parser` (the `proxy` and `render` subcommands). Dest names are `proxy_*`-free."""
    parser.add_argument(
        "proxy_type",
        nargs="?",
        default="sidecar",
        choices=PROXY_TYPES,
        metavar="TYPE",
        help=f"{', '.join(PROXY_TYPES)} (default: sidecar)",
    )
    parser.add_argument("--domain", default="", help="DNS domain; default ${POD_NAMESPACE}.svc.cluster.local")
    parser.add_argument(
        "--meshConfig", dest="mesh_config", default=DEFAULT_MESH_CONFIG, help="mesh config file (read if present)"
    )
    parser.add_argument(
        "--serviceCluster", dest="service_cluster", default="istio-proxy", help="used if ProxyConfig has none"
    )
    parser.add_argument(
        "--proxyLogLevel",
        dest="proxy_log_level",
        default="warning",
        help="Envoy log level, optionally with scope:level parts (info,misc:error)",
    )
    parser.add_argument(
        "--proxyComponentLogLevel",
        dest="proxy_component_log_level",
        default="",
        help="Envoy component log levels; used only if --proxyLogLevel has no scope:level part",
    )
    parser.add_argument("--concurrency", type=str, default="0", help="legacy override of ProxyConfig.concurrency")
    parser.add_argument("--templateFile", dest="template_file", default="", help="jinja2 bootstrap template path")
    parser.add_argument("--outlierLogPath", dest="outlier_log_path", default="", help="Envoy outlier event log")
    parser.add_argument("--stsPort", dest="sts_port", type=str, default="0", help="STS port (node metadata only)")
    parser.add_argument("--tokenManagerPlugin", dest="token_manager_plugin", default="", help="accepted, unused")
    parser.add_argument(
        "--local-xds-dir",
        dest="local_xds_dir",
        default="",
        metavar="DIR",
        help="run without a control plane: LDS/CDS from DIR/lds.yaml and DIR/cds.yaml (env ISTIO_LOCAL_XDS_DIR); "
        "@example is the bundled demo",
    )
    parser.add_argument(
        "--termination-drain-duration",
        dest="termination_drain_duration",
        default="",
        metavar="DURATION",
        help="how long a shutdown (SIGTERM, Ctrl-C) drains before Envoy stops, e.g. 0s; overrides ProxyConfig "
        "terminationDrainDuration (default 5s)",
    )
    # Istio's log flags are persistent (root) flags, so the injector passes them after `proxy sidecar`.
    # SUPPRESS keeps the root parser's value unless the flag is given here too.
    known = getattr(parser, "_option_string_actions", {})
    if "--log_output_level" not in known:
        parser.add_argument("--log_output_level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if "--log_as_json" not in known:
        parser.add_argument("--log_as_json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def flags_from_args(args: argparse.Namespace) -> ProxyFlags:
    """Typed flags from an argparse namespace built with add_proxy_flags (missing attributes take defaults)."""
    d = ProxyFlags()
    sts_port = non_negative_int_flag(getattr(args, "sts_port", 0), "--stsPort")
    if sts_port > 65535:
        raise ConfigError("flag --stsPort", "", f"{sts_port} is not a valid port")
    return ProxyFlags(
        proxy_type=getattr(args, "proxy_type", None) or d.proxy_type,
        domain=getattr(args, "domain", d.domain),
        mesh_config=getattr(args, "mesh_config", d.mesh_config),
        service_cluster=getattr(args, "service_cluster", d.service_cluster),
        proxy_log_level=getattr(args, "proxy_log_level", d.proxy_log_level),
        proxy_component_log_level=getattr(args, "proxy_component_log_level", d.proxy_component_log_level),
        concurrency=non_negative_int_flag(getattr(args, "concurrency", 0), "--concurrency"),
        template_file=getattr(args, "template_file", d.template_file),
        outlier_log_path=getattr(args, "outlier_log_path", d.outlier_log_path),
        sts_port=sts_port,
        token_manager_plugin=getattr(args, "token_manager_plugin", d.token_manager_plugin),
        local_xds_dir=getattr(args, "local_xds_dir", d.local_xds_dir),
        termination_drain_duration=_duration_flag(args, "termination_drain_duration", "--termination-drain-duration"),
        log_as_json=bool(getattr(args, "log_as_json", False)),
    )


def _duration_flag(args: argparse.Namespace, dest: str, flag: str) -> str:
    """A duration flag checked here (so errors name the flag) and passed on in its canonical form; "" when unset."""
    text = getattr(args, dest, "") or ""
    return format_proto(parse_duration(text, f"flag {flag}", "")) if text else ""


def split_component_log(level: str, component_level: str) -> tuple[str, str]:
    """Istio's splitComponentLog: `info,misc:error` -> ("info", "misc:error"). Validates every level."""
    log_level = ""
    components: list[str] = []
    for part in level.split(","):
        pieces = part.split(":")
        if len(pieces) == 1:
            log_level = pieces[0].strip()
        elif len(pieces) == 2:
            components.append(part.strip())
        else:
            raise ConfigError("flag --proxyLogLevel", part, "expected LEVEL or SCOPE:LEVEL")
    if not components and component_level:
        components = [p.strip() for p in component_level.split(",") if p.strip()]
        source = "flag --proxyComponentLogLevel"
    else:
        source = "flag --proxyLogLevel"
    # Istio would pass an empty -l when only scopes are given; Envoy rejects that, so keep the default.
    log_level = log_level or "warning"
    if log_level not in ENVOY_LOG_LEVELS:
        raise ConfigError(
            "flag --proxyLogLevel", "", f"{log_level!r} is not one of {', '.join(sorted(ENVOY_LOG_LEVELS))}"
        )
    for item in components:
        scope, _, lvl = item.partition(":")
        if not scope or lvl not in ENVOY_LOG_LEVELS:
            raise ConfigError(
                source, item, f"expected SCOPE:LEVEL with LEVEL one of {', '.join(sorted(ENVOY_LOG_LEVELS))}"
            )
        if scope not in ENVOY_COMPONENTS:
            raise ConfigError(source, item, f"{scope!r} is not one of Envoy's log components (see `envoy /logging`)")
    return log_level, ",".join(components)
