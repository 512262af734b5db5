"""Reading records: ``changes`` (list, search and archived phases), ``fetch``, ``list_ids``, ``lookup``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

from crmsync.providers.base import Page, RemoteRecord, chunks, match_key
from crmsync.providers.hubspot.partitioned import FRONTIER, HubSpotPartitioned
from crmsync.providers.hubspot.values import (
    BATCH,
    COMPANY_KEY,
    DEAL_KEY,
    IN_MAX,
    LIST_PAGE,
    MARKER,
    PULL_MODE,
    SEARCH_CAP,
    SEARCH_GROUPS,
    SEARCH_PAGE,
    _prop_ms,
    modified_prop,
    parse_ts,
    to_ms,
)

#: Times one walk searches again after its window shrank under it; past that the next pull's look-back
#: is the safety net (a portal edited faster than it can be read).
MAX_SHRINKS = 8


class HubSpotReads(HubSpotPartitioned):
    """The read path: ``changes`` and the reads by id or key."""

    def changes(
        self,
        obj: str,
        cursor: dict[str, Any] | None,
        *,
        fields: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Page]:
        fields = sorted({*fields, modified_prop(obj), "hs_object_id"})
        if obj == "calls" and MARKER not in self._properties("calls"):
            return  # crmsync never logged a call here: nothing of ours to pull
        run_start = to_ms(until) if until else int(time.time() * 1000)
        cursor = dict(cursor or {})
        if not cursor and since is not None:
            cursor = {"mode": "search", "ts": to_ms(since), "archived_ts": to_ms(since), "after_ts": False}
        if cursor.get("mode") == "partitioned" or (cursor.get("mode") is None and not self._marker_filter(obj)):
            plan = (
                cursor
                if cursor.get("mode") == "partitioned"
                else self._plan_walk(obj, run_start) or self._plan_partitions(obj, run_start)
            )
            if plan is not None and plan.get("kind") == FRONTIER:
                yield from self._frontier_walk(obj, plan, fields)
                return
            if plan is not None:
                yield from self._partitioned(obj, plan, fields)
                return
        if cursor.get("mode") in (None, "list") and not self._marker_filter(obj):
            yield from self._list_phase(obj, cursor, fields, run_start)
            return
        if cursor.get("mode") is None:
            cursor = {"mode": "search", "ts": 0}
        last = cursor
        # The first page of archived records is read while the search walk runs, not after it (a
        # round trip off the end of every pull). A record archived meanwhile is newer than any it
        # holds, so the next pull finds it, as it finds one archived after a later read.
        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"archived-{obj}")
        try:
            first = ahead.submit(self._list, obj, fields, after=None, archived=True)
            for page in self._search_phase(obj, cursor, fields, run_start):
                last = page.cursor or last
                yield page
            yield from self._archived_phase(obj, last, fields, first=first)
        finally:
            ahead.shutdown(wait=False, cancel_futures=True)

    def _list_phase(self, obj: str, cursor: dict[str, Any], fields: Sequence[str], run_start: int) -> Iterator[Page]:
        """First run: the list endpoint has no 10k cap. Then hand over to search.

        The hand-over point is the newest modification seen, but never later than the moment the
        list began: whatever changed after that is found again by search. Deriving it from the
        data (not the clock) makes a resumed run end on the same cursor as an uninterrupted one.
        """
        started = int(cursor.get("started", run_start))
        newest = int(cursor.get("newest", 0))
        after = cursor.get("after")
        prop = modified_prop(obj)
        while True:
            body = self._list(obj, fields, after=after)
            records = [self._record(obj, r) for r in body.get("results", [])]
            for r in records:
                newest = max(newest, _prop_ms(r, prop) or 0)
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if after:
                yield Page(
                    records=records, cursor={"mode": "list", "after": after, "started": started, "newest": newest}
                )
            else:
                handover = min(started, newest) if newest else started
                # Every record modified at or before the newest seen was read at that version
                # (a later write would be stamped after the list began), so when the newest is
                # before the start, search continues strictly after it: no boundary re-read.
                yield Page(
                    records=records,
                    cursor={
                        "mode": "search",
                        "ts": handover,
                        "archived_ts": handover,
                        "listed": True,
                        "after_ts": bool(newest) and newest < started,
                    },
                )
                return

    def _search_phase(self, obj: str, cursor: dict[str, Any], fields: Sequence[str], run_start: int) -> Iterator[Page]:
        if cursor.get("mode") == PULL_MODE:  # a partitioned pull a kill interrupted: each part resumes
            if all(isinstance(cursor.get(k), int) for k in ("ts", "upper", "archived_ts")):
                yield from self._partitioned_pull(obj, cursor, fields)
                return
            # Not a plan this code wrote: search again from its start (or from the beginning).
            cursor = {"mode": "search", "ts": cursor.get("ts") if isinstance(cursor.get("ts"), int) else 0}
        prop = modified_prop(obj)
        base_filters = self._marker_filter(obj)
        ts = int(cursor.get("ts", 0))
        # A hand-over from the list endpoint ("listed") read the records themselves, not the
        # search index: nothing to look back for.
        if cursor.get("slice_id") is None and not cursor.get("after_ts") and not cursor.get("listed"):
            # Search lags writes by seconds, so the last run may have missed a record written just
            # before it searched: one modified after its start ("hi") less the look-back. Only a
            # cursor inside that window is moved back; one far behind it (the last change long
            # before that run) cannot hide anything. Cursors from before "hi" always look back.
            hi = cursor.get("hi")
            if hi is None:
                ts = max(0, ts - self.lookback_ms)
            elif ts > int(hi) - self.lookback_ms:
                ts = max(0, int(hi) - self.lookback_ms)
        archived_ts = cursor.get("archived_ts", 0)
        upper = run_start

        def cur(**kw: Any) -> dict[str, Any]:
            return {"mode": "search", "archived_ts": archived_ts, "hi": upper, **kw}

        slice_id = cursor.get("slice_id")
        after_ts = bool(cursor.get("after_ts"))
        expect = 0  # how many results the next search is known to hold (0: unknown)
        seen_at: list[str] = []  # after a re-anchor: ids at ts already read
        # The walk's own first page tells how many changes wait: a large share of a large object is
        # read as a partitioned pull instead, and a small pull makes the requests it always made.
        probe = slice_id is None and not base_filters
        shrunk = 0  # times the window shrank under the walk (see below)
        page_ts = ts
        while True:
            if slice_id is not None:
                # More than 10,000 records share ts: walk that one millisecond by object id.
                last = slice_id
                offset = 0
                while True:
                    filters = [
                        *base_filters,
                        {"propertyName": prop, "operator": "EQ", "value": str(ts)},
                        {"propertyName": "hs_object_id", "operator": "GT", "value": str(last)},
                    ]
                    body = self._search(obj, [filters], "hs_object_id", fields, offset)
                    records = self._with_associations(obj, [self._record(obj, r) for r in body.get("results", [])])
                    if records:
                        max_id = max(int(r.id) for r in records)
                        yield Page(records=records, cursor=cur(ts=ts, slice_id=max_id), total=body.get("total"))
                    nxt = ((body.get("paging") or {}).get("next") or {}).get("after")
                    if not nxt or not records:
                        break
                    offset = int(nxt)
                    if offset + SEARCH_PAGE > SEARCH_CAP:
                        last, offset = max(int(r.id) for r in records), 0
                slice_id, after_ts = None, True
                yield Page(records=[], cursor=cur(ts=ts, after_ts=True))
            op = "GT" if after_ts or seen_at else "GTE"
            groups = [
                [
                    *base_filters,
                    {"propertyName": prop, "operator": op, "value": str(ts)},
                    {"propertyName": prop, "operator": "LTE", "value": str(upper)},
                ]
            ]
            if seen_at:
                # After the cap: the records at ts not read yet, then those after it.
                groups.append(
                    [
                        *base_filters,
                        {"propertyName": prop, "operator": "EQ", "value": str(ts)},
                        {"propertyName": "hs_object_id", "operator": "NOT_IN", "values": seen_at},
                    ]
                )
            reanchor = False
            first = None
            if probe:
                probe = False
                began = time.monotonic()
                first = self._search(obj, groups, prop, fields, 0)
                rtt = time.monotonic() - began
                plan = self._plan_pull(obj, first, rtt=rtt, ts=ts, op=op, upper=upper, archived_ts=int(archived_ts))
                if plan is not None:
                    yield from self._partitioned_pull(obj, plan, fields, first)
                    return
            last_total: int | None = None
            for body, records in self._search_pages(obj, groups, prop, fields, expect=expect, first=first):
                if not records:
                    return
                total = int(body.get("total") or 0)
                if last_total is not None and total < last_total and shrunk < MAX_SHRINKS:
                    # Records left the window while it was read (edited after the run began), so every
                    # offset past them moved back and a record may sit unread before this page: search
                    # again from the last page's stamp (what it re-reads is stored unchanged).
                    shrunk += 1
                    reanchor, ts, after_ts, expect, seen_at = False, page_ts, False, 0, []
                    break
                last_total = total
                stamps = [_prop_ms(r, prop) or (to_ms(r.updated_at) if r.updated_at else ts) for r in records]
                page_ts = min(max(max(stamps), ts), upper)
                yield Page(records=records, cursor=cur(ts=page_ts), total=body.get("total"))
                nxt = ((body.get("paging") or {}).get("next") or {}).get("after")
                if not nxt:
                    return
                if int(nxt) + SEARCH_PAGE > SEARCH_CAP:
                    reanchor = True
                    # The next search leaves out this page's records at page_ts (HubSpot takes up
                    # to IN_MAX values in NOT_IN; more are read again, as GTE would): its total is
                    # the rest past the cap, so its pages are asked for at once, not after its
                    # first answer. Fewer (a record that moved on since) costs one empty page.
                    seen_at = [r.id for r, stamp in zip(records, stamps, strict=True) if stamp == page_ts]
                    if len(seen_at) > IN_MAX:
                        seen_at = []
                    expect = int(body.get("total") or 0) - int(nxt) + stamps.count(page_ts) - len(seen_at)
                    break
            if reanchor:
                if page_ts == ts:
                    # A whole window of 10,000 results at one timestamp: slice it by id.
                    slice_id, after_ts, expect, seen_at = 0, False, 0, []
                else:
                    ts, after_ts = page_ts, False

    def _archived_phase(
        self, obj: str, cursor: dict[str, Any], fields: Sequence[str], *, first: Future[dict[str, Any]] | None = None
    ) -> Iterator[Page]:
        """Search never returns archived records: list them and keep those archived since last time.

        ``first``: the first page, already asked for.
        """
        since = int(cursor.get("archived_ts", 0))
        newest = since
        after = None
        while True:
            if first is not None:
                body, first = first.result(), None
            else:
                body = self._list(obj, fields, after=after, archived=True)
            fresh = []
            for raw in body.get("results", []):
                archived_at = parse_ts(raw.get("archivedAt"))
                ms = to_ms(archived_at) if archived_at else 0
                if ms >= since:
                    rec = self._record(obj, raw)
                    rec.archived = True
                    fresh.append(rec)
                    newest = max(newest, ms)
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if fresh or not after:
                yield Page(records=fresh, cursor=None if after else {**cursor, "archived_ts": newest})
            if not after:
                return

    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        out: list[RemoteRecord] = []
        props = sorted({*fields, modified_prop(obj), "hs_object_id"})
        for chunk in chunks(list(dict.fromkeys(ids)), BATCH):
            body = self.http.post(
                f"/crm/v3/objects/{obj}/batch/read",
                json={"properties": props, "propertiesWithHistory": [], "inputs": [{"id": i} for i in chunk]},
                endpoint="/crm/v3/objects/{type}/batch/read",
                expect=(207, 404),
            ).json()
            out.extend(self._record(obj, r) for r in body.get("results", []))
        return self._with_associations(obj, out)

    def list_ids(self, obj: str) -> Iterator[list[str]]:
        after = None
        while True:
            params: dict[str, Any] = {"limit": LIST_PAGE, "properties": "hs_object_id"}
            if after:
                params["after"] = after
            body = self.http.get(f"/crm/v3/objects/{obj}", params=params, endpoint="/crm/v3/objects/{type}").json()
            yield [str(r["id"]) for r in body.get("results", [])]
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return

    # -- push ------------------------------------------------------------------------------------
    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        found: dict[str, RemoteRecord] = {}
        props = sorted({*fields, modified_prop(obj), "hs_object_id"})
        by_kind: dict[str, list[str]] = {}
        for k in keys:
            name, value = next(iter(k.items()))
            by_kind.setdefault(name, []).append(value)
        id_props = {"email": "email", "key": DEAL_KEY if obj == "deals" else COMPANY_KEY}
        for kind, values in by_kind.items():
            values = list(dict.fromkeys(values))
            if kind in id_props and (kind != "key" or obj in ("deals", "companies")):
                id_prop = id_props[kind]
                if id_prop not in ("email",) and id_prop not in self._properties(obj):
                    continue  # never pushed here: nothing can carry the key yet
                for chunk in chunks(values, BATCH):
                    body = self.http.post(
                        f"/crm/v3/objects/{obj}/batch/read",
                        json={
                            "properties": [*props, id_prop],
                            "propertiesWithHistory": [],
                            "idProperty": id_prop,
                            "inputs": [{"id": v} for v in chunk],
                        },
                        endpoint="/crm/v3/objects/{type}/batch/read",
                        expect=(207, 404),
                    ).json()
                    for raw in body.get("results", []):
                        rec = self._record(obj, raw)
                        value = str((raw.get("properties") or {}).get(id_prop) or "").lower()
                        if value:
                            found[match_key({kind: value})] = rec
            else:
                prop = {"phone": "phone", "domain": "domain", "name": "name"}.get(kind)
                if prop is None:
                    continue
                for chunk in chunks(values, IN_MAX * SEARCH_GROUPS):
                    for raw in self._searched(obj, prop, chunk, [*props, prop]):
                        rec = self._record(obj, raw)
                        value = str((raw.get("properties") or {}).get(prop) or "").lower()
                        if value:
                            found.setdefault(match_key({kind: value}), rec)
        return found

    def lookup_batch(self, obj: str, kind: str) -> int:
        # Keys read by a unique property go in one batch read of BATCH; the rest are searched for,
        # up to SEARCH_GROUPS IN filters in one search.
        if kind == "email" or (kind == "key" and obj in ("deals", "companies")):
            return BATCH
        return IN_MAX * SEARCH_GROUPS

    def _searched(self, obj: str, prop: str, values: Sequence[str], fields: Sequence[str]) -> Iterator[dict[str, Any]]:
        """The records whose ``prop`` is one of ``values`` (at most IN_MAX * SEARCH_GROUPS), every page:
        a portal may hold several records with one domain or name, so one page may not be all."""
        groups = [[{"propertyName": prop, "operator": "IN", "values": part}] for part in chunks(values, IN_MAX)]
        after = 0
        while True:
            body = self._search(obj, groups, "hs_object_id", fields, after)
            yield from body.get("results", [])
            nxt = ((body.get("paging") or {}).get("next") or {}).get("after")
            if not nxt or int(nxt) >= SEARCH_CAP:
                return
            after = int(nxt)
