"""The certificate side's metrics (Istio's security/pkg/nodeagent/cache/monitoring.go and security/pkg/monitoring),
registered into the agent's registry. Names are Istio's with the `istio_agent_` prefix, `_total` only where Istio's
name has it (the others are agent.metrics.UnsuffixedCounter)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.metrics import UnsuffixedCounter


class SecurityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.outgoing_requests = UnsuffixedCounter(
            "istio_agent_num_outgoing_requests",
            "Number of total outgoing requests (e.g. to a token exchange server, CA, etc.)",
            ["request_type"],
            registry=r,
        )
        self.failed_outgoing_requests = UnsuffixedCounter(
            "istio_agent_num_failed_outgoing_requests",
            "Number of failed outgoing requests (e.g. to a token exchange server, CA, etc.)",
            ["request_type"],
            registry=r,
        )
        self.outgoing_retries = UnsuffixedCounter(
            "istio_agent_num_outgoing_retries",
            "Number of outgoing retry requests (e.g. to a token exchange server, CA, etc.)",
            ["request_type"],
            registry=r,
        )
        self.outgoing_latency = UnsuffixedCounter(
            "istio_agent_outgoing_latency",
            "The latency of outgoing requests (e.g. to a token exchange server, CA, etc.) in milliseconds.",
            ["request_type"],
            registry=r,
        )
        self.file_secret_failures = Counter(
            "istio_agent_num_file_secret_failures_total",
            "Number of times secret generation failed for files",
            registry=r,
        )
        self.cert_expiry = Gauge(
            "istio_agent_cert_expiry_seconds",
            "The time remaining, in seconds, before the certificate chain will expire. A negative value indicates "
            "the cert is expired.",
            ["resource_name"],
            registry=r,
        )
