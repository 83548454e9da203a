"""The pod harness: a "pod" network namespace and a "client" one, joined by a veth pair, with helpers to run
processes inside either as any uid/gid (and capabilities), a tiny HTTP application, and Envoy.

    with pod_network() as pod:                      # needs root; everything is removed on exit
        with pod.app([8080, 15020]):               # app in the pod: answers "peer=<ip>:<port> local=<ip>:<port>"
            reply = pod.http_get(f"http://{pod.pod_ip}:8080/")   # from the client namespace by default
            assert reply.status == 200
        pod.run(["iptables-save"])                 # any command, inside the pod namespace
        pod.pilot_agent("istio-iptables", "-p", "15001", ...)  # the agent's CLI, inside the pod namespace
        config = sidecar_envoy_config(pod.workdir)  # or any bootstrap dict
        with pod.envoy(config, uid=1337, gid=1337) as envoy:   # Envoy inside the pod, its own --base-id
            envoy.stats()                           # admin API over a unix socket in pod.workdir

Addresses: the pod is 10.10.0.2, the client 10.10.0.1 (/24 on the veth). They live only inside the two namespaces
this harness creates, so concurrent runs never collide; the namespace and veth names are random.

Processes are started with `ip netns exec <ns> [setpriv --reuid U --regid G --clear-groups [caps]] -- argv`;
`setpriv` gives e.g. Envoy uid 1337 and, for TPROXY, CAP_NET_ADMIN as an ambient capability.
Later end-to-end tests run the whole agent inside `pod` the same way (`pod.popen([...], uid=...)`).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from agent.iptables.apply import Result
from tests.support.envoy import envoy_binary, new_base_id, remove_shm

REPO_ROOT = Path(__file__).resolve().parents[2]
POD_IP = "10.10.0.2"
CLIENT_IP = "10.10.0.1"

# The application: one asyncio process, several ports, HTTP/1.1 keep-alive, answers with what it saw.
# `GET /sleep/<ms>` answers after <ms> milliseconds: a request that stays in flight (pod deletion scenarios);
# `GET /hold` answers once a `GET /release` came: in flight for as long as a test needs (`GET /held` answers how
# many are held now); `GET /headers` also echoes the request as it arrived.
_APP_CODE = r"""
import asyncio, re, sys

held = []  # one asyncio.Event per request held

async def handle(reader, writer):
    peer = writer.get_extra_info("peername")
    local = writer.get_extra_info("sockname")
    body = f"peer={peer[0]}:{peer[1]} local={local[0]}:{local[1]}\n".encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            slow = re.match(rb"GET /sleep/(\d+)", request)
            if slow:
                await asyncio.sleep(int(slow.group(1)) / 1000)
            if request.startswith(b"GET /hold "):
                held.append(asyncio.Event())
                await held[-1].wait()
            if request.startswith(b"GET /release "):
                for event in held:
                    event.set()
                held.clear()
            if request.startswith(b"GET /held "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(len(held))), len(held)))
            elif request.startswith(b"GET /headers"):
                echoed = body + request  # what the peer (a sidecar) sent: x-forwarded-client-cert, say
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(echoed) + echoed)
            else:
                writer.write(head + body)
            await writer.drain()
            if b"connection: close" in request.lower():
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    servers = [await asyncio.start_server(handle, "0.0.0.0", int(p), backlog=1024) for p in sys.argv[1:]]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))

asyncio.run(main())
"""


# The HTTP client, run inside a namespace: one GET, the reply as JSON on stdout; errors as "ERRNAME: text", exit 1.
_CLIENT_CODE = r"""
import errno, http.client, json, socket, sys, urllib.parse
url, source, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
parts = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout,
                                  source_address=(source, 0) if source else None)
try:
    conn.request("GET", parts.path or "/", headers={"Connection": "close"})
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
except OSError as exc:
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    print(f"{name}: {exc}")
    sys.exit(1)
headers = {k.lower(): v for k, v in response.getheaders()}
print(json.dumps({"status": response.status, "headers": headers, "body": body}))
"""


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: str


@dataclass
class Process:
    """A process started in a namespace; `stop()` ends it (SIGTERM, then SIGKILL)."""

    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


@dataclass
class RunningEnvoy(Process):
    admin_socket: Path = field(default=Path())
    base_id: int = 0

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        return unix_http(self.admin_socket, path, method)

    def stats(self) -> dict[str, int]:
        """Counters and gauges from /stats?format=json as {name: value}."""
        _, body = self.admin("/stats?format=json")
        values: dict[str, int] = {}
        for stat in json.loads(body)["stats"]:
            if "value" in stat:
                values[stat["name"]] = int(stat["value"])
        return values

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)


def unix_http(socket_path: Path, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, str]:
    """One HTTP request over a unix socket (Envoy's admin here: no TCP port, works from any namespace)."""

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(str(socket_path))
            except OSError:
                sock.close()
                raise
            self.sock = sock

    conn = _Conn("localhost", timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


@dataclass
class PodNetwork:
    pod_ns: str
    client_ns: str
    workdir: Path
    pod_ip: str = POD_IP
    client_ip: str = CLIENT_IP
    pod_if: str = ""
    client_if: str = ""

    # -- running things -----------------------------------------------------------------------------------------

    def wrap(
        self, argv: Sequence[str], *, ns: str = "pod", uid: int | None = None, gid: int | None = None,
        caps: Sequence[str] = (),
    ) -> list[str]:  # fmt: skip
        """The argv that runs `argv` in namespace "pod" or "client" as uid/gid with ambient `caps` (net_admin...)."""
        name = self.pod_ns if ns == "pod" else self.client_ns
        # Absolute paths: `env` may carry a PATH without them (the "no iptables binary" test).
        prefix = [shutil.which("ip") or "ip", "netns", "exec", name]
        if uid is not None or caps:
            user = 0 if uid is None else uid
            group = user if gid is None else gid
            prefix += [shutil.which("setpriv") or "setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups"]
            if caps:
                wanted = ",".join(f"+{c}" for c in caps)
                prefix += [f"--inh-caps={wanted}", f"--ambient-caps={wanted}"]
            prefix.append("--")
        return [*prefix, *argv]

    def run(
        self, argv: Sequence[str], *, ns: str = "pod", uid: int | None = None, gid: int | None = None,
        env: Mapping[str, str] | None = None, timeout: float = 30.0, stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(
            self.wrap(argv, ns=ns, uid=uid, gid=gid), input=stdin, capture_output=True, text=True,
            timeout=timeout, check=False, env=None if env is None else dict(env), cwd=REPO_ROOT,
        )  # fmt: skip

    def popen(
        self, argv: Sequence[str], *, ns: str = "pod", uid: int | None = None, gid: int | None = None,
        caps: Sequence[str] = (), log_name: str | None = None, env: Mapping[str, str] | None = None,
    ) -> Process:  # fmt: skip
        log_path = self.workdir / (log_name or f"proc-{secrets.token_hex(3)}.log")
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                self.wrap(argv, ns=ns, uid=uid, gid=gid, caps=caps), stdout=log_file, stderr=subprocess.STDOUT,
                env=None if env is None else dict(env), cwd=REPO_ROOT,
            )  # fmt: skip
        return Process(popen, log_path)

    def pilot_agent(
        self, *args: str, env: Mapping[str, str] | None = None, uid: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`pilot-agent <args>` inside the pod namespace, with a clean environment plus `env`."""
        base = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONDONTWRITEBYTECODE": "1"}
        base["PYTHONPATH"] = str(REPO_ROOT)
        return self.run([sys.executable, "-m", "agent", *args], uid=uid, env={**base, **(env or {})}, timeout=60)

    def set_resolv_conf(self, text: str) -> None:
        """What processes in the pod namespace see as /etc/resolv.conf (`ip netns exec` bind-mounts
        /etc/netns/<ns>/resolv.conf); removed with the namespace."""
        directory = Path("/etc/netns") / self.pod_ns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(text)

    # -- observing ----------------------------------------------------------------------------------------------

    def iptables_save(self, version: int = 4) -> str:
        done = self.run(["iptables-save" if version == 4 else "ip6tables-save"])
        assert done.returncode == 0, done.stderr
        return done.stdout

    def http_get(
        self, url: str, *, ns: str = "client", uid: int | None = None, source: str | None = None,
        timeout: float = 5.0,
    ) -> HttpReply:  # fmt: skip
        """GET `url` from a namespace, as `uid`, optionally from `source` (bound before connecting). Raises
        ConnectionError (with the errno name, e.g. ECONNREFUSED) when no HTTP answer came back."""
        argv = [sys.executable, "-c", _CLIENT_CODE, url, source or "", str(timeout)]
        done = self.run(argv, ns=ns, uid=uid, timeout=timeout + 10)
        if done.returncode != 0:
            raise ConnectionError(f"GET {url} from {ns}: {done.stdout.strip() or done.stderr.strip()}")
        reply = json.loads(done.stdout)
        return HttpReply(int(reply["status"]), dict(reply["headers"]), str(reply["body"]))

    # -- services -----------------------------------------------------------------------------------------------

    @contextmanager
    def app(self, ports: Sequence[int], *, ns: str = "pod", uid: int | None = None) -> Iterator[Process]:
        """The test application on `ports` (all interfaces). It answers every request with
        `peer=<ip>:<port> local=<ip>:<port>`: who connected, to which address."""
        process = self.popen(
            [sys.executable, "-u", "-c", _APP_CODE, *map(str, ports)], ns=ns, uid=uid, log_name=f"app-{ns}.log"
        )
        try:
            deadline = time.monotonic() + 15
            while "ready" not in process.log():
                assert process.popen.poll() is None, f"app exited: {process.log()}"
                assert time.monotonic() < deadline, "app did not start"
                time.sleep(0.02)
            yield process
        finally:
            process.stop()

    @contextmanager
    def envoy(
        self, config: Mapping[str, object], *, uid: int = 1337, gid: int = 1337, caps: Sequence[str] = ()
    ) -> Iterator[RunningEnvoy]:
        """Envoy in the pod namespace as uid/gid with `config` (a bootstrap as a dict; its `admin` is replaced by a
        unix socket in the workdir). Own --base-id; its shared memory is removed afterwards."""
        base_id = new_base_id()
        admin_socket = self.workdir / f"admin-{base_id}.sock"
        bootstrap = {**config, "admin": {"address": {"pipe": {"path": str(admin_socket)}}}}
        path = self.workdir / f"envoy-{base_id}.json"
        path.write_text(json.dumps(bootstrap))
        argv = [envoy_binary(), "-c", str(path), "--base-id", str(base_id), "-l", "warning", "--concurrency", "1"]
        process = self.popen(argv, uid=uid, gid=gid, caps=caps, log_name=f"envoy-{base_id}.log")
        running = RunningEnvoy(process.popen, process.log_path, admin_socket, base_id)
        try:
            deadline = time.monotonic() + 20
            while True:
                assert running.popen.poll() is None, f"envoy exited: {running.log()}"
                assert time.monotonic() < deadline, f"envoy not ready: {running.log()}"
                try:
                    if running.admin("/ready") == (200, "LIVE\n"):
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            yield running
        finally:
            running.stop()
            remove_shm(base_id)


def _any(type_name: str, **fields: object) -> dict[str, object]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _http_listener(name: str, port: int, cluster: str, log_path: Path, listener_filters: list[object]) -> object:
    hcm = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=name,
        access_log=[
            {
                "name": "envoy.access_loggers.file",
                "typed_config": _any(
                    "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    path=str(log_path),
                    log_format={
                        "text_format": f"{name} %DOWNSTREAM_REMOTE_ADDRESS% -> %DOWNSTREAM_LOCAL_ADDRESS% "
                        "%UPSTREAM_HOST% %RESPONSE_CODE%\n"
                    },
                ),
            }
        ],
        route_config={
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                    "response_headers_to_add": [{"header": {"key": "x-captured-by", "value": f"{name}-{port}"}}],
                }
            ]
        },
        http_filters=[
            {
                "name": "envoy.filters.http.router",
                "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
            }
        ],
    )
    return {
        "name": name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "listener_filters": listener_filters,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def sidecar_envoy_config(workdir: Path, mode: str = "REDIRECT", tproxy_mark: int = 1337) -> dict[str, object]:
    """A hand-written sidecar: `inbound` on 15006 and `outbound` on 15001, both with the original_dst listener
    filter and an ORIGINAL_DST passthrough cluster, like Istio's virtualInbound/virtualOutbound.

    REDIRECT: the inbound cluster binds 127.0.0.6 (Istio's InboundPassthroughCluster), which the capture rules let
    through. TPROXY: the inbound listener is transparent and keeps the client's address with original_src (mark
    1337), so the app sees the real client. Responses carry `x-captured-by: <listener>-<port>`; each listener
    writes an access log line to `<workdir>/<listener>.log`."""
    original_dst = {
        "name": "envoy.filters.listener.original_dst",
        "typed_config": _any("envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
    }
    inbound_filters: list[object] = [original_dst]
    inbound_cluster: dict[str, object] = {
        "name": "inbound_passthrough",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
    }
    if mode == "TPROXY":
        inbound_filters.append(
            {
                "name": "envoy.filters.listener.original_src",
                "typed_config": _any("envoy.extensions.filters.listener.original_src.v3.OriginalSrc", mark=tproxy_mark),
            }
        )
    else:
        inbound_cluster["upstream_bind_config"] = {"source_address": {"address": "127.0.0.6", "port_value": 0}}
    inbound = _http_listener("inbound", 15006, "inbound_passthrough", workdir / "inbound.log", inbound_filters)
    if mode == "TPROXY":
        assert isinstance(inbound, dict)
        inbound["transparent"] = True
    outbound = _http_listener("outbound", 15001, "outbound_passthrough", workdir / "outbound.log", [original_dst])
    outbound_cluster = {
        "name": "outbound_passthrough",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
    }
    return {"static_resources": {"listeners": [inbound, outbound], "clusters": [inbound_cluster, outbound_cluster]}}


def normalize_save(text: str) -> str:
    """iptables-save text without comments and counters, empty tables dropped: the rules only.

    A table holding nothing but built-in chains with ACCEPT policy is dropped, because the nf_tables backend creates
    tables lazily: "no nat table" and "an empty nat table" are the same rule set."""
    out: list[str] = []
    block: list[str] = []
    for raw in text.splitlines():
        line = re.sub(r" \[\d+:\d+\]$", "", raw.strip())
        line = re.sub(r"^\[\d+:\d+\] ", "", line)
        if not line or line.startswith("#"):
            continue
        block.append(line)
        if line == "COMMIT":
            meaningful = [ln for ln in block[1:-1] if not re.match(r"^:[A-Z]+ ACCEPT$", ln)]
            if meaningful:
                out += block
            block = []
    return "\n".join(out) + "\n"


@contextmanager
def pod_network(prefix: str = "ipt") -> Iterator[PodNetwork]:
    """Create the two namespaces and the veth pair; remove everything (processes stop first) on exit."""
    token = secrets.token_hex(3)
    pod = PodNetwork(
        pod_ns=f"{prefix}-pod-{token}",
        client_ns=f"{prefix}-cli-{token}",
        workdir=Path(tempfile.mkdtemp(prefix=f"{prefix}-{token}-")),
        pod_if=f"vp{token}",
        client_if=f"vc{token}",
    )
    # uid 1337 (Envoy) writes its admin socket and logs here.
    pod.workdir.chmod(0o777)
    steps = [
        ["ip", "netns", "add", pod.client_ns],
        *_pod_end(pod),
        ["ip", "link", "set", pod.client_if, "netns", pod.client_ns],
        ["ip", "-n", pod.client_ns, "addr", "add", f"{pod.client_ip}/24", "dev", pod.client_if],
        ["ip", "-n", pod.client_ns, "link", "set", pod.client_if, "up"],
        ["ip", "-n", pod.client_ns, "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=15)
        yield pod
    finally:
        for ns in (pod.pod_ns, pod.client_ns):
            _delete_netns(ns)
        shutil.rmtree(pod.workdir, ignore_errors=True)


def _pod_end(pod: PodNetwork) -> list[list[str]]:
    """The pod's namespace and its end of the veth pair, addressed and up (the other end is the caller's)."""
    return [
        ["ip", "netns", "add", pod.pod_ns],
        ["ip", "link", "add", pod.pod_if, "type", "veth", "peer", "name", pod.client_if],
        ["ip", "link", "set", pod.pod_if, "netns", pod.pod_ns],
        ["ip", "-n", pod.pod_ns, "addr", "add", f"{pod.pod_ip}/24", "dev", pod.pod_if],
        ["ip", "-n", pod.pod_ns, "link", "set", pod.pod_if, "up"],
        ["ip", "-n", pod.pod_ns, "link", "set", "lo", "up"],
    ]


def _delete_netns(ns: str) -> None:
    """Kill anything still running inside (a test that failed mid-way), then remove the namespace."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
    for pid in pids.split():
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=15)
    shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


class NetnsRunner:
    """An `agent.iptables.apply.Runner` that runs each command inside the pod namespace."""

    def __init__(self, pod: PodNetwork) -> None:
        self.pod = pod
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        self.calls.append(tuple(argv))
        done = self.pod.run(argv, stdin=stdin)
        return Result(done.returncode, done.stdout, done.stderr)

    def which(self, name: str) -> str | None:
        return shutil.which(name)


@contextmanager
def mesh_network(prefix: str = "mpods", count: int = 2) -> Iterator[list[PodNetwork]]:
    """`count` pod namespaces on one bridge in a node namespace (10.10.0.1): pod i is 10.10.0.<2+i>, and pods
    reach each other. Each PodNetwork's "client" namespace is the node namespace (istiod runs there, kubelet's
    probes come from there). Everything is removed on exit."""
    token = secrets.token_hex(3)
    node = f"{prefix}-node-{token}"
    pods = [
        PodNetwork(
            pod_ns=f"{prefix}-p{i}-{token}",
            client_ns=node,
            workdir=Path(tempfile.mkdtemp(prefix=f"{prefix}-{token}-{i}-")),
            pod_ip=f"10.10.0.{2 + i}",
            client_ip=CLIENT_IP,
            pod_if=f"vp{token}{i}",
            client_if=f"vn{token}{i}",
        )
        for i in range(count)
    ]
    steps = [
        ["ip", "netns", "add", node],
        ["ip", "-n", node, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", node, "addr", "add", f"{CLIENT_IP}/24", "dev", "br0"],
        ["ip", "-n", node, "link", "set", "br0", "up"],
        ["ip", "-n", node, "link", "set", "lo", "up"],
    ]
    for pod in pods:
        pod.workdir.chmod(0o777)
        steps += [
            *_pod_end(pod),
            ["ip", "link", "set", pod.client_if, "netns", node],
            ["ip", "-n", node, "link", "set", pod.client_if, "master", "br0"],
            ["ip", "-n", node, "link", "set", pod.client_if, "up"],
        ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=15)
        yield pods
    finally:
        for ns in [*(pod.pod_ns for pod in pods), node]:
            _delete_netns(ns)
        for pod in pods:
            shutil.rmtree(pod.workdir, ignore_errors=True)
