"""Stored webhook events -> one batch read of the changed records -> the normal pull path.

Events are hints: only their record ids are used, the records themselves are read fresh,
so duplicates and out-of-order deliveries cannot roll a record back. That holds for deletions
too: a record is archived only when the CRM no longer returns it, so a deletion that arrives
late never hides a record restored since. The events are marked processed in the same
transaction that stores the records they point at.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from crmsync.store.events import mark_processed, pending_events

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.providers.base import Provider, RemoteRecord
    from crmsync.store import CrmConnection, CrmWebhookEvent

BATCH = 500

#: ``(mapping, object, remote record) -> canonical record``: the pull's own conversion, passed in
#: so that this module does not import the pull that calls it.
Convert = Callable[["Mapping", str, "RemoteRecord"], Any]


def apply_pending_events(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    run_id: int,
    *,
    objects: Sequence[str],
    convert: Convert,
) -> int:
    """Apply every pending event of a connection; returns how many events were consumed."""
    consumed = 0
    while True:
        events = pending_events(app.store, conn.name, limit=BATCH)
        if not events:
            return consumed
        by_obj: dict[str, list[CrmWebhookEvent]] = defaultdict(list)
        for ev in events:
            by_obj[ev.object].append(ev)
        for obj, evs in by_obj.items():
            deleted = sorted({e.remote_id for e in evs if e.event_type == "deletion"})
            records = []
            if obj in objects and obj in provider.objects:
                # Deletions are hints too: an id the CRM still returns was restored after it (or the
                # deletion arrived late), so only ids the CRM no longer returns are archived.
                wanted = sorted({e.remote_id for e in evs})
                fetched = provider.fetch(obj, wanted, fields=mapping.provider_fields(obj))
                records = [convert(mapping, obj, r) for r in fetched]
                live = {r.id for r in fetched if not r.archived}
                deleted = [rid for rid in deleted if rid not in live]
            app.store.mirror.apply_page(
                conn.name,
                obj,
                records,
                cursor=None,
                deleted=deleted,
                run_id=run_id,
                before_commit=mark_processed([e.id for e in evs]),
            )
            consumed += len(evs)
