"""Kubernetes downward-API files (`/etc/istio/pod/labels`, `/etc/istio/pod/annotations`).

kubelet writes one `key="value"` line per entry, the value quoted with Go's `%q`, so multi-line values appear as
`\\n` escapes and values may contain `=`. Istio's ParseDownwardAPI splits each line at the first `=`, skips lines
without one, and unquotes the rest with `strconv.Unquote`; one bad line fails the whole file. We do the same and
name the file, the line and the key in the error.
"""

from __future__ import annotations

from pathlib import Path

from agent.config.documents import read_file_if_present
from agent.errors import ConfigError

_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
}


class _UnquoteError(ValueError):
    pass


def go_unquote(text: str) -> str:
    """Go's `strconv.Unquote`: a "double-quoted" string with Go escapes, a `raw` string, or a 'c' rune literal."""
    if len(text) < 2 or text[0] != text[-1] or text[0] not in "\"'`":
        raise _UnquoteError("value is not a Go-quoted string")
    quote, body = text[0], text[1:-1]
    if quote == "`":
        if "`" in body:
            raise _UnquoteError("backquote inside a raw string")
        return body.replace("\r", "")
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise _UnquoteError(f"unescaped {quote} inside the string")
        if c == "\n":
            raise _UnquoteError("unescaped newline inside the string")
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= len(body):
            raise _UnquoteError("string ends with a lone backslash")
        e = body[i + 1]
        i += 2
        if e in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[e].encode()
        elif e in "'\"":
            if e != quote:
                raise _UnquoteError(f"\\{e} is not a valid escape inside {quote}...{quote}")
            out += e.encode()
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i : i + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise _UnquoteError(f"bad \\{e} escape")
            value = int(digits, 16)
            i += width
            if e == "x":
                out.append(value)
            else:
                if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                    raise _UnquoteError(f"\\{e}{digits} is not a valid Unicode code point")
                out += chr(value).encode()
        elif e in "01234567":
            digits = body[i - 1 : i + 2]
            if len(digits) != 3 or any(d not in "01234567" for d in digits):
                raise _UnquoteError("bad octal escape")
            value = int(digits, 8)
            if value > 255:
                raise _UnquoteError("octal escape above \\377")
            out.append(value)
            i += 2
        else:
            raise _UnquoteError(f"unknown escape \\{e}")
    result = out.decode("utf-8", "replace")
    if quote == "'" and len(result) != 1:
        raise _UnquoteError("a '...' literal must hold exactly one character")
    return result


def parse_downward_api(text: str, source: str) -> dict[str, str]:
    """Parse kubelet's `key="value"` lines. `source` names the file in errors."""
    result: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        try:
            result[key] = go_unquote(raw)
        except _UnquoteError as exc:
            raise ConfigError(f"{source}:{number}", key, f"cannot unquote value {raw[:60]!r}: {exc}") from None
    return result


def read_downward_api(path: Path) -> dict[str, str] | None:
    """The parsed file, or None when it does not exist (outside Kubernetes, or the volume is not mounted)."""
    data = read_file_if_present(path, str(path))
    if data is None:
        return None
    return parse_downward_api(data.decode("utf-8", "replace"), str(path))
