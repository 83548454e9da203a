"""The agent's own section of the merged scrape: its registry written the way Istio's agent writes its metrics.

Istio's agent exports through OpenTelemetry's Prometheus exporter (`pkg/monitoring`: `WithoutCounterSuffixes`,
`WithoutUnits`) served by promhttp with default options. What dashboards and alerts see from it, and what
prometheus_client's own encoders would write differently:

* every metric under the name it was declared with: a counter Istio declares without `_total`
  (`xds_proxy_requests`) has no `_total`; one declared with it (`scrapes_total`) keeps it. prometheus_client appends
  `_total` to every counter; `agent.metrics.UnsuffixedCounter` marks the counters whose Istio name has none.
* no `_created` series (prometheus_client writes one beside every counter and histogram);
* no family without samples (promhttp leaves out a family with no metric; prometheus_client writes its HELP/TYPE);
* numbers, and a histogram's `le` labels in text, as Go writes them (`1`, `le="0.005"`, `1.929003008e+09`), where
  prometheus_client writes `1.0` and `le="1.0"`: a query or a recording rule on `le="1"` finds the same series.
  (OpenMetrics keeps its canonical `le="1.0"`; Prometheus 3 reads both spellings as one.)

OpenMetrics (when the scrape negotiates it): OpenMetrics requires a counter's samples to end in `_total`, so a
counter written without it is typed `unknown` there: its series keeps Istio's name, which is what queries see
(Istio's agent writes its section as text even in an OpenMetrics answer, which OpenMetrics parsers refuse).
A counter with `_total` is the OpenMetrics family without the suffix, its samples unchanged.

Pure: registry in, bytes and claimed names out. The claims are what `exposition.FamilyFilter` would claim for the
same lines, so that a later source repeating one of these families is dropped as before.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from agent.status.exposition import sample_names

# prometheus_client's type -> (text spelling, OpenMetrics spelling), for the types the agent's registry holds.
_TYPES = {
    "gauge": ("gauge", "gauge"),
    "counter": ("counter", "counter"),
    "histogram": ("histogram", "histogram"),
    "summary": ("summary", "summary"),
    "unknown": ("untyped", "unknown"),
}
# Samples that carry a family's creation time: Istio's exporter writes none.
_CREATED_IN = frozenset({"counter", "histogram", "summary"})


class AgentSection:
    """Encodes one registry; keeps the claims of each (family, type) it has written (the set rarely changes)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._claims: dict[tuple[str, str], frozenset[bytes]] = {}

    def encode(self, openmetrics: bool) -> tuple[bytes, set[bytes]]:
        """The registry's families as exposition lines (no `# EOF`), and the names they claim in the merge.
        Raises what a collector raises (the merge counts it as a failed agent source)."""
        out: list[str] = []
        claims: set[bytes] = set()
        for metric in self.registry.collect():
            kind = metric.type
            spellings = _TYPES.get(kind)
            if spellings is None:
                raise ValueError(f"{metric.name}: type {kind!r} is not one the agent's section writes")
            samples: list[Sample] = metric.samples
            if kind in _CREATED_IN:
                created = metric.name + "_created"
                samples = [s for s in samples if s.name != created]
            if not samples:
                continue
            name, written = metric.name, spellings[1 if openmetrics else 0]
            if kind == "counter":
                if samples[0].name == name:  # an UnsuffixedCounter: Istio's name has no `_total`
                    written = "unknown" if openmetrics else "counter"
                elif not openmetrics:
                    name += "_total"
            help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            if openmetrics:
                help_text = help_text.replace('"', r"\"")
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {written}\n")
            for sample in samples:
                out.append(_sample_line(sample, openmetrics))
            key = (name, written)
            family_claims = self._claims.get(key)
            if family_claims is None:
                encoded = name.encode()
                family_claims = self._claims[key] = sample_names(encoded, written.encode()) | {encoded}
            claims |= family_claims
        return "".join(out).encode(), claims


def _sample_line(sample: Sample, openmetrics: bool) -> str:
    if sample.labels:
        pairs = ",".join(
            f'{key}="{_bound(value, openmetrics) if key == "le" else _label_value(value)}"'
            for key, value in sorted(sample.labels.items())
        )
        line = f"{sample.name}{{{pairs}}} {go_float(sample.value)}"
    else:
        line = f"{sample.name} {go_float(sample.value)}"
    if sample.timestamp is not None:
        seconds = float(sample.timestamp)
        line += f" {go_float(seconds)}" if openmetrics else f" {int(seconds * 1000)}"
    return line + "\n"


def _bound(value: str, openmetrics: bool) -> str:
    """A histogram bucket's `le`: as Go writes it in text (`1`), in OpenMetrics' canonical form there (`1.0`)."""
    if openmetrics:
        text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
        return text
    return go_float(float(value))


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def go_float(value: float) -> str:
    """`value` as Go's strconv.FormatFloat(value, 'g', -1, 64) writes it (client_golang's text encoder): the
    shortest digits that read back as `value` (Python's repr finds the same), an exponent when it is below -4 or
    at least 6, at least two exponent digits, no `.0`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    point = len(whole) + int(exponent or 0) - (len(whole + fraction) - len(digits))  # value = 0.<digits> * 10**point
    digits = digits.rstrip("0")
    power = point - 1
    if power < -4 or power >= 6:
        head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{head}e{'-' if power < 0 else '+'}{abs(power):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"
