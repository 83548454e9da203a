"""`pilot-agent proxy [sidecar|router]`: render the bootstrap, start the status server, run and supervise Envoy.

Configuration comes from agent/config (flags, env, mesh config, annotations); this module maps it onto the
supervisor's own frozen settings in one place (`supervisor_settings`). The supervisor never imports config: it gets
a `desired_state()` callable that re-reads and re-renders everything on each call.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.bootstrap import bootstrap_dependencies, render_bootstrap
from agent.bootstrap.render import template_path_of
from agent.bootstrap.write import bootstrap_path, write_side_files
from agent.config import AgentConfig, ProxyFlags, add_proxy_flags, flags_from_args, load_agent_config
from agent.config.durations import parse_duration
from agent.config.envvars import env_bool, env_int
from agent.errors import ConfigError
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient
from agent.proxy.argv import LaunchSettings
from agent.proxy.binary import find_envoy
from agent.proxy.epochs import DesiredState, DesiredStateFn, SupervisionSettings
from agent.status.server import StatusServer
from agent.status.settings import StatusSettings
from agent.supervisor import DrainSettings, Supervisor, WatchSettings
from agent.watch import content_hash

log = logging.getLogger("agent.cli")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("proxy", help="render Envoy's bootstrap, then run and supervise Envoy")
    add_proxy_flags(parser)
    parser.set_defaults(run=run)


@dataclass(frozen=True)
class ProxySettings:
    launch: LaunchSettings
    supervision: SupervisionSettings
    drain: DrainSettings
    watch: WatchSettings


def _env_duration(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "")
    return default if not raw.strip() else parse_duration(raw, f"env {name}", "")


def config_yaml(cfg: AgentConfig) -> str:
    """ISTIO_BOOTSTRAP_OVERRIDE: a YAML/JSON file given to Envoy as --config-yaml JSON, $(HOST_IP) substituted."""
    if not cfg.bootstrap_override:
        return ""
    source = "env ISTIO_BOOTSTRAP_OVERRIDE"
    try:
        text = Path(cfg.bootstrap_override).read_text()
    except OSError as exc:
        raise ConfigError(source, cfg.bootstrap_override, f"cannot read: {exc.strerror}") from None
    host = cfg.host_ip
    if host and ":" in host:
        host = f"[{host}]"
    text = text.replace("$(HOST_IP)", host)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{cfg.bootstrap_override}:{mark.line + 1}" if mark is not None else cfg.bootstrap_override
        raise ConfigError(source, where, "not valid YAML") from None
    return json.dumps(data, separators=(",", ":")) if data else ""


# Kinds of file the agent itself reads to render the bootstrap: a change shows in the rendered bytes, so their
# contents are not hashed into the desired state (a label Envoy never sees must not restart it).
RENDER_INPUTS = frozenset({"annotations", "labels", "mesh", "template", "custom_config", "bootstrap_override"})


def watch_files(cfg: AgentConfig, dependencies: list[Path]) -> dict[Path, str]:
    """{path: kind} for every dependency: the render inputs by name, the rest (files Envoy reads) as `cert`."""
    kinds = {
        str(cfg.annotations_path): "annotations",
        str(cfg.labels_path): "labels",
        str(cfg.mesh_config_path): "mesh",
        str(template_path_of(cfg)): "template",
    }
    if cfg.bootstrap_override:
        kinds[cfg.bootstrap_override] = "bootstrap_override"
    if cfg.proxy.custom_config_file:
        kinds[cfg.proxy.custom_config_file] = "custom_config"
    return {path: kinds.get(str(path), "cert") for path in dependencies}


def supervisor_settings(cfg: AgentConfig, binary: str) -> ProxySettings:
    """AgentConfig (+ the agent's own env settings) -> the supervisor's frozen settings. The one mapping place."""
    env = cfg.environ
    proxy = cfg.proxy
    ips = [ipaddress.ip_address(ip) for ip in cfg.instance_ips if ip]
    ipv6_only = bool(ips) and all(ip.version == 6 for ip in ips)
    flush = proxy.file_flush_interval
    template = cfg.template_path
    launch = LaunchSettings(
        binary=binary,
        config_dir=Path(proxy.config_path),
        drain_duration=proxy.drain_duration,
        parent_shutdown_duration=proxy.parent_shutdown_duration,
        ip_version="v6" if ipv6_only else "v4",
        file_flush_interval_ms=1000 if flush is None else int(flush * 1000),
        file_flush_min_size_kb=env_int(env, "FILE_FLUSH_MIN_SIZE_KB", 0),
        log_level=cfg.log_level,
        component_log_level=cfg.component_log_level,
        skip_deprecated_logs=cfg.node.skip_deprecated_logs,
        enable_core_dump=env_bool(env, "ISTIO_ENVOY_ENABLE_CORE_DUMP", False),
        config_yaml=config_yaml(cfg),
        concurrency=proxy.concurrency or 0,
        hot_restart=not env_bool(env, "ENVOY_DISABLE_HOT_RESTART", False),
        base_id=env_int(env, "ENVOY_BASE_ID", 0, 0, 2**20),
        bootstrap_suffix=bootstrap_path(cfg).suffix,
    )
    policy = env.get("ENVOY_RESTART_POLICY", "restart").strip() or "restart"
    if policy not in ("restart", "exit"):
        raise ConfigError("env ENVOY_RESTART_POLICY", "", f"expected restart or exit, got {policy!r}")
    termination_log = env.get("TERMINATION_LOG_PATH", "/dev/termination-log")
    supervision = SupervisionSettings(
        restart_initial_delay=_env_duration(env, "ENVOY_RESTART_INITIAL_DELAY", 0.2),
        restart_budget=env_int(env, "ENVOY_RESTART_BUDGET", 10),
        healthy_period=_env_duration(env, "ENVOY_HEALTHY_PERIOD", 60.0),
        exit_on_envoy_exit=policy == "exit",
        termination_log=Path(termination_log) if termination_log else None,
        validate=not env_bool(env, "ENVOY_SKIP_VALIDATION", False),
    )
    drain = DrainSettings(
        proxy_type=cfg.proxy_type,
        termination_drain=proxy.termination_drain_duration,
        exit_on_zero_active_connections=cfg.node.exit_on_zero_active_connections,
        minimum_drain=_env_duration(env, "MINIMUM_DRAIN_DURATION", 5.0),
        excluded_listener_ports=(cfg.envoy_status_port, cfg.envoy_prometheus_port),
    )
    watch = WatchSettings(
        watch_files(cfg, bootstrap_dependencies(cfg)),
        debounce=_env_duration(env, "FILE_DEBOUNCE_DURATION", 0.1),
    )
    if template and not launch.hot_restart:
        log.info("hot restart disabled (ENVOY_DISABLE_HOT_RESTART): file changes apply at Envoy's next start")
    return ProxySettings(launch, supervision, drain, watch)


def render_desired_state(flags: ProxyFlags, environ: Mapping[str, str]) -> DesiredState:
    # Re-read every source on each call: a changed annotation, mesh config or template shows up here.
    cfg = load_agent_config(flags, environ)
    write_side_files(cfg)
    data = render_bootstrap(cfg)
    # Envoy reads these files itself (certs, TLS files the bootstrap names): their contents are part of what it
    # runs even though the bootstrap bytes stay the same.
    files = watch_files(cfg, bootstrap_dependencies(cfg))
    deps = tuple((str(p), content_hash(p) or "") for p, kind in files.items() if kind not in RENDER_INPUTS)
    return DesiredState(data, deps)


def desired_state_fn(flags: ProxyFlags, environ: Mapping[str, str], first: DesiredState) -> DesiredStateFn:
    """The supervisor's desired_state(): the start-up render is used once (rendering costs ~0.15 s), then every
    call renders afresh."""
    pending = [first]

    def desired_state() -> DesiredState:
        return pending.pop() if pending else render_desired_state(flags, environ)

    return desired_state


def run(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    flags = flags_from_args(args)
    cfg = load_agent_config(flags, environ)
    binary = find_envoy(cfg.proxy.binary_path)
    settings = supervisor_settings(cfg, binary)
    # Fail fast, before anything starts, on a template that does not render.
    desired_state = desired_state_fn(flags, environ, render_desired_state(flags, environ))
    return asyncio.run(_main(cfg, settings, desired_state))


async def _main(cfg: AgentConfig, settings: ProxySettings, desired_state: DesiredStateFn) -> int:
    lifecycle = Lifecycle()
    metrics = AgentMetrics()
    admin = AdminClient(port=cfg.proxy.proxy_admin_port)
    status = None
    if cfg.proxy.status_port > 0:
        status_settings = StatusSettings.from_env(
            cfg.environ,
            status_port=cfg.proxy.status_port,
            envoy_prometheus_port=cfg.envoy_prometheus_port,
            proxy_type=cfg.proxy_type,
            admin_port=cfg.proxy.proxy_admin_port,
        )
        status = StatusServer(status_settings, lifecycle, metrics, admin)
    supervisor = Supervisor(
        settings.launch,
        settings.supervision,
        settings.drain,
        desired_state,
        lifecycle=lifecycle,
        metrics=metrics,
        admin=admin,
        status=status,
        watch=settings.watch,
    )
    return await supervisor.run()
