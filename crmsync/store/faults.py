"""Store faults: every database or file-system error of the store becomes one ``StoreError`` here.

``store_fault`` is called from the engine's ``handle_error`` event (see ``db.Database``), so the
rest of crmsync never sees a driver exception for a store that is locked, full, read-only,
corrupt, unreachable or refuses the credentials.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import sqlite3
from pathlib import Path

from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError

from crmsync.errors import (
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreUnreachableError,
)

# SQLite's primary result codes (the low byte of an extended code).
SQLITE_PERM, SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY = 3, 5, 6, 8
SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN = 10, 11, 13, 14
SQLITE_AUTH, SQLITE_NOTADB = 23, 26
#: Below this much free space an I/O or open error is taken for a full disk.
LOW_SPACE = 1 << 20
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


def low_on_space(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(path if path.exists() else path.parent).free < LOW_SPACE
    return False


def store_fault(exc: BaseException, *, url: str) -> StoreError | None:
    """The ``StoreError`` a database or file-system exception means, or None if it is not a store fault.

    The one place where driver errors become exit codes: locked past the wait or out of space -> 75
    (try again later), read-only, unopenable or refused -> 3, damaged -> ``StoreCorruptError`` (3;
    ``Database`` adds the recovery hint after checking and saving the outbox).
    """
    orig = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's exception
    try:
        where, backend = describe_store(url), make_url(url).get_backend_name()
    except ArgumentError:
        where, backend = masked_url(url), ""
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


def masked_url(url: str) -> str:
    """A URL that SQLAlchemy could not parse, with anything like a password replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _sqlite_fault(orig: sqlite3.Error, where: str) -> StoreError | None:
    code = getattr(orig, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = str(orig)
    path = Path(where)
    if primary in (SQLITE_BUSY, SQLITE_LOCKED):
        return StoreBusyError(
            f"store busy: {where} is locked by another process ({detail})",
            hint="try again later, or pass --lock-timeout SECONDS to wait longer",
        )
    if primary == SQLITE_FULL or (primary in (SQLITE_IOERR, SQLITE_CANTOPEN) and low_on_space(path)):
        return StoreFullError(
            f"store full: cannot write {where} ({free_space(path)}; {detail})",
            hint="free some space or move the store (--db), then run the command again",
        )
    if primary in (SQLITE_READONLY, SQLITE_PERM, SQLITE_AUTH):
        return StoreError(
            f"the store {where} is read-only ({detail})",
            hint="crmsync writes its store on every run: make the file and its directory writable",
        )
    if primary == SQLITE_CANTOPEN:
        return StoreError(
            f"cannot open the store {where} ({detail})",
            hint="check that its directory exists and is writable, or point --db elsewhere",
        )
    if primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return StoreCorruptError(f"the store {where} is corrupt ({detail})")
    if primary == SQLITE_IOERR:
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
