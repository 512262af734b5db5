"""PostgreSQL advisory locks: what several crmsync workers on several hosts hold instead of one machine's lock files.

* ``advisory_lock``: the per-connection run lock (and the OAuth refresh lock) as a session advisory
  lock. The server frees it when the holder's connection ends, so a killed worker never leaves a
  stale lock behind.
* ``claim_owner`` / ``dead_owners``: a name for a delivery run's outbox claims that dies with the run.
* ``transaction_lock``: a per-connection lock held until the surrounding transaction commits.
* ``held_advisory_keys``: which keys live sessions hold, the liveness test of runs and claims.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from crmsync.errors import LockHeldError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from crmsync.store.db import Database

POLL = 0.2  # seconds between attempts while waiting for a lock


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


def lock_key(connection: str, purpose: str = "run") -> int:
    """A stable signed 64-bit advisory-lock key for (purpose, connection)."""
    return advisory_key(connection, purpose)


def _holder(db: Connection, key: int) -> str:
    """Who holds an advisory lock, from the application_name the holder set (best effort)."""
    try:
        row = db.execute(
            text(
                "SELECT a.application_name, a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() "
                "AND l.classid = CAST(:hi AS bigint)::oid AND l.objid = CAST(:lo AS bigint)::oid LIMIT 1"
            ),
            {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
        ).first()
    except Exception:  # only decorates an error message
        return "unknown"
    if row is None:
        return "unknown"
    name, backend = row
    return str(name).removeprefix("crmsync ") if name else f"server pid {backend}"


@contextlib.contextmanager
def advisory_lock(
    store: Database | Engine, connection: str, timeout: float = 0.0, *, purpose: str = "run"
) -> Iterator[None]:
    """Hold the PostgreSQL advisory lock of a connection; wait up to ``timeout`` seconds for it.

    Raises:
        LockHeldError: another worker (on any host) holds it past the timeout.
    """
    engine = store if isinstance(store, Engine) else store.engine
    key = lock_key(connection, purpose)
    deadline = time.monotonic() + max(0.0, timeout)
    # A session-level lock lives as long as this database session: keep one connection out of
    # the pool for the whole run, in autocommit so no transaction stays open while we work.
    db = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        me = f"crmsync pid {os.getpid()} on {socket.gethostname()}"[:63]
        db.execute(text("SELECT set_config('application_name', :n, false)"), {"n": me})
        while not db.execute(text("SELECT pg_try_advisory_lock(CAST(:k AS bigint))"), {"k": key}).scalar():
            if time.monotonic() >= deadline:
                raise LockHeldError(
                    f"connection {connection!r} is busy: another crmsync run holds its lock ({_holder(db, key)})",
                    hint="try again later, or pass --lock-timeout SECONDS to wait",
                )
            time.sleep(min(POLL, max(0.0, deadline - time.monotonic())) or POLL)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                db.execute(text("SELECT pg_advisory_unlock(CAST(:k AS bigint))"), {"k": key})
    finally:
        db.close()


@contextlib.contextmanager
def claim_owner(store: Database | Engine) -> Iterator[str]:
    """A name for one delivery run's outbox claims, alive exactly as long as the run's session.

    The name carries an advisory-lock key the run holds; when the run dies its session ends, the
    server drops the lock, and ``dead_owners`` lets the next run take the claims over at once.
    """
    token = uuid.uuid4().hex
    with advisory_lock(store, token, 0, purpose="claim"):
        yield f"{lock_key(token, 'claim')}:{socket.gethostname()}:{os.getpid()}"[:120]


def dead_owners(db: Any, owners: Iterable[str]) -> list[str]:
    """The claim owners (from ``claim_owner``) whose run no longer holds its advisory lock."""
    owners = [o for o in owners if o]
    if not owners:
        return []
    live = held_advisory_keys(db)  # the same liveness the run log's abandoned runs are judged by
    dead = []
    for owner in owners:
        try:
            key = int(owner.split(":", 1)[0])
        except ValueError:
            continue  # not ours to judge: its lease still expires
        if key not in live:
            dead.append(owner)
    return dead


def transaction_lock(db: Any, connection: str, purpose: str) -> None:
    """Inside a PostgreSQL transaction: wait for, and hold until commit, a per-connection lock."""
    db.execute(text("SELECT pg_advisory_xact_lock(CAST(:k AS bigint))"), {"k": lock_key(connection, purpose)})
