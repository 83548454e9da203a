"""ProxyConfig from Istio's four sources, with Istio's precedence and merge rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import NodeOverrides, ProxyFlags, load_agent_config
from agent.config.agent_config import AgentConfig
from agent.config.proxyconfig import parse_text
from agent.errors import ConfigError


def load(
    tmp_path: Path,
    env: dict[str, str] | None = None,
    annotations: str | None = None,
    mesh: str | None = None,
    **flag_values: Any,
) -> AgentConfig:
    if annotations is not None:
        (tmp_path / "annotations").write_text(annotations)
    if mesh is not None:
        (tmp_path / "mesh").write_text(mesh)
    flags = ProxyFlags(mesh_config=str(tmp_path / "mesh"), **flag_values)
    overrides = NodeOverrides(
        labels_path=str(tmp_path / "labels"), annotations_path=str(tmp_path / "annotations"), instance_ips=("10.1.1.1",)
    )
    return load_agent_config(flags, {"POD_NAME": "p", "POD_NAMESPACE": "ns", **(env or {})}, overrides)


def test_defaults_are_istios(tmp_path: Path) -> None:
    proxy = load(tmp_path).proxy
    assert (proxy.config_path, proxy.binary_path, proxy.service_cluster) == (
        "./etc/istio/proxy",
        "/usr/local/bin/envoy",
        "istio-proxy",
    )
    assert (proxy.drain_duration, proxy.termination_drain_duration, proxy.parent_shutdown_duration) == (45, 5, 60)
    assert (proxy.proxy_admin_port, proxy.status_port, proxy.stat_name_length) == (15000, 15020, 189)
    assert proxy.discovery_address == "istiod.istio-system.svc:15012"
    assert proxy.control_plane_auth_policy == "MUTUAL_TLS"
    assert proxy.concurrency is None and proxy.custom_config_file == "" and proxy.file_flush_interval is None


def test_precedence_mesh_then_env_then_annotation(tmp_path: Path) -> None:
    mesh = "defaultConfig:\n  drainDuration: 10s\n  statNameLength: 100\n  discoveryAddress: mesh:15012\n"
    env = {"PROXY_CONFIG": json.dumps({"drainDuration": "20s", "statNameLength": 150})}
    anno = 'proxy.istio.io/config="drainDuration: 30s\\n"\n'
    proxy = load(tmp_path, env, anno, mesh).proxy
    assert proxy.drain_duration == 30  # annotation wins
    assert proxy.stat_name_length == 150  # PROXY_CONFIG over mesh
    assert proxy.discovery_address == "mesh:15012"  # mesh over defaults


def test_proxy_metadata_merges_lists_replace(tmp_path: Path) -> None:
    mesh = "defaultConfig:\n  proxyMetadata: {A: mesh, B: mesh}\n  extraStatTags: [one, two]\n"
    env = {"PROXY_CONFIG": "proxyMetadata: {B: env, C: env}\nextraStatTags: [three]\n"}
    proxy = load(tmp_path, env, mesh=mesh).proxy
    assert dict(proxy.proxy_metadata) == {"A": "mesh", "B": "env", "C": "env"}
    assert proxy.extra_stat_tags == ("three",)


def test_annotation_overrides_discovery_address_and_status_port(tmp_path: Path) -> None:
    anno = 'sidecar.istio.io/discoveryAddress="istiod-canary:15012"\nstatus.sidecar.istio.io/port="15999"\n'
    proxy = load(tmp_path, annotations=anno).proxy
    assert (proxy.discovery_address, proxy.status_port) == ("istiod-canary:15012", 15999)


def test_snake_case_durations_and_wrappers_accepted(tmp_path: Path) -> None:
    env = {
        "PROXY_CONFIG": "proxy_admin_port: 15005\ndrain_duration: {seconds: 2}\nconcurrency: {value: 3}\n"
        "file_flush_interval: 1m30s\n"
    }
    proxy = load(tmp_path, env).proxy
    assert (proxy.proxy_admin_port, proxy.drain_duration, proxy.concurrency) == (15005, 2, 3)
    assert proxy.file_flush_interval == 90
    assert proxy.raw["drainDuration"] == "2s"  # proto-JSON in node metadata


def test_concurrency_cpu_limit_then_flag(tmp_path: Path) -> None:
    assert load(tmp_path, {"ISTIO_CPU_LIMIT": "3"}).proxy.concurrency == 3
    assert load(tmp_path, {"ISTIO_CPU_LIMIT": "3", "PROXY_CONFIG": "concurrency: 1"}).proxy.concurrency == 1
    assert load(tmp_path, {"ISTIO_CPU_LIMIT": "3"}, concurrency=5).proxy.concurrency == 5


def test_template_file_flag_becomes_bootstrap_template_path(tmp_path: Path) -> None:
    cfg = load(tmp_path, template_file="/t.j2")
    assert cfg.proxy.proxy_bootstrap_template_path == "/t.j2" and cfg.template_path == "/t.j2"
    assert load(tmp_path, {"ISTIO_BOOTSTRAP": "/other.j2"}, template_file="/t.j2").template_path == "/other.j2"
    custom = load(tmp_path, {"PROXY_CONFIG": "customConfigFile: /envoy.json"}, template_file="/t.j2")
    assert custom.template_path == "" and custom.proxy.proxy_bootstrap_template_path == ""


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PROXY_CONFIG": "drainDuration: [1"}, "env PROXY_CONFIG:1: not valid YAML/JSON"),
        ({"PROXY_CONFIG": '{"drainDurration": "5s"}'}, "env PROXY_CONFIG: drainDurration: unknown field"),
        ({"PROXY_CONFIG": "drainDuration: forever"}, "env PROXY_CONFIG: drainDuration: invalid duration"),
        ({"PROXY_CONFIG": "proxyAdminPort: http"}, "env PROXY_CONFIG: proxyAdminPort: expected an integer"),
        ({"PROXY_CONFIG": "proxyAdminPort: 70000"}, "effective ProxyConfig: proxyAdminPort: 70000 is not a valid port"),
        ({"PROXY_CONFIG": "statusPort: -1"}, "effective ProxyConfig: statusPort: -1 is not a valid port"),
        ({"PROXY_CONFIG": "tracing: {zipkin: {address: 5}}"}, "env PROXY_CONFIG: tracing.zipkin.address: expected a"),
        ({"PROXY_CONFIG": "controlPlaneAuthPolicy: SOMETIMES"}, "env PROXY_CONFIG: controlPlaneAuthPolicy: 'SOMET"),
        ({"PROXY_CONFIG": "- a list"}, "env PROXY_CONFIG: (top level): expected an object"),
        ({"PROXY_CONFIG": "proxyMetadata: {A: 1}"}, "env PROXY_CONFIG: proxyMetadata.A: expected a string"),
        ({"ISTIO_CPU_LIMIT": "2 cores"}, "env ISTIO_CPU_LIMIT: expected an integer"),
        ({"ENVOY_STATUS_PORT": "abc"}, "env ENVOY_STATUS_PORT: expected an integer"),
        ({"ENVOY_PROMETHEUS_PORT": "0"}, "env ENVOY_PROMETHEUS_PORT: 0 is out of range"),
        ({"ISTIO_DELTA_XDS": "maybe"}, "env ISTIO_DELTA_XDS: expected true or false"),
        ({"ISTIO_METAJSON_LABELS": "{app: x}"}, "env ISTIO_METAJSON_LABELS: not valid JSON"),
        ({"ISTIO_METAJSON_ANNOTATIONS": "[1, 2]"}, "env ISTIO_METAJSON_ANNOTATIONS: expected a JSON object"),
    ],
)
def test_bad_env_input_names_source_and_field(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, env)
    assert str(err.value).startswith(expected), str(err.value)


def test_bad_mesh_config_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, mesh="defaultConfig:\n  drainDuration: 5s\n bad: [\n")
    assert str(err.value).startswith(f"{tmp_path / 'mesh'}:3: not valid YAML")
    with pytest.raises(ConfigError) as err:
        load(tmp_path, mesh="defaultConfig:\n  statusPort: x\n")
    assert str(err.value).startswith(f"{tmp_path / 'mesh'} defaultConfig: statusPort: expected an integer")


def test_bad_annotations_name_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, annotations='proxy.istio.io/config="drainDuration: 5q"\n')
    assert "annotation proxy.istio.io/config: drainDuration: invalid duration" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load(tmp_path, annotations='status.sidecar.istio.io/port="http"\n')
    assert str(err.value) == f"{tmp_path / 'annotations'}: status.sidecar.istio.io/port: 'http' is not a valid port"
    with pytest.raises(ConfigError) as err:
        load(tmp_path, annotations='a="ok"\nb="unterminated\n')
    assert str(err.value).startswith(f"{tmp_path / 'annotations'}:2: b: cannot unquote")


@given(st.text())
def test_proxy_config_text_raises_only_config_error(text: str) -> None:
    try:
        result = parse_text(text, "env PROXY_CONFIG")
    except ConfigError:
        return
    assert isinstance(result, dict)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)
_fields = st.sampled_from(
    [
        "drainDuration",
        "proxyAdminPort",
        "tracing",
        "proxyMetadata",
        "concurrency",
        "runtimeValues",
        "statusPort",
        "envoyMetricsService",
        "connectionSettings",
        "statsCompression",
        "extraStatTags",
        "controlPlaneAuthPolicy",
    ]
)


@given(st.dictionaries(_fields, _json, max_size=4))
def test_proxy_config_json_raises_only_config_error(value: dict[str, Any]) -> None:
    try:
        result = parse_text(json.dumps(value), "env PROXY_CONFIG")
    except ConfigError:
        return
    assert set(result) <= set(value)


def test_statsd_address_resolved_or_dropped(tmp_path: Path) -> None:
    resolved = load(tmp_path, {"PROXY_CONFIG": "statsdUdpAddress: localhost:9125"}).proxy.statsd_udp_address
    assert resolved in ("127.0.0.1:9125", "[::1]:9125")
    assert (
        load(tmp_path, {"PROXY_CONFIG": "statsdUdpAddress: 10.1.1.1:9125"}).proxy.statsd_udp_address == "10.1.1.1:9125"
    )
    unresolvable = {"PROXY_CONFIG": "statsdUdpAddress: no-such-host.invalid:9125"}
    assert load(tmp_path, unresolvable).proxy.statsd_udp_address == ""


def test_explicit_zero_values_override_lower_layers(tmp_path: Path) -> None:
    mesh = "defaultConfig:\n  extraStatTags: [a]\n  interceptionMode: TPROXY\n"
    env = {"PROXY_CONFIG": "controlPlaneAuthPolicy: NONE\nextraStatTags: []\ninterceptionMode: REDIRECT\n"}
    proxy = load(tmp_path, env, mesh=mesh).proxy
    assert proxy.control_plane_auth_policy == "NONE" and proxy.extra_stat_tags == ()
    # ...and, as in proto JSON, zero values are absent from node metadata PROXY_CONFIG.
    assert not {"controlPlaneAuthPolicy", "extraStatTags", "interceptionMode"} & set(proxy.to_proto_json())
