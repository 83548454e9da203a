"""Hand-written bootstraps and a running Supervisor for tests (the supervisor does not depend on agent/config)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from agent.files import content_hash
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient
from agent.proxy.argv import LaunchSettings
from agent.proxy.desired import DesiredState, DesiredStateFn
from agent.proxy.events import DrainSettings, SupervisionSettings, WatchSettings
from agent.proxy.launcher import EnvoyLauncher, Launcher
from agent.proxy.shm import shm_path
from agent.supervisor import Supervisor
from tests.supervisor.fake_launcher import LogWaiter, recording_logs
from tests.support.envoy import envoy_binary, free_port, new_base_id

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def _http_filter(body: str, cluster: str | None, access_log: Path | None = None) -> dict[str, Any]:
    route: dict[str, Any] = (
        {"route": {"cluster": cluster, "timeout": "30s"}}
        if cluster
        else {"direct_response": {"status": 200, "body": {"inline_string": body}}}
    )
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "stat_prefix": "test",
            "route_config": {
                "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}]
            },
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
            "access_log": (
                [{"name": "file", "typed_config": {"@type": _FILE_LOG, "path": str(access_log)}}] if access_log else []
            ),
        },
    }


def bootstrap(
    admin_port: int,
    listener_port: int,
    *,
    body: str = "ok",
    upstream_port: int | None = None,
    cert_dir: Path | None = None,
    tls_port: int | None = None,
    extra_port: int | None = None,
    unknown_cluster: bool = False,
    access_log: Path | None = None,
) -> bytes:
    clusters: list[dict[str, Any]] = []
    cluster = None
    if upstream_port is not None:
        cluster = "upstream"
        clusters.append(
            {
                "name": "upstream",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "upstream",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": "127.0.0.1", "port_value": upstream_port}
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )
    if unknown_cluster:
        cluster = "no-such-cluster"

    def listener(name: str, port: int, tls: bool = False) -> dict[str, Any]:
        chain: dict[str, Any] = {"filters": [_http_filter(body, cluster, access_log)]}
        if tls:
            assert cert_dir is not None
            chain["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": _TLS,
                    "common_tls_context": {
                        "tls_certificates": [
                            {
                                "certificate_chain": {"filename": str(cert_dir / "cert-chain.pem")},
                                "private_key": {"filename": str(cert_dir / "key.pem")},
                            }
                        ]
                    },
                },
            }
        return {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain],
        }

    listeners = [listener("main", listener_port)]
    if tls_port is not None:
        listeners.append(listener("tls", tls_port, tls=True))
    if extra_port is not None:
        listeners.append(listener("extra", extra_port))
    config = {
        "node": {"id": "test", "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        # No warning line per start about the missing connection limit.
        "layered_runtime": {
            "layers": [{"name": "static", "static_layer": {"overload.global_downstream_max_connections": 100000}}]
        },
    }
    return json.dumps(config, indent=1).encode()


def make_cert(directory: Path, name: str = "test") -> None:
    """A self-signed cert-chain.pem/key.pem pair written the way a cert rotation would (tmp + rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp_cert, tmp_key = directory / ".cert.tmp", directory / ".key.tmp"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(tmp_key),
            "-out",
            str(tmp_cert),
        ],
        check=True,
        capture_output=True,
    )
    tmp_key.replace(directory / "key.pem")
    tmp_cert.replace(directory / "cert-chain.pem")


@dataclass
class Rig:
    """Inputs of one supervised Envoy: `input` holds the bootstrap bytes the desired-state function returns."""

    tmp: Path
    base_id: int = field(default_factory=new_base_id)
    admin_port: int = field(default_factory=free_port)
    listener_port: int = field(default_factory=free_port)
    deps: list[Path] = field(default_factory=list)

    @property
    def input(self) -> Path:
        return self.tmp / "input.json"

    def write_input(self, data: bytes) -> None:
        tmp = self.tmp / ".input.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.input)

    def desired_state(self) -> DesiredState:
        deps = tuple((str(p), content_hash(p) or "") for p in self.deps)
        return DesiredState(self.input.read_bytes(), deps)

    def launch(self, **changes: Any) -> LaunchSettings:
        settings = LaunchSettings(
            binary=envoy_binary(),
            config_dir=self.tmp / "proxy",
            drain_duration=1,
            parent_shutdown_duration=1,
            log_level="warning",
            base_id=self.base_id,
            concurrency=1,
        )
        return replace(settings, **changes)


def tls_rig(tmp: Path) -> tuple[Rig, Path]:
    """A Rig whose bootstrap also serves TLS from `tmp/certs` (a first pair, CN "one") and which lists both cert
    files as dependencies, as a cert rotation test needs; returns the rig and the certs directory."""
    rig = Rig(tmp)
    certs = tmp / "certs"
    make_cert(certs, "one")
    rig.deps = [certs / "cert-chain.pem", certs / "key.pem"]
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, cert_dir=certs, tls_port=free_port()))
    return rig, certs


async def no_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


@dataclass
class Running:
    supervisor: Supervisor
    task: asyncio.Task[int]
    lifecycle: Lifecycle
    metrics: AgentMetrics
    admin: AdminClient
    # The agent's log lines (debug included): a test waits for an outcome there instead of sleeping.
    logs: LogWaiter

    def value(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    async def wait_epoch_live(self, epoch: int, timeout: float = 20.0) -> None:
        await until(lambda: self._epoch_is(epoch), timeout)

    async def _epoch_is(self, epoch: int) -> bool:
        """Envoy says this epoch is LIVE *and* the supervisor has adopted it as its current epoch (it polls LIVE
        itself, so it may learn a moment after Envoy's admin port says so; its counters move then)."""
        epochs = self.supervisor.epochs
        current = epochs.current if epochs is not None else None
        return (
            await self.admin.live_epoch() == epoch
            and self.lifecycle.envoy_down_reason is None
            and current is not None
            and current.number == epoch
        )

    async def stop(self, timeout: float = 30.0) -> int:
        self.lifecycle.request_shutdown("test done", skip_drain=True)
        return await asyncio.wait_for(self.task, timeout)


async def until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


def envoy_children() -> list[psutil.Process]:
    me = psutil.Process(os.getpid())
    return [p for p in me.children(recursive=True) if "envoy" in p.name()]


def supervisor_for_tests(
    launcher: Launcher,
    desired_state: DesiredStateFn,
    supervision: SupervisionSettings,
    drain: DrainSettings,
    **collaborators: Any,
) -> Supervisor:
    """A Supervisor as the tests run it: no signal handlers (they would be the test process's), no reaping;
    `collaborators` are its other keyword arguments (lifecycle, metrics, services, watch, sleep)."""
    return Supervisor(launcher, supervision, drain, desired_state, signals=False, reap=False, **collaborators)


@asynccontextmanager
async def supervised(
    rig: Rig,
    *,
    launch: dict[str, Any] | None = None,
    supervision: dict[str, Any] | None = None,
    drain: dict[str, Any] | None = None,
    watch: WatchSettings | None = None,
    sleep: Callable[[float], Awaitable[None]] = no_sleep,
) -> AsyncIterator[Running]:
    """Run a Supervisor on the rig; on exit make sure it stopped and left no Envoy, zombie, file or shm segment."""
    lifecycle = Lifecycle()
    metrics = AgentMetrics(process_metrics=False)
    admin = AdminClient(port=rig.admin_port)
    sup_settings = SupervisionSettings(termination_log=rig.tmp / "termination-log", stop_grace=5.0)
    supervisor = supervisor_for_tests(
        EnvoyLauncher(rig.launch(**(launch or {})), admin),
        rig.desired_state,
        replace(sup_settings, **(supervision or {})),
        replace(DrainSettings(proxy_type="router", termination_drain=0.5), **(drain or {})),
        lifecycle=lifecycle,
        metrics=metrics,
        watch=watch,
        sleep=sleep,
    )
    with recording_logs() as logs:
        task = asyncio.create_task(supervisor.run())
        try:
            yield Running(supervisor, task, lifecycle, metrics, admin, logs)
        finally:
            await _cleaned_up(rig, task, lifecycle)


async def _cleaned_up(rig: Rig, task: asyncio.Task[int], lifecycle: Lifecycle) -> None:
    """Make sure the supervisor stopped and left no Envoy, zombie, file or shm segment."""
    if not task.done():
        lifecycle.request_shutdown("test cleanup", skip_drain=True)
        try:
            await asyncio.wait_for(task, 30)
        except Exception:
            task.cancel()
    leftovers = envoy_children()
    for proc in leftovers:
        proc.kill()
    shm = shm_path(rig.base_id)
    stale = shm.exists()
    shm.unlink(missing_ok=True)
    assert not leftovers, f"Envoy left running: {leftovers}"
    assert not stale, f"stale shared memory segment {shm}"
    assert not list((rig.tmp / "proxy").glob("envoy-rev*.json")), "per-epoch bootstrap files left behind"
