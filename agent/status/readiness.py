"""Readiness: a list of probes, first failure wins (Istio's status/ready/probe.go semantics).

1. The agent's own knowledge (`Lifecycle.not_ready_reason()`): shutdown begun, or Envoy down/restarting.
2. Envoy accepted at least one CDS and one LDS update (remembered once true; rejections reported as such).
3. Envoy's server.state is LIVE and its workers started (remembered once true).

The remembered facts are forgotten when the agent sees Envoy down: a restarted Envoy (new epoch after a crash)
must earn them again; Istio never restarts Envoy, so it never needed that. Concurrent probes share one in-flight
check, so a flood of kubelet probes costs at most one pair of admin requests at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import SERVER_STATES, AdminClient, AdminError

log = logging.getLogger("agent.status")

CONFIG_FILTER = r"^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$"
LIVE_FILTER = r"^(server\.state|listener_manager\.workers_started)$"


def process_start_monotonic() -> float:
    """This process's start on the monotonic clock (the kernel's start time, converted once).

    From /proc/self/stat (clock ticks since boot) against CLOCK_BOOTTIME, not psutil's create_time(): that adds the
    boot time from /proc/stat `btime`, whole seconds, so the start came out up to 1 s early (0.57 s on the
    development VM) and istio_agent_startup_duration_seconds that much too long."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        age = 0.0  # not Linux: measure from the first call instead
    return time.monotonic() - max(age, 0.0)


class NotReady(Exception):
    """A probe failed; the message is the reason served in the 503 body."""


class Probe(Protocol):
    @property
    def passed(self) -> bool:
        """True once the fact held: it is remembered (until forget()), so no further check is needed."""

    async def check(self) -> None:
        """Return when this fact holds; raise NotReady(reason) otherwise."""

    def forget(self) -> None:
        """Drop anything remembered (Envoy went away)."""


class _RememberedAdminFact:
    """A Probe whose fact is read from Envoy's admin API and, once it held, remembered until forget()."""

    def __init__(self, admin: AdminClient) -> None:
        self.admin = admin
        self.passed = False

    def forget(self) -> None:
        self.passed = False

    async def check(self) -> None:
        if self.passed:
            return
        await self._verify()
        self.passed = True

    async def _verify(self) -> None:
        """Return when the fact holds now; raise NotReady(reason) otherwise."""
        raise NotImplementedError


class EnvoyConfigProbe(_RememberedAdminFact):
    async def _verify(self) -> None:
        try:
            stats = await self.admin.stats(CONFIG_FILTER, timeout=1.0)
        except AdminError as exc:
            raise NotReady(f"config not received from XDS server: admin API: {exc}") from None
        cds_ok = stats.get("cluster_manager.cds.update_success", 0)
        cds_bad = stats.get("cluster_manager.cds.update_rejected", 0)
        lds_ok = stats.get("listener_manager.lds.update_success", 0)
        lds_bad = stats.get("listener_manager.lds.update_rejected", 0)
        if cds_ok > 0 and lds_ok > 0:
            return
        counts = f"cds updates: {cds_ok} successful, {cds_bad} rejected; "
        counts += f"lds updates: {lds_ok} successful, {lds_bad} rejected"
        if cds_ok == cds_bad == lds_ok == lds_bad == 0:
            raise NotReady(f"config not received from XDS server (is Istiod running?): {counts}")
        if cds_bad or lds_bad:
            raise NotReady(f"config received from XDS server, but was rejected: {counts}")
        raise NotReady(f"config not fully received from XDS server: {counts}")


class EnvoyLiveProbe(_RememberedAdminFact):
    async def _verify(self) -> None:
        try:
            stats = await self.admin.stats(LIVE_FILTER, timeout=3.0)
        except AdminError as exc:
            raise NotReady(f"failed to get readiness stats: {exc}") from None
        if "server.state" not in stats:
            raise NotReady("failed to get readiness stats: server.state is not yet updated")
        if "listener_manager.workers_started" not in stats:
            raise NotReady("failed to get readiness stats: listener_manager.workers_started is not yet updated")
        state = SERVER_STATES.get(stats["server.state"], "UNKNOWN")
        if state != "LIVE":
            raise NotReady(f"server is not live, current state is: {state}")
        if stats["listener_manager.workers_started"] != 1:
            raise NotReady("workers have not yet started")


class Readiness:
    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: AgentMetrics,
        probes: list[Probe],
        *,
        started_at: float | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.probes = probes
        # Monotonic time of the agent's start; startup_duration is measured from it (Istio: process start).
        self.started_at = process_start_monotonic() if started_at is None else started_at
        self.ever_ready = False
        # The Envoy cold start (Lifecycle.envoy_starts) the probes' remembered facts belong to.
        self._verified_start = lifecycle.envoy_starts
        self._last: str | None = "not checked yet"
        self._inflight: asyncio.Future[str | None] | None = None

    @classmethod
    def for_envoy(
        cls, lifecycle: Lifecycle, metrics: AgentMetrics, admin: AdminClient, extra: Sequence[Probe] = ()
    ) -> Readiness:
        """Envoy's probes, then the agent's own (`extra`: the DNS proxy's name table), as Istio orders them."""
        return cls(lifecycle, metrics, [EnvoyConfigProbe(admin), EnvoyLiveProbe(admin), *extra])

    async def check(self) -> str | None:
        """None when ready, else the reason. Concurrent callers share one evaluation."""
        self._forget_facts_of_a_previous_envoy()
        if self.lifecycle.not_ready_reason() is None and all(probe.passed for probe in self.probes):
            # Hot path of every kubelet probe once ready: nothing to ask Envoy, no task to create.
            self._record(None)
            return None
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._evaluate())
        # shield: one prober hanging up must not cancel the check the others are waiting for.
        return await asyncio.shield(self._inflight)

    def _forget_facts_of_a_previous_envoy(self) -> None:
        """A cold-started Envoy (crash restart, recovery) knows nothing yet: what the probes verified about the
        one before it must be verified again, even if no probe happened to land while Envoy was down (kubelet
        probes every few seconds; a crash restart takes a fraction of one)."""
        if self.lifecycle.envoy_starts != self._verified_start:
            self._verified_start = self.lifecycle.envoy_starts
            for probe in self.probes:
                probe.forget()

    async def _evaluate(self) -> str | None:
        start = self.lifecycle.envoy_starts
        reason = self.lifecycle.not_ready_reason()
        if reason is not None and self.lifecycle.envoy_down_reason is not None:
            for probe in self.probes:
                probe.forget()
        if reason is None:
            try:
                for probe in self.probes:
                    await probe.check()
            except NotReady as exc:
                reason = str(exc)
        if self.lifecycle.envoy_starts != start:
            # Envoy was cold-started while we asked the previous one: its answers say nothing about the new one.
            self._forget_facts_of_a_previous_envoy()
            reason = reason or "Envoy was restarted during the readiness check"
        # Shutdown may have begun while we asked Envoy: it wins (readiness flips at the first SIGTERM).
        reason = self.lifecycle.not_ready_reason() or reason
        self._record(reason)
        return reason

    def _record(self, reason: str | None) -> None:
        if reason == self._last:
            return
        self._last = reason
        if reason is None:
            self.metrics.envoy_ready.set(1)
            if not self.ever_ready:
                self.ever_ready = True
                elapsed = time.monotonic() - self.started_at
                self.metrics.startup_duration.set(elapsed)
                log.info("Readiness succeeded in %.3fs", elapsed)
            log.info("Envoy proxy is ready")
        else:
            self.metrics.envoy_ready.set(0)
            log.warning("Envoy proxy is NOT ready: %s", reason)
