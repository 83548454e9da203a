"""Enough of protobuf's text format to read Istio's `.proxycfg` test inputs (test-only helper).

Grammar used by those files: `name: value` / `name { ... }` fields, `{...}` messages, `[...]` lists, "strings",
numbers, enum identifiers, `#` comments, optional `,`/`;` separators. The result feeds the agent's own
ProxyConfig normaliser, which accepts snake_case names, {seconds: n} durations and {value: v} wrappers.
"""

from __future__ import annotations

import json
import re
from typing import Any

_TOKEN = re.compile(
    r'\s+|#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?)|(?P<ident>[A-Za-z_][\w.]*)|(?P<punct>[{}\[\]:,;])'
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"prototext: unexpected {text[pos : pos + 20]!r}")
        pos = m.end()
        if m.lastgroup:
            out.append((m.lastgroup, m.group(m.lastgroup)))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def message(self, end: str | None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        while True:
            tok = self.peek()
            if tok is None or tok[1] == end:
                if end is not None:
                    self.take()
                return fields
            if tok[1] in ",;":
                self.take()
                continue
            kind, name = self.take()
            assert kind == "ident", f"field name expected, got {name!r}"
            if self.peek() == ("punct", ":"):
                self.take()
            fields[name] = self.value()

    def value(self) -> Any:
        kind, text = self.take()
        if text == "{":
            return self.message("}")
        if text == "[":
            items = []
            while self.peek() != ("punct", "]"):
                if self.peek() == ("punct", ","):
                    self.take()
                    continue
                items.append(self.value())
            self.take()
            return items
        if kind == "str":
            return json.loads(text)
        if kind == "num":
            return float(text) if "." in text else int(text)
        if text in ("true", "false"):
            return text == "true"
        return text  # an enum name


def parse(text: str) -> dict[str, Any]:
    return _Parser(text).message(None)
