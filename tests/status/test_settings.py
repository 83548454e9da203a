"""Environment parsing: valid inputs become frozen settings; each bad input is one ConfigError naming var and key."""

from __future__ import annotations

import json

import pytest

from agent.config.envvars import Environment
from agent.errors import ConfigError, ExitCode
from agent.status.settings import (
    AppProbe,
    GRPCAction,
    HTTPGetAction,
    ScrapeTarget,
    StatusSettings,
    TCPSocketAction,
    parse_app_probers,
    parse_prometheus_annotations,
)


def test_app_probers_of_every_kind() -> None:
    raw = json.dumps(
        {
            "/app-health/web/livez": {
                "httpGet": {
                    "path": "hello",
                    "port": 8080,
                    "scheme": "HTTPS",
                    "host": "ignored.example",
                    "httpHeaders": [{"name": "X-A", "value": "b"}],
                },
                "timeoutSeconds": 3,
            },
            "/app-health/web/readyz": {"tcpSocket": {"port": 8081}, "timeoutSeconds": 1},
            "/app-lifecycle/web/prestopz": {"grpc": {"port": 9000, "service": "x"}},
        }
    )
    assert parse_app_probers(raw) == {
        "/app-health/web/livez": AppProbe(HTTPGetAction(8080, "/hello", "HTTPS", (("X-A", "b"),)), 3.0),
        "/app-health/web/readyz": AppProbe(TCPSocketAction(8081), 1.0),
        "/app-lifecycle/web/prestopz": AppProbe(GRPCAction(9000, "x"), 1.0),
    }
    assert parse_app_probers("") == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            "{not json",
            "env ISTIO_KUBE_APP_PROBERS: not valid JSON: Expecting property name enclosed in double quotes at line 1"
            " column 2",
        ),
        ("[]", "env ISTIO_KUBE_APP_PROBERS: expected a JSON object, got list"),
        (
            '{"/healthz/web/readyz": {"tcpSocket": {"port": 1}}}',
            "env ISTIO_KUBE_APP_PROBERS: /healthz/web/readyz: key must",
        ),
        (
            '{"/app-health/web/readyz": {"tcpSocket": {"port": 1}, "httpGet": {"port": 1}}}',
            "env ISTIO_KUBE_APP_PROBERS: /app-health/web/readyz: must have exactly one of httpGet, tcpSocket, grpc",
        ),
        ('{"/app-health/web/readyz": {}}', "env ISTIO_KUBE_APP_PROBERS: /app-health/web/readyz: must have exactly one"),
        (
            '{"/app-health/web/readyz": {"httpGet": {"port": "http"}}}',
            "env ISTIO_KUBE_APP_PROBERS: /app-health/web/readyz.httpGet.port: must be an integer port, got 'http'",
        ),
        (
            '{"/app-health/web/readyz": {"tcpSocket": {"port": 70000}}}',
            "env ISTIO_KUBE_APP_PROBERS: /app-health/web/readyz.tcpSocket.port: port 70000 is out of range 1-65535",
        ),
        (
            '{"/app-health/web/readyz": {"tcpSocket": {"port": 8080.5}}}',
            "env ISTIO_KUBE_APP_PROBERS: /app-health/web/readyz.tcpSocket.port: must be an integer port, got 8080.5",
        ),
        (
            '{"/app-health/web/readyz": {"grpc": {}}}',
            "env ISTIO_KUBE_APP_PROBERS: /app-health/web/readyz.grpc.port: is required",
        ),
        (
            '{"/app-health/web/readyz": {"httpGet": {"port": 1, "scheme": "FTP"}}}',
            "env ISTIO_KUBE_APP_PROBERS: /app-health/web/readyz.httpGet.scheme: must be HTTP or HTTPS",
        ),
        (
            '{"/app-health/web/readyz": {"tcpSocket": {"port": 1}, "timeoutSeconds": "soon"}}',
            "env ISTIO_KUBE_APP_PROBERS: /app-health/web/readyz.timeoutSeconds: must be a non-negative integer",
        ),
        (
            '{"/app-health/web/readyz": {"httpGet": {"port": 1, "httpHeaders": [{"value": "x"}]}}}',
            "env ISTIO_KUBE_APP_PROBERS: /app-health/web/readyz.httpGet.httpHeaders[0]: must be",
        ),
    ],
)
def test_malformed_app_probers_name_the_variable_and_key(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        StatusSettings.from_env(Environment({"ISTIO_KUBE_APP_PROBERS": raw}))
    assert str(error.value).startswith(message)
    assert error.value.exit_code == ExitCode.CONFIG_ERROR


def test_prometheus_annotations() -> None:
    assert parse_prometheus_annotations('{"scrape":"true","path":"/m","port":"8080"}', 15020) == (
        ScrapeTarget(8080, "/m"),
    )
    assert parse_prometheus_annotations('{"scrape":"true"}', 15020) == (ScrapeTarget(80, "/metrics"),)
    assert parse_prometheus_annotations('{"scrape":"false","port":"8080"}', 15020) == ()
    targets = '{"scrape":"true","targets":[{"port":"8080","path":"/a"},{"port":9090}]}'
    assert parse_prometheus_annotations(targets, 15020) == (ScrapeTarget(8080, "/a"), ScrapeTarget(9090, "/metrics"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"port": "80', "env ISTIO_PROMETHEUS_ANNOTATIONS: not valid JSON: Unterminated string starting at"),
        ('{"port": "eighty"}', "env ISTIO_PROMETHEUS_ANNOTATIONS: port: must be an integer port, got 'eighty'"),
        ('{"port": "15020"}', "env ISTIO_PROMETHEUS_ANNOTATIONS: port: port 15020 is the status port itself"),
        (
            '{"targets": [{"port": "15090"}]}',
            "env ISTIO_PROMETHEUS_ANNOTATIONS: targets[0].port: port 15090 is reserved by the sidecar",
        ),
        (
            '{"targets": [{"port": "8080"}, {"port": "0"}]}',
            "env ISTIO_PROMETHEUS_ANNOTATIONS: targets[1].port: port 0 is out of range 1-65535",
        ),
        ('{"targets": "8080:/m"}', "env ISTIO_PROMETHEUS_ANNOTATIONS: targets: must be a list"),
        ('{"path": 5, "port": "80"}', "env ISTIO_PROMETHEUS_ANNOTATIONS: path: must be a string"),
    ],
)
def test_malformed_annotations_name_the_variable_and_key(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        StatusSettings.from_env(Environment({"ISTIO_PROMETHEUS_ANNOTATIONS": raw}))
    assert str(error.value).startswith(message)


def test_from_env_destinations_and_switches() -> None:
    env = {
        "INSTANCE_IP": "10.1.2.3",
        "PILOT_AGENT_MERGE_ENVOY_STATS": "false",
        "METRICS_LOCALHOST_ACCESS_ONLY": "true",
        "ISTIO_PROMETHEUS_ANNOTATIONS": '{"port":"8080"}',
    }
    settings = StatusSettings.from_env(Environment(env), status_port=15020)
    assert settings.probe_host == "10.1.2.3" and settings.probe_source_ip == "127.0.0.6"
    assert not settings.merge_envoy_stats and settings.metrics_localhost_only
    assert settings.scrape_targets == (ScrapeTarget(8080, "/metrics"),)
    legacy = StatusSettings.from_env(Environment({**env, "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION": "true"}))
    assert legacy.probe_host == "localhost"
    assert StatusSettings.from_env(Environment({"INSTANCE_IP": "fd00::5"})).probe_source_ip == "::6"
    # Istio merges application metrics for sidecars only.
    assert StatusSettings.from_env(Environment(env), proxy_type="router").scrape_targets == ()


def test_bad_boolean_names_the_variable() -> None:
    expected = r"^env METRICS_LOCALHOST_ACCESS_ONLY: expected true or false, got 'yes please'"
    with pytest.raises(ConfigError, match=expected):
        StatusSettings.from_env(Environment({"METRICS_LOCALHOST_ACCESS_ONLY": "yes please"}))
