"""The DNS proxy's latency and throughput, beside Istio's and against a real resolver, all in the same run.

    .venv/bin/python -m bench.bench_dns [--seconds 3] [--rounds 3] [--json out.json]   # root; dnsperf, dnsmasq, go

A pod network namespace whose resolv.conf names dnsmasq (Debian `dnsmasq-base`) in the client namespace on :53.
In the pod, with Istio's test name table, each pinned to CPU 1 in turn (only one runs at a time): the Python proxy
(agent.dns, via tests/dns/run_proxy.py) and Istio's (its pkg/dns/client, tests/dns/istio_dns; Go sees one CPU).
dnsperf (Debian `dnsperf`) and dnsmasq share CPU 0. For each proxy: a table hit, a forwarded query (dnsmasq answers
it); and the same query straight to dnsmasq (the baseline):
- latency: one query outstanding (dnsperf -q 1), average and minimum;
- throughput: 100 queries outstanding (dnsperf -q 100), queries per second (the proxy on one core).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

from tests.dns.istio_cases import DOMAIN, NAMESPACE, SEARCH, TABLE
from tests.dns.istio_dns import build_istio_dns
from tests.dns.processes import wait_ready
from tests.dns.run_proxy import table_json
from tests.support.netns import PodNetwork, Process, pod_network

HIT = "productpage.ns1.svc.cluster.local A"
FORWARDED = "www.bing.com A"
PROXY_PORT = 15053


def dnsperf(pod: PodNetwork, target: tuple[str, int, str], *, seconds: float, outstanding: int) -> dict[str, float]:
    server, port, query = target
    data = pod.workdir / "queries.txt"
    data.write_text(query + "\n")
    argv = ["taskset", "-c", "0", "dnsperf", "-s", server, "-p", str(port), "-d", str(data),
            "-l", str(seconds), "-q", str(outstanding), "-c", "1", "-t", "2"]  # fmt: skip
    out = pod.run(argv, timeout=seconds + 30).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = re.search(r"Average Latency \(s\):\s+([\d.]+) \(min ([\d.]+)", out)
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert lat is not None, out
    return {"qps": qps, "avg_us": float(lat.group(1)) * 1e6, "min_us": float(lat.group(2)) * 1e6, "lost": lost}


def run_proxy(pod: PodNetwork, which: str, table: Path) -> Process:
    """One proxy on 127.0.0.1:PROXY_PORT in the pod, pinned to CPU 1."""
    if which == "python":
        argv = [sys.executable, "-m", "tests.dns.run_proxy", str(table), f"127.0.0.1:{PROXY_PORT}"]
    else:
        argv = [str(build_istio_dns()), f"127.0.0.1:{PROXY_PORT}", NAMESPACE, DOMAIN, str(table), "5s", "false"]
    proxy = pod.popen(["taskset", "-c", "1", *argv], log_name=f"{which}-proxy.log")
    wait_ready(proxy)
    return proxy


def measure(pod: PodNetwork, table: Path, seconds: float, rounds: int) -> dict[str, dict[str, float]]:
    """The median of `rounds` alternating rounds (python, istio, direct, python, ...): a load change on the shared
    machine hits every side alike."""
    samples: dict[str, list[dict[str, float]]] = {}
    modes = (("latency", 1), ("throughput", 100))
    for _ in range(rounds):
        for which in ("python", "istio"):
            proxy = run_proxy(pod, which, table)
            try:
                for mode, outstanding in modes:
                    for query_name, query in (("hit", HIT), ("forwarded", FORWARDED)):
                        result = dnsperf(
                            pod, ("127.0.0.1", PROXY_PORT, query), seconds=seconds, outstanding=outstanding
                        )
                        samples.setdefault(f"{mode}: {query_name} via {which}", []).append(result)
            finally:
                proxy.stop()
        for mode, outstanding in modes:
            result = dnsperf(pod, (pod.client_ip, 53, FORWARDED), seconds=seconds, outstanding=outstanding)
            samples.setdefault(f"{mode}: direct to resolver", []).append(result)
    return {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for tool in ("dnsperf", "dnsmasq", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install dnsperf dnsmasq-base util-linux)")
    build_istio_dns()
    with pod_network("dnsb") as pod:
        pod.set_resolv_conf(f"nameserver {pod.client_ip}\nsearch {' '.join(SEARCH)}\n")
        dnsmasq = pod.popen(
            ["taskset", "-c", "0", "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
             f"--listen-address={pod.client_ip}", "--bind-interfaces", "--port=53", "--user=root", "--pid-file=",
             "--log-facility=-", "--host-record=www.bing.com,1.1.1.1"],
            ns="client", log_name="dnsmasq.log",
        )  # fmt: skip
        wait_ready(dnsmasq, "started, version")
        table = pod.workdir / "table.json"
        table.write_text(table_json(TABLE))
        try:
            results = measure(pod, table, args.seconds, args.rounds)
        finally:
            dnsmasq.stop()
    for name, values in results.items():
        print(f"{name:36s} qps {values['qps']:9.0f}  avg {values['avg_us']:7.0f} us  min {values['min_us']:6.0f} us"
              f"  lost {values['lost']:.0f}")  # fmt: skip
    direct = results["latency: direct to resolver"]["avg_us"]
    for query_name in ("hit", "forwarded"):
        python = results[f"latency: {query_name} via python"]["avg_us"]
        istio = results[f"latency: {query_name} via istio"]["avg_us"]
        print(f"latency {query_name}: python {python / istio:.2f}x istio's; vs direct: python {python / direct:.2f}x, "
              f"istio {istio / direct:.2f}x")  # fmt: skip
    for query_name in ("hit", "forwarded"):
        python = results[f"throughput: {query_name} via python"]["qps"]
        istio = results[f"throughput: {query_name} via istio"]["qps"]
        print(f"throughput {query_name}: python {python / istio:.2f}x istio's")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
