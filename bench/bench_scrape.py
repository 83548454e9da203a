"""The merged scrape (`:15020/stats/prometheus`) against a direct scrape of Envoy (`:15090`), in the same run.

    .venv/bin/python -m bench.bench_scrape [--scrapes 300] [--app-lines 10000] [--json out.json]

The agent runs as in a pod: `pilot-agent proxy sidecar` (Istio's bootstrap template, a local xDS directory), Envoy
real. Every request carries Prometheus' own headers (its Accept list, `Accept-Encoding: gzip`, the scrape timeout)
on a kept-alive connection, as Prometheus scrapes. Scrapes alternate between the targets so that machine noise
weighs on all alike; medians are compared. The agent's CPU per merged scrape is its process' CPU time over the
merged scrapes (Envoy's CPU not included), divided by their number.

Two rounds: Envoy alone (no application: goal merged <= 1.25x direct Envoy), and with a prometheus_client
application of `--app-lines` lines (goal merged <= 1.2x the slower of the two direct scrapes).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from bench.bench_startup import AgentRig, running_agent, wait_ready
from bench.bench_status import PROMETHEUS_ACCEPT, child
from tests.support.envoy import free_port, new_base_id

HEADERS = {
    "Accept": PROMETHEUS_ACCEPT,
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/3.5.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}


class SidecarRig(AgentRig):
    """The bench rig as a sidecar (Istio merges applications' metrics for sidecars only), with a mesh's worth of
    Envoy metrics: CLUSTERS clusters and LISTENERS more listeners, every stat included (`proxyStatsMatcher`
    `.*`). That is ~1,240 families and ~260 KB of text, the size of the issue's real sidecar (~1,220 families)."""

    CLUSTERS = 10
    LISTENERS = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        xds = self.work / "xds"
        clusters = [_cluster(f"outbound|80||svc-{i}.default.svc.cluster.local") for i in range(self.CLUSTERS)]
        (xds / "cds.yaml").write_text(json.dumps({"resources": clusters}))
        lds = yaml.safe_load((xds / "lds.yaml").read_text())
        template = lds["resources"][0]
        for i in range(self.LISTENERS):
            listener = json.loads(json.dumps(template))
            listener["name"] = f"0.0.0.0_{8000 + i}"
            listener["address"]["socket_address"]["port_value"] = free_port()
            listener["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"] = f"outbound_0.0.0.0_{8000 + i}"
            lds["resources"].append(listener)
        (xds / "lds.yaml").write_text(json.dumps(lds))
        (self.work / "mesh.yaml").write_text(
            json.dumps({"defaultConfig": {"proxyStatsMatcher": {"inclusionRegexps": [".*"]}}})
        )

    def argv(self) -> list[str]:
        swap = {"router": "sidecar", "/none": str(self.work / "mesh.yaml")}
        return [swap.get(arg, arg) for arg in super().argv()]


def _cluster(name: str) -> dict[str, object]:
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}
    return {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]},
    }


def scrape(conn: http.client.HTTPConnection, path: str) -> tuple[float, int]:
    started = time.perf_counter()
    conn.request("GET", path, headers=HEADERS)
    response = conn.getresponse()
    body = response.read()
    took = time.perf_counter() - started
    assert response.status == 200, (response.status, body[:200])
    return took, len(body)


def alternate(targets: dict[str, tuple[int, str]], rounds: int) -> dict[str, list[float]]:
    conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=30) for name, (port, _) in targets.items()}
    times: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for _ in range(rounds):
            for name, (_, path) in targets.items():
                times[name].append(scrape(conns[name], path)[0])
    finally:
        for conn in conns.values():
            conn.close()
    return times


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def measure(rig: SidecarRig, agent_pid: int, app_port: int | None, rounds: int) -> dict[str, object]:
    targets = {"direct_envoy": (rig.prom, "/stats/prometheus"), "merged": (rig.status, "/stats/prometheus")}
    if app_port is not None:
        targets["direct_app"] = (app_port, "/metrics")
    alternate(targets, 20)  # warm-up: connections, caches, the application's first render
    agent = psutil.Process(agent_pid)
    cpu_before = sum(agent.cpu_times()[:2])
    times = alternate(targets, rounds)
    cpu = sum(agent.cpu_times()[:2]) - cpu_before
    result: dict[str, object] = {name: {"median_ms": median_ms(t)} for name, t in times.items()}
    slower = max(median_ms(times["direct_envoy"]), median_ms(times["direct_app"]) if app_port else 0.0)
    result["ratio_merged_vs_slower_direct"] = median_ms(times["merged"]) / slower
    result["agent_cpu_ms_per_merged_scrape"] = cpu * 1000 / rounds
    return result


def run(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {"scrapes": args.scrapes}
    with tempfile.TemporaryDirectory() as tmp:
        rig = SidecarRig(Path(tmp) / "envoy-only", new_base_id())
        with running_agent(rig) as (proc, _):
            wait_ready(rig.status)
            results["envoy_only"] = measure(rig, proc.pid, None, args.scrapes)
        app_port = free_port()
        with child("app", "--port", str(app_port), "--lines", str(args.app_lines)):
            rig = SidecarRig(Path(tmp) / "with-app", new_base_id())
            annotations = json.dumps({"scrape": "true", "port": str(app_port), "path": "/metrics"})
            with running_agent(rig, ISTIO_PROMETHEUS_ANNOTATIONS=annotations) as (proc, _):
                wait_ready(rig.status)
                results[f"with_{args.app_lines}_line_app"] = measure(rig, proc.pid, app_port, args.scrapes // 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--app-lines", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    text = json.dumps(run(args), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
