"""The command line's contract: subcommands exist, unknown flags warn, bad usage exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.cli import main
from agent.errors import ExitCode


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], check=False, capture_output=True, text=True, timeout=60
    )


def test_version_short_prints_only_the_version() -> None:
    result = run_cli("version", "--short")
    assert result.returncode == 0
    assert result.stdout.strip().count(".") == 2


def test_unknown_flag_is_a_warning_not_an_error() -> None:
    result = run_cli("version", "--short", "--drainDuration", "45s")
    assert result.returncode == 0
    assert "ignoring unknown flags: --drainDuration" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == ExitCode.USAGE
    assert "Traceback" not in result.stderr


def test_bad_log_level_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--log_output_level", "default:loud", "version"]) == ExitCode.CONFIG_ERROR
    assert "--log_output_level" in capsys.readouterr().err
