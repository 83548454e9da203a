"""Durations as Istio spells them: Go's `time.ParseDuration` ("45s", "1m30s", "100ms") and proto-JSON ("1.500s").

Values are float seconds inside the agent. `format_proto` writes the proto3 JSON form ("2s", "0.250s") that Envoy's
and Istio's JSON parsers accept; Go's `Duration.String()` form ("1m0s") is not valid proto JSON, so we never emit it.
"""

from __future__ import annotations

import math
import re

from agent.errors import ConfigError

# Go's units, in seconds. "µs" and "μs" (two different code points) are both accepted by Go.
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# ASCII digits only, as Go: `\d` would also take "٤٥" (45 to Python, an error to Go's ParseDuration).
_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
# Go's time.Duration is an int64 of nanoseconds: about 292 years.
_MAX_SECONDS = (2**63 - 1) / 1e9


def parse_duration(text: object, source: str, field: str) -> float:
    """Parse a Go or proto-JSON duration into seconds. Negative values are rejected: no Istio duration may be."""
    if not isinstance(text, str):
        raise ConfigError(source, field, f"duration must be a string like '45s', got {text!r}")
    s = text.strip()
    if s == "0":
        return 0.0
    if not s:
        raise ConfigError(source, field, "empty duration (use a form like '45s', '1m30s', '100ms')")
    body = s[1:] if s[0] in "+-" else s
    if s[0] == "-":
        raise ConfigError(source, field, f"duration {text!r} is negative")
    pos = 0
    total = 0.0
    while pos < len(body):
        m = _PART.match(body, pos)
        if m is None:
            raise ConfigError(source, field, f"invalid duration {text!r} (use a form like '45s', '1m30s', '100ms')")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not math.isfinite(total) or total > _MAX_SECONDS:
        raise ConfigError(source, field, f"duration {text!r} is out of range")
    return total


def format_proto(seconds: float) -> str:
    """Proto3 JSON form: whole seconds as "2s", otherwise 3, 6 or 9 fractional digits ("0.250s")."""
    nanos_total = round(seconds * 1e9)
    whole, nanos = divmod(nanos_total, 1_000_000_000)
    if nanos == 0:
        return f"{whole}s"
    if nanos % 1_000_000 == 0:
        return f"{whole}.{nanos // 1_000_000:03d}s"
    if nanos % 1_000 == 0:
        return f"{whole}.{nanos // 1_000:06d}s"
    return f"{whole}.{nanos:09d}s"
