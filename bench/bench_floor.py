"""The floor under the start-up and memory goals: what a CPython process pays merely to load the libraries the agent
is built on, before any agent code runs, against Envoy started alone, in the same run.

    .venv/bin/python -m bench.bench_floor [--runs 9]

Each stage is a fresh interpreter of this venv (`python -c "import ..."`, the site packages as the agent has them)
that imports a cumulative set of modules and reports its own import time (wall, `time.perf_counter`) and its
resident memory (`/proc/self/status` VmRSS and RssAnon). The interpreter alone (`python -c pass`, from the exec)
and Envoy alone (exec of the agent's Envoy on a minimal bootstrap -> admin /server_info LIVE) are the baselines.
aiohttp is imported as the agent imports it (agent.aiohttp_import: its client contexts without the CA bundle).
Runs alternate the stages so machine noise hits each alike; medians. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_startup import direct_envoy_start
from tests.support.envoy import envoy_binary, free_port, new_base_id

ROOT = Path(__file__).resolve().parents[1]

# Cumulative: each stage adds to the previous one. "before exec" is what a render needs; "to ready" what the status
# server needs on top; "all" every prescribed library the running agent holds; "mesh" adds the xDS/SDS side.
STAGES = {
    "before exec (logging, dataclasses, jinja2, PyYAML, psutil)": "logging,dataclasses,jinja2,yaml,psutil",
    "+ asyncio, aiohttp (status server)": "asyncio,agent.aiohttp_import,aiohttp.web",
    "+ prometheus_client, watchdog, tenacity (all prescribed)": "prometheus_client,watchdog.observers,tenacity",
    "+ grpcio, protobuf (mesh side)": "grpc,grpc.aio,google.protobuf.descriptor_pool",
}

PROBE = """
import sys, time
t = time.perf_counter()
for name in sys.argv[1].split(","):
    if name:
        __import__(name)
elapsed = time.perf_counter() - t
fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(elapsed, int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0]))
"""


def probe(modules: str) -> tuple[float, float, float]:
    """(import seconds, RSS MiB, anonymous MiB) of a fresh interpreter that imported `modules`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, modules], check=True, capture_output=True, text=True, env=env)
    seconds, rss, anon = out.stdout.split()
    return float(seconds), int(rss) / 1024, int(anon) / 1024


def interpreter_start() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def envoy_alone(work: Path) -> float:
    """Envoy exec -> LIVE on a bootstrap with an admin port and nothing else."""
    admin, base_id = free_port(), new_base_id()
    bootstrap = work / "envoy.json"
    bootstrap.write_text(
        json.dumps({"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}})
    )
    argv = [envoy_binary(), "-c", str(bootstrap), "--base-id", str(base_id), "-l", "off", "--concurrency", "2"]
    return direct_envoy_start(argv, admin, base_id)


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def mib(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    cumulative = []
    modules = ""
    for name, added in STAGES.items():
        modules = f"{modules},{added}" if modules else added
        cumulative.append((name, modules))
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in cumulative}
    interpreter: list[float] = []
    envoy: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as work:
        for run in range(args.runs):
            interpreter.append(interpreter_start())
            for name, mods in cumulative:
                samples[name].append(probe(mods))
            envoy.append(envoy_alone(Path(work)))
            print(f"run {run}: envoy alone {envoy[-1] * 1000:.0f} ms", file=sys.stderr)
    stages = {
        name: {
            "import_ms": ms([s[0] for s in values]),
            "rss_mib": mib([s[1] for s in values]),
            "anon_mib": mib([s[2] for s in values]),
        }
        for name, values in samples.items()
    }
    names = list(stages)
    before_exec, to_ready = stages[names[0]], stages[names[1]]
    envoy_ms, interpreter_ms = ms(envoy), ms(interpreter)
    # Envoy LIVE within 100 ms of Envoy alone, readiness within 20 ms of LIVE: the whole agent start (interpreter,
    # the imports before the exec, those after it) in Envoy's own start + 120 ms, with Envoy starting on the other
    # core from the exec on. The libraries alone, no agent code:
    exec_at = interpreter_ms + before_exec["import_ms"]
    ready_at = exec_at + to_ready["import_ms"] - before_exec["import_ms"]
    result = {
        "runs": args.runs,
        "load_average": os.getloadavg()[0],
        "interpreter_start_ms": interpreter_ms,
        "envoy_alone_start_to_live_ms": envoy_ms,
        "stages": stages,
        "floor": {
            "exec_after_start_ms": round(exec_at, 1),
            "live_after_envoy_alone_ms": round(exec_at, 1),
            "ready_after_start_ms": round(ready_at, 1),
            "ready_after_live_ms": round(ready_at - (exec_at + envoy_ms), 1),
            "rss_all_prescribed_mib": stages[names[2]]["rss_mib"],
            "rss_with_mesh_libraries_mib": stages[names[3]]["rss_mib"],
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
