"""A container's process as a runtime starts it: PID 1 of a new PID namespace, in the pod's network namespace.

`unshare --pid --fork --mount-proc` gives the container its own PID namespace and /proc; inside it, before the
container's command runs, a private /dev/shm is mounted (Envoy's hot-restart shared memory is named after --base-id,
0 by default: two pods on one machine must not share it) and, for `readOnlyRootFilesystem: true`, the filesystem is
remounted read-only except the container's writable volumes (emptyDir). `setpriv` then becomes runAsUser/runAsGroup
with the container's capability bounding set and execs the command, which is PID 1.

A signal from outside to a PID namespace's init is delivered only if init has a handler for it (SIGKILL excepted):
the rule a container's PID 1 lives under, which is what makes the agent's PID-1 tests meaningful. unshare's own
parent blocks SIGTERM, so kubelet's signals go to PID 1 directly.

`RunningContainer` is what the tests see of a container whatever runs it: ContainerProcess here (the host's
filesystem as the image), `tests.support.runc.RuncContainer` for the image itself under runc.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

KUBELET_MIN_GRACE_S = 2.0
_WRAPPERS = (b"unshare\0", b"nsenter\0", b"sh\0-c\0mount -t tmpfs", b"setpriv\0")


def netns_path(netns: str | Path | None) -> Path | None:
    if netns is None:
        return None
    return Path(netns) if "/" in str(netns) else Path("/run/netns") / str(netns)


@dataclass(frozen=True)
class Identity:
    """runAsUser / runAsGroup and the capability bounding set (None = leave as is)."""

    uid: int = 0
    gid: int = 0
    capabilities: tuple[str, ...] | None = None

    @classmethod
    def of(cls, container: Mapping[str, object], pod_spec: Mapping[str, object], image_uid: int = 1337) -> Identity:
        ctx = container.get("securityContext") or {}
        pod_ctx = pod_spec.get("securityContext") or {}
        assert isinstance(ctx, Mapping) and isinstance(pod_ctx, Mapping)
        uid = int(str(ctx.get("runAsUser", pod_ctx.get("runAsUser", image_uid))))
        gid = int(str(ctx.get("runAsGroup", pod_ctx.get("runAsGroup", uid))))
        caps = ctx.get("capabilities") or {}
        assert isinstance(caps, Mapping)
        bounding: tuple[str, ...] | None = None
        if "ALL" in (caps.get("drop") or []):
            bounding = tuple(str(c).lower() for c in caps.get("add") or [])
        return cls(uid, gid, bounding)

    def setpriv(self) -> list[str]:
        argv = ["setpriv"]
        if self.uid or self.gid:
            argv += [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        if self.capabilities is not None:
            caps = ",".join(["-all", *(f"+{c}" for c in self.capabilities)])
            argv += [f"--bounding-set={caps}", f"--inh-caps={caps}"]
        return [*argv, "--"]


@dataclass(frozen=True)
class Termination:
    exit_code: int | None  # the container's exit code; None when it died of a signal
    signal: int | None
    killed: bool  # the harness had to SIGKILL it (the grace period ran out)
    seconds: float  # from the start of termination (preStop included) to exit
    # From the SIGTERM to the exit (what the container did with the signal, without its preStop hook's run).
    after_sigterm: float = 0.0


class RunningContainer:
    """A running container as the tests see it, whatever the runtime: its PID 1 (a host pid), what runs in its PID
    namespace, its log, and kubelet's actions on it. A runtime sets `_popen` (the process whose exit is the
    container's), `pid1`, `pid_ns` and `log_path`, and says how to signal and exec."""

    _popen: subprocess.Popen[bytes]
    started_at: float  # time.monotonic() just before the runtime's process was started
    pid1: int | None
    pid_ns: str | None
    log_path: Path

    def signal(self, sig: int) -> None:
        raise NotImplementedError

    def exec(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        raise NotImplementedError

    def _decode_exit(self, code: int, start: float, killed: bool) -> Termination:
        raise NotImplementedError

    def _read_pid_ns(self) -> str | None:
        if self.pid1 is None:
            return None
        try:
            return os.readlink(f"/proc/{self.pid1}/ns/pid")
        except FileNotFoundError:
            return None

    # ---- state ------------------------------------------------------------------------------------------------------
    def running(self) -> bool:
        return self._popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def processes(self) -> list[int]:
        """Host pids of every process in the container's PID namespace (PID 1 included)."""
        found: list[int] = []
        if self.pid_ns is None:
            return found
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "pid") == self.pid_ns:
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def named(self, comm: str) -> list[int]:
        """Host pids of the container's processes whose name (/proc/PID/comm) is `comm`, e.g. "envoy"."""
        found = []
        for pid in self.processes():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    found.append(pid)
        return found

    @staticmethod
    def uid_of(pid: int) -> int:
        """The real uid of a process (the first field of `Uid:` in /proc/PID/status)."""
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
        raise ValueError(f"no Uid line for pid {pid}")

    @staticmethod
    def pid_in_namespace(pid: int) -> int:
        """The pid as the container sees it (the last field of `NSpid:`)."""
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise ValueError(f"no NSpid line for pid {pid}")

    def wait(self, timeout: float | None = None) -> int:
        return self._popen.wait(timeout)

    # ---- kubelet's actions ------------------------------------------------------------------------------------------
    def terminate(
        self, grace_s: float = 30.0, pre_stop: Sequence[str] | None = None, min_grace_s: float = KUBELET_MIN_GRACE_S
    ) -> Termination:
        """kubelet's killContainer: preStop (counted against the grace period), SIGTERM, wait, SIGKILL."""
        start = time.monotonic()
        if pre_stop is not None and self.running():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.exec(pre_stop, timeout=grace_s)
        remaining = max(grace_s - (time.monotonic() - start), min_grace_s)
        sigterm_at = time.monotonic()
        self.signal(signal.SIGTERM)
        killed = False
        try:
            self._popen.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            killed = True
            self.signal(signal.SIGKILL)
            self._popen.wait(timeout=10)
        termination = self._decode_exit(self._popen.returncode, start, killed)
        return replace(termination, after_sigterm=time.monotonic() - sigterm_at)

    def kill(self) -> None:
        if self.running():
            self.signal(signal.SIGKILL)
            self._popen.wait(timeout=10)

    def close(self) -> None:
        """Kill it if it still runs and release what the runtime holds for it."""
        self.kill()


class ContainerProcess(RunningContainer):
    """One container's PID 1, in its own PID namespace, in the pod's network namespace."""

    def __init__(
        self,
        *,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        identity: Identity,
        netns: str | Path | None,
        log_path: Path,
        read_only_root: bool = False,
        writable: Sequence[Path] = (),
        resolv_conf: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.identity = identity
        self.netns = netns_path(netns)
        self.log_path = log_path
        prefix = ["nsenter", f"--net={self.netns}"] if self.netns else []
        setup = ["mount -t tmpfs -o mode=1777,size=64m shm /dev/shm"]
        if resolv_conf is not None:
            # kubelet bind-mounts the pod's resolv.conf over each container's (this mount namespace is the container's).
            setup.append(f"mount --bind {shlex.quote(str(resolv_conf))} /etc/resolv.conf")
        if read_only_root:
            # Bind each writable volume onto itself first: a separate mount keeps its own rw flag when / goes ro.
            setup += [f"mount --bind {shlex.quote(str(w))} {shlex.quote(str(w))}" for w in writable]
            setup.append("mount -o remount,bind,ro /")
        script = " && ".join([*setup, 'exec "$@"'])
        command = [
            *prefix, "unshare", "--pid", "--fork", "--mount-proc",
            "sh", "-c", script, "sh", *identity.setpriv(), *self.argv,
        ]  # fmt: skip
        # The child keeps its own copy of the descriptor; the harness reads the file by path.
        self.started_at = time.monotonic()
        with log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                command, env=self.env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        # Host pid of the container's PID 1; None when it was over before it could be seen (a quick init container).
        self.pid1 = self._find_pid1()
        self.pid_ns = self._read_pid_ns()
        self._wait_for_exec()

    def _find_pid1(self, timeout: float = 5.0) -> int | None:
        deadline = time.monotonic() + timeout
        pid = self._popen.pid
        while time.monotonic() < deadline:
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except FileNotFoundError:
                children = []
            if children:
                return int(children[0])
            if self._popen.poll() is not None:
                return None
            time.sleep(0.005)
        raise RuntimeError("unshare did not fork the container's PID 1")

    def _wait_for_exec(self, timeout: float = 5.0) -> None:
        """Return once PID 1 runs the container's command, not the harness's sh/setpriv wrappers before it."""
        deadline = time.monotonic() + timeout
        while self.pid1 is not None and time.monotonic() < deadline:
            try:
                cmdline = Path(f"/proc/{self.pid1}/cmdline").read_bytes()
                # Empty while an exec replaces the process image (setpriv's of the command among them), and for good
                # once the process has exited (a zombie).
                exited = not cmdline and psutil.Process(self.pid1).status() == psutil.STATUS_ZOMBIE
            except (FileNotFoundError, ProcessLookupError, psutil.NoSuchProcess):
                return
            if exited or (cmdline and not cmdline.startswith(_WRAPPERS)):
                return
            time.sleep(0.002)

    # ---- kubelet's actions ------------------------------------------------------------------------------------------
    def signal(self, sig: int) -> None:
        # To PID 1 itself: unshare's parent blocks SIGTERM/SIGINT and would not pass them on.
        if self.pid1 is None or not self.running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid1, sig)

    def exec(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Run a command inside the container (an exec hook or `kubectl exec`): same namespaces, user and env."""
        if self.pid1 is None or not self.running():
            raise RuntimeError("the container is not running")
        command = [
            "nsenter",
            f"--target={self.pid1}",
            "--pid",
            "--net",
            "--mount",
            *self.identity.setpriv(),
            *argv,
        ]
        return subprocess.run(command, env=self.env, cwd=self.cwd, capture_output=True, timeout=timeout, check=False)

    def _decode_exit(self, code: int, start: float, killed: bool) -> Termination:
        seconds = time.monotonic() - start
        if killed:
            # unshare re-raises its child's fatal signal on itself, except SIGKILL, for which it exits 1.
            return Termination(None, signal.SIGKILL, True, seconds)
        if code < 0:
            return Termination(None, -code, False, seconds)
        return Termination(code, None, False, seconds)
