"""Configuration documents: files read with a bound, YAML parsed as Go reads it, JSON written as Go writes it.

Every YAML input (mesh config, PROXY_CONFIG, the `proxy.istio.io/config` annotation, ISTIO_BOOTSTRAP_OVERRIDE, a
YAML bootstrap template's output) goes through `parse_yaml`, every file the agent reads to configure Envoy through
`read_file`, and every JSON the agent writes for Envoy through `to_json`. Each failure is a ConfigError naming
the source and, where known, the line: never a parser exception escaping to the supervisor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError
from agent.files import FileTooLarge, read_bounded

# No configuration file the agent reads comes near this (a ConfigMap holds at most 1 MiB); reading stops here, so
# `--meshConfig=/dev/zero` is an error instead of a read that never ends.
MAX_FILE_BYTES = 16 * 1024 * 1024
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class _GoYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader without the implicit timestamp type: Go's sigs.k8s.io/yaml (Istio's YAML-to-JSON) keeps
    `2024-01-02` a string, so a date in a string field is valid there and must be here."""


_GoYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_file_if_present(path: Path, source: str, field: str = "") -> bytes | None:
    """The file's bytes (at most MAX_FILE_BYTES), None when it does not exist; any other failure is a ConfigError
    naming `source` (and `field`)."""
    try:
        # Never blocks: a FIFO there is refused, not waited on for ever.
        return read_bounded(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        return None
    except FileTooLarge:
        raise ConfigError(source, field, f"{path} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(source, field, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def read_file(path: Path, source: str, field: str = "") -> bytes:
    """read_file_if_present, with a missing file an error too."""
    data = read_file_if_present(path, source, field)
    if data is None:
        raise ConfigError(source, field, f"cannot read {path}: No such file or directory")
    return data


def utf8_text(data: bytes, source: str, field: str = "") -> str:
    """Strict UTF-8, as Go's YAML parser wants it; ConfigError naming the offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, field, f"not valid UTF-8 (byte {exc.start})") from None


def parse_yaml(text: str, source: str, field: str = "", kind: str = "YAML") -> Any:
    """`text` parsed as YAML. Otherwise a ConfigError "<source>[: <field>]:<line>: not valid <kind>: <problem>"
    (the line, when the parser knows it, goes after the field if there is one, else after the source)."""
    try:
        return yaml.load(text, Loader=_GoYamlLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    except (ValueError, RecursionError) as exc:  # e.g. absurd nesting
        line, problem = "", str(exc)
    if field:
        raise ConfigError(source, f"{field}{line}", f"not valid {kind}: {problem}")
    raise ConfigError(f"{source}{line}", "", f"not valid {kind}: {problem}")


def go_string(text: str) -> str:
    """A string as Go's encoding/json writes it: invalid UTF-8 becomes U+FFFD. Here that is every lone surrogate
    (an undecodable environment byte arrives as one through surrogateescape; a JSON `\\ud800` escape as itself)."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _go_value(value: Any, source: str, field: str) -> Any:
    """`value` made writable as Go's encoding/json would write it, or a ConfigError for what Go refuses."""
    if isinstance(value, str):
        return go_string(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(source, field, f"{value} is not a JSON number (NaN and Infinity are not allowed)")
        return value
    if isinstance(value, Mapping):
        return {_go_key(k, source, field): _go_value(v, source, field) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_go_value(item, source, field) for item in value]
    raise ConfigError(source, field, f"a {type(value).__name__} value cannot be written as JSON")


def _go_key(key: Any, source: str, field: str) -> str:
    """A YAML key as a JSON object key, spelled as sigs.k8s.io/yaml spells scalars (`true: x` -> "true")."""
    if isinstance(key, str):
        return go_string(key)
    if isinstance(key, bool) or key is None:
        return json.dumps(key)
    if isinstance(key, int | float):
        return str(_go_value(key, source, field))
    raise ConfigError(source, field, f"a {type(key).__name__} cannot be a JSON object key")


def to_json(value: Any, source: str, field: str = "", *, compact: bool = False, sort_keys: bool = True) -> str:
    """JSON for Envoy: no NaN or Infinity (Envoy's parser refuses them), strings as valid UTF-8 (U+FFFD for what
    is not), and a ConfigError naming `source` for a value JSON cannot hold (a YAML set or binary)."""
    separators = (",", ":") if compact else None
    try:
        return json.dumps(_go_value(value, source, field), sort_keys=sort_keys, separators=separators, allow_nan=False)
    except RecursionError:
        raise ConfigError(source, field, "nested too deeply to be written as JSON") from None
