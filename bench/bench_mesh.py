"""The mesh side, measured against baselines taken in the same run.

    .venv/bin/python -m bench.bench_mesh [--runs 5] [--swaps 5] [--json out.json]     # as root (namespaces)

1. Start to ready against a real istiod (tests/support/mesh_pod.py: Istio's pilot-discovery without Kubernetes, the
   pod harness with deploy/sidecar.yaml, istio-init's capture): this agent vs Istio's own agent in the same pod,
   alternating; from istio-proxy's start to 15021 answering 200 (Envoy configured by istiod, the workload certificate
   CSR'd and served over SDS). The agent process's RSS once ready, and Envoy's, for both.
2. Certificate change to the new certificate served, on loopback: the certificate files rewritten (key, then chain,
   each by rename) and TLS handshakes to an mTLS listener until it presents the new serial. SDS push (the agent's mesh
   mode with a fake istiod: ./etc/certs served as SDS `default` to the running Envoy) vs hot restart (the agent's
   --local-xds-dir mode, the listener reading the files named by ISTIO_META_TLS_SERVER_*, which are hot-restart
   dependencies there: a new Envoy epoch). Same agent, same Envoy, same listener.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from google.protobuf import json_format

from bench.bench_vs_istio import MIB, Results, table
from tests.bootstrap.test_default_bootstrap_live import quiet_ports
from tests.differential.test_istiod_baseline import APP_CONFIG
from tests.supervisor.agent_process import ROOT, agent_env, envoys_of
from tests.support.envoy import http_get, new_base_id, shm_segment, wait_until
from tests.support.fake_istiod import mtls_listener
from tests.support.mesh_agent import mesh_pod, wait_ready
from tests.support.mesh_pki import MeshCa, serial_of, served_certificate
from tests.support.mesh_pod import PYTHON_AGENT, istio_agent_image, istiod_sidecar_pod

KINDS = ("istio", "python")
IDENTITY = "spiffe://cluster.local/ns/bench/sa/server"


def _rss(pid: int | None) -> float:
    return psutil.Process(pid).memory_info().rss / MIB if pid else float("nan")


def start_to_ready(kind: str, results: Results) -> None:
    image = istio_agent_image() if kind == "istio" else PYTHON_AGENT
    with (
        tempfile.TemporaryDirectory(prefix="bench-mesh-") as work,
        istiod_sidecar_pod(Path(work), config={"app.yaml": APP_CONFIG}, image=image) as mesh,
    ):
        rows = results[kind]
        rows.setdefault("istio-proxy start to ready, real istiod|ms", []).append(
            (mesh.ready_at - mesh.proxy_started) * 1000
        )
        agent = mesh.proxy.pid1
        envoy = [p for p in psutil.Process(agent).children(recursive=True) if p.name() == "envoy"] if agent else []
        rows.setdefault("agent RSS once ready (xDS proxy, SDS, CA client running)|MiB", []).append(_rss(agent))
        rows.setdefault("Envoy RSS once ready|MiB", []).append(_rss(envoy[0].pid) if envoy else float("nan"))


# -- certificate change to served -----------------------------------------------------------------------------------


def _write_certs(root: Path, chain: bytes, key: bytes, ca: MeshCa) -> None:
    certs = root / "etc/certs"
    certs.mkdir(parents=True, exist_ok=True)
    for name, data in (("root-cert.pem", ca.root_pem), ("key.pem", key), ("cert-chain.pem", chain)):
        tmp = certs / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(certs / name)


def _swap(root: Path, port: int, ca: MeshCa) -> float:
    """Seconds from the new chain landing in ./etc/certs to the listener presenting it."""
    chain, key = ca.workload(IDENTITY)
    _write_certs(root, chain, key, ca)
    started = time.monotonic()
    wanted = serial_of(chain)
    while serial_of(served_certificate(port, ca)) != wanted:
        if time.monotonic() - started > 30:
            raise AssertionError("the new certificate was not served within 30 s")
        time.sleep(0.002)
    return time.monotonic() - started


@contextmanager
def sds_agent() -> Iterator[tuple[Path, int, MeshCa]]:
    def prepare(root: Path, ca: MeshCa) -> None:
        _write_certs(root, *ca.workload(IDENTITY), ca)

    with mesh_pod(prepare=prepare) as pod:
        wait_ready(pod)
        yield pod.root, pod.ports["mtls"], pod.ca


def _file_tls_listener(port: int, certs: Path) -> dict[str, Any]:
    """The same mTLS listener, reading the certificate files itself (what hot restart serves)."""
    listener: dict[str, Any] = json_format.MessageToDict(mtls_listener("inbound", port, "hello"))
    tls = listener["filterChains"][0]["transportSocket"]["typedConfig"]
    tls["commonTlsContext"] = {
        "tlsCertificates": [
            {
                "certificateChain": {"filename": str(certs / "cert-chain.pem")},
                "privateKey": {"filename": str(certs / "key.pem")},
            }
        ],
        "validationContext": {"trustedCa": {"filename": str(certs / "root-cert.pem")}},
    }
    return {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}


@contextmanager
def hot_restart_agent() -> Iterator[tuple[Path, int, MeshCa]]:
    root = Path(tempfile.mkdtemp(prefix="bench-hr-", dir="/tmp"))
    ca = MeshCa()
    _write_certs(root, *ca.workload(IDENTITY), ca)
    ports = quiet_ports("admin", "status", "envoy_status", "prom", "mtls")
    xds = root / "xds"
    xds.mkdir()
    listener = _file_tls_listener(ports["mtls"], root / "etc/certs")
    (xds / "lds.yaml").write_text(json.dumps({"resources": [listener]}))  # JSON is YAML
    (xds / "cds.yaml").write_text("resources: []\n")
    base_id = new_base_id()
    # Files named by ISTIO_META_TLS_* are hot-restart dependencies of the agent without the mesh side (as /etc/certs
    # is; the bench keeps off the machine's /etc).
    certs = root / "etc/certs"
    meta = {
        "ISTIO_META_TLS_SERVER_CERT_CHAIN": str(certs / "cert-chain.pem"),
        "ISTIO_META_TLS_SERVER_KEY": str(certs / "key.pem"),
        "ISTIO_META_TLS_SERVER_ROOT_CERT": str(certs / "root-cert.pem"),
    }
    env = {**agent_env(root, base_id, ports, **meta), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "agent", "proxy", "sidecar", "--local-xds-dir", str(xds), "--meshConfig", "none"]
    with (root / "agent.log").open("wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        status = f"http://127.0.0.1:{ports['status']}/healthz/ready"
        wait_until(lambda: proc.poll() is not None or http_get(status)[0] == 200, timeout=30)
        assert proc.poll() is None, (root / "agent.log").read_text()[-3000:]
        yield root, ports["mtls"], ca
    finally:
        proc.kill()
        proc.wait()
        for envoy in envoys_of(base_id):
            envoy.kill()
        shm_segment(base_id).unlink(missing_ok=True)


CERT_MODES: dict[str, Callable[[], Any]] = {"hot restart": hot_restart_agent, "SDS push": sds_agent}


def cert_change(mode: str, swaps: int, gap: float, results: Results) -> None:
    """`swaps` changes, `gap` seconds apart: a hot restart must wait for the previous epoch to finish its
    parentShutdownDuration (2 s here) before the next one; the SDS push gets the same spacing."""
    with CERT_MODES[mode]() as (root, port, ca):
        for _ in range(swaps):
            time.sleep(gap)
            results[mode].setdefault("certificate change to served|ms", []).append(_swap(root, port, ca) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="pod starts per agent (alternating)")
    parser.add_argument("--swaps", type=int, default=5, help="certificate changes per mode and run")
    parser.add_argument("--gap", type=float, default=2.5, help="seconds between certificate changes")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    results: Results = {kind: {} for kind in (*KINDS, *CERT_MODES)}
    for run in range(args.runs):
        for kind in KINDS if run % 2 == 0 else tuple(reversed(KINDS)):
            start_to_ready(kind, results)
        for mode in CERT_MODES if run % 2 == 0 else tuple(reversed(CERT_MODES)):
            cert_change(mode, args.swaps, args.gap, results)
    print(table({"istio": results["istio"], "python": results["python"]}))
    print()
    restart = results["hot restart"]["certificate change to served|ms"]
    push = results["SDS push"]["certificate change to served|ms"]
    print("| certificate change to served | median | p95 | min |")
    print("|---|---|---|---|")
    for name, values in (("hot restart (new epoch)", restart), ("SDS push (same Envoy)", push)):
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        print(f"| {name} | {statistics.median(values):.0f} ms | {p95:.0f} ms | {ordered[0]:.0f} ms |")
    print(f"\nSDS push / hot restart (medians): {statistics.median(push) / statistics.median(restart):.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
