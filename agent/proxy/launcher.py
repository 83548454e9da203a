"""The seam between the supervision policy (agent/proxy/epochs.py) and Envoy, after Istio's Proxy / TestProxy.

`Launcher` is everything the policy asks of Envoy: start an epoch, validate a bootstrap, which epoch is LIVE, drain,
count connections, what a failed start means, clean up. `EnvoyLauncher` does it with the real Envoy (files,
processes, admin API); the policy's fast tests drive a fake (tests/supervisor/fake_launcher.py) in milliseconds.

Starting a process is agent.proxy.spawn's (epoch 0 starts before this module is imported); the admin client is only
a type here and comes through EnvoyLauncher's constructor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from agent.aio import off_loop
from agent.files import remove_file, write_atomic
from agent.proxy.argv import LaunchSettings, validate_argv
from agent.proxy.desired import DesiredState
from agent.proxy.diagnosis import (
    StartContext,
    diagnose_start_failure,
    envoy_error,
)
from agent.proxy.process import EnvoyProcess, ExitInfo, keep_tail
from agent.proxy.shm import SegmentIdentity, remove_segment, segment_identity
from agent.proxy.spawn import spawn_envoy

if TYPE_CHECKING:
    from agent.proxy.admin import AdminClient

log = logging.getLogger("agent.proxy")


class EnvoyHandle(Protocol):
    """One started Envoy epoch (agent.proxy.process.EnvoyProcess, or a test's fake)."""

    epoch: int
    exited: asyncio.Event
    exit_info: ExitInfo | None

    @property
    def pid(self) -> int: ...

    @property
    def running(self) -> bool: ...

    async def run(self, on_exit: Callable[[Any], None] | None = None) -> ExitInfo:
        """Collect the exit (a task the supervisor's TaskGroup owns); kills Envoy if cancelled."""
        ...

    async def stop(self, grace: float) -> ExitInfo:
        """SIGTERM, SIGKILL after `grace`; returns once the exit is collected."""
        ...

    def send_signal(self, sig: int) -> None: ...


@dataclass(frozen=True)
class Verdict:
    """Envoy's judgement of a bootstrap (`envoy --mode validate`): `output` holds its last lines when it failed, or
    why it could not be asked."""

    ok: bool
    output: tuple[str, ...] = ()

    @property
    def error(self) -> str:
        """Envoy's own words for the failure (one line)."""
        return envoy_error(self.output)

    @property
    def summary(self) -> str:
        """Envoy's last lines, on one line."""
        return " | ".join(self.output[-5:])


class EnvoyUnreachable(Exception):
    """Envoy's admin API refused or failed the request."""


class EnvoyUnresponsive(EnvoyUnreachable):
    """Envoy's admin API did not answer in time: the process is stopped (SIGSTOP) or its main thread is stuck."""


class Launcher(Protocol):
    """What the supervision policy needs from Envoy."""

    @property
    def hot_restart(self) -> bool:
        """Epochs above 0 are possible (else a change applies at Envoy's next start)."""
        ...

    async def start(self, epoch: int, state: DesiredState) -> EnvoyHandle:
        """Write the epoch's bootstrap and start Envoy. Raises BootstrapWriteError or EnvoyExecError (then nothing
        was started and nothing is left behind)."""
        ...

    async def validate(self, epoch: int, state: DesiredState) -> Verdict:
        """Ask Envoy whether `state` would start. On success the epoch's bootstrap is left in place for start()."""
        ...

    async def live_epoch(self) -> int | None:
        """The epoch answering LIVE on the admin port, None when none is (yet). Raises EnvoyUnresponsive when the
        admin API does not answer in time."""
        ...

    async def serves_admin(self, envoy: EnvoyHandle) -> bool:
        """Whether `envoy` is the process listening on the admin port: a LIVE answer there may come from another
        agent's Envoy on the same host (the same proxyAdminPort), while `envoy` itself is about to fail to bind it."""
        ...

    async def drain_listeners(self, *, inbound_only: bool) -> None:
        """Start a graceful drain of the listeners. Raises EnvoyUnreachable."""
        ...

    async def active_connections(self, excluded_ports: tuple[int, ...]) -> int | None:
        """Active downstream connections on the listeners, None when Envoy has no stats. Raises EnvoyUnreachable."""
        ...

    def diagnose(self, info: ExitInfo) -> str | None:
        """The cause and the fix when `info` shows a start-up failure no restart cures, else None."""
        ...

    def forget(self, epoch: int) -> None:
        """The epoch has exited: remove what was written for it."""
        ...

    def forget_family(self) -> None:
        """Every epoch has exited: remove what the hot-restart family leaves behind."""
        ...

    def own_pids(self) -> set[int]:
        """Pids of helper processes running now (validations), which the orphan reaper must leave alone."""
        ...


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds a TCP socket listening on `port` (any address: an IPv6 socket on "::" takes
    127.0.0.1's connections too). True when /proc does not tell (not permitted): the check is a safeguard, not a
    new way to fail. False when the process is gone."""
    import psutil  # noqa: PLC0415 (lazy: only once an epoch answers LIVE)

    try:
        sockets = psutil.Process(pid).net_connections("tcp")
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OSError):
        log.debug("cannot list the sockets of pid %d: trusting the admin port's answer", pid, exc_info=True)
        return True
    return any(s.status == psutil.CONN_LISTEN and s.laddr and s.laddr.port == port for s in sockets)


@dataclass
class EnvoyLauncher:
    """The real Envoy: bootstrap files under configPath, one process per epoch, the admin API."""

    launch: LaunchSettings
    admin: AdminClient
    tail_lines: int = 20
    sink: BinaryIO | None = None
    admin_timeout: float = 0.5
    # The hot-restart segment that was there before our epoch 0 started (see shm.remove_segment): given by whoever
    # started an epoch 0 before this launcher existed, recorded at each epoch 0 start after.
    foreign_segment: SegmentIdentity | None = None
    _validators: set[int] = field(default_factory=set)

    @property
    def hot_restart(self) -> bool:
        return self.launch.hot_restart

    async def start(self, epoch: int, state: DesiredState) -> EnvoyProcess:
        if epoch == 0 and self.launch.hot_restart:
            self.foreign_segment = segment_identity(self.launch.base_id)
        return EnvoyProcess(spawn_envoy(self.launch, epoch, state, tail_lines=self.tail_lines, sink=self.sink))

    async def validate(self, epoch: int, state: DesiredState) -> Verdict:
        path = self.launch.bootstrap_path(epoch)
        try:
            write_atomic(path, state.bootstrap, durable=False)
            process = await asyncio.create_subprocess_exec(
                *validate_argv(self.launch, path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            remove_file(path)
            return Verdict(False, (f"cannot validate {path}: {exc.strerror or exc}",))
        self._validators.add(process.pid)
        tail: collections.deque[str] = collections.deque(maxlen=self.tail_lines)
        try:
            assert process.stdout is not None
            await keep_tail(process.stdout, tail)
            returncode = await process.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(process.wait())
            remove_file(path)
            raise
        finally:
            self._validators.discard(process.pid)
        if returncode == 0:
            return Verdict(True)
        remove_file(path)
        return Verdict(False, tuple(tail))

    async def live_epoch(self) -> int | None:
        from agent.proxy.admin import AdminTimeout  # noqa: PLC0415 (lazy: see the module docstring)

        try:
            return await self.admin.live_epoch(timeout=self.admin_timeout)
        except AdminTimeout as exc:
            raise EnvoyUnresponsive(str(exc)) from None

    async def serves_admin(self, envoy: EnvoyHandle) -> bool:
        # Once per epoch going LIVE. Off the loop: the kernel takes ~4 ms each to write /proc/net/tcp and tcp6 on
        # this machine (whole tables), and the reads release the GIL; readiness probes are answered meanwhile.
        return await off_loop(functools.partial(listens_on, envoy.pid, self.admin.port), name="admin-port-owner")

    async def drain_listeners(self, *, inbound_only: bool) -> None:
        from agent.proxy.admin import AdminError  # noqa: PLC0415 (lazy: see the module docstring)

        try:
            await self.admin.drain_listeners(inbound_only=inbound_only, graceful=True)
        except AdminError as exc:
            raise EnvoyUnreachable(str(exc)) from None

    async def active_connections(self, excluded_ports: tuple[int, ...]) -> int | None:
        from agent.proxy.admin import AdminError, active_connections  # noqa: PLC0415 (lazy: see the docstring)

        try:
            stats = await self.admin.stats("downstream_cx_active$")
        except AdminError as exc:
            raise EnvoyUnreachable(str(exc)) from None
        return active_connections(stats, excluded_ports) if stats else None

    def diagnose(self, info: ExitInfo) -> str | None:
        context = StartContext(self.admin.port, self.launch.base_id, self.launch.hot_restart)
        return diagnose_start_failure(info.stderr_tail, context)

    def forget(self, epoch: int) -> None:
        remove_file(self.launch.bootstrap_path(epoch))

    def forget_family(self) -> None:
        if self.launch.hot_restart:
            # Envoy leaves its segment behind; epoch 0 of the next family would unlink it, but nothing else would.
            remove_segment(self.launch.base_id, self.foreign_segment)

    def own_pids(self) -> set[int]:
        return set(self._validators)
