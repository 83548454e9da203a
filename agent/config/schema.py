"""The shape of Istio's `ProxyConfig` (istio.mesh.v1alpha1) as proto-JSON, enough to validate and normalise it.

Every field of the message is listed, so a typo (`drainDurration`) is an error naming the field instead of a
silently ignored key. Fields the agent reads are typed precisely; the rest are checked for their JSON kind.
Normalised form = proto3 JSON: camelCase keys, proto3 default scalars dropped, durations as "2s", enums by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config.durations import format_proto, parse_duration
from agent.errors import ConfigError

Normaliser = Callable[[Any, str, str], Any]
# Proto3 scalars, lists and maps have no presence: at their zero value they are absent from proto JSON. Parsing
# keeps an explicit zero (an overlay that sets `controlPlaneAuthPolicy: NONE` must override MUTUAL_TLS), and
# `prune_defaults` removes them from the merged result, as proto JSON output would.
_DEFAULTS: dict[Normaliser, Any] = {}


def _zero(default: Any) -> Callable[[Normaliser], Normaliser]:
    def register(fn: Normaliser) -> Normaliser:
        _DEFAULTS[fn] = default
        return fn

    return register


@dataclass(frozen=True)
class Message:
    fields: Mapping[str, Normaliser]
    oneofs: tuple[frozenset[str], ...] = field(default=())

    def __call__(self, value: Any, source: str, path: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(source, path or "(top level)", f"expected an object, got {_kind(value)}")
        out: dict[str, Any] = {}
        for raw_key, raw_value in value.items():
            key = camel(str(raw_key))
            where = f"{path}.{key}" if path else key
            if key not in self.fields:
                raise ConfigError(source, where, "unknown field")
            if raw_value is None:
                continue  # proto JSON: null means "not set"
            out[key] = self.fields[key](raw_value, source, where)
        for group in self.oneofs:
            present = sorted(group & out.keys())
            if len(present) > 1:
                raise ConfigError(source, path or "(top level)", f"only one of {', '.join(present)} may be set")
        return out

    def prune(self, value: Mapping[str, Any]) -> dict[str, Any]:
        """Drop proto3 zero values (no presence), recursively; messages, wrappers and durations stay."""
        out: dict[str, Any] = {}
        for key, item in value.items():
            spec = self.fields.get(key)
            if isinstance(spec, Message) and isinstance(item, Mapping):
                out[key] = spec.prune(item)
            elif spec in _DEFAULTS and item == _DEFAULTS[spec] and type(item) is type(_DEFAULTS[spec]):
                continue
            else:
                out[key] = item
        return out


def camel(name: str) -> str:
    """Proto JSON accepts both the original snake_case name and the lowerCamelCase JSON name."""
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


def _kind(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, Mapping) else "object"


@_zero("")
def string(value: Any, source: str, path: str) -> Any:
    if not isinstance(value, str):
        raise ConfigError(source, path, f"expected a string, got {_kind(value)} {value!r}")
    return value


def _integer(value: Any, source: str, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(source, path, f"expected an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        value = int(value.strip())  # proto JSON accepts integers as strings
    if not isinstance(value, int):
        raise ConfigError(source, path, f"expected an integer, got {_kind(value)} {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(source, path, f"{value} is out of range [{lo}, {hi}]")
    return value


@_zero(0)
def int32(value: Any, source: str, path: str) -> Any:
    return _integer(value, source, path, -(2**31), 2**31 - 1)


@_zero(0)
def uint32(value: Any, source: str, path: str) -> Any:
    return _integer(value, source, path, 0, 2**32 - 1)


def int32_wrapper(value: Any, source: str, path: str) -> Any:
    if isinstance(value, Mapping) and set(value) == {"value"}:
        value = value["value"]  # the prototext/YAML spelling {value: 5}
    return _integer(value, source, path, -(2**31), 2**31 - 1)


def uint32_wrapper(value: Any, source: str, path: str) -> Any:
    if isinstance(value, Mapping) and set(value) == {"value"}:
        value = value["value"]
    return _integer(value, source, path, 0, 2**32 - 1)


def int64_wrapper(value: Any, source: str, path: str) -> Any:
    if isinstance(value, Mapping) and set(value) == {"value"}:
        value = value["value"]
    return _integer(value, source, path, -(2**63), 2**63 - 1)


@_zero(False)
def boolean(value: Any, source: str, path: str) -> Any:
    if not isinstance(value, bool):
        raise ConfigError(source, path, f"expected true or false, got {value!r}")
    return value


def bool_wrapper(value: Any, source: str, path: str) -> Any:
    if isinstance(value, Mapping) and set(value) == {"value"}:
        value = value["value"]
    if not isinstance(value, bool):
        raise ConfigError(source, path, f"expected true or false, got {value!r}")
    return value


@_zero(0.0)
def double(value: Any, source: str, path: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(source, path, f"expected a number, got {value!r}")
    # YAML's .nan/.inf: Go's YAML-to-JSON step refuses them, and Envoy's JSON parser would too.
    if not math.isfinite(value):
        raise ConfigError(source, path, f"expected a finite number, got {value!r}")
    return float(value)


def duration(value: Any, source: str, path: str) -> Any:
    if isinstance(value, Mapping) and set(value) <= {"seconds", "nanos"}:
        seconds = _integer(value.get("seconds", 0), source, path, 0, 315_576_000_000)
        nanos = _integer(value.get("nanos", 0), source, path, 0, 999_999_999)
        return format_proto(seconds + nanos / 1e9)
    return format_proto(parse_duration(value, source, path))


def enum(*names: str) -> Normaliser:
    """Proto enum: by name or number; the first name is the zero value, which proto JSON omits."""

    def normalise(value: Any, source: str, path: str) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            value = names[value]
        if value not in names:
            raise ConfigError(source, path, f"{value!r} is not one of {', '.join(names)}")
        return value

    _DEFAULTS[normalise] = names[0]
    return normalise


@_zero("")
def path_string(value: Any, source: str, path: str) -> Any:
    """A file path: a string without NUL bytes (no file can be named so; Python's file calls raise on them)."""
    if "\0" in string(value, source, path):
        raise ConfigError(source, path, "a path must not contain a NUL byte")
    return value


@_zero({})
def string_map(value: Any, source: str, path: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(source, path, f"expected a map of strings, got {_kind(value)}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(v, str):
            raise ConfigError(source, f"{path}.{k}", f"expected a string, got {_kind(v)} {v!r}")
        out[str(k)] = v
    return out


@_zero([])
def string_list(value: Any, source: str, path: str) -> Any:
    if not isinstance(value, list):
        raise ConfigError(source, path, f"expected a list of strings, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(source, f"{path}[{i}]", f"expected a string, got {_kind(item)} {item!r}")
    return list(value)


def any_object(value: Any, source: str, path: str) -> Any:
    """A message the agent does not read: only its JSON kind is checked; Envoy never sees it."""
    if not isinstance(value, Mapping):
        raise ConfigError(source, path, f"expected an object, got {_kind(value)}")
    return dict(value)


@_zero([])
def any_list(value: Any, source: str, path: str) -> Any:
    if not isinstance(value, list):
        raise ConfigError(source, path, f"expected a list, got {_kind(value)}")
    return list(value)


@_zero({})
def runtime_values(value: Any, source: str, path: str) -> Any:
    # The prototext/YAML list-of-entries spelling [{key: k, value: v}] is accepted too.
    if isinstance(value, list) and all(isinstance(e, Mapping) and set(e) <= {"key", "value"} for e in value):
        value = {str(e.get("key", "")): e.get("value", "") for e in value}
    return string_map(value, source, path)


CLIENT_TLS = Message(
    {
        "mode": enum("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"),
        "clientCertificate": path_string,
        "privateKey": path_string,
        "caCertificates": path_string,
        "credentialName": string,
        "subjectAltNames": string_list,
        "sni": string,
        "insecureSkipVerify": bool_wrapper,
        "caCrl": path_string,
    }
)
TCP_KEEPALIVE = Message({"probes": uint32, "time": duration, "interval": duration})
REMOTE_SERVICE = Message({"address": string, "tlsSettings": CLIENT_TLS, "tcpKeepalive": TCP_KEEPALIVE})
_ADDRESS = Message({"address": string})
TRACING = Message(
    {
        "zipkin": _ADDRESS,
        "lightstep": Message({"address": string, "accessToken": string}),
        "datadog": _ADDRESS,
        "stackdriver": Message(
            {
                "debug": boolean,
                "maxNumberOfAttributes": int64_wrapper,
                "maxNumberOfAnnotations": int64_wrapper,
                "maxNumberOfMessageEvents": int64_wrapper,
            }
        ),
        "openCensusAgent": Message({"address": string, "context": any_list}),
        "customTags": any_object,
        "maxPathTagLength": uint32,
        "sampling": double,
        "tlsSettings": CLIENT_TLS,
        "enableIstioTags": bool_wrapper,
    },
    oneofs=(frozenset({"zipkin", "lightstep", "datadog", "stackdriver", "openCensusAgent"}),),
)

PROXY_CONFIG = Message(
    {
        "configPath": path_string,
        "binaryPath": path_string,
        "serviceCluster": string,
        "tracingServiceName": enum("APP_LABEL_AND_NAMESPACE", "CANONICAL_NAME_ONLY", "CANONICAL_NAME_AND_NAMESPACE"),
        "drainDuration": duration,
        "parentShutdownDuration": duration,
        "discoveryAddress": string,
        "discoveryRefreshDelay": duration,
        "zipkinAddress": string,
        "statsdUdpAddress": string,
        "envoyMetricsServiceAddress": string,
        "proxyAdminPort": int32,
        "availabilityZone": string,
        "controlPlaneAuthPolicy": enum("NONE", "MUTUAL_TLS", "INHERIT"),
        "customConfigFile": path_string,
        "statNameLength": int32,
        "concurrency": int32_wrapper,
        "proxyBootstrapTemplatePath": path_string,
        "interceptionMode": enum("REDIRECT", "TPROXY", "NONE"),
        "tracing": TRACING,
        "sds": any_object,
        "envoyAccessLogService": REMOTE_SERVICE,
        "envoyMetricsService": REMOTE_SERVICE,
        "proxyMetadata": string_map,
        "runtimeValues": runtime_values,
        "statusPort": int32,
        "extraStatTags": string_list,
        "gatewayTopology": any_object,
        "terminationDrainDuration": duration,
        "meshId": string,
        "readinessProbe": any_object,
        "proxyStatsMatcher": Message(
            {"inclusionPrefixes": string_list, "inclusionSuffixes": string_list, "inclusionRegexps": string_list}
        ),
        "holdApplicationUntilProxyStarts": bool_wrapper,
        "caCertificatesPem": string_list,
        "image": any_object,
        "privateKeyProvider": any_object,
        "proxyHeaders": any_object,
        "fileFlushInterval": duration,
        "statsFlushInterval": duration,
        "statsCompression": bool_wrapper,
        "connectionSettings": Message({"globalDownstreamConnectionLimit": uint32_wrapper}),
        "statsEvictionInterval": duration,
    },
    oneofs=(frozenset({"serviceCluster", "tracingServiceName"}),),
)


def normalise_proxy_config(value: Any, source: str) -> dict[str, Any]:
    """Validate a parsed PROXY_CONFIG / defaultConfig / annotation value: camelCase keys, canonical values.
    Explicit zero values are kept (they matter when overlaying); see prune_defaults."""
    result = PROXY_CONFIG(value, source, "")
    assert isinstance(result, dict)
    return result


def prune_defaults(value: Mapping[str, Any]) -> dict[str, Any]:
    """The proto3 JSON form: zero-valued scalars, lists and maps removed."""
    return PROXY_CONFIG.prune(value)
