"""The webhook events repository: group-committed inserts (deduplicated), listing, and processing marks.

Events are written by the receiver on one connection of their own in group transactions (one
fsync for every request queued meanwhile) and read back by ``pull``, which marks them processed
in the same transaction that stores the records they point at.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, select
from sqlmodel import Session
from sqlmodel import select as sql_select

from crmsync.errors import ConfigError
from crmsync.model import utcnow
from crmsync.store import CrmWebhookEvent, Store

log = logging.getLogger("crmsync.webhooks")

#: ``(kind, level, message, *args)``: how the writer reports a failed commit (the receiver rate-limits it).
LogFn = Callable[..., None]


def _log(kind: str, level: int, message: str, *args: Any) -> None:
    log.log(level, message, *args)


class StoredEvent(Protocol):
    """What the writer stores of an event (``providers.capabilities.Event`` has it)."""

    @property
    def dedupe_key(self) -> str: ...
    @property
    def object(self) -> str: ...
    @property
    def remote_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def occurred_at(self) -> datetime | None: ...
    @property
    def payload(self) -> dict[str, Any]: ...


@dataclass
class _Job:
    connection: str
    provider: str
    events: Sequence[StoredEvent]
    received_at: datetime
    done: bool = False
    inserted: list[bool] = field(default_factory=list)
    error: BaseException | None = None


class WriterStopped(Exception):
    """The writer is shutting down: the request is refused (the CRM retries it)."""


class EventWriter:
    """Commits the events of concurrent requests in group transactions on one connection.

    There is no writer thread: whichever request thread holds the commit lock commits every job
    queued so far, its own included. While one commit waits on the disk, the next requests queue
    up and share the next commit, so one fsync serves many requests and no thread hand-off is
    paid per request.
    """

    def __init__(self, store: Store, *, log_once: LogFn | None = None) -> None:
        self.store = store
        self.log_once: LogFn = log_once or _log
        self._pending: list[_Job] = []
        self._lock = threading.Lock()  # guards _pending and _accepting (held briefly)
        self._commit_lock = threading.Lock()  # one transaction at a time on self._conn
        self._accepting = False
        self._conn: Any = None
        self._stmt = _insert_ignore(store)
        self._known = _known_keys()
        self._sqlite = store.engine.dialect.name == "sqlite"
        table = self._stmt.table
        self._processors = [table.c[name].type.bind_processor(store.engine.dialect) for name in _COLUMNS]
        self._sql = (
            f"INSERT INTO {table.name} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
            "ON CONFLICT (connection, dedupe_key) DO NOTHING"
        )

    def start(self) -> None:
        with self._commit_lock:
            self._conn = self._connect()
        with self._lock:
            self._accepting = True

    def submit(
        self, connection: str, provider: str, events: Sequence[StoredEvent], *, timeout: float = 30.0
    ) -> list[bool]:
        """Store events atomically; returns per event whether it was new (False: a duplicate).

        Returns only after the commit. Raises what the commit raised, ``WriterStopped`` when
        shutting down, or ``TimeoutError`` (the events may still commit; dedupe absorbs the retry).
        """
        job = _Job(connection, provider, events, utcnow())
        with self._lock:
            if not self._accepting:
                raise WriterStopped()
            self._pending.append(job)
        if not self._commit_lock.acquire(timeout=timeout):
            raise TimeoutError("the store did not commit in time")
        try:
            if not job.done:
                self._commit_pending()
        finally:
            self._commit_lock.release()
        if job.error is not None:
            raise job.error
        return job.inserted

    def stop(self) -> None:
        """Commit everything already submitted, then close the connection."""
        with self._lock:
            self._accepting = False
        with self._commit_lock:
            if self._conn is None:
                return
            self._commit_pending()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _commit_pending(self) -> None:
        with self._lock:
            jobs, self._pending = self._pending, []
        if jobs:
            self._conn = self._commit_group(self._conn, jobs)

    def _connect(self) -> Any:
        conn = self.store.engine.connect()
        if conn.dialect.name == "sqlite":
            # Survive power loss too, not only a killed process: the CRM forgets what we acknowledge.
            conn.exec_driver_sql("PRAGMA synchronous=FULL")
            conn.commit()
        return conn

    def _commit_group(self, conn: Any, jobs: list[_Job]) -> Any:
        try:
            with conn.begin():
                results = self._write(conn, jobs)
        except Exception:
            # One job's failure must not fail its neighbours: retry each in its own transaction.
            conn = self._reconnect(conn)
            for job in jobs:
                try:
                    with conn.begin():
                        (job.inserted,) = self._write(conn, [job])
                except Exception as exc:
                    self.log_once(
                        "store",
                        logging.ERROR,
                        "storing %d webhook event(s) for %s failed: %s",
                        len(job.events),
                        job.connection,
                        exc,
                    )
                    job.error = exc
                    conn = self._reconnect(conn)
                job.done = True
            return conn
        for job, inserted in zip(jobs, results, strict=True):
            job.inserted = inserted
            job.done = True
        return conn

    def _reconnect(self, conn: Any) -> Any:
        if not conn.closed and not conn.invalidated:
            return conn
        with contextlib.suppress(Exception):
            conn.close()
        return self._connect()

    def _write(self, conn: Any, jobs: Sequence[_Job]) -> list[list[bool]]:
        """Insert the events of ``jobs``; per job, which events were new (not already stored)."""
        if self._sqlite:
            return self._write_sqlite(conn, jobs)
        return self._write_portable(conn, jobs)

    def _write_sqlite(self, conn: Any, jobs: Sequence[_Job]) -> list[list[bool]]:
        # The DB-API cursor directly: SQLAlchemy's per-statement overhead was most of the
        # receiver's CPU per event. Values go through the columns' own bind processors, so they
        # are stored exactly as the ORM would store them.
        cur = conn.connection.dbapi_connection.cursor()
        try:
            results = []
            for job in jobs:
                flags = []
                for ev in job.events:
                    cur.execute(self._sql, self._values(job, ev))
                    flags.append(cur.rowcount == 1)
                results.append(flags)
            return results
        finally:
            cur.close()

    def _write_portable(self, conn: Any, jobs: Sequence[_Job]) -> list[list[bool]]:
        # Known keys are looked up first so duplicates can be reported; ON CONFLICT DO NOTHING
        # still guards against another process inserting the same event meanwhile.
        wanted: dict[str, list[str]] = {}
        for job in jobs:
            wanted.setdefault(job.connection, []).extend(ev.dedupe_key for ev in job.events)
        seen: set[tuple[str, str]] = set()
        for connection, keys in wanted.items():
            for i in range(0, len(keys), 500):
                rows = conn.execute(self._known, {"connection": connection, "keys": keys[i : i + 500]})
                seen.update((connection, key) for (key,) in rows)
        params: list[dict[str, Any]] = []
        results: list[list[bool]] = []
        for job in jobs:
            flags = []
            for ev in job.events:
                new = (job.connection, ev.dedupe_key) not in seen
                flags.append(new)
                if new:
                    seen.add((job.connection, ev.dedupe_key))
                    params.append(dict(zip(_COLUMNS, self._fields(job, ev), strict=True)))
            results.append(flags)
        if params:
            conn.execute(self._stmt, params)
        return results

    @staticmethod
    def _fields(job: _Job, ev: StoredEvent) -> tuple[Any, ...]:
        return (
            job.connection,
            job.provider,
            ev.dedupe_key,
            ev.object,
            ev.remote_id,
            ev.event_type,
            ev.occurred_at,
            ev.payload,
            job.received_at,
            None,
        )

    def _values(self, job: _Job, ev: StoredEvent) -> list[Any]:
        return [p(v) if p is not None else v for p, v in zip(self._processors, self._fields(job, ev), strict=True)]


_COLUMNS = (
    "connection",
    "provider",
    "dedupe_key",
    "object",
    "remote_id",
    "event_type",
    "occurred_at",
    "payload",
    "received_at",
    "processed_at",
)


def _known_keys() -> Any:
    table = CrmWebhookEvent.__table__  # type: ignore[attr-defined]
    return select(table.c.dedupe_key).where(
        table.c.connection == bindparam("connection"), table.c.dedupe_key.in_(bindparam("keys", expanding=True))
    )


def _insert_ignore(store: Store) -> Any:
    """INSERT … ON CONFLICT (connection, dedupe_key) DO NOTHING for SQLite and PostgreSQL."""
    table = CrmWebhookEvent.__table__  # type: ignore[attr-defined]
    dialect = store.engine.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:
        raise ConfigError(f"the webhook receiver supports SQLite and PostgreSQL stores, not {dialect}")
    return insert(table).on_conflict_do_nothing(index_elements=["connection", "dedupe_key"])


def list_events(
    store: Store, *, connection: str | None = None, pending: bool = False, limit: int = 100
) -> list[CrmWebhookEvent]:
    """Stored events, newest first (``pending``: only those no pull has applied yet)."""
    with store.session() as s:
        q = sql_select(CrmWebhookEvent)
        if connection:
            q = q.where(CrmWebhookEvent.connection == connection)
        if pending:
            q = q.where(CrmWebhookEvent.processed_at == None)  # noqa: E711
        return list(s.exec(q.order_by(CrmWebhookEvent.id.desc()).limit(limit)))  # type: ignore[union-attr]


def pending_events(store: Store, connection: str, *, limit: int) -> list[CrmWebhookEvent]:
    """The oldest events of ``connection`` no pull has applied yet."""
    with store.session() as s:
        q = (
            sql_select(CrmWebhookEvent)
            .where(CrmWebhookEvent.connection == connection, CrmWebhookEvent.processed_at == None)  # noqa: E711
            .order_by(CrmWebhookEvent.id)  # type: ignore[arg-type]
            .limit(limit)
        )
        return list(s.exec(q))


def mark_processed(ids: Sequence[int | None]) -> Callable[[Session], None]:
    """A ``before_commit`` step that marks these events processed (with the records they point at)."""

    def mark(s: Session) -> None:
        now = utcnow()
        for row in s.exec(sql_select(CrmWebhookEvent).where(CrmWebhookEvent.id.in_(list(ids)))):  # type: ignore[union-attr]
            row.processed_at = now
            s.add(row)

    return mark
