"""What ``status`` shows of a connection's queues: outbox states, webhook backlog, open conflicts.

Read-only counts across the outbox, webhook-event and conflict tables, kept apart from the
repositories that write those tables, so ``sync/status.py`` holds no SQL.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, true
from sqlmodel import col, select

from crmsync.store.db import Database
from crmsync.store.tables import CrmConflict, CrmOutbox, CrmWebhookEvent


@dataclass
class OutboxOverview:
    """A connection's outbox at a glance."""

    states: dict[str, int] = field(default_factory=dict)  # state -> rows
    delivered_since: int = 0  # rows delivered at or after the ``since`` asked for
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # failed rows by error
    oldest_failed: datetime | None = None


@dataclass
class WebhookBacklog:
    """Stored webhook events not applied yet."""

    pending: int = 0
    oldest_received: datetime | None = None


class Overview:
    """Counts for the status document, one connection at a time."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def outbox(self, connection: str, *, since: datetime) -> OutboxOverview:
        """The outbox's rows per state, those delivered since ``since``, and its failures."""
        t = CrmOutbox
        with self.db.session() as s:
            states = s.exec(
                select(t.state, func.count()).where(t.connection == connection).group_by(col(t.state))
            ).all()
            delivered = s.exec(
                select(func.count()).select_from(t).where(t.connection == connection, col(t.delivered_at) >= since)
            ).one()
            errors = collections.Counter(
                (e or "").split(":", 1)[-1].strip()[:120]
                for e in s.exec(select(t.last_error).where(t.connection == connection, t.state == "failed"))
            )
            oldest = s.exec(select(func.min(t.updated_at)).where(t.connection == connection, t.state == "failed")).one()
        return OutboxOverview(dict(states), int(delivered), errors, oldest)

    def webhook_backlog(self, connection: str) -> WebhookBacklog:
        """How many stored webhook events wait to be applied, and since when."""
        e = CrmWebhookEvent
        with self.db.session() as s:
            pending, oldest = s.exec(
                select(func.count(), func.min(e.received_at)).where(
                    e.connection == connection, col(e.processed_at).is_(None)
                )
            ).one()
        return WebhookBacklog(int(pending), oldest)

    def open_conflicts(self, connection: str) -> int:
        """Field disagreements of the connection that nobody has closed."""
        with self.db.session() as s:
            n = s.exec(
                select(func.count())
                .select_from(CrmConflict)
                .where(CrmConflict.connection == connection, col(CrmConflict.open) == true())
            ).one()
        return int(n)
