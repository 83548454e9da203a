"""`pilot-agent proxy`: AgentConfig -> supervisor settings, and what goes into the desired state."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from agent.bootstrap import bootstrap_dependencies
from agent.commands.proxy import render_desired_state, supervisor_settings, watch_files
from agent.config import ProxyFlags, load_agent_config, network
from agent.config.agent_config import reload_files
from agent.errors import ConfigError


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    proxy_config = {"configPath": str(tmp_path / "proxy"), "drainDuration": "7s", "parentShutdownDuration": "9s"}
    return {
        "POD_NAME": "p",
        "POD_NAMESPACE": "ns",
        "INSTANCE_IP": "10.0.0.1",
        "PROXY_CONFIG": json.dumps(proxy_config),
        "ISTIO_META_TLS_SERVER_CERT_CHAIN": str(tmp_path / "certs" / "cert-chain.pem"),
        **extra,
    }


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the downward-API and mesh paths are relative, as in Istio's image


def test_settings_from_config(tmp_path: Path) -> None:
    cfg = load_agent_config(ProxyFlags(proxy_type="router"), env(tmp_path, ENVOY_BASE_ID="12"))
    settings = supervisor_settings(cfg, "/bin/envoy")
    assert settings.launch.binary == "/bin/envoy"
    assert settings.launch.drain_duration == 7 and settings.launch.parent_shutdown_duration == 9
    assert settings.launch.hot_restart and settings.launch.base_id == 12
    assert settings.launch.ip_version == "v4"
    assert settings.drain.proxy_type == "router"
    assert settings.supervision.restart_budget == 10 and not settings.supervision.exit_on_envoy_exit
    assert settings.supervision.termination_log == Path("/dev/termination-log")


def test_istio_mode_settings(tmp_path: Path) -> None:
    extra = {"ENVOY_DISABLE_HOT_RESTART": "true", "ENVOY_RESTART_POLICY": "exit", "TERMINATION_LOG_PATH": ""}
    cfg = load_agent_config(ProxyFlags(), env(tmp_path, **extra))
    settings = supervisor_settings(cfg, "envoy")
    assert not settings.launch.hot_restart
    assert settings.launch.bootstrap_path(0).name == "envoy-rev.json"
    assert settings.supervision.exit_on_envoy_exit
    assert settings.supervision.termination_log is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ENVOY_RESTART_POLICY", "sometimes"),
        ("ENVOY_BASE_ID", "-1"),
        ("ENVOY_RESTART_BUDGET", "ten"),
        ("ENVOY_DISABLE_HOT_RESTART", "maybe"),
        ("FILE_DEBOUNCE_DURATION", "soon"),
        ("MINIMUM_DRAIN_DURATION", "-5s"),
    ],
)
def test_bad_settings_name_the_variable(tmp_path: Path, name: str, value: str) -> None:
    cfg = load_agent_config(ProxyFlags(), env(tmp_path, **{name: value}))
    with pytest.raises(ConfigError) as info:
        supervisor_settings(cfg, "envoy")
    assert f"env {name}" in str(info.value)


def test_bootstrap_override_becomes_config_yaml(tmp_path: Path) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("node:\n  locality: {zone: $(HOST_IP)}\n")
    cfg = load_agent_config(ProxyFlags(), env(tmp_path, ISTIO_BOOTSTRAP_OVERRIDE=str(override), HOST_IP="1.2.3.4"))
    assert json.loads(supervisor_settings(cfg, "envoy").launch.config_yaml) == {
        "node": {"locality": {"zone": "1.2.3.4"}}
    }
    override.write_text("node: [\n")
    with pytest.raises(ConfigError) as info:
        supervisor_settings(cfg, "envoy")
    assert "ISTIO_BOOTSTRAP_OVERRIDE" in str(info.value)


def test_desired_state_hashes_files_envoy_reads_not_render_inputs(tmp_path: Path) -> None:
    environ = env(tmp_path)
    cert = tmp_path / "certs" / "cert-chain.pem"
    cert.parent.mkdir()
    cert.write_text("one")
    cfg = load_agent_config(ProxyFlags(), environ)
    kinds = watch_files(cfg, bootstrap_dependencies(cfg))
    assert kinds[cert] == "cert"
    assert kinds[cfg.annotations_path] == "annotations"
    assert kinds[cfg.mesh_config_path] == "mesh"
    first = render_desired_state(reload_files(cfg), kinds)
    cert.write_text("two")
    second = render_desired_state(reload_files(cfg), kinds)
    assert second.bootstrap == first.bootstrap and second.digest != first.digest
    # A label change shows in the bootstrap (node metadata) and only there.
    labels = tmp_path / "etc" / "istio" / "pod" / "labels"
    labels.parent.mkdir(parents=True)
    labels.write_text('app="demo"\n')
    third = render_desired_state(reload_files(cfg), kinds)
    assert third.bootstrap != second.bootstrap
    assert third.dependencies == second.dependencies


def _annotations(tmp_path: Path, proxy_config: dict[str, object]) -> None:
    path = tmp_path / "etc" / "istio" / "pod" / "annotations"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"proxy.istio.io/config={json.dumps(json.dumps(proxy_config))}\n")


def test_a_file_change_rereads_files_but_not_the_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scans: list[str] = []
    lookups: list[str] = []

    def interface_ips(exclude: object = ()) -> list[str]:
        scans.append("scan")
        return ["10.0.0.9"]

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_DGRAM, 0, "", ("10.7.7.7", 8125))]

    monkeypatch.setattr(network, "interface_ips", interface_ips)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    _annotations(tmp_path, {"statsdUdpAddress": "statsd.example:8125", "drainDuration": "3s"})
    environ = env(tmp_path)
    environ.pop("PROXY_CONFIG")
    cfg = load_agent_config(ProxyFlags(), environ)
    assert (scans, lookups) == (["scan"], ["statsd.example"])
    assert cfg.proxy.statsd_udp_address == "10.7.7.7:8125" and cfg.proxy.drain_duration == 3

    _annotations(tmp_path, {"statsdUdpAddress": "statsd.example:8125", "drainDuration": "4s", "statNameLength": 99})
    again = reload_files(cfg)
    assert again.proxy.stat_name_length == 99 and again.proxy.statsd_udp_address == "10.7.7.7:8125"
    assert again.proxy.drain_duration == 3  # Envoy's command line: as at start (START_ONLY_FIELDS)
    assert (again.node_id, again.instance_ips) == (cfg.node_id, cfg.instance_ips)
    assert (scans, lookups) == (["scan"], ["statsd.example"])  # no interface scan, no DNS lookup

    # A new statsd name is looked up once, then remembered too.
    _annotations(tmp_path, {"statsdUdpAddress": "other.example:8125"})
    third = reload_files(reload_files(again))
    assert third.proxy.statsd_udp_address == "10.7.7.7:8125"
    assert lookups == ["statsd.example", "other.example"] and scans == ["scan"]


def test_certificates_served_over_sds_are_not_restart_dependencies(tmp_path: Path) -> None:
    """In a mesh the agent pushes certificate files to Envoy over SDS: changing them must not restart Envoy."""
    cfg = load_agent_config(ProxyFlags(), env(tmp_path))
    watched = supervisor_settings(cfg, "/bin/envoy").watch.files
    assert "cert" not in watched.values()
    assert Path("./etc/certs/cert-chain.pem") not in watched and tmp_path / "certs/cert-chain.pem" not in watched
    assert render_desired_state(cfg, watched).dependencies == ()


def test_only_the_watched_files_are_hashed_and_a_later_dependency_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Without the mesh side (--local-xds-dir), no SDS server: certificate files restart Envoy when they change.
    cfg = load_agent_config(ProxyFlags(local_xds_dir="@example"), env(tmp_path))
    watched = watch_files(cfg, bootstrap_dependencies(cfg))
    first = render_desired_state(cfg, watched)
    assert {path for path, _ in first.dependencies} == {str(p) for p, k in watched.items() if k == "cert"}
    later_key = tmp_path / "later" / "key.pem"
    _annotations(tmp_path, {"proxyMetadata": {"ISTIO_META_TLS_CLIENT_KEY": str(later_key)}})
    with caplog.at_level("WARNING", logger="agent.cli"):
        second = render_desired_state(reload_files(cfg), watched)
    assert f"not watching {later_key}: named after start" in caplog.text
    assert {path for path, _ in second.dependencies} == {path for path, _ in first.dependencies}
