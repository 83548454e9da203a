"""Two pods of the pod harness joined to a real istiod (tests/support/istiod.py), both with this agent: a client
application's requests reach the server application through both sidecars over mutual TLS, with the SPIFFE
identities istiod's CA issued (PeerAuthentication STRICT; the server sees them in x-forwarded-client-cert); the
certificates rotate under load (short lifetimes) with no Envoy restart and no failed request; istiod restarts and
the pods keep serving and stay ready.

Layout (tests/support/netns.py mesh_network): istiod in the node namespace (10.10.0.1), the client pod 10.10.0.2,
the server pod 10.10.0.3, each deploy/sidecar.yaml with istio-init's capture and istio-proxy as uid 1337.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.support.envoy import wait_until
from tests.support.mesh_pki import serial_of, uri_sans
from tests.support.mesh_pod import APP_UID, MESH_HOST, two_pods
from tests.support.netns import PodNetwork

pytestmark = [pytest.mark.istio, pytest.mark.envoy, pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

# 10-second certificates renewed at half their life: a rotation every ~5 s on each side.
ROTATING = {"SECRET_TTL": "10s", "SECRET_GRACE_PERIOD_RATIO": "0.5", "SECRET_GRACE_PERIOD_RATIO_JITTER": "0"}


class Load:
    """wrk from the client application through both sidecars, for as long as the block runs."""

    def __init__(self, client: PodNetwork, server_ip: str, seconds: int) -> None:
        argv = ["wrk", "-t", "1", "-c", "4", "-d", f"{seconds}s", "-H", f"Host: {MESH_HOST}"]
        argv.append(f"http://{server_ip}:8080/")
        self.process = subprocess.Popen(
            client.wrap(argv, uid=APP_UID), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def result(self, timeout: float) -> str:
        output, _ = self.process.communicate(timeout=timeout)
        return output


def test_mutual_tls_between_two_pods_rotation_under_load_and_istiod_restart(tmp_path: Path) -> None:
    require_root()
    with two_pods(tmp_path, proxy_env=ROTATING) as pods:
        istiod, client, server = pods.istiod, pods.client, pods.server
        client_net, server_net = client.net, server.net
        # Both pods ready, as a postStart hook sees it too.
        for net in (client_net, server_net):
            waited = net.pilot_agent("wait", "--timeoutSeconds", "10")
            assert waited.returncode == 0, waited.stderr
        # 1. Client app -> client sidecar -> mTLS -> server sidecar -> server app, identities from the CA.
        xfcc = pods.client_certificate_seen()
        assert "By=spiffe://cluster.local/ns/default/sa/server" in xfcc
        assert "URI=spiffe://cluster.local/ns/default/sa/client" in xfcc
        assert uri_sans(server.workload_certificate()) == ["spiffe://cluster.local/ns/default/sa/server"]

        # 2. Rotation under load: both sides renew twice or more; no request fails, no Envoy restarts.
        serials: dict[str, set[int]] = {"client": set(), "server": set()}
        load = Load(client_net, server_net.pod_ip, seconds=14)
        deadline = time.monotonic() + 14
        while time.monotonic() < deadline:
            for name, pod in (("client", client), ("server", server)):
                serials[name].add(serial_of(pod.workload_certificate()))
            time.sleep(0.5)
        output = load.result(timeout=30)
        assert all(len(found) >= 3 for found in serials.values()), serials  # the first and two renewals
        requests = re.search(r"(\d+) requests in", output)
        assert requests is not None and int(requests.group(1)) > 100, output
        assert "Non-2xx" not in output and "Socket errors" not in output, output
        for pod in (client, server):
            # Still epoch 0 (a hot restart raises it), and no Envoy exit (a crash restart starts again at 0).
            info = json.loads(pod.envoy_admin("/server_info")[1])
            assert info["command_line_options"]["restart_epoch"] == 0
            assert "istio_agent_envoy_exits_total{" not in pod.status_port("/stats/prometheus")[1]

        # 3. istiod restarts: the data plane keeps serving and the pods stay ready; Envoy reconnects.
        istiod.stop()
        assert pods.app_request("/")[0] == 200
        assert client.status_port("/healthz/ready")[0] == server.status_port("/healthz/ready")[0] == 200
        istiod.start()

        def proxies_connected() -> bool:
            metrics = istiod.http_get("/metrics", port=istiod.ports.monitoring)[1]
            line = next((m for m in metrics.splitlines() if m.startswith("pilot_xds{")), "")
            return line.endswith(" 2")

        wait_until(proxies_connected, timeout=60)  # both Envoys reconnected through their proxies
        assert pods.app_request("/")[0] == 200
        assert client.status_port("/healthz/ready")[0] == server.status_port("/healthz/ready")[0] == 200
