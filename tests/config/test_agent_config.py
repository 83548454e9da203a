"""Identity, flags and environment as `pilot-agent proxy` reads them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bootstrap import render_bootstrap
from agent.config import NodeOverrides, ProxyFlags, add_proxy_flags, flags_from_args, load_agent_config
from agent.config.agent_config import AgentConfig, example_xds_dir
from agent.config.network import discover_ips
from agent.errors import ConfigError


def load(tmp_path: Path, env: dict[str, str], flags: ProxyFlags | None = None) -> AgentConfig:
    overrides = NodeOverrides(labels_path=str(tmp_path / "l"), annotations_path=str(tmp_path / "a"))
    return load_agent_config(flags or ProxyFlags(mesh_config=str(tmp_path / "mesh")), env, overrides)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_proxy_flags(parser)
    return parser.parse_args(argv)


def test_node_id_is_type_ip_pod_namespace_domain(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"POD_NAME": "reviews-1", "POD_NAMESPACE": "shop", "INSTANCE_IP": "10.1.2.3"})
    assert cfg.node_id == "sidecar~10.1.2.3~reviews-1.shop~shop.svc.cluster.local"
    assert cfg.instance_ips[0] == "10.1.2.3"
    router = load(
        tmp_path,
        {"POD_NAME": "gw", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.0.0.9"},
        ProxyFlags(proxy_type="router", domain="example.org", mesh_config=str(tmp_path / "m")),
    )
    assert router.node_id == "router~10.0.0.9~gw.ns~example.org"


def test_ip_discovery_instance_ip_first_then_interfaces_without_loopback() -> None:
    ips = discover_ips("10.9.9.9", {})
    assert ips[0] == "10.9.9.9" and len(ips) == len(set(ips))
    assert not any(ip.startswith("127.") or ip == "::1" or ip.startswith("fe80") for ip in ips[1:])
    # A bad INSTANCE_IP is skipped (Istio ignores it too); the result is never empty.
    assert discover_ips("not-an-ip", {}) and "not-an-ip" not in discover_ips("x", {})


def test_unknown_proxy_type_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="argument proxy type: gateway: invalid proxy Type"):
        load(tmp_path, {}, ProxyFlags(proxy_type="gateway"))


def test_flags_parse_with_istio_names() -> None:
    args = parse(
        "router",
        "--domain",
        "d",
        "--meshConfig",
        "/m",
        "--serviceCluster",
        "sc",
        "--proxyLogLevel",
        "info,misc:error",
        "--proxyComponentLogLevel",
        "upstream:debug",
        "--concurrency",
        "4",
        "--templateFile",
        "/t",
        "--outlierLogPath",
        "/dev/stdout",
        "--stsPort",
        "15463",
        "--tokenManagerPlugin",
        "x",
        "--local-xds-dir",
        "/x",
        "--log_output_level",
        "default:debug",
    )
    flags = flags_from_args(args)
    assert flags == ProxyFlags(
        proxy_type="router",
        domain="d",
        mesh_config="/m",
        service_cluster="sc",
        proxy_log_level="info,misc:error",
        proxy_component_log_level="upstream:debug",
        concurrency=4,
        template_file="/t",
        outlier_log_path="/dev/stdout",
        sts_port=15463,
        token_manager_plugin="x",
        local_xds_dir="/x",
    )
    assert args.log_output_level == "default:debug"
    assert flags_from_args(parse()) == ProxyFlags()


@pytest.mark.parametrize(
    ("level", "component", "expected"),
    [
        ("warning", "", ("warning", "")),
        ("info,misc:error,upstream:debug", "", ("info", "misc:error,upstream:debug")),
        ("debug", "misc:error", ("debug", "misc:error")),
        ("info,misc:error", "upstream:debug", ("info", "misc:error")),  # --proxyComponentLogLevel ignored
        ("misc:error", "", ("warning", "misc:error")),
    ],
)
def test_log_levels_split_as_istio(tmp_path: Path, level: str, component: str, expected: tuple[str, str]) -> None:
    cfg = load(
        tmp_path,
        {},
        ProxyFlags(proxy_log_level=level, proxy_component_log_level=component, mesh_config=str(tmp_path / "m")),
    )
    assert (cfg.log_level, cfg.component_log_level) == expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--concurrency", "two"], "flag --concurrency: expected an integer, got 'two'"),
        (["--stsPort", "99999"], "flag --stsPort: 99999 is not a valid port"),
    ],
)
def test_bad_flags(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        flags_from_args(parse(*argv))
    assert str(err.value) == expected


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("loud", "flag --proxyLogLevel: 'loud' is not one of"),
        ("info,misc:shout", "flag --proxyLogLevel: misc:shout:"),
        ("a:b:c", "flag --proxyLogLevel: a:b:c: expected LEVEL or SCOPE:LEVEL"),
    ],
)
def test_bad_log_levels(tmp_path: Path, level: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {}, ProxyFlags(proxy_log_level=level))
    assert str(err.value).startswith(expected)


def test_ports_and_env_knobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load(
        tmp_path,
        {
            "ENVOY_STATUS_PORT": "25021",
            "ENVOY_PROMETHEUS_PORT": "25090",
            "ISTIO_DELTA_XDS": "false",
            "ISTIO_BOOTSTRAP_OVERRIDE": "/o.yaml",
            "HOST_IP": "10.0.0.1",
        },
    )
    assert (cfg.envoy_status_port, cfg.envoy_prometheus_port) == (25021, 25090)
    assert (cfg.delta_xds, cfg.bootstrap_override, cfg.host_ip) == (False, "/o.yaml", "10.0.0.1")
    default = load(tmp_path, {})
    assert (default.envoy_status_port, default.envoy_prometheus_port, default.delta_xds) == (15021, 15090, True)
    # The mapping passed in is the whole environment: the process's own is not read.
    monkeypatch.setenv("ENVOY_STATUS_PORT", "35021")
    assert load(tmp_path, {}).envoy_status_port == 15021


def test_local_xds_dir_needs_both_files(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "lds.yaml").write_text("resources: []\n")
    with pytest.raises(ConfigError, match=r"flag --local-xds-dir: cds.yaml: missing"):
        load(tmp_path, {}, ProxyFlags(local_xds_dir=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match=r"env ISTIO_LOCAL_XDS_DIR: .*nope' does not exist"):
        load(tmp_path, {"ISTIO_LOCAL_XDS_DIR": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"env ISTIO_LOCAL_XDS_DIR: .*lds.yaml' is not a directory"):
        load(tmp_path, {"ISTIO_LOCAL_XDS_DIR": str(tmp_path / "x" / "lds.yaml")})
    # `cp -r examples/local my-xds` in a checkout copies the relative link, which points nowhere from there.
    (tmp_path / "my-xds").symlink_to("../agent/examples/local")
    with pytest.raises(ConfigError, match=r"my-xds' is a symlink to '../agent/examples/local', .* `cp -rL examples"):
        load(tmp_path, {}, ProxyFlags(local_xds_dir=str(tmp_path / "my-xds")))
    assert load(tmp_path, {}, ProxyFlags(local_xds_dir="@example")).local_xds_dir == str(example_xds_dir())


def test_reload_rereads_files(tmp_path: Path) -> None:
    flags = ProxyFlags(mesh_config=str(tmp_path / "mesh"))
    (tmp_path / "mesh").write_text("defaultConfig: {drainDuration: 7s}\n")
    assert load(tmp_path, {}, flags).proxy.drain_duration == 7
    (tmp_path / "mesh").write_text("defaultConfig: {drainDuration: 9s}\n")
    assert load(tmp_path, {}, flags).proxy.drain_duration == 9


_env_names = st.sampled_from(["ISTIO_METAJSON_LABELS", "ISTIO_METAJSON_ANNOTATIONS", "ISTIO_METAJSON_X"])


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(_env_names, st.text(), max_size=2) | st.dictionaries(_env_names, st.from_regex(r"\{.*\}")))
def test_metajson_raises_only_config_error(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> None:
    tmp = tmp_path_factory.mktemp("mj")
    try:
        data = render_bootstrap(load(tmp, {**env, "PROXY_CONFIG": f"configPath: {tmp}"}))
    except ConfigError:
        return
    assert json.loads(data)["node"]["metadata"]


def test_pilot_san_follows_control_plane_auth(tmp_path: Path) -> None:
    assert load(tmp_path, {}).node.pilot_san == ("istiod.istio-system.svc",)
    local = load(tmp_path, {"PROXY_CONFIG": "discoveryAddress: localhost:15012"})
    assert local.node.pilot_san == ("istiod.istio-system.svc",)
    custom = load(tmp_path, {"PROXY_CONFIG": "discoveryAddress: istiod-canary.istio-system.svc:15012"})
    assert custom.node.pilot_san == ("istiod-canary.istio-system.svc",)
    assert load(tmp_path, {"PROXY_CONFIG": "controlPlaneAuthPolicy: NONE"}).node.pilot_san == ()
