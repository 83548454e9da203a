"""The bootstrap: Istio's agent and ours write the same Envoy bootstrap for generated pod inputs.

Istio's `pilot-agent proxy sidecar` runs for real in a pod root (its working directory: the downward-API files,
the mesh config, the root certificate and Istio's bootstrap template where its image has them), with
`PROXY_CONFIG.binaryPath` pointing at a stand-in Envoy that keeps its `-c` file and exits. Ours renders through
the `render` command's own path (`load_agent_config` from the same env and files, `render_bootstrap`). Both run in
the same network namespace, since the node metadata lists the pod's addresses. The two files are compared as
parsed JSON; the normalisations: `ISTIO_VERSION` (Istio's binary built with `go install` reports "unknown"), and
stats intervals Istio prints as Go durations (a deliberate difference, see `GO_DURATION_FIELDS`).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from agent.bootstrap import render_bootstrap
from agent.cli import build_parser
from agent.config import flags_from_args, load_agent_config
from agent.errors import AgentError
from tests.bootstrap.golden import differences
from tests.conftest import require_root
from tests.differential.bootstrap_inputs import PodInputs, downward_api_text, pod_inputs
from tests.differential.budget import differential
from tests.support.istio import istio_binary, istio_source
from tests.support.mesh_pki import MeshCa
from tests.support.probes import enter_netns

pytestmark = [pytest.mark.istio, pytest.mark.root, pytest.mark.netns]

STAND_IN = """#!/bin/sh
# A stand-in Envoy: keep the bootstrap Istio's agent passes with -c, exit 0 (the agent then exits too).
while [ $# -gt 0 ]; do [ "$1" = "-c" ] && cp "$2" "$(dirname "$0")/bootstrap.json"; shift; done
exit 0
"""


@dataclass(frozen=True)
class Host:
    netns: str
    workdir: Path
    template: Path
    root_cert: bytes


@dataclass(frozen=True)
class Rendered:
    accepted: bool
    bootstrap: dict[str, Any]
    detail: str


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    require_root()
    name = f"bsdiff-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        for step in (
            ["link", "set", "lo", "up"],
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            ["link", "set", "eth0", "up"],
            ["addr", "add", "10.88.0.2/24", "dev", "eth0"],
            ["addr", "add", "fd00:88::2/64", "dev", "eth0", "nodad"],
        ):
            subprocess.run(["ip", "-n", name, *step], check=True, capture_output=True)
        yield Host(
            name,
            tmp_path_factory.mktemp("bootstrap-diff"),
            istio_source("tools/packaging/common/envoy_bootstrap.json"),
            MeshCa().root_pem,
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def pod_root(host: Host, inputs: PodInputs) -> Path:
    root = Path(tempfile.mkdtemp(dir=host.workdir))
    files = {
        "var/lib/istio/envoy/envoy_bootstrap_tmpl.json": host.template.read_bytes(),
        "var/run/secrets/istio/root-cert.pem": host.root_cert,
        "etc/istio/pod/labels": downward_api_text(inputs.labels).encode(),
        "etc/istio/pod/annotations": downward_api_text(inputs.annotations).encode(),
        "stand-in/envoy": STAND_IN.encode(),
    }
    if inputs.mesh:
        files["etc/istio/config/mesh"] = json.dumps(inputs.mesh).encode()  # JSON is YAML, without YAML 1.1's traps
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (root / "stand-in/envoy").chmod(0o755)
    return root


def pod_env(inputs: PodInputs, root: Path) -> dict[str, str]:
    """The case's env, with PROXY_CONFIG.binaryPath set to the stand-in (for both agents, so both report it)."""
    proxy_config = json.loads(inputs.env.get("PROXY_CONFIG", "{}"))
    proxy_config["binaryPath"] = str(root / "stand-in/envoy")
    return {**inputs.env, "PROXY_CONFIG": json.dumps(proxy_config)}


def run_istio(host: Host, root: Path, env: dict[str, str]) -> Rendered:
    command = ["ip", "netns", "exec", host.netns, str(istio_binary("pilot-agent")), "proxy", "sidecar"]
    done = subprocess.run(
        command, cwd=root, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60, check=False
    )
    output = root / "stand-in/bootstrap.json"
    if done.returncode != 0 or not output.exists():
        return Rendered(False, {}, (done.stdout + done.stderr)[-2000:])
    return Rendered(True, json.loads(output.read_text()), "")


def run_ours(host: Host, root: Path, env: dict[str, str]) -> Rendered:
    """`pilot-agent render sidecar`'s path, on a thread in the namespace, in the pod root."""
    box: dict[str, Rendered] = {}

    def work() -> None:
        enter_netns(Path("/run/netns", host.netns))
        try:
            cfg = load_agent_config(flags_from_args(build_parser().parse_args(["render", "sidecar"])), env)
            box["result"] = Rendered(True, json.loads(render_bootstrap(cfg)), "")
        except AgentError as exc:  # ConfigError included
            box["result"] = Rendered(False, {}, str(exc))

    with contextlib.chdir(root):  # the agent's relative paths (./etc/istio/pod/labels, ...) resolve in the pod root
        thread = threading.Thread(target=work, name="ours-in-netns")
        thread.start()
        thread.join()
    return box["result"]


GO_DURATION = re.compile(r"\A(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?\Z")
# Deliberate difference (README, "Differences from Istio's agent"): for a stats interval of a minute or more Istio
# prints Go's duration ("1m0s"), which Envoy refuses ("duration must end with a single 's'"); we print "60s".
GO_DURATION_FIELDS = ("stats_flush_interval", "stats_eviction_interval")


def _protobuf_duration(text: str) -> str:
    match = GO_DURATION.match(text)
    if not match or not text:
        return text
    hours, minutes, seconds = (float(part) if part else 0.0 for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    return f"{int(total)}s" if total == int(total) else f"{total}s"


def _integral_floats_as_ints(value: float) -> float | int:
    """JSON has one number type: Go's protojson prints a double 1.0 as `1`, Python's json as `1.0`."""
    return int(value) if value == int(value) else value


def comparable(bootstrap: dict[str, Any]) -> dict[str, Any]:
    copy = json.loads(json.dumps(bootstrap), parse_float=lambda text: _integral_floats_as_ints(float(text)))
    copy.get("node", {}).get("metadata", {}).pop("ISTIO_VERSION", None)
    for key in GO_DURATION_FIELDS:
        if isinstance(copy.get(key), str):
            copy[key] = _protobuf_duration(copy[key])
    return dict(copy)


@differential(default_examples=150)
@given(inputs=pod_inputs())
def test_same_bootstrap_as_istio(inputs: PodInputs, host: Host) -> None:
    root = pod_root(host, inputs)
    try:
        env = pod_env(inputs, root)
        istio = run_istio(host, root, env)
        ours = run_ours(host, root, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert istio.accepted, f"Istio's agent refused the input: {istio.detail}"
    assert ours.accepted, f"we refused what Istio accepts: {ours.detail}"
    diffs = differences(comparable(istio.bootstrap), comparable(ours.bootstrap))
    assert not diffs, "\n".join(diffs)
