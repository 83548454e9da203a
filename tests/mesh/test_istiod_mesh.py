"""The Python agent joins a real istiod (tests/support/istiod.py: Istio's pilot-discovery without Kubernetes) in a
pod of the pod harness (deploy/sidecar.yaml, istio-init's capture, uid 1337, read-only root), as Istio's own agent
does in tests/differential/test_istiod_baseline.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import require_root
from tests.differential.test_istiod_baseline import APP_CLUSTER, APP_CONFIG
from tests.support.envoy import wait_until
from tests.support.istiod import running_istiod
from tests.support.mesh_pki import MeshCa, uri_sans
from tests.support.mesh_pod import (
    NAMESPACE,
    PYTHON_AGENT,
    SERVICE_ACCOUNT,
    MeshPod,
    istio_agent_image,
    istiod_sidecar_pod,
    sidecar_pod,
)
from tests.support.netns import pod_network
from tests.support.pod_run import http_text, in_netns, netns_file

pytestmark = [pytest.mark.istio, pytest.mark.envoy, pytest.mark.root, pytest.mark.netns, pytest.mark.slow]


def config_names(mesh: MeshPod) -> dict[str, set[str]]:
    """The names of the listeners (static and from istiod) and clusters Envoy holds."""
    status, body = mesh.envoy_admin("/config_dump?resource=dynamic_listeners")
    assert status == 200, body
    listeners = {c["name"] for c in json.loads(body)["configs"]}
    status, body = mesh.envoy_admin("/config_dump?resource=static_listeners")
    assert status == 200, body
    listeners |= {c["listener"]["name"] for c in json.loads(body)["configs"]}
    return {"listeners": listeners, "clusters": mesh.cluster_names()}


def test_python_agent_joins_the_standalone_istiod_as_istios_does(tmp_path: Path) -> None:
    require_root()
    # With DNS capture on, readiness also waits for istiod's name table: NDS through the xDS proxy to the DNS proxy.
    dns = {"ISTIO_META_DNS_CAPTURE": "true"}
    config = {"app.yaml": APP_CONFIG}
    with istiod_sidecar_pod(tmp_path / "istio", config=config, image=istio_agent_image(), proxy_env=dns) as mesh:
        istios = config_names(mesh)
    with istiod_sidecar_pod(tmp_path / "ours", config=config, image=PYTHON_AGENT, proxy_env=dns) as mesh:
        assert mesh.status_port("/healthz/ready")[0] == 200
        # The same pod, the same istiod config: Envoy holds the same listeners and clusters under either agent.
        assert config_names(mesh) == istios
        ndsz = "http://127.0.0.1:15020/debug/ndsz"  # loopback only: from inside the pod
        status, body = in_netns(netns_file(mesh.net.pod_ns), lambda: http_text(ndsz, 5.0))
        assert status == 200, body  # a table arrived (404 before); the ServiceEntry has no address, so no entry
        assert isinstance(json.loads(body), dict)
        assert APP_CLUSTER in mesh.cluster_names()
        assert {"default", "ROOTCA"} <= set(mesh.sds_secrets())
        leaf = mesh.workload_certificate()
        assert uri_sans(leaf) == [f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"]
        assert x509.load_pem_x509_certificate(leaf).issuer == mesh.istiod.ca.ca.subject


def wait_reason(mesh: MeshPod, text: str, timeout: float = 60) -> str:
    wait_until(lambda: text in mesh.status_port("/healthz/ready")[1], timeout=timeout)
    status, body = mesh.status_port("/healthz/ready")
    assert status == 503
    return body


def test_istiod_down_wrong_root_wrong_token_name_the_cause_then_recover(tmp_path: Path) -> None:
    """A pod started while istiod is down, whose ConfigMap root is not the mesh's and whose token istiod's
    authenticator refuses: readiness names each cause in turn (one log line each) and the pod becomes ready once
    istiod is up and kubelet mounts the right root and token; the agent never exits."""
    require_root()
    with (
        pod_network("mfail") as net,
        running_istiod(tmp_path, config={"app.yaml": APP_CONFIG}, netns=net.client_ns, host=net.client_ip) as istiod,
    ):
        istiod.stop()
        with sidecar_pod(net, istiod, token="not-a-token", root_pem=MeshCa("wrong").root_pem, wait=False) as mesh:
            reason = wait_reason(mesh, "istiod unreachable")
            assert "root ./var/run/secrets/istio/root-cert.pem" in reason and "CERTIFICATE" not in reason, reason
            istiod.start()
            reason = wait_reason(mesh, "CERTIFICATE_VERIFY_FAILED")
            assert reason.startswith("istiod unreachable"), reason
            mesh.pod.update_configmap("istio-ca-root-cert", {"root-cert.pem": istiod.ca.root_pem.decode()})
            reason = wait_reason(mesh, "istiod refused the credentials")
            assert "UNAUTHENTICATED" in reason, reason
            mesh.pod.update_service_account_token("istio-ca", istiod.token(NAMESPACE, SERVICE_ACCOUNT))
            wait_until(lambda: mesh.status_port("/healthz/ready")[0] == 200, timeout=90)
            assert mesh.proxy.running()
            log = [line for line in mesh.proxy.log_text().splitlines() if "\txds\tistiod " in line]
            assert len(log) == 3, log  # down, untrusted, refused: each once
