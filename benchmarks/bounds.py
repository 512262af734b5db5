"""Honest lower bounds that need more than one formula: the best split of a read between buckets.

``harness.lower_bound`` prices a fixed set of requests. The functions here first choose the
requests a perfect client would send — how many pages to read through which endpoint — and then
price them the same way, so every bound is "the best any client could reach under the CRM's
documented limits, from an empty window at process start".
"""

from __future__ import annotations

import itertools
import math

from benchmarks.harness import Bound

LIST_PAGE = 100  # HubSpot list endpoint: records per page (associations inline)
SEARCH_PAGE = 200  # HubSpot search: records per page
ASSOC_BATCH = 1000  # HubSpot associations batch read: ids per request
#: HubSpot association types a pulled record needs read (contacts -> companies; deals -> contacts, companies).
HS_ASSOC_TARGETS = {"contacts": 1, "companies": 0, "deals": 2}


def sent_by(t: float, limit: int, window: float, latency: float) -> int:
    """Requests a bucket lets through whose answers are back by ``t``: ``limit`` at once, the next
    ``limit`` one window later, and so on (a rolling window starting empty)."""
    if t < latency:
        return 0
    return limit * (int((t - latency) // window) + 1)


def _hubspot_split(
    changes: dict[str, int],
    totals: dict[str, int],
    t: float,
    *,
    limits: dict[str, tuple[int, float]],
    latency: float,
) -> tuple[int, int] | None:
    """(general, search) requests of a split that reads every change with every answer back by ``t``, or None.

    Each object's list walk is a chain (``after`` is an opaque token from the previous answer): one
    page per round trip, from the lowest ids, a page reading unchanged records too (changes taken as
    spread evenly). Search reads what is left in pages of 200 in id ranges side by side (no chain), plus
    one association read per 1,000 searched ids, plus one archived list per object. The general bucket
    is a rolling window from empty: ``limit`` sends in the first window, and after it only as many as
    were sent a window earlier, where the chains send at most one page per round trip. Whatever is
    uncertain is granted to the client (every association read counted as sent at once), so this stays
    a lower bound.
    """
    (g_limit, g_window), (s_limit, s_window) = limits["default"], limits["search"]
    last = t - latency  # the last send whose answer is back by t
    if last < 0:
        return None
    searches = sent_by(t, s_limit, s_window, latency)
    per_chain = int(last / latency) + 1
    late = int((last - g_window) / latency) + 1 if last >= g_window else 0  # a chain's sends after the window
    objs = sorted(changes)
    chains = archived = len(objs)
    caps = [min(per_chain, math.ceil(totals.get(o, changes[o]) / LIST_PAGE)) for o in objs]
    # Per object and number of list pages: (search pages, association reads) for the changes left.
    cost: list[list[tuple[int, int]]] = []
    for o, cap in zip(objs, caps, strict=True):
        density = changes[o] / max(1, totals.get(o, changes[o]))
        left = [max(0, changes[o] - math.floor(p * LIST_PAGE * density)) for p in range(cap + 1)]
        cost.append(
            [(math.ceil(n / SEARCH_PAGE), math.ceil(n / ASSOC_BATCH) * HS_ASSOC_TARGETS.get(o, 0)) for n in left]
        )
    best: tuple[int, int] | None = None
    for head in itertools.product(*(range(c + 1) for c in caps[:-1])):
        search = sum(cost[i][p][0] for i, p in enumerate(head))
        assoc = sum(cost[i][p][1] for i, p in enumerate(head))
        # More list pages of the last object only add general requests once search fits: take the fewest.
        tail = next((p for p in range(caps[-1] + 1) if search + cost[-1][p][0] <= searches), None)
        if tail is None:
            continue
        search, assoc, listed = search + cost[-1][tail][0], assoc + cost[-1][tail][1], sum(head) + tail
        general = listed + assoc + archived
        if late == 0:
            ok = general <= g_limit
        else:
            early = min(g_limit, archived + assoc + chains * late)
            ok = general <= g_limit + early and listed <= g_limit - archived + chains * late
        if ok and (best is None or general < best[0]):
            best = (general, search)
    return best


def hubspot_pull_bound(
    changes: dict[str, int], totals: dict[str, int], *, limits: dict[str, tuple[int, float]], latency: float
) -> Bound:
    """The earliest time (to 10 ms) at which some split of the changes between list and search is done."""
    objs = {o: n for o, n in changes.items() if not o.startswith("_") and n}
    (g_limit, g_window), (s_limit, s_window) = limits["default"], limits["search"]
    lo, hi = 1, 360_000  # hundredths of a second: feasibility only grows with time, so halve the interval
    while lo < hi:
        mid = (lo + hi) // 2
        if _hubspot_split(objs, totals, mid / 100, limits=limits, latency=latency) is None:
            lo = mid + 1
        else:
            hi = mid
    t = lo / 100
    general, search = _hubspot_split(objs, totals, t, limits=limits, latency=latency) or (0, 0)
    text = (
        f"honest: each object's changes split between list pages of {LIST_PAGE} (general bucket, "
        f"{g_limit}/{g_window:g} s rolling; a chain per object, one page per round trip, changes taken as spread "
        f"evenly over totals {totals}) and search pages of {SEARCH_PAGE} in id ranges side by side "
        f"(search bucket, {s_limit}/{s_window:g} s) + an association read per {ASSOC_BATCH:,} searched ids + one "
        f"archived list per object: {general} general and {search} search requests, from an empty window (after "
        f"the first window, only as many sends as a window earlier), the earliest t at which every answer is back"
    )
    return Bound(requests={"default": general, "search": search}, seconds=t, formula=text)


def partitioned_bound(pages: dict[str, int], extra: int, *, concurrency: int, latency: float, what: str) -> Bound:
    """Keyset pages read in partitions side by side, at most ``concurrency`` in flight.

    A perfect client splits every object's key space into as many ranges as it may have requests in
    flight, so no chain binds: ceil(requests / concurrency) round trips (at least one).
    """
    total = sum(pages.values()) + extra
    rounds = max(1, math.ceil(total / max(1, concurrency)))
    text = (
        f"honest: {what} {pages} + {extra} alongside = {total} requests in key ranges side by side, at most "
        f"{concurrency} in flight: ceil({total}/{concurrency}) = {rounds} x latency"
    )
    return Bound(requests={"default": total}, seconds=rounds * latency, formula=text)
