"""The xDS proxy's metrics (Istio's pkg/istio-agent/metrics/metrics.go), registered into the agent's registry.
Names are Istio's with the `istio_agent_` prefix and, as there, no `_total` (agent.metrics.UnsuffixedCounter)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agent.metrics import UnsuffixedCounter

CANCELLED = "cancelled"
ERROR = "error"


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.istiod_connection_failures = UnsuffixedCounter(
            "istio_agent_istiod_connection_failures", "The total number of connection failures to Istiod", registry=r
        )
        self.istiod_terminations = UnsuffixedCounter(
            "istio_agent_istiod_connection_terminations",
            "The total number of connection errors to Istiod",
            ["type"],
            registry=r,
        )
        self.envoy_terminations = UnsuffixedCounter(
            "istio_agent_envoy_connection_terminations",
            "The total number of connection errors from envoy",
            ["type"],
            registry=r,
        )
        self.requests = UnsuffixedCounter(
            "istio_agent_xds_proxy_requests", "The total number of Xds Proxy Requests", registry=r
        )
        self.responses = UnsuffixedCounter(
            "istio_agent_xds_proxy_responses", "The total number of Xds Proxy Responses", registry=r
        )
