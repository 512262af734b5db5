"""Calls and tasks, exactly once: the CRM, not the store, says whether an activity was logged.

Each activity carries an idempotency marker. Rows are marked in flight (committed) before their
batch is sent, and rows still in flight, or (where the CRM does not keep markers unique) never
sent from this store, are looked up by marker before anything is sent. A write whose answer was
lost is not re-sent blind (``ItemResult.unconfirmed``): it is looked up by marker and sent again
only if it is not there, within the run (``confirm_rounds`` times at most).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from crmsync.http import deferring
from crmsync.model import utcnow
from crmsync.providers.base import ItemResult, Outgoing, OutgoingActivity
from crmsync.store.outbox import Outbox
from crmsync.sync.push.items import ENTITY_STEPS, Item
from crmsync.sync.push.lookups import batches
from crmsync.sync.push.receipts import PushSummary
from crmsync.sync.push.steps import LaneStep, parallel

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.providers.base import Provider
    from crmsync.store import CrmConnection


@dataclass(eq=False)
class ActivityStep(LaneStep):
    """One activity type (calls or tasks) of a lane; ``run`` takes the step (see the module docstring)."""

    outbox: Outbox = field(init=False)
    results: dict[str, ItemResult] = field(init=False, default_factory=dict)
    #: False when the caller commits the rows itself right after (a lane's last step: ``settle``).
    save: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.app.store)

    def marker(self, it: Item) -> str:
        """The idempotency marker of an outcome's call (its id) or task."""
        return it.row.outcome_id if self.obj == "calls" else f"{it.row.outcome_id}:task"

    def outgoing(self, it: Item) -> OutgoingActivity:
        return OutgoingActivity(
            ref=it.row.outcome_id,
            marker=self.marker(it),
            properties=self.mapping.to_provider(self.obj, it.canon[self.obj]),
            associations={a: it.row.steps[a] for a in ENTITY_STEPS if it.row.steps.get(a)},
        )

    def run(self, items: list[Item]) -> None:
        """Create (or update) the lane's activities of this type; never one the CRM already holds.

        Rows sent before without a recorded answer are asked for by marker before anything is
        sent; where the CRM does not refuse a second activity with the same marker
        (``Provider.unique_markers``), so are the outcomes this store has no record of having sent,
        but those whose contact this run created (nothing can be logged on a contact that did not
        exist). A refused marker (``exists``) or a lost answer (``unconfirmed``) is looked up, and
        what is not there is sent again, within this run.
        """
        obj = self.obj
        need = [it for it in items if not it.failed and obj in it.canon and obj not in it.row.steps]
        need = [it for it in need if it.row.steps.get("contacts")]
        if not need:
            return
        self._find_sent(need)
        todo = [it for it in need if it.row.outcome_id not in self.results]
        updates = [it for it in todo if it.row.update_requested and (it.row.steps.get("previous") or {}).get(obj)]
        self._create([it for it in todo if it not in updates])
        self._update(updates)
        self._record(need, updates)

    def _find_sent(self, need: list[Item]) -> None:
        """Look up, by marker, what may be logged already: in flight, or never sent from this store."""
        obj, provider = self.obj, self.provider
        ask = [
            it
            for it in need
            if it.row.in_flight.get(obj) or (obj not in provider.unique_markers and "contacts" not in it.created)
        ]
        if not ask:
            return
        found = provider.find_activities(
            obj, [self.marker(it) for it in ask], context=[self.outgoing(it) for it in ask]
        )
        for it in ask:
            if (rid := found.get(self.marker(it))) is not None:
                # Sent by this store before (a killed run): ours. Never sent from here: someone else's.
                ours = bool(it.row.in_flight.get(obj))
                self.results[it.row.outcome_id] = ItemResult(it.row.outcome_id, True, remote_id=rid, created=ours)

    def _create(self, creates: list[Item]) -> None:
        """Mark in flight (committed), send, and confirm what came back unsure, up to ``confirm_rounds``
        times: each batch on its own as soon as its answer is in, so that a batch left unsure in one
        rate window is not confirmed only after the lane's last batch, at the end of the push."""
        if creates:
            self._mark(creates)
            parallel(self.provider, self._send_batch, batches(creates, self.provider.batch_size))

    def _mark(self, items: list[Item]) -> None:
        """Mark these rows in flight, committed before their activities are sent."""
        now = utcnow().isoformat()
        for it in items:
            it.row.in_flight = {**it.row.in_flight, self.obj: now}
        self.outbox.save(it.row for it in items)

    def _send_batch(self, batch: list[Item]) -> list[ItemResult]:
        """One batch's creates, and its unsure ones confirmed and sent again (``_create``); the
        results are in ``self.results``."""
        for n in range(self.confirm_rounds):
            if n:
                self._mark(batch)
            acts = [self.outgoing(it) for it in batch]
            for sent in _deferred(self.provider.create_activities, self.obj, acts):
                self.results[sent.ref] = sent
            unsure = [it for it in batch if _unsure(self.results.get(it.row.outcome_id))]
            if not unsure:
                break
            batch = self._confirm(unsure)
            if not batch:
                break
        return []

    def _confirm(self, unsure: list[Item]) -> list[Item]:
        """Look up the unsure writes by marker; the ones not there, to be sent again."""
        markers, context = [self.marker(it) for it in unsure], [self.outgoing(it) for it in unsure]
        found = self.provider.find_activities(self.obj, markers, context=context)
        again = []
        for it in unsure:
            lost = self.results[it.row.outcome_id]
            if (rid := found.get(self.marker(it))) is not None:
                # After a lost answer, ours; refused as existing, someone else's.
                self.results[it.row.outcome_id] = ItemResult(
                    it.row.outcome_id, True, remote_id=rid, created=lost.unconfirmed
                )
            else:
                # Not there: the answer was lost before the write, or a whole batch was refused for
                # a neighbour's marker. Sent again (a CRM that refused it keeps refusing a real one).
                lost.retriable = True
                again.append(it)
        return again

    def _update(self, updates: list[Item]) -> None:
        """Outcomes sent again with --update: their activity written before is updated in place."""
        if not updates:
            return
        obj, provider = self.obj, self.provider
        outs = [
            Outgoing(
                ref=it.row.outcome_id,
                properties=self.mapping.to_provider(obj, it.canon[obj]),
                match={},
                remote_id=it.row.steps["previous"][obj],
            )
            for it in updates
        ]
        send = lambda b: _deferred(provider.upsert, obj, b)  # noqa: E731
        for r in parallel(provider, send, batches(outs, provider.batch_size)):
            self.results[r.ref] = r

    def _record(self, need: list[Item], updates: list[Item]) -> None:
        now = utcnow()
        for it in need:
            res = self.results.get(it.row.outcome_id)
            if res is not None and res.ok and res.remote_id:
                self._done(it, res, updated=it in updates)
            else:
                self._failed(it, res)
            it.row.updated_at = now
        if self.save:
            self.outbox.save(it.row for it in need)

    def _done(self, it: Item, res: ItemResult, *, updated: bool) -> None:
        obj = self.obj
        it.row.steps = {**it.row.steps, obj: res.remote_id}
        it.row.in_flight = {k: v for k, v in it.row.in_flight.items() if k != obj}
        if not res.created and not updated:
            it.already.add(obj)
        elif obj == "calls":
            self.summary.writes += 1  # a call this push wrote (one found logged by another store is not)

    def _failed(self, it: Item, res: ItemResult | None) -> None:
        obj = self.obj
        it.failed = True
        it.row.attempts += 1
        it.row.last_error = f"{obj}: {res.error if res else 'no result'}"
        if res is not None and not res.retriable:
            # The CRM answered no: nothing was created, so nothing is in flight.
            it.row.in_flight = {k: v for k, v in it.row.in_flight.items() if k != obj}
            it.row.state = "failed"


def _unsure(r: ItemResult | None) -> bool:
    """A create refused as existing, or whose answer was lost: to be looked up before anything more."""
    return r is not None and (r.exists or r.unconfirmed) and not r.ok


def _deferred(fn: Callable[[str, list[Any]], list[ItemResult]], obj: str, batch: list[Any]) -> list[ItemResult]:
    """An activity write: it takes a rate-limit turn only when no entity write waits for one (``deferring``)."""
    with deferring():
        return fn(obj, batch)


def activity_step(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    obj: str,
    items: list[Item],
    summary: PushSummary,
    *,
    confirm_rounds: int,
    save: bool = True,
) -> None:
    """Take one activity step of a lane (``ActivityStep.run``); ``save=False``: its results are
    committed by the caller (until then the rows' in-flight marks stand for them)."""
    ActivityStep(app, conn, provider, mapping, obj, summary, confirm_rounds=confirm_rounds, save=save).run(items)
