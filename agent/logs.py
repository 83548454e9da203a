"""Logging set-up with Istio's flags: --log_output_level (scope:level,...) and --log_as_json.

The agent's lines have the shape of Istio's (`<time>\t<level>\t<scope>\t<message>`) and the level names of the
Envoy lines they are interleaved with (Istio's bootstrap gives Envoy the same shape): `debug`, `info`, `warning`,
`error`, `critical`, so one filter finds both (Istio's own agent writes `warn`)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "none": logging.CRITICAL + 10,
}


def _timestamp(record: logging.LogRecord) -> str:
    moment = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class IstioTextFormatter(logging.Formatter):
    """`<RFC3339 time>\t<level>\t<scope>\t<message>`, the shape of Istio's own agent log lines."""

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()  # Envoy's names: warning, critical
        scope = record.name.removeprefix("agent.").replace(".", "/") or "default"
        message = record.getMessage()
        if record.exc_info and record.levelno <= logging.DEBUG:
            message += "\n" + self.formatException(record.exc_info)
        return f"{_timestamp(record)}\t{level}\t{scope}\t{message}"


class IstioJsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        return json.dumps(
            {
                "time": _timestamp(record),
                "level": level,
                "scope": record.name.removeprefix("agent."),
                "msg": record.getMessage(),
            }
        )


def parse_output_levels(spec: str) -> dict[str, int]:
    """Parse Istio's `--log_output_level` (`default:info,scope:debug`). Unknown levels raise ValueError."""
    levels: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        scope, _, level = part.rpartition(":")
        scope = scope or "default"
        if level.lower() not in _LEVELS:
            raise ValueError(f"unknown log level {level!r} in {part!r}")
        levels[scope] = _LEVELS[level.lower()]
    return levels


def configure(output_levels: str = "default:info", as_json: bool = False) -> None:
    levels = parse_output_levels(output_levels or "default:info")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(IstioJsonFormatter() if as_json else IstioTextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    default = levels.pop("default", logging.INFO)
    # `default` is the agent's own level; the libraries' never goes below info: at default:debug a reader wants
    # the agent's decisions (readiness, renders, scrapes), not asyncio's selector or watchdog's inotify events.
    root.setLevel(max(default, logging.INFO))
    logging.getLogger("agent").setLevel(default)
    for scope, level in levels.items():
        logging.getLogger(f"agent.{scope}").setLevel(level)
    # aiohttp's access log is noise at info: every kubelet probe would be a line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
