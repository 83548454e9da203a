"""kubelet's downward-API files: `key="value"` lines with Go-quoted values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config.downward import parse_downward_api, read_downward_api
from agent.errors import ConfigError


def kubelet_format(entries: dict[str, str]) -> str:
    # JSON string escapes (ensure_ascii=False) are a subset of Go's, so this is what kubelet's %q can produce.
    return "".join(f"{k}={json.dumps(v, ensure_ascii=False)}\n" for k, v in sorted(entries.items()))


def test_kubelet_lines_with_newlines_and_equals() -> None:
    text = (
        'app="reviews"\n'
        'proxy.istio.io/config="holdApplicationUntilProxyStarts: true\\ndrainDuration: 5s\\n"\n'
        'a="b=c=d"\n'
        'octal="\\101\\x42\\u00e9"\n'
        "raw=`as is`\n"
        "no equals sign here\n"
    )
    assert parse_downward_api(text, "f") == {
        "app": "reviews",
        "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true\ndrainDuration: 5s\n",
        "a": "b=c=d",
        "octal": "ABé",
        "raw": "as is",
    }


@pytest.mark.parametrize(
    "line",
    ["k=unquoted", 'k="open', 'k="bad \\q escape"', 'k="\\x4"', "k='two'", 'k="a"b"', 'k="\\ud800"'],
)
def test_bad_line_names_file_line_and_key(line: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_downward_api(f'ok="fine"\n{line}\n', "/etc/istio/pod/annotations")
    assert str(err.value).startswith("/etc/istio/pod/annotations:2: k: cannot unquote value")


def test_missing_file_is_none_and_existing_file_is_parsed(tmp_path: Path) -> None:
    assert read_downward_api(tmp_path / "absent") is None
    (tmp_path / "labels").write_text('app="x"\n')
    assert read_downward_api(tmp_path / "labels") == {"app": "x"}


_keys = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="=\n"), min_size=1)
_values = st.text(alphabet=st.characters(codec="utf-8"))


@given(st.dictionaries(_keys, _values))
def test_round_trips_kubelet_format(entries: dict[str, str]) -> None:
    assert parse_downward_api(kubelet_format(entries), "f") == entries


@given(st.text())
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        result = parse_downward_api(text, "f")
    except ConfigError:
        return
    assert all(isinstance(v, str) for v in result.values())
