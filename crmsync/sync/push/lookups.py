"""Finding an outcome's companies, contacts and deals in the CRM before they are written.

A key the mirror knows is not asked for; a key the CRM keeps unique is created blind
(``blind_keys``) and looked up only if the CRM says it exists. What is found is mirrored.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any

from crmsync.sync.push.items import Item, item_key
from crmsync.sync.records import to_canonical

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.providers.base import Provider
    from crmsync.store import CrmConnection

#: A record as the CRM holds it: its canonical properties, remote id and when it last changed.
InCrm = tuple[dict[str, Any], str, datetime | None]
#: Lookups already under way (``Prefetch``): key -> the answer of the batch that holds the key.
Prefetched = dict[str, Future[dict[str, Any]]]


def batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def group_by_key(obj: str, items: list[Item]) -> dict[str, list[Item]]:
    """The items a step still has to do for ``obj``, by the record's match key."""
    by_key: dict[str, list[Item]] = {}
    for it in items:
        if not it.failed and obj in it.canon and obj not in it.row.steps and (k := item_key(it, obj)):
            by_key.setdefault(k, []).append(it)
    return by_key


def blind_keys(app: App, conn: CrmConnection, provider: Provider, obj: str, unknown: list[str]) -> set[str]:
    """Keys the CRM keeps unique need no lookup: they are created blind, and only the ones the CRM
    reports as existing are looked up and merged under the conflict rules (see ``entity_step``)."""
    if obj not in provider.optimistic_creates or not unknown:
        return set()
    linked = app.store.mirror.links(conn.name, obj, unknown)
    return {k for k in unknown if k.split(":", 1)[0] in ("email", "key") and k not in linked}


def to_look_up(app: App, conn: CrmConnection, provider: Provider, obj: str, keys: list[str]) -> list[str]:
    """The keys of ``obj`` to ask the CRM for: not in the mirror, not created blind (``blind_keys``)."""
    mirror = app.store.mirror.find_by_keys(conn.name, obj, keys)
    unknown = [k for k in keys if k not in mirror]
    blind = blind_keys(app, conn, provider, obj, unknown)
    return [k for k in unknown if k not in blind]


def lookups_for(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    items: list[Item],
    obj: str,
    prefetched: Prefetched | None = None,
) -> dict[str, Any]:
    """Look up a lane's unknown records of ``obj`` in the CRM before its writes start.

    Returns key -> ``InCrm``, or None when the CRM has none. Keys the mirror knows or that are
    created blind (``blind_keys``) are not looked up. ``prefetched``: answers already asked for.
    """
    keys = list(group_by_key(obj, items))
    if not keys:
        return {}
    wanted = to_look_up(app, conn, provider, obj, keys)
    crm: dict[str, InCrm] = {}
    lookup(app, conn, provider, mapping, obj, wanted, crm, prefetched)
    return {k: crm.get(k) for k in wanted}


def lookup(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    obj: str,
    keys: list[str],
    crm: dict[str, InCrm],
    prefetched: Prefetched | None = None,
) -> None:
    """Find ``keys`` in the CRM (in parallel batches), mirror what is found, fill ``crm``.

    Keys in ``prefetched`` take their answer from there (each once: a later round asks again).
    """
    if not keys:
        return
    found, by_kind = _take_prefetched(keys, prefetched)
    fields = mapping.provider_fields(obj)
    parts = [b for kind, ks in by_kind.items() for b in batches(ks, provider.lookup_batch(obj, kind))]
    with ThreadPoolExecutor(max_workers=provider.http.concurrency, thread_name_prefix="lookup") as pool:
        for part in pool.map(lambda b: provider.lookup(obj, b, fields=fields), parts):
            found.update(part)
    if found:
        records = {rec.id: to_canonical(mapping, obj, rec) for rec in found.values()}
        app.store.mirror.apply_page(conn.name, obj, list(records.values()), cursor=None, audit=False)
        for k, rec in found.items():
            crm[k] = (records[rec.id].properties, rec.id, rec.updated_at)
    linked = app.store.mirror.links(conn.name, obj, [k for k in keys if k not in found])
    for k, rid in linked.items():
        crm[k] = ({}, rid, None)


def _take_prefetched(
    keys: list[str], prefetched: Prefetched | None
) -> tuple[dict[str, Any], dict[str, list[dict[str, str]]]]:
    """The records already found ahead, and the keys still to ask for, by kind."""
    found: dict[str, Any] = {}
    by_kind: dict[str, list[dict[str, str]]] = {}
    for k in keys:
        answer = prefetched.pop(k, None) if prefetched else None
        if answer is not None:
            try:
                if (rec := answer.result().get(k)) is not None:
                    found[k] = rec
                continue
            except Exception:  # failed or cancelled ahead: asked again below (its error, if any, the lane's)
                pass
        kind, value = k.split(":", 1)
        by_kind.setdefault(kind, []).append({kind: value})
    return found, by_kind
