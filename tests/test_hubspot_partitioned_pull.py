"""HubSpot's large incremental pull: the list walk upwards and a keyset search downwards, meeting.

Small sizes: the thresholds are lowered for the test, the emulator runs in process on loopback.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from crmsync.emulators.base import Faults
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.providers.base import Page
from crmsync.providers.hubspot import partitioned
from crmsync.providers.hubspot.values import PULL_MODE
from crmsync.sync.pull import pull
from tests.e2e import hubspot_app, write_config

FIELDS = ["email", "firstname"]
N = 3_000  # contacts before the changes


@pytest.fixture
def portal(home: Any) -> Iterator[tuple[HubSpotEmulator, Any]]:
    """3,001 contacts pulled once, then edits spread over the whole id space and new contacts."""
    emulator = HubSpotEmulator(seed=7)
    ids = emulator.bulk_create(
        "contacts", N, modified_at=time.time() - 7200, properties_fn=lambda i: {"email": f"c{i}@example.com"}
    )
    # The newest record an hour later, so the first pull's cursor (and its look-back) is past the others.
    emulator.bulk_create("contacts", 1, modified_at=time.time() - 3600, properties_fn=lambda i: {"email": "z@x.io"})
    server = emulator.serve()
    # A search limit a single keyset chain can keep busy at the emulator's round trip (as at HubSpot's).
    write_config(home, "hs", rate_limit=100000, search_rate_limit=20)
    app = hubspot_app(server.url, emulator.private_app_token)
    assert pull(app, objects=["contacts"])[0].objects[0].read == N + 1
    emulator.ids = ids  # type: ignore[attr-defined]
    try:
        yield emulator, app
    finally:
        app.close()
        server.stop()


def _change(emulator: HubSpotEmulator, *, every: int = 2, created: int = 300) -> set[str]:
    """Edit every ``every``-th contact (stamped ten minutes ago, one ms apart) and create some: the changed ids."""
    ids: list[str] = emulator.ids  # type: ignore[attr-defined]
    base = time.time() - 600
    changed = set()
    for j, rid in enumerate(ids[::every]):
        emulator.edit("contacts", rid, {"firstname": f"Edited{j}"}, at=base + j / 1000)
        changed.add(rid)
    changed |= set(
        emulator.bulk_create(
            "contacts", created, modified_at=base + 5, properties_fn=lambda i: {"email": f"new{i}@example.com"}
        )
    )
    return changed


def _provider(app: Any) -> Any:
    return app.provider(app.connection("hs"))


def _walk(provider: Any, cursor: Any, stop: int | None = None) -> tuple[list[Page], Any]:
    """The pages of one pull (up to the one that brings ``stop`` records, as a kill after storing them would leave)."""
    pages: list[Page] = []
    gen = provider.changes("contacts", cursor, fields=FIELDS)
    for page in gen:
        pages.append(page)
        if stop is not None and len(_ids(pages)) >= stop:
            gen.close()
            break
    last = next((p.cursor for p in reversed(pages) if p.cursor is not None), cursor)
    return pages, last


def _ids(pages: list[Page]) -> list[str]:
    return [r.id for p in pages for r in p.records if not r.archived]


def _same(props: dict[str, str], _i: int) -> dict[str, str]:
    return props


def _routes(emulator: HubSpotEmulator) -> dict[str, int]:
    return {route: n for route, n in emulator.stats.by_route.items() if n}


@pytest.fixture
def low_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitioned, "PULL_PARTITION_MIN", 500)
    monkeypatch.setattr(partitioned, "PULL_RTT_CAP", 0.0)  # a busy machine's slow first answer must not decide


def test_a_partitioned_pull_reads_every_change_once_and_ends_where_one_search_walk_does(
    portal: tuple[HubSpotEmulator, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator, app = portal
    changed = _change(emulator)
    provider = _provider(app)
    cursor = app.store.mirror.cursor("hs", "contacts")

    monkeypatch.setattr(partitioned, "PULL_PARTITION_MIN", 10**9)
    plain, plain_end = _walk(provider, cursor)
    assert all(p.cursor is None or p.cursor.get("mode") == "search" for p in plain)

    monkeypatch.setattr(partitioned, "PULL_PARTITION_MIN", 500)
    monkeypatch.setattr(partitioned, "PULL_RTT_CAP", 0.0)
    emulator.stats.by_route.clear()
    pages, end = _walk(provider, cursor)
    ids = _ids(pages)
    assert len(ids) == len(set(ids)) and set(ids) == set(_ids(plain))  # the newest first-pull record: look-back
    assert changed <= set(ids) and len(ids) == len(changed) + 1
    assert any(p.cursor and p.cursor.get("mode") == PULL_MODE for p in pages)
    routes = _routes(emulator)
    assert routes.get("GET crm.objects.list", 0) > 2  # the list side read its share ...
    assert routes.get("POST crm.objects.search", 0) > 2  # ... beside the search side
    keys = ("mode", "ts", "archived_ts")
    assert {k: end[k] for k in keys} == {k: plain_end[k] for k in keys}


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_a_pull_stopped_after_some_pages_resumes_every_partition(
    portal: tuple[HubSpotEmulator, Any], low_thresholds: None, share: float
) -> None:
    emulator, app = portal
    changed = _change(emulator, every=3)
    provider = _provider(app)
    cursor = app.store.mirror.cursor("hs", "contacts")
    whole, whole_end = _walk(provider, cursor)
    first, at = _walk(provider, cursor, stop=max(1, int(len(_ids(whole)) * share)))
    assert at["mode"] == PULL_MODE
    rest, end = _walk(provider, at)
    ids = _ids(first) + _ids(rest)
    assert len(ids) == len(set(ids)) and set(ids) == set(_ids(whole)) and changed <= set(ids)
    assert len(_ids(rest)) < len(_ids(whole))  # went on from where it stopped
    assert end["ts"] == whole_end["ts"] and end["archived_ts"] == whole_end["archived_ts"]


class _ListMeetsBetweenSearches(partitioned._Frontier):
    """A frontier whose search side, after its ``wait_after``-th claim, waits until the list side has met it.

    The interleaving a busy machine makes now and then: the search claimed a page (its records not
    handed on yet, waiting for a batch's association read) and the list reaches its claim before the
    next search goes out. An event, not a sleep, so the interleaving happens every run.
    """

    wait_after = 1
    waited: list[bool] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claims = 0
        self._meeting = threading.Event()

    def claim_low(self, ids: list[int], *, exhausted: bool) -> tuple[set[int], int, bool]:
        out = super().claim_low(ids, exhausted=exhausted)
        if self.met():
            self._meeting.set()
        return out

    def claim_high(self, ids: list[int], *, exhausted: bool) -> tuple[set[int], int, bool]:
        out = super().claim_high(ids, exhausted=exhausted)
        self._claims += 1
        if self._claims == self.wait_after and not out[2]:
            type(self).waited.append(self._meeting.wait(timeout=20))
        return out


@pytest.mark.parametrize(
    ("assoc_batch", "wait_after"),
    [
        (1_000, 1),  # HubSpot's default limits: five search pages share one association read
        (200, 2),  # a page per read; the second page is one short (the plan's first page holds one of its ids)
    ],
)
def test_a_list_that_meets_the_search_before_its_next_search_leaves_no_searched_record_unread(
    portal: tuple[HubSpotEmulator, Any],
    low_thresholds: None,
    monkeypatch: pytest.MonkeyPatch,
    assoc_batch: int,
    wait_after: int,
) -> None:
    emulator, app = portal
    changed = _change(emulator, every=3)
    provider = _provider(app)
    provider._assoc_batch = assoc_batch
    monkeypatch.setattr(_ListMeetsBetweenSearches, "wait_after", wait_after)
    monkeypatch.setattr(_ListMeetsBetweenSearches, "waited", [])
    monkeypatch.setattr(partitioned, "_Frontier", _ListMeetsBetweenSearches)
    pages, _ = _walk(provider, app.store.mirror.cursor("hs", "contacts"))
    assert _ListMeetsBetweenSearches.waited == [True]  # the list did meet the search while it waited
    ids = _ids(pages)
    assert len(ids) == len(set(ids)) and changed <= set(ids)


def test_the_list_side_stops_where_it_finds_few_changes_and_the_search_reads_the_rest(
    portal: tuple[HubSpotEmulator, Any], low_thresholds: None
) -> None:
    emulator, app = portal
    ids: list[str] = emulator.ids  # type: ignore[attr-defined]
    base = time.time() - 600
    top = ids[-1_000:]  # only the newest thousand contacts changed: the low ids hold nothing to pull
    for j, rid in enumerate(top):
        emulator.edit("contacts", rid, {"firstname": f"E{j}"}, at=base + j / 1000)
    emulator.stats.by_route.clear()
    pages, _ = _walk(_provider(app), app.store.mirror.cursor("hs", "contacts"))
    got = _ids(pages)
    assert len(got) == len(set(got)) and set(top) <= set(got) and len(got) == len(top) + 1
    assert emulator.stats.by_route["GET crm.objects.list"] <= partitioned.PULL_LIST_TRIAL + 1  # and the archived


def test_a_pull_killed_before_it_stored_a_page_reads_the_plans_first_page_again_by_id(
    portal: tuple[HubSpotEmulator, Any], low_thresholds: None
) -> None:
    emulator, app = portal
    _change(emulator)
    provider = _provider(app)
    cursor = app.store.mirror.cursor("hs", "contacts")
    whole, whole_end = _walk(provider, cursor)
    plan = next(p.cursor for p in whole if p.cursor and p.cursor["mode"] == PULL_MODE)
    assert len(plan["seen"]) == 200  # the walk's first page, kept rather than asked for again
    emulator.stats.by_route.clear()
    again, end = _walk(provider, {k: v for k, v in plan.items() if k != "parts"})
    assert emulator.stats.by_route["POST crm.objects.batch.read"] == 2  # the first page's 200 records, by id
    ids = _ids(again)
    assert len(ids) == len(set(ids)) and set(ids) == set(_ids(whole)) and end["ts"] == whole_end["ts"]


def test_changes_made_during_the_pull_and_archived_records_are_found(
    portal: tuple[HubSpotEmulator, Any], low_thresholds: None
) -> None:
    emulator, app = portal
    changed = _change(emulator)
    ids: list[str] = emulator.ids  # type: ignore[attr-defined]
    gone, late, early = ids[1], ids[3], ids[0]  # untouched by _change, _change, and edited by it
    emulator.archive("contacts", gone)
    provider = _provider(app)
    pages: list[Page] = []
    gen = provider.changes("contacts", app.store.mirror.cursor("hs", "contacts"), fields=FIELDS)
    for page in gen:
        pages.append(page)
        if len(pages) == 3:  # while the pull runs, two records change
            emulator.edit("contacts", late, {"firstname": "Late"})
            emulator.edit("contacts", early, {"firstname": "Again"})
    cursor = next(p.cursor for p in reversed(pages) if p.cursor is not None)
    assert cursor["mode"] == "search" and any(p.cursor and p.cursor["mode"] == PULL_MODE for p in pages)
    assert gone in {r.id for p in pages for r in p.records if r.archived}
    assert changed - {early} <= set(_ids(pages))
    time.sleep(0.01)
    after, _ = _walk(provider, cursor)
    seen = {r.id: r.properties.get("firstname") for p in after for r in p.records}
    assert seen.get(late) == "Late" and seen.get(early) == "Again"


@pytest.mark.parametrize("n", [50, 1_998])
def test_a_small_pull_makes_exactly_the_requests_it_made_before(portal: tuple[HubSpotEmulator, Any], n: int) -> None:
    emulator, app = portal
    ids: list[str] = emulator.ids  # type: ignore[attr-defined]
    base = time.time() - 600
    for j, rid in enumerate(ids[:n]):
        emulator.edit("contacts", rid, {"firstname": f"E{j}"}, at=base + j / 1000)
    emulator.stats.by_route.clear()
    result = pull(app, objects=["contacts"])[0]
    assert result.outcome == "ok" and result.objects[0].read == n + 1  # and the first pull's newest: look-back
    pages = -(-(n + 1) // 200)
    # Counted on the code before partitioned pulls: one search and one association read per page of
    # 200, one archived list; no probe of the whole object, no list page.
    assert _routes(emulator) == {
        "POST crm.objects.search": pages,
        "POST crm.associations.batch.read": pages,
        "GET crm.objects.list": 1,
    }


def test_a_partitioned_pull_stays_within_both_limits(home: Any, low_thresholds: None) -> None:
    emulator = HubSpotEmulator(seed=9)
    ids = emulator.bulk_create("contacts", 1_200, modified_at=time.time() - 7200, properties_fn=lambda i: {})
    base = time.time() - 600
    for j, rid in enumerate(ids[::2]):
        emulator.edit("contacts", rid, {"firstname": f"E{j}"}, at=base + j / 1000)
    server = emulator.serve()
    try:
        write_config(home, "hs", rate_limit=30, search_rate_limit=2, lookback_seconds=1)
        app = hubspot_app(server.url, emulator.private_app_token)
        cursor = {"mode": "search", "ts": int((base - 60) * 1000), "archived_ts": 0, "hi": int(base * 1000)}
        emulator.faults = Faults(latency_ms=20, rate_limits={"default": (30, 10.0), "search": (2, 1.0)})
        emulator.stats.by_route.clear()
        pages, _ = _walk(_provider(app), cursor)
        assert any(p.cursor and p.cursor.get("mode") == PULL_MODE for p in pages)
        assert len(_ids(pages)) == len(set(_ids(pages))) == 600
        assert emulator.stats.by_route["POST crm.objects.search"] > 2  # more than the search limit allows at once
        assert emulator.stats.rate_limited == 0
        app.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "cursor",
    [
        {"mode": PULL_MODE},
        {"mode": PULL_MODE, "ts": "yesterday", "parts": "junk"},
        {"mode": PULL_MODE, "ts": 0, "upper": None, "archived_ts": 0, "parts": {"list": 5}},
    ],
)
def test_a_hostile_partitioned_cursor_reads_every_change_again_without_failing(
    portal: tuple[HubSpotEmulator, Any], cursor: dict[str, Any]
) -> None:
    emulator, app = portal
    changed = _change(emulator, created=0)
    pages, end = _walk(_provider(app), cursor)
    assert changed <= set(_ids(pages)) and end["mode"] == "search"


def test_a_backfill_list_partition_whose_last_page_was_stored_does_not_start_again(
    portal: tuple[HubSpotEmulator, Any],
) -> None:
    """Killed between storing the list's last page (no ``after`` left) and its end mark: nothing is read again."""
    emulator, app = portal
    emulator.stats.by_route.clear()
    assert list(_provider(app)._list_below("contacts", FIELDS, 10**9, {"after": None, "newest": 5})) == []
    assert not _routes(emulator)


def test_the_engine_stores_a_partitioned_pull_and_the_next_pull_is_small(
    portal: tuple[HubSpotEmulator, Any], low_thresholds: None
) -> None:
    emulator, app = portal
    changed = _change(emulator)
    result = pull(app, objects=["contacts"])[0]
    assert result.outcome == "ok" and result.objects[0].read == len(changed) + 1
    assert emulator.stats.by_route["GET crm.objects.list"] > 2  # the list side took part
    stored = {r.remote_id: r for r in app.store.mirror.records("hs", "contacts")}
    remote = {str(r["id"]): r["properties"].get("firstname") for r in emulator.records("contacts")}
    assert len(stored) == len(remote) and all(stored[i].raw.get("firstname") == remote[i] for i in changed)
    cursor = app.store.mirror.cursor("hs", "contacts")
    assert cursor is not None and cursor["mode"] == "search"
    again = pull(app, objects=["contacts"])[0]
    # Only what shares the newest stamp is read again (the look-back), and nothing is new in it.
    assert (
        again.outcome == "ok" and again.objects[0].read <= 300 and again.objects[0].unchanged == again.objects[0].read
    )


def test_changes_the_search_index_had_not_caught_up_with_are_read_by_the_next_pull(
    portal: tuple[HubSpotEmulator, Any], low_thresholds: None, home: Any
) -> None:
    emulator, app = portal
    changed = _change(emulator, created=0)
    fresh = set(emulator.bulk_create("contacts", 300, modified_at=time.time() - 0.5, properties_fn=lambda i: {}))
    emulator.search_lag_ms = 2_000
    write_config(home, "hs", rate_limit=100000, search_rate_limit=20, lookback_seconds=5)
    provider = _provider(app)
    pages, cursor = _walk(provider, app.store.mirror.cursor("hs", "contacts"))
    assert any(p.cursor and p.cursor.get("mode") == PULL_MODE for p in pages)
    first = set(_ids(pages))
    assert changed <= first and not fresh <= first  # the search side could not see them (so this can fail)
    time.sleep(2.1)
    after, _ = _walk(provider, cursor)
    assert fresh <= first | set(_ids(after))


def test_a_raised_search_limit_keeps_the_offset_walk(portal: tuple[HubSpotEmulator, Any], low_thresholds: None) -> None:
    """One keyset chain would leave a limit of 1,000 searches a second idle: several offset pages go at once instead."""
    emulator, app = portal
    changed = _change(emulator)
    partitioned.PULL_RTT_CAP = 0.25  # restored by the fixture's monkeypatch
    provider = _provider(app)
    provider._search_rps = 1000.0
    emulator.stats.by_route.clear()
    pages, _ = _walk(provider, app.store.mirror.cursor("hs", "contacts"))
    assert not any(p.cursor and p.cursor.get("mode") == PULL_MODE for p in pages)
    assert changed <= set(_ids(pages)) and emulator.stats.by_route["GET crm.objects.list"] == 1  # the archived list


def test_a_record_edited_while_the_search_walk_reads_hides_no_other(home: Any) -> None:
    """The search walk pages by offset: a record edited after the run began leaves its window, every
    later record moves one place back, and the one at the page boundary would never be read (its
    stamp is older than the cursor the walk ends on). The walk notices the window shrink and searches
    again from the last page's stamp."""
    import httpx

    emulator = HubSpotEmulator(seed=3)
    base = time.time() - 3600
    ids: list[str] = []
    for i in range(500):  # one second apart: the search sorts them in this order
        email = {"email": f"{i}@x.io"}
        ids += emulator.bulk_create("contacts", 1, modified_at=base + i, properties_fn=functools.partial(_same, email))
    inner = emulator.transport()
    searches: list[int] = []

    class EditAfterFirstPage(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = inner.handle_request(request)
            if request.url.path.endswith("/search") and b"lastmodifieddate" in request.content:
                searches.append(1)
                if len(searches) == 1:  # a rep edits a record already read, while the walk goes on
                    emulator.edit("contacts", ids[10], {"firstname": "Edited"}, at=time.time() + 60)
            return response

    app = hubspot_app("http://hs.test", emulator.private_app_token, transport=lambda _name: EditAfterFirstPage())
    try:
        pages, _ = _walk(_provider(app), {"mode": "search", "ts": 1})
        assert {r.id for p in pages for r in p.records} == set(ids)  # ids[200] was the one hidden
    finally:
        app.close()
