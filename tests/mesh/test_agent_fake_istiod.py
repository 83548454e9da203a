"""`pilot-agent proxy sidecar` as a real mesh's agent, fast: the real agent and Envoy, and a FAKE istiod
(tests/support/fake_istiod.py on loopback TLS, with a CA service) standing in for the control plane; the
standalone-istiod tests (test_istiod_mesh.py) run Istio's own. The agent serves Envoy's ADS on <configPath>/XDS
through its xDS proxy and Envoy's certificates on the SDS socket, CSR'd from the fake CA.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.bootstrap.tls import sds_secret
from tests.bootstrap.test_default_bootstrap_live import quiet_ports
from tests.supervisor import agent_process
from tests.supervisor.agent_process import ROOT, agent_env, envoys_of
from tests.support.envoy import http_get, new_base_id, shm_segment, wait_until
from tests.support.fake_istiod import CLUSTER, LISTENER, FakeIstiod, demo_listener
from tests.support.mesh_pki import MeshCa, serial_of, uri_sans

pytestmark = pytest.mark.envoy

TOKEN = "the-pods-token"
IDENTITY = "spiffe://cluster.local/ns/shop/sa/reviews"


def mtls_listener(port: int) -> Any:
    """What istiod sends for an inbound port with PeerAuthentication STRICT: TLS from SDS `default`, client
    certificates verified against SDS `ROOTCA`."""
    tls = {
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [sds_secret("default")],
            "validation_context_sds_secret_config": sds_secret("ROOTCA"),
        },
    }
    return demo_listener("inbound", port, "hello over mTLS", tls=tls)


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
        chain, key = self.ca.workload("spiffe://cluster.local/ns/shop/sa/client")
        (self.root / "client.pem").write_bytes(chain)
        (self.root / "client.key").write_bytes(key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=self.ca.root_pem.decode())
        context.load_cert_chain(self.root / "client.pem", self.root / "client.key")
        with (
            socket.create_connection(("127.0.0.1", self.ports["mtls"]), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return ssl.DER_cert_to_PEM_cert(der).encode()

    def envoy_epochs(self) -> set[int]:
        return {int(self.admin("/server_info")["command_line_options"]["restart_epoch"])}


@contextmanager
def mesh_pod(*, start_istiod: bool = True, token: str = TOKEN, **extra_env: str) -> Iterator[Pod]:
    """The agent as a pod's istio-proxy: the ConfigMap root and the projected token in place, istiod at
    localhost:<port> (the agent verifies istiod.istio-system.svc, as Istio's does for localhost)."""
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
        {LISTENER: [mtls_listener(ports["mtls"])], CLUSTER: []},
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


@pytest.mark.slow
def test_ca_issued_identity_served_and_rotated_without_restart() -> None:
    # 6-second certificates renewed at half their life: two rotations within ~8 s.
    with mesh_pod(SECRET_TTL="6s", SECRET_GRACE_PERIOD_RATIO="0.5", SECRET_GRACE_PERIOD_RATIO_JITTER="0") as pod:
        wait_ready(pod)
        first = pod.served_certificate()
        assert uri_sans(first) == [IDENTITY]  # from the CA, for the token's identity
        assert pod.istiod.csr_ttls[0] == 6
        headers = pod.istiod.metadata[0]
        assert headers["clusterid"] == "Kubernetes" and headers["authorization"] == f"Bearer {TOKEN}"
        node = pod.istiod.nodes[0]  # passed through the proxy untouched
        assert node.id.startswith("sidecar~127.0.0.1~reviews-1.shop~")
        serials = {serial_of(first)}

        def rotated_twice() -> bool:
            serials.add(serial_of(pod.served_certificate()))
            return len(serials) >= 3

        wait_until(rotated_twice, timeout=20)
        assert pod.envoy_epochs() == {0}  # rotated over SDS: no hot restart
        assert pod.ready()[0] == 200
        os.kill(pod.proc.pid, signal.SIGTERM)
        assert pod.proc.wait(timeout=20) == 0, pod.output()
        # The sockets are gone with the agent.
        assert not (pod.root / "proxy/XDS").exists()
        assert not (pod.root / "var/run/secrets/workload-spiffe-uds/socket").exists()


@pytest.mark.slow
def test_wrong_token_names_the_cause_then_recovers() -> None:
    with mesh_pod(token="not-the-token") as pod:
        reason = wait_reason(pod, "istiod refused the credentials")
        assert "UNAUTHENTICATED" in reason and "authentication failure" in reason
        # One clear line from the proxy (and one from readiness), not one per Envoy retry; the CA's once too.
        output = pod.output().splitlines()
        assert len([line for line in output if "\txds\tistiod refused the credentials" in line]) == 1, output
        assert len([line for line in output if "failed to sign" in line]) == 1, output
        (pod.root / "var/run/secrets/tokens/istio-token").write_text(TOKEN)  # the projected token refreshed
        wait_ready(pod, timeout=60)  # Envoy's ADS backoff decides when it tries again
        assert uri_sans(pod.served_certificate()) == [IDENTITY]


@pytest.mark.slow
def test_istiod_down_at_start_then_up() -> None:
    with mesh_pod(start_istiod=False) as pod:
        reason = wait_reason(pod, "istiod unreachable")
        assert f"{pod.istiod.address.replace('127.0.0.1', 'localhost')} (TLS" in reason
        pod.istiod.__enter__()  # istiod comes up on the same port
        wait_ready(pod, timeout=60)
