"""`pilot-agent proxy sidecar` as a real mesh's agent, fast: the real agent and Envoy, and a FAKE istiod
(tests/support/fake_istiod.py on loopback TLS, with a CA service) standing in for the control plane; the
standalone-istiod tests (test_istiod_mesh.py) run Istio's own. The agent serves Envoy's ADS on <configPath>/XDS
through its xDS proxy and Envoy's certificates on the SDS socket, CSR'd from the fake CA.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from tests.support.envoy import wait_until
from tests.support.mesh_agent import IDENTITY, TOKEN, mesh_pod, wait_ready, wait_reason
from tests.support.mesh_pki import serial_of, uri_sans

pytestmark = pytest.mark.envoy


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
        # Keys were made and chains checked by short-lived workers: cryptography never entered the agent (~10 MiB
        # for good), and no worker outlives its certificate.
        assert "cryptography" not in Path(f"/proc/{pod.proc.pid}/maps").read_text()
        wait_until(lambda: [child.name() for child in psutil.Process(pod.proc.pid).children()] == ["envoy"])
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
