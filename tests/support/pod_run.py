"""Building blocks for the pod scenarios (tests/deploy/test_pod_scenarios.py) and the pod benchmark
(bench/bench_pod.py): deploy/no-control-plane.yaml started the way kubelet starts it, a client that sends load
from the client namespace and records what happened to every request, and readers for the agent's and Envoy's
state from inside the namespaces.

Clients run in threads of the test process that moved into a network namespace (`setns` acts per thread), not in
subprocesses: a request costs a connect, not a Python start, so a few threads make a steady load and every
request's outcome is known exactly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.support.container import RunningContainer
from tests.support.envoy import http_get
from tests.support.kube_values import PodIdentity
from tests.support.netns import PodNetwork, pod_network
from tests.support.pod import ContainerRuntime, Pod, load_documents, pod_template
from tests.support.probes import enter_netns

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFEST = DEPLOY / "no-control-plane.yaml"
CERT_SECRET = "istio.echo"  # the manifest's istio-certs volume (mounted on /etc/certs/)
T = TypeVar("T")


# ---- running code inside a namespace ---------------------------------------------------------------------------------
def netns_file(name: str) -> Path:
    return Path("/run/netns") / name


def in_netns(netns: Path, fn: Callable[[], T]) -> T:
    """`fn()` on a fresh thread that entered `netns`; its result or its exception."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            enter_netns(netns)
            box["result"] = fn()
        except BaseException as exc:  # handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="in-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def http_text(url: str, timeout: float = 3.0) -> tuple[int, str]:
    status, body = http_get(url, timeout)
    return status, body.decode(errors="replace")


def http_text_or_none(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of a GET, None when no answer came (refused, reset, timed out)."""
    try:
        return http_text(url, timeout)[0]
    except OSError:
        return None


# ---- one request, and what happened to it ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    connected: bool  # the TCP handshake completed: something accepted the connection
    status: int | None  # the HTTP status, None when no complete answer came back
    error: str | None  # errno name (ECONNREFUSED, ECONNRESET...), "timeout", or "EOF" (closed without an answer)
    connect_s: float = 0.0  # how long the TCP handshake took (when it completed)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def lost(self) -> bool:
        """Accepted, then no answer: the failure a client cannot retry safely."""
        return self.connected and self.status is None


def get_once(host: str, port: int, path: str = "/", timeout: float = 5.0) -> Outcome:
    """One `GET` on a new connection (`Connection: close`), read to the end of the answer. Never raises for
    network errors."""
    started = time.monotonic()
    connected = False
    connect_s = 0.0
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            connected = True
            connect_s = time.monotonic() - started
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            data = bytearray()
            # Done at the end of the answer (Content-Length), as HTTP clients are, not at the server's close: a
            # draining Envoy answers at once but may keep the connection open for seconds (bench_pod).
            eof = False
            while not _complete(bytes(data), eof):
                chunk = sock.recv(65536)
                eof = not chunk
                data += chunk
                if eof:
                    break
    except TimeoutError:
        return Outcome(started, time.monotonic(), connected, None, "timeout", connect_s)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        return Outcome(started, time.monotonic(), connected, None, name, connect_s)
    head = bytes(data).split(b"\r\n", 1)[0].split()
    # A complete answer: a status line and the body announced by Content-Length (or read to EOF).
    if len(head) < 2 or not head[1].isdigit() or not _complete(bytes(data), eof):
        return Outcome(started, time.monotonic(), connected, None, "EOF", connect_s)
    return Outcome(started, time.monotonic(), connected, int(head[1]), None, connect_s)


def _complete(data: bytes, eof: bool) -> bool:
    """Headers and the body Content-Length announces; without Content-Length, whatever came before EOF."""
    header, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in header.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return eof


@dataclass
class Load:
    """`threads` clients in `netns`, each sending `GET path` to host:port back to back (a new connection each)
    until stopped. `outcomes` holds every request's result, in completion order."""

    netns: Path
    host: str
    port: int
    path: str = "/"
    threads: int = 4
    timeout: float = 5.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def start(self) -> Load:
        for n in range(self.threads):
            worker = threading.Thread(target=self._work, name=f"load-{n}", daemon=True)
            self._workers.append(worker)
            worker.start()
        return self

    def _work(self) -> None:
        enter_netns(self.netns)
        while not self._stop.is_set():
            outcome = get_once(self.host, self.port, self.path, self.timeout)
            with self._lock:
                self.outcomes.append(outcome)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.timeout + 5)
        return self.snapshot()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    """{"served": 200s, "failed": everything else, "slowest_ms", plus one count per status / error}."""
    counts: Counter[str] = Counter()
    for o in outcomes:
        counts[str(o.status) if o.status is not None else o.error or "?"] += 1
    served = sum(1 for o in outcomes if o.ok)
    slowest_ms = int(max((o.ended - o.started for o in outcomes), default=0.0) * 1000)
    return {
        "served": served,
        "failed": len(outcomes) - served,
        "slowest_ms": slowest_ms,
        **dict(sorted(counts.items())),
    }


# ---- certificates ----------------------------------------------------------------------------------------------------
def self_signed(common_name: str, workdir: Path) -> dict[str, bytes]:
    """A Secret's data as Istio's mountMtlsCerts layout has it: cert-chain.pem, key.pem, root-cert.pem (openssl)."""
    key, cert = workdir / f"{common_name}.key", workdir / f"{common_name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/O=cluster.local/CN={common_name}",
         "-addext", f"subjectAltName=URI:spiffe://cluster.local/ns/default/sa/{common_name}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    data = {"cert-chain.pem": cert.read_bytes(), "key.pem": key.read_bytes(), "root-cert.pem": cert.read_bytes()}
    key.unlink()
    cert.unlink()
    return data


# ---- the pod ---------------------------------------------------------------------------------------------------------
@dataclass
class RunningPod:
    net: PodNetwork
    pod: Pod
    proxy: RunningContainer
    # Monotonic times: istio-init started / finished, istio-proxy's runtime started, 15021 first answered 200.
    init_started: float
    init_done: float
    proxy_started: float
    ready_at: float
    # When Envoy's admin first said LIVE (polled every 5 ms from inside the pod during start); None if not seen.
    envoy_live_at: float | None = None

    @property
    def client_ns(self) -> Path:
        return netns_file(self.net.client_ns)

    @property
    def pod_ns(self) -> Path:
        return netns_file(self.net.pod_ns)

    def ready(self, timeout: float = 3.0) -> tuple[int, str]:
        """kubelet's readiness probe (GET podIP:15021/healthz/ready) from the node side, once."""
        url = f"http://{self.net.pod_ip}:15021/healthz/ready"
        return in_netns(self.client_ns, lambda: http_text(url, timeout))

    def agent_metrics(self) -> str:
        url = f"http://{self.net.pod_ip}:15020/stats/prometheus"
        return in_netns(self.client_ns, lambda: http_text(url)[1])

    def agent_metric(self, name: str) -> float | None:
        return prometheus_value(self.agent_metrics(), name)

    def server_info(self) -> dict[str, object]:
        """Envoy's admin /server_info (admin listens on 127.0.0.1:15000 inside the pod)."""
        status, body = in_netns(self.pod_ns, lambda: http_text("http://127.0.0.1:15000/server_info", 2.0))
        assert status == 200, body
        info = json.loads(body)
        assert isinstance(info, dict)
        return info

    def envoy_epoch(self) -> tuple[int, str]:
        """(restart_epoch, state) of the Envoy answering on the admin port."""
        info = self.server_info()
        options = info.get("command_line_options")
        epoch = int(options.get("restart_epoch", 0)) if isinstance(options, dict) else 0
        return epoch, str(info.get("state"))

    def envoy_stat(self, name: str) -> int:
        url = f"http://127.0.0.1:15000/stats?format=json&filter=^{name}$"
        body = in_netns(self.pod_ns, lambda: http_text(url, 2.0)[1])
        for stat in json.loads(body).get("stats", []):
            if stat.get("name") == name and "value" in stat:
                return int(stat["value"])
        return 0

    def connections_to(self, port: int) -> int:
        """Established TCP connections whose local port is `port` inside the pod (the app's side of Envoy's
        upstream connections, for port 8080): /proc/thread-self/net/tcp read from a thread in the pod netns."""

        def count() -> int:
            rows = Path("/proc/thread-self/net/tcp").read_text().splitlines()[1:]
            return sum(1 for row in rows if int(row.split()[1].split(":")[1], 16) == port and row.split()[3] == "01")

        return in_netns(self.pod_ns, count)

    def request(self, path: str = "/", timeout: float = 5.0) -> Outcome:
        """A client request to the app's port: captured into Envoy (15006) by istio-init's rules."""
        return in_netns(self.client_ns, lambda: get_once(self.net.pod_ip, 8080, path, timeout))

    def load(self, path: str = "/", threads: int = 4, timeout: float = 5.0) -> Load:
        return Load(self.client_ns, self.net.pod_ip, 8080, path, threads, timeout)


def prometheus_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample `name` in Prometheus text, None when absent."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            return float(parts[1])
    return None


def wait_ready(net: PodNetwork, timeout: float = 60.0, interval: float = 0.01) -> float:
    """Poll 15021 from the node side until it answers 200; the monotonic time it first did."""
    url = f"http://{net.pod_ip}:15021/healthz/ready"

    def poll() -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if http_text(url, 1.0)[0] == 200:
                    return time.monotonic()
            time.sleep(interval)
        raise AssertionError(f"15021 not ready within {timeout}s")

    return in_netns(netns_file(net.client_ns), poll)


class _LiveWatch:
    """Polls Envoy's admin /server_info inside the pod every 5 ms until LIVE, on its own thread: when Envoy itself
    was ready, apart from when the agent noticed."""

    def __init__(self, netns: Path) -> None:
        self.live_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(netns,), name="live-watch", daemon=True)
        self._thread.start()

    def _poll(self, netns: Path) -> None:
        enter_netns(netns)
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                status, body = http_text("http://127.0.0.1:15000/server_info", 0.5)
                if status == 200 and json.loads(body).get("state") == "LIVE":
                    self.live_at = time.monotonic()
                    return
            self._stop.wait(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def process_started_at(pid: int) -> float:
    """When a process was started, on time.monotonic()'s clock (to a clock tick, 10 ms): /proc/PID/stat counts
    from boot (CLOCK_BOOTTIME), which runs with CLOCK_MONOTONIC but for time suspended."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    since = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - since


def manifest_pod() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """deploy/no-control-plane.yaml's pod: its ConfigMap document and the Deployment's pod template (metadata,
    spec)."""
    docs = load_documents(MANIFEST)
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    meta, spec = pod_template(next(d for d in docs if d["kind"] == "Deployment"))
    return configmap, meta, spec


@contextlib.contextmanager
def no_control_plane_pod(
    prefix: str = "scn",
    *,
    annotations: Mapping[str, str] | None = None,
    secrets: Mapping[str, Mapping[str, bytes]] | None = None,
    env: Callable[[Pod], Mapping[str, str]] | None = None,
    runtime: ContainerRuntime | None = None,
) -> Iterator[RunningPod]:
    """deploy/no-control-plane.yaml on this machine, ready: istio-init run to completion, the app (the harness's,
    for agnhost), istio-proxy as PID 1 of its PID namespace; yields once 15021 answers 200 from the node side.

    `annotations` are added to the pod's (e.g. `proxy.istio.io/config`); `secrets` are the Secrets the API server
    would hold (the manifest's optional `istio.echo` cert volume); `env(pod)` goes on top of the container's env, for
    what the harness cannot reproduce (absolute mount paths: the pod root is not the host's `/`). With a `runtime`
    (tests/support/runc.py) istio-init and istio-proxy run from the built image, where every mount is at its path."""
    configmap, meta, spec = manifest_pod()
    with pod_network(prefix) as net:
        identity = PodIdentity(
            name="echo-local-5d8f7b6c4-x7k2p",
            labels={**meta["labels"], "pod-template-hash": "5d8f7b6c4"},
            annotations={**meta["annotations"], **(annotations or {})},
            service_account="echo",
            pod_ip=net.pod_ip,
            host_ip=net.client_ip,
            node_cpus=2,
        )
        configmaps = {configmap["metadata"]["name"]: configmap["data"]}
        with Pod(
            meta, spec, identity=identity, netns=net.pod_ns, configmaps=configmaps, secrets=secrets, runtime=runtime
        ) as pod:
            init_started = time.monotonic()
            code, output = pod.run_to_completion("istio-init")
            init_done = time.monotonic()
            assert code == 0, output
            with net.app([8080]):
                overrides = {} if runtime else {"ISTIO_LOCAL_XDS_DIR": str(pod.path("/etc/istio/local-xds"))}
                overrides.update(env(pod) if env else {})
                live = _LiveWatch(netns_file(net.pod_ns))
                proxy = pod.start("istio-proxy", env_overrides=overrides)
                proxy_started = proxy.started_at
                try:
                    ready_at = wait_ready(net)
                except AssertionError:
                    raise AssertionError(f"istio-proxy not ready: {proxy.log_text()[-4000:]}") from None
                finally:
                    live.stop()
                running = RunningPod(net, pod, proxy, init_started, init_done, proxy_started, ready_at, live.live_at)
                try:
                    yield running
                finally:
                    if proxy.running():
                        proxy.terminate(grace_s=5.0)
