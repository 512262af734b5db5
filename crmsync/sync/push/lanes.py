"""Lanes: a round split into groups of outcomes that share no record, run side by side.

Each lane's lookups are queued per object as soon as the round starts (``LaneLookups``): a lane
waits only for its own lookups of the object it is at, so outcomes with no company write contacts
and calls while the company searches are still under way. A lane that has taken its last step
closes its outcomes (``settle``) at once, while other lanes still wait for the CRM.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any

from crmsync.model import utcnow
from crmsync.store.outbox import Outbox
from crmsync.sync.push.confirm import activity_step
from crmsync.sync.push.items import ACTIVITY_STEPS, ENTITY_STEPS, Item, item_key, public_steps
from crmsync.sync.push.lookups import Prefetched, group_by_key, lookups_for
from crmsync.sync.push.receipts import PushSummary, Receipt
from crmsync.sync.push.settings import DEFAULT, PushSettings
from crmsync.sync.push.steps import LookedUp, entity_step

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.providers.base import Provider
    from crmsync.store import CrmConnection

#: A lane with its lookups (or their futures) per object.
Lane = tuple[list[Item], dict[str, LookedUp]]
#: Looks up a lane's records of one object in the CRM (``lookups_for``).
LookUp = Callable[..., dict[str, Any]]


def split_lanes(items: list[Item], *, split: bool = True, lane_size: int = DEFAULT.lane_size) -> list[list[Item]]:
    """Split a round into lanes that share no company, contact or deal.

    Outcomes that share any record stay together (they merge into one write). Groups that need the
    same first entity step go to the same lanes, ``lane_size`` outcomes at most per lane, so
    outcomes with no company never wait for company lookups and each lane adds at most one
    part-filled batch per object. No two lanes touch one record, so they run at the same time
    without racing on a match.
    """
    if not split:
        return [items] if items else []
    lanes: dict[str, list[list[Item]]] = {}
    for group in _groups_sharing_records(items):
        first = next((o for o in ENTITY_STEPS if any(o in it.canon and o not in it.row.steps for it in group)), "")
        same = lanes.setdefault(first, [[]])
        if same[-1] and len(same[-1]) + len(group) > lane_size:
            same.append([])
        same[-1].extend(group)
    order = {id(it): n for n, it in enumerate(items)}
    return [sorted(lane, key=lambda it: order[id(it)]) for same in lanes.values() for lane in same]


def _groups_sharing_records(items: list[Item]) -> list[list[Item]]:
    """The items in groups joined by any shared record (union-find on the records' keys)."""
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i, it in enumerate(items):
        for obj in ENTITY_STEPS:
            if k := item_key(it, obj):
                parent[find((obj, k))] = find(i)
    groups: dict[Any, list[Item]] = {}
    for i, it in enumerate(items):
        groups.setdefault(find(i), []).append(it)
    return list(groups.values())


def first_step(lane: list[Item]) -> int:
    """The index in ENTITY_STEPS of the first entity step a lane still needs (len when none)."""
    return next(
        (j for j, o in enumerate(ENTITY_STEPS) if any(o in it.canon and o not in it.row.steps for it in lane)),
        len(ENTITY_STEPS),
    )


class LaneLookups:
    """Lanes' CRM lookups, queued per object (one lane at a time per object; see ``start`` for the order).

    A lane's lookups of one object do not depend on any write, so they can run long before the lane
    gets there. Without threads (in-memory store) they run in line. ``look_up`` does one lane's
    (``lookups_for``).
    """

    def __init__(
        self,
        app: App,
        conn: CrmConnection,
        provider: Provider,
        mapping: Mapping,
        *,
        threads: bool,
        prefetched: dict[str, Prefetched] | None = None,
        look_up: LookUp = lookups_for,
    ) -> None:
        self.args = (app, conn, provider, mapping)
        self.provider = provider
        self.prefetched = prefetched or {}
        self.look_up = look_up
        self.pools = (
            {obj: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lookup-{obj}") for obj in ENTITY_STEPS}
            if threads
            else None
        )

    def start(self, lanes: list[list[Item]]) -> list[Lane]:
        """Queue the lanes' lookups; each lane with its lookups (or their futures) per object.

        Per object, the lanes that reach that object first are looked up first: a lane that starts
        with contacts needs its contacts at once, a lane that starts with companies only after its
        companies are written (their lookups take longer than anything else of a push).
        """
        known: list[dict[str, LookedUp]] = [{} for _ in lanes]
        firsts = [first_step(lane) for lane in lanes]
        for j, obj in enumerate(ENTITY_STEPS):
            order = sorted(range(len(lanes)), key=lambda i: j - firsts[i] if firsts[i] <= j else len(ENTITY_STEPS))
            for group in self._groups(obj, order, lanes):
                part = lanes[group[0]] if len(group) == 1 else [it for i in group for it in lanes[i]]
                found: LookedUp
                ahead = self.prefetched.get(obj)
                if self.pools is None:
                    found = self.look_up(*self.args, part, obj, ahead)
                else:
                    found = self.pools[obj].submit(self.look_up, *self.args, part, obj, ahead)
                for i in group:
                    known[i][obj] = found
        return list(zip(lanes, known, strict=True))

    def _groups(self, obj: str, order: list[int], lanes: list[list[Item]]) -> list[list[int]]:
        """Consecutive lanes (in ``order``) whose keys of ``obj`` fit one lookup call together.

        A lane's lookups are sent per lane, so lanes with few keys each would each spend a query;
        lanes grouped share one, and their answer (a lane reads only its own keys in it). A lane
        whose keys fill a call is left alone.
        """
        groups: list[list[int]] = []
        sizes: Counter[str] = Counter()
        for i in order:
            mine = Counter(k.split(":", 1)[0] for k in group_by_key(obj, lanes[i]))
            together = sizes + mine
            if groups and all(n <= self.provider.lookup_batch(obj, kind) for kind, n in together.items()):
                groups[-1].append(i)
                sizes = together
            else:
                groups.append([i])
                sizes = mine
        return groups

    def close(self) -> None:
        for pool in (self.pools or {}).values():
            pool.shutdown(wait=True, cancel_futures=True)


def run_lanes(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    lanes: list[Lane],
    summary: PushSummary,
    owner: str | None,
    receipts: dict[str | None, Receipt],
    *,
    settings: PushSettings = DEFAULT,
) -> None:
    """Every step of a round, its lanes at the same time; ``receipts`` gets the closed outcomes' by id.

    A lane that has taken its last step closes its outcomes (``settle``) at once. A lane stopped
    early (another failed, Ctrl-C) closes nothing and ``deliver`` hands its rows back; its finished
    steps are committed either way, and what every lane did is counted in ``summary`` even when
    one of them failed. ``owner``: the run's claim name, whose leases are renewed after each step
    (workers sharing the outbox), or None.
    """
    stop = threading.Event()
    outbox = Outbox(app.store)
    rounds = settings.confirm_rounds

    def renew(part: list[Item]) -> None:
        if owner is not None:
            now = outbox.renew([it.row.id for it in part], owner)
            for it in part:
                it.row.claimed_at = now

    def lane(part: list[Item], known: dict[str, LookedUp]) -> tuple[PushSummary, list[Receipt]]:
        mine = PushSummary(summary.connection, summary.provider)
        with contextlib.closing(Reserved(provider)) as held:
            ahead = step_batches(part, provider.batch_size)
            for j, obj in enumerate(ENTITY_STEPS):
                if stop.is_set():
                    return mine, []
                nxt = next((ahead[o] for o in ENTITY_STEPS[j + 1 :] if ahead[o]), 0)
                entity_step(
                    app,
                    conn,
                    provider,
                    mapping,
                    obj,
                    part,
                    mine,
                    known.get(obj),
                    confirm_rounds=rounds,
                    ready=functools.partial(held.set, nxt),
                )
                renew(part)
        # The last activity step's results are committed with the lane's close (``settle``), one
        # write instead of two: the rows' in-flight marks, committed before the send, cover the gap.
        last = next((o for o in reversed(ACTIVITY_STEPS) if any(o in it.canon for it in part)), None)
        for obj in ACTIVITY_STEPS:
            if stop.is_set():
                return mine, []
            activity_step(app, conn, provider, mapping, obj, part, mine, confirm_rounds=rounds, save=obj != last)
            renew(part)
        return mine, settle(app, part, mine, max_attempts=settings.max_attempts)

    def count(part: PushSummary, closed: list[Receipt]) -> None:
        for name in ("field_conflicts", "writes", "created", "already", "updated", "failed", "requeued"):
            setattr(summary, name, getattr(summary, name) + getattr(part, name))
        receipts.update((r.id, r) for r in closed)

    if len(lanes) == 1:
        count(*lane(*lanes[0]))
        return
    pool = ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="lane")
    futures = [pool.submit(lane, part, known) for part, known in lanes]
    try:
        for future in futures:
            future.result()
    finally:
        # A failed lane or Ctrl-C stops the others at their next step; finished steps are committed.
        stop.set()
        pool.shutdown(wait=True)
        for future in futures:
            if not future.cancelled() and future.exception() is None:
                count(*future.result())


def step_batches(lane: list[Item], batch_size: int) -> dict[str, int]:
    """The write requests each entity step of a lane will send, at most (one per ``batch_size`` records)."""
    return {obj: -(-len(group_by_key(obj, lane)) // max(1, batch_size)) for obj in ENTITY_STEPS}


class Reserved:
    """Rate-limit turns a lane keeps free of calls and tasks for its next entity step (``set``).

    A lane's next step (contacts after companies, deals after contacts) is ready the moment this
    step's answers are in; calls and tasks, which nothing waits on, would otherwise take the turns
    freed meanwhile and push the lane's chain into the next rate window. Held only while the lane's
    writes are under way (not while it waits for lookups), and released when the lane moves on to
    its activities or stops. A provider whose client has no such limit reserves nothing.
    """

    def __init__(self, provider: Provider) -> None:
        buckets = getattr(getattr(provider, "http", None), "buckets", None) or {}
        self._reserve: Callable[[int], None] | None = getattr(buckets.get("default"), "reserve", None)
        self.held = 0

    def set(self, turns: int) -> None:
        if self._reserve is not None and turns != self.held:
            self._reserve(turns - self.held)
            self.held = turns

    def close(self) -> None:
        self.set(0)


def settle(
    app: App, items: list[Item], summary: PushSummary, *, max_attempts: int = DEFAULT.max_attempts
) -> list[Receipt]:
    """Close a lane's outcomes: done, failed or queued again, committed; their receipts to print after."""
    now = utcnow()
    receipts = []
    for it in items:
        status = _close(it, summary, now, max_attempts)
        row = it.row
        row.updated_at = now
        row.claimed_by = row.claimed_at = None
        error = row.last_error if status not in ("created", "already") else None
        receipts.append(Receipt(row.outcome_id, status, remote_ids=public_steps(row.steps), error=error))
    Outbox(app.store).save(it.row for it in items)
    return receipts


def _close(it: Item, summary: PushSummary, now: datetime, max_attempts: int) -> str:
    """An outcome's state after its lane's last step, and its receipt's status."""
    row = it.row
    needed = [o for o in it.canon if o in (*ENTITY_STEPS, *ACTIVITY_STEPS)]
    if all(row.steps.get(o) for o in needed) and not it.failed:
        row.state, row.delivered_at, row.last_error = "done", now, None
        activities = [o for o in needed if o in ACTIVITY_STEPS]
        if row.update_requested:
            summary.updated += 1
            return "updated"
        if activities and it.already >= set(activities):
            # Every activity of it was in the CRM already (logged from another store): nothing new.
            row.steps = {**row.steps, "already": True}
            summary.already += 1
            return "already"
        summary.created += 1
        return "created"
    if row.state != "failed" and row.attempts >= max_attempts:
        row.state = "failed"
    if row.state == "failed":
        summary.failed += 1
        return "failed"
    summary.requeued += 1
    return "queued"
