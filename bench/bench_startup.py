"""`pilot-agent proxy` start -> Envoy LIVE, against Envoy started directly on the same bootstrap, in the same run;
and the agent's resident memory once Envoy is LIVE and the agent serves readiness 200 (fully started: since the
agent execs Envoy before its heavy imports, Envoy may be LIVE before the agent has loaded everything).

    /work/venv/bin/python -m bench.bench_startup [--runs 7]

The agent runs as it does in a pod (a subprocess, `proxy router`, the Istio bootstrap template) with a local xDS
directory instead of istiod. "LIVE" is admin /server_info state LIVE, polled every 5 ms. Runs alternate agent and
direct so machine noise hits both alike. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.support.envoy import direct_response_lds, free_port, remove_shm

ROOT = Path(__file__).resolve().parents[1]


def server_info(admin_port: int, timeout: float = 0.5) -> dict[str, object] | None:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=timeout)
    try:
        conn.request("GET", "/server_info")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        info = json.loads(body)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def live_epoch(admin_port: int) -> int | None:
    info = server_info(admin_port)
    if info is None or info.get("state") != "LIVE":
        return None
    options = info.get("command_line_options")
    return int(options.get("restart_epoch", 0)) if isinstance(options, dict) else 0


def wait_live(admin_port: int, epoch: int = 0, timeout: float = 30.0, interval: float = 0.005) -> float:
    """Seconds until the Envoy on admin_port is LIVE at `epoch` (monotonic clock at return)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live_epoch(admin_port) == epoch:
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError(f"Envoy on admin port {admin_port} not LIVE at epoch {epoch} within {timeout}s")


def http_status(port: int, path: str, timeout: float = 0.5) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_ready(status_port: int, timeout: float = 30.0, interval: float = 0.005) -> float:
    """Monotonic time when the agent's /healthz/ready first answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_status(status_port, "/healthz/ready") == 200:
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError(f"agent on status port {status_port} not ready within {timeout}s")


@dataclass
class AgentRig:
    """A work directory and ports for one `pilot-agent proxy router` with a local xDS directory."""

    work: Path
    base_id: int
    admin: int = 0
    status: int = 0
    envoy_status: int = 0
    prom: int = 0
    app: int = 0

    def __post_init__(self) -> None:
        self.admin, self.status, self.envoy_status, self.prom, self.app = (free_port() for _ in range(5))
        xds = self.work / "xds"
        xds.mkdir(parents=True, exist_ok=True)
        (xds / "lds.yaml").write_text(direct_response_lds(self.app, body="hello"))
        (xds / "cds.yaml").write_text("resources: []\n")

    def env(self, **extra: str) -> dict[str, str]:
        proxy_config = {
            "configPath": str(self.work / "proxy"),
            "proxyAdminPort": self.admin,
            "statusPort": self.status,
            "terminationDrainDuration": "1s",
            "drainDuration": "1s",
            "parentShutdownDuration": "2s",
            "concurrency": 2,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG"))}
        env.update(
            PROXY_CONFIG=json.dumps(proxy_config),
            ENVOY_STATUS_PORT=str(self.envoy_status),
            ENVOY_PROMETHEUS_PORT=str(self.prom),
            ENVOY_BASE_ID=str(self.base_id),
            TERMINATION_LOG_PATH=str(self.work / "termination-log"),
            POD_NAME="bench",
            POD_NAMESPACE="bench",
            INSTANCE_IP="127.0.0.1",
            PYTHONPATH=str(ROOT),
            **extra,
        )
        return env

    def argv(self) -> list[str]:
        xds = str(self.work / "xds")
        return [sys.executable, "-m", "agent", "proxy", "router", "--local-xds-dir", xds, "--meshConfig", "/none"]


@contextlib.contextmanager
def running_agent(rig: AgentRig, **extra: str) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """Start the agent; yield (process, start time). On exit SIGTERM it and clean up its shm segment."""
    log = (rig.work / "agent.log").open("ab")
    started = time.monotonic()
    proc = subprocess.Popen(rig.argv(), env=rig.env(**extra), cwd=rig.work, stdout=log, stderr=log)
    try:
        yield proc, started
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait()
        log.close()
        remove_shm(rig.base_id)


def envoy_child(proc: subprocess.Popen[bytes]) -> psutil.Process:
    children = [p for p in psutil.Process(proc.pid).children() if "envoy" in p.name()]
    if not children:
        raise RuntimeError("agent has no Envoy child")
    return max(children, key=lambda p: p.create_time())


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values) * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "min_ms": round(ordered[0] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def direct_envoy_start(argv: list[str], admin_port: int, base_id: int) -> float:
    """Envoy alone, exec -> LIVE, on the agent's own command line and bootstrap."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return wait_live(admin_port) - started
    finally:
        proc.terminate()
        proc.wait(10)
        remove_shm(base_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        rig = AgentRig(work, base_id=os.getpid() % 1000 + 7000)
        agent_times: list[float] = []
        direct_times: list[float] = []
        ready_times: list[float] = []
        rss: list[int] = []
        envoy_argv: list[str] = []
        for run in range(args.runs):
            with running_agent(rig) as (proc, started):
                agent_times.append(wait_live(rig.admin) - started)
                ready_times.append(wait_ready(rig.status) - started)
                rss.append(psutil.Process(proc.pid).memory_info().rss)
                if not envoy_argv:
                    envoy_argv = envoy_child(proc).cmdline()
                    bootstrap = work / "direct.json"
                    config_index = envoy_argv.index("-c") + 1
                    shutil.copy(envoy_argv[config_index], bootstrap)
                    envoy_argv[config_index] = str(bootstrap)
            time.sleep(0.3)
            direct_times.append(direct_envoy_start(envoy_argv, rig.admin, rig.base_id))
            time.sleep(0.3)
            print(
                f"run {run}: agent {agent_times[-1] * 1000:.0f} ms (ready {ready_times[-1] * 1000:.0f} ms), "
                f"direct {direct_times[-1] * 1000:.0f} ms",
                file=sys.stderr,
            )
        agent_s, direct_s = summary(agent_times), summary(direct_times)
        result = {
            "agent_start_to_live": agent_s,
            "envoy_direct_start_to_live": direct_s,
            "agent_overhead_median_ms": round(agent_s["median_ms"] - direct_s["median_ms"], 1),
            "ratio_median": round(agent_s["median_ms"] / direct_s["median_ms"], 2),
            "agent_start_to_ready_200": summary(ready_times),
            # Goal: readiness follows Envoy's LIVE closely (per run: ready 200 minus LIVE).
            "ready_200_after_envoy_live": summary([r - a for a, r in zip(agent_times, ready_times, strict=True)]),
            "agent_rss_mib_once_ready": {
                "median": round(statistics.median(rss) / 2**20, 1),
                "max": round(max(rss) / 2**20, 1),
            },
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
