"""Delivery: every pending outbox row of a connection, one round of claimed rows at a time.

On SQLite one push per connection runs at a time (the run lock). On PostgreSQL pushes run
concurrently (workers on several hosts): each leases rounds of pending rows (``SELECT … FOR
UPDATE SKIP LOCKED``, then ``claimed_by``/``claimed_at``), so no two deliver the same row. A claim
is taken over at once when its run's session has ended (a killed worker), or when its lease,
renewed after every step, is ``PushSettings.lease`` old (a hung one).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from crmsync.store.outbox import Outbox, OutboxRow
from crmsync.sync.push.items import Item, ParsedOutcome, parse_row
from crmsync.sync.push.lanes import Lane, LaneLookups, run_lanes, split_lanes
from crmsync.sync.push.lookups import Prefetched
from crmsync.sync.push.owners import Owners
from crmsync.sync.push.receipts import PushSummary, Receipt, ReceiptSink
from crmsync.sync.push.settings import DEFAULT, PushSettings

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.providers.base import Provider
    from crmsync.store import CrmConnection


def deliver(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    summary: PushSummary,
    *,
    sink: ReceiptSink | None = None,
    progress: Callable[[int, int], None] | None = None,
    parsed: dict[str, ParsedOutcome] | None = None,
    prepared: dict[str, Future[None]] | None = None,
    prefetched: dict[str, Prefetched] | None = None,
    owners: Owners | None = None,
    settings: PushSettings = DEFAULT,
) -> None:
    """Deliver every pending outbox item of a connection, one round of rows at a time.

    A round is split into lanes that share no record (``split_lanes``), which run side by side,
    each waiting only for its own lookups (``LaneLookups``). The next round's lookups queue behind
    this round's. All of this needs one store connection per thread (not an in-memory store); the
    next round's lookups also need the next rows to stay ours (not when workers share the outbox).

    ``parsed``: outcomes just queued, already parsed (see ``enqueue``). ``prepared``: object -> its
    ``prepare_objects`` future, started while they were queued (see ``Warmup``); the first round
    waits for them and prepares any other object it holds before its first write. ``prefetched``:
    lookups of the queued outcomes' records already under way (``Prefetch``).
    """
    rounds = _Rounds(app, conn, provider, mapping, summary, sink=sink, settings=settings)
    rounds.parsed = parsed or {}
    rounds.gates = prepared or {}
    rounds.owners = owners or Owners(provider, strict=False)
    with contextlib.closing(
        LaneLookups(app, conn, provider, mapping, threads=rounds.threads, prefetched=prefetched)
    ) as lookups:
        rounds.run(lookups, progress)


class _Rounds:
    """One delivery's rounds (see ``deliver``)."""

    def __init__(
        self,
        app: App,
        conn: CrmConnection,
        provider: Provider,
        mapping: Mapping,
        summary: PushSummary,
        *,
        sink: ReceiptSink | None,
        settings: PushSettings,
    ) -> None:
        self.app, self.conn, self.provider, self.mapping, self.summary = app, conn, provider, mapping, summary
        self.sink, self.settings = sink, settings
        self.outbox = Outbox(app.store)
        self.shared = self.outbox.shared
        self.threads = app.store.concurrent_writers
        self.parsed: dict[str, ParsedOutcome] = {}
        self.gates: dict[str, Future[None]] = {}
        self.owners = Owners(provider, strict=False)
        self.ready = False  # the first round's objects prepared
        #: The next round's rows (their ids) and lanes, their lookups started during this round.
        self.ahead: tuple[list[int], list[Lane]] | None = None

    def run(self, lookups: LaneLookups, progress: Callable[[int, int], None] | None) -> None:
        name = self.conn.name
        last_id = done = 0
        total = self.outbox.count_pending(name)
        with _claim_owner(self.app, self.shared) as owner, contextlib.closing(lookups):
            while True:
                if self.ahead is not None:
                    # What the look-ahead parsed is not read and parsed again, whatever the claim returns.
                    self.parsed = {
                        it.row.outcome_id: (it.occurred_at, it.canon) for lane, _ in self.ahead[1] for it in lane
                    }
                rows = self._claim(last_id, owner)
                if not rows:
                    break
                last_id = rows[-1].id or last_id
                done += self._round(rows, lookups, owner, last_id)
                if progress:
                    progress(done, total)
        self.summary.pending = self.outbox.count_pending(name)

    def _claim(self, last_id: int, owner: str) -> list[OutboxRow]:
        s = self.settings
        if not self.shared:
            return self.outbox.claim(
                self.conn.name, last_id, owner, limit=s.round_size, lease=s.lease, have=set(self.parsed)
            )
        from crmsync.store.locks import dead_owners

        return self.outbox.claim(
            self.conn.name,
            last_id,
            owner,
            limit=s.shared_round_size,
            lease=s.lease,
            dead_owners=dead_owners,
            have=set(self.parsed),
        )

    def _round(self, rows: list[OutboxRow], lookups: LaneLookups, owner: str, last_id: int) -> int:
        """Deliver one round of claimed rows; how many outcomes it held."""
        items: list[Item] = []
        receipts: dict[str | None, Receipt] = {}  # of the lanes that closed their outcomes
        finished = False
        try:
            items, lanes = self._lanes(rows, lookups)
            self.owners.apply(items, self.summary)
            self.parsed.clear()  # this round's only (the first time the caller's dict: not kept alive by it)
            self.ahead = None
            if self.threads and not self.shared:
                upcoming = self.outbox.peek(self.conn.name, last_id, self.settings.round_size)
                if upcoming:
                    nxt = [parse_row(r) for r in upcoming]
                    self.ahead = (
                        [r.id for r in upcoming],
                        lookups.start(split_lanes(nxt, lane_size=self.settings.lane_size)),
                    )
            run_lanes(
                self.app,
                self.conn,
                self.provider,
                self.mapping,
                lanes,
                self.summary,
                owner if self.shared else None,
                receipts,
                settings=self.settings,
            )
            finished = True
        finally:
            if not finished:
                # Stopped mid-round (CRM down, interrupted): hand the rows back at once; their
                # steps and in-flight marks are kept for whoever takes them next (rows a lane
                # closed before the stop are no longer ours to hand back).
                with contextlib.suppress(Exception):
                    self.outbox.release([r.id for r in rows], owner)
            self._receipts(items, receipts, finished=finished)
        return len(items)

    def _lanes(self, rows: list[OutboxRow], lookups: LaneLookups) -> tuple[list[Item], list[Lane]]:
        """The round's items in lanes, their lookups started (by the look-ahead if it has these rows)."""
        if self.ahead is not None and self.ahead[0] == [r.id for r in rows]:
            # The same rows, read again: the claimed row objects are the ones to save.
            fresh = {r.id: r for r in rows}
            lanes = self.ahead[1]
            for lane, _ in lanes:
                for it in lane:
                    it.row = fresh[it.row.id]
            return [it for lane, _ in lanes for it in lane], lanes
        items = [parse_row(row, self.parsed) for row in rows]
        if not self.ready:
            self._prepare(items)
        return items, lookups.start(split_lanes(items, split=self.threads, lane_size=self.settings.lane_size))

    def _prepare(self, items: list[Item]) -> None:
        """Before any write: a CRM that lacks what push relies on fails the run here."""
        for gate in self.gates.values():
            gate.result()
        if objects := sorted({o for it in items for o in it.canon} - set(self.gates)):
            self.provider.prepare_objects(objects)
        self.ready = True

    def _receipts(self, items: list[Item], receipts: dict[str | None, Receipt], *, finished: bool) -> None:
        """In the round's order, whichever lane closed first; after a stop, those closed (and a
        failing sink then does not replace the error that stopped the round)."""
        if not (self.sink and receipts):
            return
        closed = [r for it in items if (r := receipts.get(it.row.outcome_id)) is not None]
        with contextlib.nullcontext() if finished else contextlib.suppress(Exception):
            for r in closed:
                self.sink(r)


def _claim_owner(app: App, shared: bool) -> contextlib.AbstractContextManager[str]:
    """This run's name on its claims; on PostgreSQL one that dies with the run (see scaleout)."""
    if shared:
        from crmsync.store.locks import claim_owner

        return claim_owner(app.store)
    return contextlib.nullcontext(f"0:{socket.gethostname()}:{os.getpid()}")
