"""The mirror: the CRM's records as last pulled, their cursors, associations, entity links and audit trail.

The rule that matters most: a page of pulled records and the cursor that follows it are written
in ONE transaction (``apply_page``), so a crash between pages repeats at most a page.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, false, func, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from crmsync.model import utcnow
from crmsync.store.bulk import Bulk, Encoded, chunks, plain, sorted_json
from crmsync.store.db import Database, retry_on_conflict
from crmsync.store.tables import CrmEntityLink, CrmRecord, CrmRecordChange, CrmSyncCursor


@dataclass
class Canonical:
    """A pulled record after mapping: what apply_page stores."""

    remote_id: str
    properties: dict[str, Any]
    raw: dict[str, Any]
    remote_updated_at: datetime | None
    archived: bool = False
    associations: dict[str, list[str]] = field(default_factory=dict)
    match_key: str | None = None
    alt_key: str | None = None


@dataclass
class ApplyCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    archived: int = 0

    def add(self, other: ApplyCounts) -> None:
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.archived += other.archived


def content_hash(properties: dict[str, Any], archived: bool) -> str:
    return encode_properties(properties, archived)[1]


def encode_properties(properties: dict[str, Any], archived: bool) -> tuple[str, str]:
    """(JSON text of ``properties``, content hash): one serialisation serves both the hash and the row.

    The hash is of ``[properties, archived]`` in canonical JSON, built from the same text.
    """
    text = sorted_json(properties)
    data = f"[{text},{'true' if archived else 'false'}]"
    return text, hashlib.sha256(data.encode()).hexdigest()[:32]


def _existing_records() -> Any:
    # One statement object with an expanding IN: building a fresh one per page (100 literals coerced
    # each time) showed in the ingest profile.
    t = CrmRecord.__table__.c  # type: ignore[attr-defined]
    return sa_select(
        t.id, t.remote_id, t.associations, t.remote_updated_at, t.archived, t.content_hash, t.match_key, t.alt_key
    ).where(
        t.connection == bindparam("connection"),
        t.object == bindparam("object"),
        t.remote_id.in_(bindparam("ids", expanding=True)),
    )


# On SQLite a page's stored rows come back as one JSON array made by SQLite (one statement step with
# the GIL free, one json.loads), because row by row each step had to win the GIL back from the threads
# mapping the next pages, and SQLAlchemy's per-row processing cost more than SQLite's lookups.
_EXISTING_JSON = (
    "SELECT json_group_array(json_array(id, remote_id, json(associations), remote_updated_at, archived, "
    "content_hash, match_key, alt_key)) FROM crm_record WHERE connection = ? AND object = ? AND remote_id IN "
    "(SELECT value FROM json_each(?))"
)
_PROPERTIES_JSON = (
    "SELECT json_group_array(json_array(remote_id, json(properties))) FROM crm_record "
    "WHERE connection = ? AND object = ? AND remote_id IN (SELECT value FROM json_each(?))"
)


def _existing_rows(bulk: Bulk, connection: str, obj: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The stored rows of ``ids`` that exist: id, remote_id, associations, remote_updated_at, archived, hash, keys."""
    existing: dict[str, dict[str, Any]] = {}
    if not ids:
        return existing
    if bulk.json:
        # The column type's own reader of the stored text, as SQLAlchemy would apply it to the row.
        column = CrmRecord.__table__.c.remote_updated_at  # type: ignore[attr-defined]
        stored_time = column.type.dialect_impl(bulk.dialect).result_processor(bulk.dialect, None)
        text = bulk.conn.exec_driver_sql(_EXISTING_JSON, (connection, obj, json.dumps(list(ids)))).scalar()
        for row_id, remote_id, assoc, updated, archived, digest, match, alt in json.loads(text or "[]"):
            existing[remote_id] = {
                "id": row_id,
                "remote_id": remote_id,
                "associations": assoc,
                "remote_updated_at": stored_time(updated),
                "archived": bool(archived),
                "content_hash": digest,
                "stored_keys": (match, alt),
            }
        return existing
    for chunk in chunks(ids, 500):
        params = {"connection": connection, "object": obj, "ids": list(chunk)}
        for row in bulk.db.execute(_EXISTING, params):
            found = dict(row._mapping)
            found["stored_keys"] = (found.pop("match_key"), found.pop("alt_key"))
            existing[row.remote_id] = found
    return existing


def _stored_properties(bulk: Bulk, connection: str, obj: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """remote_id -> stored properties, for those of ``ids`` that exist."""
    if not ids:
        return {}
    if bulk.json:
        text = bulk.conn.exec_driver_sql(_PROPERTIES_JSON, (connection, obj, json.dumps(list(ids)))).scalar()
        return {remote_id: props or {} for remote_id, props in json.loads(text or "[]")}
    t = CrmRecord.__table__.c  # type: ignore[attr-defined]
    stored: dict[str, dict[str, Any]] = {}
    for chunk in chunks(ids, 500):
        query = select(t.remote_id, t.properties).where(
            t.connection == connection, t.object == obj, t.remote_id.in_(chunk)
        )
        for remote_id, props in bulk.db.execute(query):
            stored[remote_id] = props or {}
    return stored


_NO_CHANGES = Encoded({}, "{}")


def _record_diff(
    change: Callable[[str, str, Any], None],
    remote_id: str,
    action: str,
    before: dict[str, Any],
    after: dict[str, Any],
) -> None:
    diff = {k: [before.get(k), after.get(k)] for k in set(before) | set(after) if before.get(k) != after.get(k)}
    change(remote_id, action, diff)


class Mirror:
    """Records, cursors, associations, entity links and the audit trail of every connection."""

    def __init__(self, db: Database, *, sqlite_json: bool | None = None) -> None:
        self.db = db
        #: Whether a page's stored rows are read as one JSON array SQLite builds (None: where SQLite can).
        self.sqlite_json = sqlite_json

    # -- cursors -----------------------------------------------------------------------------------
    def cursor(self, connection: str, obj: str, kind: str = "incremental") -> dict[str, Any] | None:
        with self.db.session() as s:
            row = s.exec(
                select(CrmSyncCursor).where(
                    CrmSyncCursor.connection == connection,
                    CrmSyncCursor.object == obj,
                    CrmSyncCursor.kind == kind,
                )
            ).first()
            return dict(row.value) if row else None

    def set_cursor(
        self,
        connection: str,
        obj: str,
        value: dict[str, Any] | None,
        kind: str = "incremental",
        *,
        session: Session | None = None,
    ) -> None:
        def _do(s: Session) -> None:
            # Core statements: this runs once per pulled page, where an ORM flush cost more than the page.
            t = CrmSyncCursor.__table__  # type: ignore[attr-defined]
            where = (t.c.connection == connection, t.c.object == obj, t.c.kind == kind)
            if value is None:
                s.execute(delete(t).where(*where))
                return
            done = s.execute(update(t).where(*where).values(value=dict(value), updated_at=utcnow()))
            if not done.rowcount:  # type: ignore[attr-defined]
                s.execute(
                    insert(t).values(
                        connection=connection, object=obj, kind=kind, value=dict(value), updated_at=utcnow()
                    )
                )

        if session is not None:
            _do(session)
        else:
            with self.db.session() as s:
                _do(s)

    def cursors(self, connection: str) -> list[CrmSyncCursor]:
        with self.db.session() as s:
            return list(s.exec(select(CrmSyncCursor).where(CrmSyncCursor.connection == connection)))

    # -- records -----------------------------------------------------------------------------------
    def apply_page(
        self,
        connection: str,
        obj: str,
        records: Sequence[Canonical],
        *,
        cursor: dict[str, Any] | None,
        cursor_kind: str = "incremental",
        deleted: Sequence[str] = (),
        run_id: int | None = None,
        audit: bool = True,
        extra_cursors: Sequence[tuple[str, dict[str, Any] | None]] = (),
        before_commit: Any = None,
    ) -> ApplyCounts:
        """Store a page of records and advance the cursor in the same transaction.

        A record whose content hash is unchanged is not written. A record older than the stored
        one (an out-of-order webhook fetch, a look-back re-read) never rolls the store back.
        """
        return retry_on_conflict(
            lambda: self._apply_page_once(
                connection,
                obj,
                records,
                cursor=cursor,
                cursor_kind=cursor_kind,
                deleted=deleted,
                run_id=run_id,
                audit=audit,
                extra_cursors=extra_cursors,
                before_commit=before_commit,
            )
        )

    def _apply_page_once(
        self,
        connection: str,
        obj: str,
        records: Sequence[Canonical],
        *,
        cursor: dict[str, Any] | None,
        cursor_kind: str,
        deleted: Sequence[str],
        run_id: int | None,
        audit: bool,
        extra_cursors: Sequence[tuple[str, dict[str, Any] | None]],
        before_commit: Any,
    ) -> ApplyCounts:
        # Core statements sent straight to the driver (see Bulk), not ORM objects: a page is a few
        # bulk statements whatever its size, and per-row Python work is what limits ingest.
        counts = ApplyCounts()
        ids = [r.remote_id for r in records] + list(deleted)
        now = utcnow()
        inserts: dict[str, dict[str, Any]] = {}
        updates: dict[int, dict[str, Any]] = {}
        changes: list[dict[str, Any]] = []
        changed: dict[str, tuple[str, Canonical]] = {}  # remote_id -> (action, record): diffed after the loop

        def change(remote_id: str, action: str, diff: dict[str, Any] | Encoded) -> None:
            if audit:
                changes.append(
                    {
                        "run_id": run_id,
                        "connection": connection,
                        "object": obj,
                        "remote_id": remote_id,
                        "action": action,
                        "changes": diff,
                        "at": now,
                    }
                )

        with self.db.session() as s:
            bulk = Bulk(s, json=self.sqlite_json)
            # Properties are read only for the records whose hash changed (the diff needs them).
            existing = _existing_rows(bulk, connection, obj, ids)
            for rec in records:
                props_text, digest = encode_properties(rec.properties, rec.archived)
                row = existing.get(rec.remote_id) or inserts.get(rec.remote_id)
                values = {
                    "properties": Encoded(rec.properties, props_text),
                    "raw": rec.raw,
                    "remote_updated_at": rec.remote_updated_at,
                    "archived": rec.archived,
                    "content_hash": digest,
                    "match_key": rec.match_key,
                    "alt_key": rec.alt_key,
                    "updated_at": now,
                }
                if row is None:
                    values["connection"], values["object"], values["remote_id"] = connection, obj, rec.remote_id
                    values["associations"], values["first_seen_at"] = rec.associations or {}, now
                    inserts[rec.remote_id] = values
                    counts.created += 1
                    change(rec.remote_id, "created", _NO_CHANGES)
                    continue
                if (
                    row["remote_updated_at"] is not None
                    and rec.remote_updated_at is not None
                    and rec.remote_updated_at < row["remote_updated_at"]
                ):
                    counts.unchanged += 1
                    continue
                assoc_changed = bool(rec.associations) and rec.associations != row["associations"]
                if row["content_hash"] == digest and not assoc_changed:
                    counts.unchanged += 1
                    continue
                if row["content_hash"] != digest:
                    action = "archived" if rec.archived and not row["archived"] else "updated"
                    if action == "archived":
                        counts.archived += 1
                    else:
                        counts.updated += 1
                    if "properties" in row:  # seen earlier in this page
                        _record_diff(change, rec.remote_id, action, plain(row["properties"]), rec.properties)
                    else:
                        changed[rec.remote_id] = (action, rec)
                else:
                    counts.updated += 1
                values["remote_updated_at"] = rec.remote_updated_at or row["remote_updated_at"]
                if rec.associations:
                    values["associations"] = rec.associations
                row.update(values)
                if rec.remote_id not in inserts:
                    # A key column left out when the stored one is the same: SQLite rewrites the entries
                    # of every index whose column is set, changed or not.
                    update = {"id": row["id"], **values}
                    for name, stored in zip(("match_key", "alt_key"), row["stored_keys"], strict=True):
                        if stored == values[name]:
                            del update[name]
                    updates[row["id"]] = update
            # Stored properties, read once for all that need them: the diffs of changed records
            # and the hash of records archived by a deletion that were not in this page.
            gone = [
                rid
                for rid in deleted
                if (row := existing.get(rid)) is not None and not row["archived"] and "properties" not in row
            ]
            wanted = [*changed, *gone] if audit else gone
            stored = _stored_properties(bulk, connection, obj, wanted)
            if audit:
                for remote_id, (action, rec) in changed.items():
                    _record_diff(change, remote_id, action, stored.get(remote_id, {}), rec.properties)
            for remote_id in deleted:
                row = existing.get(remote_id)
                if row is not None and not row["archived"]:
                    props = plain(row["properties"]) if "properties" in row else stored.get(remote_id, {})
                    values = {
                        "archived": True,
                        "content_hash": content_hash(props, True),
                        "updated_at": now,
                    }
                    row.update(values)
                    updates.setdefault(row["id"], {"id": row["id"]}).update(values)
                    counts.archived += 1
                    change(remote_id, "archived", {})
            with self.db.write_lock:
                bulk.insert(CrmRecord.__table__, list(inserts.values()))  # type: ignore[attr-defined]
                bulk.update(CrmRecord.__table__, list(updates.values()))  # type: ignore[attr-defined]
                bulk.insert(CrmRecordChange.__table__, changes)  # type: ignore[attr-defined]
                if cursor is not None:
                    self.set_cursor(connection, obj, cursor, cursor_kind, session=s)
                for kind, value in extra_cursors:
                    self.set_cursor(connection, obj, value, kind, session=s)
                if before_commit is not None:
                    before_commit(s)
                s.commit()
        return counts

    def mark_missing(self, connection: str, obj: str, live_ids: set[str], *, run_id: int | None = None) -> int:
        """Archive local records whose remote id is not in ``live_ids`` (reconcile; ids only in memory)."""
        local = self.live_ids(connection, obj)
        vanished = sorted(local - live_ids)
        now = utcnow()
        with self.db.session() as s:
            for chunk in chunks(vanished, 500):
                rows = s.exec(
                    select(CrmRecord).where(
                        CrmRecord.connection == connection,
                        CrmRecord.object == obj,
                        CrmRecord.remote_id.in_(chunk),  # type: ignore[attr-defined]
                    )
                )
                for row in rows:
                    row.archived = True
                    row.content_hash = content_hash(row.properties, True)
                    row.updated_at = now
                    s.add(row)
                    s.add(
                        CrmRecordChange(
                            run_id=run_id,
                            connection=connection,
                            object=obj,
                            remote_id=row.remote_id,
                            action="archived",
                            changes={"reason": "vanished"},
                        )
                    )
        return len(vanished)

    def update_associations(
        self, connection: str, obj: str, links: dict[str, dict[str, list[str]]], *, run_id: int | None = None
    ) -> int:
        """Store re-read associations; returns how many records' links changed."""
        changed = 0
        with self.db.session() as s:
            for chunk in chunks(list(links), 500):
                rows = s.exec(
                    select(CrmRecord).where(
                        CrmRecord.connection == connection,
                        CrmRecord.object == obj,
                        CrmRecord.remote_id.in_(chunk),  # type: ignore[attr-defined]
                    )
                )
                for row in rows:
                    new = {**(row.associations or {}), **links[row.remote_id]}
                    if new != (row.associations or {}):
                        s.add(
                            CrmRecordChange(
                                run_id=run_id,
                                connection=connection,
                                object=obj,
                                remote_id=row.remote_id,
                                action="updated",
                                changes={"associations": [row.associations, new]},
                            )
                        )
                        row.associations = new
                        row.updated_at = utcnow()
                        s.add(row)
                        changed += 1
        return changed

    def record(self, connection: str, obj: str, remote_id: str) -> CrmRecord | None:
        with self.db.session() as s:
            return s.exec(
                select(CrmRecord).where(
                    CrmRecord.connection == connection,
                    CrmRecord.object == obj,
                    CrmRecord.remote_id == remote_id,
                )
            ).first()

    def find_by_keys(self, connection: str, obj: str, keys: Iterable[str]) -> dict[str, CrmRecord]:
        """Live records by match key or alt key (``email:a@b``, ``phone:+49…``, ``domain:x.com``)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, CrmRecord] = {}
        with self.db.session() as s:
            for chunk in chunks(wanted, 500):
                for column in (CrmRecord.match_key, CrmRecord.alt_key):
                    rows = s.exec(
                        select(CrmRecord).where(
                            CrmRecord.connection == connection,
                            CrmRecord.object == obj,
                            CrmRecord.archived == false(),
                            column.in_(chunk),  # type: ignore[union-attr]
                        )
                    )
                    for row in rows:
                        key = row.match_key if column is CrmRecord.match_key else row.alt_key
                        if key is not None:
                            found.setdefault(key, row)
        return found

    def records(self, connection: str, obj: str, *, archived: bool | None = None) -> list[CrmRecord]:
        with self.db.session() as s:
            q = select(CrmRecord).where(CrmRecord.connection == connection, CrmRecord.object == obj)
            if archived is not None:
                q = q.where(CrmRecord.archived == archived)
            return list(s.exec(q))

    def count_records(self, connection: str, obj: str | None = None) -> dict[str, dict[str, int]]:
        with self.db.session() as s:
            q = select(CrmRecord.object, CrmRecord.archived, func.count()).where(CrmRecord.connection == connection)
            if obj:
                q = q.where(CrmRecord.object == obj)
            q = q.group_by(col(CrmRecord.object), col(CrmRecord.archived))
            out: dict[str, dict[str, int]] = {}
            for o, archived, n in s.exec(q):
                d = out.setdefault(o, {"stored": 0, "archived": 0})
                d["stored"] += n
                if archived:
                    d["archived"] += n
            return out

    def live_ids(self, connection: str, obj: str) -> set[str]:
        with self.db.session() as s:
            return set(
                s.exec(
                    select(CrmRecord.remote_id).where(
                        CrmRecord.connection == connection,
                        CrmRecord.object == obj,
                        CrmRecord.archived == false(),
                    )
                )
            )

    def changes(
        self,
        *,
        connection: str | None = None,
        obj: str | None = None,
        remote_id: str | None = None,
        since: datetime | None = None,
        limit: int = 200,
    ) -> list[CrmRecordChange]:
        with self.db.session() as s:
            q = select(CrmRecordChange)
            if connection:
                q = q.where(CrmRecordChange.connection == connection)
            if obj:
                q = q.where(CrmRecordChange.object == obj)
            if remote_id:
                q = q.where(CrmRecordChange.remote_id == remote_id)
            if since:
                q = q.where(CrmRecordChange.at >= since)
            return list(s.exec(q.order_by(CrmRecordChange.id.desc()).limit(limit)))  # type: ignore[union-attr]

    def prune_changes(self, *, before: datetime) -> int:
        """Drop the audit rows older than ``before``; how many were dropped."""
        with self.db.session() as s:
            result = s.execute(delete(CrmRecordChange).where(col(CrmRecordChange.at) < before))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # -- links -------------------------------------------------------------------------------------
    def links(self, connection: str, obj: str, keys: Iterable[str]) -> dict[str, str]:
        wanted = list(dict.fromkeys(keys))
        out: dict[str, str] = {}
        with self.db.session() as s:
            for chunk in chunks(wanted, 500):
                for row in s.exec(
                    select(CrmEntityLink).where(
                        CrmEntityLink.connection == connection,
                        CrmEntityLink.object == obj,
                        CrmEntityLink.local_key.in_(chunk),  # type: ignore[attr-defined]
                    )
                ):
                    out[row.local_key] = row.remote_id
        return out

    def save_links(self, connection: str, obj: str, pairs: dict[str, str], *, session: Session | None = None) -> None:
        def _do(s: Session) -> None:
            # Core statements: a push step links thousands of keys, and ORM objects cost more than the writes.
            t = CrmEntityLink.__table__  # type: ignore[attr-defined]
            existing: dict[str, tuple[int, str]] = {}
            for chunk in chunks(list(pairs), 500):
                q = sa_select(t.c.id, t.c.local_key, t.c.remote_id).where(
                    t.c.connection == connection, t.c.object == obj, t.c.local_key.in_(chunk)
                )
                existing.update({row.local_key: (row.id, row.remote_id) for row in s.execute(q)})
            now = utcnow()
            bulk = Bulk(s)
            bulk.insert(
                t,
                [
                    {"connection": connection, "object": obj, "local_key": k, "remote_id": rid, "created_at": now}
                    for k, rid in pairs.items()
                    if k not in existing
                ],
            )
            bulk.update(
                t,
                [
                    {"id": existing[k][0], "remote_id": rid}
                    for k, rid in pairs.items()
                    if k in existing and existing[k][1] != rid
                ],
            )

        if session is not None:
            _do(session)
        else:
            with self.db.session() as s:
                _do(s)

    def merge_pushed(self, s: Session, connection: str, obj: str, records: Sequence[Canonical]) -> None:
        """Merge what a push just wrote into the mirror (properties over the stored ones), in ``s``.

        Unlike ``apply_page`` this keeps the stored properties the push did not send, and the
        remote timestamp stays the CRM's (the next pull brings it).
        """
        if not records:
            return
        t = CrmRecord.__table__  # type: ignore[attr-defined]
        existing: dict[str, dict[str, Any]] = {}
        for chunk in chunks([r.remote_id for r in records], 500):
            q = sa_select(t.c.id, t.c.remote_id, t.c.properties, t.c.archived, t.c.match_key, t.c.alt_key).where(
                t.c.connection == connection, t.c.object == obj, t.c.remote_id.in_(chunk)
            )
            existing.update({row.remote_id: dict(row._mapping) for row in s.execute(q)})
        now = utcnow()
        inserts: dict[str, dict[str, Any]] = {}
        updates: dict[int, dict[str, Any]] = {}
        for rec in records:
            row = existing.get(rec.remote_id)
            if row is None and (new := inserts.get(rec.remote_id)) is not None:
                props = {**new["properties"].value, **rec.properties}
                props_text, digest = encode_properties(props, False)
                new.update(properties=Encoded(props, props_text), content_hash=digest)
                continue
            if row is None:
                props_text, digest = encode_properties(rec.properties, False)
                inserts[rec.remote_id] = {
                    "connection": connection,
                    "object": obj,
                    "remote_id": rec.remote_id,
                    "properties": Encoded(rec.properties, props_text),
                    "raw": {},
                    "associations": {},
                    "remote_updated_at": None,
                    "archived": False,
                    "content_hash": digest,
                    "match_key": rec.match_key,
                    "alt_key": rec.alt_key,
                    "first_seen_at": now,
                    "updated_at": now,
                }
                continue
            row["properties"] = props = {**plain(row["properties"]), **rec.properties}
            row["match_key"] = row["match_key"] or rec.match_key
            row["alt_key"] = row["alt_key"] or rec.alt_key
            props_text, digest = encode_properties(props, bool(row["archived"]))
            updates[row["id"]] = {
                "id": row["id"],
                "properties": Encoded(props, props_text),
                "content_hash": digest,
                "match_key": row["match_key"],
                "alt_key": row["alt_key"],
                "updated_at": now,
            }
        bulk = Bulk(s)
        bulk.insert(t, list(inserts.values()))
        bulk.update(t, list(updates.values()))


_EXISTING = _existing_records()
