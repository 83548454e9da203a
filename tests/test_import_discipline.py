"""The start-up import contract of `pilot-agent proxy` (docs/internals.md, "Start-up order"): everything up to
Envoy's exec loads without the libraries only needed afterwards, so their import cost overlaps Envoy's own start.
`istio-iptables` (the pod's init container) loads none of the agent's heavier libraries at all."""

from __future__ import annotations

import subprocess
import sys

import agent.config

# Loaded after epoch 0 is exec'd (agent/commands/proxy.py _supervise), never before.
AFTER_EXEC = ("aiohttp", "prometheus_client", "tenacity", "watchdog")
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
    assert [name for name in AFTER_EXEC if name in loaded] == []


def test_istio_iptables_imports_none_of_the_agents_heavier_libraries() -> None:
    loaded = _loaded_by("istio-iptables")
    assert [name for name in NOT_FOR_CAPTURE if name in loaded] == []


def test_agent_config_loads_its_names_on_first_use() -> None:
    # agent/config/__init__.py defers its imports so env_settings stays cheap; every exported name still resolves.
    assert all(getattr(agent.config, name) is not None for name in agent.config.__all__)
