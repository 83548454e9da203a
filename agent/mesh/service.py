"""The mesh side as one service of the supervisor: the SDS server, its secret cache (and CA client), the xDS proxy.

Order (Istio's Agent.Run): agent.mesh.listen makes the sockets before Envoy's exec; `MeshService` is built after
the exec and serves them; on the way down Envoy stops first, then the xDS proxy, the SDS server, the cache.

`MeshProbe` is the readiness probe that says which side fails while Envoy has no configuration or certificate:
"istiod unreachable: ...", "istiod refused the credentials: ...", and the same for istiod's CA.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from agent.mesh.listen import MeshListeners
from agent.mesh.settings import MeshSettings
from agent.security.caclient import CaClient
from agent.security.metrics import SecurityMetrics
from agent.security.sds import SdsServer
from agent.security.secret_cache import SecretCache
from agent.xds.metrics import XdsMetrics
from agent.xds.proxy import XdsProxy

log = logging.getLogger("agent.mesh")


class MeshService:
    """A supervisor service (agent.supervisor.Service, LongRunning) built after Envoy's exec on `listeners`."""

    name = "SDS server and xDS proxy"

    def __init__(self, settings: MeshSettings, listeners: MeshListeners, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.listeners = listeners
        security_metrics = SecurityMetrics(registry)
        ca = None
        if settings.ca is not None and not listeners.serve_only_files:
            log.info("CA Endpoint %s, provider Citadel", settings.ca.describe())
            ca = CaClient(settings.ca, security_metrics, cert_signer=settings.cert_signer)
        else:
            log.info("Workload is using file mounted certificates. Skipping connecting to CA")
        self.prewarm = ca is not None
        self.cache = SecretCache(settings.cache, ca, security_metrics, key_ahead=listeners.key_ahead)
        listeners.key_ahead = None  # the cache's now: it ends it
        self.sds = SdsServer(self.cache, listeners.sds)
        self.xds: XdsProxy | None = None
        if settings.xds is not None and listeners.xds is not None:
            self.xds = XdsProxy(settings.xds, XdsMetrics(registry), listeners.xds)
        self.probe = MeshProbe(self)
        self._prewarm: asyncio.Future[None] | None = None
        self._started = False
        self._stopped = False

    async def start(self) -> None:
        """Serve both sockets and, with a CA, start fetching the first certificate before Envoy asks for it.
        Idempotent: `pilot-agent proxy` starts it before the supervisor exists."""
        if self._started:
            return
        self._started = True
        await self.sds.start()
        if self.xds is not None:
            await self.xds.start()
        if self.prewarm:
            self._prewarm = asyncio.ensure_future(self.cache.prewarm())

    async def run(self) -> None:
        """The cache's watcher and rotation timer. Exit paths: only cancellation."""
        await self.cache.run(prewarm=False)

    async def stop(self) -> None:
        """Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._prewarm is not None:
            self._prewarm.cancel()
            await asyncio.gather(self._prewarm, return_exceptions=True)
        if self.xds is not None:
            await self.xds.stop()
        await self.sds.stop()
        await self.cache.close()


class MeshProbe:
    """A readiness probe (agent.status.readiness.Probe) placed before Envoy's: while istiod has not answered, or
    the CA has issued nothing, the reason names the side that fails. Passed (and remembered until Envoy restarts)
    once istiod has answered and, when a CA is used, a certificate was issued; later istiod outages do not make
    a configured Envoy unready (Istio's behaviour)."""

    def __init__(self, mesh: MeshService) -> None:
        self.mesh = mesh
        self._passed = False

    @property
    def passed(self) -> bool:
        return self._passed

    def forget(self) -> None:
        self._passed = False

    async def check(self) -> None:
        from agent.status.readiness import NotReady  # noqa: PLC0415 (agent.status imports aiohttp)

        if self._passed:
            return  # remembered: istiod going away later does not unready a configured Envoy
        xds = self.mesh.xds
        if xds is not None and (reason := xds.not_ready_reason()) is not None:
            raise NotReady(reason)
        cache = self.mesh.cache
        if self.mesh.prewarm and not cache.issued and cache.ca_error is not None:
            error = cache.ca_error
            side = "istiod's CA refused the credentials" if error.refused else "istiod's CA failed"
            ca = self.mesh.settings.ca
            raise NotReady(f"{side}: {error} ({ca.describe() if ca else ''})")
        if (xds is None or xds.answered) and (cache.issued or not self.mesh.prewarm):
            self._passed = True
