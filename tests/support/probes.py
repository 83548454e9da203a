"""kubelet's container probes: httpGet with period, timeout and success/failure thresholds.

Semantics follow kubelet's prober worker (`pkg/kubelet/prober/worker.go`) and HTTP prober (`pkg/probe/http`):
- the first probe runs as soon as the container runs (after initialDelaySeconds), then one per period; a probe that
  outlives the period makes the ticks in between drop (Go's time.Ticker), it does not queue them;
- a result changes only after `failureThreshold` consecutive failures or `successThreshold` consecutive successes;
  until then the previous result stands. Readiness starts as failure, liveness as success, startup as unknown;
- readiness and liveness do not run until the startup probe has succeeded; startup stops once it has;
- HTTP: success iff 200 <= status < 400; a timeout or a refused connection is a failure.

Periods are seconds as floats here, so unit tests can run kubelet's logic at a faster clock.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ProbeKind = Literal["startup", "readiness", "liveness"]
KUBE_PROBE_USER_AGENT = "kube-probe/1.37"
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class ProbeSpec:
    kind: ProbeKind
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    initial_delay_s: float = 0.0
    period_s: float = 10.0
    timeout_s: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def from_manifest(
        cls, kind: ProbeKind, probe: Mapping[str, object], ports: Sequence[Mapping[str, object]] = ()
    ) -> ProbeSpec:
        """From a container's `readinessProbe` (etc.) with the API server's defaults filled in."""
        http = probe.get("httpGet")
        if not isinstance(http, Mapping):
            raise ValueError(f"{kind}Probe: only httpGet probes are supported by this harness")
        port_ref = http["port"]
        if isinstance(port_ref, str) and not port_ref.isdigit():
            named = [p for p in ports if p.get("name") == port_ref]
            if not named:
                raise ValueError(f"{kind}Probe: no container port named {port_ref}")
            port = int(str(named[0]["containerPort"]))
        else:
            port = int(str(port_ref))
        headers = tuple(
            (str(h["name"]), str(h["value"])) for h in http.get("httpHeaders", []) or [] if isinstance(h, Mapping)
        )
        return cls(
            kind=kind,
            port=port,
            path=str(http.get("path", "/")),
            scheme=str(http.get("scheme", "HTTP")),
            host=str(http["host"]) if http.get("host") else None,
            headers=headers,
            initial_delay_s=float(str(probe.get("initialDelaySeconds", 0))),
            period_s=float(str(probe.get("periodSeconds", 10))),
            timeout_s=float(str(probe.get("timeoutSeconds", 1))),
            success_threshold=int(str(probe.get("successThreshold", 1))),
            failure_threshold=int(str(probe.get("failureThreshold", 3))),
        )

    def scaled(self, factor: float) -> ProbeSpec:
        """The same probe on a faster clock (periods, timeouts and delays times `factor`)."""
        return ProbeSpec(
            self.kind,
            self.port,
            self.path,
            self.scheme,
            self.host,
            self.headers,
            self.initial_delay_s * factor,
            self.period_s * factor,
            self.timeout_s * factor,
            self.success_threshold,
            self.failure_threshold,
        )


class ProbeState:
    """kubelet's per-probe bookkeeping: the published result moves only when a threshold is reached."""

    def __init__(self, spec: ProbeSpec) -> None:
        self.spec = spec
        initial: dict[ProbeKind, bool | None] = {"readiness": False, "liveness": True, "startup": None}
        self.result: bool | None = initial[spec.kind]
        self._last: bool | None = None
        self._run = 0

    def record(self, ok: bool) -> bool | None:
        if self._last == ok:
            self._run += 1
        else:
            self._last = ok
            self._run = 1
        if (not ok and self._run < self.spec.failure_threshold) or (ok and self._run < self.spec.success_threshold):
            return self.result
        self.result = ok
        if not ok and self.spec.kind in ("liveness", "startup"):
            # kubelet restarts the container and counts again from zero for the new one.
            self._run = 0
        return self.result


@dataclass(frozen=True)
class ProbeOutcome:
    at: float
    ok: bool
    detail: str  # the HTTP status, or the error
    result: bool | None  # the published result after this outcome


def http_probe(url: str, timeout_s: float, headers: Sequence[tuple[str, str]] = ()) -> tuple[bool, str]:
    """One kubelet HTTP probe: (success, detail)."""
    request = urllib.request.Request(url, method="GET")
    request.add_header("User-Agent", KUBE_PROBE_USER_AGENT)
    request.add_header("Accept", "*/*")
    request.add_header("Connection", "close")
    for name, value in headers:
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read(10 * 1024)
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
    except (OSError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return 200 <= status < 400, str(status)


def enter_netns(path: Path) -> None:
    """Move the calling thread (only it: setns acts per thread) into a network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class ContainerProbes:
    """The startup and readiness probes kubelet runs against one container, in a background thread.

    `netns` is the network namespace kubelet's probes come from (the node's: where the pod IP is routed); None
    means the test process's own. `ready` is what kubelet would report as the container's Ready condition.
    """

    host: str
    startup: ProbeSpec | None = None
    readiness: ProbeSpec | None = None
    netns: Path | None = None
    probe_fn: Callable[[str, float, Sequence[tuple[str, str]]], tuple[bool, str]] = http_probe
    history: list[tuple[ProbeKind, ProbeOutcome]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._states = {spec.kind: ProbeState(spec) for spec in (self.startup, self.readiness) if spec is not None}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at = 0.0
        self._startup_done = self.startup is None
        self._triggers: dict[ProbeKind, threading.Event] = {
            "startup": threading.Event(),
            "readiness": threading.Event(),
        }

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin probing now (call when the container's process has started)."""
        self._started_at = time.monotonic()
        for spec in (self.startup, self.readiness):
            if spec is not None:
                thread = threading.Thread(target=self._worker, args=(spec,), name=f"probe-{spec.kind}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def stop(self) -> None:
        self._stop.set()
        for trigger in self._triggers.values():
            trigger.set()
        with self._changed:
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> ContainerProbes:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what kubelet reports -------------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        with self._lock:
            return self._startup_done

    @property
    def ready(self) -> bool:
        with self._lock:
            if not self._startup_done:
                return False
            state = self._states.get("readiness")
            return True if state is None else bool(state.result)

    def wait_for(self, predicate: Callable[[ContainerProbes], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, 0.05))
        return True

    def outcomes(self, kind: ProbeKind) -> list[ProbeOutcome]:
        with self._lock:
            return [outcome for k, outcome in self.history if k == kind]

    # ---- the worker ------------------------------------------------------------------------------------------------
    def _worker(self, spec: ProbeSpec) -> None:
        if self.netns is not None:
            enter_netns(self.netns)
        url = f"{spec.scheme.lower()}://{spec.host or self.host}:{spec.port}{spec.path}"
        trigger = self._triggers[spec.kind]
        next_tick = self._started_at + spec.period_s
        while not self._stop.is_set():
            if self._should_probe(spec):
                ok, detail = self.probe_fn(url, spec.timeout_s, spec.headers)
                self._publish(spec, ok, detail)
            now = time.monotonic()
            if next_tick <= now:
                # A tick fell while probing: Go's ticker keeps one (the next probe runs at once), drops the rest.
                while next_tick <= now:
                    next_tick += spec.period_s
                continue
            if trigger.wait(next_tick - now):
                trigger.clear()  # kubelet's manual trigger: probe now, the ticker keeps its rhythm
            else:
                next_tick += spec.period_s

    def _should_probe(self, spec: ProbeSpec) -> bool:
        if time.monotonic() - self._started_at < spec.initial_delay_s:
            return False
        with self._lock:
            if spec.kind == "startup":
                return not self._startup_done
            return self._startup_done

    def _publish(self, spec: ProbeSpec, ok: bool, detail: str) -> None:
        with self._changed:
            if self._stop.is_set():
                return
            result = self._states[spec.kind].record(ok)
            if spec.kind == "startup" and result and not self._startup_done:
                self._startup_done = True
                # kubelet runs a readiness probe that has no result yet as soon as the pod status is synced
                # (prober_manager UpdatePodStatus), rather than waiting for its next 15 s tick.
                self._triggers["readiness"].set()
            self.history.append((spec.kind, ProbeOutcome(time.monotonic(), ok, detail, result)))
            self._changed.notify_all()
