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
from tests.support.mesh_pki import uri_sans
from tests.support.mesh_pod import NAMESPACE, PYTHON_AGENT, SERVICE_ACCOUNT, istiod_sidecar_pod
from tests.support.pod_run import http_text, in_netns, netns_file

pytestmark = [pytest.mark.istio, pytest.mark.envoy, pytest.mark.root, pytest.mark.netns, pytest.mark.slow]


def test_python_agent_joins_the_standalone_istiod(tmp_path: Path) -> None:
    require_root()
    # With DNS capture on, readiness also waits for istiod's name table: NDS through the xDS proxy to the DNS proxy.
    dns = {"ISTIO_META_DNS_CAPTURE": "true"}
    with istiod_sidecar_pod(tmp_path, config={"app.yaml": APP_CONFIG}, image=PYTHON_AGENT, proxy_env=dns) as mesh:
        assert mesh.status_port("/healthz/ready")[0] == 200
        ndsz = "http://127.0.0.1:15020/debug/ndsz"  # loopback only: from inside the pod
        status, body = in_netns(netns_file(mesh.net.pod_ns), lambda: http_text(ndsz, 5.0))
        assert status == 200, body  # a table arrived (404 before); the ServiceEntry has no address, so no entry
        assert isinstance(json.loads(body), dict)
        assert APP_CLUSTER in mesh.cluster_names()
        assert {"default", "ROOTCA"} <= set(mesh.sds_secrets())
        leaf = mesh.workload_certificate()
        assert uri_sans(leaf) == [f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"]
        assert x509.load_pem_x509_certificate(leaf).issuer == mesh.istiod.ca.ca.subject
