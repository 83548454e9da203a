"""Readiness: a list of probes, first failure wins (Istio's status/ready/probe.go semantics).

1. The agent's own knowledge (`Lifecycle.not_ready_reason()`): shutdown begun, or Envoy down/restarting.
2. Envoy accepted at least one CDS and one LDS update (remembered once true; rejections reported as such).
3. Envoy's server.state is LIVE and its workers started (remembered once true).
4. Envoy still answers on its admin API (never remembered; asked at most once a second). A stopped (SIGSTOP) or
   stuck Envoy keeps its LIVE stats for ever: without this 15020 would say ready while Envoy serves nothing. One
   slow answer is not a hang (a big config push can hold Envoy's main thread): not ready when a request gets no
   answer and the last answer is `unresponsive_after` seconds old.

The remembered facts are forgotten when the agent sees Envoy down: a restarted Envoy (new epoch after a crash)
must earn them again; Istio never restarts Envoy, so it never needed that. Concurrent probes share one in-flight
check, so a flood of kubelet probes costs at most one pair of admin requests at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent import IMPORTED_AT
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import SERVER_STATES, AdminClient, AdminError, AdminTimeout

log = logging.getLogger("agent.status")

CONFIG_FILTER = r"^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$"
LIVE_FILTER = r"^(server\.state|listener_manager\.workers_started)$"


# Longer than any interpreter takes from its exec to the agent's first import (even on a loaded machine): a process
# that old at that import was started by a parent that later exec'd the agent.
EXEC_GAP = 5.0


def process_start_monotonic(imported_at: float = IMPORTED_AT, exec_gap: float = EXEC_GAP) -> float:
    """This process's start on the monotonic clock (the kernel's start time, converted once).

    From /proc/self/stat (clock ticks since boot) against CLOCK_BOOTTIME, not psutil's create_time(): that adds the
    boot time from /proc/stat `btime`, whole seconds, so the start came out up to 1 s early (0.57 s on the
    development VM) and istio_agent_startup_duration_seconds that much too long.

    The kernel's start is the fork, not the exec: a shell that runs the agent last (`sh -c 'setup && exec
    pilot-agent'`, or bash running the last command of `a && b` in place, as the README's Quick start does) hands
    down its own start, and the setup's minutes were counted as the agent's start-up. Istio measures from its own
    exec (a Go package variable), so when the kernel's start is more than `exec_gap` before the agent's first
    import (`imported_at`), that import is the start."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        age = 0.0  # not Linux: measure from the first call instead
    started = time.monotonic() - max(age, 0.0)
    return imported_at if imported_at - started > exec_gap else started


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


@dataclass
class EnvoyResponding:
    """Envoy answers on its admin API (any HTTP status is an answer). Check 4 of the module docstring."""

    admin: AdminClient
    interval: float = 1.0
    timeout: float = 1.0
    unresponsive_after: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _answered_at: float = float("-inf")
    _silent_since: float | None = None

    def fresh(self) -> bool:
        """Envoy answered within the last `interval`: no need to ask again."""
        return self.clock() - self._answered_at < self.interval

    def forget(self) -> None:
        self._answered_at = float("-inf")
        self._silent_since = None

    async def check(self) -> None:
        if self.fresh():
            return
        started = self.clock()
        try:
            await self.admin.request("GET", "/ready", timeout=self.timeout)
        except AdminTimeout:
            if self._silent_since is None:
                self._silent_since = started
            # Silent since its last answer (kubelet may probe only every 15 s), or since the first unanswered
            # request when it never answered since it was started.
            since = self._answered_at if self._answered_at != float("-inf") else self._silent_since
            silent = self.clock() - since
            if silent >= self.unresponsive_after:
                raise NotReady(
                    f"Envoy is not responding: its admin API has not answered for {silent:.0f}s (stopped or stuck?)"
                ) from None
            return
        except AdminError:
            # Refused: not a hang (the supervisor reports an exit; a hot restart hands the admin socket over).
            self._silent_since = None
            return
        self._answered_at = self.clock()
        self._silent_since = None


class Readiness:
    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: AgentMetrics,
        probes: list[Probe],
        *,
        responding: EnvoyResponding | None = None,
        started_at: float | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.probes = probes
        self.responding = responding
        # Monotonic time of the agent's start; startup_duration is measured from it (Istio: process start).
        self.started_at = process_start_monotonic() if started_at is None else started_at
        self.ever_ready = False
        # The Envoy cold start (Lifecycle.envoy_starts) the probes' remembered facts belong to.
        self._verified_start = lifecycle.envoy_starts
        self._last: str | None = "not checked yet"
        self._inflight: asyncio.Future[str | None] | None = None

    @classmethod
    def for_envoy(
        cls,
        lifecycle: Lifecycle,
        metrics: AgentMetrics,
        admin: AdminClient,
        extra: Sequence[Probe] = (),
        *,
        upstream: Sequence[Probe] = (),
        config_probe: Probe | None = None,
    ) -> Readiness:
        """Envoy's probes, then the agent's own (`extra`: the DNS proxy's name table), as Istio orders them; and
        whether Envoy still answers at all. `upstream` probes come first: while Envoy has no configuration they say
        why (istiod unreachable or refusing the credentials) better than Envoy's "config not received".
        `config_probe` replaces the check that Envoy received its listeners and clusters from a control plane (the
        no-control-plane mode names its files instead)."""
        probes = [*upstream, config_probe or EnvoyConfigProbe(admin), EnvoyLiveProbe(admin), *extra]
        return cls(lifecycle, metrics, probes, responding=EnvoyResponding(admin))

    async def check(self) -> str | None:
        """None when ready, else the reason. Concurrent callers share one evaluation."""
        self._forget_facts_of_a_previous_envoy()
        if (
            self.lifecycle.not_ready_reason() is None
            and all(probe.passed for probe in self.probes)
            and (self.responding is None or self.responding.fresh())
        ):
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
            self._forget_all()

    def _forget_all(self) -> None:
        for probe in self.probes:
            probe.forget()
        if self.responding is not None:
            self.responding.forget()

    async def _evaluate(self) -> str | None:
        start = self.lifecycle.envoy_starts
        reason = self.lifecycle.not_ready_reason()
        if reason is not None and self.lifecycle.envoy_down_reason is not None:
            self._forget_all()
        if reason is None:
            # All at once (each is one admin request at most): the first to fail, in probe order, is the reason.
            checks = [probe.check() for probe in self.probes]
            if self.responding is not None:
                checks.append(self.responding.check())
            for outcome in await asyncio.gather(*checks, return_exceptions=True):
                if isinstance(outcome, NotReady):
                    reason = str(outcome)
                    break
                if isinstance(outcome, BaseException):
                    raise outcome
        if self.lifecycle.envoy_starts != start:
            # Envoy was cold-started while we asked the previous one: its answers say nothing about the new one.
            self._forget_facts_of_a_previous_envoy()
            reason = reason or "Envoy was restarted during the readiness check"
        # Shutdown may have begun while we asked Envoy: it wins (readiness flips at the first SIGTERM).
        reason = self.lifecycle.not_ready_reason() or reason
        log.debug("readiness evaluated: %s", reason or "ready")
        self._record(reason)
        return reason

    def _record(self, reason: str | None) -> None:
        if reason == self._last:
            return
        self._last = reason
        if reason is None:
            self.metrics.envoy_ready.set(1)
            self.lifecycle.reported_ready()
            if not self.ever_ready:
                self.ever_ready = True
                elapsed = time.monotonic() - self.started_at
                self.metrics.startup_duration.set(elapsed)
                log.info("Readiness succeeded in %.3fs", elapsed)
            log.info("Envoy proxy is ready")
        else:
            self.metrics.envoy_ready.set(0)
            log.warning("Envoy proxy is NOT ready: %s", reason)
