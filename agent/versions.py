"""What this agent is and what it follows: its own version, the Istio it reproduces, the Envoy it runs.

`ISTIO_MODULE_VERSION` is the one place the project names the Istio it follows (the tests' yardstick builds Istio's
binaries and reads its goldens at this version); `ISTIO_COMPAT_VERSION` is what the agent tells istiod it is (node
metadata ISTIO_VERSION: istiod gates features on it).
"""

from __future__ import annotations

import re
import subprocess

ISTIO_MODULE = "istio.io/istio"
ISTIO_MODULE_VERSION = "v0.0.0-20260827124520-eed52ebb66ad"
ISTIO_COMPAT_VERSION = "1.28.0"
ENVOY_SERIES = "1.40"

# envoy --version: "<binary>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
_ENVOY_VERSION = re.compile(r"version: [0-9a-f]+/(?P<version>\d+\.\d+\.\d+[^/]*)/")


def istio_followed() -> str:
    return f"{ISTIO_MODULE}@{ISTIO_MODULE_VERSION}"


def envoy_version(binary: str, timeout: float = 5.0) -> str | None:
    """The version `binary --version` reports (e.g. "1.40.0"), None when it cannot say. Blocking (~30 ms)."""
    try:
        done = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _ENVOY_VERSION.search(done.stdout + done.stderr)
    return match["version"] if match else None
