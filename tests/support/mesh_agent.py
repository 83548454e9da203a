"""The agent as a mesh pod's istio-proxy on loopback, with a FAKE istiod (tests/support/fake_istiod.py on TLS, with
a CA service) standing in for the control plane: the real agent (a subprocess in a pod-like root directory), its
Envoy, its xDS proxy and SDS server. For tests/mesh and bench/bench_mesh.py; the standalone istiod in the pod
harness is tests/support/mesh_pod.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bootstrap.test_default_bootstrap_live import quiet_ports
from tests.supervisor import agent_process
from tests.supervisor.agent_process import ROOT, agent_env, envoys_of
from tests.support.envoy import http_get, new_base_id, shm_segment, wait_until
from tests.support.fake_istiod import CLUSTER, LISTENER, FakeIstiod, mtls_listener
from tests.support.mesh_pki import MeshCa, served_certificate

TOKEN = "the-pods-token"
IDENTITY = "spiffe://cluster.local/ns/shop/sa/reviews"


@dataclass
class Pod:
    root: Path  # the agent's cwd: ./var/run/secrets/... live here
    proc: subprocess.Popen[bytes]
    istiod: FakeIstiod
    ca: MeshCa
    ports: dict[str, int]
    log: Path

    def ready(self) -> tuple[int, str]:
        status, body = http_get(f"http://127.0.0.1:{self.ports['status']}/healthz/ready")
        return status, body.decode(errors="replace")

    def admin(self, path: str) -> Any:
        status, body = http_get(f"http://127.0.0.1:{self.ports['admin']}{path}")
        assert status == 200, body
        return json.loads(body)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def served_certificate(self) -> bytes:
        """The certificate Envoy presents on the mTLS listener, to a client holding a mesh certificate."""
        return served_certificate(self.ports["mtls"], self.ca)

    def envoy_epochs(self) -> set[int]:
        return {int(self.admin("/server_info")["command_line_options"]["restart_epoch"])}


@contextmanager
def mesh_pod(
    *,
    start_istiod: bool = True,
    token: str = TOKEN,
    prepare: Callable[[Path, MeshCa], object] | None = None,
    **extra_env: str,
) -> Iterator[Pod]:
    """The agent as a pod's istio-proxy: the ConfigMap root and the projected token in place, istiod at
    localhost:<port> (the agent verifies istiod.istio-system.svc, as Istio's does for localhost). `prepare(root,
    ca)` lays more files in the pod root before the agent starts (./etc/certs, say)."""
    root = Path(tempfile.mkdtemp(prefix="meshpod", dir="/tmp"))
    ports = quiet_ports("admin", "status", "envoy_status", "prom", "mtls")
    base_id = new_base_id()
    ca = MeshCa()
    chain, key = ca.server(["istiod.istio-system.svc"])
    secrets = root / "var/run/secrets"
    (secrets / "istio").mkdir(parents=True)
    (secrets / "istio/root-cert.pem").write_bytes(ca.root_pem)
    (secrets / "tokens").mkdir()
    (secrets / "tokens/istio-token").write_text(token)
    istiod = FakeIstiod(
        "127.0.0.1:0",
        {LISTENER: [mtls_listener("inbound", ports["mtls"], "hello over mTLS")], CLUSTER: []},
        tls=(chain, key, ca.root_pem),
        ca=ca,
        tokens={TOKEN: IDENTITY},
        require_auth=True,
    )
    istiod.__enter__()
    istiod.listen = istiod.address  # a restart comes back on the same port
    port = int(istiod.address.rsplit(":", 1)[1])
    if not start_istiod:
        istiod.__exit__(None, None, None)
    proxy_config = agent_process.test_proxy_config(root, ports, discoveryAddress=f"localhost:{port}")
    env = agent_env(
        root,
        base_id,
        ports,
        PYTHONPATH=str(ROOT),
        PROXY_CONFIG=json.dumps(proxy_config),
        POD_NAME="reviews-1",
        POD_NAMESPACE="shop",
        SERVICE_ACCOUNT="reviews",
        ISTIO_META_CLUSTER_ID="Kubernetes",
        ECC_SIGNATURE_ALGORITHM="ECDSA",  # fast keys
        **extra_env,
    )
    if prepare is not None:
        prepare(root, ca)
    log = root / "agent.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "proxy", "sidecar", "--meshConfig", str(root / "none")],
            env=env,
            cwd=root,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    pod = Pod(root, proc, istiod, ca, ports, log)
    try:
        yield pod
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for envoy in envoys_of(base_id):
            envoy.kill()
        shm_segment(base_id).unlink(missing_ok=True)
        istiod.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)


def wait_ready(pod: Pod, timeout: float = 30) -> None:
    wait_until(lambda: pod.proc.poll() is not None or pod.ready()[0] == 200, timeout=timeout)
    assert pod.proc.poll() is None, pod.output()


def wait_reason(pod: Pod, text: str, timeout: float = 30) -> str:
    wait_until(lambda: pod.proc.poll() is not None or text in pod.ready()[1], timeout=timeout)
    assert pod.proc.poll() is None, pod.output()
    return pod.ready()[1]
