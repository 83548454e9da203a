"""Supervisor benchmarks, each against a baseline measured in the same run:

(a) wrk through an Envoy listener while the agent performs >= 20 hot restarts triggered by cert file swaps:
    failed requests and requests served;
(b) cert swap -> new epoch LIVE (median, p95), quiet machine, beside Envoy's own cold start to LIVE;
(c) Envoy SIGKILLed -> LIVE again;
(d) the agent's CPU and memory over 60 s idle with Envoy running.

    /work/venv/bin/python -m bench.bench_supervisor [--restarts 20] [--swaps 10] [--kills 5] [--idle 60]

The agent is the real `pilot-agent proxy router` subprocess (Istio bootstrap template, local xDS directory). Cert
files are named by ISTIO_META_TLS_SERVER_{CERT_CHAIN,KEY}, so they are watched and hashed into the desired state.
drainDuration 1s, parentShutdownDuration 2s (Istio's defaults, 45s/60s, would make 20 restarts take 20 minutes:
the next epoch waits for the previous parent to exit). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.bench_startup import (
    AgentRig,
    direct_envoy_start,
    envoy_child,
    live_epoch,
    running_agent,
    summary,
    wait_live,
)
from tests.supervisor.harness import make_cert


def envoy_count(agent: subprocess.Popen[bytes]) -> int:
    """Running Envoy epochs (not `--mode validate` runs, which come and go, nor zombies)."""
    count = 0
    for child in psutil.Process(agent.pid).children():
        try:
            if "envoy" in child.name() and child.status() != "zombie" and "validate" not in child.cmdline():
                count += 1
        except psutil.NoSuchProcess:
            continue  # a validation that just ended
    return count


def settle(agent: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait until only one epoch runs (the previous parent retired), so the next swap is not coalesced."""
    deadline = time.monotonic() + timeout
    while envoy_count(agent) != 1:
        if time.monotonic() > deadline:
            raise TimeoutError("previous epoch did not retire")
        time.sleep(0.02)


def swap_and_time(agent: subprocess.Popen[bytes], rig: AgentRig, certs: Path, epoch: int, name: str) -> float:
    settle(agent)
    make_cert(certs, name)
    swapped = time.monotonic()
    return wait_live(rig.admin, epoch=epoch, timeout=30) - swapped


def parse_wrk(output: str) -> dict[str, int]:
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_errors = sum(int(x) for x in errors.groups()) if errors else 0
    return {
        "requests": requests,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": socket_errors,
        "failed": (int(non2xx.group(1)) if non2xx else 0) + socket_errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--cold", type=int, default=10)
    # 0 skips that part (e.g. --restarts 0 --kills 0 --idle 0: the quiet swaps against Envoy's cold start only).
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-supervisor-"))
    certs = work / "certs"
    make_cert(certs, "initial")
    extra = {
        "ISTIO_META_TLS_SERVER_CERT_CHAIN": str(certs / "cert-chain.pem"),
        "ISTIO_META_TLS_SERVER_KEY": str(certs / "key.pem"),
        "ENVOY_HEALTHY_PERIOD": "1s",
    }
    result: dict[str, object] = {}
    try:
        rig = AgentRig(work, base_id=os.getpid() % 1000 + 8000)
        # Baseline: Envoy alone on the agent's own command line and bootstrap.
        with running_agent(rig, **extra) as (agent, _):
            wait_live(rig.admin)
            argv = envoy_child(agent).cmdline()
            index = argv.index("-c") + 1
            shutil.copy(argv[index], work / "direct.json")
            argv[index] = str(work / "direct.json")
        time.sleep(0.5)
        cold = [direct_envoy_start(argv, rig.admin, rig.base_id) for _ in range(args.cold)]
        result["envoy_cold_start_to_live"] = summary(cold)

        with running_agent(rig, **extra) as (agent, _):
            wait_live(rig.admin)
            time.sleep(0.5)  # the watcher is up
            epoch = 0
            # (b) quiet swaps.
            swaps = []
            for i in range(args.swaps):
                epoch += 1
                swaps.append(swap_and_time(agent, rig, certs, epoch, f"quiet-{i}"))
            result["cert_swap_to_new_epoch_live"] = summary(swaps)
            result["swap_vs_cold_start_median_ratio"] = round(
                summary(swaps)["median_ms"] / summary(cold)["median_ms"], 2
            )
            if args.restarts:
                # (a) the same under wrk load.
                wrk = subprocess.Popen(
                    ["wrk", "-t1", "-c8", "-d600s", f"http://127.0.0.1:{rig.app}/"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                time.sleep(1.0)
                loaded = []
                for i in range(args.restarts):
                    epoch += 1
                    loaded.append(swap_and_time(agent, rig, certs, epoch, f"load-{i}"))
                settle(agent)
                wrk.send_signal(signal.SIGINT)
                output = wrk.communicate(timeout=30)[0].decode()
                result["wrk_during_hot_restarts"] = {"hot_restarts": args.restarts, **parse_wrk(output)}
                result["cert_swap_to_new_epoch_live_under_load"] = summary(loaded)
            if args.kills:
                # (c) SIGKILL -> LIVE again (a fresh family: epoch 0). Healthy period 1 s: each kill meets the 200 ms
                # first backoff step.
                kills = []
                for _ in range(args.kills):
                    time.sleep(1.5)
                    victim = envoy_child(agent)
                    victim.kill()
                    killed = time.monotonic()
                    while live_epoch(rig.admin) is not None and victim.is_running() and victim.status() != "zombie":
                        time.sleep(0.005)
                    kills.append(wait_live(rig.admin, epoch=0) - killed)
                result["sigkill_to_live"] = summary(kills)
                result["sigkill_to_live_minus_backoff_median_ms"] = round(summary(kills)["median_ms"] - 200, 1)
            if args.idle:
                # (d) idle.
                time.sleep(2)
                me = psutil.Process(agent.pid)
                cpu0, rss0, t0 = me.cpu_times(), me.memory_info().rss, time.monotonic()
                samples = [rss0]
                while time.monotonic() - t0 < args.idle:
                    time.sleep(min(5.0, args.idle))
                    samples.append(me.memory_info().rss)
                cpu1, elapsed = me.cpu_times(), time.monotonic() - t0
                used = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
                result["agent_idle"] = {
                    "seconds": round(elapsed, 1),
                    "cpu_percent": round(100 * used / elapsed, 3),
                    "rss_mib_start": round(rss0 / 2**20, 1),
                    "rss_mib_end": round(samples[-1] / 2**20, 1),
                    "rss_mib_max": round(max(samples) / 2**20, 1),
                }
            agent.send_signal(signal.SIGTERM)
            result["agent_exit_code_after_sigterm"] = agent.wait(30)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"agent log was in {work}/agent.log (removed)", file=sys.stderr)


if __name__ == "__main__":
    main()
