"""Walks split by ``hs_object_id`` (``providers.partitions``).

A first walk at a search limit one keyset chain keeps busy: the list chain upwards from the lowest id
and one keyset search downwards from the highest, meeting wherever they meet (``_frontier_walk``); at a
raised search limit, the list chain below and search ranges above, sized to finish together. A large
incremental pull: the list chain upwards from the lowest id (keeping what changed in the window) and a
keyset search downwards from the highest (modified-since filter), meeting wherever they meet. Where
several objects walk at once, their search sides share the search budget as ``shares`` says.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from crmsync.providers import partitions
from crmsync.providers.base import Page, RemoteRecord
from crmsync.providers.hubspot.pages import HubSpotPages
from crmsync.providers.hubspot.values import (
    ASSOC_AHEAD,
    LIST_PAGE,
    MAX_SEARCH_RANGES,
    PARTITION_MIN,
    PULL_ASSOCIATIONS,
    PULL_LIST_TRIAL,
    PULL_MODE,
    PULL_PARTITION_MIN,
    PULL_PARTITION_SHARE,
    PULL_RTT_CAP,
    SEARCH_PAGE,
    _prop_ms,
    modified_prop,
)

#: The plan kind of a first walk whose list and search sides meet in the middle.
FRONTIER = "frontier"
#: Searches a second one keyset chain keeps busy at HubSpot's round trip; above it a first walk keeps the
#: planned split, whose several ranges can use a raised search limit.
FRONTIER_MAX_RPS = 6.0
HOLD_POLL = 0.02  # seconds a search side held back for a cheaper object's (``shares``) looks again
#: A pull's modification window: (from, "GT" or "GTE" for it, up to and including).
Window = tuple[int, str, int]


class _Frontier:
    """Where a pull's list walk (upwards) and search walk (downwards) meet, claimed under one lock.

    Ids up to ``floor`` are the list's, ids from ``ceiling`` up the search's; each side keeps only
    ids the other has not claimed, so the two read disjoint records however their speeds differ.
    """

    def __init__(self, floor: int, ceiling: int | None, seen: frozenset[str] = frozenset()) -> None:
        self.floor = floor  # the highest id the list walk has covered (-1: none yet)
        self.ceiling = ceiling  # the lowest id the search walk has covered (None: none yet)
        self.seen = seen  # ids the pull's first page holds: covered, but neither side's to hand over
        self.listed_all = False  # the list walk read up to the last id: nothing is left for search
        self._lock = threading.Lock()

    def met(self) -> bool:
        with self._lock:
            return self.listed_all or (self.ceiling is not None and self.ceiling <= self.floor + 1)

    def claim_low(self, ids: list[int], *, exhausted: bool) -> tuple[set[int], int, bool]:
        """A list page's ids (ascending): those below the search's claim, the new floor, whether it ends."""
        with self._lock:
            top = self.ceiling
            kept = {i for i in ids if top is None or i < top}
            if kept:
                self.floor = max(self.floor, *kept)
            if top is not None and len(kept) < len(ids):
                self.floor = max(self.floor, top - 1)  # the list read every id below the search's claim
            self.listed_all = self.listed_all or (exhausted and top is None)
            return kept, self.floor, exhausted or len(kept) < len(ids)

    def claim_high(self, ids: list[int], *, exhausted: bool) -> tuple[set[int], int, bool]:
        """A search page's ids (descending): those above the list's claim, the new ceiling, whether it ends."""
        with self._lock:
            kept = {i for i in ids if i > self.floor}
            end = exhausted or len(kept) < len(ids)
            # At its end the search has read every change down to the list's floor: it claims all of it.
            new = self.floor + 1 if end else min(kept)
            self.ceiling = new if self.ceiling is None else min(self.ceiling, new)
            return kept, self.ceiling, end


def _side_by_side(
    parts: Mapping[str, partitions.PartitionFn],
    plan: dict[str, Any],
    *,
    name: str,
    extra: Mapping[str, Any],
    total: Callable[[], int | None],
) -> Generator[Page, None, tuple[dict[str, dict[str, Any]], int]]:
    """The parts' pages side by side (``partitions.interleave``), each with the walk's ``total``; returns
    the parts' final states and the newest modification any of them read (0: none), for the hand-over."""
    final: dict[str, Any] | None = plan
    for page in partitions.interleave(parts, plan, depth=2, name=name, extra=extra):
        page.total = total()
        yield page
        final = page.cursor
    states = partitions.parse(final)
    return states, max([0, *(int((s["at"] or {}).get("newest", 0)) for s in states.values())])


class HubSpotPartitioned(HubSpotPages):
    """A first walk whose id space is split between the list chain and search ranges."""

    def _plan_partitions(self, obj: str, run_start: int) -> dict[str, Any] | None:
        """Split a first walk's id space: the list chain reads the lowest ids, search ranges the rest.

        Two one-record searches (lowest and highest ``hs_object_id``, side by side) tell the span,
        the count and the round trip; below PARTITION_MIN records the plain list walk is cheaper.
        Each side gets the share of ids it reads in the same time: the list is one chain of pages of
        100 on the general budget (less the association reads that search pages need); the search
        ranges, enough of them to keep the search budget busy, read pages of 200.
        """

        def edge(sort: str) -> dict[str, Any]:
            return self._search(obj, [], sort, ["hs_object_id"], 0, limit=1)

        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"plan-{obj}") as pool:
            low_f, high_f = pool.submit(edge, "hs_object_id"), pool.submit(edge, "-hs_object_id")
            low, high = low_f.result(), high_f.result()
        rtt = min(max(time.monotonic() - began, 0.01), 2.0)
        total = int(high.get("total") or 0)
        if total < PARTITION_MIN or not low.get("results") or not high.get("results"):
            return None
        lo, hi = int(low["results"][0]["id"]), int(high["results"][0]["id"])
        ranges_n = min(MAX_SEARCH_RANGES, max(1, math.ceil(self._search_rps * rtt) + 1))
        search_rate = min(ranges_n / rtt, self._search_rps)  # search pages per second
        assoc_rate = search_rate * SEARCH_PAGE / self._assoc_batch * len(PULL_ASSOCIATIONS.get(obj, []))
        list_rate = max(0.1, min(1 / rtt, self._general_rps - assoc_rate))  # list pages per second
        list_share = (LIST_PAGE * list_rate) / (LIST_PAGE * list_rate + SEARCH_PAGE * search_rate)
        span = hi - lo + 1
        below = lo + max(1, round(span * list_share))
        step = max(1, math.ceil((hi + 1 - below) / ranges_n))
        ranges = [[a, min(a + step - 1, hi)] for a in range(below, hi + 1, step)]
        if not ranges:
            return None
        return {"mode": "partitioned", "started": run_start, "list_below": below, "ranges": ranges, "total": total}

    def _plan_walk(self, obj: str, run_start: int) -> dict[str, Any] | None:
        """A first walk that meets in the middle, where one search chain can take the whole search budget.

        The list chain reads upwards from the lowest id and one keyset search chain downwards from
        the highest, both from the first moment, until they meet: no planning round trip, and both
        end together whatever the budgets and round trips turn out to be. A search limit so high
        that one chain would leave most of it idle keeps the planned split (several ranges).
        """
        if self._search_rps > FRONTIER_MAX_RPS:
            return None
        return {"mode": "partitioned", "kind": FRONTIER, "started": run_start}

    def _frontier_walk(self, obj: str, plan: dict[str, Any], fields: Sequence[str]) -> Iterator[Page]:
        """The list walk upwards and the search walk downwards side by side (``partitions.interleave``).

        The cursor holds each side's position as of the pages stored, so a kill resumes each where
        its last stored page left it. The hand-over is as ``_partitioned``'s: the newest modification
        read, never later than the start, so a resumed walk ends on the same cursor.
        """
        started = plan.get("started")
        states = partitions.parse(plan)
        low = (states.get("list") or {}).get("at") or {}
        high = (states.get("search") or {}).get("at") or {}
        floor, ceiling = low.get("floor", -1), high.get("ceiling")
        if not all(isinstance(v, int) for v in (started, floor, ceiling if ceiling is not None else 0)):
            # Not a plan this code wrote: walk again from the start (what is stored is read again, unchanged).
            plan, started, floor, ceiling, states = {}, int(time.time() * 1000), -1, None, {}
        assert isinstance(started, int) and isinstance(floor, int)
        frontier = _Frontier(floor, ceiling)
        told: dict[str, Any] = {}
        parts: dict[str, partitions.PartitionFn] = {
            "list": functools.partial(self._list_up, obj, fields, None, frontier),
            "search": functools.partial(self._search_down, obj, fields, None, frontier, told=told),
        }
        extra = {"mode": "partitioned", "kind": FRONTIER, "started": started}
        states, newest = yield from _side_by_side(
            parts, plan, name=f"partition-{obj}", extra=extra, total=lambda: told.get("total") or None
        )
        handover = min(started, newest) if newest else started
        cursor: dict[str, Any] = {"mode": "search", "ts": handover, "archived_ts": handover}
        if ((states.get("search") or {}).get("at") or {}).get("ceiling") is None:
            # The list read every record (a small walk): as ``_list_phase`` hands over, nothing to look back for.
            cursor.update(listed=True, after_ts=bool(newest) and newest < started)
        yield Page(records=[], cursor=cursor)

    def _partitioned(self, obj: str, plan: dict[str, Any], fields: Sequence[str]) -> Iterator[Page]:
        """The list walk below ``list_below`` and each search range side by side (``partitions``).

        Each page carries every partition's position as of the pages handed over so far, so a kill
        resumes each range after its last stored page; the ranges are disjoint, so no record is
        read twice. Records created or changed after the walk began (and any the search index had
        not caught up with) are the next pull's: the hand-over cursor starts at the walk's start,
        without the list's "listed" flag, so that pull looks back for index lag as every search does.
        """
        started = int(plan["started"])
        below = int(plan["list_below"])
        ranges = [(int(a), int(b)) for a, b in plan["ranges"]]
        extra = {k: plan[k] for k in ("mode", "started", "list_below", "ranges", "total")}
        parts: dict[str, partitions.PartitionFn] = {"list": functools.partial(self._list_below, obj, fields, below)}
        for i, (a, b) in enumerate(ranges):
            parts[f"search{i}"] = functools.partial(self._id_range, obj, fields, a, b)
        total = int(plan.get("total") or 0) or None
        _, newest = yield from _side_by_side(parts, plan, name=f"partition-{obj}", extra=extra, total=lambda: total)
        # The newest modification read, never later than the start: derived from the data, so a
        # resumed walk hands over at the same point as an uninterrupted one.
        handover = min(started, newest) if newest else started
        yield Page(records=[], cursor={"mode": "search", "ts": handover, "archived_ts": handover})

    def _list_below(self, obj: str, fields: Sequence[str], below: int, at: Any) -> Iterator[Page]:
        """The list walk from its start (or the ``after`` it stopped at) up to id ``below``."""
        if at is not None and not at.get("after"):
            return  # its last page was stored, its end not yet: nothing left to read
        after = (at or {}).get("after")
        newest = int((at or {}).get("newest", 0))
        prop = modified_prop(obj)
        while True:
            body = self._list(obj, fields, after=after)
            raws = body.get("results", [])
            records = [self._record(obj, r) for r in raws if int(r["id"]) < below]
            newest = max([newest, *(_prop_ms(r, prop) or 0 for r in records)])
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if len(records) < len(raws) or not after:
                if records:
                    yield Page(records=records, cursor={"after": after, "newest": newest})
                return
            yield Page(records=records, cursor={"after": after, "newest": newest})

    def _id_range(self, obj: str, fields: Sequence[str], lo: int, hi: int, at: Any) -> Iterator[Page]:
        """Ids ``lo``..``hi`` through search, keyset-paged by id (so the 10,000-result cap never binds).

        Each search needs only the previous page's last id, so the searches form the range's only
        chain; the associations of up to ASSOC_BATCH ids (five pages) are read in one request
        beside it, which leaves the general budget to the list walk.
        """
        last = int(at["last"]) if at else lo - 1
        newest = int((at or {}).get("newest", 0))
        prop = modified_prop(obj)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"assoc-{obj}")
        pending: tuple[Future[list[RemoteRecord]], dict[str, Any]] | None = None
        batch: list[RemoteRecord] = []
        try:
            while True:
                filters = [
                    {"propertyName": "hs_object_id", "operator": "GT", "value": str(last)},
                    {"propertyName": "hs_object_id", "operator": "LTE", "value": str(hi)},
                ]
                body = self._search(obj, [filters], "hs_object_id", fields, 0)
                records = [self._record(obj, r) for r in body.get("results", [])]
                if records:
                    last = max(int(r.id) for r in records)
                    newest = max([newest, *(_prop_ms(r, prop) or 0 for r in records)])
                    batch.extend(records)
                end = not records or not ((body.get("paging") or {}).get("next") or {}).get("after")
                if pending is not None and (pending[0].done() or (batch and (end or len(batch) >= self._assoc_batch))):
                    yield Page(records=pending[0].result(), cursor=pending[1])
                    pending = None
                if batch and (end or len(batch) >= self._assoc_batch):
                    pending = (pool.submit(self._with_associations, obj, batch), {"last": last, "newest": newest})
                    batch = []
                if end:
                    break
            if pending is not None:
                yield Page(records=pending[0].result(), cursor=pending[1])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- a large incremental pull --------------------------------------------------------------
    def _plan_pull(
        self, obj: str, first: dict[str, Any], *, rtt: float, ts: int, op: str, upper: int, archived_ts: int
    ) -> dict[str, Any] | None:
        """A partitioned pull's plan when the search walk's first answer shows many changes, else None.

        ``first`` is the walk's own first page (its ``total`` is the change count) and ``rtt`` its
        round trip, so the decision asks nothing the walk would not ask. The search side is one
        keyset chain: where the search limit is so high that one chain would leave most of it idle
        (a raised limit), the offset walk (several pages in flight) stays faster.
        """
        changed = int(first.get("total") or 0)
        if changed < PULL_PARTITION_MIN or not ((first.get("paging") or {}).get("next") or {}).get("after"):
            return None
        # One chain makes 1/rtt searches a second; it must reach two thirds of the limit. The round
        # trip counts at most PULL_RTT_CAP, so one slow first answer does not decide it.
        if min(rtt, PULL_RTT_CAP) * self._search_rps > 1.5:
            return None
        prop = modified_prop(obj)
        records = [self._record(obj, r) for r in first.get("results", [])]
        newest = max([ts, *(min(_prop_ms(r, prop) or ts, upper) for r in records)])
        return {
            "mode": PULL_MODE,
            "ts": ts,
            "op": op,
            "upper": upper,
            "archived_ts": archived_ts,
            "total": changed,
            "seen": [r.id for r in records],
            "seen_newest": newest,
        }

    def _partitioned_pull(
        self, obj: str, plan: dict[str, Any], fields: Sequence[str], first: dict[str, Any] | None = None
    ) -> Iterator[Page]:
        """The list walk upwards and the search walk downwards side by side (``partitions.interleave``).

        Neither side is sized in advance: they meet wherever their budgets take them, so both end
        together however the changes spread over the ids and however the budgets are shared with
        other objects' walks. The last page hands over to the cursor the one search walk would have
        reached: the newest modification read (within the window), so a resumed pull ends on it too.
        The plan's first page (the search walk's, which decided the plan) is a partition of its own:
        ``first`` is its answer, read again by id only if a resumed pull has not stored it yet.
        """
        window: Window = (int(plan["ts"]), str(plan["op"]), int(plan["upper"]))
        keys = ("mode", "ts", "op", "upper", "archived_ts", "total", "seen", "seen_newest")
        extra = {k: plan[k] for k in keys if k in plan}
        states = partitions.parse(plan)
        low = (states.get("list") or {}).get("at") or {}
        high = (states.get("search") or {}).get("at") or {}
        ceiling = high.get("ceiling")
        seen = [str(i) for i in plan.get("seen") or []]
        frontier = _Frontier(int(low.get("floor", -1)), None if ceiling is None else int(ceiling), frozenset(seen))
        parts: dict[str, partitions.PartitionFn] = {
            "list": functools.partial(self._list_up, obj, fields, window, frontier),
            "search": functools.partial(self._search_down, obj, fields, window, frontier),
        }
        if seen:
            newest = int(plan.get("seen_newest") or window[0])
            parts["first"] = functools.partial(self._first_page, obj, fields, seen, newest, first)
        total = int(plan.get("total") or 0) or None
        _, read = yield from _side_by_side(parts, plan, name=f"pull-{obj}", extra=extra, total=lambda: total)
        newest = max(window[0], read)
        yield Page(
            records=[],
            cursor={"mode": "search", "archived_ts": plan["archived_ts"], "hi": window[2], "ts": newest},
            total=total,
        )

    def _first_page(
        self, obj: str, fields: Sequence[str], ids: list[str], newest: int, first: dict[str, Any] | None, at: Any
    ) -> Iterator[Page]:
        """The records of the plan's first page, with their associations (by id if the answer is gone)."""
        if (at or {}).get("end"):
            return
        if first is not None:
            records = self._with_associations(obj, [self._record(obj, r) for r in first.get("results", [])])
        else:
            records = self.fetch(obj, ids, fields=fields)
        yield Page(records=records, cursor={"end": True, "newest": newest})

    def _in_window(self, record: RemoteRecord, prop: str, window: Window | None) -> int | None:
        """The record's modification time if the pull's window holds it (as the search filter would), else None.

        No window (a first walk): every record is kept, its time 0 when it has none.
        """
        stamp = _prop_ms(record, prop)
        if window is None:
            return stamp or 0
        since, op, upper = window
        if stamp is None or stamp > upper or stamp < since or (op == "GT" and stamp == since):
            return None
        return stamp

    def _list_up(
        self, obj: str, fields: Sequence[str], window: Window | None, frontier: _Frontier, at: Any
    ) -> Iterator[Page]:
        """The list walk from the lowest id up to the search's claim, keeping the records changed in the window."""
        at = at or {}
        if at.get("end"):
            return
        after, newest = at.get("after"), int(at.get("newest", 0))
        pages, read, changed = int(at.get("pages", 0)), int(at.get("read", 0)), int(at.get("changed", 0))
        shares = self._shares
        shares.start(obj, "list")
        try:
            yield from self._list_pages(obj, fields, window, frontier, after, newest, pages, read, changed)
        finally:
            shares.stop(obj, "list")

    def _list_pages(
        self,
        obj: str,
        fields: Sequence[str],
        window: Window | None,
        frontier: _Frontier,
        after: Any,
        newest: int,
        pages: int,
        read: int,
        changed: int,
    ) -> Iterator[Page]:
        """``_list_up``'s pages, from its position ``after``."""
        prop = modified_prop(obj)
        while not frontier.met():
            body = self._list(obj, fields, after=after)
            raws = body.get("results", [])
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            kept, floor, end = frontier.claim_low([int(r["id"]) for r in raws], exhausted=not after)
            records = []
            found = 0  # changes in the window, the plan's first page's included (they are changes here too)
            for raw in raws:
                if int(raw["id"]) in kept:
                    rec = self._record(obj, raw)
                    stamp = self._in_window(rec, prop, window)
                    if stamp is not None:
                        found += 1
                        if rec.id not in frontier.seen:
                            records.append(rec)
                            newest = max(newest, stamp)
            pages, read, changed = pages + 1, read + len(kept), changed + found
            # Mostly unchanged records here: the list stops, and the search reads down to its floor.
            end = end or (pages >= PULL_LIST_TRIAL and changed < PULL_PARTITION_SHARE * read)
            cursor = {"after": after, "floor": floor, "newest": newest, "end": end}
            yield Page(records=records, cursor={**cursor, "pages": pages, "read": read, "changed": changed})
            if end:
                return

    def _search_down(
        self,
        obj: str,
        fields: Sequence[str],
        window: Window | None,
        frontier: _Frontier,
        at: Any,
        *,
        told: dict[str, Any] | None = None,
    ) -> Iterator[Page]:
        """The changes in the window, keyset-paged by id downwards (the 10,000-result cap never binds).

        No window (a first walk): every record. ``told`` receives the first answer's ``total``; a
        first walk of fewer than PARTITION_MIN records leaves them all to the list side.
        """
        at = at or {}
        if at.get("end"):
            return
        since, op, upper = window if window is not None else (0, "GTE", 0)
        prop = modified_prop(obj)

        shares = self._shares

        def pages() -> Iterator[tuple[list[RemoteRecord], dict[str, Any], bool]]:
            shares.start(obj, "search")
            try:
                yield from walk()
            finally:
                shares.stop(obj, "search")

        def walk() -> Iterator[tuple[list[RemoteRecord], dict[str, Any], bool]]:
            ceiling, newest = at.get("ceiling"), int(at.get("newest", 0))
            while not frontier.met():
                while shares.hold_search(obj) and not frontier.met():
                    time.sleep(HOLD_POLL)  # a search that costs fewer association reads has the turns
                if frontier.met():
                    break
                filters = []
                if window is not None:
                    filters = [
                        {"propertyName": prop, "operator": op, "value": str(since)},
                        {"propertyName": prop, "operator": "LTE", "value": str(upper)},
                    ]
                if ceiling is not None:
                    filters.append({"propertyName": "hs_object_id", "operator": "LT", "value": str(ceiling)})
                body = self._search(obj, [filters] if filters else [], "-hs_object_id", fields, 0)
                if told is not None and "total" not in told:
                    told["total"] = int(body.get("total") or 0)
                    if window is None and ceiling is None and told["total"] < PARTITION_MIN:
                        return  # a small first walk: one list chain reads it, this answer unused
                raws = body.get("results", [])
                more = bool(raws) and bool(((body.get("paging") or {}).get("next") or {}).get("after"))
                kept, ceiling, end = frontier.claim_high([int(r["id"]) for r in raws], exhausted=not more)
                records = [
                    self._record(obj, r) for r in raws if int(r["id"]) in kept and str(r["id"]) not in frontier.seen
                ]
                if window is None:
                    newest = max([newest, *(_prop_ms(r, prop) or 0 for r in records)])
                else:
                    newest = max([newest, *(min(_prop_ms(r, prop) or since, upper) for r in records)])
                yield records, {"ceiling": ceiling, "newest": newest, "end": end}, end
                if end:
                    return

        yield from self._associated(obj, pages())

    def _associated(self, obj: str, pages: Iterator[tuple[list[RemoteRecord], dict[str, Any], bool]]) -> Iterator[Page]:
        """Search pages with their associations, read beside the next searches.

        Up to ``_assoc_batch`` ids go in one association read, and up to ASSOC_AHEAD reads may wait
        for the general budget (which the list side may have used up for a while) while the search
        chain goes on. Pages come out in order, each with the cursor of the last search whose
        records it holds, so the cursor never runs ahead of what is stored. A chain may stop
        without an end page (the list side met it between two searches): the records it claimed
        and still holds go out all the same, or no side would read them again.
        """
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"assoc-{obj}")
        pending: deque[tuple[Future[list[RemoteRecord]], dict[str, Any]]] = deque()
        batch: list[RemoteRecord] = []
        last: dict[str, Any] | None = None  # the cursor of the last search whose records are in ``batch``
        try:
            for records, cursor, end in pages:
                batch.extend(records)
                last = cursor
                while pending and pending[0][0].done():
                    done, at = pending.popleft()
                    yield Page(records=done.result(), cursor=at)
                if end or len(batch) >= self._assoc_batch:
                    while len(pending) >= ASSOC_AHEAD:
                        done, at = pending.popleft()
                        yield Page(records=done.result(), cursor=at)
                    pending.append((pool.submit(self._with_associations, obj, batch), cursor))
                    batch, last = [], None
            if last is not None:  # the chain stopped where the list met it, not on an end page
                pending.append((pool.submit(self._with_associations, obj, batch), last))
            while pending:
                done, at = pending.popleft()
                yield Page(records=done.result(), cursor=at)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
