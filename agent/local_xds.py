"""The no-control-plane mode's files (`--local-xds-dir`): checked before Envoy starts, and every reload reported.

Envoy reads `lds.yaml` and `cds.yaml` itself (a filesystem subscription on the directory) and keeps what it had
when a new version fails; its only report is a counter and a log line. The agent therefore:

- checks each file before Envoy's first start (agent/config/local_xds.py): a broken file is exit 78 naming it,
  not a LIVE Envoy with no listeners;
- watches the directory and, after each real change of a file, waits for Envoy's verdict on that file (its
  `update_attempt` / `update_success` / `update_rejected` / `update_failure` counters) and logs it with the reason
  when it failed, counting it in `istio_agent_local_xds_loads_total{file, result}` (Envoy's first load too). A
  change Envoy never looks at (an in-place edit: Envoy only reloads a file moved into the directory) is reported
  with the fix;
- serves readiness in place of Envoy's config probe: until both files have been accepted once, the reason names
  the file that was not, and why.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from agent.config.local_xds import KINDS, XdsFileKind, check_file, directory_problem
from agent.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.lifecycle import Lifecycle
    from agent.metrics import AgentMetrics
    from agent.proxy.admin import AdminClient
    from agent.watch import ChangeSet

log = logging.getLogger("agent.localxds")


class Counts(NamedTuple):
    """Envoy's counters for one filesystem subscription (`<prefix>.update_<field>`)."""

    attempt: int = 0
    success: int = 0
    rejected: int = 0
    failure: int = 0

    @classmethod
    def of(cls, stats: dict[str, int], prefix: str) -> Counts:
        return cls(*(stats.get(f"{prefix}.update_{name}", 0) for name in cls._fields))


@dataclass
class _FileState:
    kind: XdsFileKind
    path: Path
    seen: Counts = field(default_factory=Counts)
    seen_start: int = 0  # the Envoy (Lifecycle.envoy_starts) whose counters `seen` holds
    problem: str | None = None  # why the current version is not loaded; None when it is (or not judged yet)


class LocalXds:
    """A supervisor service (start/run/stop) and the readiness probe of the local mode (passed/check/forget)."""

    name = "local xDS"

    def __init__(
        self,
        directory: Path,
        admin: AdminClient,
        metrics: AgentMetrics,
        *,
        debounce: float = 0.1,
        verdict_timeout: float = 2.0,
        first_load_timeout: float = 60.0,
        lifecycle: Lifecycle | None = None,
        settled: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`lifecycle` tells this service when Envoy is cold-started again (a crash restart): the new Envoy reads
        both files at its start, its counters start from zero, and its verdict is reported as the first one's.
        run() waits for `settled` first (the start-up's first readiness answers go first)."""
        self.settled = settled
        self.directory = directory
        self.lifecycle = lifecycle
        self.files = {directory / kind.name: _FileState(kind, directory / kind.name) for kind in KINDS}
        self.admin, self.metrics = admin, metrics
        # Quiet time after a change; how long Envoy may take to read a new version, and to read the first one.
        self.debounce, self.verdict_timeout, self.first_load_timeout = debounce, verdict_timeout, first_load_timeout
        self.passed = False
        self._next_change = asyncio.Event()  # set (and replaced) at each change of the files the watcher reports

    # ---- what a crash restart waits for (agent.proxy.start_gate.StartGate) ----

    def start_problem(self) -> str | None:
        return directory_problem(self.directory)

    def next_change(self) -> asyncio.Event:
        return self._next_change

    def _changed(self, change: ChangeSet, events: asyncio.Queue[tuple[int, ChangeSet] | int]) -> None:
        events.put_nowait((self._envoy_start(), change))
        self._next_change.set()
        self._next_change = asyncio.Event()

    # ---- the service ----

    async def start(self) -> None:
        log.info("local xDS: Envoy loads its listeners and clusters from %s", self.directory)

    async def stop(self) -> None:
        pass

    async def run(self) -> None:
        """Exit paths: only cancellation (the watcher stops with it)."""
        if self.settled is not None:
            await self.settled()
        from agent.watch import Watcher  # noqa: PLC0415 (lazy: watchdog loads after Envoy's exec)

        # Changes of the files (with the Envoy start current when they came), and Envoy's cold starts (their
        # count), judged one at a time in their order.
        events: asyncio.Queue[tuple[int, ChangeSet] | int] = asyncio.Queue()
        files = {p: s.kind.name for p, s in self.files.items()}
        # This service reports each change itself (with Envoy's verdict): the watcher's own lines would repeat it.
        watcher = Watcher(
            files,
            lambda change: self._changed(change, events),
            debounce=self.debounce,
            change_level=logging.DEBUG,
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(watcher.run())
            if self.lifecycle is not None:
                tg.create_task(_follow_envoy_starts(self.lifecycle, events.put_nowait))
            await self._judge_first_loads()
            while True:
                event = await events.get()
                if isinstance(event, int):
                    await self._judge_first_loads()
                    continue
                came_at, change = event
                for path in change.changed:
                    if came_at != self._envoy_start():
                        # Envoy was cold-started since: the new one read this version at its start, and the
                        # verdict on that start (queued after this change) is the one to report.
                        log.debug("local xDS: %s changed before Envoy's restart: judged with its start", path)
                        continue
                    await self._judge(self.files[path])
                for path in change.deleted:
                    kind = self.files[path].kind
                    log.warning(
                        "local xDS: %s was deleted: Envoy keeps the %s it had, but a new Envoy cannot start "
                        "without it (after a crash, Envoy is restarted only once it is back): put it back (write it "
                        "elsewhere, then mv it to %s)",
                        path,
                        kind.noun,
                        kind.name,
                    )

    async def _judge_first_loads(self) -> None:
        """Envoy's verdict on each file as the current Envoy read it at its start (unless judged already)."""
        for state in self.files.values():
            if state.seen_start != self._envoy_start() or self._envoy_start() == 0:
                await self._judge(state, first=True)

    async def _counts(self, kind: XdsFileKind) -> Counts | None:
        from agent.proxy.admin import AdminError  # noqa: PLC0415 (lazy: aiohttp loads after Envoy's exec)

        try:
            stats = await self.admin.stats(kind.stats_filter, timeout=1.0)
        except AdminError:
            return None
        return Counts.of(stats, kind.stats_prefix)

    async def _judge(self, state: _FileState, *, first: bool = False) -> None:
        """Wait for Envoy's next attempt at this file (its first load, or the reload on the move that changed it),
        then report the result."""
        try:
            check_file(state.path, state.kind)
            problem = None
        except ConfigError as exc:
            problem = str(exc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.first_load_timeout if first else self.verdict_timeout)
        delay = 0.02
        began = self._envoy_start()
        while (counts := await self._counts(state.kind)) is None or counts.attempt == self._before(
            state, counts
        ).attempt:
            if self._envoy_start() != began:
                return  # a newer Envoy (it read this version at its start): its start is judged next
            if loop.time() >= deadline:
                if first:
                    log.debug("local xDS: Envoy has not read %s yet", state.path)
                    return
                if counts is None or state.seen_start != self._envoy_start():
                    # No Envoy answers, or not the one seen before: it is being restarted. No in-place edit; the
                    # next Envoy reads the file at its start, and that verdict is reported then.
                    log.info("local xDS: %s changed while Envoy was restarting: the new Envoy reads it", state.path)
                    return
                self._report(
                    state,
                    "not_reloaded",
                    f"local xDS: {state.path} changed but Envoy did not reload it: Envoy reads a new version only "
                    f"when it is moved into {self.directory} (write a new file, then mv it over {state.kind.name})",
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        if self._envoy_start() != began:
            # The answer is a newer Envoy's (a change that cured a waiting crash restart starts one at once): its
            # first load of the file is judged with its start, next.
            return
        accepted = counts.success > self._before(state, counts).success
        state.seen, state.seen_start = counts, self._envoy_start()
        if accepted:
            state.problem = None
            self._report(state, "accepted", f"local xDS: Envoy {'loaded' if first else 'reloaded'} {state.path}")
        else:
            # Also the readiness reason (an HTTP body): it points at the log, not at "the line above".
            state.problem = problem or "Envoy rejected it (Envoy's `Filesystem config update` line in the log says why)"
            why = problem or "Envoy rejected it (its log line above says why)"
            noun = state.kind.noun
            kept = f"Envoy runs without its {noun} until a version loads" if first else f"Envoy keeps the {noun} it had"
            self._report(state, "rejected", f"local xDS: {state.path} not loaded: {why}; {kept}")

    def _envoy_start(self) -> int:
        return self.lifecycle.envoy_starts if self.lifecycle is not None else 0

    def _before(self, state: _FileState, now: Counts) -> Counts:
        """This Envoy's counters for the file before the change: zero for a new Envoy (a crash restart), whose
        counters start again and may climb back to the old values (which would hide its attempt)."""
        if state.seen_start != self._envoy_start() or now.attempt < state.seen.attempt:
            return Counts()
        return state.seen

    def _report(self, state: _FileState, result: str, message: str) -> None:
        self.metrics.local_xds_loads.labels(state.kind.name, result).inc()
        (log.info if result == "accepted" else log.error)("%s", message)

    # ---- the readiness probe (in place of Envoy's config probe) ----

    def forget(self) -> None:
        self.passed = False

    async def check(self) -> None:
        from agent.status.readiness import NotReady  # noqa: PLC0415 (lazy: the status server loads it)

        if self.passed:
            return
        from agent.proxy.admin import AdminError  # noqa: PLC0415 (lazy: aiohttp loads after Envoy's exec)

        # Both files' counters in one request: this check is on the way to the pod's first "ready".
        either = "|".join(state.kind.stats_prefix.replace(".", r"\.") for state in self.files.values())
        try:
            stats = await self.admin.stats(rf"^({either})\.update_", timeout=1.0)
        except AdminError:
            raise NotReady(
                f"local xDS files not loaded: Envoy's admin API does not answer ({self.admin.base_url})"
            ) from None
        waiting = []
        for state in self.files.values():
            counts = Counts.of(stats, state.kind.stats_prefix)
            if counts.success > 0:
                continue
            if counts.attempt == 0:
                waiting.append(f"{state.path} not read by Envoy yet")
                continue
            try:
                check_file(state.path, state.kind)
                why = state.problem or "Envoy rejected it (Envoy's `Filesystem config update` line in the log says why)"
            except ConfigError as exc:
                why = str(exc)
            waiting.append(f"{state.path} not loaded: {why}")
        if waiting:
            raise NotReady("local xDS file " + "; ".join(waiting))
        self.passed = True


async def _follow_envoy_starts(lifecycle: Lifecycle, report: Callable[[int], None]) -> None:
    """Report each cold start of Envoy after the current one (a crash restart, a recovery): its count."""
    seen = lifecycle.envoy_starts
    while True:
        seen = await lifecycle.wait_envoy_start(seen)
        report(seen)
