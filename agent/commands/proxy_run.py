"""`pilot-agent proxy` after epoch 0's exec (agent.commands.proxy does everything before it): the event loop, the
mesh side, the status server, the supervisor. Imported once Envoy runs, so that loading it overlaps Envoy's start.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from agent.aio import off_loop
from agent.commands.proxy import Startup, start_epoch0
from agent.files import remove_file
from agent.lifecycle import Lifecycle
from agent.pid1 import children_waited_on_the_loop
from agent.proxy.launcher import EnvoyLauncher
from agent.proxy.process import EnvoyProcess
from agent.proxy.shm import remove_segment
from agent.signals import HANDLED
from agent.supervisor import Service, Supervisor

if TYPE_CHECKING:
    from agent.dns.service import DnsService
    from agent.dns.settings import DnsStartup
    from agent.mesh.listen import MeshListeners
    from agent.mesh.service import MeshService
    from agent.mesh.settings import MeshSettings
    from agent.metrics import AgentMetrics

log = logging.getLogger("agent.cli")


def serve(startup: Startup) -> int:
    """Run the agent until it stops; its exit code."""
    with children_waited_on_the_loop():
        return asyncio.run(_main(startup))


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


async def _main(startup: Startup) -> int:
    # An Envoy may be running already: a SIGTERM must reach the supervisor (drain, stop Envoy), not kill the agent
    # alone. Signals arriving before its dispatcher exists are queued for it, with those recorded before the loop.
    loop = asyncio.get_running_loop()
    signal_queue: asyncio.Queue[int] = asyncio.Queue()
    for sig in HANDLED:
        loop.add_signal_handler(sig, signal_queue.put_nowait, sig)
    if startup.early_signals is not None:
        startup.early_signals.replay(signal_queue.put_nowait)
    launch = startup.settings.launch
    mesh = startup.mesh
    epoch0: EnvoyProcess | None = None
    listeners = None
    mesh_service = None
    try:  # from here on, the finally below stops what was started (the sockets and the key worker included)
        if mesh is not None:
            # Envoy must find the SDS and xDS sockets listening (Istio's order); the services behind them are built
            # after the exec. The workload key is asked for first (a worker process, on another core): the first
            # certificate, which Envoy's start waits for, waits for it; then grpc loads and the sockets listen.
            from agent.security.key_worker import ask_key_ahead  # noqa: PLC0415 (light: no grpc)

            key_ahead = None
            if mesh.ca is not None:
                key_ahead = await ask_key_ahead(mesh.cache.identity, mesh.cache.key_options)
            from agent.mesh.listen import listen  # noqa: PLC0415 (grpc loads only for the mesh side)

            listeners = await listen(mesh, key_ahead)
            startup.epoch0 = start_epoch0(startup)
        if startup.epoch0 is not None:
            epoch0 = EnvoyProcess(startup.epoch0)
        from agent.metrics import AgentMetrics  # noqa: PLC0415 (lazy: loaded after Envoy's exec)

        metrics = AgentMetrics()
        dns_service = _dns_service(startup.dns, metrics) if startup.dns is not None else None
        if mesh is not None and listeners is not None:
            # Serve Envoy's ADS and SDS now, and send the first CSR: Envoy gets its configuration and certificate
            # while the status server and the supervisor load (it is ready only when all three are done).
            mesh_service = _mesh_service(mesh, listeners, metrics, dns_service)
            await mesh_service.start()
        return await _supervise(
            startup,
            epoch0=epoch0,
            signal_queue=signal_queue,
            metrics=metrics,
            dns_service=dns_service,
            mesh_service=mesh_service,
        )
    finally:
        # A no-op once the supervisor adopted it (it stops what it owns); otherwise no Envoy outlives us.
        if epoch0 is not None and await epoch0.discard():
            remove_file(launch.bootstrap_path(0))
            if launch.hot_restart:
                remove_segment(launch.base_id, startup.foreign_segment)
        # No-ops once the supervisor stopped them.
        if mesh_service is not None:
            await mesh_service.stop()
        elif listeners is not None:
            await listeners.stop()


async def _supervise(
    startup: Startup,
    *,
    epoch0: EnvoyProcess | None,
    signal_queue: asyncio.Queue[int],
    metrics: AgentMetrics,
    dns_service: DnsService | None,
    mesh_service: MeshService | None,
) -> int:
    cfg, settings, status_settings = startup.cfg, startup.settings, startup.status
    # Imported here, after Envoy's exec, so that their cost (~0.2 s) overlaps Envoy's own start; on a worker thread,
    # so that the event loop keeps turning meanwhile: the mesh side runs on it (Envoy's ADS and SDS streams, the
    # first CSR), and imports on the loop held each of its steps for up to an import's length (aiohttp's ~0.1 s).
    # aiohttp first, on the agent's terms (see the module: nothing on the loop makes an SSL context meanwhile).
    await off_loop(functools.partial(_import_all, POST_EXEC_IMPORTS), name="post-exec imports")
    from agent.local_xds import LocalXds  # noqa: PLC0415 (lazy: loaded after Envoy's exec)
    from agent.proxy.admin import AdminClient  # noqa: PLC0415 (lazy: loaded after Envoy's exec)
    from agent.startup_line import StartupLine, settings_summary  # noqa: PLC0415 (lazy: after Envoy's exec)
    from agent.status.server import StatusServer  # noqa: PLC0415 (lazy: loaded after Envoy's exec)

    lifecycle = Lifecycle()
    # With a status server, the start-up work no probe waits for waits for its first "ready" (or QUIET_START).
    settled = functools.partial(lifecycle.wait_started, QUIET_START) if status_settings is not None else None
    admin = AdminClient(port=cfg.proxy.proxy_admin_port)
    launcher = EnvoyLauncher(
        settings.launch,
        admin,
        tail_lines=settings.supervision.stderr_tail_lines,
        foreign_segment=startup.foreign_segment,
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
            sockets=startup.sockets,
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
        startup.desired_state,
        lifecycle=lifecycle,
        metrics=metrics,
        services=services,
        watch=settings.watch,
        epoch0=(epoch0, startup.first) if epoch0 is not None else None,
        signal_queue=signal_queue,
        start_gate=local_xds,
        settled=settled,
    )
    return await supervisor.run()


def _import_all(modules: tuple[str, ...]) -> None:
    """On a worker thread: a module the loop imports meanwhile waits for its import lock, never half-made."""
    for module in modules:
        importlib.import_module(module)


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
