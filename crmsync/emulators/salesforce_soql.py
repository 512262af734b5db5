"""A small SOQL parser for the Salesforce emulator: the statements crmsync and common clients send.

``SELECT f, … | COUNT() FROM Obj [WHERE cond] [ORDER BY f [ASC|DESC], …] [LIMIT n]`` where a
condition combines ``AND``/``OR``/``NOT`` and parentheses over ``field op literal`` (``= != <> < <=
> >= LIKE``) and ``field [NOT] IN (…)``; literals are quoted strings (backslash escapes), numbers,
``true``/``false``/``null``, dates and datetimes. Text compares case-insensitively, as in SOQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>'(?:[^'\\]|\\.)*')
      | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))
      | (?P<date>\d{4}-\d{2}-\d{2})
      | (?P<num>-?\d+(?:\.\d+)?)
      | (?P<op><=|>=|!=|<>|=|<|>|\(|\)|,)
      | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.X,
)
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\"}


class SoqlError(ValueError):
    """A statement this parser cannot read (the emulator answers MALFORMED_QUERY)."""


@dataclass
class Query:
    sobject: str
    fields: list[str]
    count: bool = False
    where: Callable[[dict[str, Any]], bool] | None = None
    order: list[tuple[str, bool]] = field(default_factory=list)  # (field, descending)
    limit: int | None = None


@dataclass
class _Lit:
    value: Any


def _unquote(text: str) -> str:
    out, i = [], 1
    while i < len(text) - 1:
        c = text[i]
        if c == "\\" and i + 1 < len(text) - 1:
            out.append(_UNESCAPE.get(text[i + 1], text[i + 1]))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise SoqlError(f"unexpected token at position {pos}: {text[pos : pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        raw = m.group(kind)
        if kind == "str":
            out.append(("lit", _unquote(raw)))
        elif kind == "dt":
            out.append(("lit", datetime.fromisoformat(raw.replace("Z", "+00:00")).astimezone(UTC)))
        elif kind == "date":
            out.append(("lit", date.fromisoformat(raw)))
        elif kind == "num":
            out.append(("lit", float(raw) if "." in raw else int(raw)))
        elif kind == "op":
            out.append(("op", raw))
        else:
            low = raw.lower()
            if low in ("true", "false"):
                out.append(("lit", low == "true"))
            elif low == "null":
                out.append(("lit", None))
            else:
                out.append(("word", raw))
        if pos < len(text) and text[pos:].strip() == "":
            break
    return out


def comparable(value: Any) -> Any:
    """Values as the comparison sees them: datetimes as epoch seconds, text case-folded."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return value.lower()
    return value


class _Parser:
    def __init__(self, text: str, getter: Callable[[dict[str, Any], str], Any]) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.get = getter

    def peek(self, *words: str) -> bool:
        if self.i >= len(self.toks):
            return False
        kind, value = self.toks[self.i]
        return kind in ("word", "op") and str(value).lower() in words

    def take(self) -> tuple[str, Any]:
        if self.i >= len(self.toks):
            raise SoqlError("unexpected end of query")
        self.i += 1
        return self.toks[self.i - 1]

    def expect(self, word: str) -> None:
        _kind, value = self.take()
        if str(value).lower() != word:
            raise SoqlError(f"expected {word.upper()}, got {value!r}")

    def word(self) -> str:
        kind, value = self.take()
        if kind != "word":
            raise SoqlError(f"expected a name, got {value!r}")
        return str(value)

    def parse(self) -> Query:
        self.expect("select")
        fields: list[str] = []
        count = False
        if self.peek("count"):
            self.take()
            self.expect("(")
            self.expect(")")
            count = True
        else:
            fields.append(self.word())
            while self.peek(","):
                self.take()
                fields.append(self.word())
        self.expect("from")
        query = Query(sobject=self.word(), fields=fields, count=count)
        if self.peek("where"):
            self.take()
            query.where = self.expr()
        if self.peek("order"):
            self.take()
            self.expect("by")
            while True:
                name = self.word()
                desc = False
                if self.peek("asc", "desc"):
                    desc = str(self.take()[1]).lower() == "desc"
                query.order.append((name, desc))
                if not self.peek(","):
                    break
                self.take()
        if self.peek("limit"):
            self.take()
            kind, value = self.take()
            if kind != "lit" or not isinstance(value, int):
                raise SoqlError("LIMIT takes a number")
            query.limit = value
        if self.i != len(self.toks):
            raise SoqlError(f"unexpected {self.toks[self.i][1]!r}")
        return query

    def expr(self) -> Callable[[dict[str, Any]], bool]:
        left = self.term()
        while self.peek("or"):
            self.take()
            right = self.term()
            left = (lambda a, b: lambda r: a(r) or b(r))(left, right)
        return left

    def term(self) -> Callable[[dict[str, Any]], bool]:
        left = self.factor()
        while self.peek("and"):
            self.take()
            right = self.factor()
            left = (lambda a, b: lambda r: a(r) and b(r))(left, right)
        return left

    def factor(self) -> Callable[[dict[str, Any]], bool]:
        if self.peek("not"):
            self.take()
            inner = self.factor()
            return lambda r: not inner(r)
        if self.peek("("):
            self.take()
            inner = self.expr()
            self.expect(")")
            return inner
        name = self.word()
        negate = False
        if self.peek("not"):
            self.take()
            negate = True
        if self.peek("in"):
            self.take()
            self.expect("(")
            values = set()
            while True:
                kind, value = self.take()
                if kind != "lit":
                    raise SoqlError(f"IN takes literals, got {value!r}")
                values.add(comparable(value))
                if self.peek(")"):
                    self.take()
                    break
                self.expect(",")
            get = self.get
            return lambda r: (comparable(get(r, name)) in values) != negate
        kind, op = self.take()
        if str(op).lower() not in ("=", "!=", "<>", "<", "<=", ">", ">=", "like"):
            raise SoqlError(f"unknown operator {op!r}")
        kind, lit = self.take()
        if kind != "lit":
            raise SoqlError(f"expected a literal after {op}, got {lit!r}")
        return _compare(self.get, name, str(op).lower(), lit)


def _compare(
    get: Callable[[dict[str, Any], str], Any], name: str, op: str, lit: Any
) -> Callable[[dict[str, Any]], bool]:
    want = comparable(lit)
    if op == "like":
        pattern = re.compile("^" + re.escape(str(lit).lower()).replace("%", ".*").replace("_", ".") + "$")
        return lambda r: bool(pattern.match(str(get(r, name) or "").lower()))

    def test(r: dict[str, Any]) -> bool:
        have = comparable(get(r, name))
        if op in ("=",):
            return bool(have == want)
        if op in ("!=", "<>"):
            return bool(have != want)
        if have is None or want is None:
            return False
        try:
            return {"<": have < want, "<=": have <= want, ">": have > want, ">=": have >= want}[op]
        except TypeError:
            return False

    return test


def parse(text: str, getter: Callable[[dict[str, Any], str], Any]) -> Query:
    """Parse one statement; ``getter(record, field)`` reads a field for WHERE (dates as datetimes)."""
    return _Parser(text, getter).parse()
