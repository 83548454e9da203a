"""The capture rules and the DNS proxy together, in a pod network namespace: the application resolves with the
system resolver (glibc getaddrinfo) against the pod's resolv.conf server, the rules (`istio-iptables
--redirect-dns`) send its queries to the proxy on 127.0.0.1:15053, which runs as uid 1337, answers table names
itself and forwards the rest to the resolv.conf server in the client namespace, its own queries not captured
again. The resolv.conf server is the scripted resolver (tests/dns/resolver.py) in the client namespace."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import require_root
from tests.dns.processes import wait_ready
from tests.dns.run_proxy import table_json
from tests.iptables.conftest import INJECTOR_ARGS
from tests.support.netns import PodNetwork, Process, pod_network

pytestmark = [pytest.mark.root, pytest.mark.netns]

APP_UID = 1000
RESOLV_CONF = (
    "search ns1.svc.cluster.local svc.cluster.local cluster.local\n"
    "nameserver {server}\n"
    "options ndots:5 timeout:3 attempts:1\n"
)
TABLE = {
    "productpage.ns1.svc.cluster.local": {
        "ips": ["10.20.0.9"], "registry": "Kubernetes", "namespace": "ns1", "shortname": "productpage",
    },
    "db.mesh.internal": {"ips": ["10.20.0.50", "10.20.0.51"], "registry": "External"},
    "v6only.mesh.internal": {"ips": ["fd00::5"], "registry": "External"},
}  # fmt: skip
FORWARD_TIMEOUT = 1.0

# The application's lookup: getaddrinfo as the libc of the pod does it; the addresses or the error, and the time.
_RESOLVE = r"""
import json, socket, sys, time
started = time.monotonic()
try:
    infos = socket.getaddrinfo(sys.argv[1], 80, type=socket.SOCK_STREAM)
    out = {"addresses": sorted({info[4][0] for info in infos})}
except socket.gaierror as exc:
    out = {"error": socket.EAI_AGAIN == exc.errno and "EAI_AGAIN" or socket.EAI_NONAME == exc.errno and "EAI_NONAME"
           or str(exc)}
out["seconds"] = time.monotonic() - started
print(json.dumps(out))
"""


@dataclass
class CapturedPod:
    pod: PodNetwork
    resolver: Process
    proxy: Process

    def resolve(self, name: str, uid: int = APP_UID) -> dict[str, object]:
        done = self.pod.run([sys.executable, "-c", _RESOLVE, name], uid=uid, timeout=30)
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    def upstream_queries(self) -> list[list[str]]:
        """[protocol, name, type, peer] of each query the resolv.conf server received."""
        return [line.split()[1:] for line in self.resolver.log().splitlines() if line.startswith("query ")]


@pytest.fixture(scope="module")
def captured() -> Iterator[CapturedPod]:
    require_root()
    with pod_network("dns") as pod:
        pod.set_resolv_conf(RESOLV_CONF.format(server=pod.client_ip))
        records = ["real.example.test=10.30.0.1", "real.example.test=fd00::30"]
        resolver = pod.popen([sys.executable, "-m", "tests.dns.resolver", pod.client_ip, "53", *records], ns="client")
        wait_ready(resolver)
        installed = pod.pilot_agent(*INJECTOR_ARGS, "--redirect-dns")
        assert installed.returncode == 0, installed.stderr
        table = pod.workdir / "table.json"
        table.write_text(table_json(TABLE))
        proxy = pod.popen(
            [sys.executable, "-m", "tests.dns.run_proxy", str(table), "localhost:15053", str(FORWARD_TIMEOUT)],
            uid=1337, gid=1337, log_name="dns-proxy.log",
        )  # fmt: skip
        wait_ready(proxy)
        try:
            yield CapturedPod(pod, resolver, proxy)
        finally:
            proxy.stop()
            resolver.stop()


def test_table_names_resolve_without_the_upstream(captured: CapturedPod) -> None:
    before = len(captured.upstream_queries())
    assert captured.resolve("productpage")["addresses"] == ["10.20.0.9"]
    assert captured.resolve("productpage.ns1")["addresses"] == ["10.20.0.9"]
    assert captured.resolve("productpage.ns1.svc.cluster.local")["addresses"] == ["10.20.0.9"]
    # Not a Kubernetes name: the search-domain CNAME answers the first try in one round trip.
    assert captured.resolve("db.mesh.internal")["addresses"] == ["10.20.0.50", "10.20.0.51"]
    # A known name without an IPv4 address: AAAA answers, A is NOERROR empty (not NXDOMAIN).
    assert captured.resolve("v6only.mesh.internal")["addresses"] == ["fd00::5"]
    # Only the full Kubernetes name, which glibc (ndots:5) first tries with each search domain, reached the
    # upstream: as with Istio's agent, `name.ns.svc.cluster.local.<search>` is no table name.
    searches = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert {q[1] for q in captured.upstream_queries()[before:]} == {
        f"productpage.ns1.svc.cluster.local.{search}." for search in searches
    }


def test_other_names_are_forwarded_by_the_proxy_and_not_captured_again(captured: CapturedPod) -> None:
    result = captured.resolve("real.example.test")
    assert result["addresses"] == ["10.30.0.1", "fd00::30"]
    forwarded = [q for q in captured.upstream_queries() if q[1] == "real.example.test."]
    # The proxy's own queries (uid 1337) reached the resolv.conf server from the pod, once per type; a loop
    # through the proxy would have shown up as SERVFAIL or repeated queries.
    assert sorted(q[2] for q in forwarded) == ["A", "AAAA"]
    assert {q[3] for q in forwarded} == {captured.pod.pod_ip}


def test_unknown_names_get_the_upstream_nxdomain(captured: CapturedPod) -> None:
    assert captured.resolve("nowhere.example.test")["error"] == "EAI_NONAME"


def test_upstream_timeout_is_a_quick_failure_not_a_hang(captured: CapturedPod) -> None:
    """silent.test is never answered upstream: the proxy answers SERVFAIL after DNS_FORWARD_TIMEOUT, so glibc gives
    up (EAI_AGAIN) in about that time, not after its own retries."""
    result = captured.resolve("silent.test.")
    assert result["error"] == "EAI_AGAIN"
    assert float(str(result["seconds"])) < FORWARD_TIMEOUT * 2 + 1.0


def test_a_large_answer_is_retried_over_tcp_through_the_capture(captured: CapturedPod) -> None:
    result = captured.resolve("giant.test.")
    assert len(result["addresses"]) == 64  # type: ignore[arg-type]
    protocols = {q[0] for q in captured.upstream_queries() if q[1] == "giant.test." and q[2] == "A"}
    assert protocols == {"udp", "tcp"}


def test_the_agent_uid_bypasses_the_proxy(captured: CapturedPod) -> None:
    """uid 1337 (Envoy, the agent) resolves straight against the resolv.conf server: no table names for it."""
    assert captured.resolve("productpage.ns1.svc.cluster.local.", uid=1337)["error"] == "EAI_NONAME"
    assert captured.resolve("real.example.test.", uid=1337)["addresses"] == ["10.30.0.1", "fd00::30"]
