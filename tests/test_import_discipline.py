"""The start-up import contract of `pilot-agent proxy` (docs/internals.md, "Start-up order"): everything up to
Envoy's exec loads without the libraries only needed afterwards, so their import cost overlaps Envoy's own start.
`istio-iptables` (the pod's init container) loads none of the agent's heavier libraries at all."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

import agent.config

# Loaded after epoch 0 is exec'd (agent/commands/proxy_run.py), never before.
AFTER_EXEC = ("aiohttp", "prometheus_client", "tenacity", "watchdog")
# Without a control plane epoch 0 is exec'd before the event loop exists (agent/commands/proxy.py run); the mesh
# side's sockets need the loop and grpc, which proxy_run loads.
AFTER_EXEC_WITHOUT_A_CONTROL_PLANE = ("asyncio", "grpc", "cryptography")
# What `istio-iptables` has no use for: the bootstrap's, the status server's and the supervisor's libraries.
NOT_FOR_CAPTURE = ("yaml", "jinja2", "re2", *AFTER_EXEC)


def _loaded_by(command: str) -> list[str]:
    """Top-level modules a fresh interpreter has loaded once the CLI has set up `command` (this test process has
    imported everything already)."""
    probe = (
        "import sys\n"
        "from agent.cli import build_parser\n"
        f"build_parser(only={command!r})\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split()
    assert "agent" in loaded  # the probe ran the command's imports
    return loaded


def test_the_proxy_command_imports_none_of_the_post_exec_libraries() -> None:
    loaded = _loaded_by("proxy")
    assert [name for name in (*AFTER_EXEC, *AFTER_EXEC_WITHOUT_A_CONTROL_PLANE) if name in loaded] == []


def test_istio_iptables_imports_none_of_the_agents_heavier_libraries() -> None:
    loaded = _loaded_by("istio-iptables")
    assert [name for name in NOT_FOR_CAPTURE if name in loaded] == []


def test_agent_config_loads_its_names_on_first_use() -> None:
    # agent/config/__init__.py defers its imports so env_settings stays cheap; every exported name still resolves.
    assert all(getattr(agent.config, name) is not None for name in agent.config.__all__)


def _aiohttp_import_probe(env: dict[str, str]) -> list[str]:
    probe = (
        "import os, ssl\n"
        "import agent.aiohttp_import\n"
        "import aiohttp.connector as c\n"
        "for context in (c._SSL_CONTEXT_VERIFIED, c._SSL_CONTEXT_UNVERIFIED):\n"
        "    print(context.cert_store_stats()['x509'])\n"
        "print(os.environ.get('SSL_CERT_FILE', '<unset>'))\n"
        "print(ssl.create_default_context().cert_store_stats()['x509'] > 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=env)
    return result.stdout.split()


def test_aiohttp_is_imported_without_the_system_ca_bundle_and_the_environment_is_restored() -> None:
    # The agent's aiohttp contexts never verify a server (admin and scrapes are plain HTTP, app probes ssl=False):
    # the bundle, ~30 ms of parsing per context at import, is not read; a context made afterwards reads it.
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    bundle = ssl.get_default_verify_paths().openssl_cafile
    assert _aiohttp_import_probe(env) == ["0", "0", "<unset>", "True"]
    assert _aiohttp_import_probe({**env, "SSL_CERT_FILE": bundle}) == ["0", "0", bundle, "True"]


def _mime_probe(first: str) -> list[str]:
    probe = (
        f"{first}\n"
        "import hashlib, mimetypes\n"
        "from aiohttp.web_fileresponse import CONTENT_TYPES\n"
        "loaded = getattr(mimetypes, '_db', None) is not None\n"
        "tables = repr((CONTENT_TYPES.types_map, CONTENT_TYPES.encodings_map, CONTENT_TYPES.suffix_map))\n"
        "digest = hashlib.sha256(tables.encode()).hexdigest()\n"
        "print(loaded, digest, mimetypes.guess_type('x.deb')[0], mimetypes.guess_extension('text/x-c++src'))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return result.stdout.split()


def test_aiohttp_web_is_imported_without_loading_the_system_mime_types() -> None:
    # aiohttp.web's MimeTypes() would load /etc/mime.types into the mimetypes module (~0.4 MiB nobody reads); after
    # agent.aiohttp_import it does not, aiohttp's own table is the same, and mimetypes' functions still load and
    # answer from the system database when called.
    plain = _mime_probe("import aiohttp.web")
    ours = _mime_probe("import agent.aiohttp_import, aiohttp.web")
    assert plain[0] == "True"
    assert ours[0] == "False"
    assert ours[1:] == plain[1:]
