"""The store's database: engine and sessions, SQLite pragmas, the lock wait, faults, migrations on open.

SQLite by default (WAL, busy timeout, file mode 0600); any SQLAlchemy URL otherwise (PostgreSQL
for scale-out). Alembic migrations live in ``crmsync/migrations`` and are applied when the store
opens; a store written by a newer crmsync is refused. Every driver error passes through
``faults.store_fault`` (the engine's ``handle_error`` event) and leaves as a ``StoreError``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError
from sqlmodel import Session

from crmsync.errors import StoreBusyError, StoreCorruptError, StoreError, StoreFullError
from crmsync.store.faults import describe_store, free_space, low_on_space, masked_url, store_fault
from crmsync.store.integrity import OpenMarker, quick_check, save_queued

T = TypeVar("T")

#: How long a statement waits for another process's SQLite lock when the run names no lock timeout.
DEFAULT_STORE_WAIT = 5.0
#: The opening read waits no longer than this unless a lock timeout was given: in WAL mode only a
#: process holding the whole file exclusively blocks readers, and that does not end in seconds.
OPEN_WAIT = 1.0

SCHEMA_HEAD = "0002"  # newest migration this crmsync knows; keep in step with migrations/versions


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


def is_postgresql_url(value: str | Path) -> bool:
    """Whether a path or SQLAlchemy URL names a PostgreSQL store (by its dialect, whatever the driver)."""
    try:
        return make_url(db_url(value)).get_backend_name() == "postgresql"
    except ArgumentError:
        return False


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


class Database:
    """The store's engine: sessions, the lock wait, fault mapping, integrity checks; one per process.

    ``Store`` adds the repositories; they reach the database only through this object.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        # SQLite takes one writer at a time and makes the others poll with growing sleeps: pages of
        # several objects stored at once queue on this lock instead and go the moment it is free.
        # Other databases write in parallel; busy_timeout stays for other processes and other writes.
        self.write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )
        self.path: Path | None = None  # the SQLite file, if the store is one
        self._wait = DEFAULT_STORE_WAIT
        self._marker: OpenMarker | None = None
        event.listen(engine, "handle_error", self._on_error)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, url_or_path: str | Path, *, migrate: bool = True, wait: float | None = None) -> Self:
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
            raise store_fault(exc, url=url) or StoreError(f"cannot use the store {masked_url(url)!r}") from exc
        marker: OpenMarker | None = None
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
            marker = OpenMarker(path)
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
            store._sqlite_setup(marker.db if marker else None)
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
                # A larger page cache than SQLite's default: a large mirror's indexes stay in memory while pulling.
                cur.execute("PRAGMA cache_size=-32000")
                # Checkpoint rarely: a page rewritten by many commits (index and table tails) is copied
                # back once, not ten times; the WAL file is trimmed back after each reset.
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
        if low_on_space(self.path):
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
        problems = quick_check(self.path, timeout=self._wait)
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
        """Close the engine's connections; a SQLite store records that crmsync closed it cleanly."""
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

    @property
    def is_postgresql(self) -> bool:
        """Whether the store is a PostgreSQL database (shared by workers on several hosts)."""
        return self.engine.dialect.name == "postgresql"


#: SQLite stores not closed yet: closed at exit, so a command that never closes its store (the CLI
#: leaves that to the process's end) still records a clean shutdown and the next open skips the check.
_OPEN_STORES: weakref.WeakSet[Database] = weakref.WeakSet()


@atexit.register
def _close_open_stores() -> None:
    for store in list(_OPEN_STORES):
        with contextlib.suppress(Exception):
            store.close()
