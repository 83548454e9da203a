"""The xDS proxy's metrics (Istio's pkg/istio-agent/metrics/metrics.go), registered into the agent's registry.
Names are Istio's with the `istio_agent_` prefix; counters carry the `_total` suffix every prometheus_client
counter has (Istio's OpenTelemetry exporter leaves it off)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

CANCELLED = "cancelled"
ERROR = "error"


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.istiod_connection_failures = Counter(
            "istio_agent_istiod_connection_failures", "The total number of connection failures to Istiod", registry=r
        )
        self.istiod_terminations = Counter(
            "istio_agent_istiod_connection_terminations",
            "The total number of connection errors to Istiod",
            ["type"],
            registry=r,
        )
        self.envoy_terminations = Counter(
            "istio_agent_envoy_connection_terminations",
            "The total number of connection errors from envoy",
            ["type"],
            registry=r,
        )
        self.requests = Counter("istio_agent_xds_proxy_requests", "The total number of Xds Proxy Requests", registry=r)
        self.responses = Counter(
            "istio_agent_xds_proxy_responses", "The total number of Xds Proxy Responses", registry=r
        )
