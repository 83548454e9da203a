"""The merge's fast paths give the output of the path they skip, for any input and any chunking (issue 15).

The reference is the path the merge took before them, for a trusted source (Envoy): `feed_block()` on each block
of complete lines, `feed()` line by line when it declines. The streaming loop below is the merge's own
(metrics_merge._stream), reduced to its filtering.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.status.exposition import FamilyFilter, SourceGarbage

Take = Callable[[FamilyFilter, bytes, list[bytes]], bool]
AGENT_CLAIMS = frozenset({b"istio_agent_scrapes", b"istio_agent_scrapes_total", b"istio_agent_envoy_ready"})


def through(filt: FamilyFilter, body: bytes, chunk: int, block: Take | None, *, raw_blocks: bool) -> bytes:
    """The merge's streaming loop (metrics_merge._stream) reduced to its filtering: each chunk's complete lines go
    to `block` (when given) and line by line through feed() when it declines. `raw_blocks`: what `block` outputs is
    the block's bytes (pass_block, feed_block), else lines in feed()'s convention (feed_checked_block)."""
    written: list[bytes] = []
    carry = b""
    for start in range(0, len(body), chunk):
        data = carry + body[start : start + chunk]
        cut = data.rfind(b"\n") + 1
        out: list[bytes] = []
        if block is not None and cut and block(filt, data[:cut], out):
            carry = data[cut:]
            if raw_blocks:
                written.append(b"".join(out))
                continue
        else:
            lines = data.split(b"\n")
            carry = lines.pop()
            filt.feed(lines, out)
        if out:
            written.append(b"\n".join([*out, b""]))
    out = []
    if carry:
        filt.feed([carry], out)
    filt.finish(out)
    if out:
        written.append(b"\n".join([*out, b""]))
    return b"".join(written)


def stream(
    body: bytes, chunk: int, claimed: frozenset[bytes], take: Take, *, last: bool = True, openmetrics: bool = False
) -> tuple[bytes, set[bytes]] | str:
    """Envoy's body (trusted): the filtered output and the claims recorded, or "garbage" when refused."""
    filt = FamilyFilter(claimed, openmetrics=openmetrics, validate=False, record=not last)
    try:
        return through(filt, body, chunk, take, raw_blocks=True), filt.new_claims
    except SourceGarbage:
        return "garbage"


def before(filt: FamilyFilter, block: bytes, out: list[bytes]) -> bool:
    return filt.feed_block(block, out)


def now(filt: FamilyFilter, block: bytes, out: list[bytes]) -> bool:
    return filt.take_block(block, out)


def envoy_shaped(families: int, samples: int = 3) -> bytes:
    lines = []
    for i in range(families):
        kind = ("counter", "gauge", "histogram")[i % 3]
        lines.append(f"# TYPE envoy_stat_{i} {kind}")
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        lines += [f'envoy_stat_{i}{s}{{cluster_name="c{n}"}} {n}' for s in suffixes for n in range(samples)]
    return ("\n".join(lines) + "\n").encode()


def test_envoys_shape_takes_the_fastest_path() -> None:
    filt = FamilyFilter(AGENT_CLAIMS, openmetrics=False, validate=False, record=False)
    block = envoy_shaped(200)
    out: list[bytes] = []
    assert filt.pass_block(block, out)
    assert out == [block]
    # What it leaves to feed_block: a family that may clash, HELP lines, blank lines, another type.
    for other in (
        block + b"# TYPE istio_requests_total counter\nistio_requests_total 1\n",
        block + b"# HELP x y\n",
        block + b"\n",
        block + b"# TYPE x summary\n",
        block + b"# TYPE x unknown\n",
        block + b"# TYPE x counter\n# TYPE y counter\ny 1\n",  # a family without samples
        block + b"# TYPE bad-name counter\n",
    ):
        assert not FamilyFilter(AGENT_CLAIMS, False, validate=False, record=False).pass_block(other, [])
    # A '#' inside a label value is a sample like any other.
    assert FamilyFilter(AGENT_CLAIMS, False, validate=False, record=False).pass_block(block + b'x{p="/#"} 1\n', [])
    # Before a later source, the claims come from the TYPE lines (and the cache); in an OpenMetrics answer too.
    recording = FamilyFilter(AGENT_CLAIMS, True, validate=False, record=True)
    assert recording.pass_block(block, [])
    assert b"envoy_stat_0_total" in recording.new_claims and b"envoy_stat_2_bucket" in recording.new_claims
    assert (b"envoy_stat_1", b"gauge") in recording.claims_cache
    # Never for an untrusted source.
    assert not FamilyFilter(AGENT_CLAIMS, False, validate=True, record=False).pass_block(block, [])


NAME = st.sampled_from(["envoy_a", "envoy_b", "istio_x", "istio_agent_scrapes", "istio", "other", "envoy_a_total"])
KIND = st.sampled_from(["counter", "gauge", "histogram", "summary", "untyped", "unknown", "info", "bogus"])
SUFFIX = st.sampled_from(["", "_total", "_bucket", "_count", "_sum", "_info"])
OTHER = st.sampled_from(
    [
        "",
        "# HELP envoy_a help",
        "# EOF",
        "# a comment",
        "# UNIT x s",
        "# TYPE envoy_a counter x",
        "# TYPE envoy_a  gauge",
        "#TYPE envoy_b gauge",
        "# TYPE bad-name counter",
        " envoy_a 1",
    ]
)
LABELS = st.sampled_from(['{path="/a#b"}', '{x="# TYPE y counter"}', "{}"])
LINE = st.one_of(
    st.tuples(st.just("type"), NAME, KIND),
    st.tuples(st.just("sample"), NAME, SUFFIX),
    st.tuples(st.just("other"), OTHER, st.just("")),
    st.tuples(st.just("label"), LABELS, st.just("")),
)


def render(lines: list[tuple[str, str, str]]) -> bytes:
    out = []
    for kind, a, b in lines:
        if kind == "type":
            out.append(f"# TYPE {a} {b}")
        elif kind == "sample":
            out.append(f"{a}{b} 1")
        elif kind == "other":
            out.append(a)
        else:
            out.append(f"envoy_a{a} 2")
    return ("\n".join(out) + "\n").encode()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(LINE, max_size=60),
    st.integers(min_value=1, max_value=200),
    st.sampled_from([AGENT_CLAIMS, frozenset(), frozenset({b"envoy_b", b"other_total"})]),
    st.booleans(),
    st.booleans(),
)
def test_the_fast_paths_give_the_same_output_for_any_input_and_chunking(
    lines: list[tuple[str, str, str]], chunk: int, claimed: frozenset[bytes], last: bool, openmetrics: bool
) -> None:
    body = render(lines)
    fast = stream(body, chunk, claimed, now, last=last, openmetrics=openmetrics)
    assert fast == stream(body, chunk, claimed, before, last=last, openmetrics=openmetrics)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=300), st.integers(min_value=64, max_value=70_000))
def test_envoy_sized_bodies_match_in_any_chunking(families: int, chunk: int) -> None:
    body = envoy_shaped(families) + b"# TYPE istio_agent_scrapes counter\nistio_agent_scrapes 9\n"
    assert stream(body, chunk, AGENT_CLAIMS, now) == stream(body, chunk, AGENT_CLAIMS, before)


def stream_untrusted(body: bytes, chunk: int, claimed: frozenset[bytes], openmetrics: bool, checked: bool) -> object:
    """An application's body through the merge's untrusted-source loop: feed_checked_block() on each block of
    complete lines when `checked`, else feed() line by line (the path before it)."""
    filt = FamilyFilter(claimed, openmetrics, validate=True, record=True)
    block = FamilyFilter.feed_checked_block if checked else None
    try:
        output = through(filt, body, chunk, block, raw_blocks=False)
    except SourceGarbage:
        return "garbage"
    return output, filt.new_claims, filt.dropped_families, filt.invalid_lines


APP_LINE = st.one_of(
    st.sampled_from(
        [
            "# HELP app_a A help.",
            "# HELP app_a Another help.",
            "# TYPE app_a counter",
            "# TYPE app_a gauge",
            "# TYPE app_b histogram",
            "# TYPE app_c unknown",
            "# TYPE app_d info",
            "# UNIT app_a seconds",
            "# EOF",
            "# free comment",
            "",
            "app_a 1",
            "app_a_total 2",
            "app_a_created 1.7e9",
            'app_a{x="y"} 3',
            'app_b_bucket{le="+Inf"} 1',
            "app_b_count 1",
            "app_b_sum 0.5",
            "app_c 4",
            'app_d_info{v="1"} 1',
            "app_e 5",
            "istio_agent_scrapes_total 9",
            "envoy_x 1",
            "app_a 1 1700000000000",
            "app_a 1 1.5",
            'app_a_total 1 # {trace="t"} 1.0',
            "bad line",
            'app_a{x="\\q"} 1',
            "app_é 1",
            'app_a{x="é"} 1',
            "app_a  1",
        ]
    ).map(str.encode),
    st.text(max_size=12).map(lambda s: s.replace("\n", " ").encode()),
    st.sampled_from([b'app_a{x="\xff"} 1', b"# HELP app_a \xff", b"\xff"]),  # not UTF-8
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(APP_LINE, max_size=40),
    st.integers(min_value=1, max_value=120),
    st.sampled_from([frozenset(), AGENT_CLAIMS, frozenset({b"app_e", b"envoy_x"})]),
    st.booleans(),
)
def test_the_checked_block_path_gives_the_line_paths_output(
    lines: list[bytes], chunk: int, claimed: frozenset[bytes], openmetrics: bool
) -> None:
    body = b"\n".join(lines) + b"\n"
    checked = stream_untrusted(body, chunk, claimed, openmetrics, checked=True)
    assert checked == stream_untrusted(body, chunk, claimed, openmetrics, checked=False)


def test_a_well_formed_application_takes_the_checked_block_path() -> None:
    body = b"".join(
        b"# HELP app_%d Help.\n# TYPE app_%d gauge\n" % (f, f)
        + b"".join(b'app_%d{i="%d"} %d\n' % (f, i, i) for i in range(50))
        for f in range(20)
    )
    out: list[bytes] = []
    assert FamilyFilter(AGENT_CLAIMS, False).feed_checked_block(body, out)
    assert b"\n".join([*out, b""]) == body
