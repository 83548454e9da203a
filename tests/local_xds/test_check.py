"""The local xDS files are checked before Envoy starts: what Envoy would refuse before reading a field is one
line naming the file (and the line or entry), exit 78, and no Envoy started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config.local_xds import CDS, LDS, check_file
from agent.errors import ConfigError
from tests.support.envoy import direct_response_lds

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "agent" / "examples" / "local"


def test_the_bundled_example_passes() -> None:
    assert check_file(EXAMPLE / "lds.yaml", LDS) == 2
    assert check_file(EXAMPLE / "cds.yaml", CDS) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("resources: [ {bad\n", "{path}:2: not valid YAML: "),
        ("- a\n- b\n", "{path}: expected a mapping with a `resources:` list of listeners"),
        ("resources: 3\n", "{path}: expected a mapping with a `resources:` list of listeners"),
        ("resources:\n- just a string\n", "{path}: resources[0]: expected a mapping (a listener), got 'just a string'"),
        ("resources:\n- name: x\n", '{path}: resources[0]: "@type" must be type.googleapis.com/envoy.config.listener'),
        (
            'resources:\n- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: c\n',
            '{path}: resources[0]: "@type" must be type.googleapis.com/envoy.config.listener.v3.Listener, got',
        ),
        ('resources:\n- "@type": type.googleapis.com/envoy.config.listener.v3.Listener\n', "a listener needs a name"),
    ],
)
def test_what_envoy_would_refuse_is_one_config_error_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "lds.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        check_file(path, LDS)
    assert message.format(path=path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "resources: []\n",
        direct_response_lds(8080),
        '{"resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "j"}]}',
        'resources:\n- "@type": type.googleapis.com/envoy.service.discovery.v3.Resource\n  resource: {}\n',
    ],
    ids=["empty", "yaml", "json", "resource-wrapper"],
)
def test_what_envoy_reads_passes(tmp_path: Path, text: str) -> None:
    path = tmp_path / "lds.yaml"
    path.write_text(text)
    check_file(path, LDS)


def test_a_broken_file_stops_the_agent_before_envoy_starts(tmp_path: Path) -> None:
    xds = tmp_path / "xds"
    xds.mkdir()
    (xds / "lds.yaml").write_text("resources: [ {bad\n")
    (xds / "cds.yaml").write_text("resources: []\n")
    argv = [sys.executable, "-m", "agent", "proxy", "--local-xds-dir", str(xds), "--meshConfig", str(tmp_path / "x")]
    env = {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=30, env=env, check=False)
    assert done.returncode == 78
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{xds / 'lds.yaml'}:2: not valid YAML" in lines[0], done.stderr
    assert "Envoy" not in done.stderr and not (tmp_path / "etc").exists()  # nothing started, nothing written
