"""Pure helpers of the metrics merge: Accept negotiation and a streaming line filter that keeps the merge valid.

Why a filter at all: Istio concatenates the agent's, Envoy's and the application's bodies. When the application
exposes a family the agent or Envoy also has (an app embedding an Envoy, an app reusing `istio_` names, two
targets of the same exporter), the result has two `# TYPE` lines for one name and Prometheus rejects the whole
scrape. Here each source is streamed line by line through `FamilyFilter`:

* A *family* starts at a `# HELP`/`# TYPE`/`# UNIT` line naming a new name, or at a sample whose name is not one
  of the current family's sample names (an untyped family). Its *claims* are the names it may produce: the family
  name plus its type's sample names (`_total`, `_created`, `_bucket`, `_count`, `_sum`, `_gcount`, `_gsum`,
  `_info`), so text and OpenMetrics spellings of one family collide as Prometheus would see them.
* A family whose claims meet a name claimed by an EARLIER source is dropped whole (HELP, TYPE and samples): the
  earlier source wins, agent > Envoy > application, in the order of the output. Only the claimed names of the
  sources before the last are kept in memory, never samples.
* A family a source already wrote, met again further down in the same source, is dropped as well (family names
  only, at most OWN_NAMES_CAP of them).
* An application source is untrusted: each sample line is checked against the exposition grammar; a bad line is
  dropped (counted), and a source whose first line is bad is garbage and left out whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_1 = "application/openmetrics-text; version=1.0.0; charset=utf-8"
OPENMETRICS_0 = "application/openmetrics-text; version=0.0.1; charset=utf-8"
TEXT_ACCEPT = "text/plain;version=0.0.4"

_NAME = rb"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = rb'[ \t]*[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"[^"\\\n]*(?:\\[\\"n][^"\\\n]*)*"[ \t]*'
_LABELS = rb"\{(?:" + _LABEL + rb"(?:," + _LABEL + rb")*,?)?[ \t]*\}"
_FLOAT = (
    rb"[-+]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[Ii][Nn][Ff](?:[Ii][Nn][Ii][Tt][Yy])?|[Nn][Aa][Nn])"
)
# Text 0.0.4: integer millisecond timestamps. OpenMetrics: float seconds and optional exemplars.
_TEXT_SAMPLE = re.compile(rb"(" + _NAME + rb")(?:" + _LABELS + rb")?[ \t]+" + _FLOAT + rb"(?:[ \t]+-?[0-9]+)?[ \t]*")
_OM_SAMPLE = re.compile(
    rb"(" + _NAME + rb")(?:" + _LABELS + rb")? " + _FLOAT + rb"(?: " + _FLOAT + rb")?"
    rb"(?: # " + _LABELS + rb" " + _FLOAT + rb"(?: " + _FLOAT + rb")?)?"
)
# The spelling every real exporter writes (no optional whitespace): ~30% cheaper to match; tried first.
_LABEL_VALUE = rb'"[^"\\\n]*(?:\\[\\"n][^"\\\n]*)*"'
_TIGHT_LABELS = (
    rb"\{[a-zA-Z_][a-zA-Z0-9_]*=" + _LABEL_VALUE + rb"(?:,[a-zA-Z_][a-zA-Z0-9_]*=" + _LABEL_VALUE + rb")*,?\}"
)
_TIGHT_TEXT_SAMPLE = re.compile(rb"(" + _NAME + rb")(?:" + _TIGHT_LABELS + rb")? " + _FLOAT + rb"(?: -?[0-9]+)?")
_NAME_PREFIX = re.compile(_NAME)
_NAME_FULL = re.compile(_NAME + rb"$")
_HELP_TEXT = re.compile(rb"(?:[^\\\n]|\\[\\n\"])*$")

# Envoy's prometheus formatter's output, as pass_block() passes it untouched (see there).
# Atomic groups: no backtracking state kept per line (~25% faster on Envoy's body).
_ENVOY_TYPE = rb"# TYPE " + _NAME + rb" (?:counter|gauge|histogram)\n"
_ENVOY_SAMPLE = rb"[^#\n][^\n]*+\n"
_ENVOY_FAMILY = _ENVOY_TYPE + rb"(?>(?:" + _ENVOY_SAMPLE + rb")+)"
_ENVOY_TYPE_LINE = re.compile(rb"\n# TYPE ([^ \n]+) ([^\n]+)")
_ENVOY_BLOCK = re.compile(rb"(?>(?:" + _ENVOY_SAMPLE + rb")*)(?:" + _ENVOY_FAMILY + rb")*(?:" + _ENVOY_TYPE + rb")?")

# Blocks in which every line is valid, for feed_checked_block(): comment lines are judged by _comment() later.
# Each sample line is tried in the spelling every real exporter writes first (no optional whitespace: ~30% faster).
_TIGHT_OM_SAMPLE = _NAME + rb"(?:" + _TIGHT_LABELS + rb")? " + _FLOAT + rb"(?: " + _FLOAT + rb")?"
_TEXT_BLOCK = re.compile(rb"(?:#[^\n]*+\n|" + _TIGHT_TEXT_SAMPLE.pattern + rb"\n|" + _TEXT_SAMPLE.pattern + rb"\n)*+")
_OM_BLOCK = re.compile(rb"(?:#[^\n]*+\n|" + _TIGHT_OM_SAMPLE + rb"\n|" + _OM_SAMPLE.pattern + rb"\n)*+")

# Families whose claims a source's cache keeps (~150 bytes each); past that the cache starts again.
CLAIMS_CACHE_CAP = 20_000

# Family names remembered per source to catch a source repeating its own family (~70 bytes each: ~3.5 MiB at most).
OWN_NAMES_CAP = 50_000

_SUFFIXES: dict[bytes | None, tuple[bytes, ...]] = {
    b"counter": (b"", b"_total", b"_created"),
    b"histogram": (b"_bucket", b"_count", b"_sum", b"_created"),
    b"gaugehistogram": (b"_bucket", b"_gcount", b"_gsum"),
    b"summary": (b"", b"_count", b"_sum", b"_created"),
    b"info": (b"_info",),
}
# Types spelled the same in text 0.0.4 and OpenMetrics.
_PORTABLE_TYPES = {b"counter", b"gauge", b"histogram", b"summary"}
_TEXT_TYPES = {b"counter", b"gauge", b"histogram", b"summary", b"untyped"}
_OM_TYPES = {b"counter", b"gauge", b"histogram", b"gaugehistogram", b"summary", b"info", b"stateset", b"unknown"}


def sample_names(name: bytes, kind: bytes | None) -> frozenset[bytes]:
    return frozenset(name + suffix for suffix in _SUFFIXES.get(kind, (b"",)))


class SourceGarbage(Exception):
    """The source's first line is not exposition text (an HTML page, random bytes...): leave it out whole."""


@dataclass
class FamilyFilter:
    """Filter one source's lines into the merged output. Feed complete lines (without their newline)."""

    claimed: frozenset[bytes] | set[bytes]
    openmetrics: bool
    validate: bool = True
    # Whether this source's claims must be kept for the sources after it (False for the last source: memory).
    record: bool = True
    new_claims: set[bytes] = field(default_factory=set)
    dropped_families: int = 0
    invalid_lines: int = 0
    _name: bytes | None = None
    _kind: bytes | None = None
    _allowed: frozenset[bytes] = frozenset()
    _keep: bool = True
    _decided: bool = True
    _pending: list[bytes] = field(default_factory=list)
    _started: bool = False
    _meta_seen: set[bytes] = field(default_factory=set)
    _own_names: set[bytes] = field(default_factory=set)
    _words: frozenset[bytes] | None = None
    # Claims per (family name, type), shared by the merges of one source (see pass_block()).
    claims_cache: dict[tuple[bytes, bytes], frozenset[bytes]] = field(default_factory=dict)

    def feed(self, lines: list[bytes], out: list[bytes]) -> None:
        sample_re = _OM_SAMPLE if self.openmetrics else _TEXT_SAMPLE
        tight = None if self.openmetrics else _TIGHT_TEXT_SAMPLE
        validate = self.validate
        # Consecutive samples mostly share a name: `same` is the previous sample's name followed by "{" or " ",
        # and a line starting with it belongs to the family already decided (the hot path: two C calls a line).
        same_brace = same_space = b"\x00"
        for line in lines:
            if not line:
                continue  # blank lines: allowed in text, not in OpenMetrics; never needed
            if line[0] == 35:  # "#"
                self._comment(line, out)
                same_brace = same_space = b"\x00"
                continue
            if line.startswith(same_brace) or line.startswith(same_space):
                if validate and not _valid_sample(line, tight, sample_re):
                    self._bad(line)
                elif self._keep:
                    out.append(line)
                continue
            if validate:
                match = sample_re.fullmatch(line)
                if match is None or not (line.isascii() or _utf8(line)):
                    self._bad(line)
                    continue
                name = match.group(1)
            else:
                prefix = _NAME_PREFIX.match(line)
                if prefix is None:
                    continue
                name = prefix.group()
            self._started = True
            if not self._decided:
                self._decide(out)
            if name not in self._allowed:
                self._new_family(name, out)
                self._decide(out)
            same_brace, same_space = name + b"{", name + b" "
            if self._keep:
                out.append(line)

    def feed_block(self, block: bytes, out: list[bytes]) -> bool:
        """Fast path for a TRUSTED source whose every family opens with `# TYPE` (Envoy's formatter does):
        pass a block of complete lines through untouched when no family in it clashes. Returns False (nothing
        consumed) when the block needs the line-by-line path: a clash, a dropped current family, blank lines,
        free comments, types the output format spells differently."""
        if self.validate or not self._keep or not self._decided or b"\n\n" in block or block.startswith(b"\n"):
            return False
        # split() and find() run in C; a regex scan of every byte for `^# TYPE` costs several times more.
        pieces = (b"\n" + block).split(b"\n# TYPE ")
        helps = block.count(b"\n# HELP ") + block.startswith(b"# HELP ")
        if block.count(b"\n#") + block.startswith(b"#") != len(pieces) - 1 + helps:
            return False  # `# EOF`, `# UNIT`, free comments
        claims: set[bytes] = set()
        types: list[tuple[bytes, bytes]] = []
        for piece in pieces[1:]:
            name, _, kind = piece[: piece.find(b"\n")].partition(b" ")
            if kind not in _PORTABLE_TYPES or not _NAME_FULL.match(name):
                return False
            types.append((name, kind))
            claims.add(name)
            for suffix in _SUFFIXES.get(kind, (b"",)):
                claims.add(name + suffix)
        if not claims.isdisjoint(self.claimed):
            return False
        if types:
            self._name, self._kind = types[-1]
            self._allowed = sample_names(self._name, self._kind)
            if self.record:
                self.new_claims |= claims
        self._started = True
        out.append(block)
        return True

    def feed_checked_block(self, block: bytes, out: list[bytes]) -> bool:
        """Fast path for an UNTRUSTED source (an application): a block of complete lines whose every line is valid
        (one regex over the block, in C) is handled family by family instead of line by line: its comment lines
        go through _comment() one by one as in feed(), and each run of samples between them is kept or dropped
        whole when all its sample names belong to the current family, which is what feed() would do line by line.
        Output in feed()'s convention (lines joined by the caller). Returns False (nothing consumed) when the
        block needs feed(): an invalid or blank line, non-ASCII bytes (checked as UTF-8 there)."""
        if not self.validate or not block.isascii():
            return False
        if (_OM_BLOCK if self.openmetrics else _TEXT_BLOCK).fullmatch(block) is None:
            return False
        # Comment lines found with find() (C, skipping whole runs of samples), not a `^#` regex scan of every byte.
        start = 0
        while start < len(block):
            if block.startswith(b"#", start):
                comment = start
            else:
                found = block.find(b"\n#", start)
                if found < 0:
                    self._feed_run(block[start:], out)
                    break
                comment = found + 1
                self._feed_run(block[start:comment], out)
            end = block.index(b"\n", comment)
            self._comment(block[comment:end], out)
            start = end + 1
        return True

    def _feed_run(self, run: bytes, out: list[bytes]) -> None:
        """Sample lines (valid, each ending in a newline) with no comment among them."""
        if not self._decided:
            self._decide(out)
        # Every line starts with an allowed name followed by `{` or ` ` (counted in C; a line matches one at most).
        head = b"\n" + run
        of_family = sum(head.count(b"\n" + name + b"{") + head.count(b"\n" + name + b" ") for name in self._allowed)
        if of_family != run.count(b"\n"):
            self.feed(run.split(b"\n")[:-1], out)  # a new family begins inside the run: line by line
            return
        self._started = True
        if self._keep:
            out.append(run[:-1])

    def take_block(self, block: bytes, out: list[bytes]) -> bool:
        """A block of complete lines through the fastest path that gives the same output: pass_block(), else
        feed_block(). False: nothing consumed, feed() the lines."""
        return self.pass_block(block, out) or self.feed_block(block, out)

    def pass_block(self, block: bytes, out: list[bytes]) -> bool:
        """Fastest path, for a trusted source (Envoy): a block in Envoy's exact shape goes out as it came, after one
        regex match in C and no per-line Python work. It accepts only blocks feed_block() would pass untouched, so
        the output is the same; False (nothing consumed) leaves the block to feed_block().

        Envoy's shape (_ENVOY_BLOCK): sample lines, and `# TYPE <valid name> counter|gauge|histogram` lines each
        followed by its samples (the block's last line may be a TYPE whose samples come in the next block); no
        HELP, no other comment, no blank line. No family can clash when no `# TYPE` in the block names a family
        starting with the first `_`-separated word of a claimed name: a family `f` clashes when `f` or `f` + a
        suffix (`_total`, `_bucket`, ...) is claimed, and such a name starts with its first word (`istio` for
        every name of the agent's). When a later source needs this one's claims, they come from the TYPE lines,
        each family's from `claims_cache` (Envoy's families are the same from one scrape to the next)."""
        if self.validate or not self._keep or not self._decided:
            return False
        if _ENVOY_BLOCK.fullmatch(block) is None:
            return False
        if any(b"# TYPE " + word in block for word in self._claimed_words()):
            return False
        if self.record:
            cache = self.claims_cache
            for family in _ENVOY_TYPE_LINE.findall(b"\n" + block):
                claims = cache.get(family)
                if claims is None:
                    claims = cache[family] = frozenset((family[0], *sample_names(*family)))
                self.new_claims |= claims
            if len(cache) > CLAIMS_CACHE_CAP:
                cache.clear()  # a source whose family names keep changing: nothing to gain, keep memory bounded
        # The last TYPE line (a "# TYPE" inside a label value is not one) decides what the next block continues.
        last = block.rfind(b"\n# TYPE ") + 1 or (0 if block.startswith(b"# TYPE ") else -1)
        if last >= 0:
            self._name, _, self._kind = block[last + 7 : block.index(b"\n", last)].partition(b" ")
            self._allowed = sample_names(self._name, self._kind)
        self._started = True
        out.append(block)
        return True

    def _claimed_words(self) -> frozenset[bytes]:
        if self._words is None:
            self._words = frozenset(name.split(b"_", 1)[0] for name in self.claimed)
        return self._words

    def finish(self, out: list[bytes]) -> None:
        if not self._decided:
            self._decide(out)

    def _bad(self, line: bytes) -> None:
        if not self._started:
            raise SourceGarbage(f"not exposition text: {line[:80]!r}")
        self.invalid_lines += 1

    def _comment(self, line: bytes, out: list[bytes]) -> None:
        parts = line.split(None, 3)
        keyword = parts[1] if len(parts) > 1 else b""
        if keyword not in (b"HELP", b"TYPE", b"UNIT") or len(parts) < 3:
            # `# EOF` of each source is stripped (one is appended at the end); free comments carry no data and
            # OpenMetrics forbids them.
            return
        name = parts[2]
        rest = parts[3] if len(parts) > 3 else b""
        if self.validate and not _NAME_FULL.match(name):
            self._bad(line)
            return
        if keyword == b"TYPE":
            kind = rest.strip()
            if kind not in _OM_TYPES and kind not in _TEXT_TYPES:
                self._bad(line)
                return
            line = self._retype(name, kind)
        elif keyword == b"HELP":
            if self.validate and not (_HELP_TEXT.match(rest) and (rest.isascii() or _utf8(rest))):
                self._bad(line)
                return
        elif not self.openmetrics:
            line = b""  # `# UNIT` means nothing to the text format
        self._started = True
        if name != self._name:
            self.finish(out)
            self._new_family(name, out)
        if keyword in self._meta_seen or (keyword == b"TYPE" and self._decided):
            # A second HELP/TYPE for one family, or a TYPE after its samples: parsers reject the whole scrape.
            self.invalid_lines += 1
            return
        self._meta_seen.add(keyword)
        if keyword == b"TYPE" and not self._decided:
            self._kind = b"untyped" if rest.strip() == b"unknown" else rest.strip()
            if line:
                self._pending.append(line)
            self._decide(out)
            return
        if not line:
            return
        if self._decided:
            if self._keep:
                out.append(line)
        else:
            self._pending.append(line)

    def _retype(self, name: bytes, kind: bytes) -> bytes:
        """The TYPE line as the output format spells it; b"" when the output format has no such type."""
        if self.openmetrics:
            kind = b"unknown" if kind == b"untyped" else kind
        else:
            kind = b"untyped" if kind == b"unknown" else kind
            if kind not in _TEXT_TYPES:
                return b""  # info/stateset/gaugehistogram from an OpenMetrics source merged as text: untyped
        return b"# TYPE " + name + b" " + kind

    def _new_family(self, name: bytes, out: list[bytes]) -> None:
        self._meta_seen = set()
        self._name = name
        self._kind = None
        self._decided = False
        self._pending = []

    def _decide(self, out: list[bytes]) -> None:
        assert self._name is not None
        allowed = sample_names(self._name, self._kind)
        claims = allowed | {self._name}
        self._allowed = allowed
        # A family this source already wrote, met again further down, is dropped too: a second TYPE/HELP for
        # one name makes parsers reject the scrape. Only names are kept, and at most OWN_NAMES_CAP of them.
        self._keep = self._name not in self._own_names and claims.isdisjoint(self.claimed)
        self._decided = True
        if self._keep:
            out.extend(self._pending)
            if self.record:
                self.new_claims |= claims
            if len(self._own_names) < OWN_NAMES_CAP:
                self._own_names.add(self._name)
        else:
            self.dropped_families += 1
        self._pending = []


def _valid_sample(line: bytes, tight: re.Pattern[bytes] | None, full: re.Pattern[bytes]) -> bool:
    if (tight is None or tight.fullmatch(line) is None) and full.fullmatch(line) is None:
        return False
    return line.isascii() or _utf8(line)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True)
class Negotiated:
    """What to ask each source for, given the scraper's Accept header."""

    app_accept: str
    wants_openmetrics: bool


def negotiate(accept: str | None) -> Negotiated:
    """Istio's allowedContentTypes: keep OpenMetrics and text entries (with their q), map wildcards, default text."""
    kept: list[tuple[float, str]] = []
    for position, entry in enumerate((accept or "").split(",")):
        media, *params = [p.strip() for p in entry.split(";")]
        media = media.lower()
        q = 1.0
        others = []
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            elif param:
                others.append(param)
        if q <= 0:
            continue
        if media in ("*", "*/*", "text/*"):
            media, others = "text/plain", ["version=0.0.4"]
        elif media == "application/*":
            media, others = "application/openmetrics-text", ["version=0.0.1"]
        elif media not in ("text/plain", "application/openmetrics-text"):
            continue
        kept.append((-q + position * 1e-6, ";".join([media, *others, f"q={q:g}"])))
    if not kept:
        return Negotiated(TEXT_ACCEPT, False)
    kept.sort()
    header = ",".join(entry for _, entry in kept)
    return Negotiated(header, "application/openmetrics-text" in header)


def response_is_openmetrics(content_type: str) -> bool:
    return content_type.strip().lower().startswith("application/openmetrics-text")


def output_content_type(app_content_types: list[str | None]) -> str:
    """Istio's rule: no application -> text; else the first answering target's format; any disagreement -> text."""
    answered = [ct for ct in app_content_types if ct is not None]
    if not answered:
        return TEXT_CONTENT_TYPE
    formats = {response_is_openmetrics(ct) for ct in answered}
    if formats != {True}:
        return TEXT_CONTENT_TYPE
    return OPENMETRICS_0 if "version=0.0.1" in answered[0].replace(" ", "") else OPENMETRICS_1
