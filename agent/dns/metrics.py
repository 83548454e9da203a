"""The DNS proxy's metrics, Istio's names (pkg/dns/client/monitoring.go) with the agent's `istio_agent_` prefix,
registered in the agent's registry when the DNS proxy is enabled."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Istio's buckets for dns_upstream_request_duration_seconds.
UPSTREAM_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.1, 1.0, 5.0)


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("istio_agent_dns_requests_total", "Total number of DNS requests.", registry=registry)
        self.upstream_requests = Counter(
            "istio_agent_dns_upstream_requests_total",
            "Total number of DNS requests forwarded to upstream.",
            registry=registry,
        )
        self.upstream_failures = Counter(
            "istio_agent_dns_upstream_failures_total", "Total number of DNS failures.", registry=registry
        )
        self.upstream_duration = Histogram(
            "istio_agent_dns_upstream_request_duration_seconds",
            "Total time in seconds Istio takes to get DNS response from upstream.",
            buckets=UPSTREAM_DURATION_BUCKETS,
            registry=registry,
        )
