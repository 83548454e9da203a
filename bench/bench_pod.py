"""The whole pod (deploy/no-control-plane.yaml in the pod harness): start time against Envoy's own start, and the
requests served and failed through a certificate rotation and through a pod deletion.

    sudo .venv/bin/python -m bench.bench_pod [--runs 5] [--threads 8] [--in-flight 32]

Pod start, per run: istio-init started -> 15021 answers 200 from the node side (polled every 10 ms, not kubelet's
1 s startup period) and -> the first client request captured into Envoy answered 200. Split: istio-proxy started
-> Envoy exec'd (its /proc start time, to 10 ms), -> Envoy's admin says LIVE (polled every 5 ms from inside the
pod), -> 15021 passes; and how much later than that LIVE the agent logged "Envoy epoch 0 is LIVE".
Baseline in the same run, in the same pod network namespace once the agent has exited: the Envoy binary started
directly (uid 1337) on the very bootstrap the agent rendered (envoy-rev0.json, copied), with the agent's command
line, -> admin /server_info LIVE and -> the first captured request answered 200.

Rotation, per run: `--threads` clients send GETs back to back (a new connection each) while the Secret volume is
updated (kubelet's ..data swap); load continues until 1 s after epoch 1 is LIVE. Deletion, per run: `--in-flight`
requests of 1 s are in the app when the pod is deleted (SIGTERM, terminationDrainDuration 2 s). Kill, per run:
Envoy SIGKILLed inside the pod; once it is reaped, `--threads` clients send requests until 15021 passes again
(polled every 10 ms): time to ready again, refused / served / lost.
Prints one JSON object; docs/benchmarks-pod-and-mesh.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from tests.support.envoy import envoy_binary, new_base_id, remove_shm, wait_until
from tests.support.pod import Pod
from tests.support.pod_run import (
    CERT_SECRET,
    RunningPod,
    get_once,
    http_text,
    in_netns,
    no_control_plane_pod,
    process_started_at,
    self_signed,
    summary,
    wait_ready,
)
from tests.support.probes import enter_netns


def _first_served(run: RunningPod, timeout: float = 30.0) -> float:
    """Monotonic time of the first 200 for a client request to podIP:8080 (captured into Envoy)."""

    def poll() -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if get_once(run.net.pod_ip, 8080, "/", 1.0).ok:
                return time.monotonic()
            time.sleep(0.005)
        raise AssertionError("no request served")

    return in_netns(run.client_ns, poll)


def _envoy_direct(run: RunningPod, bootstrap: Path, argv: list[str]) -> tuple[float, float]:
    """Envoy on the agent's bootstrap and command line, in the pod netns: (to LIVE, to first request served)."""
    base_id = new_base_id()
    args = list(argv)
    config_at = args.index("-c") + 1
    args[config_at] = str(bootstrap)
    args[args.index("--base-id") + 1] = str(base_id)
    started = time.monotonic()
    process = run.net.popen([envoy_binary(), *args[1:]], uid=1337, gid=1337, log_name="envoy-direct.log")
    try:

        def live() -> float:
            while True:
                assert process.popen.poll() is None, process.log()[-2000:]
                try:
                    status, body = http_text("http://127.0.0.1:15000/server_info", 1.0)
                    if status == 200 and json.loads(body).get("state") == "LIVE":
                        return time.monotonic()
                except OSError:
                    pass
                time.sleep(0.005)

        live_at = in_netns(run.pod_ns, live)
        served_at = _first_served(run)
        return live_at - started, served_at - started
    finally:
        process.stop()
        remove_shm(base_id)


def _log_time(log: str, needle: str) -> float:
    """The wall-clock time (epoch seconds) of the agent's first log line containing `needle`."""
    line = next(ln for ln in log.splitlines() if needle in ln)
    stamp = datetime.strptime(line.split("\t", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return stamp.timestamp()


def pod_start(workdir: Path) -> dict[str, float]:
    with no_control_plane_pod("bps") as run:
        served_at = _first_served(run)
        # The agent logs in wall-clock time; the harness measures in monotonic time.
        proxy_started_wall = time.time() - (time.monotonic() - run.proxy_started)
        agent_saw_live = _log_time(run.proxy.log_text(), "Envoy epoch 0 is LIVE") - proxy_started_wall
        [envoy] = run.proxy.named("envoy")
        exec_at = process_started_at(envoy)
        assert run.envoy_live_at is not None
        argv = Path(f"/proc/{envoy}/cmdline").read_bytes().decode().split("\0")[:-1]
        bootstrap = workdir / "envoy-rev0.json"
        shutil.copy(run.pod.path("/etc/istio/proxy/envoy-rev0.json"), bootstrap)
        os.chmod(bootstrap, 0o644)
        run.pod.delete(grace_s=10)
        envoy_live, envoy_served = _envoy_direct(run, bootstrap, argv)
    return {
        "init_s": run.init_done - run.init_started,
        "proxy_to_ready_s": run.ready_at - run.proxy_started,
        "proxy_to_envoy_exec_s": exec_at - run.proxy_started,
        "envoy_exec_to_live_in_pod_s": run.envoy_live_at - exec_at,
        "envoy_live_to_ready_s": run.ready_at - run.envoy_live_at,
        "agent_saw_live_late_by_s": agent_saw_live - (run.envoy_live_at - run.proxy_started),
        "pod_to_ready_s": run.ready_at - run.init_started,
        "pod_to_served_s": served_at - run.init_started,
        "envoy_to_live_s": envoy_live,
        "envoy_to_served_s": envoy_served,
    }


def _cert_env(pod: Pod) -> dict[str, str]:
    certs = pod.path("/etc/certs")
    return {
        "ISTIO_META_TLS_CLIENT_CERT_CHAIN": str(certs / "cert-chain.pem"),
        "ISTIO_META_TLS_CLIENT_KEY": str(certs / "key.pem"),
        "ISTIO_META_TLS_CLIENT_ROOT_CERT": str(certs / "root-cert.pem"),
    }


def rotation(workdir: Path, threads: int) -> dict[str, int | float]:
    first, second = self_signed("echo", workdir), self_signed("echo-rotated", workdir)
    with no_control_plane_pod("bpr", secrets={CERT_SECRET: first}, env=_cert_env) as run:
        with run.load(threads=threads, timeout=5) as load:
            time.sleep(1.0)
            swapped = time.monotonic()
            run.pod.update_secret(CERT_SECRET, second)
            wait_until(lambda: run.envoy_epoch() == (1, "LIVE"), timeout=20, interval=0.01)
            live = time.monotonic()
            time.sleep(1.0)
        outcomes = load.outcomes
    result: dict[str, int | float] = {**summary(outcomes), "swap_to_epoch1_live_s": round(live - swapped, 3)}
    result["over_1s"] = sum(1 for o in outcomes if o.ended - o.started > 1.0)
    return result


def deletion(in_flight: int) -> dict[str, int | float]:
    drain = {"proxy.istio.io/config": "terminationDrainDuration: 2s\n"}
    with no_control_plane_pod("bpd", annotations=drain) as run:
        with ThreadPoolExecutor(in_flight, initializer=enter_netns, initargs=(run.client_ns,)) as pool:
            futures = [pool.submit(get_once, run.net.pod_ip, 8080, "/sleep/1000", 10.0) for _ in range(in_flight)]
            wait_until(lambda: run.connections_to(8080) >= in_flight, timeout=10)
            termination = run.pod.delete()["istio-proxy"]
            outcomes = [f.result() for f in futures]
        left = len(run.proxy.processes())
    return {
        **summary(outcomes),
        "exit_code": -1 if termination.exit_code is None else termination.exit_code,
        "termination_s": round(termination.seconds, 3),
        "processes_left": left,
    }


def envoy_killed(threads: int) -> dict[str, int | float]:
    """SIGKILL to Envoy inside the pod: time until 15021 passes again; requests while it was away."""
    with no_control_plane_pod("bpk") as run:
        [envoy] = run.proxy.named("envoy")
        killed = time.monotonic()
        os.kill(envoy, signal.SIGKILL)
        while Path(f"/proc/{envoy}").exists():  # reaped: its sockets are closed
            time.sleep(0.001)
        with run.load(threads=threads, timeout=5) as load:
            ready = wait_ready(run.net, timeout=30)
            time.sleep(0.2)
        outcomes = load.outcomes
    return {
        **summary(outcomes),
        "ready_again_s": round(ready - killed, 3),
        "lost": sum(1 for o in outcomes if o.lost),
        "refused_after_ready": sum(1 for o in outcomes if o.started > ready and not o.ok),
    }


SCENARIOS = ("start", "rotation", "deletion", "kill")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {SCENARIOS}")
    args = parser.parse_args()
    wanted = set(args.scenarios.split(","))
    if os.geteuid() != 0:
        raise SystemExit("bench_pod: needs root (network and PID namespaces, iptables)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-pod-"))
    os.chmod(workdir, 0o755)
    try:
        runs = range(args.runs)
        starts = [pod_start(workdir) for _ in runs] if "start" in wanted else []
        rotations = [rotation(workdir, args.threads) for _ in runs] if "rotation" in wanted else []
        deletions = [deletion(args.in_flight) for _ in runs] if "deletion" in wanted else []
        kills = [envoy_killed(args.threads) for _ in runs] if "kill" in wanted else []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report: dict[str, object] = {"runs": args.runs}
    if starts:
        medians = {key: round(statistics.median(s[key] for s in starts), 3) for key in starts[0]}
        report["pod_start_median"] = medians
        report["ratio_pod_ready_vs_envoy_live"] = round(medians["pod_to_ready_s"] / medians["envoy_to_live_s"], 2)
        report["ratio_pod_served_vs_envoy_served"] = round(medians["pod_to_served_s"] / medians["envoy_to_served_s"], 2)
        report["pod_start_runs"] = [{k: round(v, 3) for k, v in s.items()} for s in starts]
    for name, results in (("rotation", rotations), ("deletion", deletions), ("kill", kills)):
        if results:
            report[name] = results
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
