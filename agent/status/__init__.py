"""The status server (port 15020): readiness, merged Prometheus metrics, application probes, quit and drain."""

from agent.status.server import StatusServer
from agent.status.settings import StatusSettings

__all__ = ["StatusServer", "StatusSettings"]
