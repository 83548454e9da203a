"""The agent's own Prometheus metrics, in an explicit registry built at start-up (nothing registered at import).

Names carry Istio's `istio_agent_` prefix. The supervisor, the watcher and the status server each record into the
one AgentMetrics instance they are given; the status server exposes `registry` first in the merged scrape, written
as Istio's agent writes its own (agent/status/agent_section.py).

Naming rule (docs/reference.md#metrics): a metric Istio's agent also has carries exactly Istio's name, type and
labels; a counter whose Istio name has no `_total` is an `UnsuffixedCounter`. A metric only this agent has follows
Prometheus' conventions: a counter's series end in `_total` (a plain `Counter`).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.metrics_core import Metric


class UnsuffixedCounter(Counter):
    """A counter whose series is its name as declared, without the `_total` prometheus_client appends: Istio's
    exporter (`WithoutCounterSuffixes`) writes `istio_agent_xds_proxy_requests`, and dashboards query that.
    Declare it with Istio's name (which then never ends in `_total`: prometheus_client would strip it)."""

    def collect(self) -> Iterable[Metric]:
        for metric in super().collect():
            total = metric.name + "_total"
            metric.samples = [sample._replace(name=metric.name) for sample in metric.samples if sample.name == total]
            yield metric


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        if process_metrics:
            ProcessCollector(namespace="istio_agent", registry=r)
        self.startup_duration = Gauge(
            "istio_agent_startup_duration_seconds", "Seconds from agent start to the first ready Envoy.", registry=r
        )
        self.scrapes = Counter("istio_agent_scrapes_total", "Merged metrics scrapes served.", registry=r)
        self.scrapes_rejected = Counter(
            "istio_agent_scrapes_rejected",
            "Merged scrapes answered 503 because the maximum number of merges was already running.",
            registry=r,
        )
        self.scrape_failures = Counter(
            "istio_agent_scrape_failures_total",
            "Sources left out of a merged scrape, by source type (agent, envoy, application).",
            ["type"],
            registry=r,
        )
        self.envoy_epoch = Gauge("istio_agent_envoy_epoch", "Restart epoch of the newest running Envoy.", registry=r)
        self.hot_restarts = Counter(
            "istio_agent_hot_restarts",
            "Hot restarts attempted, by outcome (done, invalid, failed).",
            ["outcome"],
            registry=r,
        )
        self.envoy_exits = Counter(
            "istio_agent_envoy_exits",
            "Envoy process exits, by cause (clean, error, signal, oom, aborted).",
            ["cause"],
            registry=r,
        )
        self.restart_budget = Gauge(
            "istio_agent_envoy_restart_budget_remaining", "Crash restarts left before the agent gives up.", registry=r
        )
        self.file_changes = Counter(
            "istio_agent_file_changes", "Watched files whose contents really changed, by kind.", ["kind"], registry=r
        )
        self.config_errors = Counter(
            "istio_agent_config_errors",
            "New configurations rejected (render or validation failed); the running Envoy kept serving.",
            ["stage"],
            registry=r,
        )
        # Status server (merged scrape): what the merge left out to keep the output a valid exposition.
        self.scrape_dropped = Counter(
            "istio_agent_scrape_dropped",
            "Parts of a source left out of a merged scrape, by source type and reason (duplicate_family, "
            "invalid_line).",
            ["type", "reason"],
            registry=r,
        )
        # Status server connections (issue 12): what it shed to keep serving kubelet's probes.
        self.status_connections_closed = Counter(
            "istio_agent_status_connections_closed",
            "Status port connections the agent closed, by reason (header_timeout, connection_limit, accept_failed).",
            ["reason"],
            registry=r,
        )
        self.status_accept_failures = Counter(
            "istio_agent_status_accept_failures",
            "Connections the status port could not accept for lack of file descriptors.",
            registry=r,
        )
        self.envoy_ready = Gauge("istio_agent_envoy_ready", "1 when the readiness probe passes, else 0.", registry=r)
        # The no-control-plane mode (agent/local_xds.py): Envoy's verdict on each version of lds.yaml / cds.yaml.
        self.local_xds_loads = Counter(
            "istio_agent_local_xds_loads",
            "Versions of the local xDS files (--local-xds-dir) Envoy was given, by file and result (accepted, "
            "rejected, not_reloaded).",
            ["file", "result"],
            registry=r,
        )
