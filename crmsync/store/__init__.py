"""The local store: one ``Store`` per process, its database, and one repository per aggregate.

``Store.open`` opens (creating and migrating as needed) the database (``db``) and hangs the
repositories on it: ``store.mirror`` (records, cursors, associations, entity links, the audit
trail), ``store.runs`` (the run log), ``store.connections`` and ``store.overview`` (the counts
``status`` shows). Tables are in ``tables``, bulk writes in ``bulk``, the fault mapping in
``faults``, SQLite integrity checks in ``integrity``, PostgreSQL advisory locks in ``locks``.
No module outside this package runs SQL.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine

from crmsync.model import utcnow
from crmsync.store.bulk import Encoded, encoded, insert_rows, update_rows
from crmsync.store.connections import Connections
from crmsync.store.db import (
    DEFAULT_STORE_WAIT,
    OPEN_WAIT,
    SCHEMA_HEAD,
    Database,
    db_url,
    is_postgresql_url,
    retry_on_conflict,
)
from crmsync.store.faults import describe_store, free_space, store_fault
from crmsync.store.mirror import ApplyCounts, Canonical, Mirror, content_hash, encode_properties
from crmsync.store.overview import Overview
from crmsync.store.runs import Runs, process_gone
from crmsync.store.tables import (
    CrmConflict,
    CrmConnection,
    CrmEntityLink,
    CrmFieldMapping,
    CrmOutbox,
    CrmRecord,
    CrmRecordChange,
    CrmSyncCursor,
    CrmSyncLog,
    CrmWebhookEvent,
)

__all__ = [
    "DEFAULT_STORE_WAIT",
    "OPEN_WAIT",
    "SCHEMA_HEAD",
    "ApplyCounts",
    "Canonical",
    "CrmConflict",
    "CrmConnection",
    "CrmEntityLink",
    "CrmFieldMapping",
    "CrmOutbox",
    "CrmRecord",
    "CrmRecordChange",
    "CrmSyncCursor",
    "CrmSyncLog",
    "CrmWebhookEvent",
    "Encoded",
    "Store",
    "content_hash",
    "db_url",
    "describe_store",
    "encode_properties",
    "encoded",
    "free_space",
    "insert_rows",
    "is_postgresql_url",
    "process_gone",
    "retry_on_conflict",
    "store_fault",
    "update_rows",
]


class Store(Database):
    """The local store: the database (sessions, lock wait, faults) and its repositories."""

    def __init__(self, engine: Engine, url: str) -> None:
        super().__init__(engine, url)
        self.mirror = Mirror(self)
        self.runs = Runs(self)
        self.connections = Connections(self)
        self.overview = Overview(self)

    def prune(self, *, older_than_days: int) -> int:
        """Drop audit rows and finished runs older than the retention period; how many audit rows went."""
        cutoff = utcnow() - timedelta(days=older_than_days)
        self.runs.prune(before=cutoff)
        return self.mirror.prune_changes(before=cutoff)

    def close(self) -> None:
        """End the sessions of runs still open, then close the database."""
        self.runs.close()
        super().close()
