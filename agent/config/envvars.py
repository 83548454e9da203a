"""Environment variables as declared settings: one declaration, one parser, one error form.

A setting is an `EnvVar`: its name, its `Kind` (how the text is parsed), its default written as it would be in the
environment, and its area in docs/reference.md. Every setting the agent reads is declared once, in
`agent.config.env_settings`; code reads the environment only through an `Environment` and those declarations:

    from agent.config.env_settings import ENVOY_BASE_ID
    base_id = env[ENVOY_BASE_ID]          # an int, or ConfigError("env ENVOY_BASE_ID", "", "...")

A bad value is a ConfigError whose source is `env NAME` (Istio only warns and falls back to the default, which
hides typos; failing before Envoy starts is the clearer contract).
"""

from __future__ import annotations

import json
import math
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from agent.config.durations import parse_duration
from agent.errors import ConfigError
from agent.flag_values import go_atoi

T = TypeVar("T")

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(value: str) -> bool | None:
    """Go's strconv.ParseBool; None when the text is not a boolean."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


@dataclass(frozen=True)
class Kind(Generic[T]):
    """How a setting's text becomes a value. `parse(text, source)` raises ConfigError(source, "", problem).

    With `verbatim` the value is taken as set, blanks and all, and an empty value is an empty value (Istio's
    string variables); otherwise surrounding blanks are ignored and an empty value means the default."""

    name: str
    parse: Callable[[str, str], T]
    verbatim: bool = False


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One environment variable: name, kind, default (as written in the environment), area in docs/reference.md."""

    name: str
    kind: Kind[T]
    default: str
    documented_in: str

    @property
    def source(self) -> str:
        """How errors name it."""
        return f"env {self.name}"

    def read(self, environ: Mapping[str, str]) -> T:
        raw = environ.get(self.name)
        if raw is None:
            raw = self.default
        elif not self.kind.verbatim:
            raw = raw.strip() or self.default
        return self.kind.parse(raw, self.source)


@dataclass(frozen=True)
class EnvPrefix:
    """A family of variables named `<prefix><KEY>` (ISTIO_META_*): each value is read verbatim."""

    prefix: str
    documented_in: str


class Environment:
    """A snapshot of the process environment, readable only through declarations (`env[SETTING]`)."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values: Mapping[str, str] = types.MappingProxyType(dict(values))

    def __getitem__(self, setting: EnvVar[T]) -> T:
        return setting.read(self._values)

    def is_set(self, setting: EnvVar[Any]) -> bool:
        return setting.name in self._values

    def with_prefix(self, family: EnvPrefix) -> tuple[tuple[str, str], ...]:
        """(name, value) of every variable of the family, in the environment's order (Go walks os.Environ())."""
        return tuple((k, v) for k, v in self._values.items() if k.startswith(family.prefix))


# ---- kinds ----


def _text(text: str, source: str) -> str:
    return text


def _boolean(text: str, source: str) -> bool:
    value = parse_go_bool(text)
    if value is None:
        raise ConfigError(source, "", f"expected true or false, got {text!r}")
    return value


def _optional_boolean(text: str, source: str) -> bool | None:
    return None if text == "" else _boolean(text, source)


def _duration(text: str, source: str) -> float:
    return parse_duration(text, source, "")


def _bounded(convert: Callable[[str], T], noun: str, lo: T, hi: T, show: Callable[[T], str]) -> Kind[T]:
    def parse(text: str, source: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise ConfigError(source, "", f"expected {noun}, got {text!r}") from None
        if not lo <= value <= hi:  # type: ignore[operator]
            raise ConfigError(source, "", f"{show(value)} is out of range [{show(lo)}, {show(hi)}]")
        return value

    return Kind(f"{noun.rsplit(maxsplit=1)[-1]} {show(lo)}-{show(hi)}", parse)


def integer(lo: int = 0, hi: int = 2**31 - 1) -> Kind[int]:
    return _bounded(go_atoi, "an integer", lo, hi, str)


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _decimal(text: str) -> float:
    """A decimal number as Go's ParseFloat reads one (no spaces, underscores, inf or nan, unlike float())."""
    if not _DECIMAL.fullmatch(text):
        raise ValueError(text)
    return float(text)


def number(lo: float, hi: float) -> Kind[float]:
    return _bounded(_decimal, "a number", lo, hi, lambda value: f"{value:g}")


def choice(*values: str) -> Kind[str]:
    def parse(text: str, source: str) -> str:
        if text not in values:
            raise ConfigError(source, "", f"expected {' or '.join(values)}, got {text!r}")
        return text

    return Kind(f"one of {', '.join(values)}", parse)


TEXT: Kind[str] = Kind("text", _text, verbatim=True)
WORD: Kind[str] = Kind("text (blanks ignored, empty means the default)", _text)
BOOLEAN: Kind[bool] = Kind("boolean", _boolean)
OPTIONAL_BOOLEAN: Kind[bool | None] = Kind("boolean or unset", _optional_boolean)
DURATION: Kind[float] = Kind("duration", _duration)
PORT = integer(1, 65535)
PORT_OR_ZERO = integer(0, 65535)


# ---- structured values inside a setting ----


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Go's encoding/json refuses a number out of float64's range
        raise ValueError(f"number {text} is out of range")
    return value


def json_object(text: str, source: str) -> dict[str, Any]:
    """A JSON object, by Go's encoding/json rules (no NaN/Infinity, no out-of-range numbers). ConfigError naming
    `source` otherwise."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ConfigError(source, "", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(source, "", f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(source, "", f"expected a JSON object, got {type(value).__name__}")
    return value
