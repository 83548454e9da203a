"""The agent's own metrics (`istio_agent_*`) as a scrape of either agent shows them, for comparisons with Istio's.

A dashboard or an alert sees three things of a metric: its series names, its type (Prometheus' metadata) and its
label names. `agent_families` reads them per family from a text answer; `agent_series` reads the series of any
answer (text, or OpenMetrics, where Istio's agent writes its section as text and ours as OpenMetrics).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from agent.dns.metrics import DnsMetrics
from agent.metrics import AgentMetrics
from agent.security.metrics import SecurityMetrics
from agent.status.agent_section import AgentSection
from agent.xds.metrics import XdsMetrics

PREFIX = "istio_agent_"
# Label names a histogram or summary adds to its own series: part of the type, not of the metric's labels.
_TYPE_LABELS = {"le", "quantile"}
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+\S+")
_LABEL_NAME = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"(?:[^"\\]|\\.)*"')


@dataclass(frozen=True)
class Family:
    type: str
    labels: frozenset[str]


def _labels(braces: str | None) -> frozenset[str]:
    return frozenset(_LABEL_NAME.findall(braces or "")) - _TYPE_LABELS


def agent_families(text: str) -> dict[str, Family]:
    """`# TYPE` name -> type and label names, for the agent's families that have at least one sample."""
    families: dict[str, Family] = {}
    current: tuple[str, str] | None = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            current = (name, kind) if name.startswith(PREFIX) else None
        elif current is not None and not line.startswith("#") and (match := _SAMPLE.fullmatch(line)):
            name, kind = current
            seen = families.get(name)
            labels = _labels(match.group(2)) | (seen.labels if seen else frozenset())
            families[name] = Family(kind, labels)
    return families


def agent_series(text: str) -> dict[str, frozenset[str]]:
    """Series name -> label names, for every sample of the agent's metrics."""
    series: dict[str, frozenset[str]] = {}
    for line in text.splitlines():
        if line.startswith(PREFIX) and (match := _SAMPLE.fullmatch(line)):
            series[match.group(1)] = series.get(match.group(1), frozenset()) | _labels(match.group(2))
    return series


def agent_section(text: str) -> str:
    """The agent's own section of a merged answer (it comes first): every line up to the first one of another
    source."""
    lines = []
    for line in text.splitlines(keepends=True):
        name = line.split()[2] if line.startswith(("# HELP ", "# TYPE ")) else line
        if not name.startswith(PREFIX):
            break
        lines.append(line)
    return "".join(lines)


def declared_families() -> dict[str, str]:
    """Every family this agent can expose (text name -> type), as the status port writes it: each metric given one
    sample (a labelled one is written only once it has a child), then encoded by the agent's section."""
    registry = CollectorRegistry()
    groups = [AgentMetrics(registry), XdsMetrics(registry), SecurityMetrics(registry), DnsMetrics(registry)]
    for group in groups:
        for metric in vars(group).values():
            labelnames = getattr(metric, "_labelnames", ())
            if isinstance(metric, MetricWrapperBase) and labelnames:
                metric.labels(*("x" for _ in labelnames))
    body, _ = AgentSection(registry).encode(False)
    return {line.split()[2]: line.split()[3] for line in body.decode().splitlines() if line.startswith("# TYPE ")}
