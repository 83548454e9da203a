"""The image joins a mesh (issue 16, item 4): deploy/sidecar.yaml's istio-init and istio-proxy run from the built image
under runc, against Istio's own istiod (tests/support/istiod.py, in the node namespace the pods reach over their
veths), with what the cluster mounts: the istio-ca-root-cert ConfigMap and a projected service-account token istiod's
CA accepts. Two such pods (tests/support/mesh_pod.py `two_pods`, the mesh tests' layout), PeerAuthentication STRICT.

Only the applications are the harness's (host processes in the pods' network namespaces); istiod runs without
Kubernetes (its config from files, the pods' addresses from a ServiceEntry).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from tests.support.mesh_pki import uri_sans
from tests.support.mesh_pod import two_pods
from tests.support.pod_run import prometheus_value
from tests.support.runc import RuncContainer, RuncRuntime

pytestmark = [
    pytest.mark.container, pytest.mark.istio, pytest.mark.root, pytest.mark.netns, pytest.mark.envoy, pytest.mark.slow,
]  # fmt: skip

SPIFFE = "spiffe://cluster.local/ns/default/sa/"


def test_the_image_joins_the_mesh_and_two_pods_talk_over_mutual_tls(runtime: RuncRuntime, tmp_path: Path) -> None:
    with two_pods(tmp_path, prefix="imesh", runtime=runtime) as pods:
        for pod, account in ((pods.client, "client"), (pods.server, "server")):
            assert isinstance(pod.proxy, RuncContainer), "istio-proxy runs from the image"
            # Ready through Envoy's 15021 from the node side, as kubelet probes it.
            assert pod.ready() == 200
            # Envoy's configuration is istiod's, and came through the agent's xDS proxy (Envoy's only ADS is the
            # proxy's socket in /etc/istio/proxy).
            assert "outbound|8080||server.mesh.test" in pod.cluster_names()
            metrics = pod.status_port("/stats/prometheus")[1]
            assert (prometheus_value(metrics, "istio_agent_xds_proxy_responses") or 0) > 0
            # The workload certificate Envoy holds came over SDS from the agent, which had it signed by istiod's CA
            # for the pod's service account (the token's).
            [leaf, *_] = x509.load_pem_x509_certificates(pod.workload_certificate())
            leaf.verify_directly_issued_by(pods.istiod.ca.ca)
            assert uri_sans(pod.workload_certificate()) == [SPIFFE + account]
            # Its key was made by the key worker (a child running as 1337 from the read-only root), not by the agent
            # after a fallback: cryptography is not loaded into the long-running agent (docs/mesh.md).
            assert isinstance(pod.proxy, RuncContainer) and pod.proxy.pid1 is not None
            log = pod.proxy.log_text()
            assert "generated new workload certificate" in log and "key worker unavailable" not in log, log
            assert "cryptography" not in Path(f"/proc/{pod.proxy.pid1}/maps").read_text()
        # The client application's request reaches the server's through both sidecars over mutual TLS: the server's
        # Envoy saw the client's CA-issued certificate (STRICT: nothing else is accepted).
        xfcc = pods.client_certificate_seen()
        assert f"By={SPIFFE}server" in xfcc and f"URI={SPIFFE}client" in xfcc, xfcc
