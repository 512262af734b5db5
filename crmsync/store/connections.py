"""Connections: the CRM accounts crmsync talks to (``crm_connection``) and the mapping each one last used."""

from __future__ import annotations

from sqlmodel import select

from crmsync.model import utcnow
from crmsync.store.db import Database
from crmsync.store.tables import CrmConnection, CrmFieldMapping


class Connections:
    """The configured connections, by name."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> list[CrmConnection]:
        """Every connection, by name."""
        with self.db.session() as s:
            return list(s.exec(select(CrmConnection).order_by(CrmConnection.name)))

    def get(self, name: str) -> CrmConnection | None:
        """The connection of that name, or None."""
        with self.db.session() as s:
            return s.exec(select(CrmConnection).where(CrmConnection.name == name)).first()

    def save(self, conn: CrmConnection) -> CrmConnection:
        """Insert ``conn``, or update the stored connection of its name; the stored row."""
        with self.db.session() as s:
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

    def touch(self, name: str, *, ok: bool, auth_state: str | None = None) -> None:
        """Record a check of the connection's credentials (and their state, if known)."""
        with self.db.session() as s:
            conn = s.exec(select(CrmConnection).where(CrmConnection.name == name)).first()
            if conn is None:
                return
            conn.last_checked_at = utcnow()
            if ok:
                conn.last_ok_at = conn.last_checked_at
            if auth_state:
                conn.auth_state = auth_state
            s.add(conn)

    def delete(self, name: str) -> None:
        """Forget a connection (its records and cursors stay)."""
        with self.db.session() as s:
            conn = s.exec(select(CrmConnection).where(CrmConnection.name == name)).first()
            if conn is not None:
                s.delete(conn)

    def record_mapping(self, connection: str, path: str | None, digest: str) -> None:
        """Record which mapping (file and hash) the connection's last run used."""
        with self.db.session() as s:
            row = s.exec(select(CrmFieldMapping).where(CrmFieldMapping.connection == connection)).first()
            if row is None:
                row = CrmFieldMapping(connection=connection, path=path, hash=digest)
            elif row.hash == digest and row.path == path:
                return
            else:
                row.path, row.hash, row.updated_at = path, digest, utcnow()
            s.add(row)
