"""Configuration documents: YAML (and JSON, which is YAML) parsed in one place, with one error form.

Every YAML input (mesh config, PROXY_CONFIG, the `proxy.istio.io/config` annotation, ISTIO_BOOTSTRAP_OVERRIDE, a
YAML bootstrap template's output) goes through `parse_yaml`, so each failure is a ConfigError naming the source
and, where the parser knows it, the line: never a parser exception escaping to the supervisor.
"""

from __future__ import annotations

from typing import Any

import yaml

from agent.errors import ConfigError


def parse_yaml(text: str, source: str, field: str = "", kind: str = "YAML") -> Any:
    """`text` parsed as YAML. Otherwise a ConfigError "<source>[: <field>]:<line>: not valid <kind>: <problem>"
    (the line, when the parser knows it, goes after the field if there is one, else after the source)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    except (ValueError, RecursionError) as exc:  # e.g. absurd nesting, bad timestamps
        line, problem = "", str(exc)
    if field:
        raise ConfigError(source, f"{field}{line}", f"not valid {kind}: {problem}")
    raise ConfigError(f"{source}{line}", "", f"not valid {kind}: {problem}")
