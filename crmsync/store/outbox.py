"""The outbox repository: every query push makes of ``crm_outbox``, one method each.

Push (``crmsync.sync.push``) decides what happens to an outcome; this module only reads and
writes its row. Delivery reads rows as plain ``OutboxRow``s, not ``CrmOutbox`` instances, and
saves their progress column by column in one bulk UPDATE per step.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Connection, Table, func, or_, select, type_coerce, update
from sqlalchemy.types import NullType
from sqlmodel import Session, col
from sqlmodel import select as orm_select

from crmsync.model import utcnow
from crmsync.store import CrmOutbox, encoded, insert_rows, update_rows
from crmsync.store.bulk import Encoded, compact_json, sorted_json

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

    from crmsync.store import Store

#: The table itself, for Core statements (the ORM's loading machinery costs more than 10,000 rows).
TABLE: Table = CrmOutbox.metadata.tables["crm_outbox"]

#: Judges which claim owners belong to a run that has died (``crmsync.scaleout.dead_owners``).
DeadOwners = Callable[[Session, Iterable[str]], Collection[str]]


@dataclass(slots=True)
class OutboxRow:
    """The part of an outbox row that delivery reads and writes back (``Outbox.save``).

    Plain attributes, not a ``CrmOutbox`` instance: a round holds thousands of rows, and
    ORM-instrumented objects made most of a round's claim and close.
    """

    id: int
    outcome_id: str
    state: str
    steps: dict[str, Any]
    in_flight: dict[str, Any]
    attempts: int
    last_error: str | None
    update_requested: bool
    updated_at: datetime
    delivered_at: datetime | None
    claimed_by: str | None
    claimed_at: datetime | None
    #: The outcome as queued, until it is parsed (None when the caller already has it parsed).
    payload: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Prior:
    """What intake reads of a row already queued under an outcome's id."""

    id: int
    outcome_id: str
    content_hash: str
    state: str
    steps: dict[str, Any]
    last_error: str | None


#: The columns an ``OutboxRow`` is read from, in its field order (payload apart).
ROW_COLUMNS = tuple(f.name for f in fields(OutboxRow) if f.name != "payload")
#: The columns delivery writes back.
SAVED_COLUMNS = (
    "steps",
    "in_flight",
    "state",
    "attempts",
    "last_error",
    "updated_at",
    "delivered_at",
    "claimed_by",
    "claimed_at",
)


class Outbox:
    """The outbox of every connection in one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def shared(self) -> bool:
        """True when several workers may deliver one connection at once (a PostgreSQL store)."""
        return self.store.engine.dialect.name == "postgresql"

    # -- intake ---------------------------------------------------------------------------------
    def has_rows(self, db: Connection, connection_name: str) -> bool:
        """Whether anything was ever queued for this connection (if not, no input id can be queued yet)."""
        q = select(TABLE.c.id).where(TABLE.c.connection == connection_name).limit(1)
        return db.execute(q).first() is not None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction for a whole input: committed when the block ends, rolled back on error."""
        with self.store.engine.begin() as db:
            yield db

    def priors(self, db: Connection, connection_name: str, outcome_ids: Sequence[str | None]) -> dict[str, Prior]:
        """The rows already queued under these ids, by outcome id."""
        if not outcome_ids:
            return {}
        c = TABLE.c
        q = select(c.id, c.outcome_id, c.content_hash, c.state, c.steps, c.last_error).where(
            c.connection == connection_name, c.outcome_id.in_(outcome_ids)
        )
        return {row.outcome_id: Prior(*row) for row in db.execute(q)}

    def insert(self, db: Connection, rows: list[dict[str, Any]]) -> None:
        """Queue new rows (column -> value; JSON values may be ``encoded``)."""
        if rows:
            insert_rows(db, TABLE, rows)

    def new_row(
        self, connection_name: str, outcome_id: str, digest: str, payload: Any, now: datetime
    ) -> dict[str, Any]:
        """The columns of a row queued for the first time (``payload`` may be ``Encoded`` already)."""
        return {
            "connection": connection_name,
            "outcome_id": outcome_id,
            "content_hash": digest,
            "payload": payload if isinstance(payload, Encoded) else encoded(payload),
            "state": "pending",
            "steps": {},
            "in_flight": {},
            "attempts": 0,
            "update_requested": False,
            "created_at": now,
            "updated_at": now,
        }

    def requeue_update(
        self, db: Connection, row_id: int, *, payload: Any, digest: str, previous: dict[str, str], now: datetime
    ) -> None:
        """Queue a changed outcome again as an update of what its earlier delivery wrote (``previous``)."""
        db.execute(
            update(TABLE)
            .where(TABLE.c.id == row_id)
            .values(
                payload=payload,
                content_hash=digest,
                state="pending",
                update_requested=True,
                steps={"previous": previous},
                in_flight={},
                last_error=None,
                updated_at=now,
            )
        )

    # -- counts ---------------------------------------------------------------------------------
    def queued_ids(self, connection_name: str, states: Sequence[str]) -> set[str]:
        """The ids of a connection's outcomes in ``states``."""
        c = TABLE.c
        with self.store.session() as s:
            q = select(c.outcome_id).where(c.connection == connection_name, c.state.in_(states))
            return {str(i) for i in s.connection().execute(q).scalars()}

    def count_pending(self, connection_name: str) -> int:
        with self.store.session() as s:
            q = select(func.count()).where(TABLE.c.connection == connection_name, TABLE.c.state == "pending")
            return int(s.connection().execute(q).scalar_one())

    def state_counts(self, connection_name: str) -> dict[str, int]:
        """Rows per state."""
        state = TABLE.c.state
        with self.store.session() as s:
            q = select(state, func.count()).where(TABLE.c.connection == connection_name).group_by(state)
            return {str(k): int(n) for k, n in s.connection().execute(q)}

    def reset_failed(self, connection_name: str) -> None:
        """Queue a connection's failed outcomes again (--retry-failed)."""
        with self.store.session() as s:
            s.execute(
                update(TABLE)
                .where(TABLE.c.connection == connection_name, TABLE.c.state == "failed")
                .values(state="pending", updated_at=utcnow())
            )

    # -- whole rows -----------------------------------------------------------------------------
    def rows(self, connection_name: str, outcome_ids: Sequence[str]) -> dict[str, CrmOutbox]:
        """The rows under these outcome ids, by id."""
        with self.store.session() as s:
            q = orm_select(CrmOutbox).where(
                col(CrmOutbox.connection) == connection_name, col(CrmOutbox.outcome_id).in_(outcome_ids)
            )
            return {r.outcome_id: r for r in s.exec(q)}

    def row(self, connection_name: str, outcome_id: str) -> CrmOutbox | None:
        return self.rows(connection_name, [outcome_id]).get(outcome_id)

    # -- delivery -------------------------------------------------------------------------------
    def peek(self, connection_name: str, after_id: int, limit: int) -> list[OutboxRow]:
        """The pending rows after ``after_id`` a claim would take next (read only: nothing is leased)."""
        c = TABLE.c
        with self.store.session() as s:
            where = (c.connection == connection_name) & (c.state == "pending") & (c.id > after_id)
            return _read_rows(s, where, limit=limit)

    def claim(
        self,
        connection_name: str,
        after_id: int,
        owner: str,
        *,
        limit: int,
        lease: timedelta,
        dead_owners: DeadOwners | None = None,
        have: Collection[str] = (),
    ) -> list[OutboxRow]:
        """Lease the next ``limit`` pending rows that no live run holds.

        With ``dead_owners`` (workers sharing the outbox) a claim is free when its run has died
        or its lease is older than ``lease``; without, every claim found is a dead run's. Payloads
        of the outcomes in ``have`` (already parsed) are not read.
        """
        c = TABLE.c
        now = utcnow()
        with self.store.session() as s:
            q = select(c.id).where(c.connection == connection_name, c.state == "pending", c.id > after_id)
            if dead_owners is not None:
                mine = (c.connection == connection_name) & (c.state == "pending") & c.claimed_by.is_not(None)
                owners = s.connection().execute(select(c.claimed_by).where(mine).distinct()).scalars()
                dead = dead_owners(s, owners)
                q = q.where(or_(c.claimed_by.is_(None), c.claimed_by.in_(dead), c.claimed_at < now - lease))
            q = q.order_by(c.id).limit(limit).with_for_update(skip_locked=True)
            ids = list(s.connection().execute(q).scalars())
            if not ids:
                return []
            taken: ColumnElement[bool] = c.id.in_(ids)
            if dead_owners is None:
                # The same rows as a range (one run per connection: nothing else takes them meanwhile),
                # not a statement with a parameter per row.
                taken = (c.connection == connection_name) & (c.state == "pending") & c.id.between(ids[0], ids[-1])
            s.execute(update(TABLE).where(taken).values(claimed_by=owner, claimed_at=now))
            return _read_rows(s, taken, skip_payload=have)

    def renew(self, ids: Sequence[int], owner: str) -> datetime:
        """Extend the lease of rows still being worked on; the new lease time."""
        now = utcnow()
        with self.store.session() as s:
            s.execute(update(TABLE).where(TABLE.c.id.in_(ids), TABLE.c.claimed_by == owner).values(claimed_at=now))
        return now

    def release(self, ids: Sequence[int], owner: str) -> None:
        """Hand rows back (a stopped round): their steps and in-flight marks stay."""
        with self.store.session() as s:
            s.execute(
                update(TABLE)
                .where(TABLE.c.id.in_(ids), TABLE.c.claimed_by == owner)
                .values(claimed_by=None, claimed_at=None)
            )

    def save(self, rows: Iterable[OutboxRow], *, session: Session | None = None) -> None:
        """Write the rows' progress in one bulk UPDATE by primary key (in ``session``'s transaction if given)."""
        values = [{"id": r.id, **{f: getattr(r, f) for f in SAVED_COLUMNS}} for r in rows]
        if not values:
            return
        if session is not None:
            update_rows(session, TABLE, values)
            return
        with self.store.write_lock, self.store.session() as s:  # see Database.write_lock
            update_rows(s, TABLE, values)


def digest_and_payload(dumped: dict[str, Any]) -> tuple[str, Encoded]:
    """An outcome's ``content_hash`` (``CallOutcome.content_hash``: sha256 of its sorted JSON without
    the id) and its payload column, from one encoding of its ``model_dump(mode="json")``."""
    rest = {k: v for k, v in dumped.items() if k != "id"}
    text = sorted_json(rest)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if "id" not in dumped:
        return digest, Encoded(dumped, text)
    head = '{"id":' + compact_json(dumped["id"])
    return digest, Encoded(dumped, head + ("," + text[1:] if rest else "}"))


def _read_rows(
    s: Session, where: ColumnElement[bool], *, limit: int | None = None, skip_payload: Collection[str] = ()
) -> list[OutboxRow]:
    """Rows as ``OutboxRow``s, in id order; payloads only of the outcomes not in ``skip_payload``."""
    c = TABLE.c
    db = s.connection()
    convert = _Converters(db.dialect)
    q = select(*convert.columns).where(where).order_by(c.id)
    if limit is not None:
        q = q.limit(limit)
    rows = [OutboxRow(*convert.row(r)) for r in db.execute(q)]
    wanted = [r.id for r in rows if r.outcome_id not in skip_payload]
    if wanted:
        payloads = {rid: payload for rid, payload in db.execute(select(c.id, c.payload).where(c.id.in_(wanted)))}
        for r in rows:
            r.payload = payloads.get(r.id, r.payload)
    return rows


class _Converters:
    """A claim's columns read as the driver returns them, each converted by its column type once
    per distinct value: a round of fresh rows shares its timestamps and empty JSON objects, and the
    per-row conversions made most of a large claim."""

    def __init__(self, dialect: Any) -> None:
        self.columns: list[Any] = []
        self.procs: list[Callable[[Any], Any] | None] = []
        for name in ROW_COLUMNS:
            column = TABLE.c[name]
            proc = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if proc is None or dialect.name != "sqlite":  # other drivers decode JSON themselves
                self.columns.append(column)
                self.procs.append(None)
                continue
            self.columns.append(_raw(column))
            self.procs.append(_json(proc) if isinstance(column.type, JSON) else functools.lru_cache(maxsize=256)(proc))

    def row(self, raw: Sequence[Any]) -> list[Any]:
        """One row's values, converted."""
        return [v if proc is None or v is None else proc(v) for v, proc in zip(raw, self.procs, strict=True)]


def _raw(column: Any) -> Any:
    """The column as the driver returns it (no result processing), under its own name."""
    return type_coerce(column, NullType()).label(column.name)


def _json(proc: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A JSON column's conversion; an empty object (most rows) without the parser, a new one each time."""
    return lambda v: {} if v == "{}" else proc(v)
