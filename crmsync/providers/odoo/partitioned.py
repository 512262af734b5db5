"""A large write_date window split into id ranges, read side by side (``providers.partitions``).

Odoo has no rate limit: its worker processes are the limit, and crmsync keeps ``concurrency``
requests in flight (2 by default, so the server's workers still serve its users). A window whose
count says it is large is cut, above its first page, into that many id ranges (each an equal
share of the window's ids, or of the id span when the window is huge); each range is keyset-paged
by ``id`` (never ``offset``) with the window's own domain (``active_test`` off, so archived rows
come too), and every page carries each range's position as of the pages stored so far. A kill
resumes every range after its last stored page; the ranges are disjoint, so nothing is read into
the store twice. When every range is done the walk ends on ``{"hi": window_hi}``, the cursor an
unpartitioned walk of the same window ends on.

The stored plan is ``{"mode": "partitioned", "window_lo", "window_hi", "ranges", "total"}`` plus
the ranges' states; a resumed run keeps the plan's ranges even if ``concurrency`` changed since.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from crmsync.providers import partitions
from crmsync.providers.base import Page, RemoteRecord
from crmsync.providers.odoo.values import parse_dt

__all__ = ["MODE", "Turns", "plan", "restore", "walk"]

MODE = "partitioned"

#: Reads up to ``limit`` rows of the window with ``low < id <= high``, ascending by id.
ReadRange = Callable[[int, int], list[dict[str, Any]]]
#: Rows as records (a deal's partners are read in the same thread, beside the other ranges).
Convert = Callable[[list[dict[str, Any]]], list[RemoteRecord]]


class Turns:
    """At most ``k`` range reads at once, across every walk that shares this; the range with the most
    pages left goes first.

    The HTTP client's slots wake waiters in no order, so without this one range of a window could
    fall behind the others and be read alone at the end, one round trip at a time, while the
    server's other workers idle; serving the longest remaining chain first keeps the ranges level.
    A turn given back passes straight to the first in line (no herd of waiters woken to re-check).
    """

    def __init__(self, k: int) -> None:
        self.free = max(1, k)
        self._lock = threading.Lock()
        self._queue: list[tuple[float, int, threading.Event]] = []
        self._tickets = itertools.count()

    @contextlib.contextmanager
    def turn(self, pages_left: float) -> Iterator[None]:
        with self._lock:
            if self.free > 0 and not self._queue:
                self.free -= 1
                mine = None
            else:
                mine = threading.Event()
                heapq.heappush(self._queue, (-pages_left, next(self._tickets), mine))
        if mine is not None:
            mine.wait()  # set by the turn handed over to this one
        try:
            yield
        finally:
            with self._lock:
                if self._queue:
                    heapq.heappop(self._queue)[2].set()
                else:
                    self.free += 1


def split(first: int, last: int, k: int) -> list[list[int]]:
    """``first..last`` (inclusive) as at most ``k`` contiguous ranges of equal width."""
    if last < first:
        return []
    k = max(1, min(k, last - first + 1))
    step = -(-(last - first + 1) // k)
    return [[a, min(a + step - 1, last)] for a in range(first, last + 1, step)]


def by_pages(above: int, ids: list[int], k: int, page_size: int) -> list[list[int]]:
    """Ranges covering ``above + 1`` .. the last of ``ids`` (sorted): ``k`` at most, each whole pages of them.

    The ids' pages are shared out as evenly as they go, and each range ends on its own last id,
    so no range reads a part-filled page or an empty one to learn it is done: the ranges cost the
    pages the ids need, however many ranges there are.
    """
    if not ids:
        return []
    size = max(1, page_size)
    pages = -(-len(ids) // size)
    r = max(1, min(k, pages))
    base, extra = divmod(pages, r)
    out: list[list[int]] = []
    low, start = above + 1, 0
    for i in range(r):
        stop = min(len(ids), start + (base + (1 if i < extra else 0)) * size)
        out.append([low, ids[stop - 1]])
        low, start = ids[stop - 1] + 1, stop
    return out


def plan(window_lo: str | None, window_hi: str, ranges: list[list[int]], total: int | None) -> dict[str, Any]:
    """The plan of a window whose first page is read: the ranges above it."""
    return {"mode": MODE, "window_lo": window_lo, "window_hi": window_hi, "ranges": ranges, "total": total}


def restore(cursor: Mapping[str, Any]) -> dict[str, Any] | None:
    """The plan inside a stored partitioned cursor, or None when it is not one crmsync could have written."""
    lo, hi, ranges = cursor.get("window_lo"), cursor.get("window_hi"), cursor.get("ranges")
    if cursor.get("mode") != MODE or not isinstance(hi, str) or parse_dt(hi) is None:
        return None
    if lo is not None and (not isinstance(lo, str) or parse_dt(lo) is None):
        return None
    if not isinstance(ranges, list) or not all(_is_range(r) for r in ranges):
        return None
    total = cursor.get("total")
    return {
        "mode": MODE,
        "window_lo": lo,
        "window_hi": hi,
        "ranges": [[int(a), int(b)] for a, b in ranges],
        "total": total if isinstance(total, int) and not isinstance(total, bool) else None,
    }


def _is_range(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and value[0] <= value[1]
    )


def first_cursor(the_plan: Mapping[str, Any]) -> dict[str, Any]:
    """The cursor stored with the window's first page: every range still to read from its start."""
    parts = {f"ids{i}": {"at": None, "done": False} for i in range(len(the_plan["ranges"]))}
    return partitions.compose(parts, **the_plan)


def walk(
    the_plan: Mapping[str, Any],
    cursor: Mapping[str, Any] | None,
    *,
    read: ReadRange,
    convert: Convert,
    page_size: int,
    name: str,
    turns: Turns | None = None,
) -> Iterator[Page]:
    """Every range side by side from where ``cursor`` left it, then the window's end (``turns``: see ``Turns``)."""
    total = the_plan.get("total")
    ranges = the_plan["ranges"]
    # A range's pages when it began, from the window's size (equal shares), for its place in ``turns``.
    pages = max(1.0, (total or page_size * len(ranges)) / max(1, len(ranges)) / max(1, page_size))
    parts: dict[str, partitions.PartitionFn] = {
        f"ids{i}": functools.partial(_range, read, convert, page_size, a, b, turns=turns, pages=pages)
        for i, (a, b) in enumerate(ranges)
    }
    extra = {k: the_plan[k] for k in ("mode", "window_lo", "window_hi", "ranges", "total")}
    # Two pages a range may hold while the store takes others: a range never waits for another's page.
    depth = 2 * max(1, len(parts))
    for page in partitions.interleave(parts, cursor, depth=depth, name=name, extra=extra):
        page.total = total
        yield page
    yield Page(records=[], cursor={"hi": the_plan["window_hi"]}, total=total)


def _range(
    read: ReadRange,
    convert: Convert,
    page_size: int,
    a: int,
    b: int,
    at: Any,
    *,
    turns: Turns | None = None,
    pages: float = 1.0,
) -> Iterator[Page]:
    """Ids ``a``..``b`` of the window, a page at a time, each page's cursor its last id."""
    last = int(at["last"]) if isinstance(at, Mapping) and isinstance(at.get("last"), int) else a - 1
    while last < b:
        if turns is None:
            rows = read(last, b)
        else:
            with turns.turn(pages * (b - last) / max(1, b - a + 1)):  # its share of the span still to read
                rows = read(last, b)
        if rows:
            last = int(rows[-1]["id"])
            yield Page(records=convert(rows), cursor={"last": last})
        if len(rows) < page_size:
            return
