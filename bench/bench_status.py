"""Benchmarks of the status server, each against a baseline measured in the same run.

    /work/venv/bin/python -m bench.bench_status [--scrapes 200] [--json out.json]

1. Merged scrape latency (median, p99) vs a direct scrape of Envoy's prometheus listener (Istio's 15090):
   Envoy alone (goal <= 1.25x), and with a 10,000-line prometheus_client application (goal <= 1.3x of the slower
   of the two direct scrapes).
2. Readiness latency through Envoy's status listener (kubelet's 15021) with 50 concurrent probers (wrk), next to
   wrk against Envoy's own admin /ready through the same kind of listener as the baseline.
3. The agent's RSS while serving a 100,000-line application source, above its idle RSS (goal < 10 MiB).

The agent runs in its own process (this script, `serve` mode) so its memory is its own and the load generator
does not share its event loop. Envoy is real (tests/status/envoy_stack.py); the applications are prometheus_client's
own exporter in child processes.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient
from agent.status import StatusServer, StatusSettings
from agent.status.settings import ScrapeTarget
from tests.status.envoy_stack import envoy_stack
from tests.support.envoy import free_port

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


# ---------------------------------------------------------------------------------------------- child processes
def serve_agent(args: argparse.Namespace) -> None:
    targets = (ScrapeTarget(args.app_port, "/metrics"),) if args.app_port else ()
    settings = StatusSettings(
        status_port=args.status_port,
        envoy_prometheus_port=args.envoy_prom_port,
        admin_port=args.admin_port,
        listen_host="127.0.0.1",
        probe_host="127.0.0.1",
        scrape_targets=targets,
        default_scrape_timeout=30.0,
        merge_envoy_stats=not args.no_envoy,
    )

    async def main() -> None:
        lifecycle = Lifecycle()
        lifecycle.envoy_up()
        server = StatusServer(settings, lifecycle, AgentMetrics(), AdminClient(port=args.admin_port))
        await server.start()
        print("ready", flush=True)
        # Run until the parent closes our stdin.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop()

    asyncio.run(main())


def serve_app(args: argparse.Namespace) -> None:
    registry = CollectorRegistry()
    # `lines` sample lines: families of 100 series each, half gauges, half counters (text: _total + _created).
    families = max(1, args.lines // 100)
    for f in range(families):
        if f % 2:
            gauge = Gauge(f"app_gauge_{f}", "A gauge family.", ["instance", "shard"], registry=registry)
            for i in range(100):
                gauge.labels(f"pod-{i}", str(i % 7)).set(i)
        else:
            counter = Counter(f"app_counter_{f}", "A counter family.", ["instance", "shard"], registry=registry)
            for i in range(50):  # a counter is two lines (_total and _created)
                counter.labels(f"pod-{i}", str(i % 7)).inc(i)
    start_http_server(args.port, addr="127.0.0.1", registry=registry)
    print("ready", flush=True)
    sys.stdin.read()


@contextmanager
def child(*argv: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_status", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------- measurements
def scrape_times(port: int, path: str, count: int, accept: str = "text/plain") -> tuple[list[float], int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    size = 0
    for _ in range(count):
        started = time.perf_counter()
        conn.request("GET", path, headers={"Accept": accept})
        response = conn.getresponse()
        body = response.read()
        times.append(time.perf_counter() - started)
        assert response.status == 200, response.status
        size = len(body)
    conn.close()
    return times, size


def interleaved(targets: list[tuple[int, str]], count: int) -> list[tuple[list[float], int]]:
    """Scrape each target in turn, `count` rounds: the machine's load at any moment weighs on all of them alike."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for port, _ in targets]
    times: list[list[float]] = [[] for _ in targets]
    sizes = [0 for _ in targets]
    for _ in range(count):
        for index, (conn, (_, path)) in enumerate(zip(conns, targets, strict=True)):
            started = time.perf_counter()
            conn.request("GET", path, headers={"Accept": "text/plain"})
            response = conn.getresponse()
            body = response.read()
            times[index].append(time.perf_counter() - started)
            assert response.status == 200, response.status
            sizes[index] = len(body)
    for conn in conns:
        conn.close()
    return list(zip(times, sizes, strict=True))


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


def wrk(url: str, connections: int = 50, seconds: int = 5) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert match, out
        value = float(match.group(1))
        return value / 1000 if match.group(2) == "us" else value * 1000 if match.group(2) == "s" else value

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "median_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "requests_per_s": float(rps.group(1)) if rps else 0.0,
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def bursts(url: str, probers: int = 50, rounds: int = 60) -> dict[str, float]:
    """`probers` kubelet-style probes at the same instant (a new connection each, as kubelet does), `rounds` times."""

    async def run() -> list[float]:
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> None:
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append(time.perf_counter() - started)

            for _ in range(rounds):
                await asyncio.gather(*(one() for _ in range(probers)))
                await asyncio.sleep(0.02)
        return latencies

    return summary(asyncio.run(run()))


def peak_rss_during(pid: int, action: object) -> tuple[int, int]:
    """(idle RSS before `action`, peak RSS while it runs), sampled every 5 ms."""
    assert callable(action)
    proc = psutil.Process(pid)
    idle = proc.memory_info().rss
    peak = idle
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    return idle, peak


def run_bench(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {"cpus": os.cpu_count(), "scrapes": args.scrapes}
    with tempfile.TemporaryDirectory() as tmp:
        agent_port = free_port()
        with envoy_stack(Path(tmp), agent_port) as stack:
            common = ["--envoy-prom-port", str(stack.prometheus_port), "--admin-port", str(stack.admin_port)]
            n = args.scrapes
            # 1a. Envoy alone; and the agent's fixed cost: its own section only, in a second agent process.
            agent_only_port = free_port()
            with (
                child("serve", "--status-port", str(agent_port), *common),
                child("serve", "--status-port", str(agent_only_port), "--no-envoy", *common),
            ):
                scrape_times(stack.prometheus_port, "/stats/prometheus", 20)  # warm-up
                scrape_times(agent_port, "/stats/prometheus", 20)
                scrape_times(agent_only_port, "/stats/prometheus", 20)
                (direct, direct_size), (merged, merged_size), (own, own_size) = interleaved(
                    [
                        (stack.prometheus_port, "/stats/prometheus"),
                        (agent_port, "/stats/prometheus"),
                        (agent_only_port, "/stats/prometheus"),
                    ],
                    n,
                )
                results["envoy_alone"] = {
                    "direct_envoy": {**summary(direct), "bytes": direct_size},
                    "merged": {**summary(merged), "bytes": merged_size},
                    "agent_section_only": {**summary(own), "bytes": own_size},
                    "ratio_median": statistics.median(merged) / statistics.median(direct),
                    "ratio_p99": summary(merged)["p99_ms"] / summary(direct)["p99_ms"],
                }
                # 2. Readiness through the status listener, 50 concurrent probers; baseline: Envoy admin /ready.
                wrk(f"http://127.0.0.1:{stack.status_listener_port}/healthz/ready", seconds=1)  # warm-up
                results["readiness_burst_50"] = {
                    "through_envoy_status_listener": bursts(
                        f"http://127.0.0.1:{stack.status_listener_port}/healthz/ready"
                    ),
                    "agent_directly": bursts(f"http://127.0.0.1:{agent_port}/healthz/ready"),
                    "baseline_envoy_admin_ready": bursts(f"http://127.0.0.1:{stack.admin_port}/ready"),
                }
                results["readiness_wrk_50"] = {
                    "through_envoy_status_listener": wrk(
                        f"http://127.0.0.1:{stack.status_listener_port}/healthz/ready"
                    ),
                    "agent_directly": wrk(f"http://127.0.0.1:{agent_port}/healthz/ready"),
                    "baseline_envoy_admin_ready": wrk(f"http://127.0.0.1:{stack.admin_port}/ready"),
                }
            # 1b. With a 10,000-line application.
            app_port = free_port()
            with (
                child("app", "--port", str(app_port), "--lines", "10000"),
                child("serve", "--status-port", str(agent_port), "--app-port", str(app_port), *common),
            ):
                scrape_times(app_port, "/metrics", 5)
                scrape_times(agent_port, "/stats/prometheus", 5)
                (app_direct, app_size), (envoy_direct, _), (merged_app, merged_app_size) = interleaved(
                    [
                        (app_port, "/metrics"),
                        (stack.prometheus_port, "/stats/prometheus"),
                        (agent_port, "/stats/prometheus"),
                    ],
                    n // 2,
                )
                slower = max(statistics.median(app_direct), statistics.median(envoy_direct))
                slower_p99 = max(summary(app_direct)["p99_ms"], summary(envoy_direct)["p99_ms"])
                results["with_10k_line_app"] = {
                    "direct_app": {**summary(app_direct), "bytes": app_size},
                    "direct_envoy": summary(envoy_direct),
                    "merged": {**summary(merged_app), "bytes": merged_app_size},
                    "ratio_median_vs_slower": statistics.median(merged_app) / slower,
                    "ratio_p99_vs_slower": summary(merged_app)["p99_ms"] / slower_p99,
                }
            # 3. Memory with a 100,000-line application source.
            with (
                child("app", "--port", str(app_port), "--lines", "100000"),
                child("serve", "--status-port", str(agent_port), "--app-port", str(app_port), *common) as agent,
            ):
                # Idle = the agent started and serving nothing yet (so first-scrape costs count as "above idle").
                time.sleep(0.5)
                body_size: list[int] = []

                def scrape_big() -> None:
                    for accept in ("text/plain", PROMETHEUS_ACCEPT) * 5:
                        _, size = scrape_times(agent_port, "/stats/prometheus", 1, accept)
                        body_size.append(size)

                idle, peak = peak_rss_during(agent.pid, scrape_big)
                results["memory_100k_line_app"] = {
                    "idle_rss_mib": idle / 2**20,
                    "peak_rss_mib": peak / 2**20,
                    "above_idle_mib": (peak - idle) / 2**20,
                    "merged_bytes": max(body_size),
                    "scrapes": len(body_size),
                }
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode")
    serve = sub.add_parser("serve")
    serve.add_argument("--status-port", type=int, required=True)
    serve.add_argument("--envoy-prom-port", type=int, required=True)
    serve.add_argument("--admin-port", type=int, required=True)
    serve.add_argument("--app-port", type=int, default=0)
    serve.add_argument("--no-envoy", action="store_true", help="PILOT_AGENT_MERGE_ENVOY_STATS=false")
    app = sub.add_parser("app")
    app.add_argument("--port", type=int, required=True)
    app.add_argument("--lines", type=int, required=True)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.mode == "serve":
        serve_agent(args)
    elif args.mode == "app":
        serve_app(args)
    else:
        results = run_bench(args)
        text = json.dumps(results, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
