"""Typed reads of environment variables. Bad values are ConfigErrors naming the variable (Istio only warns and
falls back to the default, which hides typos; failing before Envoy starts is the clearer contract)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent.errors import ConfigError

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(value: str) -> bool | None:
    """Go's strconv.ParseBool; None when the text is not a boolean."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def env_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    value = parse_go_bool(raw.strip())
    if value is None:
        raise ConfigError(f"env {name}", "", f"expected true or false, got {raw!r}")
    return value


def env_int(environ: Mapping[str, str], name: str, default: int, lo: int = 0, hi: int = 2**31 - 1) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"env {name}", "", f"expected an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"env {name}", "", f"{value} is out of range [{lo}, {hi}]")
    return value


def env_port(environ: Mapping[str, str], name: str, default: int, allow_zero: bool = False) -> int:
    return env_int(environ, name, default, 0 if allow_zero else 1, 65535)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_object(text: str, source: str) -> dict[str, Any]:
    """A JSON object (Go's encoding/json rules: no NaN/Infinity). ConfigError naming `source` otherwise."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(source, "", f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(source, "", f"expected a JSON object, got {type(value).__name__}")
    return value


def check_metajson(environ: Mapping[str, str]) -> None:
    """Every ISTIO_METAJSON_* must hold a JSON object (Istio only warns; we fail before Envoy starts)."""
    for name, value in environ.items():
        if name.startswith("ISTIO_METAJSON_"):
            json_object(value, f"env {name}")
