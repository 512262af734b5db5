"""Honest lower bounds that need more than one formula: the best split of a read between buckets.

``harness.lower_bound`` prices a fixed set of requests. The functions here first choose the
requests a perfect client would send — how many pages to read through which endpoint — and then
price them the same way, so every bound is "the best any client could reach under the CRM's
documented limits, from an empty window at process start".
"""

from __future__ import annotations

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
    changes: dict[str, int], totals: dict[str, int], t: float, *, general: int, search: int, latency: float
) -> tuple[int, int] | None:
    """(general, search) requests that read every change by ``t``, or None if none can.

    The list walks take the densest objects first (a list page reads unchanged records too), each a
    chain of at most ``t / latency`` pages; search reads what is left in pages of 200, ranges side by
    side (no chain), plus one association read per 1,000 searched ids; one archived list per object.
    """
    chain = int(t / latency) if latency else 10**9
    budget = general - len(changes)  # the archived lists
    if budget < 0:
        return None
    order = sorted(changes, key=lambda o: changes[o] / max(1, totals.get(o, changes[o])), reverse=True)
    pages = {o: 0 for o in changes}
    for o in order:
        pages[o] = max(0, min(chain, math.ceil(totals.get(o, changes[o]) / LIST_PAGE), budget))
        budget -= pages[o]
    for _ in range(len(changes) + 1):  # give list pages back until the association reads fit
        left = {
            o: max(0, changes[o] - round(pages[o] * LIST_PAGE * changes[o] / max(1, totals.get(o, changes[o]))))
            for o in changes
        }
        assoc = sum(math.ceil(n / ASSOC_BATCH) * HS_ASSOC_TARGETS.get(o, 0) for o, n in left.items())
        over = sum(pages.values()) + len(changes) + assoc - general
        if over <= 0:
            searches = sum(math.ceil(n / SEARCH_PAGE) for n in left.values())
            return (sum(pages.values()) + len(changes) + assoc, searches) if searches <= search else None
        sparsest = next((o for o in reversed(order) if pages[o]), None)
        if sparsest is None:
            return None
        pages[sparsest] = max(0, pages[sparsest] - over)
    return None


def hubspot_pull_bound(
    changes: dict[str, int], totals: dict[str, int], *, limits: dict[str, tuple[int, float]], latency: float
) -> Bound:
    """The earliest time (to 10 ms) at which some split of the changes between list and search is done."""
    objs = {o: n for o, n in changes.items() if not o.startswith("_") and n}
    (g_limit, g_window), (s_limit, s_window) = limits["default"], limits["search"]
    t = latency
    while True:
        split = _hubspot_split(
            objs,
            totals,
            t,
            general=sent_by(t, g_limit, g_window, latency),
            search=sent_by(t, s_limit, s_window, latency),
            latency=latency,
        )
        if split is not None or t > 3600:
            break
        t = round(t + 0.01, 2)
    general, search = split or (0, 0)
    text = (
        f"honest: each object's changes split between list pages of {LIST_PAGE} (general bucket, "
        f"{g_limit}/{g_window:g} s; a chain per object; the densest objects first, since a list reads "
        f"unchanged records too: totals {totals}) and search pages of {SEARCH_PAGE} in id ranges side by side "
        f"(search bucket, {s_limit}/{s_window:g} s) + an association read per {ASSOC_BATCH:,} searched ids + one "
        f"archived list per object: {general} general and {search} search requests, from an empty window, "
        f"the earliest t at which every answer is back"
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
