"""The status server on ProxyConfig.statusPort (15020): readiness, merged metrics, app probes, quit and drain.

`StatusServer` owns the server's lifetime, in a fixed order: start = the merger's client sessions, routes, runner,
listening sockets; stop = listening sockets and open requests (runner cleanup), then the client sessions. It is
started before Envoy (kubelet may probe at once) and stopped after it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from agent.errors import AgentError
from agent.fdlimit import open_files_limit
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient, AdminError
from agent.status.app_probes import AppProber
from agent.status.connections import ConnectionGuard, ConnectionLimits, GuardedSite, server_logger
from agent.status.listen import bind_status_sockets
from agent.status.readiness import Probe, Readiness
from agent.status.settings import StatusSettings

if TYPE_CHECKING:
    from agent.status.metrics_merge import MetricsMerger

log = logging.getLogger("agent.status")

# How long stop() lets in-flight requests (a long scrape) finish before closing their connections.
SHUTDOWN_GRACE = 1.0


def is_loopback(remote: str | None) -> bool:
    """Istio's IsRequestFromLocalhost: any 127/8 or ::1 peer (IPv4-mapped IPv6 included)."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _forbidden() -> web.Response:
    return web.Response(status=403, text="Only requests from localhost are allowed")


def _refused_unless_local_post(request: web.Request) -> web.Response | None:
    """The guard of /quitquitquit and /drain: a non-loopback peer gets 403, another method than POST 405."""
    if not is_loopback(request.remote):
        return _forbidden()
    if request.method != "POST":
        return web.Response(status=405, text="Method Not Allowed")
    return None


class StatusServer:
    name = "status server"

    def __init__(
        self,
        settings: StatusSettings,
        lifecycle: Lifecycle,
        metrics: AgentMetrics,
        admin: AdminClient,
        *,
        started_at: float | None = None,
        sockets: Sequence[socket.socket] = (),
        limits: ConnectionLimits | None = None,
        extra_probes: Sequence[Probe] = (),
        upstream_probes: Sequence[Probe] = (),
        debug_views: Mapping[str, Callable[[], str | None]] | None = None,
        config_probe: Probe | None = None,
    ) -> None:
        """`extra_probes` run after Envoy's in readiness, `upstream_probes` (the mesh side's) before them,
        `config_probe` replaces Envoy's config check (see Readiness.for_envoy); `debug_views` are loopback-only JSON
        endpoints ({path: body or None for 404 `{}`}), e.g. /debug/ndsz."""
        self.settings = settings
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.admin = admin
        self.readiness = Readiness.for_envoy(
            lifecycle, metrics, admin, extra_probes, upstream=upstream_probes, config_probe=config_probe
        )
        self.debug_views = dict(debug_views or {})
        if started_at is not None:
            self.readiness.started_at = started_at
        self.prober = AppProber(settings)
        # Listening sockets bound by the caller (`pilot-agent proxy` binds the port before it execs Envoy, before
        # aiohttp is even imported); served as they are instead of binding settings.status_port here.
        self._sockets = tuple(sockets)
        self.guard = ConnectionGuard((limits or ConnectionLimits()).fitted(open_files_limit()), metrics)
        self._runner: web.AppRunner | None = None
        self._merger: MetricsMerger | None = None
        self.port: int | None = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard.middleware])

        async def stats(request: web.Request) -> web.StreamResponse:
            if self.settings.metrics_localhost_only and not is_loopback(request.remote):
                return _forbidden()
            return await self.merger().handle(request)

        app.router.add_route("*", "/healthz/ready", self._ready)
        app.router.add_route("*", "/stats/prometheus", stats)
        app.router.add_route("*", "/metrics", stats)
        app.router.add_route("*", "/quitquitquit", self._quit)
        app.router.add_route("*", "/drain", self._drain)
        app.router.add_route("*", "/app-health/{tail:.*}", self.prober.handle)
        app.router.add_route("*", "/app-lifecycle/{tail:.*}", self.prober.handle)
        for path, view in self.debug_views.items():
            app.router.add_route("*", path, self._debug_view(view))
        return app

    @staticmethod
    def _debug_view(view: Callable[[], str | None]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            if not is_loopback(request.remote):
                return _forbidden()
            body = view()
            if body is None:
                return web.Response(status=404, text="{}", content_type="application/json")
            return web.Response(text=body, content_type="application/json")

        return handle

    async def start(self) -> None:
        """Listen on the status port. Raises AgentError(STARTUP_FAILED) when the port cannot be bound."""
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            logger=server_logger(log),
            shutdown_timeout=SHUTDOWN_GRACE,
        )
        await runner.setup()
        try:
            # Bound here unless `pilot-agent proxy` bound them before Envoy's exec.
            sockets = list(self._sockets) or bind_status_sockets(self.settings.listen_host, self.settings.status_port)
        except AgentError:
            await runner.cleanup()
            raise
        for sock in sockets:
            await GuardedSite(runner, sock, self.guard).start()
        self._runner = runner
        # IPv4 first (bind_status_sockets' order): with port 0 on all interfaces, each family gets its own port.
        self.port = int(sockets[0].getsockname()[1])
        self.prober.status_port = self.port
        log.info("status server listening on port %d", self.port)

    async def stop(self) -> None:
        """Stop listening, give open requests SHUTDOWN_GRACE, then close upstream connections. Idempotent."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._merger is not None:
            merger, self._merger = self._merger, None
            await merger.close()

    def merger(self) -> MetricsMerger:
        """The merged scrape, loaded at the first one: its module (the exposition grammar's regexes, ~15 ms) is not
        on the way to the first readiness answer."""
        if self._merger is None:
            from agent.status.metrics_merge import MetricsMerger  # noqa: PLC0415 (lazy, see above)

            self._merger = MetricsMerger(self.settings, self.metrics)
            self._merger.start()
        return self._merger

    async def _ready(self, request: web.Request) -> web.Response:
        reason = await self.readiness.check()
        if reason is None:
            return web.Response(status=200)
        # Istio answers an empty 503 and keeps the reason in its log; the body here saves a trip to the log.
        return web.Response(status=503, text=reason + "\n")

    async def _quit(self, request: web.Request) -> web.Response:
        if (refused := _refused_unless_local_post(request)) is not None:
            return refused
        self.lifecycle.request_shutdown("/quitquitquit called", skip_drain=True)
        return web.Response(text="OK")

    async def _drain(self, request: web.Request) -> web.Response:
        """Native-sidecar preStop: drain now, keep Envoy running, and make the later SIGTERM exit without waiting."""
        if (refused := _refused_unless_local_post(request)) is not None:
            return refused
        started = time.monotonic()
        try:
            await self.admin.drain_listeners(
                inbound_only=self.settings.proxy_type == "sidecar", graceful=True, skip_exit=True
            )
        except AdminError as exc:
            # Still skip the drain at SIGTERM: an Envoy that cannot be asked to drain will not drain by waiting.
            self.lifecycle.skip_drain_at_shutdown()
            log.warning("drain requested but Envoy's admin API failed: %s", exc)
            return web.Response(status=500, text=f"drain failed: {exc}\n")
        self.lifecycle.skip_drain_at_shutdown()
        log.info("drain requested: listeners draining (%.3fs)", time.monotonic() - started)
        return web.Response(text="OK")
