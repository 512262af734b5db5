"""The run log: one row per pull, push or backfill, and whether the process behind a running one still lives.

On PostgreSQL a run's row becomes visible together with an advisory lock its session holds until
the run finishes, so any host can tell a live run from a dead one; on SQLite the runs of this host
are judged by their process id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, text, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from crmsync.errors import StoreError
from crmsync.model import utcnow
from crmsync.store.db import Database
from crmsync.store.locks import advisory_key, held_advisory_keys
from crmsync.store.tables import CrmSyncLog

log = logging.getLogger("crmsync.store")


class Runs:
    """The run log (``crm_sync_log``) of every connection."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._guards: dict[int, Connection] = {}  # PostgreSQL: one session per live run, holding its lock

    def start(self, connection: str, command: str, *, mapping_hash: str | None = None) -> int:
        """Open a run log row (status ``running``), after marking the connection's dead runs abandoned.

        On PostgreSQL the run's row becomes visible together with an advisory lock its session
        holds until ``finish_run``, so ``abandon_dead_runs`` on any host can tell it is alive.
        """
        self.abandon_dead(connection)
        run = CrmSyncLog(connection=connection, command=command, mapping_hash=mapping_hash)
        if not self.db.is_postgresql:
            with self.db.session() as s:
                s.add(run)
                s.flush()
                assert run.id is not None
                return run.id
        db = self.db.engine.connect()
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
        self._guards[run.id] = db
        return run.id

    def _release(self, run_id: int) -> None:
        db = self._guards.pop(run_id, None)
        if db is None:
            return
        try:
            db.execute(text("SELECT pg_advisory_unlock(CAST(:k AS bigint))"), {"k": _run_key(run_id)})
            db.commit()
        except Exception:
            db.invalidate()  # a session that may still hold the lock is not given back to the pool
        finally:
            db.close()

    def abandon_dead(self, connection: str | None = None) -> int:
        """Mark ``abandoned`` the running runs whose process is gone; how many were marked.

        On PostgreSQL a run is alive while its advisory lock is held (any host); on SQLite, runs of
        this host whose pid has ended (other hosts' cannot be judged). Best effort: a store that
        cannot be written now is left as it is.
        """
        try:
            with self.db.session() as s:
                q = sa_select(
                    col(CrmSyncLog.id), col(CrmSyncLog.host), col(CrmSyncLog.pid), col(CrmSyncLog.started_at)
                ).where(col(CrmSyncLog.status) == "running")
                if connection:
                    q = q.where(col(CrmSyncLog.connection) == connection)
                rows = s.execute(q).all()
            if not rows:
                return 0
            if self.db.is_postgresql:
                with self.db.engine.connect() as db:
                    held = held_advisory_keys(db)
                dead = [r for r in rows if _run_key(r.id) not in held]
            else:
                me, mine = socket.gethostname(), os.getpid()
                dead = [r for r in rows if r.host == me and r.pid != mine and process_gone(r.pid, r.started_at)]
            if not dead:
                return 0
            now = utcnow()
            with self.db.session() as s:
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

    def finish(
        self,
        run_id: int,
        *,
        status: str,
        counts: dict[str, Any],
        stats: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        try:
            with self.db.session() as s:
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
            self._release(run_id)

    def recent(
        self, connection: str | None = None, *, since: datetime | None = None, limit: int = 50
    ) -> list[CrmSyncLog]:
        with self.db.session() as s:
            q = select(CrmSyncLog)
            if connection:
                q = q.where(CrmSyncLog.connection == connection)
            if since:
                q = q.where(CrmSyncLog.started_at >= since)
            return list(s.exec(q.order_by(CrmSyncLog.id.desc()).limit(limit)))  # type: ignore[union-attr]

    def last(self, connection: str, command: str, *, status: str | None = "ok") -> CrmSyncLog | None:
        with self.db.session() as s:
            q = select(CrmSyncLog).where(CrmSyncLog.connection == connection, CrmSyncLog.command == command)
            if status:
                q = q.where(CrmSyncLog.status == status)
            return s.exec(q.order_by(CrmSyncLog.id.desc()).limit(1)).first()  # type: ignore[union-attr]

    def prune(self, *, before: datetime) -> int:
        """Drop the finished runs started before ``before``; how many were dropped."""
        with self.db.session() as s:
            result = s.execute(
                delete(CrmSyncLog).where(col(CrmSyncLog.finished_at).is_not(None), col(CrmSyncLog.started_at) < before)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close the sessions of the runs still open (their advisory locks end with them)."""
        for guard in list(self._guards.values()):
            with contextlib.suppress(Exception):
                guard.close()
        self._guards.clear()


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
