"""What the supervision policy (epochs.py) works with: its settings, one record per running epoch, the events it
reacts to and the outcomes of its steps. Data only."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from agent.proxy.desired import DesiredState

if TYPE_CHECKING:  # `pilot-agent proxy` builds the settings before Envoy's exec, without the event loop's modules
    from agent.proxy.launcher import EnvoyHandle


@dataclass(frozen=True)
class SupervisionSettings:
    restart_initial_delay: float = 0.2
    restart_budget: int = 10
    # An epoch running this long without a crash earns the full restart budget back.
    healthy_period: float = 60.0
    # Istio's 2019 agent waited 20 s for the parent to be LIVE ("Envoy internally uses a 15s timer").
    live_timeout: float = 20.0
    # Istio's current behaviour: the agent exits when Envoy exits, no restarts (ENVOY_RESTART_POLICY=exit).
    exit_on_envoy_exit: bool = False
    termination_log: Path | None = Path("/dev/termination-log")
    stop_grace: float = 5.0
    validate: bool = True
    stderr_tail_lines: int = 20
    # A postponed hot restart (the running epoch is not LIVE yet) is tried again after this long.
    retry_interval: float = 1.0


@dataclass(frozen=True)
class DrainSettings:
    proxy_type: str = "sidecar"
    termination_drain: float = 5.0
    exit_on_zero_active_connections: bool = False
    minimum_drain: float = 5.0
    # Istio's own listeners (status 15021, Prometheus 15090) are not application traffic.
    excluded_listener_ports: tuple[int, ...] = (15021, 15090)
    poll_interval: float = 1.0


@dataclass(frozen=True)
class WatchSettings:
    files: Mapping[Path, str]
    debounce: float = 0.1
    # A directory that never goes quiet (a writer every few ms) must not postpone a rotation for ever: the files
    # are hashed at the latest this long after the first event (None: max(1 s, 10 x debounce)).
    max_delay: float | None = None
    # Missing directories are the normal case (no control plane, a laptop): say so at debug, not as a warning.
    quiet_missing_dirs: bool = False


@dataclass(eq=False)
class Epoch:
    """One running Envoy epoch and the state it was started on."""

    process: EnvoyHandle
    state: DesiredState
    # LIVE once its child took over: it drains and exits on its own (--parent-shutdown-time-s).
    retiring: bool = False
    # Seen listening on the admin port itself: its LIVE answers are its own, not another Envoy's on this host.
    owns_admin: bool = False

    @property
    def number(self) -> int:
        return self.process.epoch


class Exited(NamedTuple):
    """An epoch's process has exited; `epoch.process.exit_info` says how."""

    epoch: Epoch


class ChangeRequested(NamedTuple):
    """The inputs changed (the watcher), or a new epoch was asked for (SIGHUP)."""

    reason: str
    # SIGHUP: a new epoch even when the desired state has not changed.
    forced: bool = False


Event = Exited | ChangeRequested


class Applied(enum.Enum):
    """What one reconcile step did."""

    DONE = "done"  # a new epoch is LIVE
    UNCHANGED = "unchanged"  # nothing to do (same state, known bad, or hot restart off)
    INVALID = "invalid"  # rejected; the running epoch stays
    POSTPONED = "postponed"  # the running epoch is not LIVE yet: try again later
    ABANDONED = "abandoned"  # the running epoch does not answer: given up until the next change
    RECOVERED = "recovered"  # the child failed; the family was cold-started on the last good state


class LiveWait(enum.Enum):
    LIVE = "live"
    EXITED = "exited"
    SHUTDOWN = "shutdown"
    NOT_LIVE = "not live"  # answered, but not LIVE within the timeout (waiting for its control plane?)
    UNRESPONSIVE = "unresponsive"  # the admin API never answered within the timeout (stopped or stuck)


@dataclass
class Pending:
    """A reconcile step still to do."""

    forced: bool = False
    retry_at: float | None = None
    reasons: list[str] = field(default_factory=list)
