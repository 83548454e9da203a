"""The agent's DEFAULT bootstrap (ADS over `<configPath>/XDS`) takes a real Envoy to LIVE against a control plane.

No istiod can run here, so `tests/support/fake_istiod.py` (a fake ADS server) stands in for it on the pipe the
bootstrap's `xds-grpc` cluster names; the bootstrap (rendered by agent/bootstrap exactly as `pilot-agent proxy
sidecar` renders it for a pod) and Envoy are real. Both of Istio's ADS flavours: delta (the default,
ISTIO_DELTA_XDS=true) and state of the world (ISTIO_DELTA_XDS=false).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.bootstrap import render_bootstrap, write_bootstrap
from tests.bootstrap.test_envoy import load, moved_env
from tests.support.envoy import free_port, http_get, running_envoy, wait_until
from tests.support.fake_istiod import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    FakeIstiod,
    broken_listener,
    cluster,
    demo_listener,
    static_cluster,
)

pytestmark = pytest.mark.envoy

PROTOCOLS = {"delta": {}, "sotw": {"ISTIO_DELTA_XDS": "false"}}


def quiet_ports(*names: str) -> dict[str, int]:
    """Distinct free ports, one per name (free_port() picks them below the ephemeral range)."""
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    return ports


@dataclass(frozen=True)
class Live:
    istiod: FakeIstiod
    bootstrap: dict[str, Any]
    ports: dict[str, int]

    @property
    def admin_port(self) -> int:
        return self.ports["admin"]

    def stat(self, name: str) -> int:
        body = http_get(f"http://127.0.0.1:{self.admin_port}/stats?filter=^{name}$")[1].decode()
        values = [int(line.split(":")[1]) for line in body.splitlines() if line.startswith(f"{name}:")]
        return values[0] if values else 0


def xds_socket(bootstrap: dict[str, Any]) -> Path:
    """Where the rendered `xds-grpc` cluster tells Envoy to find istiod (in Istio: the agent's XDS proxy)."""
    (xds,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "xds-grpc"]
    (endpoint,) = xds["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return Path(endpoint["endpoint"]["address"]["pipe"]["path"])


@contextmanager
def live_default_bootstrap(tmp_path: Path, protocol: str) -> Iterator[Live]:
    """Render the default sidecar bootstrap (Istio's ports moved to free ones), serve it empty CDS/LDS from the
    fake istiod, run the real Envoy on it and wait for admin /ready to say LIVE."""
    ports = quiet_ports("admin", "status", "envoy_status", "prometheus")
    env = {**moved_env(tmp_path, ports), **PROTOCOLS[protocol]}
    cfg = load(tmp_path, env)
    path = write_bootstrap(cfg, render_bootstrap(cfg))
    bootstrap = json.loads(path.read_text())
    socket = xds_socket(bootstrap)
    assert socket == tmp_path / "proxy" / "XDS"
    with FakeIstiod(socket) as istiod, running_envoy(path, ports["admin"]):
        yield Live(istiod, bootstrap, ports)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_default_bootstrap_goes_live_and_istiod_sees_the_rendered_node(tmp_path: Path, protocol: str) -> None:
    with live_default_bootstrap(tmp_path, protocol) as live:
        istiod = live.istiod
        assert istiod.protocols == [protocol]
        # Empty CDS and LDS were enough: LIVE means Envoy accepted both (initial_fetch_timeout 0s waits forever).
        wait_until(lambda: istiod.acked(CLUSTER) and istiod.acked(LISTENER))
        assert istiod.nacks(CLUSTER) == istiod.nacks(LISTENER) == []
        # set_node_on_first_message_only: exactly one node, the one the agent rendered.
        (node,) = istiod.nodes
        rendered = live.bootstrap["node"]
        assert node.id == "sidecar~10.244.0.7~reviews-v1-6d8f.default~default.svc.cluster.local" == rendered["id"]
        assert node.cluster == "reviews.default" == rendered["cluster"]
        assert node.metadata["NAMESPACE"] == "default"
        assert node.metadata["LABELS"] == {"app": "reviews", "version": "v1"}
        assert node.metadata["SERVICE_ACCOUNT"] == "bookinfo-reviews"
        assert node.metadata == rendered["metadata"]  # everything istiod uses to pick this proxy's config
        # The ports moved by the environment are the ones istiod is told about (it builds inbound config
        # around ENVOY_STATUS_PORT/ENVOY_PROMETHEUS_PORT and reads PROXY_CONFIG).
        assert node.metadata["ENVOY_STATUS_PORT"] == live.ports["envoy_status"]
        assert node.metadata["ENVOY_PROMETHEUS_PORT"] == live.ports["prometheus"]
        assert node.metadata["PROXY_CONFIG"]["proxyAdminPort"] == live.ports["admin"]
        assert node.metadata["PROXY_CONFIG"]["statusPort"] == live.ports["status"]


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_listener_and_cluster_pushed_by_istiod_serve_traffic(tmp_path: Path, protocol: str) -> None:
    port, upstream = quiet_ports("port", "upstream").values()
    with live_default_bootstrap(tmp_path, protocol) as live:
        live.istiod.set_resources(CLUSTER, [static_cluster("outbound|9080||demo", upstream)])
        live.istiod.set_resources(LISTENER, [demo_listener("demo", port, "pushed by istiod")])
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/") == (200, b"pushed by istiod"))
        wait_until(lambda: live.istiod.acked(LISTENER) and live.istiod.acked(CLUSTER))
        clusters = http_get(f"http://127.0.0.1:{live.admin_port}/clusters")[1].decode()
        assert f"outbound|9080||demo::127.0.0.1:{upstream}" in clusters

        # A second push replaces the first: the listener's new body is served without a restart.
        live.istiod.set_resources(LISTENER, [demo_listener("demo", port, "second push")])
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/") == (200, b"second push"))

        # A push without it removes it (delta: removed_resources; SotW: absent from the full set).
        live.istiod.set_resources(LISTENER, [])
        wait_until(lambda: refused(port))
        wait_until(lambda: live.istiod.acked(LISTENER))


def refused(port: int) -> bool:
    try:
        http_get(f"http://127.0.0.1:{port}/", timeout=0.5)
    except OSError:
        return True
    return False


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_invalid_listener_is_nacked_and_counted_as_rejected(tmp_path: Path, protocol: str) -> None:
    port, bad_port = quiet_ports("port", "bad_port").values()
    with live_default_bootstrap(tmp_path, protocol) as live:
        live.istiod.set_resources(LISTENER, [demo_listener("demo", port, "good")])
        wait_until(lambda: live.istiod.acked(LISTENER))
        assert live.stat("listener_manager.lds.update_rejected") == 0

        live.istiod.set_resources(LISTENER, [demo_listener("demo", port, "good"), broken_listener("bad", bad_port)])
        wait_until(lambda: live.istiod.nacks(LISTENER) != [])
        (nack,) = live.istiod.nacks(LISTENER)
        assert nack.protocol == protocol and "envoy.config.cluster.v3.Cluster" in nack.error, nack.error
        assert not live.istiod.acked(LISTENER)
        wait_until(lambda: live.stat("listener_manager.lds.update_rejected") == 1)
        # The rejected update did not take Envoy down or the good listener away.
        assert http_get(f"http://127.0.0.1:{port}/") == (200, b"good")
        assert http_get(f"http://127.0.0.1:{live.admin_port}/ready") == (200, b"LIVE\n")


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_types_nobody_configured_are_answered_so_an_eds_cluster_warms(tmp_path: Path, protocol: str) -> None:
    """Istio's outbound clusters take endpoints over ADS too: Envoy subscribes to EDS on the same stream. The fake
    answers it (a ClusterLoadAssignment without endpoints for a name the test gave nothing) so the cluster leaves
    warming."""
    with live_default_bootstrap(tmp_path, protocol) as live:
        eds_config = {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
        eds = {
            "name": "outbound|80||eds-demo",
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": eds_config,
        }
        live.istiod.set_resources(CLUSTER, [cluster(eds)])
        wait_until(lambda: live.istiod.acked(CLUSTER) and live.istiod.acked(ENDPOINT))
        wait_until(lambda: live.stat("cluster_manager.warming_clusters") == 0)
        assert live.stat("cluster_manager.active_clusters") > 0
        assert "outbound|80||eds-demo::" in http_get(f"http://127.0.0.1:{live.admin_port}/clusters")[1].decode()
