"""Two checkouts of this repository side by side: start and memory of the agent in a mesh pod and without a control
plane, alternating runs, to measure a change against what it changes (before/after in the same run).

    .venv/bin/python -m bench.bench_checkouts --runs 7 before=/path/to/old/checkout after=.    # as root

Each checkout's `agent` package runs (PYTHONPATH=<checkout>) with this checkout's venv, Envoy and harnesses:
1. mesh: tests/support/mesh_agent.py's pod on loopback (the real agent and Envoy, a FAKE istiod with a CA: ECDSA
   keys, loopback TLS), from the agent's start to /healthz/ready 200; then, 1 s later, the agent's RSS, anonymous
   memory (/proc/<pid>/smaps_rollup) and threads. The real-istiod comparison with Istio's agent is bench_mesh.
2. no control plane: bench_startup's rig (`proxy router --local-xds-dir`): start to Envoy LIVE, to ready, ready
   after LIVE, RSS and threads 0.5 s after ready.
Prints one table of medians and the ratio of the last checkout to the first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

import bench.bench_startup as startup
from tests.support import mesh_agent

Sample = dict[str, float]


def _smaps(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return fields


def mesh_run(checkout: Path) -> Sample:
    vars(mesh_agent)["ROOT"] = checkout  # the pod's PYTHONPATH (mesh_pod reads the module's ROOT at each call)
    started = time.monotonic()
    with mesh_agent.mesh_pod() as pod:
        mesh_agent.wait_ready(pod, timeout=60)
        ready = time.monotonic() - started
        time.sleep(1.0)
        memory = _smaps(pod.proc.pid)
        threads = psutil.Process(pod.proc.pid).num_threads()
    return {
        "start to ready (ms)": ready * 1000,
        "RSS once ready (MiB)": memory["Rss"] / 1024,
        "anonymous (MiB)": memory["Anonymous"] / 1024,
        "threads": threads,
    }


def no_control_plane_run(checkout: Path) -> Sample:
    startup.ROOT = checkout  # the agent's PYTHONPATH
    work = Path(tempfile.mkdtemp(prefix="bench-checkouts-"))
    try:
        rig = startup.AgentRig(work, base_id=os.getpid() % 1000 + 7200)
        with startup.running_agent(rig) as (proc, started):
            live = startup.wait_live(rig.admin) - started
            ready = startup.wait_ready(rig.status) - started
            time.sleep(0.5)
            process = psutil.Process(proc.pid)
            rss, threads = process.memory_info().rss, process.num_threads()
        return {
            "start to Envoy LIVE (ms)": live * 1000,
            "start to ready (ms)": ready * 1000,
            "ready after LIVE (ms)": (ready - live) * 1000,
            "RSS once ready (MiB)": rss / 2**20,
            "threads": threads,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


MODES: dict[str, Callable[[Path], Sample]] = {"mesh": mesh_run, "no control plane": no_control_plane_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per checkout and mode (alternating)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("checkouts", nargs=2, metavar="NAME=PATH", help="two checkouts, the baseline first")
    args = parser.parse_args()
    checkouts = [(name, Path(path).resolve()) for name, path in (item.split("=", 1) for item in args.checkouts)]
    modes = args.modes.split(",")
    results: dict[str, dict[str, list[float]]] = {}
    for run in range(args.runs):
        for name, path in checkouts if run % 2 == 0 else checkouts[::-1]:
            for mode in modes:
                sample = MODES[mode](path)
                for measure, value in sample.items():
                    results.setdefault(f"{mode}: {measure}", {}).setdefault(name, []).append(value)
                print(run, name, mode, {k: round(v, 1) for k, v in sample.items()}, flush=True)
    (first, _), (last, _) = checkouts
    print(f"\nload average {os.getloadavg()[0]:.2f}\n")
    print(f"| measure (median of {args.runs}) | {first} | {last} | {last} / {first} |")
    print("|---|---|---|---|")
    for measure, by_name in results.items():
        a, b = statistics.median(by_name[first]), statistics.median(by_name[last])
        print(f"| {measure} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
