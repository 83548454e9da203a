"""The capture rules on real traffic: a pod namespace with the injector's default rules, a real Envoy as uid 1337
with 15006/15001 listeners using the original_dst listener filter, an application, and a client namespace.

Each response from Envoy carries `x-captured-by: <listener>-<port>` and the application answers with the peer
address it saw, so every assertion names the path a connection really took.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.iptables.conftest import INJECTOR_ARGS
from tests.support.envoy import wait_until
from tests.support.netns import PodNetwork, RunningEnvoy, pod_network, sidecar_envoy_config

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.envoy]

APP_UID = 1000
APP_PORT = 8080
EXCLUDED = (15020, 15021, 15090)
REMOTE_PORT = 9080
INBOUND_CX = "listener.0.0.0.0_15006.downstream_cx_total"
OUTBOUND_CX = "listener.0.0.0.0_15001.downstream_cx_total"


@dataclass
class Sidecar:
    pod: PodNetwork
    envoy: RunningEnvoy

    def log(self, name: str) -> str:
        path = Path(self.pod.workdir, f"{name}.log")
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def sidecar() -> Iterator[Sidecar]:
    require_root()
    with pod_network() as pod:
        installed = pod.pilot_agent(*INJECTOR_ARGS)
        assert installed.returncode == 0, installed.stderr
        with (
            pod.app([APP_PORT, *EXCLUDED], uid=APP_UID),
            pod.app([REMOTE_PORT], ns="client"),
            pod.envoy(sidecar_envoy_config(pod.workdir), uid=1337, gid=1337) as envoy,
        ):
            yield Sidecar(pod, envoy)


def test_inbound_to_the_app_port_goes_through_envoy(sidecar: Sidecar) -> None:
    pod, envoy = sidecar.pod, sidecar.envoy
    before = envoy.stat(INBOUND_CX)
    reply = pod.http_get(f"http://{pod.pod_ip}:{APP_PORT}/")
    assert reply.status == 200
    assert reply.headers.get("x-captured-by") == "inbound-15006"
    # Envoy's inbound passthrough binds 127.0.0.6, so that is the peer the application sees.
    assert reply.body.startswith("peer=127.0.0.6:")
    assert reply.body.strip().endswith(f"local={pod.pod_ip}:{APP_PORT}")
    assert envoy.stat(INBOUND_CX) == before + 1
    wait_until(lambda: f"inbound {pod.client_ip}:" in sidecar.log("inbound"), timeout=5)
    assert f"-> {pod.pod_ip}:{APP_PORT} {pod.pod_ip}:{APP_PORT} 200" in sidecar.log("inbound")


@pytest.mark.parametrize("port", EXCLUDED)
def test_inbound_to_an_excluded_port_does_not_go_through_15006(sidecar: Sidecar, port: int) -> None:
    pod, envoy = sidecar.pod, sidecar.envoy
    before = envoy.stat(INBOUND_CX)
    reply = pod.http_get(f"http://{pod.pod_ip}:{port}/")
    assert "x-captured-by" not in reply.headers
    assert reply.body.startswith(f"peer={pod.client_ip}:")
    assert envoy.stat(INBOUND_CX) == before


def test_outbound_from_the_app_is_captured_to_15001(sidecar: Sidecar) -> None:
    pod, envoy = sidecar.pod, sidecar.envoy
    before = envoy.stat(OUTBOUND_CX)
    reply = pod.http_get(f"http://{pod.client_ip}:{REMOTE_PORT}/", ns="pod", uid=APP_UID)
    assert reply.headers.get("x-captured-by") == "outbound-15001"
    # original_dst sent it on to the address the app asked for.
    assert reply.body.startswith(f"peer={pod.pod_ip}:")
    assert reply.body.strip().endswith(f"local={pod.client_ip}:{REMOTE_PORT}")
    assert envoy.stat(OUTBOUND_CX) == before + 1


def test_outbound_from_the_proxy_uid_is_not_captured(sidecar: Sidecar) -> None:
    pod, envoy = sidecar.pod, sidecar.envoy
    before = envoy.stat(OUTBOUND_CX), envoy.stat(INBOUND_CX)
    reply = pod.http_get(f"http://{pod.client_ip}:{REMOTE_PORT}/", ns="pod", uid=1337)
    assert "x-captured-by" not in reply.headers
    assert reply.body.startswith(f"peer={pod.pod_ip}:")
    assert (envoy.stat(OUTBOUND_CX), envoy.stat(INBOUND_CX)) == before


def test_traffic_from_127_0_0_6_is_not_captured(sidecar: Sidecar) -> None:
    """uid 1337 to the pod's own IP over lo is sent back through inbound (app -> VIP -> itself), except when it
    comes from 127.0.0.6: that is Envoy's own inbound passthrough and must reach the app directly."""
    pod, envoy = sidecar.pod, sidecar.envoy
    url = f"http://{pod.pod_ip}:{APP_PORT}/"
    before = envoy.stat(INBOUND_CX)
    direct = pod.http_get(url, ns="pod", uid=1337, source="127.0.0.6")
    assert "x-captured-by" not in direct.headers
    assert direct.body.startswith("peer=127.0.0.6:")
    assert envoy.stat(INBOUND_CX) == before

    looped = pod.http_get(url, ns="pod", uid=1337)
    assert looped.headers.get("x-captured-by") == "inbound-15006"
    assert envoy.stat(INBOUND_CX) == before + 1


def test_with_envoy_stopped_captured_inbound_fails() -> None:
    require_root()
    with pod_network() as pod:
        assert pod.pilot_agent(*INJECTOR_ARGS).returncode == 0
        with pod.app([APP_PORT, 15020], uid=APP_UID):
            with pod.envoy(sidecar_envoy_config(pod.workdir)):
                assert pod.http_get(f"http://{pod.pod_ip}:{APP_PORT}/").headers.get("x-captured-by")
            # The app still listens on 8080, but the rules send the connection to 15006, where nobody is.
            with pytest.raises(ConnectionError, match="ECONNREFUSED"):
                pod.http_get(f"http://{pod.pod_ip}:{APP_PORT}/")
            assert pod.http_get(f"http://{pod.pod_ip}:15020/").status == 200


def test_tproxy_app_sees_the_clients_real_address() -> None:
    """TPROXY: a transparent 15006 listener (Envoy holds CAP_NET_ADMIN) with original_src. Envoy runs as uid 0 and
    gid 1337, which is Istio's TPROXY securityContext: with uid 1337 the `-o lo ... --uid-owner 1337 ->
    ISTIO_IN_REDIRECT` rule would send Envoy's client-addressed upstream SYN back to 15006, where it is lost."""
    require_root()
    args = tuple("TPROXY" if a == "REDIRECT" else a for a in INJECTOR_ARGS)
    with pod_network() as pod:
        installed = pod.pilot_agent(*args)
        assert installed.returncode == 0, installed.stderr
        with (
            pod.app([APP_PORT, 15020], uid=APP_UID),
            pod.envoy(sidecar_envoy_config(pod.workdir, "TPROXY"), uid=0, gid=1337, caps=["net_admin"]) as envoy,
        ):
            reply = pod.http_get(f"http://{pod.pod_ip}:{APP_PORT}/")
            assert reply.headers.get("x-captured-by") == "inbound-15006"
            assert reply.body.startswith(f"peer={pod.client_ip}:")
            assert envoy.stat(INBOUND_CX) == 1
            excluded = pod.http_get(f"http://{pod.pod_ip}:15020/")
            assert "x-captured-by" not in excluded.headers
            assert envoy.stat(INBOUND_CX) == 1
