"""The start-up import contract of `pilot-agent proxy` (docs/internals.md, "Start-up order"): everything up to
Envoy's exec loads without the libraries only needed afterwards, so their import cost overlaps Envoy's own start."""

from __future__ import annotations

import subprocess
import sys

# Loaded after epoch 0 is exec'd (agent/commands/proxy.py _supervise), never before.
AFTER_EXEC = ("aiohttp", "prometheus_client", "tenacity", "watchdog")


def test_the_proxy_command_imports_none_of_the_post_exec_libraries() -> None:
    # A fresh interpreter: this test process has imported everything already.
    probe = (
        "import sys\n"
        "from agent.cli import build_parser\n"
        "build_parser(only='proxy')\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split()
    assert "agent" in loaded  # the probe ran the command's imports
    assert [name for name in AFTER_EXEC if name in loaded] == []
