"""Bad input fails fast, as one ConfigError naming its source (issue 12 items 1, 4 and 6, the agent's side).

Each case was a traceback, an Envoy crash loop or a read that never ended before. At start-up these are exit 78
with one line; on a file change the supervisor rejects them and keeps the running Envoy (tests/supervisor).
"""

# ruff: noqa: RUF001 (the inputs are non-ASCII digits on purpose)
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bootstrap import render_bootstrap
from agent.bootstrap.write import check_config_dir
from agent.cli import main
from agent.commands import proxy as proxy_command
from agent.commands.proxy import config_yaml, desired_state_fn, render_desired_state
from agent.config import NodeOverrides, ProxyFlags, flags_from_args, load_agent_config
from agent.config.agent_config import AgentConfig, reload_files
from agent.config.envvars import Environment
from agent.errors import ConfigError, ExitCode
from agent.files import write_error
from agent.status.settings import StatusSettings

ANNOTATIONS = "annotations"


def load(
    tmp_path: Path,
    env: dict[str, str] | None = None,
    proxy_config: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    **flags: Any,
) -> AgentConfig:
    if annotations is not None:
        lines = [f"{key}={json.dumps(value)}" for key, value in annotations.items()]
        (tmp_path / ANNOTATIONS).write_text("\n".join(lines) + "\n")
    pc = {"configPath": str(tmp_path / "proxy"), **(proxy_config or {})}
    environ = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "PROXY_CONFIG": json.dumps(pc), **(env or {})}
    overrides = NodeOverrides(
        labels_path=str(tmp_path / "labels"), annotations_path=str(tmp_path / ANNOTATIONS), instance_ips=("10.1.1.1",)
    )
    return load_agent_config(ProxyFlags(mesh_config=str(tmp_path / "mesh"), **flags), environ, overrides)


def refused(tmp_path: Path, match: str, **kwargs: Any) -> ConfigError:
    """Loading and rendering the configuration raises exactly a ConfigError whose text contains `match`."""
    with pytest.raises(ConfigError) as info:
        render_bootstrap(load(tmp_path, **kwargs))
    assert match in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    return info.value


# ---- Unicode digits: Python's str.isdigit()/int()/\d take them, Go's strconv and ParseDuration do not ----


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"annotations": {"status.sidecar.istio.io/port": "²"}}, "status.sidecar.istio.io/port: '²' is not a valid"),
        ({"annotations": {"status.sidecar.istio.io/port": "١٥٠٢٠"}}, "status.sidecar.istio.io/port"),
        ({"proxy_config": {"drainDuration": "٤٥s"}}, "drainDuration: invalid duration '٤٥s'"),
        ({"annotations": {"sidecar.istio.io/statsFlushInterval": "٥s"}}, "statsFlushInterval: invalid duration"),
        ({"proxy_config": {"proxyAdminPort": "١٥٠٠٠"}}, "proxyAdminPort: expected an integer"),
        ({"env": {"ENVOY_STATUS_PORT": "١٥٠٢١"}}, "env ENVOY_STATUS_PORT: expected an integer, got '١٥٠٢١'"),
        ({"env": {"ISTIO_CPU_LIMIT": "2_000"}}, "env ISTIO_CPU_LIMIT: expected an integer"),
        ({"proxy_config": {"tracing": {"zipkin": {"address": "zipkin:²"}}}}, "tracing.zipkin.address: 'zipkin:²'"),
        (
            {"proxy_config": {"proxyMetadata": {"ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "²"}}},
            "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS: expected a non-negative integer",
        ),
    ],
)
def test_non_ascii_digits_are_refused_as_go_refuses_them(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    refused(tmp_path, match, **kwargs)


def test_ascii_forms_go_accepts_still_work(tmp_path: Path) -> None:
    cfg = load(tmp_path, annotations={"status.sidecar.istio.io/port": "+15021"}, proxy_config={"drainDuration": "45s"})
    assert (cfg.proxy.status_port, cfg.proxy.drain_duration) == (15021, 45.0)


def test_flag_with_unicode_digits_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^flag --concurrency: expected an integer, got '٤'"):
        flags_from_args(argparse.Namespace(concurrency="٤"))


def test_status_server_ports_in_unicode_digits_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^env ISTIO_PROMETHEUS_ANNOTATIONS: port: must be an integer port"):
        StatusSettings.from_env(Environment({"ISTIO_PROMETHEUS_ANNOTATIONS": '{"port": "٨٠"}'}))


# ---- NUL bytes in paths ----


@pytest.mark.parametrize(
    ("proxy_config", "match"),
    [
        ({"customConfigFile": "/etc/envoy\x00.json"}, "customConfigFile: a path must not contain a NUL byte"),
        ({"proxyBootstrapTemplatePath": "/t\x00.j2"}, "proxyBootstrapTemplatePath: a path must not contain a NUL"),
        (
            {"proxyMetadata": {"ISTIO_META_TLS_CLIENT_KEY": "/etc/key\x00.pem"}},
            "proxyMetadata.ISTIO_META_TLS_CLIENT_KEY: a path must not contain a NUL byte",
        ),
        (
            {
                "tracing": {
                    "zipkin": {"address": "z:9411"},
                    "tlsSettings": {"mode": "SIMPLE", "caCertificates": "/\x00"},
                }
            },
            "tracing.tlsSettings.caCertificates: a path must not contain a NUL byte",
        ),
    ],
)
def test_nul_bytes_in_paths_are_refused(tmp_path: Path, proxy_config: dict[str, Any], match: str) -> None:
    # Through the annotation, as kubelet writes it (Go %q: "\x00"), the way a runtime change brings it.
    annotation = json.dumps({"configPath": str(tmp_path / "proxy"), **proxy_config})
    refused(tmp_path, match, annotations={"proxy.istio.io/config": annotation})


# ---- a changed configuration: only ConfigError leaves the render ----


def test_a_changed_configuration_with_bad_input_is_a_config_error(tmp_path: Path) -> None:
    cfg = load(tmp_path, annotations={})
    render = desired_state_fn(cfg, {}, render_desired_state(cfg, {}))
    render()  # the start-up state, handed over once
    (tmp_path / ANNOTATIONS).write_text('status.sidecar.istio.io/port="²"\n')
    with pytest.raises(ConfigError, match=r"status\.sidecar\.istio\.io/port: '²' is not a valid port"):
        render()
    (tmp_path / ANNOTATIONS).write_text('proxy.istio.io/config="customConfigFile: \\"/a\\\\x00b\\""\n')
    with pytest.raises(ConfigError, match="customConfigFile: a path must not contain a NUL byte"):
        render()


def test_an_unexpected_error_while_rendering_a_change_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load(tmp_path)
    render = desired_state_fn(cfg, {}, render_desired_state(cfg, {}))
    render()

    def broken(cfg: AgentConfig) -> bytes:
        raise KeyError("a defect")

    monkeypatch.setattr(proxy_command, "render_bootstrap", broken)
    with pytest.raises(ConfigError, match=r"^changed configuration: unexpected KeyError: 'a defect'"):
        render()


annotation_values = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["²", "٤٥s", "0s", "-1", "1e400", "NaN", ".nan", "([", "\x00", "{", "[1", "2562047h", "99999999999", "a:b:c"]
)
annotation_names = st.sampled_from(
    [
        "status.sidecar.istio.io/port",
        "sidecar.istio.io/statsFlushInterval",
        "sidecar.istio.io/statsEvictionInterval",
        "sidecar.istio.io/statsInclusionRegexps",
        "sidecar.istio.io/statsInclusionPrefixes",
        "sidecar.istio.io/statsHistogramBuckets",
        "sidecar.istio.io/extraStatTags",
        "sidecar.istio.io/discoveryAddress",
        "proxy.istio.io/config",
        "traffic.sidecar.istio.io/excludeInterfaces",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(annotation_names, annotation_values, max_size=4))
def test_any_annotation_values_render_or_raise_config_error_only(tmp_path: Path, annotations: dict[str, str]) -> None:
    with contextlib.suppress(ConfigError):
        render_bootstrap(reload_files(load(tmp_path, annotations=annotations)))


# ---- agent-side validation: what Envoy would refuse only after it started ----


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"proxy_component_log_level": "nosuch:info"}, "'nosuch' is not one of Envoy's log components"),
        ({"proxy_log_level": "info,nosuch:debug"}, "nosuch:debug: 'nosuch' is not one of Envoy's log components"),
        ({"proxy_config": {"drainDuration": "2562047h"}}, "drainDuration: 9223369200s is more than Envoy's"),
        ({"proxy_config": {"parentShutdownDuration": "1200000h"}}, "parentShutdownDuration: 4320000000s is more"),
        ({"proxy_config": {"fileFlushInterval": "1200h"}}, "fileFlushInterval: 4320000s is more than Envoy's"),
        ({"proxy_config": {"drainDuration": "1.5s"}}, "drainDuration: 1.500s: must be whole seconds, >= 1s"),
        ({"proxy_config": {"drainDuration": "0s"}}, "drainDuration: 0s: must be whole seconds, >= 1s"),
        ({"proxy_config": {"concurrency": 100000}}, "concurrency: 100000 is not in [0, 1024]"),
        ({"env": {"ISTIO_CPU_LIMIT": "5000"}}, "concurrency: 5000 is not in [0, 1024] (ProxyConfig, ISTIO_CPU_LIMIT"),
        ({"annotations": {"sidecar.istio.io/statsFlushInterval": "0s"}}, "0s is not in Envoy's range [1ms, 300s)"),
        ({"annotations": {"sidecar.istio.io/statsFlushInterval": "5m"}}, "300s is not in Envoy's range [1ms, 300s)"),
        (
            {"annotations": {"sidecar.istio.io/statsEvictionInterval": "0s"}},
            "statsEvictionInterval: 0s is below Envoy's minimum of 1ms",
        ),
        (
            {"annotations": {"sidecar.istio.io/statsInclusionRegexps": "(["}},
            "statsInclusionRegexps: '([' is not a valid RE2 regexp: missing ]: [",
        ),
        (
            {"annotations": {"sidecar.istio.io/statsInclusionRegexps": "a(?=b)"}},
            "'a(?=b)' is not a valid RE2 regexp",  # Python's re takes a lookahead; Envoy's RE2 does not
        ),
        (
            {"proxy_config": {"proxyStatsMatcher": {"inclusionRegexps": ["x{1000}{1000}"]}}},
            "proxyStatsMatcher.inclusionRegexps: 'x{1000}{1000}'",
        ),
        (
            {"proxy_config": {"proxyStatsMatcher": {"inclusionRegexps": ["x{1000}" * 33]}}},
            "RE2 program size 33004 is above re2.max_program_size (32768)",  # compiles, but Envoy refuses it
        ),
        ({"proxy_config": {"tracing": {"zipkin": {"address": "z:9411"}, "sampling": ".nan"}}}, "tracing.sampling"),
        (
            {"annotations": {"sidecar.istio.io/statsInclusionPrefixes": "cluster.,"}},
            "statsInclusionPrefixes: an empty entry",
        ),
        (
            {"proxy_config": {"proxyStatsMatcher": {"inclusionSuffixes": ["_total", ""]}}},
            "ProxyConfig: proxyStatsMatcher.inclusionSuffixes: an empty entry",
        ),
        (
            {"annotations": {"sidecar.istio.io/statsHistogramBuckets": '{"a": [0, 1]}'}},
            "statsHistogramBuckets: 'a': Envoy needs a non-empty prefix and unique buckets above 0",
        ),
        ({"annotations": {"sidecar.istio.io/statsHistogramBuckets": '{"a": [1, 1]}'}}, "unique buckets above 0"),
        ({"annotations": {"sidecar.istio.io/statsHistogramBuckets": '{"": [1]}'}}, "'': Envoy needs a non-empty"),
        (
            {"proxy_config": {"envoyMetricsService": {"address": "m:1", "tcpKeepalive": {"time": "2562047h"}}}},
            "envoyMetricsService.tcpKeepalive.time: 9223369200s is more than 4294967295s",
        ),
        (
            {"proxy_config": {"runtimeValues": {"overload.global_downstream_max_connections": "9" * 40}}},
            "runtimeValues.overload.global_downstream_max_connections: expected a non-negative integer (int64)",
        ),
        ({"env": {"ISTIO_METAJSON_X": '{"a": 1e400}'}}, "env ISTIO_METAJSON_X: not valid JSON: number 1e400"),
        ({"env": {"ISTIO_METAJSON_X": '{"a": NaN}'}}, "env ISTIO_METAJSON_X: not valid JSON: NaN is not valid JSON"),
    ],
)
def test_what_envoy_would_refuse_is_refused_before_it_starts(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    if "sampling" in json.dumps(kwargs):
        # YAML spelling: PROXY_CONFIG is YAML, and `.nan` is YAML's NaN.
        kwargs = {"env": {"PROXY_CONFIG": f"{{configPath: {tmp_path}/proxy, tracing: {{sampling: .nan}}}}"}}
    refused(tmp_path, match, **kwargs)


def test_regexps_re2_accepts_and_python_does_not_are_kept(tmp_path: Path) -> None:
    cfg = load(tmp_path, annotations={"sidecar.istio.io/statsInclusionRegexps": r"\pL+_total"})
    matcher = json.loads(render_bootstrap(cfg))["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"]
    assert {"safe_regex": {"regex": r"\pL+_total"}} in matcher


def test_undecodable_env_bytes_and_lone_surrogates_reach_the_bootstrap_as_go_writes_them(tmp_path: Path) -> None:
    # os.environ hands an undecodable byte over as a lone surrogate (surrogateescape); Go's json.Marshal writes
    # U+FFFD for each invalid byte, and for a JSON "\ud800" escape.
    cfg = load(
        tmp_path,
        env={"ISTIO_META_RAW": "a\udcff\udcfeb", "POD_NAME": "p\udcff"},
        proxy_config={"proxyMetadata": {"ISTIO_META_SURROGATE": "x\ud800y"}},
    )
    node = json.loads(render_bootstrap(cfg))["node"]
    assert node["metadata"]["RAW"] == "a\ufffd\ufffdb"
    assert node["metadata"]["SURROGATE"] == "x\ufffdy"
    assert node["metadata"]["NAME"] == "p\ufffd"
    assert node["id"] == "sidecar~10.1.1.1~p\ufffd.ns~ns.svc.cluster.local"


def test_a_lightstep_token_with_a_lone_surrogate_is_written(tmp_path: Path) -> None:
    tracing = {"lightstep": {"address": "ls:8080", "accessToken": "t\ud800k"}}
    cfg = load(tmp_path, proxy_config={"tracing": tracing})
    render_desired_state(cfg, {})
    assert (tmp_path / "proxy" / "lightstep_access_token.txt").read_text() == "t\ufffdk"


def test_a_lightstep_token_that_cannot_be_written_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    tracing = {"lightstep": {"address": "ls:8080", "accessToken": "t"}}
    cfg = load(tmp_path, proxy_config={"configPath": str(tmp_path / "file" / "proxy"), "tracing": tracing})
    with pytest.raises(ConfigError, match=r"^effective ProxyConfig: configPath: cannot write .*lightstep_access_token"):
        render_desired_state(cfg, {})


def test_config_path_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cfg = load(tmp_path, proxy_config={"configPath": str(tmp_path / "file" / "proxy")})
    with pytest.raises(ConfigError, match=r"^effective ProxyConfig: configPath: cannot write .*: Not a directory"):
        check_config_dir(cfg)
    check_config_dir(load(tmp_path))  # created, writable
    assert (tmp_path / "proxy").is_dir()
    full = write_error(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert full.exit_code == ExitCode.STARTUP_FAILED and not isinstance(full, ConfigError)


# ---- start-up inputs that used to be tracebacks (issue 12 item 6) ----


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"node: {id: \xff\xfe}\n", "not valid UTF-8 (byte 11)"),
        (b"[" * 50_000, "not valid YAML"),
        (b"node: {cluster: .nan}\n", "nan is not a JSON number"),
        (b"node: !!set {a, b}\n", "a set value cannot be written as JSON"),
        (b"node: !!binary aGk=\n", "a bytes value cannot be written as JSON"),
    ],
)
def test_bad_bootstrap_override_is_one_config_error(tmp_path: Path, content: bytes, match: str) -> None:
    override = tmp_path / "override.yaml"
    override.write_bytes(content)
    cfg = load(tmp_path, env={"ISTIO_BOOTSTRAP_OVERRIDE": str(override)})
    with pytest.raises(ConfigError) as info:
        config_yaml(cfg)
    assert str(info.value).startswith(f"env ISTIO_BOOTSTRAP_OVERRIDE: {override}")
    assert match in str(info.value)


def test_bootstrap_override_dates_stay_strings_as_in_go(tmp_path: Path) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("node:\n  metadata: {since: 2024-01-02, at: 2001-12-14t21:59:43.10-05:00}\n")
    cfg = load(tmp_path, env={"ISTIO_BOOTSTRAP_OVERRIDE": str(override)})
    assert json.loads(config_yaml(cfg)) == {
        "node": {"metadata": {"since": "2024-01-02", "at": "2001-12-14t21:59:43.10-05:00"}}
    }


def test_dates_in_proxy_config_strings_stay_strings_as_in_go(tmp_path: Path) -> None:
    cfg = load(tmp_path, env={"PROXY_CONFIG": f"{{configPath: {tmp_path}/proxy, serviceCluster: 2024-01-02}}"})
    assert cfg.proxy.service_cluster == "2024-01-02"


@pytest.mark.parametrize(
    ("probers", "match"),
    [
        ('{"/app-health/a/readyz": {"tcpSocket": {"port": 1}, "timeoutSeconds": 1' + "0" * 400 + "}}", "int32"),
        ('{"/app-health/a/readyz": {"tcpSocket": {"port": 1}, "timeoutSeconds": NaN}}', "NaN is not valid JSON"),
        ('{"/app-health/a/readyz": {"tcpSocket": {"port": 1}, "timeoutSeconds": Infinity}}', "Infinity is not valid"),
        ('{"/app-health/a/readyz": {"tcpSocket": {"port": 1}, "timeoutSeconds": 1e400}}', "number 1e400 is out of"),
        ('{"/app-health/a/readyz": {"tcpSocket": {"port": 1}, "timeoutSeconds": 1.5}}', "int32), got 1.5"),
        ('{"/app-health/a/readyz": {"tcpSocket": {"port": 1e400}}}', "number 1e400 is out of range"),
    ],
)
def test_bad_app_probers_are_one_config_error(probers: str, match: str) -> None:
    with pytest.raises(ConfigError) as info:
        StatusSettings.from_env(Environment({"ISTIO_KUBE_APP_PROBERS": probers}))
    assert str(info.value).startswith("env ISTIO_KUBE_APP_PROBERS: ")
    assert match in str(info.value)


@pytest.mark.parametrize(
    "case",
    [
        (["--meshConfig", "/dev/zero"], {}, "/dev/zero: /dev/zero is larger than 16 MiB"),
        ([], {"ISTIO_BOOTSTRAP": "/dev/zero"}, "template /dev/zero: /dev/zero is larger than 16 MiB"),
        ([], {"ISTIO_KUBE_APP_PROBERS": '{"/app-health/a/readyz": {"tcpSocket": {"port": NaN}}}'}, "NaN is not valid"),
        (["--proxyComponentLogLevel", "nosuch:info"], {}, "'nosuch' is not one of Envoy's log components"),
        # A path component over 255 bytes: Path.is_file() raises ENAMETOOLONG (was a traceback from the mesh side).
        ([], {"XDS_ROOT_CA": "r" * 300}, "env XDS_ROOT_CA: " + "r" * 300 + ": does not exist"),
    ],
)
def test_start_up_refuses_with_exit_78_and_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: tuple[list[str], dict[str, str], str],
) -> None:
    argv, env, line = case
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROXY_CONFIG", json.dumps({"configPath": str(tmp_path / "proxy")}))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["proxy", "sidecar", *argv]) == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert line in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_fifo_as_a_configuration_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    # Opening a FIFO blocks until a writer comes: `--meshConfig=<fifo>` used to hang the start for ever (and the
    # same read at run time held the render thread). A subprocess, so that the old behaviour fails instead of hanging.
    os.mkfifo(tmp_path / "mesh")
    env = {**os.environ, "PROXY_CONFIG": json.dumps({"configPath": str(tmp_path / "proxy")})}
    argv = [sys.executable, "-m", "agent", "proxy", "sidecar", "--meshConfig", str(tmp_path / "mesh")]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == ExitCode.CONFIG_ERROR
    assert done.stderr.strip().splitlines()[-1].endswith(f"cannot read {tmp_path / 'mesh'}: not a regular file")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--local-xds-dir", "x" * 300], "flag --local-xds-dir: '" + "x" * 300 + "': File name too long"),
        (["-o", "/"], "flag --output: /: cannot write it: Is a directory"),
    ],
)
def test_render_refuses_with_exit_78_and_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    # Were tracebacks: `render` read its inputs without `proxy`'s one-line rule, and wrote -o unguarded.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROXY_CONFIG", json.dumps({"configPath": str(tmp_path / "proxy")}))
    assert main(["render", "sidecar", *argv]) == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.strip().endswith(line), err
    assert len(err.strip().splitlines()) == 1, err
