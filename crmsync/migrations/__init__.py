"""Alembic migrations, applied when the store opens (append-only: never edit a released one)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from crmsync.errors import ConfigError

HERE = Path(__file__).parent


def current_revision(engine: Engine) -> str | None:
    """The store's schema revision, or None for an empty database."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        return row[0] if row else None


def known_revisions() -> set[str]:
    return {p.stem.split("_", 1)[0] for p in (HERE / "versions").glob("[0-9]*.py")}


def upgrade(engine: Engine, *, head: str) -> None:
    """Bring the store to ``head``; refuse one written by a newer crmsync."""
    rev = current_revision(engine)
    if rev == head:
        return  # the common case: no alembic import on every command start
    if rev is not None and rev not in known_revisions():
        raise ConfigError(
            f"the store at {engine.url.render_as_string(hide_password=True)} was written by a newer crmsync "
            f"(schema {rev}; this one knows up to {head})",
            hint="upgrade crmsync, or point --db at another store",
        )
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Workers starting together on one database: one migrates, the others wait for it and
            # then find nothing to do (PostgreSQL's DDL is transactional).
            conn.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
            if inspect(conn).has_table("alembic_version"):
                if conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head:
                    return
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, head)
