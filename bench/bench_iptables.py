"""Benchmark of traffic capture: rule generation, rule application, and the latency Envoy capture adds.

Run as root from the repository root:

    /work/venv/bin/python -m bench.bench_iptables [--seconds 5] [--runs 10]

It builds a pod namespace and a client namespace (tests/support/netns.py), so every figure comes from one run on
one machine, with its baseline measured alongside:

* generate: `build_rules` + restore text for the injector's default arguments (pure Python), per call;
* apply: `pilot-agent istio-iptables <injector args>` as istio-init runs it (a new process each time), against the
  floor of the same restore text fed straight to `iptables-restore --noflush`; also the no-op second run and
  `--cleanup-only`;
* latency: wrk from the client namespace to the application's port 8080 (captured: iptables REDIRECT -> Envoy
  15006 -> app) and to port 15020 of the same application process (excluded by `-d`: straight to the app).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable

from agent.iptables.config import HostFacts, build_config
from agent.iptables.rules import build_rules, restore_text
from tests.iptables.conftest import INJECTOR_ARGS
from tests.support.netns import PodNetwork, pod_network, sidecar_envoy_config

APP_PORT = 8080
DIRECT_PORT = 15020


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def bench_generate(iterations: int = 2000) -> float:
    given = {"istio_inbound_ports": "*", "istio_local_exclude_ports": "15090,15021,15020", "istio_service_cidr": "*"}
    cfg = build_config(given, {}, HostFacts())
    start = time.perf_counter()
    for _ in range(iterations):
        restore_text(build_rules(cfg).v4)
    return (time.perf_counter() - start) / iterations


def bench_apply(pod: PodNetwork, runs: int) -> dict[str, float]:
    cfg = build_config({"istio_inbound_ports": "*", "istio_service_cidr": "*"}, {}, HostFacts())
    text = restore_text(build_rules(cfg).v4)
    results: dict[str, list[float]] = {"dry_run": [], "apply": [], "noop": [], "cleanup": [], "raw_restore": []}
    for _ in range(runs):
        # Same process start-up and imports as a real run, no iptables: what the apply step itself costs is the
        # difference.
        results["dry_run"].append(_timed(lambda: _ok(pod.pilot_agent(*INJECTOR_ARGS, "-n"))))
        results["apply"].append(_timed(lambda: _ok(pod.pilot_agent(*INJECTOR_ARGS))))
        results["noop"].append(_timed(lambda: _ok(pod.pilot_agent(*INJECTOR_ARGS))))
        results["cleanup"].append(_timed(lambda: _ok(pod.pilot_agent(*INJECTOR_ARGS, "--cleanup-only"))))
        results["raw_restore"].append(_timed(lambda: _ok(pod.run(["iptables-restore", "--noflush"], stdin=text))))
        _ok(pod.pilot_agent(*INJECTOR_ARGS, "--cleanup-only"))
    return {name: statistics.median(values) for name, values in results.items()}


def _ok(done: object) -> None:
    code = getattr(done, "returncode", 1)
    if code != 0:
        raise SystemExit(f"command failed: {getattr(done, 'args', '')}: {getattr(done, 'stderr', '')}")


def wrk(pod: PodNetwork, port: int, seconds: int, connections: int) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://{pod.pod_ip}:{port}/"]
    done = pod.run(argv, ns="client", timeout=seconds + 30)
    _ok(done)
    out = done.stdout

    def find(pattern: str) -> str:
        match = re.search(pattern, out, re.MULTILINE)
        if match is None:
            raise SystemExit(f"unexpected wrk output (no {pattern!r}):\n{out}")
        return match.group(1)

    return {
        "rps": float(find(r"Requests/sec:\s+([\d.]+)")),
        "avg_ms": _ms(find(r"^\s+Latency\s+(\S+)")),
        "p50_ms": _ms(find(r"^\s+50%\s+(\S+)")),
        "p99_ms": _ms(find(r"^\s+99%\s+(\S+)")),
    }


def _ms(value: str) -> float:
    number = float(re.sub(r"[a-z]+$", "", value))
    unit = value[len(re.sub(r"[a-z]+$", "", value)) :]
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per measurement")
    parser.add_argument("--runs", type=int, default=10, help="apply/cleanup repetitions")
    args = parser.parse_args(argv)

    print(f"generate default rule set: {bench_generate() * 1e6:.1f} us per call")
    with pod_network(prefix="bench") as pod:
        applied = bench_apply(pod, args.runs)
        print(f"apply (pilot-agent istio-iptables, new process, median of {args.runs}):")
        for name in ("dry_run", "apply", "noop", "cleanup", "raw_restore"):
            print(f"  {name:12s} {applied[name] * 1000:8.1f} ms")
        work = applied["apply"] - applied["dry_run"]
        print(f"  apply minus dry-run (the iptables work): {work * 1000:.1f} ms")
        print(f"  that work / raw iptables-restore: {work / applied['raw_restore']:.1f}x")

        _ok(pod.pilot_agent(*INJECTOR_ARGS))
        with pod.app([APP_PORT, DIRECT_PORT], uid=1000), pod.envoy(sidecar_envoy_config(pod.workdir)) as envoy:
            for connections in (1, 16):
                direct = wrk(pod, DIRECT_PORT, args.seconds, connections)
                captured = wrk(pod, APP_PORT, args.seconds, connections)
                print(f"latency, {connections} connection(s), {args.seconds}s each (wrk from the client namespace):")
                for label, row in (("direct to app :15020", direct), ("captured via Envoy :8080", captured)):
                    print(
                        f"  {label:26s} avg {row['avg_ms']:.3f} ms  p50 {row['p50_ms']:.3f} ms  "
                        f"p99 {row['p99_ms']:.3f} ms  {row['rps']:.0f} req/s"
                    )
                print(
                    f"  captured/direct: avg {captured['avg_ms'] / direct['avg_ms']:.2f}x, "
                    f"p50 {captured['p50_ms'] / direct['p50_ms']:.2f}x, added p50 "
                    f"{(captured['p50_ms'] - direct['p50_ms']) * 1000:.0f} us, "
                    f"throughput {captured['rps'] / direct['rps']:.2f}x"
                )
            print(f"  (Envoy inbound requests served: {envoy.stat('http.inbound.downstream_rq_total')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
