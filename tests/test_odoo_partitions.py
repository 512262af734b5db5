"""Odoo: a large write_date window read in id ranges side by side, one per request in flight (issue 31).

Small sizes: pages of 10 and a window split above 20 records (settings ``page_size`` and
``partition_min``), against the in-process emulator over JSON-RPC (17) and JSON-2 (19).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.app import App
from crmsync.emulators.odoo import OdooEmulator
from crmsync.providers.odoo import OdooProvider
from crmsync.sync.connect import connect
from crmsync.sync.pull import backfill, pull
from tests.e2e import ScriptIO, cli_env, run_cli, write_config

SETUPS = [("jsonrpc", 17), ("json2", 19)]
OWN = 2  # contacts the database has of its own (the bot user, OdooBot)


class Spy:
    """The emulator behind a transport that counts requests in flight and keeps each search_read's body."""

    def __init__(self, emu: OdooEmulator, hold: float = 0.0) -> None:
        self.emu, self.hold = emu, hold
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.reads: list[dict[str, Any]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []  # every ORM call: (method, named arguments)
        self.during: Any = None

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            if self.hold:
                time.sleep(self.hold)  # long enough for requests of other threads to overlap
            method = _method(request)
            if method:
                with self.lock:
                    self.calls.append((method, _body(request)))
            if method == "search_read":
                with self.lock:
                    self.reads.append(_body(request))
                    n = len(self.reads)
                if self.during is not None:
                    self.during(n)
            response = self.emu.transport().handle_request(request)
            response.read()
            return response
        finally:
            with self.lock:
                self.now -= 1


def _method(request: httpx.Request) -> str | None:
    """The ORM method a request calls (JSON-2's path, or execute_kw's fifth argument)."""
    if request.url.path.startswith("/json/2/"):
        return request.url.path.rsplit("/", 1)[-1]
    body = json.loads(request.content or b"{}")
    args = (body.get("params") or {}).get("args") or []
    return str(args[4]) if body.get("params", {}).get("method") == "execute_kw" and len(args) > 4 else None


def _body(request: httpx.Request) -> dict[str, Any]:
    """A search_read's named arguments, on either transport."""
    body = json.loads(request.content)
    if "params" in body:  # JSON-RPC execute_kw: [db, uid, key, model, method, [domain], kwargs]
        args = body["params"]["args"]
        return {"domain": args[5][0] if args[5] else [], **args[6]}
    return dict(body)


def make(
    home: Path,
    n: int,
    *,
    transport: str = "json2",
    version: int = 19,
    concurrency: int | None = None,
    partition_min: int = 20,
    hold: float = 0.0,
) -> tuple[OdooEmulator, App, Spy]:
    """``n`` contacts written a minute ago, connected with pages of 10; the config sets ``concurrency``."""
    emu = OdooEmulator(version=version)
    emu.bulk_create("res.partner", n, write_date=emu._utcnow() - timedelta(seconds=60))
    emu.clock_offset += 10  # past pull's settle margin
    if concurrency is not None:
        write_config(home, "odoo", concurrency=concurrency)
    spy = Spy(emu, hold)
    app = App(transport=lambda _name: httpx.MockTransport(spy.handle))
    options = {"db": emu.db, "user": emu.login, "transport": transport}
    connect(app, provider="odoo", name="odoo", base_url="http://odoo.test", options=options, io=ScriptIO(emu.api_key))
    tune(app, partition_min=partition_min)
    spy.reads.clear()
    return emu, app, spy


def tune(app: App, **settings: Any) -> None:
    conn = app.connection("odoo")
    conn.settings = {**conn.settings, "page_size": 10, **settings}
    app.store.connections.save(conn)
    app._providers.clear()


def provider(app: App) -> OdooProvider:
    p = app.provider(app.connection("odoo"))
    assert isinstance(p, OdooProvider)
    return p


def contact_ids(emu: OdooEmulator) -> set[str]:
    return {str(r["id"]) for r in emu.records("res.partner") if not r["is_company"]}


def ranged(spy: Spy) -> list[dict[str, Any]]:
    """The search_reads of id ranges (bounded above with ``<=``), not the walk from both ends."""
    return [b for b in spy.reads if any(leaf[:2] == ["id", "<="] for leaf in b["domain"] if isinstance(leaf, list))]


def stored_once(app: App) -> list[str]:
    ids = [r.remote_id for r in app.store.mirror.records("odoo", "contacts")]
    assert len(ids) == len(set(ids))
    return ids


@pytest.mark.parametrize(("transport", "version"), SETUPS, ids=[t for t, _ in SETUPS])
def test_partitioned_backfill_stores_each_record_once_and_hands_over_like_an_unpartitioned_one(
    home: Path, transport: str, version: int
) -> None:
    emu, app, spy = make(home, 95, transport=transport, version=version, concurrency=3)
    frozen = emu.now()
    emu.now = lambda: frozen  # type: ignore[method-assign]  # both walks end on the same window
    applied: list[str] = []
    apply = app.store.mirror.apply_page

    def counting(connection: str, obj: str, records: list[Any], **kw: Any) -> Any:
        applied.extend(r.remote_id for r in records)
        return apply(connection, obj, records, **kw)

    app.store.mirror.apply_page = counting  # type: ignore[method-assign,assignment]
    done = backfill(app, connection="odoo", objects=["contacts"])
    assert done.outcome == "ok" and done.objects[0].read == 95 + OWN
    assert sorted(applied) == sorted(contact_ids(emu))  # every record stored, each exactly once
    parts = ranged(spy)
    assert len({b["domain"][-1][2] for b in parts}) == 6  # 2 x concurrency ranges, each with its own top
    assert all(b["order"] == "id asc" and b["context"] == {"active_test": False} for b in parts)
    # The walk's requests, as recorded from a real Odoo 19: search_read and search (ids) with named
    # arguments, archived rows included, never an offset.
    walk = [(m, b) for m, b in spy.calls if m in ("search", "search_read", "search_count")]
    assert {m for m, _ in walk} == {"search", "search_read"}
    assert all(set(b) <= {"domain", "fields", "order", "limit", "context"} for _, b in walk)
    assert all(b["context"] == {"active_test": False} and "offset" not in b for _, b in walk)
    partitioned = app.store.mirror.cursor("odoo", "contacts")
    assert app.store.mirror.cursor("odoo", "contacts", "backfill") is None

    # The same backfill unpartitioned (today's walk from both ends) ends on the same cursor.
    home2 = home / "plain"
    home2.mkdir()
    plain = App(env={"CRMSYNC_HOME": str(home2)}, transport=lambda _name: emu.transport())
    options = {"db": emu.db, "user": emu.login, "transport": transport}
    connect(plain, provider="odoo", name="odoo", base_url="http://odoo.test", options=options, io=ScriptIO(emu.api_key))
    tune(plain, partition_min=10_000)
    assert backfill(plain, connection="odoo", objects=["contacts"]).outcome == "ok"
    assert plain.store.mirror.cursor("odoo", "contacts") == partitioned
    assert partitioned is not None and set(partitioned) == {"hi"}
    assert sorted(stored_once(plain)) == sorted(stored_once(app))
    plain.close()
    app.close()


@pytest.mark.parametrize("kill_at", [1, 3, 6, 9])
def test_a_killed_partitioned_backfill_resumes_every_range_reading_only_what_was_not_stored(
    home: Path, kill_at: int
) -> None:
    emu, app, spy = make(home, 118, concurrency=3)
    apply, applied = app.store.mirror.apply_page, [0]

    def killed(*args: Any, **kwargs: Any) -> Any:
        if applied[0] == kill_at:
            raise KeyboardInterrupt
        applied[0] += 1
        return apply(*args, **kwargs)

    app.store.mirror.apply_page = killed  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        backfill(app, connection="odoo", objects=["contacts"])
    app.store.mirror.apply_page = apply  # type: ignore[method-assign]
    checkpoint = app.store.mirror.cursor("odoo", "contacts", "backfill")
    assert checkpoint is not None and checkpoint["mode"] == "partitioned" and len(checkpoint["ranges"]) == 6
    before = set(stored_once(app))
    app.close()

    again = App(transport=lambda _name: httpx.MockTransport(spy.handle))
    spy.reads.clear()
    result = backfill(again, connection="odoo", objects=["contacts"])
    assert result.outcome == "ok"
    assert result.objects[0].read == 118 + OWN - len(before)  # nothing stored was read again ...
    assert set(stored_once(again)) == contact_ids(emu)  # ... and nothing was missed
    assert ranged(spy) and not any(b["order"] == "id desc" for b in spy.reads)  # ranges went on, no new plan
    assert set(again.store.mirror.cursor("odoo", "contacts") or {}) == {"hi"}
    again.close()


def test_records_edited_archived_or_deleted_during_the_walk_are_right_after_the_next_pull(home: Path) -> None:
    emu, app, spy = make(home, 80, transport="jsonrpc", version=17, concurrency=2)
    made = sorted(int(i) for i in contact_ids(emu))
    low, high, gone, unseen = made[5], made[-3], made[2], made[-10]
    once = threading.Lock()

    def meddle(n: int) -> None:
        # While the ranges are read: edits and deletions in the first page (read) and the top range (not yet).
        if n >= 4 and once.acquire(blocking=False):
            emu.edit("res.partner", low, {"name": "Edited Low"})
            emu.edit("res.partner", high, {"active": False})
            emu.delete("res.partner", gone)
            emu.delete("res.partner", unseen)

    spy.during = meddle
    assert backfill(app, connection="odoo", objects=["contacts"]).outcome == "ok"
    assert ranged(spy)  # the window really was split
    spy.during = None
    emu.clock_offset += 10
    assert pull(app, objects=["contacts", "companies"], reconcile=True)[0].outcome == "ok"
    rows = {r.remote_id: r for r in app.store.mirror.records("odoo", "contacts")}
    assert rows[str(low)].properties["last_name"] == "Low"
    assert rows[str(high)].archived and rows[str(gone)].archived and str(unseen) not in rows
    live = {str(r["id"]) for r in emu.records("res.partner") if not r["is_company"] and r["active"]}
    assert {k for k, r in rows.items() if not r.archived} == live
    app.close()


@pytest.mark.parametrize("concurrency", [None, 4])
def test_requests_in_flight_never_exceed_the_configured_concurrency(home: Path, concurrency: int | None) -> None:
    _emu, app, spy = make(home, 150, concurrency=concurrency, hold=0.02)
    pages = provider(app).changes("contacts", None, fields=["name", "email"])
    first = next(pages)
    assert first.cursor is not None and first.cursor["mode"] == "partitioned"
    assert len(first.cursor["ranges"]) == 2 * (concurrency or 2)  # twice the requests in flight (the default stays 2)
    rest = list(pages)
    ids = [r.id for p in [first, *rest] for r in p.records]
    assert len(ids) == len(set(ids)) == 150 + OWN
    assert rest[-1].cursor is not None and set(rest[-1].cursor) == {"hi"}
    assert min(3, concurrency or 2) <= spy.peak <= (concurrency or 2)  # side by side, never beyond the option
    app.close()


def test_no_more_ranges_than_pages_however_high_the_concurrency(home: Path) -> None:
    _emu, app, _spy = make(home, 40, concurrency=16)  # 42 records: the first page, then 32 in pages of 10
    pages = list(provider(app).changes("contacts", None, fields=["name"]))
    assert len((pages[0].cursor or {})["ranges"]) == 4
    assert len({r.id for p in pages for r in p.records}) == 40 + OWN
    app.close()


def test_a_small_window_keeps_the_walk_from_both_ends(home: Path) -> None:
    _emu, app, spy = make(home, 18)  # 20 records: not above partition_min
    pages = list(provider(app).changes("contacts", None, fields=["name"]))
    assert not ranged(spy) and all("mode" not in (p.cursor or {}) for p in pages)
    assert len({r.id for p in pages for r in p.records}) == 18 + OWN
    app.close()


def test_stored_cursors_of_other_shapes_are_read_on(home: Path) -> None:
    emu, app, _spy = make(home, 60)
    p = provider(app)
    want = contact_ids(emu)
    whole = list(p.changes("contacts", None, fields=["name"]))
    hi = (whole[-1].cursor or {})["hi"]

    def ids(cursor: dict[str, Any]) -> list[str]:
        return [r.id for page in p.changes("contacts", cursor, fields=["name"]) for r in page.records]

    # The unpartitioned shape of a window stopped half-way: read on after its last id, as before.
    old = ids({"window_lo": None, "window_hi": hi, "last_id": sorted(map(int, want))[29]})
    assert len(old) == len(set(old)) == len(want) - 30
    # A partitioned cursor crmsync could not have written: its window read again from the start.
    for bad in ({"mode": "partitioned", "window_hi": hi, "ranges": "all"}, {"mode": "partitioned", "ranges": [[9, 1]]}):
        again = ids(bad)
        assert len(again) == len(set(again)) and set(again) == want, bad
    # A range whose position is not an id starts that range again; the others go on.
    plan = whole[0].cursor
    assert plan is not None and plan["mode"] == "partitioned"
    garbled = json.loads(json.dumps(plan))
    garbled["parts"]["ids0"]["at"] = {"last": "many"}
    assert set(ids(garbled)) == want - {r.id for r in whole[0].records}
    app.close()


@pytest.mark.parametrize("value", ["0", "lots"])
def test_a_bad_concurrency_is_one_config_error(home: Path, value: str) -> None:
    (home / "config.yaml").write_text(f"connections:\n  odoo:\n    concurrency: {value}\n")
    result = run_cli(["pull", "-c", "odoo"], cli_env(home))
    assert result.code == 3 and "Traceback" not in result.stderr
    problems = [line for line in result.stderr.splitlines() if "concurrency" in line]
    assert len(problems) == 1 and "config.yaml:3" in problems[0], result.stderr


@pytest.mark.parametrize("by_ids", [True, False])
def test_a_pull_of_old_edits_and_new_records_splits_them_evenly_or_by_span(
    home: Path, monkeypatch: pytest.MonkeyPatch, by_ids: bool
) -> None:
    """Edits of the oldest records and new ones on top leave a gap: the ids cut it into equal shares."""
    emu, app, _spy = make(home, 0, concurrency=2)
    made = emu.bulk_create("res.partner", 200, write_date=emu._utcnow() - timedelta(hours=2))
    assert pull(app, objects=["contacts"])[0].outcome == "ok"
    for rid in made[:90]:
        emu.edit("res.partner", rid, {"function": "CFO"}, at=emu._utcnow())
    new = emu.bulk_create("res.partner", 30, write_date=emu._utcnow())
    emu.clock_offset += 10
    if not by_ids:
        monkeypatch.setattr("crmsync.providers.odoo.reads.IDS_PLAN_MAX", 50)  # a huge window, as far as the split knows
    p = provider(app)
    pages = list(p.changes("contacts", app.store.mirror.cursor("odoo", "contacts"), fields=["name", "function"]))
    ids = [r.id for page in pages for r in page.records]
    assert len(ids) == len(set(ids)) and set(map(str, [*made[:90], *new])) <= set(ids)
    ranges = (pages[0].cursor or {})["ranges"]
    shares = [sum(a <= int(i) <= b for i in ids) for a, b in ranges]
    # 110 records above the first page: from their ids, twice the requests in flight in ranges of
    # whole pages (11 pages of 10: 3, 3, 3 and 2), or two equal id widths (the gap between the edits
    # and the new records leaves the upper one the smaller share).
    assert sum(shares) == 110
    widths = [b - a + 1 for a, b in ranges]
    if by_ids:
        assert shares == [30, 30, 30, 20]
    else:
        assert len(ranges) == 2 and abs(widths[0] - widths[1]) <= 1 and shares[0] > shares[1]
    assert set(pages[-1].cursor or {}) == {"hi"}
    app.close()
