"""PID 1: orphans are reaped, and the agent's own Envoy exit codes are never stolen (DESIGN habit 9)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.support.envoy import envoy_binary

pytestmark = [pytest.mark.envoy, pytest.mark.root, pytest.mark.slow]

NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]
ROOT = Path(__file__).resolve().parents[2]


def test_pid1_reaps_orphans_and_reports_every_envoy_exit_code(tmp_path: Path) -> None:
    require_root()
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    result = subprocess.run(
        [*NAMESPACE, sys.executable, "-m", "tests.supervisor.pid1_scenario", envoy_binary(), str(tmp_path), "240"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert report["exits"] == 240
    assert report["wrong"] == []
    assert report["reaped"] > 20  # orphans were really re-parented to PID 1 and reaped
    assert report["reaped_codes"] == [3]
    assert report["zombies_left"] == []
