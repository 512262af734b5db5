"""The store's tables: SQLModel classes, one per table, as the migrations in ``crmsync/migrations`` make them.

The migrations are the schema's source of truth on disk; these classes say how crmsync reads and
writes the rows, and the repositories (``mirror``, ``runs``, ``connections``, ...) are the only
code that queries them.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from crmsync.model import utcnow


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
