"""The harness writes volumes the way kubelet does: if these layouts were wrong, the agent's file watching and
downward-API parsing would be tested against a Kubernetes that does not exist."""

from __future__ import annotations

import ast
import json
import os
import random
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.atomic_writer import (
    DATA_DIR,
    NEW_DATA_DIR,
    AtomicWriter,
    FileProjection,
    PayloadError,
    format_map,
    go_quote,
)

# The timestamped directory: "..2006_01_02_15_04_05." (Go's layout) plus os.MkdirTemp's random uint32.
TS_DIR = re.compile(r"\.\.\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.\d+")


def _files(payload: dict[str, str]) -> dict[str, FileProjection]:
    return {k: FileProjection(v.encode()) for k, v in payload.items()}


def test_layout_is_kubelets(tmp_path: Path) -> None:
    writer = AtomicWriter(tmp_path / "podinfo", clock=lambda: 1795980645.0)  # 2026-11-29 19:30:45 UTC
    assert writer.write(_files({"labels": 'app="echo"', "annotations": 'a="b"', "nested/deep/file": "x"}))
    target = tmp_path / "podinfo"
    names = sorted(os.listdir(target))
    ts_dirs = [n for n in names if TS_DIR.fullmatch(n)]
    assert len(ts_dirs) == 1
    assert ts_dirs[0].startswith("..2026_11_29_19_30_45.")
    assert sorted(set(names) - set(ts_dirs)) == [DATA_DIR, "annotations", "labels", "nested"]
    # ..data -> the timestamped directory (relative); visible entries -> ..data/<top-level name>.
    assert os.readlink(target / DATA_DIR) == ts_dirs[0]
    assert os.readlink(target / "labels") == "..data/labels"
    assert os.readlink(target / "nested") == "..data/nested"
    assert not os.path.islink(target / ts_dirs[0] / "labels")
    assert (target / "labels").read_text() == 'app="echo"'
    assert (target / "nested" / "deep" / "file").read_text() == "x"
    assert oct((target / ts_dirs[0] / "labels").stat().st_mode & 0o777) == oct(0o644)
    assert not os.path.lexists(target / NEW_DATA_DIR)


def test_update_swaps_data_link_and_removes_old_version(tmp_path: Path) -> None:
    target = tmp_path / "certs"
    writer = AtomicWriter(target)
    writer.write(_files({"cert.pem": "one", "key.pem": "k1", "old-only": "gone soon"}))
    first = os.readlink(target / DATA_DIR)
    assert writer.write(_files({"cert.pem": "two", "key.pem": "k2"}))
    second = os.readlink(target / DATA_DIR)
    assert second != first
    assert not (target / first).exists(), "the previous timestamped directory is removed"
    assert (target / "cert.pem").read_text() == "two"
    assert not os.path.lexists(target / "old-only"), "a key the payload dropped disappears"
    # Unchanged content: kubelet writes nothing (no event for watchers).
    assert not writer.write(_files({"cert.pem": "two", "key.pem": "k2"}))
    assert os.readlink(target / DATA_DIR) == second


def test_a_reader_sees_one_version_or_the_other_never_a_mix(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    writer = AtomicWriter(target)
    versions = [_files({"cert.pem": f"cert-{n}", "key.pem": f"key-{n}"}) for n in range(2)]
    writer.write(versions[0])
    seen: set[tuple[str, str]] = set()
    visible: set[str] = set()
    transient: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                # Open the directory through ..data, as a careful reader does: both files of one version.
                data = target / DATA_DIR
                resolved = target / os.readlink(data)
                try:
                    pair = ((resolved / "cert.pem").read_text(), (resolved / "key.pem").read_text())
                except FileNotFoundError:
                    continue  # the old directory was removed after we resolved it: read again
                seen.add(pair)
                # Through the visible link: always a whole version. But kubelet removes the old directory right
                # after the swap, so a path lookup that already followed ..data to it fails with ENOENT: a reader
                # (the agent's cert watcher) must retry, not treat that as "file deleted".
                try:
                    visible.add((target / "cert.pem").read_text())
                except FileNotFoundError:
                    transient.append(1)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(200):
            writer.write(versions[(n + 1) % 2])
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert seen <= {("cert-0", "key-0"), ("cert-1", "key-1")}, seen
    assert len(seen) == 2
    assert visible == {"cert-0", "cert-1"}


def test_the_swap_is_a_rename_of_a_prepared_link(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    observed: list[tuple[str, str]] = []

    def before_swap(ts_dir: Path) -> None:
        # At this instant the new version is complete and ..data_tmp points at it, ..data still at the old one.
        observed.append((os.readlink(target / NEW_DATA_DIR), os.readlink(target / DATA_DIR)))
        assert (ts_dir / "f").read_text() == "new"
        assert (target / "f").read_text() == "old"

    AtomicWriter(target).write(_files({"f": "old"}))
    old = os.readlink(target / DATA_DIR)
    AtomicWriter(target, before_swap=before_swap).write(_files({"f": "new"}))
    assert observed == [(os.readlink(target / DATA_DIR), old)]


@pytest.mark.parametrize("bad", ["/abs", "..data", "../escape", "a/../b", "x" * 256])
def test_payload_paths_are_validated(tmp_path: Path, bad: str) -> None:
    with pytest.raises(PayloadError):
        AtomicWriter(tmp_path / "v").write(_files({bad: "x"}))


# ---- Go's %q ---------------------------------------------------------------------------------------------------------
# Values as Go 1.22 prints them with fmt.Sprintf("%q", s) (strconv.Quote rules: \a\b\f\n\r\t\v, \xNN below 0x20 and
# for 0x7f, \uNNNN / \UNNNNNNNN for non-printable runes, printable non-ASCII runes as they are).
GO_VECTORS = [
    ("", '""'),
    ("plain", '"plain"'),
    ('say "hi"\\', '"say \\"hi\\"\\\\"'),
    ("a\tb\nc\rd\ae\bf\fg\vh", '"a\\tb\\nc\\rd\\ae\\bf\\fg\\vh"'),
    ("\x00\x1b\x7f", '"\\x00\\x1b\\x7f"'),
    ("é ü 日本 😀", '"é ü 日本 😀"'),
    ("\u00a0\u00ad\u2028\ufeff\ue000", '"\\u00a0\\u00ad\\u2028\\ufeff\\ue000"'),
    ("\U000e0001", '"\\U000e0001"'),
    ("k=v='x'", "\"k=v='x'\""),
    ('{"holdApplicationUntilProxyStarts": true}', '"{\\"holdApplicationUntilProxyStarts\\": true}"'),
]


@pytest.mark.parametrize(("value", "quoted"), GO_VECTORS)
def test_go_quote_matches_go(value: str, quoted: str) -> None:
    assert go_quote(value) == quoted


def reference_go_quote(value: str) -> str:
    """A second, independent route to Go's %q: JSON escaping, then Go's differences from JSON."""
    body = json.dumps(value, ensure_ascii=False)[1:-1]

    def control(match: re.Match[str]) -> str:
        token = match.group(1)
        if not token.startswith("u"):
            return match.group(0)  # \" \\ \n \r \t \b \f: the same in Go
        cp = int(token[1:], 16)  # JSON's \u00XX for the other control characters
        return {0x07: "\\a", 0x0B: "\\v"}.get(cp, f"\\x{cp:02x}")

    body = re.sub(r"\\(u[0-9a-f]{4}|.)", control, body)
    out = []
    for ch in body:
        cp = ord(ch)
        if cp == 0x7F:
            out.append("\\x7f")
        elif cp > 0x7F and not ch.isprintable():
            out.append(f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)


@given(_text)
def test_go_quote_agrees_with_the_reference_and_round_trips(value: str) -> None:
    quoted = go_quote(value)
    assert quoted == reference_go_quote(value)
    # Go's escapes are a subset of Python's string-literal escapes with the same meaning.
    assert ast.literal_eval(quoted) == value
    assert "\n" not in quoted, "one entry must stay on one line"


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9./-]{0,20}", fullmatch=True), _text, max_size=6))
def test_format_map_is_sorted_key_quoted_value_lines(entries: dict[str, str]) -> None:
    text = format_map(entries)
    assert not text.endswith("\n")
    lines = text.split("\n") if text else []
    assert [line.split("=", 1)[0] for line in lines] == sorted(entries)
    assert {line.split("=", 1)[0]: ast.literal_eval(line.split("=", 1)[1]) for line in lines} == entries


def test_downward_api_text_is_byte_exact() -> None:
    labels = {"app": "echo", "security.istio.io/tlsMode": "istio", "pod-template-hash": "5d8f7b6c4"}
    assert format_map(labels) == 'app="echo"\npod-template-hash="5d8f7b6c4"\nsecurity.istio.io/tlsMode="istio"'
    annotations = {"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true\nconcurrency: 2\n"}
    assert (
        format_map(annotations) == 'proxy.istio.io/config="holdApplicationUntilProxyStarts: true\\nconcurrency: 2\\n"'
    )


def test_random_suffix_never_collides(tmp_path: Path) -> None:
    writer = AtomicWriter(tmp_path / "v", clock=lambda: 0.0, rng=random.Random(7))
    for n in range(20):
        writer.write(_files({"f": str(n)}))
    assert (tmp_path / "v" / "f").read_text() == "19"
    assert len([n for n in os.listdir(tmp_path / "v") if TS_DIR.fullmatch(n)]) == 1
