"""Hypothesis strategies for a sidecar's inputs: what a pod gives `pilot-agent proxy sidecar`.

The env the injector sets (POD_NAME, POD_NAMESPACE, INSTANCE_IP, SERVICE_ACCOUNT, ISTIO_META_*, TRUST_DOMAIN,
PROXY_CONFIG), the downward-API files (./etc/istio/pod/labels and annotations, with `proxy.istio.io/config` and the
`sidecar.istio.io/stats*` annotations), and the mesh config file (./etc/istio/config/mesh).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

dns_label = st.from_regex(r"\A[a-z]([a-z0-9-]{0,14}[a-z0-9])?\Z")
words = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,12}\Z")
durations = st.integers(1, 120).map(lambda s: f"{s}s")
host_port = st.tuples(dns_label, st.integers(1, 65535)).map(lambda t: f"{t[0]}.example:{t[1]}")


@dataclass(frozen=True)
class PodInputs:
    env: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    mesh: dict[str, Any] = field(default_factory=dict)


@st.composite
def ip(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 3)) == 0:
        return str(ipaddress.IPv6Address((0xFD00 << 112) + draw(st.integers(1, 2**32))))
    return str(ipaddress.IPv4Address(draw(st.integers(0x0A000001, 0x0AFFFFFE))))


@st.composite
def proxy_config(draw: st.DrawFn) -> dict[str, Any]:
    """A ProxyConfig subset, as PROXY_CONFIG JSON, the annotation's YAML or the mesh config's defaultConfig."""
    options: dict[str, Any] = {
        "concurrency": st.integers(0, 8),
        "drainDuration": durations,
        "discoveryAddress": host_port,
        "extraStatTags": st.lists(st.from_regex(r"\A[a-z][a-z_]{0,10}\Z"), max_size=3, unique=True),
        "proxyStatsMatcher": st.fixed_dictionaries(
            {},
            optional={
                "inclusionPrefixes": st.lists(words, min_size=1, max_size=3),
                "inclusionSuffixes": st.lists(words, min_size=1, max_size=3),
            },
        ),
        "tracing": st.fixed_dictionaries(
            {"zipkin": st.fixed_dictionaries({"address": host_port})},
            optional={"sampling": st.integers(0, 100).map(float)},
        ),
        "proxyMetadata": st.dictionaries(st.from_regex(r"\AISTIO_META_[A-Z][A-Z_]{0,10}\Z"), words, max_size=3),
        "runtimeValues": st.dictionaries(
            st.from_regex(r"\A[a-z][a-z_.]{0,20}\Z"), st.sampled_from(["true", "false", "10", "x"]), max_size=2
        ),
        "holdApplicationUntilProxyStarts": st.booleans(),
        "controlPlaneAuthPolicy": st.sampled_from(["MUTUAL_TLS", "NONE"]),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True))
    return {name: draw(options[name]) for name in chosen}


@st.composite
def pod_inputs(draw: st.DrawFn) -> PodInputs:
    env = {
        "POD_NAME": draw(dns_label),
        "POD_NAMESPACE": draw(dns_label),
        "INSTANCE_IP": draw(ip()),
        "SERVICE_ACCOUNT": draw(dns_label),
    }
    optional: dict[str, Any] = {
        "HOST_IP": ip(),
        "ISTIO_META_CLUSTER_ID": words,
        "ISTIO_META_MESH_ID": words,
        "ISTIO_META_WORKLOAD_NAME": dns_label,
        "ISTIO_META_NETWORK": words,
        "ISTIO_META_INTERCEPTION_MODE": st.sampled_from(["REDIRECT", "TPROXY", "NONE"]),
        "ISTIO_META_DNS_CAPTURE": st.sampled_from(["true", "false"]),
        "TRUST_DOMAIN": st.sampled_from(["cluster.local", "example.org"]),
        "ISTIO_META_APP_CONTAINERS": dns_label,
        "ISTIO_META_OWNER": dns_label.map(lambda n: f"kubernetes://apis/apps/v1/namespaces/default/deployments/{n}"),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=5, unique=True)):
        env[name] = draw(optional[name])
    for key, value in draw(st.dictionaries(st.from_regex(r"\A[A-Z][A-Z0-9_]{0,10}\Z"), words, max_size=2)).items():
        env[f"ISTIO_META_{key}"] = value
    if draw(st.booleans()):
        env["PROXY_CONFIG"] = json.dumps(draw(proxy_config()))
    labels = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "app": dns_label,
                "version": st.sampled_from(["v1", "v2"]),
                "service.istio.io/canonical-name": dns_label,
                "topology.istio.io/network": words,
            },
        )
    )
    annotations: dict[str, str] = {}
    if draw(st.booleans()):
        # JSON, which is YAML too: PyYAML and Go's YAML 1.1 parser disagree on plain scalars like `y` (a bool to Go).
        annotations["proxy.istio.io/config"] = json.dumps(draw(proxy_config()))
    stats_annotations = {
        "sidecar.istio.io/statsInclusionPrefixes": st.lists(words, min_size=1, max_size=3).map(",".join),
        "sidecar.istio.io/statsInclusionSuffixes": st.lists(words, min_size=1, max_size=3).map(",".join),
        "sidecar.istio.io/extraStatTags": st.lists(st.from_regex(r"\A[a-z][a-z_]{0,8}\Z"), min_size=1, max_size=2).map(
            ",".join
        ),
        "sidecar.istio.io/statsFlushInterval": st.sampled_from(["5s", "10s", "1m"]),
    }
    for name in draw(st.lists(st.sampled_from(sorted(stats_annotations)), max_size=2, unique=True)):
        annotations[name] = draw(stats_annotations[name])
    mesh: dict[str, Any] = {}
    if draw(st.booleans()):
        mesh["defaultConfig"] = draw(proxy_config())
    if draw(st.booleans()):
        mesh["trustDomain"] = draw(st.sampled_from(["cluster.local", "mesh.example"]))
    return PodInputs(env, labels, annotations, mesh)


def downward_api_text(values: dict[str, str]) -> str:
    """kubelet's downward-API file: sorted `key="value"` lines, Go %q quoting (json.dumps matches it for ASCII)."""
    return "\n".join(f"{key}={json.dumps(value)}" for key, value in sorted(values.items()))
