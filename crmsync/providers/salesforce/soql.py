"""The SOQL crmsync sends: literals quoted safely, the exact ``(SystemModstamp, Id)`` delta, lookups by key."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

#: Characters SOQL string literals escape with a backslash.
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"'}


def quote(value: str) -> str:
    """A SOQL string literal; hostile input (quotes, backslashes) stays inside it."""
    return "'" + "".join(_ESCAPES.get(c, c) for c in str(value)) + "'"


def stamp(when: datetime) -> str:
    """A SOQL datetime literal (unquoted, UTC, whole seconds: SystemModstamp's resolution)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def field_list(fields: Sequence[str], always: Sequence[str] = ("Id", "SystemModstamp")) -> str:
    seen = dict.fromkeys([*always, *fields])
    return ", ".join(f for f in seen if f)


def delta(sobject: str, fields: Sequence[str], *, after: tuple[str, str], until: str, where: str = "") -> str:
    """Rows changed after ``(ts, id)`` up to ``until``, in ``(SystemModstamp, Id)`` order.

    Rows sharing one second are told apart by Id, so a page boundary inside a mass update loses none.
    """
    ts, rid = after
    cond = f"(SystemModstamp > {ts} OR (SystemModstamp = {ts} AND Id > {quote(rid)})) AND SystemModstamp <= {until}"
    if where:
        cond = f"({where}) AND {cond}"
    return f"SELECT {field_list(fields)} FROM {sobject} WHERE {cond} ORDER BY SystemModstamp, Id"


def window(sobject: str, fields: Sequence[str], *, until: str, where: str = "") -> str:
    """Every row up to ``until`` (a Bulk backfill: Bulk 2.0 queries take no ORDER BY)."""
    cond = f"SystemModstamp <= {until}"
    if where:
        cond = f"({where}) AND {cond}"
    return f"SELECT {field_list(fields)} FROM {sobject} WHERE {cond}"


def count(sobject: str, *, until: str, where: str = "") -> str:
    cond = f"SystemModstamp <= {until}"
    if where:
        cond = f"({where}) AND {cond}"
    return f"SELECT COUNT() FROM {sobject} WHERE {cond}"


def in_list(sobject: str, fields: Sequence[str], column: str, values: Sequence[str], *, extra: str = "") -> str:
    """``SELECT … WHERE column IN (…)`` (and ``OR extra``)."""
    cond = f"{column} IN ({', '.join(quote(v) for v in values)})"
    if extra:
        cond = f"{cond} OR {extra}"
    return f"SELECT {field_list(fields)} FROM {sobject} WHERE {cond}"
