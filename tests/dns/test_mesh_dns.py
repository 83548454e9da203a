"""DNS capture in a pod joined to a real istiod (tests/support/mesh_pod.py): a ServiceEntry host that has no DNS
record anywhere resolves in the application (glibc getaddrinfo) from istiod's name table, and the application
reaches it through Envoy; other names are forwarded to the pod's resolv.conf server (the scripted resolver in the
node-side namespace); the DNS proxy's answers, asked inside the pod, are recorded for the comparison between
agents: the Python agent's must equal Istio's agent's."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root
from tests.dns.compare import normalized, query_wire
from tests.dns.processes import wait_ready
from tests.support.envoy import wait_until
from tests.support.mesh_pod import PYTHON_AGENT, MeshPod, istio_agent_image, istiod_sidecar_pod
from tests.support.pod import Image

pytestmark = [pytest.mark.istio, pytest.mark.envoy, pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

APP_UID = 1000
HOST = "payments.internal.example"
VIP = "240.240.0.10"
# A ServiceEntry whose host exists nowhere but in the mesh: its address is what DNS must answer, and the endpoint
# is the node-side application (10.10.0.1:9080), reached through Envoy's listener for the VIP.
SERVICE_ENTRY = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payments, namespace: default}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 10.10.0.1}}]
"""
RESOLV_CONF = (
    "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.10.0.1\noptions ndots:5\n"
)

# The application: resolve with getaddrinfo, then GET through whatever address came back.
_APP = r"""
import json, socket, sys, urllib.request
name, port = sys.argv[1], int(sys.argv[2])
out = {}
try:
    out["addresses"] = sorted({info[4][0] for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)})
except socket.gaierror as exc:
    out["error"] = exc.errno
if port and "addresses" in out:
    try:
        with urllib.request.urlopen(f"http://{name}:{port}/", timeout=5) as response:
            out.update(status=response.status, server=response.headers.get("server"), body=response.read().decode())
    except OSError as exc:
        out["http_error"] = str(exc)
print(json.dumps(out))
"""


def resolve(mesh: MeshPod, name: str, port: int = 0) -> dict[str, Any]:
    done = mesh.net.run([sys.executable, "-c", _APP, name, str(port)], uid=APP_UID, timeout=30)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@contextlib.contextmanager
def dns_capture_pod(
    workdir: Path, image: Image | None, upstream: Sequence[str] = (), upstream_ready: str = "ready"
) -> Iterator[MeshPod]:
    """The pod with DNS capture and the node-side services: the resolv.conf server on 10.10.0.1:53 (the scripted
    resolver, or `upstream`: an argv that prints `upstream_ready` once serving) and the ServiceEntry's endpoint."""
    with istiod_sidecar_pod(
        workdir, config={"payments.yaml": SERVICE_ENTRY}, image=image,
        proxy_env={"ISTIO_META_DNS_CAPTURE": "true"}, init_args=["--redirect-dns"], resolv_conf=RESOLV_CONF,
    ) as mesh:  # fmt: skip
        # A pod has a default route (here to the node side, which routes nowhere further): without one, a connect
        # to the VIP fails in routing, before the capture rules could send it to Envoy.
        route = ["ip", "-n", mesh.net.pod_ns, "route", "add", "default", "via", mesh.net.client_ip]
        subprocess.run(route, check=True, capture_output=True, timeout=10)
        scripted = [sys.executable, "-m", "tests.dns.resolver", mesh.net.client_ip, "53", "real.example.test=10.30.0.1"]
        resolver = mesh.net.popen(list(upstream) or scripted, ns="client", log_name="resolver.log")
        wait_ready(resolver, upstream_ready)
        with mesh.net.app([9080], ns="client"):
            try:
                yield mesh
            finally:
                resolver.stop()


@pytest.fixture(scope="module", params=["istio", "python"])
def agent_pod(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshPod]:
    """A DNS-capture pod with Istio's agent, then with the Python one."""
    require_root()
    image = istio_agent_image() if request.param == "istio" else PYTHON_AGENT
    with dns_capture_pod(tmp_path_factory.mktemp(f"{request.param}-agent"), image) as mesh:
        yield mesh


def endpoint_known(mesh: MeshPod) -> bool:
    """Envoy holds the ServiceEntry's endpoint, healthy. Readiness does not wait for it: a ServiceEntry's endpoints
    come by EDS, which istiod may push after Envoy's first LDS/CDS (on a loaded machine, after readiness), and a
    request before that is Envoy's 503."""
    status, body = mesh.envoy_admin("/clusters")
    return status == 200 and f"outbound|9080||{HOST}::10.10.0.1:9080::health_flags::healthy" in body


def test_service_entry_host_resolves_and_is_reached_through_envoy(agent_pod: MeshPod) -> None:
    wait_until(lambda: endpoint_known(agent_pod), timeout=30)
    result = resolve(agent_pod, HOST, 9080)
    assert result["addresses"] == [VIP]
    assert result.get("status") == 200, result
    assert result["server"] == "envoy"
    assert result["body"].startswith("peer=10.10.0.2:")  # the node-side app saw the pod (Envoy's upstream)
    assert resolve(agent_pod, "real.example.test")["addresses"] == ["10.30.0.1"]
    assert agent_pod.status_port("/debug/ndsz")[0] == 403  # loopback only


# What the DNS proxy of a pod is asked in the comparison between agents: the ServiceEntry host (A, AAAA, with the
# first search domain), forwarded names (answered, NXDOMAIN, truncated), and a type the table does not answer.
POD_QUERIES: list[tuple[str, str, bytes]] = [
    (f"{name} {rdtype} {protocol}", protocol, query_wire(name, rdtype))
    for protocol in ("udp", "tcp")
    for name, rdtype in [
        (f"{HOST}.", "A"), (f"{HOST}.", "AAAA"), (f"{HOST}.default.svc.cluster.local.", "A"),
        ("real.example.test.", "A"), ("nowhere.example.test.", "A"), ("giant.test.", "A"), (f"{HOST}.", "TXT"),
    ]
]  # fmt: skip


def proxy_answers(mesh: MeshPod) -> list[Any]:
    """POD_QUERIES asked of the pod's DNS proxy (127.0.0.1:15053, from inside the pod), replies normalized."""
    path = mesh.net.workdir / "pod-queries.json"
    path.write_text(json.dumps([["127.0.0.1", 15053, protocol, wire.hex()] for _, protocol, wire in POD_QUERIES]))
    done = mesh.net.run([sys.executable, "-m", "tests.dns.ask", str(path)], timeout=120)
    assert done.returncode == 0, done.stderr
    return [normalized(None if r is None else bytes.fromhex(r)) for r in json.loads(done.stdout)]


@pytest.fixture(scope="module")
def answers_by_agent() -> list[dict[str, Any]]:
    """Each agent's answers to POD_QUERIES, in the order the agents ran (Istio's first)."""
    return []


def test_dns_proxy_answers_from_istiods_name_table(agent_pod: MeshPod, answers_by_agent: list[Any]) -> None:
    answers = dict(zip((label for label, _, _ in POD_QUERIES), proxy_answers(agent_pod), strict=True))
    answers_by_agent.append(answers)
    for protocol in ("udp", "tcp"):
        assert answers[f"{HOST}. A {protocol}"]["answer"] == [f"{HOST}. 30 IN A {VIP}"]
        assert answers[f"{HOST}. AAAA {protocol}"]["answer"] == []
        assert answers[f"{HOST}. AAAA {protocol}"]["rcode"] == 0
        assert answers[f"{HOST}.default.svc.cluster.local. A {protocol}"]["answer"] == [
            f"{HOST}.default.svc.cluster.local. 30 IN CNAME {HOST}.",
            f"{HOST}. 30 IN A {VIP}",
        ]
        assert answers[f"real.example.test. A {protocol}"]["answer"] == ["real.example.test. 60 IN A 10.30.0.1"]
        assert answers[f"nowhere.example.test. A {protocol}"]["rcode"] == 3
    assert answers["giant.test. A udp"]["flags"] & 0x0200  # TC: the client retries over TCP
    assert len(answers["giant.test. A tcp"]["answer"]) == 64


def test_dns_metrics_under_istios_names(agent_pod: MeshPod) -> None:
    """The DNS metrics under Istio's names and types (Istio shows a family once it has a sample: a table hit and a
    forwarded query give three of the four; prometheus_client adds `_created` samples beside them)."""
    resolve(agent_pod, f"{HOST}.")
    resolve(agent_pod, "real.example.test.")
    status, body = agent_pod.status_port("/stats/prometheus")
    assert status == 200
    types = dict(line.split()[2:4] for line in body.splitlines() if line.startswith("# TYPE istio_agent_dns"))
    expected = {
        "istio_agent_dns_requests_total": "counter",
        "istio_agent_dns_upstream_requests_total": "counter",
        "istio_agent_dns_upstream_request_duration_seconds": "histogram",
    }
    assert {name: types.get(name) for name in expected} == expected
    assert types.get("istio_agent_dns_upstream_failures_total", "counter") == "counter"


def test_both_agents_gave_the_same_answers(answers_by_agent: list[dict[str, Any]]) -> None:
    """Runs after both agents' pods (pytest keeps a module-scoped parameter's tests together, in order): every reply
    of the Python agent's DNS proxy equals Istio's agent's, id, flags and sections."""
    if len(answers_by_agent) < 2:
        pytest.skip("run with both agents' pods (the whole module)")
    istio, python = answers_by_agent
    assert python == istio
