"""SQLite integrity: when to run ``PRAGMA quick_check``, the check itself, and saving the queue of a damaged store.

A SQLite store is checked when it opens after crmsync did not close it, or after something else
changed the file (``OpenMarker``), and whenever SQLite reports damage; a damaged store's queued
outcomes are written out (``save_queued``) before crmsync says how to rebuild it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from crmsync.store.faults import (
    SQLITE_BUSY,
    SQLITE_CANTOPEN,
    SQLITE_FULL,
    SQLITE_IOERR,
    SQLITE_LOCKED,
    SQLITE_READONLY,
    low_on_space,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no unclean-shutdown marker, corruption is still caught on use
    fcntl = None  # type: ignore[assignment]


class OpenMarker:
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


def quick_check(path: Path, *, timeout: float) -> list[str]:
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
        if code in (SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_READONLY):
            return []  # cannot look now: not a sign of damage
        if code == SQLITE_IOERR and low_on_space(path):
            return []
        return [str(exc)]
    finally:
        con.close()


def save_queued(path: Path, *, timeout: float) -> dict[str, tuple[Path, int]]:
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
