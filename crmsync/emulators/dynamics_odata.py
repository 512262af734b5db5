"""The OData query language the Dynamics emulator understands: ``$filter``, ``$orderby``, ``$select``, key segments.

A small recursive-descent reading of OData 4.0 ``$filter`` (comparisons ``eq ne gt ge lt le``,
``and``/``or``/``not``, parentheses, ``contains``/``startswith``, string, number, GUID, boolean,
null and datetime literals). Dataverse compares strings case-insensitively; so does this.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

Row = dict[str, Any]
Predicate = Callable[[Row], bool]

TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<lp>\()|(?P<rp>\))|(?P<comma>,)"
    r"|(?P<dt>\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:\d\d)?)"
    r"|(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"|(?P<num>-?\d+(?:\.\d+)?)|(?P<word>[A-Za-z_][A-Za-z0-9_./]*))"
)
COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}


class FilterError(ValueError):
    """A ``$filter`` the emulator cannot read (answered 400, as Dataverse does)."""


def parse_time(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _norm(value: Any) -> Any:
    """A value as compared: strings without case, datetimes as instants, GUIDs lower-cased."""
    if isinstance(value, str):
        when = parse_time(value) if len(value) >= 16 and value[4:5] == "-" and "T" in value else None
        return when if when is not None else value.lower()
    return value


def _cmp(op: str, left: Any, right: Any) -> bool:
    a, b = _norm(left), _norm(right)
    if op == "eq":
        return bool(a == b)
    if op == "ne":
        return bool(a != b)
    if a is None or b is None:
        return False
    try:
        return bool({"gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b}[op])
    except TypeError:
        return False


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = TOKEN.match(text, pos)
            if not m or m.end() == pos:
                if text[pos:].strip() == "":
                    break
                raise FilterError(f"Syntax error at position {pos} in '{text}'.")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise FilterError("Unexpected end of $filter.")
        self.i += 1
        return tok

    def expr(self) -> Predicate:
        left = self.conj()
        while (tok := self.peek()) and tok == ("word", "or"):
            self.take()
            right = self.conj()
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
        return left

    def conj(self) -> Predicate:
        left = self.unary()
        while (tok := self.peek()) and tok == ("word", "and"):
            self.take()
            right = self.unary()
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
        return left

    def unary(self) -> Predicate:
        tok = self.peek()
        if tok == ("word", "not"):
            self.take()
            inner = self.unary()
            return lambda r: not inner(r)
        if tok and tok[0] == "lp":
            self.take()
            inner = self.expr()
            if self.take()[0] != "rp":
                raise FilterError("Expected ')' in $filter.")
            return inner
        return self.comparison()

    def value(self) -> Callable[[Row], Any]:
        kind, text = self.take()
        if kind == "str":
            lit = text[1:-1].replace("''", "'")
            return lambda r: lit
        if kind in ("dt", "guid"):
            return lambda r: text
        if kind == "num":
            num = float(text) if "." in text else int(text)
            return lambda r: num
        if kind == "word":
            if text in ("true", "false"):
                return lambda r: text == "true"
            if text == "null":
                return lambda r: None
            return lambda r: r.get(text)
        raise FilterError(f"Unexpected '{text}' in $filter.")

    def comparison(self) -> Predicate:
        tok = self.peek()
        if tok and tok[0] == "word" and tok[1] in ("contains", "startswith", "endswith"):
            fn = self.take()[1]
            if self.take()[0] != "lp":
                raise FilterError(f"Expected '(' after {fn}.")
            left = self.value()
            if self.take()[0] != "comma":
                raise FilterError(f"Expected ',' in {fn}.")
            right = self.value()
            if self.take()[0] != "rp":
                raise FilterError(f"Expected ')' after {fn}.")
            test = {
                "contains": lambda a, b: b in a,
                "startswith": lambda a, b: a.startswith(b),
                "endswith": lambda a, b: a.endswith(b),
            }[fn]
            return lambda r: test(str(left(r) or "").lower(), str(right(r) or "").lower())
        left = self.value()
        kind, op = self.take()
        if kind != "word" or op not in COMPARE:
            raise FilterError(f"Expected a comparison operator, found '{op}'.")
        right = self.value()
        return lambda r: _cmp(op, left(r), right(r))


def parse_filter(text: str) -> Predicate:
    parser = _Parser(text)
    pred = parser.expr()
    if parser.peek() is not None:
        raise FilterError(f"Syntax error: unexpected '{parser.peek()[1]}' in $filter.")  # type: ignore[index]
    return pred


def order(rows: list[Row], orderby: str) -> list[Row]:
    """Rows sorted by ``col [asc|desc], …`` (None first ascending, as SQL Server sorts)."""
    for part in reversed([p.strip() for p in orderby.split(",") if p.strip()]):
        name, _, direction = part.partition(" ")
        desc = direction.strip().lower() == "desc"
        rows = sorted(
            rows,
            key=lambda r: (r.get(name) is not None, _norm(r.get(name)) if r.get(name) is not None else 0),
            reverse=desc,
        )
    return rows


def key_segment(text: str) -> dict[str, str] | str:
    """``<guid>`` -> the id; ``a='x',b=1`` -> {a: x, b: 1} (an alternate key)."""
    text = text.strip()
    if "=" not in text:
        return text.strip("'").lower()
    out: dict[str, str] = {}
    for m in re.finditer(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^']|'')*'|[^,]+)\s*,?", text):
        raw = m.group(2).strip()
        out[m.group(1)] = raw[1:-1].replace("''", "'") if raw.startswith("'") else raw
    return out
