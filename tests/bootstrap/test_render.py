"""Rendering, template selection, atomic writes, dependencies, and the `render` command."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bootstrap import bootstrap_dependencies, bootstrap_path, render_bootstrap, write_atomic, write_bootstrap
from agent.config import NodeOverrides, ProxyFlags, load_agent_config
from agent.config.agent_config import AgentConfig
from agent.errors import ConfigError, ExitCode


def load(
    tmp_path: Path, env: dict[str, str] | None = None, proxy_config: dict[str, Any] | None = None, **flags: Any
) -> AgentConfig:
    pc = {"configPath": str(tmp_path / "proxy"), **(proxy_config or {})}
    environ = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "PROXY_CONFIG": json.dumps(pc), **(env or {})}
    overrides = NodeOverrides(
        labels_path=str(tmp_path / "labels"), annotations_path=str(tmp_path / "annotations"), instance_ips=("10.1.1.1",)
    )
    return load_agent_config(ProxyFlags(mesh_config=str(tmp_path / "mesh"), **flags), environ, overrides)


def rendered(cfg: AgentConfig) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(render_bootstrap(cfg))
    return result


def test_pod_identity_and_ports_reach_the_bootstrap(tmp_path: Path) -> None:
    (tmp_path / "labels").write_text('app="reviews"\npod-template-hash="abc"\nistio-locality="us.east.a"\n')
    cfg = load(
        tmp_path,
        {"ISTIO_META_MESH_ID": "m1", "ENVOY_STATUS_PORT": "25021"},
        {"proxyAdminPort": 25000, "statusPort": 25020},
    )
    boot = rendered(cfg)
    assert boot["node"]["id"] == "sidecar~10.1.1.1~p.ns~ns.svc.cluster.local"
    assert boot["node"]["cluster"] == "reviews.ns"
    assert boot["node"]["locality"] == {"region": "us", "zone": "east", "sub_zone": "a"}
    meta = boot["node"]["metadata"]
    assert meta["LABELS"] == {"app": "reviews", "istio-locality": "us/east/a"}  # pod-template-hash dropped
    assert (meta["MESH_ID"], meta["NAME"], meta["NAMESPACE"], meta["ENVOY_STATUS_PORT"]) == ("m1", "p", "ns", 25021)
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 25000}
    listeners = {lst["name"]: lst for lst in boot["static_resources"]["listeners"]}
    assert set(listeners) == {"0.0.0.0_15090", "0.0.0.0_25021"}
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    agent_ep = clusters["agent"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert agent_ep["address"]["socket_address"]["port_value"] == 25020
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"


def test_template_selection_istio_bootstrap_then_template_file(tmp_path: Path) -> None:
    (tmp_path / "a.j2").write_text('{"which": "a", "id": {{ node_id | json }}}')
    (tmp_path / "b.j2").write_text('{"which": "b"}')
    assert rendered(load(tmp_path, template_file=str(tmp_path / "a.j2")))["which"] == "a"
    both = load(tmp_path, {"ISTIO_BOOTSTRAP": str(tmp_path / "b.j2")}, template_file=str(tmp_path / "a.j2"))
    assert rendered(both) == {"which": "b"}


def test_yaml_template_renders_yaml_to_envoy_rev_yaml(tmp_path: Path) -> None:
    template = tmp_path / "bootstrap.yaml.j2"
    template.write_text("node:\n  id: {{ node_id | json }}\n")
    cfg = load(tmp_path, template_file=str(template))
    assert bootstrap_path(cfg).name == "envoy-rev.yaml"
    assert render_bootstrap(cfg).decode().startswith('node:\n  id: "sidecar~')
    template.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match=r"\.yaml\.j2: rendered output:2: not valid YAML: expected ',' or '\]'"):
        render_bootstrap(cfg)


def test_custom_config_file_is_used_as_is(tmp_path: Path) -> None:
    custom = tmp_path / "envoy.yaml"
    custom.write_bytes(b"admin: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}\n{{ not a template")
    cfg = load(tmp_path, proxy_config={"customConfigFile": str(custom)})
    assert render_bootstrap(cfg) == custom.read_bytes()
    assert custom in bootstrap_dependencies(cfg)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ('{"a": {{ no_such_param }}}', "undefined template variable: 'no_such_param' is undefined"),
        ('{"a": {% if %}}', "template syntax error"),
        ('{"a": {{ node_id }}}', "rendered output is not valid JSON"),
    ],
)
def test_bad_template_names_the_template(tmp_path: Path, template: str, expected: str) -> None:
    path = tmp_path / "t.j2"
    path.write_text(template)
    with pytest.raises(ConfigError) as err:
        render_bootstrap(load(tmp_path, template_file=str(path)))
    assert str(err.value).startswith(f"template {path}") and expected in str(err.value)


def test_missing_template_and_custom_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="template file not found"):
        render_bootstrap(load(tmp_path, template_file=str(tmp_path / "nope.j2")))
    with pytest.raises(ConfigError, match=r"ProxyConfig customConfigFile: .*nope\.json: cannot read"):
        render_bootstrap(load(tmp_path, proxy_config={"customConfigFile": str(tmp_path / "nope.json")}))


@pytest.mark.parametrize(
    ("proxy_config", "expected"),
    [
        ({"tracing": {"zipkin": {"address": "zipkin"}}}, "ProxyConfig: tracing.zipkin.address: 'zipkin' is not host"),
        ({"statsdUdpAddress": "10.0.0.1"}, "ProxyConfig: statsdUdpAddress: '10.0.0.1' is not host:port"),
        ({"tracing": {"stackdriver": {}}}, "ProxyConfig: tracing.stackdriver: not supported"),
        ({"proxyMetadata": {"ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "lots"}}, "ProxyConfig: proxyMetadata.IST"),
    ],
)
def test_bad_proxy_config_values_caught_at_render(tmp_path: Path, proxy_config: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        render_bootstrap(load(tmp_path, proxy_config=proxy_config))
    assert str(err.value).startswith(expected)


def test_string_bool_metadata_must_be_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="env ISTIO_META_DNS_CAPTURE: DNS_CAPTURE: expected true or false"):
        render_bootstrap(load(tmp_path, {"ISTIO_META_DNS_CAPTURE": "sometimes"}))
    meta = rendered(load(tmp_path, {"ISTIO_META_DNS_CAPTURE": "True"}))["node"]["metadata"]
    assert meta["DNS_CAPTURE"] == "true"


def test_metajson_merges_into_top_level(tmp_path: Path) -> None:
    env = {"ISTIO_METAJSON_ANNOTATIONS": '{"a.b/c": "v"}', "ISTIO_METAJSON_LABELS": '{"app": "x"}'}
    meta = rendered(load(tmp_path, env))["node"]["metadata"]
    assert (meta["a.b/c"], meta["app"], meta["LABELS"], meta["STATIC_LABELS"]) == ("v", "x", {"app": "x"}, {"app": "x"})


def test_write_is_atomic_with_private_directory(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "envoy-rev.json"
    write_atomic(target, b"{}")
    write_atomic(target, b'{"v": 2}')
    assert target.read_bytes() == b'{"v": 2}'
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert os.listdir(target.parent) == ["envoy-rev.json"]  # no temp files left behind


def test_write_bootstrap_path_and_lightstep_token(tmp_path: Path) -> None:
    cfg = load(tmp_path, proxy_config={"tracing": {"lightstep": {"address": "ls:8080", "accessToken": "s3cret"}}})
    path = write_bootstrap(cfg, render_bootstrap(cfg))
    assert path == bootstrap_path(cfg) == tmp_path / "proxy" / "envoy-rev.json"
    token = tmp_path / "proxy" / "lightstep_access_token.txt"
    assert token.read_text() == "s3cret" and stat.S_IMODE(token.stat().st_mode) == 0o600
    tracer = json.loads(path.read_bytes())["tracing"]["http"]["typed_config"]
    assert tracer["access_token_file"] == str(token)


def test_dependencies_list_certs_inputs_and_referenced_files(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = load(
        tmp_path,
        {"ISTIO_META_TLS_CLIENT_ROOT_CERT": str(tmp_path / "override-root.pem"), "ISTIO_BOOTSTRAP_OVERRIDE": "/o.yaml"},
        {"tracing": {"zipkin": {"address": "z:9411"}, "tlsSettings": {"mode": "SIMPLE", "caCertificates": str(ca)}}},
    )
    deps = bootstrap_dependencies(cfg)
    for expected in (
        "/etc/certs/cert-chain.pem",
        "/etc/certs/key.pem",
        "/etc/certs/root-cert.pem",
        str(tmp_path / "override-root.pem"),
        str(tmp_path / "annotations"),
        str(tmp_path / "labels"),
        str(tmp_path / "mesh"),
        "/o.yaml",
    ):
        assert Path(expected) in deps
    assert ca not in deps  # the ISTIO_META_TLS_CLIENT_ROOT_CERT override replaces it, as in Istio
    assert any(p.name == "envoy_bootstrap.json.j2" for p in deps)


def test_local_xds_dir_switches_dynamic_resources_to_files(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    for name in ("lds.yaml", "cds.yaml"):
        (tmp_path / "x" / name).write_text("resources: []\n")
    dyn = rendered(load(tmp_path, local_xds_dir=str(tmp_path / "x")))["dynamic_resources"]
    assert "ads_config" not in dyn
    assert dyn["lds_config"]["path_config_source"] == {
        "path": str(tmp_path / "x" / "lds.yaml"),
        "watched_directory": {"path": str(tmp_path / "x")},
    }
    assert dyn["cds_config"]["path_config_source"]["path"] == str(tmp_path / "x" / "cds.yaml")


def run_cli(*argv: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *argv],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def test_render_command_prints_bootstrap(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.2.2.2"}
    result = run_cli("render", "sidecar", "--domain", "cluster.example", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["node"]["id"] == "sidecar~10.2.2.2~p.ns~cluster.example"
    assert not (tmp_path / "etc").exists()  # render writes nothing


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["render"], {"PROXY_CONFIG": "drainDuration: 5x"}, "env PROXY_CONFIG: drainDuration: invalid duration"),
        (["render"], {"ISTIO_METAJSON_LABELS": "nope"}, "env ISTIO_METAJSON_LABELS: not valid JSON"),
        (["render", "--templateFile", "/nonexistent.j2"], {}, "template /nonexistent.j2: template file not found"),
    ],
)
def test_render_command_bad_input_is_one_line_exit_78(
    tmp_path: Path, argv: list[str], env: dict[str, str], expected: str
) -> None:
    result = run_cli(*argv, env={"PATH": os.environ.get("PATH", ""), **env}, cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert int(ExitCode.CONFIG_ERROR) == 78  # documented in docs/reference.md
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


_ANNOTATION_KEYS = st.sampled_from(
    [
        "proxy.istio.io/config",
        "sidecar.istio.io/statsInclusionPrefixes",
        "sidecar.istio.io/statsInclusionRegexps",
        "sidecar.istio.io/extraStatTags",
        "sidecar.istio.io/statsHistogramBuckets",
        "sidecar.istio.io/statsFlushInterval",
        "sidecar.istio.io/statsEvictionInterval",
        "status.sidecar.istio.io/port",
        "sidecar.istio.io/discoveryAddress",
        "traffic.sidecar.istio.io/excludeInterfaces",
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(_ANNOTATION_KEYS, st.text(st.characters(codec="utf-8")), max_size=3) | st.text())
def test_arbitrary_annotations_file_raises_only_config_error(tmp_path: Path, content: dict[str, str] | str) -> None:
    if isinstance(content, dict):
        content = "".join(f"{k}={json.dumps(v, ensure_ascii=False)}\n" for k, v in content.items())
    (tmp_path / "annotations").write_text(content, encoding="utf-8", errors="surrogatepass")
    try:
        data = render_bootstrap(load(tmp_path))
    except ConfigError:
        return
    assert json.loads(data)["node"]["id"].startswith("sidecar~")


def test_packaged_template_renders_the_same_from_its_bytecode_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default template's compiled form is kept beside it (30-50 ms of every start), readable by every user: a
    start that loads it renders the same bytes without compiling; a cache that cannot be written changes nothing but
    the time."""
    import shutil  # noqa: PLC0415

    import jinja2  # noqa: PLC0415

    from agent.bootstrap import render  # noqa: PLC0415

    templates = tmp_path / "templates"
    shutil.copytree(render.PACKAGED_TEMPLATES, templates, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(render, "PACKAGED_TEMPLATES", templates)
    cfg = load(tmp_path, {"ISTIO_BOOTSTRAP": str(templates / render.DEFAULT_TEMPLATE)})
    render._environment.cache_clear()
    compiled = render_bootstrap(cfg)
    [cached] = (templates / "__pycache__").iterdir()
    assert cached.name.startswith("__jinja2_")
    # Readable by others (the image writes it as root at build time; the agent runs as 1337).
    assert cached.stat().st_mode & 0o777 == 0o644

    def no_compile(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("compiled although its bytecode is cached")

    monkeypatch.setattr(jinja2.Environment, "compile", no_compile)
    render._environment.cache_clear()  # a new start
    assert render_bootstrap(cfg) == compiled
    monkeypatch.undo()

    unwritable = tmp_path / "unwritable"
    shutil.copytree(templates, unwritable, ignore=shutil.ignore_patterns("__pycache__"))
    (unwritable / "__pycache__").write_text("a file where the cache directory would be")
    monkeypatch.setattr(render, "PACKAGED_TEMPLATES", unwritable)
    render._environment.cache_clear()
    assert render_bootstrap(load(tmp_path, {"ISTIO_BOOTSTRAP": str(unwritable / render.DEFAULT_TEMPLATE)})) == compiled
    render._environment.cache_clear()
