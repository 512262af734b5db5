"""One entity step of a lane: match (mirror, then the CRM), resolve conflicts, write, record.

Contacts, companies and deals are matched or upserted by natural or unique keys, so sending them
again cannot duplicate them; each step's remote ids are committed as soon as its batches answer,
so a retry resumes at the failed step.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from crmsync.model import utcnow
from crmsync.providers.base import ItemResult, Outgoing
from crmsync.store import Canonical, CrmConflict, retry_on_conflict
from crmsync.store.outbox import Outbox
from crmsync.sync.conflicts import Conflict, Rules, resolve
from crmsync.sync.push.items import Item
from crmsync.sync.push.lookups import InCrm, batches, blind_keys, group_by_key, lookup
from crmsync.sync.push.receipts import PushSummary
from crmsync.sync.records import record_keys

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.providers.base import Provider
    from crmsync.store import CrmConnection

#: A lane's CRM lookups of one object (key -> ``InCrm`` or None), or their future while they run.
LookedUp = dict[str, Any] | Future[dict[str, Any]]


@dataclass
class StepWrites:
    """What one entity step sends: outgoing writes, keys already right in the CRM, mirror rows, conflicts."""

    outgoing: list[Outgoing] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)
    merged: dict[str, dict[str, Any]] = field(default_factory=dict)
    conflicts: list[CrmConflict] = field(default_factory=list)

    def absorb(self, again: StepWrites) -> None:
        """Take in what a confirmation round planned (its writes are sent apart)."""
        self.resolved.update(again.resolved)
        self.merged.update(again.merged)
        self.conflicts.extend(again.conflicts)


def parallel(
    provider: Provider, fn: Callable[[list[Any]], list[ItemResult]], parts: list[list[Any]]
) -> list[ItemResult]:
    """Send batches concurrently (the HttpClient's bucket keeps the CRM's pace)."""
    if len(parts) <= 1:
        return [r for b in parts for r in fn(b)]
    workers = max(1, min(len(parts), provider.http.concurrency))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="push") as pool:
        return [r for rs in pool.map(fn, parts) for r in rs]


@dataclass(eq=False)
class LaneStep:
    """What every step of a lane works with: the run's app, connection, provider and mapping, the
    object type it writes, the run's summary and how often a lost answer is looked up again."""

    app: App
    conn: CrmConnection
    provider: Provider
    mapping: Mapping
    obj: str
    summary: PushSummary
    confirm_rounds: int = field(kw_only=True)


@dataclass(eq=False)
class EntityStep(LaneStep):
    """One entity type for a lane (see the module docstring); ``run`` takes the step."""

    #: Called once the step's lookups are in, just before its writes go (``run_lanes`` reserves
    #: rate-limit turns for the lane's next step from then on).
    ready: Callable[[], None] | None = field(default=None, kw_only=True)
    rules: Rules = field(init=False, default_factory=dict)
    crm: dict[str, InCrm] = field(init=False, default_factory=dict)
    blind: set[str] = field(init=False, default_factory=set)

    def run(self, items: list[Item], known: LookedUp | None = None) -> None:
        """``known`` holds the lane's keys already looked up in the CRM (see ``LaneLookups``), or
        their future: the record found, or None for "not there"."""
        by_key = group_by_key(self.obj, items)
        if not by_key:
            return  # before waiting for the lookups: a lane with nothing to do here goes on at once
        if isinstance(known, Future):
            known = known.result()
        self._match(list(by_key), known or {})
        self.rules = self.app.config.conflict_rules()
        writes = StepWrites()
        for k, its in by_key.items():
            self._plan(k, its, writes)
        if self.ready is not None:
            self.ready()
        results = self._send(writes.outgoing)
        self._confirm(by_key, results, writes)
        if writes.outgoing:
            self.provider.flush(self.obj)
        for k, rid in writes.resolved.items():
            results[k] = ItemResult(k, True, remote_id=rid)
        record_step(self.app, self.conn, self.obj, by_key, results, writes)

    def _match(self, keys: list[str], looked: dict[str, Any]) -> None:
        """What the mirror, the lane's lookups and (for the rest) the CRM know of ``keys``."""
        app, obj = self.app, self.obj
        mirror = app.store.mirror.find_by_keys(self.conn.name, obj, keys)
        unknown = [k for k in keys if k not in mirror]
        self.crm = {k: (r.properties, r.remote_id, r.remote_updated_at) for k, r in mirror.items()}
        self.blind = blind_keys(app, self.conn, self.provider, obj, unknown)
        self.crm.update({k: v for k in unknown if (v := looked.get(k)) is not None})
        rest = [k for k in unknown if k not in self.blind and k not in looked]
        lookup(app, self.conn, self.provider, self.mapping, obj, rest, self.crm)

    def _plan(self, k: str, its: list[Item], writes: StepWrites) -> None:
        plan_write(
            self.mapping,
            self.obj,
            k,
            its,
            self.crm.get(k),
            self.rules,
            writes,
            self.summary,
            self.conn.name,
            create_only=k in self.blind,
        )

    def _send(self, outgoing: list[Outgoing]) -> dict[str, ItemResult]:
        provider, obj = self.provider, self.obj
        parts = batches(outgoing, provider.batch_size)
        return {r.ref: r for r in parallel(provider, lambda b: provider.upsert(obj, b), parts)}

    def _confirm(self, by_key: dict[str, list[Item]], results: dict[str, ItemResult], writes: StepWrites) -> None:
        """Records the CRM already holds (someone else created them, or our own write whose answer
        was lost): read them, apply the conflict rules, update. Those not there (a lost answer
        before the write, a whole batch refused for a neighbour's key): created again."""
        unsure = [k for k, r in results.items() if r.exists or r.unconfirmed]
        for _ in range(self.confirm_rounds):
            if not unsure:
                break
            lookup(self.app, self.conn, self.provider, self.mapping, self.obj, unsure, self.crm)
            again = StepWrites()
            for k in unsure:
                del results[k]
                writes.merged.pop(k, None)
                self._plan(k, by_key[k], again)
            results.update(self._send(again.outgoing))
            writes.absorb(again)
            unsure = [o.ref for o in again.outgoing if (r := results.get(o.ref)) and (r.exists or r.unconfirmed)]


def entity_step(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    obj: str,
    items: list[Item],
    summary: PushSummary,
    known: LookedUp | None = None,
    *,
    confirm_rounds: int,
    ready: Callable[[], None] | None = None,
) -> None:
    """Take one entity step of a lane (``EntityStep.run``)."""
    EntityStep(app, conn, provider, mapping, obj, summary, confirm_rounds=confirm_rounds, ready=ready).run(items, known)


def plan_write(
    mapping: Mapping,
    obj: str,
    k: str,
    its: list[Item],
    existing: InCrm | None,
    rules: Rules,
    writes: StepWrites,
    summary: PushSummary,
    connection_name: str,
    *,
    create_only: bool = False,
) -> None:
    """Merge the outcomes of one record (oldest first), resolve conflicts, and plan its write."""
    its.sort(key=lambda it: it.occurred_at)
    values: dict[str, Any] = {}
    for it in its:
        values.update({f: v for f, v in it.canon[obj].items() if v not in (None, "")})
    send, conflicts = resolve(
        obj,
        values,
        existing[0] if existing and existing[0] else None,
        rules=rules,
        occurred_at=its[-1].occurred_at,
        crm_updated_at=existing[2] if existing else None,
    )
    remote_id = existing[1] if existing else None
    for c in conflicts:
        summary.field_conflicts += 1
        writes.conflicts.append(conflict_row(connection_name, obj, remote_id, c, its[-1].row.outcome_id))
    assoc = associations(obj, its[-1].row.steps)
    if existing and not send and not assoc:
        writes.resolved[k] = existing[1]
        writes.merged[k] = {**(existing[0] or {}), **values} if existing[0] else values
        return
    if obj == "deals" and send:
        send.setdefault("key", values.get("key"))
    # An existing record with nothing to change still gets the links the outcome implies (no properties).
    props = mapping.to_provider(obj, send if existing else values) if send or not existing else {}
    writes.outgoing.append(
        Outgoing(
            ref=k,
            properties=props,
            match=dict([k.split(":", 1)]),
            remote_id=remote_id,
            associations=assoc,
            create_only=create_only and existing is None,
        )
    )
    writes.merged[k] = {**((existing[0] or {}) if existing else {}), **values}


def associations(obj: str, steps: dict[str, Any]) -> dict[str, str]:
    """The records a contact or deal is linked to: those its outcome's earlier steps wrote."""
    assoc = {}
    if obj == "contacts":
        assoc["companies"] = steps.get("companies") or ""
    elif obj == "deals":
        assoc["contacts"] = steps.get("contacts") or ""
        assoc["companies"] = steps.get("companies") or ""
    return {a: v for a, v in assoc.items() if v}


def conflict_row(connection_name: str, obj: str, remote_id: str | None, c: Conflict, outcome_id: str) -> CrmConflict:
    """A field conflict as the store keeps it (open while the CRM's value is kept)."""
    return CrmConflict(
        connection=connection_name,
        object=obj,
        remote_id=remote_id,
        field=c.field,
        crm_value=clipped(c.crm_value),
        outcome_value=clipped(c.outcome_value),
        rule=c.rule,
        resolution=c.resolution,
        outcome_id=outcome_id,
        open=c.resolution == "kept_crm",
    )


def clipped(value: Any) -> str | None:
    """A value as a conflict row stores it: text, at most 500 characters."""
    return None if value is None else str(value)[:500]


def record_step(
    app: App,
    conn: CrmConnection,
    obj: str,
    by_key: dict[str, list[Item]],
    results: dict[str, ItemResult],
    writes: StepWrites,
) -> None:
    """Commit a step: remote ids into the outbox rows, links and mirror records, conflicts."""
    links: dict[str, str] = {}
    mirror: list[Canonical] = []
    now = utcnow()
    for k, its in by_key.items():
        res = results.get(k)
        for it in its:
            _record_item(it, obj, res)
            it.row.updated_at = now
        if res is not None and res.ok and res.remote_id:
            links[k] = res.remote_id
            props = writes.merged.get(k) or {}
            mk, ak = record_keys(obj, props)
            mirror.append(
                Canonical(
                    remote_id=res.remote_id,
                    properties=props,
                    raw={},
                    remote_updated_at=None,
                    match_key=mk or k,
                    alt_key=ak,
                )
            )
    outbox = Outbox(app.store)

    def write() -> None:
        # One writer at a time in this process, waking the moment the last commits: lanes polling
        # SQLite's busy handler (growing sleeps) lengthened every chain.
        with app.store.write_lock, app.store.session() as s:
            outbox.save((it.row for its in by_key.values() for it in its), session=s)
            app.store.mirror.save_links(conn.name, obj, links, session=s)
            for c in writes.conflicts:
                s.add(c)
            app.store.mirror.merge_pushed(s, conn.name, obj, mirror)

    # Another worker may have just linked or mirrored the same company or contact (PostgreSQL).
    retry_on_conflict(write)


def _record_item(it: Item, obj: str, res: ItemResult | None) -> None:
    if res is not None and res.ok and res.remote_id:
        it.row.steps = {**it.row.steps, obj: res.remote_id}
        if res.created:
            it.created.add(obj)
        return
    it.failed = True
    it.row.last_error = f"{obj}: {res.error if res else 'no result'}"
    it.row.attempts += 1
    if res is None or not res.retriable:
        it.row.state = "failed"
