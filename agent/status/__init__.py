"""The status server (port 15020): readiness, merged Prometheus metrics, application probes, quit and drain."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.status.settings import StatusSettings

if TYPE_CHECKING:
    from agent.status.server import StatusServer

__all__ = ["StatusServer", "StatusSettings"]


def __getattr__(name: str) -> Any:
    # Lazy: `pilot-agent proxy` reads StatusSettings before it execs Envoy; the server (aiohttp) loads after.
    if name == "StatusServer":
        from agent.status.server import StatusServer  # noqa: PLC0415 (lazy: loaded after Envoy's exec)

        return StatusServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
