"""Every environment variable is declared once (agent/config/env_settings.py), read through that declaration, and
documented in the one table of docs/reference.md ("Environment variables"), under the area its declaration names."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

from agent.config import env_settings
from agent.config.envvars import BOOLEAN, DURATION, TEXT, Environment, EnvPrefix, EnvVar, integer
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "reference.md"
AGENT = REPO / "agent"
_NO_DEFAULT = {"", '""', "unset", "empty", "—", "(none)"}


def _rows_by_area() -> dict[str, list[tuple[list[str], str]]]:
    """{area: [(names in the row's first cell, its default cell)]} from the `| Variable |` table of the reference's
    "Environment variables" section; the area is the Area cell's text (its link text when it is a link)."""
    areas: dict[str, list[tuple[list[str], str]]] = {}
    section = ""
    in_table = False
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and cells[0] == "Variable" and section == "Environment variables":
            in_table = True
            continue
        if not cells:
            in_table = False
        elif in_table and not set(cells[0]) <= {"-"}:
            names = re.findall(r"`([^`]+)`", cells[0])
            area = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cells[2])
            areas.setdefault(area, []).append((names, cells[1]))
    return areas


def _default_cell(cell: str) -> str:
    quoted = re.findall(r"`([^`]*)`", cell)
    text = quoted[0] if quoted else cell.strip()
    return "" if text in _NO_DEFAULT else text


def _documented_name(setting: EnvVar[object] | EnvPrefix) -> str:
    return setting.name if isinstance(setting, EnvVar) else f"{setting.prefix}<K>"


def test_declarations_are_unique_and_their_defaults_parse() -> None:
    settings = env_settings.declared()
    names = Counter(_documented_name(s) for s in settings)
    assert [n for n, count in names.items() if count > 1] == []
    for setting in settings:
        if isinstance(setting, EnvVar):
            setting.read({})  # a default that does not parse would fail every start


def test_every_declaration_has_its_row_in_the_reference_under_the_area_it_names() -> None:
    tables = _rows_by_area()
    missing = []
    for setting in env_settings.declared():
        documented = {name for names, _ in tables.get(setting.documented_in, []) for name in names}
        if _documented_name(setting) not in documented:
            missing.append(f"{_documented_name(setting)} (docs/reference.md, area {setting.documented_in!r})")
    assert missing == []


def test_every_reference_row_is_declared_with_the_default_it_shows() -> None:
    declared = {_documented_name(s): s for s in env_settings.declared()}
    problems = []
    for area, rows in _rows_by_area().items():
        for names, default in rows:
            for name in names:
                setting = declared.get(name)
                if setting is None:
                    problems.append(f"{area}: {name} is not declared in agent/config/env_settings.py")
                elif isinstance(setting, EnvVar) and _default_cell(default) != setting.default:
                    problems.append(f"{area}: {name} default {default!r}, declared {setting.default!r}")
    assert problems == []


# Modules that hand the process environment to an Environment (or, for PATH, to shutil.which).
_MAY_READ_OS_ENVIRON = {
    "agent/commands/proxy.py",
    "agent/commands/render.py",
    "agent/commands/istio_iptables.py",
    "agent/config/agent_config.py",
    "agent/proxy/binary.py",
}


def test_only_entry_points_read_the_process_environment_and_only_env_settings_declares() -> None:
    offenders = []
    for path in sorted(AGENT.rglob("*.py")):
        relative = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in {"environ", "getenv", "environb"}
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and relative not in _MAY_READ_OS_ENVIRON
            ):
                offenders.append(f"{relative}:{node.lineno} reads os.{node.attr}")
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) in {"EnvVar", "EnvPrefix"}
                and relative != "agent/config/env_settings.py"
            ):
                offenders.append(f"{relative}:{node.lineno} declares a setting outside env_settings.py")
    assert offenders == []


@pytest.mark.parametrize(
    ("setting", "raw", "value"),
    [
        (EnvVar("B", BOOLEAN, "true", ""), None, True),
        (EnvVar("B", BOOLEAN, "true", ""), "", True),
        (EnvVar("B", BOOLEAN, "true", ""), " F ", False),
        (EnvVar("I", integer(1, 9), "3", ""), " 7", 7),
        (EnvVar("D", DURATION, "100ms", ""), None, 0.1),
        (EnvVar("D", DURATION, "100ms", ""), "1m", 60.0),
        # Istio's string variables: set-but-empty is empty, not the default, and blanks are kept.
        (EnvVar("T", TEXT, "x", ""), "", ""),
        (EnvVar("T", TEXT, "x", ""), " y ", " y "),
        (EnvVar("T", TEXT, "x", ""), None, "x"),
    ],
)
def test_reading_a_setting(setting: EnvVar[object], raw: str | None, value: object) -> None:
    environ = {} if raw is None else {setting.name: raw}
    assert Environment(environ)[setting] == value


@pytest.mark.parametrize(
    ("setting", "raw", "message"),
    [
        (EnvVar("B", BOOLEAN, "true", ""), "yes", "env B: expected true or false, got 'yes'"),
        (EnvVar("I", integer(1, 9), "3", ""), "10", "env I: 10 is out of range [1, 9]"),
        (EnvVar("I", integer(1, 9), "3", ""), "three", "env I: expected an integer, got 'three'"),
        (EnvVar("D", DURATION, "1s", ""), "soon", "env D: invalid duration 'soon'"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable(setting: EnvVar[object], raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Environment({setting.name: raw})[setting]
    assert str(info.value).startswith(message)
    assert info.value.source == f"env {setting.name}"
