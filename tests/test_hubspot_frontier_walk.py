"""HubSpot's first walk at a search limit one chain can keep busy: list upwards, search downwards, meeting.

Small sizes, the emulator in process on loopback, no latency.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.providers.base import Page
from crmsync.providers.hubspot import partitioned
from crmsync.providers.hubspot.values import _prop_ms
from crmsync.sync.pull import backfill
from tests.e2e import hubspot_app, write_config
from tests.test_hubspot_partitioned_pull import _provider, _walk

# ``_walk`` is the pull tests' (it counts live records): a first walk here meets no archived one.
FIELDS = ["email", "firstname"]
N = 1_300  # above PARTITION_MIN (lowered below): the walk is split


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitioned, "PARTITION_MIN", 500)


@pytest.fixture
def portal(home: Any) -> Iterator[tuple[HubSpotEmulator, Any]]:
    emulator = HubSpotEmulator(seed=3)
    emulator.bulk_create(
        "contacts", N, modified_at=time.time() - 7200, properties_fn=lambda i: {"email": f"c{i}@example.com"}
    )
    server = emulator.serve()
    write_config(home, "hs", rate_limit=100000, search_rate_limit=5)  # the benchmark's portal
    app = hubspot_app(server.url, emulator.private_app_token)
    try:
        yield emulator, app
    finally:
        app.close()
        server.stop()


def _ids(pages: list[Page]) -> list[str]:
    return [r.id for p in pages for r in p.records]


def _calls(emulator: HubSpotEmulator, kind: str) -> int:
    routes = emulator.stats.by_route.items()
    if kind == "search":
        return sum(n for route, n in routes if "search" in route)
    return sum(n for route, n in routes if route.startswith("GET") and "search" not in route)


def test_a_first_walk_meets_in_the_middle_and_reads_every_record_once(portal: tuple[HubSpotEmulator, Any]) -> None:
    emulator, app = portal
    emulator.stats.by_route.clear()
    pages, end = _walk(_provider(app), None)
    ids = _ids(pages)
    assert len(ids) == len(set(ids)) == N
    assert _calls(emulator, "search") >= 2 and _calls(emulator, "list") >= 2  # both sides read
    plan = next(p.cursor for p in pages if p.cursor and p.cursor.get("mode") == "partitioned")
    assert plan["kind"] == partitioned.FRONTIER and set(plan["parts"]) == {"list", "search"}
    newest = max(_prop_ms(r, "lastmodifieddate") or 0 for p in pages for r in p.records)
    assert end == {"mode": "search", "ts": newest, "archived_ts": newest}
    assert any(p.total == N for p in pages)


def test_a_list_that_meets_the_search_before_its_next_search_leaves_no_searched_record_unread(
    portal: tuple[HubSpotEmulator, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_hubspot_partitioned_pull import _ListMeetsBetweenSearches

    _, app = portal
    provider = _provider(app)
    provider._assoc_batch = 1_000  # HubSpot's default limits: five search pages share one association read
    monkeypatch.setattr(_ListMeetsBetweenSearches, "waited", [])
    monkeypatch.setattr(partitioned, "_Frontier", _ListMeetsBetweenSearches)
    pages, _ = _walk(provider, None)
    assert _ListMeetsBetweenSearches.waited == [True]  # the list did meet the search while it waited
    ids = _ids(pages)
    assert len(ids) == len(set(ids)) == N


@pytest.mark.parametrize("stop", [150, 1_200])
def test_a_walk_stopped_after_some_pages_resumes_each_side_and_ends_on_the_same_cursor(
    portal: tuple[HubSpotEmulator, Any], stop: int
) -> None:
    _, app = portal
    whole, reference = _walk(_provider(app), None)
    first, cursor = _walk(_provider(app), None, stop=stop)
    assert cursor is not None and cursor["mode"] == "partitioned"
    rest, end = _walk(_provider(app), cursor)
    ids = _ids(first) + _ids(rest)
    assert len(ids) == len(set(ids)) == N and set(ids) == set(_ids(whole))
    # Where the search side stored no page before the stop and the list then read the rest before the
    # search's first answer, the list read every record: the hand-over says so ("listed", no look-back).
    # Either way the hand-over is right; which side read the last records is the machine's timing.
    flags = ("listed", "after_ts")
    assert {k: v for k, v in end.items() if k not in flags} == {k: v for k, v in reference.items() if k not in flags}


def test_a_small_first_walk_is_one_list_chain_and_one_search(home: Any) -> None:
    emulator = HubSpotEmulator(seed=4)
    emulator.bulk_create("contacts", 450, modified_at=time.time() - 60, properties_fn=lambda i: {"email": f"s{i}@x.io"})
    server = emulator.serve()
    write_config(home, "hs", rate_limit=100000, search_rate_limit=5)
    app = hubspot_app(server.url, emulator.private_app_token)
    try:
        emulator.stats.by_route.clear()
        pages, end = _walk(_provider(app), None)
        assert sorted(_ids(pages), key=int) == sorted(set(_ids(pages)), key=int) and len(_ids(pages)) == 450
        assert _calls(emulator, "search") == 1 and _calls(emulator, "list") == 5
        assert end["mode"] == "search" and end["listed"] is True  # nothing to look back for
    finally:
        app.close()
        server.stop()


def test_records_created_during_the_walk_are_left_to_the_next_pull(portal: tuple[HubSpotEmulator, Any]) -> None:
    emulator, app = portal
    gen = _provider(app).changes("contacts", None, fields=FIELDS)
    pages = [next(gen)]
    late = emulator.bulk_create("contacts", 3, modified_at=time.time(), properties_fn=lambda i: {"email": f"l{i}@x"})
    pages += list(gen)
    end = pages[-1].cursor
    assert end is not None and end["ts"] <= int(time.time() * 1000)
    read = set(_ids(pages))
    assert len(read) == len(_ids(pages))
    # Whatever the walk did not read of them, the next pull's search (from the hand-over) finds.
    nxt = set(_ids(list(_provider(app).changes("contacts", end, fields=FIELDS))))
    assert set(late) <= read | nxt


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "partitioned", "kind": "frontier", "started": "x"},
        {"mode": "partitioned", "kind": "frontier", "started": 5, "parts": {"list": {"at": {"floor": "NaN"}}}},
        {"mode": "partitioned", "kind": "frontier", "started": 5, "parts": {"search": {"at": {"ceiling": [1]}}}},
    ],
)
def test_a_hostile_frontier_cursor_walks_again_without_failing(
    portal: tuple[HubSpotEmulator, Any], bad: dict[str, Any]
) -> None:
    _, app = portal
    pages, end = _walk(_provider(app), bad)
    assert len(set(_ids(pages))) == N and end["mode"] == "search"


def test_a_raised_search_limit_keeps_the_planned_ranges(home: Any) -> None:
    emulator = HubSpotEmulator(seed=5)
    emulator.bulk_create("contacts", N, modified_at=time.time() - 60, properties_fn=lambda i: {"email": f"r{i}@x.io"})
    server = emulator.serve()
    write_config(home, "hs", rate_limit=100000, search_rate_limit=50)
    app = hubspot_app(server.url, emulator.private_app_token)
    try:
        pages, _ = _walk(_provider(app), None)
        plan = next(p.cursor for p in pages if p.cursor and p.cursor.get("mode") == "partitioned")
        assert "ranges" in plan and "kind" not in plan
    finally:
        app.close()
        server.stop()


def test_the_engine_backfills_through_the_frontier_and_seeds_the_incremental_cursor(
    portal: tuple[HubSpotEmulator, Any],
) -> None:
    _, app = portal
    done = backfill(app, connection="hs", objects=["contacts"])
    assert done.outcome == "ok" and done.objects[0].read == N
    rows = app.store.mirror.records("hs", "contacts")
    assert len(rows) == len({r.remote_id for r in rows}) == N
    cursor = app.store.mirror.cursor("hs", "contacts")
    assert cursor is not None and cursor["mode"] == "search"
    assert app.store.mirror.cursor("hs", "contacts", "backfill") is None


def test_a_search_that_costs_association_reads_waits_while_a_cheaper_one_searches() -> None:
    from crmsync.providers.hubspot.shares import Shares

    shares = Shares()
    for obj in ("companies", "contacts", "deals"):
        shares.start(obj, "list")
        shares.start(obj, "search")
    # companies' search pages need no association reads, contacts' one per 1,000 ids, deals' two
    assert not shares.hold_search("companies")
    assert shares.hold_search("contacts") and shares.hold_search("deals")
    shares.stop("companies", "search")
    assert not shares.hold_search("contacts") and shares.hold_search("deals")
    shares.stop("deals", "list")  # its list has stopped: its search is all that reads it now
    assert not shares.hold_search("deals")
    shares.stop("contacts", "search")
    assert not any(shares.hold_search(o) for o in ("companies", "contacts", "deals"))


def test_objects_pulled_side_by_side_with_held_searches_read_every_change_once(
    home: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contacts' and companies' partitioned pulls at once (contacts' search waits on companies'): each change once."""
    from crmsync.sync.pull import pull

    monkeypatch.setattr(partitioned, "PULL_PARTITION_MIN", 300)
    monkeypatch.setattr(partitioned, "PARTITION_MIN", 5_000)  # the first pull: one list chain per object
    monkeypatch.setattr(partitioned, "PULL_RTT_CAP", 0.0)
    emulator = HubSpotEmulator(seed=6)
    old = time.time() - 7200

    def props(i: int) -> dict[str, str]:
        return {"email": f"p{i}@x.io", "name": f"P{i}"}

    ids = {o: emulator.bulk_create(o, 1_000, modified_at=old, properties_fn=props) for o in ("contacts", "companies")}
    server = emulator.serve()
    write_config(home, "hs", rate_limit=100000, search_rate_limit=5)
    app = hubspot_app(server.url, emulator.private_app_token)
    try:
        assert [r.read for r in pull(app, objects=["contacts", "companies"])[0].objects] == [1_000, 1_000]
        base = time.time() - 600
        for o in ("contacts", "companies"):
            for j, rid in enumerate(ids[o][::2]):
                emulator.edit(o, rid, {"name" if o == "companies" else "firstname": f"e{j}"}, at=base + j / 1000)
        emulator.stats.by_route.clear()
        result = pull(app, objects=["contacts", "companies"])[0]
        assert result.outcome == "ok"
        assert [(r.object, r.read, r.created, r.updated) for r in result.objects] == [
            ("contacts", 500, 0, 500),
            ("companies", 500, 0, 500),
        ]
        assert sum(n for route, n in emulator.stats.by_route.items() if "search" in route) >= 4  # partitioned
    finally:
        app.close()
        server.stop()


@pytest.mark.slow
def test_a_frontier_backfill_sigkilled_mid_walk_resumes_each_side_and_stores_every_record_once(home: Any) -> None:
    """The CLI SIGKILLed three times mid-walk (account limits: search 5/s), then run to the end."""
    from crmsync.app import App
    from crmsync.emulators.base import Faults
    from tests.e2e import cli_env
    from tests.test_resilience import _kills_mid_walk, _resumed_backfill_stores_each_once, _run_and_kill

    n = 6_000
    emulator = HubSpotEmulator(seed=8, faults=Faults(latency_ms=20, seed=8))
    stamp = time.time() - 3600
    emulator.bulk_create("contacts", n, modified_at=stamp, properties_fn=lambda i: {"email": f"k{i}@x.io"})
    server = emulator.serve()
    try:
        write_config(home, "hs", rate_limit=100000, search_rate_limit=5)
        reference = hubspot_app(server.url, emulator.private_app_token, db=str(home / "reference.db"))
        assert backfill(reference, connection="hs", objects=["contacts"]).objects[0].read == n
        expected = reference.store.mirror.cursor("hs", "contacts")
        reference.close()
        hubspot_app(server.url, emulator.private_app_token).close()
        env = cli_env(home, "hs", emulator.private_app_token)
        args = ["--quiet", "backfill", "-c", "hs", "--object", "contacts"]

        def kill(after: int) -> int | None:
            return _run_and_kill(args, env, emulator, after_requests=after, then=0.05)

        assert _kills_mid_walk(kill, (6, 12, 18), home, "hs", lambda c: c.get("kind") == partitioned.FRONTIER) >= 2
        _resumed_backfill_stores_each_once(env, home, "hs", n)  # each side went on from its checkpoint
        app = App(env={"CRMSYNC_HOME": str(home)})
        assert app.store.mirror.cursor("hs", "contacts") == expected  # where an uninterrupted walk ends
        app.close()
    finally:
        server.stop()
