"""What kubelet computes from a container spec before it starts the process: env values and argv.

- `$(VAR)` expansion (`third_party/forked/golang/expansion`): `$(NAME)` is replaced by an env var defined EARLIER in
  the container's `env` list; an unknown reference stays as written; `$$` is a literal `$`. Command and args are
  expanded against the container's whole env (not the image's ENV).
- `valueFrom.fieldRef` (`pkg/kubelet/kubelet_pods.go` podFieldSelectorRuntimeValue) and `resourceFieldRef`
  (`pkg/api/v1/resource` ExtractContainerResourceValue: ceil(value / divisor); a missing limit falls back to the
  node's allocatable, which is why an istio-proxy without a CPU limit sees ISTIO_CPU_LIMIT = node CPUs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+))?(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?")
_SUFFIXES: dict[str, Fraction] = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}


def parse_quantity(text: str) -> Fraction:
    """A Kubernetes resource.Quantity ("500m", "2", "1Gi", "1e3") as an exact number."""
    match = _QUANTITY.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, exponent, suffix = match.groups()
    value = Fraction(number) * _SUFFIXES[suffix or ""]
    if exponent:
        value *= Fraction(10) ** int(exponent)
    return value


@dataclass(frozen=True)
class PodIdentity:
    """What the API server and the node know about the pod, which fieldRefs read."""

    name: str = "echo-5d8f7b6c4-x7k2p"
    namespace: str = "default"
    uid: str = "0c5d2a8e-6f1b-4a77-9d0c-3b1f2e4a5c6d"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"
    node_name: str = "node-1"
    pod_ip: str = "10.44.0.2"
    host_ip: str = "10.44.0.1"
    node_cpus: int = 4
    node_memory: str = "8Gi"


def field_value(field_path: str, pod: PodIdentity) -> str:
    simple = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "metadata.uid": pod.uid,
        "spec.nodeName": pod.node_name,
        "spec.serviceAccountName": pod.service_account,
        "status.hostIP": pod.host_ip,
        "status.hostIPs": pod.host_ip,
        "status.podIP": pod.pod_ip,
        "status.podIPs": pod.pod_ip,
    }
    if field_path in simple:
        return simple[field_path]
    subscript = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", field_path)
    if subscript:
        source = pod.labels if subscript.group(1) == "labels" else pod.annotations
        return source.get(subscript.group(2), "")
    raise ValueError(f"fieldRef {field_path!r} is not supported by this harness")


def resource_value(resource: str, divisor: str | int | None, container: Mapping[str, object], pod: PodIdentity) -> str:
    resources = container.get("resources") or {}
    assert isinstance(resources, Mapping)
    kind, _, name = resource.partition(".")
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    assert isinstance(limits, Mapping) and isinstance(requests, Mapping)
    raw: object | None
    if kind == "limits":
        raw = limits.get(name)
        if raw is None:
            raw = pod.node_cpus if name == "cpu" else pod.node_memory  # node allocatable
    elif kind == "requests":
        # The API server defaults a missing request to the limit.
        raw = requests.get(name, limits.get(name, 0))
    else:
        raise ValueError(f"resourceFieldRef {resource!r} is not supported by this harness")
    value = parse_quantity(str(raw))
    div = parse_quantity(str(divisor)) if divisor not in (None, "", 0, "0") else Fraction(1)
    if name == "cpu":
        # MilliValue() rounds up to whole millicores before dividing.
        return str(math.ceil(math.ceil(value * 1000) / math.ceil(div * 1000)))
    return str(math.ceil(math.ceil(value) / math.ceil(div)))


def expand(text: str, lookup: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion, byte for byte as the Go original scans."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":  # escaped operator
                read, advance = "$", 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:  # incomplete reference: kept as written
                    read, advance = "$(", 1
                else:
                    name = rest[1:close]
                    read = lookup.get(name, f"$({name})")
                    advance = close + 1
            else:  # a `$` that starts no expression
                read, advance = "$" + rest[0], 1
            out.append(read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def container_env(
    container: Mapping[str, object],
    pod: PodIdentity,
    configmaps: Mapping[str, Mapping[str, str]] | None = None,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, str]:
    """The container's `env`, in order, resolved and expanded as kubelet does (image ENV not included)."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:  # type: ignore[attr-defined]
        assert isinstance(var, Mapping)
        name = str(var["name"])
        value = var.get("value")
        source = var.get("valueFrom")
        if value not in (None, ""):
            env[name] = expand(str(value), env)
        elif isinstance(source, Mapping):
            env[name] = _value_from(source, container, pod, configmaps or {}, secrets or {})
        else:
            env[name] = ""
    return env


def _value_from(
    source: Mapping[str, object],
    container: Mapping[str, object],
    pod: PodIdentity,
    configmaps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, str]],
) -> str:
    ref = source.get("fieldRef")
    if isinstance(ref, Mapping):
        return field_value(str(ref["fieldPath"]), pod)
    ref = source.get("resourceFieldRef")
    if isinstance(ref, Mapping):
        divisor = ref.get("divisor")
        return resource_value(str(ref["resource"]), None if divisor is None else str(divisor), container, pod)
    for key, store in (("configMapKeyRef", configmaps), ("secretKeyRef", secrets)):
        ref = source.get(key)
        if isinstance(ref, Mapping):
            return store[str(ref["name"])][str(ref["key"])]
    raise ValueError(f"valueFrom {sorted(source)} is not supported by this harness")


def container_argv(container: Mapping[str, object], env: Mapping[str, str], entrypoint: Sequence[str]) -> list[str]:
    """`command` replaces the image's ENTRYPOINT; `args` follow it; both $(VAR)-expanded against the env."""
    command = container.get("command")
    args = container.get("args") or []
    assert isinstance(args, list)
    head = [expand(str(c), env) for c in command] if isinstance(command, list) else list(entrypoint)
    return head + [expand(str(a), env) for a in args]
