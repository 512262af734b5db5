"""The middle of a large COQL walk split into id ranges read side by side (``providers.partitions``).

A walk from both ends that has read ``PARTITION_MIN`` rows and not met stops at a round's edge;
what lies between its ends (a band of ``(Modified_Time, id)`` keys, up to the run's upper bound)
is split into id ranges, each walked upwards by id alone (``id > last and id <= end``, keyset
paging: no offset, so COQL's 100,000-row cap never binds). Inside a fixed band, ordering by id is
exact: a record changed during the walk leaves the band (its Modified_Time passes the upper bound)
and the next run finds it, as it finds one changed after the run began. The deletions are read as
one more partition. Each page carries every range's position, so a kill resumes each range after
its last stored page, and the ranges are disjoint, so no record is read twice. The walk ends on
the cursor an unbroken walk would: the greatest key read, the run's upper bound, the deletions' mark.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from crmsync.http import deferring
from crmsync.providers import partitions
from crmsync.providers.base import Page, ProviderContext
from crmsync.providers.zoho.schema import ZohoSchema
from crmsync.providers.zoho.values import (
    COQL_CONCURRENCY,
    COQL_ROWS,
    MARKER,
    MODULES,
    RANGES_PER_SLOT,
    _nest,
    parse_ts,
    quote,
    zoho_time,
)

Key = tuple[datetime, int]  # where a record sits in a walk: (Modified_Time, id)
_LowKey = tuple[datetime, int | str | None]  # a walk's lower end: a key, or a time with no id yet
MAX_RANGES = 64  # ranges a stored plan may name (a cursor naming more is not one of ours)


def key_of(row: Mapping[str, Any], default: datetime) -> Key:
    return (parse_ts(row.get("Modified_Time")) or default, int(row["id"]))


def _stored_key(value: Any) -> Key | None:
    """A ``[time, id]`` pair from a stored cursor, or None if it is not one."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    ts = parse_ts(value[0])
    if ts is None or isinstance(value[1], bool):
        return None
    try:
        return (ts, int(value[1]))
    except (TypeError, ValueError):
        return None


def _wire(key: Key) -> list[Any]:
    return [zoho_time(key[0]), key[1]]


def band(low: _LowKey, high: Key | None, upper: datetime) -> list[str]:
    """COQL criteria for the keys above ``low``, below ``high`` (None: none) and at most ``upper``."""
    low_ts = quote(zoho_time(low[0]))
    out = [
        f"Modified_Time >= {low_ts}"
        if low[1] is None
        else f"(Modified_Time > {low_ts} or (Modified_Time = {low_ts} and id > {int(low[1])}))",
        f"Modified_Time <= {quote(zoho_time(upper))}",
    ]
    if high is not None:
        high_ts = quote(zoho_time(high[0]))
        out.append(f"(Modified_Time < {high_ts} or (Modified_Time = {high_ts} and id < {int(high[1])}))")
    return out


class ZohoPartitioned(ZohoSchema):
    """Planning, reading and resuming a walk whose middle is split into id ranges."""

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        # Never more COQL calls in flight than Zoho's sub-concurrency, nor than the configured limit.
        self.coql_slots = max(1, min(self.http.concurrency, COQL_CONCURRENCY))
        self._coql_gate = threading.BoundedSemaphore(self.coql_slots)

    def _coql(self, query: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
        with self._coql_gate:
            return super()._coql(query, limit)

    def _scope(self, obj: str) -> list[str]:
        # Only the calls and tasks crmsync logged are pulled (an org's own call log is not ours).
        return [f"{MARKER} is not null"] if obj in ("calls", "tasks") else []

    # -- planning --------------------------------------------------------------------------------
    def _id_edges(self, obj: str, low: _LowKey, high: Key | None, upper: datetime) -> tuple[int, int] | None:
        """The lowest and highest id in a band (two one-row queries side by side); None if it is empty."""
        where = _nest("and", [*band(low, high, upper), *self._scope(obj)])

        def edge(order: str) -> int | None:
            # Asked for beside a round of pages, which may turn out to be the walk's last: they
            # take a slot only when no page waits for one.
            with deferring():
                rows, _ = self._coql(f"select id from {MODULES[obj]} where {where} order by id {order} limit 1", 1)
            return int(rows[0]["id"]) if rows else None

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"plan-{obj}") as pool:
            first, last = pool.submit(edge, "asc"), pool.submit(edge, "desc")
            lo, hi = first.result(), last.result()
        return None if lo is None or hi is None else (lo, hi)

    def _plan_partitions(
        self,
        obj: str,
        state: Mapping[str, Any],
        low: Key,
        high: Key | None,
        newest: Key,
        upper: datetime,
        deletions_read: bool,
        edges: tuple[int, int] | None,
    ) -> dict[str, Any] | None:
        """Equal id ranges over ``edges`` (the ids of the band, or of a wider one read earlier), two
        per COQL slot; None when the band was empty."""
        if edges is None:
            return None
        lo, hi = edges
        count = max(1, min(MAX_RANGES, self.coql_slots * RANGES_PER_SLOT, hi - lo + 1))
        step = math.ceil((hi - lo + 1) / count)
        ranges = [[a, min(a + step - 1, hi)] for a in range(lo, hi + 1, step)]
        return {
            "mode": "partitioned",
            "base": {k: state.get(k) for k in ("ts", "id", "hi", "deleted_ts")},
            "low": _wire(low),
            "high": _wire(high) if high is not None else None,
            "newest": _wire(newest),
            "upper": zoho_time(upper),
            "ranges": ranges,
            "deletions_read": deletions_read,
        }

    @staticmethod
    def _stored_plan(cursor: Mapping[str, Any]) -> dict[str, Any] | None:
        """A stored plan read back, or None if any part of it is not what ``_plan_partitions`` writes."""
        base, ranges = cursor.get("base"), cursor.get("ranges")
        low, newest = _stored_key(cursor.get("low")), _stored_key(cursor.get("newest"))
        high = _stored_key(cursor.get("high")) if cursor.get("high") is not None else None
        upper = parse_ts(cursor.get("upper"))
        if (
            not isinstance(base, Mapping)
            or parse_ts(base.get("ts")) is None
            or low is None
            or newest is None
            or upper is None
            or (cursor.get("high") is not None and high is None)
            or not isinstance(ranges, list)
            or not 0 < len(ranges) <= MAX_RANGES
        ):
            return None
        spans: list[list[int]] = []
        for r in ranges:
            if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) and 0 <= r[0] <= r[1]):
                return None
            spans.append([r[0], r[1]])
        if any(a[1] >= b[0] for a, b in itertools.pairwise(spans)):
            return None  # overlapping or unordered ranges would read records twice
        return {**cursor, "ranges": spans}

    # -- reading ---------------------------------------------------------------------------------
    def _partitioned(self, obj: str, plan: dict[str, Any], columns: list[str], cursor: Any = None) -> Iterator[Page]:
        """Every range and the deletions side by side, then the cursor an unbroken walk ends on."""
        low = _stored_key(plan["low"])
        high = _stored_key(plan["high"]) if plan.get("high") is not None else None
        newest = _stored_key(plan["newest"])
        upper = parse_ts(plan["upper"])
        assert low is not None and newest is not None and upper is not None  # checked by _stored_plan
        base = dict(plan["base"])
        where = [*band(low, high, upper), *self._scope(obj)]
        parts: dict[str, partitions.PartitionFn] = {}
        # Pages read but not yet handed over, at most one per COQL slot: more ranges than slots
        # must not mean more pages in memory.
        held = threading.BoundedSemaphore(self.coql_slots)
        for i, (a, b) in enumerate(plan["ranges"]):
            parts[f"r{i}"] = functools.partial(self._id_range, obj, columns, where, a, b, upper, held)
        parts["deleted"] = functools.partial(self._deleted_part, obj, base.get("deleted_ts"), upper)
        start = cursor if cursor is not None else {}
        if plan.get("deletions_read") and not partitions.parse(start).get("deleted"):
            start = partitions.compose({**partitions.parse(start), "deleted": {"at": None, "done": True}})
        extra = {k: plan[k] for k in ("mode", "base", "low", "high", "newest", "upper", "ranges", "deletions_read")}
        final: Mapping[str, Any] | None = start
        depth = 2
        for page in partitions.interleave(parts, start, depth=depth, name=f"coql-{obj}", extra=extra):
            final = page.cursor
            yield page
        states = partitions.parse(final)
        for key, st in states.items():
            if key.startswith("r") and isinstance(st["at"], Mapping):
                got = _stored_key(st["at"].get("newest"))
                newest = max(newest, got) if got is not None else newest
        gone = states.get("deleted", {}).get("at")
        deleted_ts = gone.get("deleted_ts") if isinstance(gone, Mapping) else None
        yield Page(
            records=[],
            cursor={
                **base,
                "ts": zoho_time(newest[0]),
                "id": str(newest[1]),
                "hi": zoho_time(upper),
                "deleted_ts": deleted_ts or base.get("deleted_ts"),
            },
        )

    def _id_range(
        self,
        obj: str,
        columns: list[str],
        where: Sequence[str],
        a: int,
        b: int,
        upper: datetime,
        held: threading.BoundedSemaphore,
        at: Any,
    ) -> Iterator[Page]:
        """Ids ``a``..``b`` of the band, upwards from where a stored position left them."""
        last = a - 1
        newest: Key | None = None
        if isinstance(at, Mapping) and type(at.get("last")) is int and a - 1 <= at["last"] <= b:
            last, newest = at["last"], _stored_key(at.get("newest"))
        while last < b:
            with held:  # released once the page is queued (this generator is asked for the next)
                cond = _nest("and", [*where, f"id > {last}", f"id <= {b}"])
                rows, more = self._select(obj, columns, cond, "id asc", COQL_ROWS)
                if not rows:
                    return
                last = int(rows[-1]["id"])
                # A row without a time (never, as selected) cannot move the hand-over point.
                keys = [key_of(r, newest[0] if newest else upper) for r in rows if parse_ts(r.get("Modified_Time"))]
                newest = max([*keys, *([newest] if newest else [])], default=None)
                yield Page(
                    records=[self._record(obj, r) for r in rows],
                    cursor={"last": last, "newest": _wire(newest) if newest else None},
                )
            if not more:
                return

    def _deleted_part(self, obj: str, deleted_ts: Any, upper: datetime, at: Any) -> Iterator[Page]:
        ids, mark = self._deletions(obj, deleted_ts if isinstance(deleted_ts, str) else None, upper)
        yield Page(records=[], cursor={"deleted_ts": mark}, deleted=ids)

    # Defined by the layers above.
    def _select(
        self, obj: str, columns: list[str], where: str, order: str, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        raise NotImplementedError

    def _record(self, obj: str, row: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _deletions(self, obj: str, deleted_ts: str | None, upper: datetime) -> tuple[list[str], str]:
        raise NotImplementedError
