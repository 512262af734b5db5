"""The local store: SQLModel tables, migrations on open, and the queries the engine needs.

SQLite by default (WAL, busy timeout, file mode 0600); any SQLAlchemy URL otherwise
(PostgreSQL for scale-out). Alembic migrations live in ``crmsync/migrations`` and are applied
when the store opens; a store written by a newer crmsync is refused.

The rule that matters most: a page of pulled records and the cursor that follows it are
written in ONE transaction (``apply_page``), so a crash between pages repeats at most a page.

Every fault of the database itself (locked, full, read-only, corrupt, unreachable, credentials
refused) becomes a ``StoreError`` here, in ``store_fault``, called from the engine's
``handle_error`` event: the rest of crmsync never sees a driver exception for those. A SQLite
store is checked with ``PRAGMA quick_check`` when it opens after crmsync did not close it, or
after something else changed the file (``_OpenMarker``), and whenever SQLite reports damage.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import json
import logging
import operator
import os
import re
import shutil
import socket
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Column,
    Index,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    false,
    func,
    insert,
    text,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError
from sqlmodel import Field, Session, SQLModel, select

from crmsync.errors import (
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreUnreachableError,
)
from crmsync.model import utcnow

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no unclean-shutdown marker, corruption is still caught on use
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")

log = logging.getLogger("crmsync.store")

#: How long a statement waits for another process's SQLite lock when the run names no lock timeout.
DEFAULT_STORE_WAIT = 5.0
#: The opening read waits no longer than this unless a lock timeout was given: in WAL mode only a
#: process holding the whole file exclusively blocks readers, and that does not end in seconds.
OPEN_WAIT = 1.0

SCHEMA_HEAD = "0002"  # newest migration this crmsync knows; keep in step with migrations/versions


class CrmConnection(SQLModel, table=True):
    __tablename__ = "crm_connection"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    provider: str
    account_id: str | None = None
    base_url: str
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False, default=list))
    settings: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False, default=dict))
    created_at: datetime = Field(default_factory=utcnow)
    last_checked_at: datetime | None = None
    last_ok_at: datetime | None = None
    auth_state: str = "ok"  # ok | invalid | expired


class CrmRecord(SQLModel, table=True):
    __tablename__ = "crm_record"
    __table_args__ = (
        UniqueConstraint("connection", "object", "remote_id", name="uq_record"),
        Index("ix_record_match", "connection", "object", "match_key"),
        Index("ix_record_alt", "connection", "object", "alt_key"),
    )
    id: int | None = Field(default=None, primary_key=True)
    connection: str
    object: str
    remote_id: str
    properties: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    raw: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    associations: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False, default=dict))
    remote_updated_at: datetime | None = None
    archived: bool = False
    content_hash: str = ""
    match_key: str | None = None  # email:… / domain:… / key:…
    alt_key: str | None = None  # phone:… / name:…
    first_seen_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class CrmEntityLink(SQLModel, table=True):
    __tablename__ = "crm_entity_link"
    __table_args__ = (UniqueConstraint("connection", "object", "local_key", name="uq_link"),)
    id: int | None = Field(default=None, primary_key=True)
    connection: str
    object: str
    local_key: str
    remote_id: str
    created_at: datetime = Field(default_factory=utcnow)


class CrmFieldMapping(SQLModel, table=True):
    __tablename__ = "crm_field_mapping"
    id: int | None = Field(default=None, primary_key=True)
    connection: str = Field(unique=True)
    path: str | None = None
    hash: str
    updated_at: datetime = Field(default_factory=utcnow)


class CrmSyncCursor(SQLModel, table=True):
    __tablename__ = "crm_sync_cursor"
    __table_args__ = (UniqueConstraint("connection", "object", "kind", name="uq_cursor"),)
    id: int | None = Field(default=None, primary_key=True)
    connection: str
    object: str
    kind: str = "incremental"  # incremental | backfill | reconcile | webhook
    value: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow)


class CrmSyncLog(SQLModel, table=True):
    __tablename__ = "crm_sync_log"
    __table_args__ = (Index("ix_log_conn", "connection", "command", "started_at"),)
    id: int | None = Field(default=None, primary_key=True)
    connection: str
    command: str
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    status: str = "running"  # running | ok | partial | failed | interrupted | abandoned
    counts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False, default=dict))
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    error: str | None = None
    mapping_hash: str | None = None
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)


class CrmRecordChange(SQLModel, table=True):
    """The audit trail: what one run did to one record."""

    __tablename__ = "crm_record_change"
    __table_args__ = (Index("ix_change_record", "connection", "object", "remote_id"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: int | None = Field(default=None, index=True)
    connection: str
    object: str
    remote_id: str
    action: str  # created | updated | archived | pushed
    changes: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False, default=dict))
    at: datetime = Field(default_factory=utcnow, index=True)


class CrmWebhookEvent(SQLModel, table=True):
    __tablename__ = "crm_webhook_event"
    __table_args__ = (
        UniqueConstraint("connection", "dedupe_key", name="uq_event"),
        Index("ix_event_pending", "connection", "processed_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    connection: str
    provider: str
    dedupe_key: str
    object: str
    remote_id: str
    event_type: str
    occurred_at: datetime | None = None
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    received_at: datetime = Field(default_factory=utcnow)
    processed_at: datetime | None = None


class CrmOutbox(SQLModel, table=True):
    __tablename__ = "crm_outbox"
    __table_args__ = (
        UniqueConstraint("connection", "outcome_id", name="uq_outbox"),
        Index("ix_outbox_state", "connection", "state"),
    )
    id: int | None = Field(default=None, primary_key=True)
    connection: str
    outcome_id: str  # the caller's idempotency key (or the content hash)
    content_hash: str
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    state: str = "pending"  # pending | done | failed | conflict
    #: Remote ids per completed step: {"companies": "12", "contacts": "34", "calls": "56"}.
    steps: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False, default=dict))
    #: Steps whose request went out without a recorded answer: reconcile before re-sending.
    in_flight: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False, default=dict))
    attempts: int = 0
    last_error: str | None = None
    update_requested: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    delivered_at: datetime | None = None
    #: Which delivery run leased the row, and when: concurrent workers skip rows leased by
    #: another and take over a lease gone stale (its worker died).
    claimed_by: str | None = None
    claimed_at: datetime | None = None


class CrmConflict(SQLModel, table=True):
    __tablename__ = "crm_conflict"
    id: int | None = Field(default=None, primary_key=True)
    connection: str = Field(index=True)
    object: str
    remote_id: str | None = None
    field: str
    crm_value: str | None = None
    outcome_value: str | None = None
    rule: str
    resolution: str  # kept_crm | sent_outcome | filled
    outcome_id: str | None = None
    at: datetime = Field(default_factory=utcnow)
    open: bool = True


# -- helpers ---------------------------------------------------------------------------------------
def _json_encoder(*, sort_keys: bool) -> Callable[[Any], str]:
    """Compact JSON text of a value (anything else as ``str``), made by one C encoder built once.

    ``json.dumps`` with options builds a ``JSONEncoder`` per call, and ``JSONEncoder.encode`` builds
    its C encoder per call: 0.6 of a small value's 1-2 microseconds, and ingest encodes about four
    values per record. Without the C accelerator (another Python), ``JSONEncoder.encode``; the text is
    the same either way (tests/test_store.py compares them). No circular-reference check: stored
    values are parsed JSON and mapped records, never cyclic.
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


_SORTED_JSON = _json_encoder(sort_keys=True)
_COMPACT_JSON = _json_encoder(sort_keys=False)


def _existing_records() -> Any:
    # One statement object with an expanding IN: building a fresh one per page (100 literals coerced
    # each time) showed in the ingest profile.
    t = CrmRecord.__table__.c  # type: ignore[attr-defined]
    return select(
        t.id, t.remote_id, t.associations, t.remote_updated_at, t.archived, t.content_hash, t.match_key, t.alt_key
    ).where(
        t.connection == bindparam("connection"),
        t.object == bindparam("object"),
        t.remote_id.in_(bindparam("ids", expanding=True)),
    )


# On SQLite a page's stored rows come back as one JSON array made by SQLite: one step of the
# statement, during which the GIL is free, and one json.loads. Row by row, each row was a step that
# gave up the GIL and had to win it back from the threads parsing and mapping the next pages, and
# SQLAlchemy's per-row processing cost more than SQLite's lookups (a 2,000-record page: 26 ms -> 9 ms).
_EXISTING_JSON = (
    "SELECT json_group_array(json_array(id, remote_id, json(associations), remote_updated_at, archived, "
    "content_hash, match_key, alt_key)) FROM crm_record WHERE connection = ? AND object = ? AND remote_id IN "
    "(SELECT value FROM json_each(?))"
)
_PROPERTIES_JSON = (
    "SELECT json_group_array(json_array(remote_id, json(properties))) FROM crm_record "
    "WHERE connection = ? AND object = ? AND remote_id IN (SELECT value FROM json_each(?))"
)


def _existing_rows(bulk: _Bulk, connection: str, obj: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The stored rows of ``ids`` that exist: id, remote_id, associations, remote_updated_at, archived, hash, keys."""
    existing: dict[str, dict[str, Any]] = {}
    if not ids:
        return existing
    if bulk.json:
        # The column type's own reader of the stored text, as SQLAlchemy would apply it to the row.
        column = CrmRecord.__table__.c.remote_updated_at  # type: ignore[attr-defined]
        stored_time = column.type.dialect_impl(bulk.dialect).result_processor(bulk.dialect, None)
        text = bulk.conn.exec_driver_sql(_EXISTING_JSON, (connection, obj, json.dumps(list(ids)))).scalar()
        for row_id, remote_id, assoc, updated, archived, digest, match, alt in json.loads(text or "[]"):
            existing[remote_id] = {
                "id": row_id,
                "remote_id": remote_id,
                "associations": assoc,
                "remote_updated_at": stored_time(updated),
                "archived": bool(archived),
                "content_hash": digest,
                "stored_keys": (match, alt),
            }
        return existing
    for chunk in _chunks(ids, 500):
        params = {"connection": connection, "object": obj, "ids": list(chunk)}
        for row in bulk.db.execute(_EXISTING, params):
            found = dict(row._mapping)
            found["stored_keys"] = (found.pop("match_key"), found.pop("alt_key"))
            existing[row.remote_id] = found
    return existing


def _stored_properties(bulk: _Bulk, connection: str, obj: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """remote_id -> stored properties, for those of ``ids`` that exist."""
    if not ids:
        return {}
    if bulk.json:
        text = bulk.conn.exec_driver_sql(_PROPERTIES_JSON, (connection, obj, json.dumps(list(ids)))).scalar()
        return {remote_id: props or {} for remote_id, props in json.loads(text or "[]")}
    t = CrmRecord.__table__.c  # type: ignore[attr-defined]
    stored: dict[str, dict[str, Any]] = {}
    for chunk in _chunks(ids, 500):
        query = select(t.remote_id, t.properties).where(
            t.connection == connection, t.object == obj, t.remote_id.in_(chunk)
        )
        for remote_id, props in bulk.db.execute(query):
            stored[remote_id] = props or {}
    return stored


def content_hash(properties: dict[str, Any], archived: bool) -> str:
    return encode_properties(properties, archived)[1]


def encode_properties(properties: dict[str, Any], archived: bool) -> tuple[str, str]:
    """(JSON text of ``properties``, content hash): one serialisation serves both the hash and the row.

    The hash is of ``[properties, archived]`` in canonical JSON, built from the same text.
    """
    text = _SORTED_JSON(properties)
    data = f"[{text},{'true' if archived else 'false'}]"
    return text, hashlib.sha256(data.encode()).hexdigest()[:32]


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, twice per record
class Encoded:
    """A JSON column value with its text already made (SQLite takes the text; other databases the value)."""

    value: Any
    text: str


def encoded(value: Any) -> Encoded:
    """``value`` with its compact JSON text, for a bulk write's JSON column."""
    return Encoded(value, _COMPACT_JSON(value))


def retry_on_conflict(write: Callable[[], T], *, attempts: int = 3) -> T:
    """Run a write transaction again when a concurrent writer inserted the same unique key first.

    Concurrent workers on one store (PostgreSQL) may both insert the same record, link or cursor;
    the loser's transaction rolls back and, run again, finds the winner's row and updates it.
    """
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except IntegrityError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def db_url(value: str | Path) -> str:
    """A path or an SQLAlchemy URL -> an SQLAlchemy URL."""
    text_value = str(value)
    for bare in ("postgresql://", "postgres://"):
        if text_value.startswith(bare):
            # The worker extra brings psycopg 3; SQLAlchemy's bare default would be psycopg2.
            return "postgresql+psycopg://" + text_value[len(bare) :]
    if "://" in text_value:
        return text_value
    return f"sqlite:///{Path(text_value).expanduser().resolve()}"


# -- store faults ----------------------------------------------------------------------------------
# SQLite's primary result codes (the low byte of an extended code).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 11, 13, 14
_SQLITE_AUTH, _SQLITE_NOTADB = 23, 26
#: Below this much free space an I/O or open error is taken for a full disk.
_LOW_SPACE = 1 << 20
#: Messages with which PostgreSQL refuses a connection that no retry will fix (bad login, no database).
_PG_REFUSALS = (
    "authentication failed",
    "password",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
    "not permitted to log in",
)


def describe_store(url: str) -> str:
    """The store as an operator names it: the file path, or the URL without its password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)


def free_space(path: Path) -> str:
    """Free space on the file system holding ``path``, for a message ("12 KB free on /srv")."""
    probe = path if path.exists() else path.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return "free space unknown"
    return f"{_human_bytes(usage.free)} free on its file system"


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


def _low_on_space(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(path if path.exists() else path.parent).free < _LOW_SPACE
    return False


def store_fault(exc: BaseException, *, url: str) -> StoreError | None:
    """The ``StoreError`` a database or file-system exception means, or None if it is not a store fault.

    The one place where driver errors become exit codes: locked past the wait or out of space -> 75
    (try again later), read-only, unopenable or refused -> 3, damaged -> ``StoreCorruptError`` (3;
    ``Store`` adds the recovery hint after checking and saving the outbox).
    """
    orig = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's exception
    try:
        where, backend = describe_store(url), make_url(url).get_backend_name()
    except ArgumentError:
        where, backend = _masked(url), ""
    if isinstance(orig, StoreError):
        return orig
    if isinstance(orig, sqlite3.Error):
        return _sqlite_fault(orig, where)
    if isinstance(orig, OSError) and backend == "sqlite":
        return _os_fault(orig, where)
    if type(orig).__module__.split(".")[0] in ("psycopg", "psycopg2"):
        return _postgres_fault(orig, where)
    if type(exc).__module__.startswith("sqlalchemy") and not isinstance(exc, IntegrityError):
        if isinstance(exc, ArgumentError | NoSuchModuleError):
            return StoreError(f"cannot use the store {where!r}", hint="--db takes a file path or an SQLAlchemy URL")
    return None


def _masked(url: str) -> str:
    """A URL that SQLAlchemy could not parse, with anything like a password replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _sqlite_fault(orig: sqlite3.Error, where: str) -> StoreError | None:
    code = getattr(orig, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = str(orig)
    path = Path(where)
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StoreBusyError(
            f"store busy: {where} is locked by another process ({detail})",
            hint="try again later, or pass --lock-timeout SECONDS to wait longer",
        )
    if primary == _SQLITE_FULL or (primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN) and _low_on_space(path)):
        return StoreFullError(
            f"store full: cannot write {where} ({free_space(path)}; {detail})",
            hint="free some space or move the store (--db), then run the command again",
        )
    if primary in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_AUTH):
        return StoreError(
            f"the store {where} is read-only ({detail})",
            hint="crmsync writes its store on every run: make the file and its directory writable",
        )
    if primary == _SQLITE_CANTOPEN:
        return StoreError(
            f"cannot open the store {where} ({detail})",
            hint="check that its directory exists and is writable, or point --db elsewhere",
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreCorruptError(f"the store {where} is corrupt ({detail})")
    if primary == _SQLITE_IOERR:
        return StoreError(f"cannot read or write the store {where} (I/O error: {detail})", hint="check the disk")
    return None


def _os_fault(orig: OSError, where: str) -> StoreError | None:
    if orig.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFullError(
            f"store full: cannot write {where} ({free_space(Path(where))})",
            hint="free some space or move the store (--db), then run the command again",
        )
    if orig.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreError(
            f"the store {where} is read-only ({orig.strerror})",
            hint="crmsync writes its store on every run: make the file and its directory writable",
        )
    return StoreError(f"cannot open the store {where} ({orig.strerror or orig})")


def _postgres_fault(orig: BaseException, where: str) -> StoreError | None:
    state = getattr(orig, "sqlstate", None) or ""
    detail = " ".join(str(orig).split())[:300]
    if not state:
        # Connection-phase errors carry no SQLSTATE: a refusal by the server, or no server at all.
        if any(word in detail.lower() for word in _PG_REFUSALS) and "timeout" not in detail.lower():
            return StoreError(
                f"the database refused crmsync's connection to {where} ({detail})",
                hint="check the user, password and database name in --db / CRMSYNC_DB / the config's db",
            )
        if type(orig).__name__ in ("OperationalError", "InterfaceError"):
            return StoreUnreachableError(
                f"cannot reach the store at {where} ({detail})", hint="the database server is down or unreachable"
            )
        return None
    if state.startswith("08") or state.startswith("57P"):
        return StoreUnreachableError(f"lost the store at {where} ({detail})", hint="try again later")
    if state == "53100":
        return StoreFullError(f"store full: the database server of {where} is out of disk space ({detail})")
    if state.startswith("53") or state == "55P03" or state.startswith("40"):
        return StoreBusyError(f"store busy: {where} ({detail})", hint="try again later")
    if state.startswith("28") or state in ("3D000", "42501"):
        return StoreError(
            f"the database refused crmsync's connection to {where} ({detail})",
            hint="check the user, password, database name and grants",
        )
    if state == "25006":
        return StoreError(f"the store {where} is read-only ({detail})", hint="point --db at the primary server")
    if state in ("XX001", "XX002"):
        return StoreCorruptError(
            f"the store {where} is corrupt ({detail})", hint="restore the database from a backup, or rebuild it"
        )
    return None


@dataclass
class Canonical:
    """A pulled record after mapping: what apply_page stores."""

    remote_id: str
    properties: dict[str, Any]
    raw: dict[str, Any]
    remote_updated_at: datetime | None
    archived: bool = False
    associations: dict[str, list[str]] = field(default_factory=dict)
    match_key: str | None = None
    alt_key: str | None = None


@dataclass
class ApplyCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    archived: int = 0

    def add(self, other: ApplyCounts) -> None:
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.archived += other.archived


class Store:
    """The local store; one per process, thread-safe through short sessions."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        # SQLite takes one writer at a time and makes the others poll (sleeps of 1, 2, 5 ... 25 ms):
        # pages of several objects stored at once queue on this lock instead and go the moment it
        # is free (a Zoho pull of 20,000 changes: median 1.32 -> 1.28 s). Other databases write
        # in parallel. busy_timeout stays for other processes and the other writes.
        self.write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )
        self.path: Path | None = None  # the SQLite file, if the store is one
        self._wait = DEFAULT_STORE_WAIT
        self._marker: _OpenMarker | None = None
        self._run_guards: dict[int, Connection] = {}  # PostgreSQL: one session per live run, holding its lock
        event.listen(engine, "handle_error", self._on_error)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, url_or_path: str | Path, *, migrate: bool = True, wait: float | None = None) -> Store:
        """Open (creating and migrating as needed) the store at a path or SQLAlchemy URL.

        ``wait`` is how long a statement waits for another process's lock (the run's lock
        timeout); None: ``DEFAULT_STORE_WAIT``, and at most ``OPEN_WAIT`` for the first read.

        Raises:
            StoreError: the store cannot be used (see ``store_fault``); nothing was written.
        """
        url = db_url(url_or_path)
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise store_fault(exc, url=url) or StoreError(f"cannot use the store {_masked(url)!r}") from exc
        marker: _OpenMarker | None = None
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    # Create it 0600 before SQLite does, so no other user can ever read it.
                    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                    os.close(fd)
            except OSError as exc:
                raise store_fault(exc, url=url) or StoreError(f"cannot open the store {path} ({exc})") from exc
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
            for target in (path, path.parent):
                if not os.access(target, os.W_OK):
                    # SQLite would read it and fail on the first write, half-way through a run.
                    raise StoreError(
                        f"the store {path} is read-only ({'its directory' if target != path else 'the file'} "
                        "cannot be written)",
                        hint="crmsync writes its store on every run: make the file and its directory writable",
                    )
            engine = create_engine(url, connect_args={"timeout": DEFAULT_STORE_WAIT, "check_same_thread": False})
            marker = _OpenMarker(path)
        elif parsed.get_backend_name() == "sqlite":
            from sqlalchemy.pool import StaticPool

            engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        else:
            args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
            try:
                engine = create_engine(url, pool_pre_ping=True, connect_args=args)
            except (ArgumentError, NoSuchModuleError, ImportError) as exc:
                raise StoreError(
                    f"cannot use the store {describe_store(url)} ({exc})",
                    hint="--db takes a file path or an SQLAlchemy URL whose driver is installed",
                ) from exc
        store = cls(engine, url)
        if engine.dialect.name == "sqlite":
            store._sqlite_setup(Path(parsed.database) if marker else None)
        store.wait = wait if wait is not None and wait > 0 else OPEN_WAIT
        try:
            if marker is not None and marker.enter():
                store.check_integrity()
            if migrate:
                store.migrate()
        except BaseException:
            store.close()
            if marker is not None:
                marker.leave(record=False)  # still "open": the next run looks again
            raise
        store.wait = wait if wait is not None and wait > 0 else DEFAULT_STORE_WAIT
        store._marker = marker
        if marker is not None:
            _OPEN_STORES.add(store)
        return store

    def _sqlite_setup(self, path: Path | None) -> None:
        """Pragmas on every new SQLite connection, and the current wait on every checkout."""
        self.path = path
        on_file = path is not None

        @event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_conn: Any, record: Any) -> None:
            cur = dbapi_conn.cursor()
            wait_ms = int(self._wait * 1000)
            cur.execute(f"PRAGMA busy_timeout={wait_ms}")
            record.info["wait_ms"] = wait_ms
            if on_file:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                # 32 MB of page cache (default 2 MB): a large mirror's indexes stay in memory while pulling.
                cur.execute("PRAGMA cache_size=-32000")
                # Checkpoint at 40 MB of WAL, not 4 MB: a page rewritten by many commits (index and
                # table tails) is copied back once, not ten times (local ingest +10 %). The WAL file
                # is trimmed back to 64 MB after each reset.
                cur.execute("PRAGMA wal_autocheckpoint=10000")
                cur.execute("PRAGMA journal_size_limit=67108864")
                cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(self.engine, "checkout")
        def _current_wait(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
            wait_ms = int(self._wait * 1000)
            if record.info.get("wait_ms") != wait_ms:
                dbapi_conn.execute(f"PRAGMA busy_timeout={wait_ms}")
                record.info["wait_ms"] = wait_ms

    @property
    def wait(self) -> float:
        """Seconds a statement waits for another process's lock on the store (SQLite's busy timeout)."""
        return self._wait

    @wait.setter
    def wait(self, seconds: float) -> None:
        self._wait = max(0.0, float(seconds))

    @contextlib.contextmanager
    def waiting(self, seconds: float | None) -> Iterator[None]:
        """Within the block, wait ``seconds`` for a locked store (a run's lock timeout); None: the default."""
        before = self._wait
        self.wait = seconds if seconds is not None and seconds > 0 else DEFAULT_STORE_WAIT
        try:
            yield
        finally:
            self._wait = before

    # -- faults ----------------------------------------------------------------------------------
    def _on_error(self, ctx: Any) -> None:
        """SQLAlchemy's handle_error: raise the ``StoreError`` a driver error means (see ``store_fault``)."""
        if getattr(ctx, "is_pre_ping", False):
            return  # a pooled connection the server dropped: SQLAlchemy opens a new one (or reports that)
        fault = store_fault(ctx.original_exception, url=self.url)
        orig = ctx.original_exception
        if fault is None and isinstance(orig, sqlite3.DatabaseError) and type(orig) is sqlite3.DatabaseError:
            # Any other DatabaseError may be damage SQLite did not name: look before calling it a bug.
            fault = self._corruption(str(orig))
        elif isinstance(fault, StoreCorruptError) or (type(fault) is StoreError and "(I/O error" in fault.message):
            fault = self._corruption(str(orig)) or fault
        if isinstance(fault, StoreBusyError) and self.path is not None:
            fault.message += f"; waited {self._wait:g} s"
        if fault is not None:
            raise fault from orig

    def check_writable(self) -> None:
        """Meet now the fault a run's first write would meet: the store locked past the wait, or no room.

        For read-only commands (``status``), so they report what the next pull or push would hit.

        Raises:
            StoreBusyError: another process holds the write lock longer than ``wait``.
            StoreFullError: the store's file system has (almost) no space left.
        """
        if self.path is None:
            return
        if _low_on_space(self.path):
            raise StoreFullError(
                f"store full: cannot write {self.path} ({free_space(self.path)})",
                hint="free some space or move the store (--db), then run the command again",
            )
        with self.engine.connect() as c:
            c.exec_driver_sql("BEGIN IMMEDIATE")  # takes the write lock, writes nothing
            c.exec_driver_sql("ROLLBACK")

    def check_integrity(self) -> None:
        """``PRAGMA quick_check`` of a SQLite store.

        Raises:
            StoreCorruptError: the check found damage (the queued outcomes were saved first).
        """
        if self.path is None:
            return
        fault = self._corruption(None)
        if fault is not None:
            raise fault

    def _corruption(self, seen: str | None) -> StoreCorruptError | None:
        """Check the SQLite file; if damaged, save the queued outcomes and say how to recover."""
        if self.path is None:
            return StoreCorruptError(f"the store is corrupt ({seen})") if seen else None
        problems = _quick_check(self.path, timeout=self._wait)
        if not problems and seen is None:
            return None
        if not problems and seen is not None and "malformed" not in seen and "not a database" not in seen:
            return None
        # quick_check's rows span lines ("*** in database main ***\nPage 5: ..."): one line, a few problems.
        detail = " ".join(" ".join(problems[:3]).replace("*** in database main ***", "").split()) if problems else seen
        saved = save_queued(self.path, timeout=self._wait)
        where = self.path
        kept = "; ".join(f"{n} queued outcome(s) of {c} saved to {f}" for c, (f, n) in saved.items())
        again = "".join(f"; then crmsync push {f} -c {c}" for c, (f, _) in saved.items())
        return StoreCorruptError(
            f"the store {where} is corrupt ({detail}); {kept or 'no queued outcome could be read from it'}",
            hint=(
                f"move it aside (mv {where} {where}.corrupt) and rebuild the store from the CRM: "
                f"crmsync connect … and crmsync backfill -c NAME{again}"
            ),
            saved=", ".join(str(f) for f, _ in saved.values()) or None,
        )

    def close(self) -> None:
        for guard in list(self._run_guards.values()):
            with contextlib.suppress(Exception):
                guard.close()
        self._run_guards.clear()
        self.engine.dispose()
        _OPEN_STORES.discard(self)
        if self._marker is not None:
            self._marker.leave()
            self._marker = None

    def migrate(self) -> None:
        """Apply pending migrations; refuse a store written by a newer crmsync."""
        from crmsync.migrations import upgrade

        upgrade(self.engine, head=SCHEMA_HEAD)

    @property
    def concurrent_writers(self) -> bool:
        """Whether threads may write at once: each gets its own connection (not so for in-memory SQLite)."""
        return not (self.engine.dialect.name == "sqlite" and self.engine.url.database in (None, "", ":memory:"))

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception."""
        with Session(self.engine, expire_on_commit=False) as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    # -- connections -------------------------------------------------------------------------------
    def connections(self) -> list[CrmConnection]:
        with self.session() as s:
            return list(s.exec(select(CrmConnection).order_by(CrmConnection.name)))

    def connection(self, name: str) -> CrmConnection | None:
        with self.session() as s:
            return s.exec(select(CrmConnection).where(CrmConnection.name == name)).first()

    def save_connection(self, conn: CrmConnection) -> CrmConnection:
        with self.session() as s:
            existing = s.exec(select(CrmConnection).where(CrmConnection.name == conn.name)).first()
            if existing is not None:
                for key in (
                    "provider",
                    "account_id",
                    "base_url",
                    "scopes",
                    "settings",
                    "last_checked_at",
                    "last_ok_at",
                    "auth_state",
                ):
                    setattr(existing, key, getattr(conn, key))
                conn = existing
            s.add(conn)
            s.flush()
            s.refresh(conn)
            return conn

    def touch_connection(self, name: str, *, ok: bool, auth_state: str | None = None) -> None:
        with self.session() as s:
            conn = s.exec(select(CrmConnection).where(CrmConnection.name == name)).first()
            if conn is None:
                return
            conn.last_checked_at = utcnow()
            if ok:
                conn.last_ok_at = conn.last_checked_at
            if auth_state:
                conn.auth_state = auth_state
            s.add(conn)

    def delete_connection(self, name: str) -> None:
        with self.session() as s:
            conn = s.exec(select(CrmConnection).where(CrmConnection.name == name)).first()
            if conn is not None:
                s.delete(conn)

    # -- cursors -----------------------------------------------------------------------------------
    def cursor(self, connection: str, obj: str, kind: str = "incremental") -> dict[str, Any] | None:
        with self.session() as s:
            row = s.exec(
                select(CrmSyncCursor).where(
                    CrmSyncCursor.connection == connection,
                    CrmSyncCursor.object == obj,
                    CrmSyncCursor.kind == kind,
                )
            ).first()
            return dict(row.value) if row else None

    def set_cursor(
        self,
        connection: str,
        obj: str,
        value: dict[str, Any] | None,
        kind: str = "incremental",
        *,
        session: Session | None = None,
    ) -> None:
        def _do(s: Session) -> None:
            # Core statements: this runs once per pulled page, where an ORM flush cost more than the page.
            t = CrmSyncCursor.__table__  # type: ignore[attr-defined]
            where = (t.c.connection == connection, t.c.object == obj, t.c.kind == kind)
            if value is None:
                s.execute(delete(t).where(*where))
                return
            done = s.execute(update(t).where(*where).values(value=dict(value), updated_at=utcnow()))
            if not done.rowcount:  # type: ignore[attr-defined]
                s.execute(
                    insert(t).values(
                        connection=connection, object=obj, kind=kind, value=dict(value), updated_at=utcnow()
                    )
                )

        if session is not None:
            _do(session)
        else:
            with self.session() as s:
                _do(s)

    def cursors(self, connection: str) -> list[CrmSyncCursor]:
        with self.session() as s:
            return list(s.exec(select(CrmSyncCursor).where(CrmSyncCursor.connection == connection)))

    # -- records -----------------------------------------------------------------------------------
    def apply_page(
        self,
        connection: str,
        obj: str,
        records: Sequence[Canonical],
        *,
        cursor: dict[str, Any] | None,
        cursor_kind: str = "incremental",
        deleted: Sequence[str] = (),
        run_id: int | None = None,
        audit: bool = True,
        extra_cursors: Sequence[tuple[str, dict[str, Any] | None]] = (),
        before_commit: Any = None,
    ) -> ApplyCounts:
        """Store a page of records and advance the cursor in the same transaction.

        A record whose content hash is unchanged is not written. A record older than the stored
        one (an out-of-order webhook fetch, a look-back re-read) never rolls the store back.
        """
        return retry_on_conflict(
            lambda: self._apply_page_once(
                connection,
                obj,
                records,
                cursor=cursor,
                cursor_kind=cursor_kind,
                deleted=deleted,
                run_id=run_id,
                audit=audit,
                extra_cursors=extra_cursors,
                before_commit=before_commit,
            )
        )

    def _apply_page_once(
        self,
        connection: str,
        obj: str,
        records: Sequence[Canonical],
        *,
        cursor: dict[str, Any] | None,
        cursor_kind: str,
        deleted: Sequence[str],
        run_id: int | None,
        audit: bool,
        extra_cursors: Sequence[tuple[str, dict[str, Any] | None]],
        before_commit: Any,
    ) -> ApplyCounts:
        # Core statements sent straight to the driver (see _Bulk), not ORM objects: a page is a few
        # bulk statements whatever its size, and per-row Python work is what limits ingest.
        counts = ApplyCounts()
        ids = [r.remote_id for r in records] + list(deleted)
        now = utcnow()
        inserts: dict[str, dict[str, Any]] = {}
        updates: dict[int, dict[str, Any]] = {}
        changes: list[dict[str, Any]] = []
        changed: dict[str, tuple[str, Canonical]] = {}  # remote_id -> (action, record): diffed after the loop

        def change(remote_id: str, action: str, diff: dict[str, Any] | Encoded) -> None:
            if audit:
                changes.append(
                    {
                        "run_id": run_id,
                        "connection": connection,
                        "object": obj,
                        "remote_id": remote_id,
                        "action": action,
                        "changes": diff,
                        "at": now,
                    }
                )

        with self.session() as s:
            bulk = _Bulk(s)
            # Properties are read only for the records whose hash changed (the diff needs them).
            existing = _existing_rows(bulk, connection, obj, ids)
            for rec in records:
                props_text, digest = encode_properties(rec.properties, rec.archived)
                row = existing.get(rec.remote_id) or inserts.get(rec.remote_id)
                values = {
                    "properties": Encoded(rec.properties, props_text),
                    "raw": rec.raw,
                    "remote_updated_at": rec.remote_updated_at,
                    "archived": rec.archived,
                    "content_hash": digest,
                    "match_key": rec.match_key,
                    "alt_key": rec.alt_key,
                    "updated_at": now,
                }
                if row is None:
                    values["connection"], values["object"], values["remote_id"] = connection, obj, rec.remote_id
                    values["associations"], values["first_seen_at"] = rec.associations or {}, now
                    inserts[rec.remote_id] = values
                    counts.created += 1
                    change(rec.remote_id, "created", _NO_CHANGES)
                    continue
                if (
                    row["remote_updated_at"] is not None
                    and rec.remote_updated_at is not None
                    and rec.remote_updated_at < row["remote_updated_at"]
                ):
                    counts.unchanged += 1
                    continue
                assoc_changed = bool(rec.associations) and rec.associations != row["associations"]
                if row["content_hash"] == digest and not assoc_changed:
                    counts.unchanged += 1
                    continue
                if row["content_hash"] != digest:
                    action = "archived" if rec.archived and not row["archived"] else "updated"
                    if action == "archived":
                        counts.archived += 1
                    else:
                        counts.updated += 1
                    if "properties" in row:  # seen earlier in this page
                        _record_diff(change, rec.remote_id, action, _plain(row["properties"]), rec.properties)
                    else:
                        changed[rec.remote_id] = (action, rec)
                else:
                    counts.updated += 1
                values["remote_updated_at"] = rec.remote_updated_at or row["remote_updated_at"]
                if rec.associations:
                    values["associations"] = rec.associations
                row.update(values)
                if rec.remote_id not in inserts:
                    # A key column left out when the stored one is the same: SQLite rewrites the entries
                    # of every index whose column is set, changed or not (2,000 rows: 40-47 -> 23-31 ms).
                    update = {"id": row["id"], **values}
                    for name, stored in zip(("match_key", "alt_key"), row["stored_keys"], strict=True):
                        if stored == values[name]:
                            del update[name]
                    updates[row["id"]] = update
            # Stored properties, read once for all that need them: the diffs of changed records
            # and the hash of records archived by a deletion that were not in this page.
            gone = [
                rid
                for rid in deleted
                if (row := existing.get(rid)) is not None and not row["archived"] and "properties" not in row
            ]
            wanted = [*changed, *gone] if audit else gone
            stored = _stored_properties(bulk, connection, obj, wanted)
            if audit:
                for remote_id, (action, rec) in changed.items():
                    _record_diff(change, remote_id, action, stored.get(remote_id, {}), rec.properties)
            for remote_id in deleted:
                row = existing.get(remote_id)
                if row is not None and not row["archived"]:
                    props = _plain(row["properties"]) if "properties" in row else stored.get(remote_id, {})
                    values = {
                        "archived": True,
                        "content_hash": content_hash(props, True),
                        "updated_at": now,
                    }
                    row.update(values)
                    updates.setdefault(row["id"], {"id": row["id"]}).update(values)
                    counts.archived += 1
                    change(remote_id, "archived", {})
            with self.write_lock:
                bulk.insert(CrmRecord.__table__, list(inserts.values()))  # type: ignore[attr-defined]
                bulk.update(CrmRecord.__table__, list(updates.values()))  # type: ignore[attr-defined]
                bulk.insert(CrmRecordChange.__table__, changes)  # type: ignore[attr-defined]
                if cursor is not None:
                    self.set_cursor(connection, obj, cursor, cursor_kind, session=s)
                for kind, value in extra_cursors:
                    self.set_cursor(connection, obj, value, kind, session=s)
                if before_commit is not None:
                    before_commit(s)
                s.commit()
        return counts

    def mark_missing(self, connection: str, obj: str, live_ids: set[str], *, run_id: int | None = None) -> int:
        """Archive local records whose remote id is not in ``live_ids`` (reconcile; ids only in memory)."""
        local = self.live_ids(connection, obj)
        vanished = sorted(local - live_ids)
        now = utcnow()
        with self.session() as s:
            for chunk in _chunks(vanished, 500):
                rows = s.exec(
                    select(CrmRecord).where(
                        CrmRecord.connection == connection,
                        CrmRecord.object == obj,
                        CrmRecord.remote_id.in_(chunk),  # type: ignore[attr-defined]
                    )
                )
                for row in rows:
                    row.archived = True
                    row.content_hash = content_hash(row.properties, True)
                    row.updated_at = now
                    s.add(row)
                    s.add(
                        CrmRecordChange(
                            run_id=run_id,
                            connection=connection,
                            object=obj,
                            remote_id=row.remote_id,
                            action="archived",
                            changes={"reason": "vanished"},
                        )
                    )
        return len(vanished)

    def update_associations(
        self, connection: str, obj: str, links: dict[str, dict[str, list[str]]], *, run_id: int | None = None
    ) -> int:
        """Store re-read associations; returns how many records' links changed."""
        changed = 0
        with self.session() as s:
            for chunk in _chunks(list(links), 500):
                rows = s.exec(
                    select(CrmRecord).where(
                        CrmRecord.connection == connection,
                        CrmRecord.object == obj,
                        CrmRecord.remote_id.in_(chunk),  # type: ignore[attr-defined]
                    )
                )
                for row in rows:
                    new = {**(row.associations or {}), **links[row.remote_id]}
                    if new != (row.associations or {}):
                        s.add(
                            CrmRecordChange(
                                run_id=run_id,
                                connection=connection,
                                object=obj,
                                remote_id=row.remote_id,
                                action="updated",
                                changes={"associations": [row.associations, new]},
                            )
                        )
                        row.associations = new
                        row.updated_at = utcnow()
                        s.add(row)
                        changed += 1
        return changed

    def record(self, connection: str, obj: str, remote_id: str) -> CrmRecord | None:
        with self.session() as s:
            return s.exec(
                select(CrmRecord).where(
                    CrmRecord.connection == connection,
                    CrmRecord.object == obj,
                    CrmRecord.remote_id == remote_id,
                )
            ).first()

    def find_by_keys(self, connection: str, obj: str, keys: Iterable[str]) -> dict[str, CrmRecord]:
        """Live records by match key or alt key (``email:a@b``, ``phone:+49…``, ``domain:x.com``)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, CrmRecord] = {}
        with self.session() as s:
            for chunk in _chunks(wanted, 500):
                for column in (CrmRecord.match_key, CrmRecord.alt_key):
                    rows = s.exec(
                        select(CrmRecord).where(
                            CrmRecord.connection == connection,
                            CrmRecord.object == obj,
                            CrmRecord.archived == false(),
                            column.in_(chunk),  # type: ignore[union-attr]
                        )
                    )
                    for row in rows:
                        key = row.match_key if column is CrmRecord.match_key else row.alt_key
                        if key is not None:
                            found.setdefault(key, row)
        return found

    def records(self, connection: str, obj: str, *, archived: bool | None = None) -> list[CrmRecord]:
        with self.session() as s:
            q = select(CrmRecord).where(CrmRecord.connection == connection, CrmRecord.object == obj)
            if archived is not None:
                q = q.where(CrmRecord.archived == archived)
            return list(s.exec(q))

    def count_records(self, connection: str, obj: str | None = None) -> dict[str, dict[str, int]]:
        with self.session() as s:
            q = select(CrmRecord.object, CrmRecord.archived, func.count()).where(CrmRecord.connection == connection)
            if obj:
                q = q.where(CrmRecord.object == obj)
            q = q.group_by(CrmRecord.object, CrmRecord.archived)
            out: dict[str, dict[str, int]] = {}
            for o, archived, n in s.exec(q):
                d = out.setdefault(o, {"stored": 0, "archived": 0})
                d["stored"] += n
                if archived:
                    d["archived"] += n
            return out

    def live_ids(self, connection: str, obj: str) -> set[str]:
        with self.session() as s:
            return set(
                s.exec(
                    select(CrmRecord.remote_id).where(
                        CrmRecord.connection == connection,
                        CrmRecord.object == obj,
                        CrmRecord.archived == false(),
                    )
                )
            )

    # -- run log -----------------------------------------------------------------------------------
    def start_run(self, connection: str, command: str, *, mapping_hash: str | None = None) -> int:
        """Open a run log row (status ``running``), after marking the connection's dead runs abandoned.

        On PostgreSQL the run's row becomes visible together with an advisory lock its session
        holds until ``finish_run``, so ``abandon_dead_runs`` on any host can tell it is alive.
        """
        self.abandon_dead_runs(connection)
        run = CrmSyncLog(connection=connection, command=command, mapping_hash=mapping_hash)
        if self.engine.dialect.name != "postgresql":
            with self.session() as s:
                s.add(run)
                s.flush()
                assert run.id is not None
                return run.id
        db = self.engine.connect()
        try:
            with Session(bind=db, expire_on_commit=False) as s:
                s.add(run)
                s.flush()
                assert run.id is not None
                s.execute(text("SELECT pg_advisory_lock(CAST(:k AS bigint))"), {"k": _run_key(run.id)})
                s.commit()
        except BaseException:
            db.invalidate()  # the lock, if taken, must not live on in the pool
            db.close()
            raise
        self._run_guards[run.id] = db
        return run.id

    def _release_run(self, run_id: int) -> None:
        db = self._run_guards.pop(run_id, None)
        if db is None:
            return
        try:
            db.execute(text("SELECT pg_advisory_unlock(CAST(:k AS bigint))"), {"k": _run_key(run_id)})
            db.commit()
        except Exception:
            db.invalidate()  # a session that may still hold the lock is not given back to the pool
        finally:
            db.close()

    def abandon_dead_runs(self, connection: str | None = None) -> int:
        """Mark ``abandoned`` the running runs whose process is gone; how many were marked.

        On PostgreSQL a run is alive while its advisory lock is held (any host); on SQLite, runs of
        this host whose pid has ended (other hosts' cannot be judged). Best effort: a store that
        cannot be written now is left as it is.
        """
        try:
            with self.session() as s:
                q = sa_select(CrmSyncLog.id, CrmSyncLog.host, CrmSyncLog.pid, CrmSyncLog.started_at).where(
                    CrmSyncLog.status == "running"
                )
                if connection:
                    q = q.where(CrmSyncLog.connection == connection)
                rows = s.execute(q).all()
            if not rows:
                return 0
            if self.engine.dialect.name == "postgresql":
                with self.engine.connect() as db:
                    held = held_advisory_keys(db)
                dead = [r for r in rows if _run_key(r.id) not in held]
            else:
                me, mine = socket.gethostname(), os.getpid()
                dead = [r for r in rows if r.host == me and r.pid != mine and process_gone(r.pid, r.started_at)]
            if not dead:
                return 0
            now = utcnow()
            with self.session() as s:
                for r in dead:
                    s.execute(
                        update(CrmSyncLog)
                        .where(CrmSyncLog.id == r.id, CrmSyncLog.status == "running")  # type: ignore[arg-type]
                        .values(
                            status="abandoned",
                            finished_at=now,
                            error=f"its process (pid {r.pid} on {r.host}) ended without finishing the run",
                        )
                    )
            for r in dead:
                log.warning("run %s (pid %s on %s) was abandoned: its process is gone", r.id, r.pid, r.host)
            return len(dead)
        except StoreError as exc:
            log.debug("dead runs not marked: %s", exc)
            return 0

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        counts: dict[str, Any],
        stats: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        try:
            with self.session() as s:
                run = s.get(CrmSyncLog, run_id)
                if run is None:
                    return
                run.finished_at = utcnow()
                run.status = status
                run.counts = counts
                if stats:
                    run.requests = stats.get("requests", 0)
                    run.retries = stats.get("retries", 0)
                    run.rate_limited = stats.get("rate_limited", 0)
                run.error = error
                s.add(run)
        finally:
            self._release_run(run_id)

    def runs(
        self, connection: str | None = None, *, since: datetime | None = None, limit: int = 50
    ) -> list[CrmSyncLog]:
        with self.session() as s:
            q = select(CrmSyncLog)
            if connection:
                q = q.where(CrmSyncLog.connection == connection)
            if since:
                q = q.where(CrmSyncLog.started_at >= since)
            return list(s.exec(q.order_by(CrmSyncLog.id.desc()).limit(limit)))  # type: ignore[union-attr]

    def last_run(self, connection: str, command: str, *, status: str | None = "ok") -> CrmSyncLog | None:
        with self.session() as s:
            q = select(CrmSyncLog).where(CrmSyncLog.connection == connection, CrmSyncLog.command == command)
            if status:
                q = q.where(CrmSyncLog.status == status)
            return s.exec(q.order_by(CrmSyncLog.id.desc()).limit(1)).first()  # type: ignore[union-attr]

    def changes(
        self,
        *,
        connection: str | None = None,
        obj: str | None = None,
        remote_id: str | None = None,
        since: datetime | None = None,
        limit: int = 200,
    ) -> list[CrmRecordChange]:
        with self.session() as s:
            q = select(CrmRecordChange)
            if connection:
                q = q.where(CrmRecordChange.connection == connection)
            if obj:
                q = q.where(CrmRecordChange.object == obj)
            if remote_id:
                q = q.where(CrmRecordChange.remote_id == remote_id)
            if since:
                q = q.where(CrmRecordChange.at >= since)
            return list(s.exec(q.order_by(CrmRecordChange.id.desc()).limit(limit)))  # type: ignore[union-attr]

    def prune(self, *, older_than_days: int) -> int:
        """Drop audit rows and finished runs older than the retention period."""
        cutoff = utcnow() - timedelta(days=older_than_days)
        with self.session() as s:
            n = s.execute(text("DELETE FROM crm_record_change WHERE at < :c"), {"c": cutoff}).rowcount  # type: ignore[attr-defined]
            s.execute(
                text("DELETE FROM crm_sync_log WHERE finished_at IS NOT NULL AND started_at < :c"),
                {"c": cutoff},
            )
            return int(n or 0)

    # -- links -------------------------------------------------------------------------------------
    def links(self, connection: str, obj: str, keys: Iterable[str]) -> dict[str, str]:
        wanted = list(dict.fromkeys(keys))
        out: dict[str, str] = {}
        with self.session() as s:
            for chunk in _chunks(wanted, 500):
                for row in s.exec(
                    select(CrmEntityLink).where(
                        CrmEntityLink.connection == connection,
                        CrmEntityLink.object == obj,
                        CrmEntityLink.local_key.in_(chunk),  # type: ignore[attr-defined]
                    )
                ):
                    out[row.local_key] = row.remote_id
        return out

    def save_links(self, connection: str, obj: str, pairs: dict[str, str], *, session: Session | None = None) -> None:
        def _do(s: Session) -> None:
            # Core statements: a push step links thousands of keys, and ORM objects cost more than the writes.
            t = CrmEntityLink.__table__  # type: ignore[attr-defined]
            existing: dict[str, tuple[int, str]] = {}
            for chunk in _chunks(list(pairs), 500):
                q = sa_select(t.c.id, t.c.local_key, t.c.remote_id).where(
                    t.c.connection == connection, t.c.object == obj, t.c.local_key.in_(chunk)
                )
                existing.update({row.local_key: (row.id, row.remote_id) for row in s.execute(q)})
            now = utcnow()
            bulk = _Bulk(s)
            bulk.insert(
                t,
                [
                    {"connection": connection, "object": obj, "local_key": k, "remote_id": rid, "created_at": now}
                    for k, rid in pairs.items()
                    if k not in existing
                ],
            )
            bulk.update(
                t,
                [
                    {"id": existing[k][0], "remote_id": rid}
                    for k, rid in pairs.items()
                    if k in existing and existing[k][1] != rid
                ],
            )

        if session is not None:
            _do(session)
        else:
            with self.session() as s:
                _do(s)

    def merge_pushed(self, s: Session, connection: str, obj: str, records: Sequence[Canonical]) -> None:
        """Merge what a push just wrote into the mirror (properties over the stored ones), in ``s``.

        Unlike ``apply_page`` this keeps the stored properties the push did not send, and the
        remote timestamp stays the CRM's (the next pull brings it).
        """
        if not records:
            return
        t = CrmRecord.__table__  # type: ignore[attr-defined]
        existing: dict[str, dict[str, Any]] = {}
        for chunk in _chunks([r.remote_id for r in records], 500):
            q = sa_select(t.c.id, t.c.remote_id, t.c.properties, t.c.archived, t.c.match_key, t.c.alt_key).where(
                t.c.connection == connection, t.c.object == obj, t.c.remote_id.in_(chunk)
            )
            existing.update({row.remote_id: dict(row._mapping) for row in s.execute(q)})
        now = utcnow()
        inserts: dict[str, dict[str, Any]] = {}
        updates: dict[int, dict[str, Any]] = {}
        for rec in records:
            row = existing.get(rec.remote_id)
            if row is None and (new := inserts.get(rec.remote_id)) is not None:
                props = {**new["properties"].value, **rec.properties}
                props_text, digest = encode_properties(props, False)
                new.update(properties=Encoded(props, props_text), content_hash=digest)
                continue
            if row is None:
                props_text, digest = encode_properties(rec.properties, False)
                inserts[rec.remote_id] = {
                    "connection": connection,
                    "object": obj,
                    "remote_id": rec.remote_id,
                    "properties": Encoded(rec.properties, props_text),
                    "raw": {},
                    "associations": {},
                    "remote_updated_at": None,
                    "archived": False,
                    "content_hash": digest,
                    "match_key": rec.match_key,
                    "alt_key": rec.alt_key,
                    "first_seen_at": now,
                    "updated_at": now,
                }
                continue
            row["properties"] = props = {**_plain(row["properties"]), **rec.properties}
            row["match_key"] = row["match_key"] or rec.match_key
            row["alt_key"] = row["alt_key"] or rec.alt_key
            props_text, digest = encode_properties(props, bool(row["archived"]))
            updates[row["id"]] = {
                "id": row["id"],
                "properties": Encoded(props, props_text),
                "content_hash": digest,
                "match_key": row["match_key"],
                "alt_key": row["alt_key"],
                "updated_at": now,
            }
        bulk = _Bulk(s)
        bulk.insert(t, list(inserts.values()))
        bulk.update(t, list(updates.values()))

    # -- mapping -----------------------------------------------------------------------------------
    def record_mapping(self, connection: str, path: str | None, digest: str) -> None:
        with self.session() as s:
            row = s.exec(select(CrmFieldMapping).where(CrmFieldMapping.connection == connection)).first()
            if row is None:
                row = CrmFieldMapping(connection=connection, path=path, hash=digest)
            elif row.hash == digest and row.path == path:
                return
            else:
                row.path, row.hash, row.updated_at = path, digest, utcnow()
            s.add(row)


_NO_CHANGES = Encoded({}, "{}")


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Encoded) else value


def _record_diff(
    change: Callable[[str, str, Any], None],
    remote_id: str,
    action: str,
    before: dict[str, Any],
    after: dict[str, Any],
) -> None:
    diff = {k: [before.get(k), after.get(k)] for k in set(before) | set(after) if before.get(k) != after.get(k)}
    change(remote_id, action, diff)


class _Bulk:
    """Bulk INSERT/UPDATE of plain rows inside a session's transaction.

    On SQLite the rows go straight to the driver's ``executemany`` with each column's own bind
    processor applied once per value: SQLAlchemy's per-statement parameter handling cost twice the
    SQLite writes themselves (the store side of ingest went from 17,800 to 33,000 records/s). Other
    databases take the ordinary Core statements.
    """

    _sql: dict[tuple[str, str, tuple[str, ...]], tuple[str, list[Any], list[bool]]] = {}

    def __init__(self, db: Session | Connection) -> None:
        self.db = db
        self.conn = db.connection() if isinstance(db, Session) else db
        self.dialect = self.conn.dialect
        self.direct = self.dialect.name == "sqlite"
        self.json = self.direct and _sqlite_json(self.conn)

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
                self.db.execute(stmt, [{**{f"v_{c}": _plain(r[c]) for c in sets}, "k_": r[key]} for r in group])
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
    """Bulk UPDATE of plain rows by ``key`` in ``session``'s transaction (see ``_Bulk``)."""
    _Bulk(session).update(table, rows, key)


def insert_rows(db: Session | Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """Bulk INSERT of plain rows (JSON values may be ``Encoded``) in ``db``'s transaction (see ``_Bulk``)."""
    _Bulk(db).insert(table, rows)


def _json_text(value: Any) -> str:
    if isinstance(value, Encoded):
        return value.text
    if value == {}:  # most outbox rows' in-flight marks, on every save
        return "{}"
    return _COMPACT_JSON(value)


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) for k, v in row.items()}


def _by_keys(rows: list[dict[str, Any]]) -> Iterator[tuple[tuple[str, ...], list[dict[str, Any]]]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row), []).append(row)
    return iter(groups.items())


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- SQLite integrity ------------------------------------------------------------------------------
class _OpenMarker:
    """Whether a SQLite store needs ``quick_check`` on open, from a small state file beside it.

    The last crmsync process to close the store records the file's size and modification time
    there; a process that opens the store alone (a non-blocking exclusive ``flock``) checks it
    when the record says the store was left open (a crash) or the file differs from what was
    recorded (someone else wrote it). Any other process takes a shared lock and trusts it. The
    kernel drops the locks of a killed process, so a crash never leaves the marker stuck.
    """

    def __init__(self, db: Path) -> None:
        self.db = db
        self.state = db.with_name(db.name + "-crmsync")
        self.fd: int | None = None

    def enter(self) -> bool:
        """Take the marker; True when the store should be checked before use."""
        if fcntl is None:
            return False
        try:
            self.fd = os.open(self.state, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False  # a read-only directory fails later, with its own message
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # another crmsync has it open: it checked
            return False
        try:
            recorded = _read_state(self.fd)
            stat = self.db.stat()
            wal = self.db.with_name(self.db.name + "-wal")
            needed = stat.st_size > 0 and (
                recorded.get("open", True)
                or recorded.get("size") != stat.st_size
                or recorded.get("mtime_ns") != stat.st_mtime_ns
                or (wal.exists() and wal.stat().st_size > 0)
            )
            _write_state(self.fd, {"open": True})
        except OSError:
            needed = False
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        return needed

    def leave(self, *, record: bool = True) -> None:
        """Release the marker; the last process out records the file as it leaves it."""
        if self.fd is None or fcntl is None:
            return
        try:
            if not record:
                return
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stat = self.db.stat()
            _write_state(self.fd, {"open": False, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        except OSError:
            pass  # others still have it open (the last one records it), or the disk is full
        finally:
            os.close(self.fd)
            self.fd = None


#: SQLite stores not closed yet: closed at exit, so a command that never closes its store (the CLI
#: leaves that to the process's end) still records a clean shutdown and the next open skips the check.
_OPEN_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


@atexit.register
def _close_open_stores() -> None:
    for store in list(_OPEN_STORES):
        with contextlib.suppress(Exception):
            store.close()


def _read_state(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        value = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _write_state(fd: int, value: dict[str, Any]) -> None:
    data = json.dumps(value).encode()
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, data)


def _quick_check(path: Path, *, timeout: float = DEFAULT_STORE_WAIT) -> list[str]:
    """``PRAGMA quick_check`` of a SQLite file: the problems found ([] when healthy or not checkable now)."""
    try:
        con = sqlite3.connect(str(path), timeout=timeout)
    except sqlite3.Error:
        return []
    try:
        rows = [str(r[0]) for r in con.execute("PRAGMA quick_check(20)")]
        return [] if rows == ["ok"] else rows
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CANTOPEN, _SQLITE_FULL, _SQLITE_READONLY):
            return []  # cannot look now: not a sign of damage
        if code == _SQLITE_IOERR and _low_on_space(path):
            return []
        return [str(exc)]
    finally:
        con.close()


def save_queued(path: Path, *, timeout: float = DEFAULT_STORE_WAIT) -> dict[str, tuple[Path, int]]:
    """Write what a (damaged) store's outbox still queues, as far as it reads: connection -> (file, count).

    One file per connection, ``<store>.queued-<connection>.jsonl``, in the form ``crmsync push``
    reads (the outcomes as queued); nothing when no outcome could be read.
    """
    found: dict[str, list[str]] = {}
    try:
        con = sqlite3.connect(str(path), timeout=timeout)
    except sqlite3.Error:
        return {}
    try:
        rows = con.execute(
            "SELECT connection, payload FROM crm_outbox WHERE state IN ('pending', 'failed') ORDER BY id"
        )
        for connection, payload in rows:
            with contextlib.suppress(ValueError, TypeError):
                if isinstance(json.loads(payload), dict):
                    found.setdefault(str(connection), []).append(payload)
    except sqlite3.Error:
        pass  # keep what was read before the damage
    finally:
        con.close()
    saved: dict[str, tuple[Path, int]] = {}
    for connection, lines in found.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in connection)[:80]
        target = path.with_name(f"{path.name}.queued-{safe}.jsonl")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write("\n".join(lines) + "\n")
        except OSError:
            continue
        saved[connection] = (target, len(lines))
    return saved


# -- run liveness ----------------------------------------------------------------------------------
def advisory_key(name: str, purpose: str) -> int:
    """A stable signed 64-bit PostgreSQL advisory-lock key for (purpose, name)."""
    digest = hashlib.sha256(f"crmsync:{purpose}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def held_advisory_keys(db: Any) -> set[int]:
    """The advisory-lock keys some session holds in this database right now (a dead session holds none).

    Advisory locks are per database: another database on the same server may use the same keys.
    """
    rows = db.execute(
        text(
            "SELECT classid::bigint, objid::bigint FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    )
    keys = set()
    for hi, lo in rows:
        value = (int(hi) << 32) | int(lo)
        keys.add(value - (1 << 64) if value >= 1 << 63 else value)
    return keys


def _run_key(run_id: int) -> int:
    return advisory_key(str(run_id), "live-run")


def process_gone(pid: int, started_at: datetime | None) -> bool:
    """Whether process ``pid`` on this host has ended (or its number now belongs to a newer process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    if started_at is None:
        return False
    began = _process_start(pid)
    when = started_at if started_at.tzinfo else started_at.replace(tzinfo=UTC)
    return began is not None and began > when.timestamp() + 1


def _process_start(pid: int) -> float | None:
    """When a process started (epoch seconds), on Linux; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


_EXISTING = _existing_records()
