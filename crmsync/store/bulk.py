"""Bulk writes of plain rows, and the compact JSON text they store.

The hot paths (a pulled page, a push round's outbox rows, thousands of entity links) write rows
as a few bulk statements, not ORM objects: on SQLite straight to the driver's ``executemany``.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, bindparam, insert, update
from sqlalchemy.engine import Connection
from sqlmodel import Session


def _json_encoder(*, sort_keys: bool) -> Callable[[Any], str]:
    """Compact JSON text of a value (anything else as ``str``), made by one C encoder built once.

    ``json.dumps`` with options builds a ``JSONEncoder`` per call, and ``JSONEncoder.encode`` builds
    its C encoder per call, which costs more than encoding a small value. Without the C accelerator
    (another Python), ``JSONEncoder.encode``; the text is the same either way (tests/test_store.py
    compares them). No circular-reference check: stored values are parsed JSON and mapped records,
    never cyclic.
    """
    encoder = json.JSONEncoder(sort_keys=sort_keys, default=str, separators=(",", ":"), check_circular=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    # The encoder's own settings, in the order JSONEncoder.iterencode hands them to the C encoder.
    iterencode = make(
        None,  # no markers: check_circular is off
        encoder.default,
        json.encoder.encode_basestring_ascii if encoder.ensure_ascii else json.encoder.encode_basestring,
        encoder.indent,
        encoder.key_separator,
        encoder.item_separator,
        encoder.sort_keys,
        encoder.skipkeys,
        encoder.allow_nan,
    )
    return lambda value: "".join(iterencode(value, 0))


sorted_json = _json_encoder(sort_keys=True)
compact_json = _json_encoder(sort_keys=False)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is slower, and two are made per record
class Encoded:
    """A JSON column value with its text already made (SQLite takes the text; other databases the value)."""

    value: Any
    text: str


def encoded(value: Any) -> Encoded:
    """``value`` with its compact JSON text, for a bulk write's JSON column."""
    return Encoded(value, compact_json(value))


def plain(value: Any) -> Any:
    """The value of a column value that may be ``Encoded``."""
    return value.value if isinstance(value, Encoded) else value


class Bulk:
    """Bulk INSERT/UPDATE of plain rows inside a session's transaction.

    On SQLite the rows go straight to the driver's ``executemany`` with each column's own bind
    processor applied once per value, because SQLAlchemy's per-statement parameter handling cost
    more than the SQLite writes themselves. Other databases take the ordinary Core statements.
    """

    _sql: dict[tuple[str, str, tuple[str, ...]], tuple[str, list[Any], list[bool]]] = {}

    def __init__(self, db: Session | Connection, *, json: bool | None = None) -> None:
        """``json``: whether to read rows as JSON arrays SQLite builds; None: where SQLite has JSON functions."""
        self.db = db
        self.conn = db.connection() if isinstance(db, Session) else db
        self.dialect = self.conn.dialect
        self.direct = self.dialect.name == "sqlite"
        self.json = self.direct and (_sqlite_json(self.conn) if json is None else json)

    def _prepared(
        self, kind: str, table: Any, cols: tuple[str, ...], where: tuple[str, ...] = ()
    ) -> tuple[str, list[Any], list[bool]]:
        key = (kind, table.name, cols + where)
        if key not in self._sql:
            if kind == "insert":
                sql = f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            else:
                sets = ", ".join(f"{c} = ?" for c in cols)
                sql = f"UPDATE {table.name} SET {sets} WHERE {' AND '.join(f'{c} = ?' for c in where)}"
            procs = [table.c[c].type.dialect_impl(self.dialect).bind_processor(self.dialect) for c in cols + where]
            json_cols = [isinstance(table.c[c].type, JSON) for c in cols + where]
            self._sql[key] = (sql, procs, json_cols)
        return self._sql[key]

    def _params(
        self, rows: list[dict[str, Any]], cols: tuple[str, ...], procs: list[Any], json_cols: list[bool]
    ) -> list[tuple[Any, ...]]:
        # Plain columns pass through untouched; only the few that need a conversion are visited.
        # A page repeats timestamps (one updated_at for every row): each is converted once.
        fixes: list[tuple[int, Callable[[Any], Any]]] = []
        for i, proc in enumerate(procs):
            if proc is None:
                continue
            if json_cols[i]:
                fixes.append((i, _json_text))
            else:
                fixes.append((i, functools.lru_cache(maxsize=64)(proc)))
        get = operator.itemgetter(*cols)
        if not fixes:
            return [get(row) if len(cols) > 1 else (get(row),) for row in rows]
        out = []
        for row in rows:
            values = list(get(row)) if len(cols) > 1 else [get(row)]
            for i, fix in fixes:
                if values[i] is not None:
                    values[i] = fix(values[i])
            out.append(tuple(values))
        return out

    def insert(self, table: Any, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if not self.direct:
            self.db.execute(insert(table), [_decoded(r) for r in rows])
            return
        for cols, group in _by_keys(rows):
            sql, procs, json_cols = self._prepared("insert", table, cols)
            self.conn.exec_driver_sql(sql, self._params(group, cols, procs, json_cols))

    def update(self, table: Any, rows: list[dict[str, Any]], key: str = "id") -> None:
        """Rows carry ``key`` plus the columns to set."""
        if not rows:
            return
        for cols, group in _by_keys(rows):
            sets = tuple(c for c in cols if c != key)
            if not self.direct:
                # Parameter names must not be column names in an UPDATE's SET (SQLAlchemy reserves them).
                stmt = (
                    update(table).where(table.c[key] == bindparam("k_")).values({c: bindparam(f"v_{c}") for c in sets})
                )
                self.db.execute(stmt, [{**{f"v_{c}": plain(r[c]) for c in sets}, "k_": r[key]} for r in group])
                continue
            sql, procs, json_cols = self._prepared("update", table, sets, (key,))
            self.conn.exec_driver_sql(sql, self._params(group, (*sets, key), procs, json_cols))


_JSON1: list[bool] = []  # whether the SQLite library has the JSON functions (one library per process)


def _sqlite_json(conn: Connection) -> bool:
    """Whether SQLite has JSON1 (built in since 3.38; a compile option before, on in most builds)."""
    if not _JSON1:
        try:
            conn.exec_driver_sql("SELECT json_group_array(value) FROM json_each('[1]')").scalar()
            _JSON1.append(True)
        except Exception:  # OperationalError: no such function
            _JSON1.append(False)
    return _JSON1[0]


def update_rows(session: Session, table: Any, rows: list[dict[str, Any]], key: str = "id") -> None:
    """Bulk UPDATE of plain rows by ``key`` in ``session``'s transaction (see ``Bulk``)."""
    Bulk(session).update(table, rows, key)


def insert_rows(db: Session | Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """Bulk INSERT of plain rows (JSON values may be ``Encoded``) in ``db``'s transaction (see ``Bulk``)."""
    Bulk(db).insert(table, rows)


def _json_text(value: Any) -> str:
    if isinstance(value, Encoded):
        return value.text
    if value == {}:  # most outbox rows' in-flight marks, on every save
        return "{}"
    return compact_json(value)


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: plain(v) for k, v in row.items()}


def _by_keys(rows: list[dict[str, Any]]) -> Iterator[tuple[tuple[str, ...], list[dict[str, Any]]]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row), []).append(row)
    return iter(groups.items())


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
