"""A real Envoy for status-server tests: filesystem LDS/CDS (so readiness counters move), a status listener that
forwards /healthz/ready to the agent (kubelet's path through 15021) and a prometheus listener that forwards
/stats/prometheus to admin (Istio's 15090). All ports are free ports; the base id is fresh."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from tests.support.envoy import free_port, running_envoy

HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
CDS = {
    "resources": [
        {
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "app",
            "connect_timeout": "1s",
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": "app",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr}}]}],
            },
        }
        for _addr in [{"socket_address": {"address": "127.0.0.1", "port_value": 9}}]
    ]
}


def _route_listener(name: str, port: int, prefix: str, cluster: str, direction: str | None = None) -> dict[str, object]:
    listener: dict[str, object] = {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM_TYPE,
                            "stat_prefix": name,
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": name,
                                        "domains": ["*"],
                                        "routes": [{"match": {"prefix": prefix}, "route": {"cluster": cluster}}],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }
    if direction:
        listener["traffic_direction"] = direction
    return listener


def _cluster(name: str, port: int) -> dict[str, object]:
    return {
        "name": name,
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }


@dataclass(frozen=True)
class EnvoyStack:
    admin_port: int
    status_listener_port: int  # Istio's 15021
    prometheus_port: int  # Istio's 15090
    agent_port: int  # Istio's 15020, where the test's StatusServer must listen
    inbound_port: int  # an LDS listener marked INBOUND
    process: Popen[bytes]


def write_config(directory: Path, agent_port: int, *, reject_lds: bool = False) -> tuple[Path, dict[str, int]]:
    ports = {name: free_port() for name in ("admin", "status", "prometheus", "inbound")}
    lds = {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                **_route_listener("inbound", ports["inbound"], "/", "app", "INBOUND"),
            }
        ]
    }
    if reject_lds:
        # Two listeners on one address: Envoy rejects the whole LDS update (update_rejected moves).
        lds["resources"].append({**lds["resources"][0], "name": "inbound-twin"})
    (directory / "lds.json").write_text(json.dumps(lds))
    (directory / "cds.json").write_text(json.dumps(CDS))
    bootstrap = {
        "node": {"id": "sidecar~127.0.0.1~test.default~default.svc.cluster.local", "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports["admin"]}}},
        "dynamic_resources": {
            "lds_config": {"path_config_source": {"path": str(directory / "lds.json")}, "resource_api_version": "V3"},
            "cds_config": {"path_config_source": {"path": str(directory / "cds.json")}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "listeners": [
                _route_listener("status", ports["status"], "/healthz/ready", "agent"),
                _route_listener("prometheus", ports["prometheus"], "/stats/prometheus", "prometheus_stats"),
            ],
            "clusters": [_cluster("agent", agent_port), _cluster("prometheus_stats", ports["admin"])],
        },
    }
    path = directory / "envoy.json"
    path.write_text(json.dumps(bootstrap))
    return path, ports


@contextmanager
def envoy_stack(directory: Path, agent_port: int, *, reject_lds: bool = False) -> Iterator[EnvoyStack]:
    path, ports = write_config(directory, agent_port, reject_lds=reject_lds)
    # Istio runs Envoy with --drain-strategy immediate: a drained listener closes every connection at once.
    with running_envoy(path, ports["admin"], ["--concurrency", "1", "--drain-strategy", "immediate"]) as process:
        yield EnvoyStack(ports["admin"], ports["status"], ports["prometheus"], agent_port, ports["inbound"], process)
