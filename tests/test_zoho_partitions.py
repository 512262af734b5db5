"""Zoho: a large walk's middle read as id ranges side by side, checkpointed per range (issue 31).

Pages of 10 rows and a threshold of 30 stand in for 2,000 and 6,000, so every case stays small.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.emulators.base import Faults
from crmsync.emulators.zoho import ZohoEmulator
from crmsync.providers.base import Page
from crmsync.sync.pull import backfill, pull
from tests.e2e import pull_stopped_before_page, write_config
from tests.test_provider_zoho import provider_of, zoho_app

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
UNTIL = T0 + timedelta(days=1)
FIELDS = ["Last_Name", "Email"]


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("crmsync.providers.zoho.reads.COQL_ROWS", 10)
    monkeypatch.setattr("crmsync.providers.zoho.partitioned.COQL_ROWS", 10)
    monkeypatch.setattr("crmsync.providers.zoho.reads.PARTITION_MIN", 30)


def _seed(emu: ZohoEmulator, n: int) -> list[str]:
    """``n`` contacts: a block sharing one second (a bulk import), the rest a few to each second."""
    ids = list(emu.bulk_create("Contacts", n // 3, modified_time=T0))
    for k in range(n - len(ids)):
        ids += emu.bulk_create("Contacts", 1, modified_time=T0 + timedelta(seconds=1 + k // 3))
    return ids


def _queries(emu: ZohoEmulator) -> list[str]:
    seen: list[str] = []
    handle = emu._dispatch

    def spy(request: httpx.Request, *args: Any) -> Any:
        if request.url.path.endswith("/coql"):
            seen.append(json.loads(request.content)["select_query"])
        return handle(request, *args)

    emu._dispatch = spy  # type: ignore[method-assign,assignment]
    return seen


def _ids(pages: list[Page]) -> list[str]:
    return [r.id for p in pages for r in p.records]


def test_partitioned_walk_reads_each_record_once_and_ends_on_the_unpartitioned_cursor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emu = ZohoEmulator()
    ids = _seed(emu, 300)
    provider = provider_of(zoho_app(emu))
    queries = _queries(emu)
    pages = list(provider.changes("contacts", None, fields=FIELDS, until=UNTIL))
    seen = _ids(pages)
    assert len(seen) == len(set(seen)) and set(seen) == set(ids)
    ranged = [q for q in queries if "order by id asc" in q and "id <=" in q]
    assert len(ranged) >= 10  # the middle really went through id ranges
    assert not any(" offset " in q or "limit 0," in q for q in queries)
    assert any(p.cursor and p.cursor.get("mode") == "partitioned" for p in pages)
    final = pages[-1].cursor
    assert final is not None and "mode" not in final

    monkeypatch.setattr("crmsync.providers.zoho.reads.PARTITION_MIN", 10**9)
    plain = list(provider.changes("contacts", None, fields=FIELDS, until=UNTIL))
    assert sorted(_ids(plain)) == sorted(seen)
    assert plain[-1].cursor == final  # the same incremental cursor (ts, id, hi, deleted_ts)


@pytest.mark.parametrize("stop_after", [1, 4, 5, 6, 9, 17, 30])
def test_a_walk_stopped_after_any_page_resumes_every_range_reading_nothing_twice(stop_after: int) -> None:
    emu = ZohoEmulator()
    ids = _seed(emu, 240)
    provider = provider_of(zoho_app(emu))
    whole = list(provider.changes("contacts", None, fields=FIELDS, until=UNTIL))
    stored: list[str] = []
    cursor: dict[str, Any] | None = None
    gen = provider.changes("contacts", None, fields=FIELDS, until=UNTIL)
    for n, page in enumerate(gen, 1):
        stored += [r.id for r in page.records]  # page and cursor "in one transaction"
        cursor = page.cursor or cursor
        if n == stop_after:
            break
    gen.close()  # type: ignore[attr-defined]  # a generator, as the engine's kill leaves it
    before_resume = list(stored)
    rest = list(provider.changes("contacts", cursor, fields=FIELDS, until=UNTIL + timedelta(hours=1)))
    again = _ids(rest)
    if cursor is not None and cursor.get("mode") == "partitioned":
        assert not set(again) & set(before_resume)  # each range went on after its last stored page
    stored += again
    assert set(stored) == set(ids)
    end, expected = rest[-1].cursor, whole[-1].cursor
    assert end is not None and expected is not None
    if cursor is not None and cursor.get("mode") == "partitioned":
        assert end == expected  # the plan keeps the run's upper bound: the very same cursor
    else:
        assert (end["ts"], end["id"]) == (expected["ts"], expected["id"])


def test_changes_during_the_walk_and_deletions_are_found_by_the_next_pull(home: Path) -> None:
    emu = ZohoEmulator()
    ids = _seed(emu, 200)
    app = zoho_app(emu)
    queries = _queries(emu)
    handle, once = emu._dispatch, threading.Lock()

    def meddle(request: httpx.Request, *args: Any) -> Any:
        # Once the ranges are being read: an edit in a range, a deletion, a new record.
        if any("id <=" in q for q in queries) and once.acquire(blocking=False):
            emu.edit("Contacts", ids[150], {"Last_Name": "Moved"})
            emu.edit("Contacts", ids[3], {"Last_Name": "Early"})
            emu.delete("Contacts", ids[120])
            emu.create("Contacts", {"Last_Name": "Newcomer", "Email": "new@example.com"})
        return handle(request, *args)

    emu._dispatch = meddle  # type: ignore[method-assign,assignment]
    first = backfill(app, connection="z", objects=["contacts"])
    assert first.outcome == "ok" and once.locked()
    second = pull(app, objects=["contacts"])[0]
    assert second.outcome == "ok", second.error
    live = {r["id"] for r in emu.records("Contacts")}
    rows = app.store.mirror.records("z", "contacts")
    assert len(rows) == len({r.remote_id for r in rows})
    stored = {r.remote_id: r for r in rows}
    assert {rid for rid, r in stored.items() if not r.archived} == live
    assert stored[ids[150]].properties["last_name"] == "Moved"
    assert stored[ids[3]].properties["last_name"] == "Early"
    assert ids[120] not in stored or stored[ids[120]].archived
    third = pull(app, objects=["contacts"])[0]
    assert third.objects[0].created == 0 and third.objects[0].updated == 0


@pytest.mark.parametrize("concurrency", [2, 4, 12])
def test_requests_in_flight_never_exceed_the_configured_concurrency(home: Path, concurrency: int) -> None:
    """Nor COQL calls Zoho's sub-concurrency of 10, when the configured concurrency is higher."""
    emu = ZohoEmulator()
    _seed(emu, 300)
    emu.bulk_create("Deals", 300, modified_time=T0)
    emu.bulk_create("Accounts", 300, modified_time=T0)
    write_config(home, "z", concurrency=concurrency)
    app = zoho_app(emu)
    # Long enough answers that more than 10 COQL calls would be in flight if nothing held them back.
    emu.faults = Faults(latency_ms=40 if concurrency > 10 else 5, max_concurrent=concurrency, seed=1)
    emu.sub_concurrency = min(concurrency, 10)
    done = backfill(app, connection="z", objects=["contacts", "deals", "companies"])
    assert done.outcome == "ok"
    assert emu.stats.rate_limited == 0
    assert 1 < emu.stats.concurrent_peak <= concurrency
    assert len(app.store.mirror.records("z", "contacts")) == 300


@pytest.mark.parametrize(
    "hostile",
    [
        {"mode": "partitioned", "parts": "x"},
        {"mode": "partitioned", "base": {"ts": "2025-06-01T12:00:00+00:00"}, "ranges": [[5, 1]]},
        {"mode": "partitioned", "base": {"ts": "x"}, "ranges": [[1, 2], [2, 3]], "low": [1, 2]},
        {"mode": "partitioned", "parts": {"r0": {"at": {"last": "NaN"}}}, "ranges": [[1, 10**30]]},
    ],
)
def test_a_stored_cursor_of_another_shape_is_read_again_not_a_traceback(hostile: dict[str, Any]) -> None:
    emu = ZohoEmulator()
    ids = _seed(emu, 60)
    provider = provider_of(zoho_app(emu))
    seen = _ids(list(provider.changes("contacts", hostile, fields=FIELDS, until=UNTIL)))
    assert set(seen) == set(ids) and len(seen) == len(set(seen))


def test_a_plan_whose_range_positions_are_damaged_rereads_only_those_ranges() -> None:
    emu = ZohoEmulator()
    ids = _seed(emu, 200)
    provider = provider_of(zoho_app(emu))
    pages = list(provider.changes("contacts", None, fields=FIELDS, until=UNTIL))
    plan = next(p.cursor for p in pages if p.cursor and p.cursor.get("mode") == "partitioned")
    assert plan is not None
    damaged = {**plan, "parts": {"r0": {"at": {"last": -5, "newest": "?"}, "done": False}, "zz": 1}}
    seen = _ids(list(provider.changes("contacts", damaged, fields=FIELDS, until=UNTIL)))
    assert len(seen) == len(set(seen)) and set(seen) <= set(ids)


def test_emulator_takes_id_ranges_but_refuses_ranges_on_lookups_as_coql_does() -> None:
    emu = ZohoEmulator()
    accounts = emu.bulk_create("Accounts", 2, modified_time=T0)
    ids = emu.bulk_create("Contacts", 30, modified_time=T0, fields={"Account_Name": accounts[0]})
    token = emu.issue_token()["access_token"]
    client = httpx.Client(
        transport=emu.transport(),
        base_url="https://www.zohoapis.com/crm/v8",
        headers={"Authorization": f"Zoho-oauthtoken {token}"},
    )

    def coql(where: str, order: str = "id asc") -> httpx.Response:
        return client.post("/coql", json={"select_query": f"select id from Contacts where {where} order by {order}"})

    got = coql(f"(id > {ids[4]} and id <= {ids[9]})").json()
    assert [r["id"] for r in got["data"]] == ids[5:10] and got["info"]["more_records"] is False
    # The scan that stops at a range's end answers as the full scan does.
    scanned = coql(f"((id > {ids[4]} and id <= {ids[9]}) and Last_Name is not null)", "Modified_Time asc, id asc")
    assert [r["id"] for r in scanned.json()["data"]] == ids[5:10]
    for where in (
        f"Account_Name > {accounts[0]}",
        f"Account_Name.id <= {accounts[1]}",
        f"Account_Name between {accounts[0]} and {accounts[1]}",
        "Last_Name between 'a' and 'z'",
    ):
        refused = coql(where)
        assert refused.status_code == 400 and refused.json()["code"] == "INVALID_QUERY", where
    assert coql(f"Account_Name = {accounts[0]}").status_code == 200


@pytest.mark.parametrize("kill_at", [5, 9, 14])
def test_a_pull_killed_mid_split_resumes_each_range_and_stores_every_record_once(
    kill_at: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CRMSYNC_HOME", str(tmp_path))
    emu = ZohoEmulator()
    ids = _seed(emu, 200)
    app = zoho_app(emu)
    assert pull_stopped_before_page(app, kill_at, ["contacts"])
    checkpoint = app.store.mirror.cursor("z", "contacts")
    assert checkpoint is not None and checkpoint.get("mode") == "partitioned"
    stored = len(app.store.mirror.records("z", "contacts"))
    resumed = pull(app, objects=["contacts"])[0]
    assert resumed.outcome == "ok", resumed.error
    assert resumed.objects[0].read == len(ids) - stored  # each range went on from its stored page
    rows = app.store.mirror.records("z", "contacts")
    assert len(rows) == len({r.remote_id for r in rows}) == len(ids)
    cursor = app.store.mirror.cursor("z", "contacts")
    assert cursor is not None and "mode" not in cursor and cursor["id"] in ids


@pytest.mark.slow
def test_a_backfill_sigkilled_mid_split_resumes_each_range_and_stores_every_record_once(home: Path) -> None:
    """The CLI with Zoho's own page size and threshold, SIGKILLed while the ranges are read."""
    from crmsync.app import App
    from crmsync.sync.connect import connect
    from tests.e2e import ScriptIO, cli_env, run_cli
    from tests.test_resilience import _kills_mid_walk, _resumed_backfill_stores_each_once, _run_and_kill_when, _stored

    n = 16_000
    emu = ZohoEmulator()
    emu.bulk_create("Contacts", n, modified_time=T0)
    with emu.serve() as server:
        app = App()
        options = {"client_id": emu.client_id, "grant_code": emu.grant_code()}
        connect(app, provider="zoho", name="zk", base_url=server.url, options=options, io=ScriptIO(emu.client_secret))
        secret = json.dumps(app.secrets.get("zk"))
        app.close()
        emu.faults = Faults(latency_ms=30, seed=3)
        env = cli_env(home, "zk", secret)
        args = ["--quiet", "backfill", "-c", "zk", "--object", "contacts"]
        db = home / "crmsync.db"

        def kill(target: int) -> int | None:
            # Killed once a range's page is stored (the plan is stored before any): by progress, not the clock.
            return _run_and_kill_when(args, env, lambda: _stored(db, "zk", "contacts") >= target, then=0.05)

        assert _kills_mid_walk(kill, (8_000, 10_000, 12_000), home, "zk", lambda c: c.get("mode") == "partitioned") >= 2
        _resumed_backfill_stores_each_once(env, home, "zk", n)  # each range went on from its checkpoint
        nxt = run_cli(["--json", "pull", "-c", "zk", "--object", "contacts"], env)
        assert nxt.code == 0, nxt.stderr
        assert json.loads(nxt.stdout)["results"][0]["objects"]["contacts"]["created"] == 0
