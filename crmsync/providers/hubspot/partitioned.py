"""A first walk split by ``hs_object_id``: the list chain below, search ranges above (``providers.partitions``)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from crmsync.providers import partitions
from crmsync.providers.base import Page, RemoteRecord
from crmsync.providers.hubspot.pages import HubSpotPages
from crmsync.providers.hubspot.values import (
    LIST_PAGE,
    MAX_SEARCH_RANGES,
    PARTITION_MIN,
    PULL_ASSOCIATIONS,
    SEARCH_PAGE,
    _prop_ms,
    modified_prop,
)


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
        final: dict[str, Any] | None = plan
        for page in partitions.interleave(parts, plan, depth=2, name=f"partition-{obj}", extra=extra):
            page.total = total
            yield page
            final = page.cursor
        states = partitions.parse(final)
        newest = max([0, *(int((s["at"] or {}).get("newest", 0)) for s in states.values())])
        # The newest modification read, never later than the start: derived from the data, so a
        # resumed walk hands over at the same point as an uninterrupted one.
        handover = min(started, newest) if newest else started
        yield Page(records=[], cursor={"mode": "search", "ts": handover, "archived_ts": handover})

    def _list_below(self, obj: str, fields: Sequence[str], below: int, at: Any) -> Iterator[Page]:
        """The list walk from its start (or the ``after`` it stopped at) up to id ``below``."""
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
