"""The DNS proxy of the whole agent, Istio's and the Python one, each in a DNS-capture pod joined to the real
istiod (tests/support/mesh_pod.py), measured from inside the pod.

    .venv/bin/python -m bench.bench_dns_agents [--seconds 3]    # as root; dnsperf, dnsmasq; Istio's binaries

For each agent in turn: the pod of tests/dns/test_mesh_dns.py (a ServiceEntry host with an address, DNS capture,
the pod's resolv.conf naming dnsmasq in the node-side namespace); dnsperf inside the pod against the agent's
127.0.0.1:15053: the ServiceEntry host (a table hit) and a name dnsmasq answers (forwarded), latency with one query
outstanding and throughput with 100; then the same forwarded query straight to dnsmasq (the baseline). Nothing is
pinned here: the agent, Envoy and istiod share the machine as in a node.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.bench_dns import dnsperf
from tests.dns.test_mesh_dns import HOST, dns_capture_pod
from tests.support.mesh_pod import PYTHON_AGENT, MeshPod, istio_agent_image

FORWARDED = "www.bing.com"


# The pod's resolv.conf server: dnsmasq (a real resolver, fast enough not to be what is measured).
DNSMASQ = (
    "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--port=53",
    "--listen-address=10.10.0.1", "--bind-interfaces", "--user=root", "--pid-file=", "--log-facility=-",
    f"--host-record={FORWARDED},1.1.1.1",
)  # fmt: skip


def measure(mesh: MeshPod, seconds: float) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for mode, outstanding in (("latency", 1), ("throughput", 100)):
        for name, query in (("hit", f"{HOST} A"), ("forwarded", f"{FORWARDED} A")):
            target = ("127.0.0.1", 15053, query)
            results[f"{mode}: {name}"] = dnsperf(mesh.net, target, seconds=seconds, outstanding=outstanding)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for agent, image in (("istio", istio_agent_image()), ("python", PYTHON_AGENT)):
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-dns-{agent}-"))
        try:
            with dns_capture_pod(workdir, image, DNSMASQ, "started, version") as mesh:
                for name, values in measure(mesh, args.seconds).items():
                    results[f"{name} via {agent}"] = values
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    for name, values in results.items():
        print(f"{name:36s} qps {values['qps']:9.0f}  avg {values['avg_us']:7.0f} us  lost {values['lost']:.0f}")
    for mode, key in (("latency", "avg_us"), ("throughput", "qps")):
        for name in ("hit", "forwarded"):
            ratio = results[f"{mode}: {name} via python"][key] / results[f"{mode}: {name} via istio"][key]
            print(f"{mode} {name}: python {ratio:.2f}x istio's agent")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
