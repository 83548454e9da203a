"""The DNS proxy's latency and throughput, against a real resolver measured in the same run.

    .venv/bin/python -m bench.bench_dns [--seconds 5] [--json out.json]      # as root; needs dnsperf, dnsmasq

A pod network namespace whose resolv.conf names dnsmasq (Debian `dnsmasq-base`) in the client namespace on :53;
the proxy (agent.dns, via tests/dns/run_proxy.py) runs in the pod on 127.0.0.1:15053, pinned to CPU 1, with
Istio's test name table; dnsperf (Debian `dnsperf`) and dnsmasq share CPU 0. For each of: a table hit through the
proxy, a forwarded query through the proxy (dnsmasq answers it), the same query straight to dnsmasq (the
baseline):
- latency: one query outstanding (dnsperf -q 1), average and minimum;
- throughput: 100 queries outstanding (dnsperf -q 100), queries per second (the proxy on one core).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from tests.dns.istio_cases import TABLE
from tests.dns.run_proxy import table_json
from tests.support.netns import PodNetwork, Process, pod_network

HIT = "productpage.ns1.svc.cluster.local A"
FORWARDED = "www.bing.com A"
PROXY_PORT = 15053


def _wait_ready(process: Process) -> None:
    deadline = time.monotonic() + 20
    while "ready" not in process.log() and "started, version" not in process.log():
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"did not start: {process.log()}")
        time.sleep(0.02)


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for tool in ("dnsperf", "dnsmasq", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install dnsperf dnsmasq-base util-linux)")
    results: dict[str, dict[str, float]] = {}
    with pod_network("dnsb") as pod:
        pod.set_resolv_conf(f"nameserver {pod.client_ip}\nsearch ns1.svc.cluster.local svc.cluster.local\n")
        dnsmasq = pod.popen(
            ["taskset", "-c", "0", "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
             f"--listen-address={pod.client_ip}", "--bind-interfaces", "--port=53", "--user=root", "--pid-file=",
             "--log-facility=-", "--host-record=www.bing.com,1.1.1.1"],
            ns="client", log_name="dnsmasq.log",
        )  # fmt: skip
        _wait_ready(dnsmasq)
        table = pod.workdir / "table.json"
        table.write_text(table_json(TABLE))
        proxy = pod.popen(
            ["taskset", "-c", "1", sys.executable, "-m", "tests.dns.run_proxy", str(table), f"127.0.0.1:{PROXY_PORT}"],
            log_name="proxy.log",
        )
        _wait_ready(proxy)
        try:
            for mode, outstanding in (("latency", 1), ("throughput", 100)):
                runs = {
                    "hit via proxy": ("127.0.0.1", PROXY_PORT, HIT),
                    "forwarded via proxy": ("127.0.0.1", PROXY_PORT, FORWARDED),
                    "direct to resolver": (pod.client_ip, 53, FORWARDED),
                }
                for name, target in runs.items():
                    results[f"{mode}: {name}"] = dnsperf(pod, target, seconds=args.seconds, outstanding=outstanding)
        finally:
            proxy.stop()
            dnsmasq.stop()
    for name, values in results.items():
        print(f"{name:40s} qps {values['qps']:9.0f}  avg {values['avg_us']:7.0f} us  min {values['min_us']:6.0f} us"
              f"  lost {values['lost']:.0f}")  # fmt: skip
    lat_hit = results["latency: hit via proxy"]["avg_us"]
    lat_fwd = results["latency: forwarded via proxy"]["avg_us"]
    lat_direct = results["latency: direct to resolver"]["avg_us"]
    print(f"latency ratios vs direct: hit {lat_hit / lat_direct:.2f}x, forwarded {lat_fwd / lat_direct:.2f}x")
    qps_direct = results["throughput: direct to resolver"]["qps"]
    print(
        f"throughput ratios vs direct: hit {results['throughput: hit via proxy']['qps'] / qps_direct:.2f}x, "
        f"forwarded {results['throughput: forwarded via proxy']['qps'] / qps_direct:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
