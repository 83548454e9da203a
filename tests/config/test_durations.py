"""Durations as operators write them in ProxyConfig, annotations and mesh config."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import format_proto, parse_duration
from agent.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45.0),
        ("1m30s", 90.0),
        ("100ms", 0.1),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0.250s", 0.25),
        ("2h45m", 9900.0),
        ("500us", 0.0005),
        ("0", 0.0),
        ("+5s", 5.0),
    ],
)
def test_parses_go_and_proto_forms(text: str, seconds: float) -> None:
    assert parse_duration(text, "src", "f") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "s", "-5s", "1m-3s", "five seconds", "1e3s", "5 s"])
def test_bad_durations_name_source_and_field(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_duration(text, "env PROXY_CONFIG", "drainDuration")
    assert str(err.value).startswith("env PROXY_CONFIG: drainDuration: ")


@pytest.mark.parametrize(("seconds", "text"), [(2, "2s"), (0.25, "0.250s"), (90, "90s"), (0.0000015, "0.000001500s")])
def test_formats_proto_json(seconds: float, text: str) -> None:
    assert format_proto(seconds) == text


@given(st.text())
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        value = parse_duration(text, "s", "f")
    except ConfigError:
        return
    assert value >= 0


@given(st.integers(min_value=0, max_value=10**12))
def test_proto_form_round_trips(millis: int) -> None:
    assert parse_duration(format_proto(millis / 1000), "s", "f") == pytest.approx(millis / 1000)
