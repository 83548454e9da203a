"""Env values and argv as kubelet computes them: the agent sees exactly these strings in a real pod."""

from __future__ import annotations

from fractions import Fraction

import pytest

from tests.support.kube_values import (
    PodIdentity,
    container_argv,
    container_env,
    expand,
    parse_quantity,
    resource_value,
)

# Cases from Kubernetes' third_party/forked/golang/expansion/expand_test.go (TestMapReference / TestMapping).
EXPAND_CASES = [
    ("$(VAR_A)", "A"),
    ("___$(VAR_B)___", "___B___"),
    ("$(VAR_A)-$(VAR_A)", "A-A"),
    ("$(VAR_A)$(VAR_B)", "AB"),
    ("$$(VAR_B)_$(VAR_A)", "$(VAR_B)_A"),
    ("$$$(VAR_A)", "$A"),
    ("$$$$(VAR_A)", "$$(VAR_A)"),
    ("$(VAR_DNE)", "$(VAR_DNE)"),
    ("$(VAR_A", "$(VAR_A"),
    ("$VAR_A", "$VAR_A"),
    ("$$", "$"),
    ("$", "$"),
    ("$()", "$()"),
    ("foo$(VAR_EMPTY)bar", "foobar"),
    ("$(POD_NAMESPACE).svc.cluster.local", "$(POD_NAMESPACE).svc.cluster.local"),
]


@pytest.mark.parametrize(("text", "expected"), EXPAND_CASES)
def test_expand_matches_kubernetes(text: str, expected: str) -> None:
    assert expand(text, {"VAR_A": "A", "VAR_B": "B", "VAR_EMPTY": ""}) == expected


def test_env_resolves_fieldrefs_and_only_earlier_references() -> None:
    container = {
        "env": [
            {"name": "LATER_REF", "value": "ns=$(POD_NAMESPACE)"},  # defined before POD_NAMESPACE: stays literal
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "DOMAIN", "value": "$(POD_NAMESPACE).svc.cluster.local"},
            {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "EMPTY"},
        ]
    }
    pod = PodIdentity(namespace="shop", pod_ip="10.1.2.3", labels={"app": "cart"})
    env = container_env(container, pod)
    assert env == {
        "LATER_REF": "ns=$(POD_NAMESPACE)",
        "POD_NAMESPACE": "shop",
        "DOMAIN": "shop.svc.cluster.local",
        "INSTANCE_IP": "10.1.2.3",
        "APP": "cart",
        "EMPTY": "",
    }
    assert list(env) == ["LATER_REF", "POD_NAMESPACE", "DOMAIN", "INSTANCE_IP", "APP", "EMPTY"]


def test_args_expand_against_the_container_env_and_follow_the_entrypoint() -> None:
    container = {"args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "$(PATH)"]}
    argv = container_argv(container, {"POD_NAMESPACE": "shop"}, ["/usr/local/bin/pilot-agent"])
    # $(PATH) is the image's ENV, not the container's env: kubelet leaves it as written.
    assert argv == ["/usr/local/bin/pilot-agent", "proxy", "sidecar", "--domain", "shop.svc.cluster.local", "$(PATH)"]
    assert container_argv({"command": ["pilot-agent", "wait"]}, {}, ["/ignored"]) == ["pilot-agent", "wait"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", 2),
        ("500m", Fraction(1, 2)),
        ("1Gi", 2**30),
        ("128Mi", 128 * 2**20),
        ("1e3", 1000),
        ("1.5", Fraction(3, 2)),
    ],
)
def test_quantities(text: str, value: Fraction | int) -> None:
    assert parse_quantity(text) == value


def test_resource_field_refs_round_up_and_fall_back_to_the_node() -> None:
    pod = PodIdentity(node_cpus=8, node_memory="16Gi")
    limited = {"resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}, "requests": {"cpu": "100m"}}}
    assert resource_value("limits.cpu", "1", limited, pod) == "2"  # ISTIO_CPU_LIMIT: ceil(1.5)
    assert resource_value("limits.cpu", "1m", limited, pod) == "1500"
    assert resource_value("limits.memory", None, limited, pod) == str(2**30)  # GOMEMLIMIT in bytes
    assert resource_value("requests.cpu", "1m", limited, pod) == "100"
    # No limit: the node's allocatable, as the downward API reports it.
    assert resource_value("limits.cpu", "1", {}, pod) == "8"
    assert resource_value("limits.memory", "1Mi", {}, pod) == str(16 * 1024)
