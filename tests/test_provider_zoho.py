"""The Zoho provider against the Zoho emulator: connect per data centre, keyset pull, batched push, webhooks.

Provider traffic is validated against the official specs (with the errata of test_emulator_zoho) in
``test_provider_traffic_validates_against_the_official_specs``; the volume tests use the emulator's
plain transport because openapi-core spends about 3 ms per returned row.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.app import App
from crmsync.emulators.zoho import ZohoEmulator
from crmsync.errors import AuthError, ConfigError, RetriableError, UsageError
from crmsync.providers.base import Outgoing, OutgoingActivity
from crmsync.providers.zoho import (
    MARKER,
    ZohoPolicy,
    ZohoProvider,
    _accounts_server,
    _nest,
    domain_of,
    quote,
    zoho_time,
)
from crmsync.store import CrmOutbox
from crmsync.sync.connect import connect
from crmsync.sync.pull import pull
from crmsync.sync.push import push
from tests.e2e import ScriptIO, cli_env, kills_before_every_page, pull_stopped_before_page, run_cli
from tests.openapi_check import CheckedTransport, SpecCheck
from tests.test_emulator_zoho import zoho_checker

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> SpecCheck:
    return zoho_checker(tmp_path_factory.mktemp("zoho-specs"))


def zoho_app(
    emu: ZohoEmulator,
    transport: httpx.BaseTransport | None = None,
    *,
    name: str = "z",
    dc: str | None = None,
    scopes: list[str] | None = None,
) -> App:
    """An App whose connection ``name`` was made with a Self Client grant code, all traffic in-process."""
    inner = transport or emu.transport()
    app = App(transport=lambda _name: inner)
    options: dict[str, Any] = {"client_id": emu.client_id, "grant_code": emu.grant_code(scopes)}
    if dc:
        options["dc"] = dc
    connect(app, provider="zoho", name=name, base_url=None, options=options, io=ScriptIO(emu.client_secret))
    return app


def provider_of(app: App, name: str = "z") -> ZohoProvider:
    provider = app.provider(app.connection(name))
    assert isinstance(provider, ZohoProvider)
    return provider


def outcome_lines(n: int, *, prefix: str = "o", company_every: int = 0, deal_every: int = 0) -> str:
    lines = []
    for i in range(n):
        o: dict[str, Any] = {
            "id": f"{prefix}-{i}",
            "occurred_at": "2026-11-20T10:00:00+01:00",
            "contact": {"email": f"person{i}@example.org", "first_name": "P", "last_name": f"N{i}"},
            "disposition": "interested" if i % 2 else "no_answer",
            "duration_seconds": 60 + i % 100,
            "notes": f"call {i}",
        }
        if company_every and i % company_every == 0:
            o["company"] = {"name": f"Co {i % 7}", "domain": f"co{i % 7}.example"}
        if deal_every and i % deal_every == 0:
            o["deal"] = {"name": f"Deal {i}", "amount": 100 + i, "stage": "Needs Analysis"}
        lines.append(json.dumps(o))
    return "\n".join(lines) + "\n"


# -- connect -----------------------------------------------------------------------------------------


def test_connect_with_a_grant_code_records_the_api_domain_and_org() -> None:
    emu = ZohoEmulator(contacts=2)
    app = zoho_app(emu)
    conn = app.connection("z")
    assert conn.account_id == emu.org_id
    assert conn.settings["api_base_url"] == "https://www.zohoapis.com/crm/v8"
    assert conn.settings["accounts_url"] == "https://accounts.zoho.com" and conn.settings["dc"] == "us"
    secret = app.secrets.get("z")
    assert secret["refresh_token"] and secret["client_secret"] == emu.client_secret
    health = provider_of(app).check()
    assert health.ok and health.account == emu.org_id and "ZohoCRM.modules.ALL" in health.scopes


def test_connect_eu_sends_every_api_call_to_the_returned_api_domain(tmp_path: Path) -> None:
    us, eu = ZohoEmulator(contacts=3), ZohoEmulator(dc="eu", contacts=4)
    eu.api_domain = "https://eu-tenant.zohoapis.test"  # any host: the provider must take it from the token
    routes = {
        "accounts.zoho.com": us,
        "www.zohoapis.com": us,
        "accounts.zoho.eu": eu,
        "www.zohoapis.eu": eu,
        "eu-tenant.zohoapis.test": eu,
    }
    seen: list[tuple[str, str]] = []

    def route(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append((request.url.host, request.url.path))
        return routes[request.url.host](request)

    app = zoho_app(eu, httpx.MockTransport(route), dc="eu")
    assert app.connection("z").settings["api_base_url"] == "https://eu-tenant.zohoapis.test/crm/v8"
    assert pull(app, objects=["contacts"])[0].outcome == "ok"
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(3))
    assert push(app, source=str(src), connection="z").created == 3
    assert us.stats.requests == 0
    hosts = Counter(host for host, _ in seen)
    assert set(hosts) == {"accounts.zoho.eu", "eu-tenant.zohoapis.test"}
    assert all(path.startswith("/oauth/") for host, path in seen if host == "accounts.zoho.eu")
    assert len(eu.records("Calls")) == 3


def test_browser_flow_on_loopback_uses_the_returned_accounts_server() -> None:
    emu = ZohoEmulator(contacts=1)
    with emu.serve() as server:
        app = App()
        io = ScriptIO(emu.client_secret, open_with=lambda url: httpx.get(url, follow_redirects=True))
        conn = connect(
            app, provider="zoho", name="web", base_url=server.url, options={"client_id": emu.client_id}, io=io
        )
        assert conn.settings["accounts_url"] == server.url
        assert conn.settings["api_base_url"] == f"{server.url}/crm/v8"
        assert pull(app, objects=["contacts"])[0].objects[0].read == 1


def test_connect_refuses_tokens_without_the_needed_scopes() -> None:
    emu = ZohoEmulator()
    with pytest.raises(AuthError, match=r"ZohoCRM\.coql\.READ"):
        zoho_app(emu, scopes=["ZohoCRM.modules.ALL", "ZohoCRM.settings.fields.READ", "ZohoCRM.org.READ"])
    with pytest.raises(AuthError, match="invalid_code"):
        app = App(transport=lambda _n: emu.transport())
        used_up = {"client_id": emu.client_id, "grant_code": "1000.used.up"}
        connect(app, provider="zoho", name="x", base_url=None, options=used_up, io=ScriptIO(emu.client_secret))
    with pytest.raises(UsageError, match="client-id"):
        connect(App(), provider="zoho", name="y", base_url=None, options={}, io=ScriptIO("s"))
    with pytest.raises(UsageError, match="--dc"):
        connect(
            App(), provider="zoho", name="y", base_url=None, options={"dc": "mars", "client_id": "c"}, io=ScriptIO("s")
        )
    with pytest.raises(AuthError, match="unknown accounts server"):
        _accounts_server("https://accounts.evil.example", "https://accounts.zoho.com")
    assert _accounts_server("https://accounts.zoho.eu", "https://accounts.zoho.com") == "https://accounts.zoho.eu"


def test_a_missing_scope_or_permission_is_an_auth_error_naming_it() -> None:
    emu = ZohoEmulator(deals=1)
    app = zoho_app(emu)
    provider = provider_of(app)
    emu.deny("Deals", "read")
    with pytest.raises(AuthError, match="Crm_Implied_View_Deals"):
        list(provider.changes("deals", None, fields=["Deal_Name"]))
    narrow = emu.issue_token(["ZohoCRM.modules.contacts.READ"])
    response = httpx.Client(transport=emu.transport(), base_url="https://www.zohoapis.com").get(
        "/crm/v8/Deals",
        params={"fields": "Deal_Name"},
        headers={"Authorization": f"Zoho-oauthtoken {narrow['access_token']}"},
    )
    message, code = ZohoPolicy().error_message(response)
    assert code == "OAUTH_SCOPE_MISMATCH" and "ZohoCRM.modules.Deals.READ" in message
    assert not ZohoPolicy().is_auth_expired(response)


# -- pull --------------------------------------------------------------------------------------------


def test_pull_5000_contacts_with_a_shared_timestamp_then_deletions() -> None:
    emu = ZohoEmulator()
    accounts = emu.bulk_create("Accounts", 3, modified_time=T0 - timedelta(days=2))
    tied = emu.bulk_create("Contacts", 2500, modified_time=T0, fields={"Account_Name": accounts[0]})
    spread = [emu.bulk_create("Contacts", 1, modified_time=T0 - timedelta(minutes=i))[0] for i in range(1, 2501)]
    app = zoho_app(emu)
    first = pull(app, objects=["contacts", "companies"])[0]
    assert first.outcome == "ok", first.error
    rows = app.store.mirror.records("z", "contacts")
    assert len(rows) == len({r.remote_id for r in rows}) == 5000
    by_id = {r.remote_id: r for r in rows}
    assert by_id[tied[0]].associations == {"companies": [accounts[0]]}
    assert by_id[spread[0]].associations == {"companies": []}
    assert first.objects[0].pages <= 4  # 2,000 rows a call, plus the deletions page
    cursor = app.store.mirror.cursor("z", "contacts")
    assert cursor is not None and cursor["ts"] == zoho_time(T0) and cursor["id"] == tied[-1]

    gone = [tied[5], spread[7], spread[2499]]
    for rid in gone:
        emu.delete("Contacts", rid)
    emu.purge("Contacts", gone[0])  # out of the recycle bin: still listed, as permanent
    emu.edit("Contacts", tied[9], {"Title": "CFO"})
    fresh = emu.create("Contacts", {"Last_Name": "Newcomer", "Email": "new@example.com"})
    before = emu.stats.requests
    second = pull(app, objects=["contacts"])[0]
    assert second.outcome == "ok", second.error
    assert emu.stats.requests - before <= 3  # one COQL page and the deletions, not another walk
    rows = app.store.mirror.records("z", "contacts")
    assert len(rows) == len({r.remote_id for r in rows}) == 5001
    by_id = {r.remote_id: r for r in rows}
    assert {rid for rid, r in by_id.items() if r.archived} == set(gone)
    assert by_id[tied[9]].properties["title"] == "CFO"
    assert by_id[fresh].properties["last_name"] == "Newcomer"
    third = pull(app, objects=["contacts"])[0]
    assert third.objects[0].created == 0 and third.objects[0].updated == 0


def test_an_old_shared_timestamp_is_not_read_again_but_a_late_write_near_the_bound_is() -> None:
    emu = ZohoEmulator()
    emu.bulk_create("Contacts", 2100, modified_time=T0)
    app = zoho_app(emu)
    assert pull(app, objects=["contacts"])[0].objects[0].read == 2100
    before = emu.stats.requests
    quiet = pull(app, objects=["contacts"])[0]
    assert quiet.objects[0].read == 0 and emu.stats.requests - before == 2  # one COQL, one /deleted
    now = datetime.now(UTC)
    recent = emu.bulk_create("Contacts", 1, modified_time=now - timedelta(seconds=2))
    assert pull(app, objects=["contacts"])[0].objects[0].created == 1
    # A write that commits after that pull but carries an earlier second (in flight, another clock):
    late = emu.bulk_create("Contacts", 1, modified_time=now - timedelta(seconds=10))
    again = pull(app, objects=["contacts"])[0]
    assert again.objects[0].created == 1
    assert {r.remote_id for r in app.store.mirror.records("z", "contacts")} >= {*recent, *late}


def test_cursor_is_resumable_after_any_page() -> None:
    emu = ZohoEmulator()
    emu.bulk_create("Deals", 2300, modified_time=T0)
    emu.bulk_create("Deals", 1800, modified_time=T0 + timedelta(seconds=1))
    app = zoho_app(emu)
    provider = provider_of(app)
    pages = list(provider.changes("deals", None, fields=["Deal_Name", "Stage"]))
    seen = [r.id for p in pages for r in p.records]
    assert len(seen) == len(set(seen)) == 4100
    # Resume from the first page's cursor: nothing before it is read again beyond the lookback window.
    resumed = list(provider.changes("deals", pages[0].cursor, fields=["Deal_Name"]))
    again = {r.id for p in resumed for r in p.records}
    assert set(seen[2000:]) <= again
    assert all(p.cursor is not None for p in pages)
    assert max(datetime.fromisoformat(p.cursor["ts"]) for p in pages) <= datetime.now(UTC)


def _coql_queries(emu: ZohoEmulator) -> list[str]:
    """The COQL queries the emulator answered, in order (the log keeps bodies out of its stats)."""
    seen: list[str] = []
    handle = emu._dispatch

    def spy(request: httpx.Request, *args: Any) -> Any:
        if request.url.path.endswith("/coql"):
            seen.append(json.loads(request.content)["select_query"])
        return handle(request, *args)

    emu._dispatch = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("n", [0, 1, 10, 11, 19, 20, 21, 30, 40, 41, 67])
def test_a_backlog_is_walked_from_both_ends_each_record_once(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of 10: past the first page the walk also reads downwards, and the two ends meet exactly."""
    monkeypatch.setattr("crmsync.providers.zoho.reads.COQL_ROWS", 10)
    emu = ZohoEmulator()
    ids = [rid for k in range(n) for rid in emu.bulk_create("Deals", 1, modified_time=T0 + timedelta(seconds=k // 4))]
    provider = provider_of(zoho_app(emu))
    queries = _coql_queries(emu)
    pages = list(provider.changes("deals", None, fields=["Deal_Name"]))
    seen = [r.id for p in pages for r in p.records]
    assert len(seen) == len(set(seen)) and set(seen) == set(ids)
    downwards = [q for q in queries if "desc" in q]
    assert bool(downwards) == (n > 10)  # one page needs no second end, and costs one query as before
    # Half the chain of round trips: the first page, then two a round; at most two queries more than
    # pages (ends that meet exactly at a page's edge look once more), and none after the last page.
    full = max(1, -(-n // 10))
    assert len(queries) <= full + 2 and len(queries) - len(downwards) <= 1 + -(-(full - 1) // 2) + 1
    cursors = [p.cursor for p in pages if p.cursor is not None]
    assert cursors[-1]["deleted_ts"] and (
        n == 0 or (cursors[-1]["id"], cursors[-1]["ts"]) == (ids[-1], zoho_time(T0 + timedelta(seconds=(n - 1) // 4)))
    )
    # Only the lower end moves the cursor, and only upwards: any page is a place to resume from.
    marks = [(c["ts"], int(c["id"])) for c in cursors if c.get("id")]
    assert marks == sorted(marks)


def _walk_killed_at(kill_at: int) -> bool:
    """A pull of 72 contacts in pages of 10 that edits, deletes and adds records while both ends are
    read, stopped before its page ``kill_at``, then rerun; checks the store. False if never stopped."""
    emu = ZohoEmulator()
    ids = [r for k in range(12) for r in emu.bulk_create("Contacts", 6, modified_time=T0 + timedelta(seconds=k))]
    app = zoho_app(emu)
    queries = _coql_queries(emu)
    handle, once = emu._dispatch, threading.Lock()

    def meddle(request: httpx.Request, *args: Any) -> Any:
        # Once, while the ends' first pages are read (the two ask at the same moment).
        if len(queries) >= 2 and request.url.path.endswith("/coql") and once.acquire(blocking=False):
            emu.edit("Contacts", ids[40], {"Title": "moved up"})
            emu.edit("Contacts", ids[2], {"Title": "moved up too"})
            emu.delete("Contacts", ids[30])
            emu.bulk_create("Contacts", 2, modified_time=T0 + timedelta(seconds=5))  # in an old second
        return handle(request, *args)

    emu._dispatch = meddle  # type: ignore[method-assign]
    stopped = pull_stopped_before_page(app, kill_at, ["contacts"])
    for _ in range(2):  # the rerun, then one that finds nothing new
        assert pull(app, objects=["contacts"])[0].outcome == "ok"
    live = {r["id"] for r in emu.records("Contacts")}
    stored = {r.remote_id: r for r in app.store.mirror.records("z", "contacts")}
    assert {rid for rid, r in stored.items() if not r.archived} == live, kill_at
    assert stored[ids[40]].properties["title"] == "moved up"
    assert stored[ids[2]].properties["title"] == "moved up too"
    assert ids[30] not in stored or stored[ids[30]].archived  # never stored when the kill came first
    return stopped


def test_a_walk_from_both_ends_with_writes_during_it_and_a_kill_at_any_page(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("crmsync.providers.zoho.reads.COQL_ROWS", 10)
    kill_at = kills_before_every_page(monkeypatch, tmp_path, _walk_killed_at)
    assert kill_at >= 9  # 74 records in pages of 10 read from two ends, and the deletions


def test_calls_pull_only_crmsync_calls_with_their_links() -> None:
    emu = ZohoEmulator(contacts=2, deals=1)
    contact, deal = emu.records("Contacts")[0]["id"], emu.records("Deals")[0]["id"]
    when = "2025-06-01T10:00:00+00:00"
    ours = emu.create("Calls", {"Subject": "ours", "Call_Type": "Outbound", "Call_Start_Time": when,
                                MARKER: "m-1", "Who_Id": contact, "What_Id": deal, "$se_module": "Deals"})  # fmt: skip
    emu.create("Calls", {"Subject": "theirs", "Call_Type": "Inbound", "Call_Start_Time": "2025-06-01T10:00:00+00:00"})
    app = zoho_app(emu)
    records = [r for p in provider_of(app).changes("calls", None, fields=["Subject", MARKER]) for r in p.records]
    assert [r.id for r in records] == [ours]
    assert records[0].associations == {"contacts": [contact], "deals": [deal], "companies": []}


def test_fetch_list_ids_and_selects_wider_than_the_column_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    emu = ZohoEmulator(contacts=30, accounts=2)
    app = zoho_app(emu)
    provider = provider_of(app)
    ids = [r["id"] for r in emu.records("Contacts")]
    got = provider.fetch("contacts", [*ids[:5], "4150868099999999999"], fields=["Email", "Last_Name"])
    assert {r.id for r in got} == set(ids[:5]) and all(r.properties["Email"] for r in got)
    assert [i for batch in provider.list_ids("contacts") for i in batch] == sorted(ids, key=int)
    # Past the 50-column limit the first columns drive the keyset query and the rest are joined by id.
    monkeypatch.setattr("crmsync.providers.zoho.reads.COQL_COLUMNS", 4)
    fields = ["Email", "First_Name", "Last_Name", "Phone", "Title", "Mobile", "Lead_Source"]
    records = [r for p in provider.changes("contacts", None, fields=fields) for r in p.records]
    assert len(records) == 30
    by_id = {r["id"]: r for r in emu.records("Contacts")}
    for rec in records:
        assert {f: rec.properties.get(f) for f in fields} == {f: by_id[rec.id][f] for f in fields}
        assert rec.associations["companies"] == [by_id[rec.id]["Account_Name"]["id"]]
    # In pages of 10, read from both ends: the upper end's pages are joined by id the same way.
    monkeypatch.setattr("crmsync.providers.zoho.reads.COQL_ROWS", 10)
    queries = _coql_queries(emu)
    records = [r for p in provider.changes("contacts", None, fields=fields) for r in p.records]
    assert len(records) == len({r.id for r in records}) == 30 and any("desc" in q for q in queries)
    for rec in records:
        assert {f: rec.properties.get(f) for f in fields} == {f: by_id[rec.id][f] for f in fields}


# -- push --------------------------------------------------------------------------------------------


def test_push_300_outcomes_costs_at_most_15_requests_and_a_rerun_creates_nothing(tmp_path: Path) -> None:
    emu = ZohoEmulator()
    app = zoho_app(emu)
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(300))
    before = emu.stats.requests
    summary = push(app, source=str(src), connection="z")
    assert (summary.created, summary.failed) == (300, 0), summary
    assert summary.requests <= 15 and emu.stats.requests - before == summary.requests, summary
    contacts = {r["Email"]: r["id"] for r in emu.records("Contacts")}
    calls = emu.records("Calls")
    assert len(calls) == 300 and len(contacts) == 300
    for call in calls:
        i = int(call[MARKER].split("-")[1])
        assert call["Who_Id"]["id"] == contacts[f"person{i}@example.org"]
        assert call["Call_Type"] == "Outbound" and call["Call_Start_Time"].endswith("-07:00")
    assert all(w.trigger == [] for w in emu.writes)  # no workflows on crmsync's own writes
    writes = len(emu.writes)
    again = push(app, source=str(src), connection="z")
    assert again.requests == 0 and again.already == 300
    assert len(emu.writes) == writes and len(emu.records("Calls")) == 300


def test_lanes_with_few_deals_share_one_deal_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zoho keeps no deal key unique, so deals are looked up before they are written, 1,250 keys a
    COQL: five lanes of 20 outcomes, each outcome with a deal, spend one deal lookup, not five."""
    from crmsync.sync.push import PushSettings, rounds

    lanes: list[int] = []
    split = rounds.split_lanes
    monkeypatch.setattr(rounds, "split_lanes", lambda items, **kw: lanes.append(len(out := split(items, **kw))) or out)
    looked: list[tuple[str, int]] = []
    lookup = ZohoProvider.lookup

    def counted(self: ZohoProvider, obj: str, keys: Any, *, fields: Any) -> Any:
        looked.append((obj, len(keys)))
        return lookup(self, obj, keys, fields=fields)

    monkeypatch.setattr(ZohoProvider, "lookup", counted)
    emu = ZohoEmulator()
    app = zoho_app(emu)
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(100, deal_every=1))
    summary = push(app, source=str(src), connection="z", settings=PushSettings(lane_size=20))
    assert (summary.created, summary.failed) == (100, 0), summary
    assert lanes == [5]
    assert [n for obj, n in looked if obj == "deals"] == [100]
    assert [n for obj, n in looked if obj == "contacts"] == [100]  # 100 emails: one query too
    assert len(emu.records("Deals")) == 100 and len(emu.records("Contacts")) == 100
    deals = {d["crmsync_deal_key"] for d in emu.records("Deals")}
    assert len(deals) == 100


def test_companies_deals_and_tasks_are_linked(tmp_path: Path) -> None:
    emu = ZohoEmulator()
    app = zoho_app(emu)
    lines = outcome_lines(20, company_every=2, deal_every=5).splitlines()
    lines[0] = json.dumps(
        {**json.loads(lines[0]), "next_step": {"type": "call", "due_at": "2026-12-01T09:00:00+00:00"}}
    )
    src = tmp_path / "o.jsonl"
    src.write_text("\n".join(lines) + "\n")
    summary = push(app, source=str(src), connection="z")
    assert (summary.created, summary.failed) == (20, 0), summary
    assert len(emu.records("Accounts")) == 7
    deals = emu.records("Deals")
    assert len(deals) == 4 and all(d["Stage"] == "Needs Analysis" and d["crmsync_deal_key"] for d in deals)
    with app.store.session() as s:
        from sqlmodel import select

        rows = list(s.exec(select(CrmOutbox)))
    for row in rows:
        steps = row.steps
        call = emu.get("Calls", steps["calls"])
        assert call["Who_Id"]["id"] == steps["contacts"]
        if "deals" in steps:
            deal = emu.get("Deals", steps["deals"])
            assert call["What_Id"]["id"] == steps["deals"] and call["$se_module"] == "Deals"
            assert deal["Contact_Name"]["id"] == steps["contacts"]
        elif "companies" in steps:
            assert call["What_Id"]["id"] == steps["companies"] and call["$se_module"] == "Accounts"
            assert emu.get("Contacts", steps["contacts"])["Account_Name"]["id"] == steps["companies"]
    task = emu.records("Tasks")[0]
    assert task[MARKER] == "o-0:task" and task["Due_Date"] == "2026-12-01"


def test_lost_replies_are_found_by_marker_not_sent_twice() -> None:
    emu = ZohoEmulator(contacts=1)
    app = zoho_app(emu)
    provider = provider_of(app)
    contact = emu.records("Contacts")[0]["id"]
    acts = [
        OutgoingActivity(ref=f"r{i}", marker=f"mk-{i}", associations={"contacts": contact},
                         properties={"Subject": f"c{i}", "Call_Start_Time": "2026-11-20T10:00:00+00:00"})
        for i in range(3)
    ]  # fmt: skip
    first = provider.create_activities("calls", acts)
    assert all(r.ok and r.created for r in first)
    again = provider.create_activities("calls", acts)  # as after a reply that never arrived
    assert [(r.ok, r.created, r.remote_id) for r in again] == [(True, False, r.remote_id) for r in first]
    assert len(emu.records("Calls")) == 3
    assert provider.find_activities("calls", ["mk-0", "mk-2", "nope"]) == {"mk-0": first[0].remote_id,
                                                                          "mk-2": first[2].remote_id}  # fmt: skip


def test_upsert_reports_per_item_results_by_position() -> None:
    emu = ZohoEmulator(unique_email=True)
    app = zoho_app(emu)
    provider = provider_of(app)
    existing = emu.create("Contacts", {"Last_Name": "Old", "Email": "old@example.com"})
    items = [
        Outgoing(ref="a", properties={"Email": "old@example.com", "Title": "CEO"}, match={"email": "old@example.com"}),
        Outgoing(ref="b", properties={"Email": "not-an-email"}, match={"email": "not-an-email"}),
        Outgoing(ref="c", properties={"Phone": "+15550100"}, match={"phone": "+15550100"}),
        Outgoing(ref="d", properties={"Department": "Ops"}, match={}, remote_id=existing),
    ]
    a, b, c, d = provider.upsert("contacts", items)
    assert (a.ok, a.remote_id, a.created) == (True, existing, False)
    assert not b.ok and not b.retriable and "INVALID_DATA" in (b.error or "")
    assert c.ok and c.created and emu.get("Contacts", c.remote_id)["Last_Name"] == "+15550100"
    assert d.ok and emu.get("Contacts", existing)["Department"] == "Ops"
    assert emu.get("Contacts", existing)["Title"] == "CEO"


def test_lookup_by_every_match_kind() -> None:
    emu = ZohoEmulator()
    app = zoho_app(emu)
    provider = provider_of(app)
    c1 = emu.create("Contacts", {"Last_Name": "A", "Email": "Ann@Example.com", "Phone": "+1 555 0100"})
    acct = emu.create("Accounts", {"Account_Name": "Acme Corp", "Website": "https://www.acme.example/about"})
    deal = emu.create("Deals", {"Deal_Name": "D", "Stage": "Qualification", "crmsync_deal_key": "d-1"})
    found = provider.lookup(
        "contacts",
        [{"email": "ann@example.com"}, {"email": "nobody@example.com"}, {"phone": "+15550100"}],
        fields=["Email"],
    )
    assert found["email:ann@example.com"].id == c1 and "phone:+15550100" in found
    assert "email:nobody@example.com" not in found
    companies = provider.lookup(
        "companies", [{"domain": "acme.example"}, {"name": "acme corp"}], fields=["Account_Name"]
    )
    assert companies["domain:acme.example"].id == acct == companies["name:acme corp"].id
    assert provider.lookup("deals", [{"key": "d-1"}], fields=["Deal_Name"])["key:d-1"].id == deal


def test_lookup_sends_1250_emails_per_query_and_asks_again_past_a_2000_row_cut() -> None:
    """25 IN groups of 50 per COQL; when duplicates fill the 2,000 rows, the keys not seen are asked again."""
    emu = ZohoEmulator()
    app = zoho_app(emu)
    provider = provider_of(app)
    assert provider.lookup_batch("contacts", "email") == 1250 and provider.lookup_batch("companies", "domain") == 100
    emu.bulk_create("Contacts", 2100, fields={"Email": "dup@example.com"})
    late = emu.create("Contacts", {"Last_Name": "Late", "Email": "late@example.com"})
    keys = [{"email": "dup@example.com"}, {"email": "late@example.com"}] + [
        {"email": f"n{i}@example.com"} for i in range(1200)
    ]
    emu.keep_log = True
    found = provider.lookup("contacts", keys, fields=["Email"])
    assert found["email:late@example.com"].id == late  # past the cut: found by the second query
    assert "email:dup@example.com" in found and len(found) == 2
    assert sum(1 for _m, path, _s in emu.stats.log if path.endswith("/coql")) == 2


def test_access_token_expiring_mid_push_is_refreshed(tmp_path: Path) -> None:
    emu = ZohoEmulator()
    counter = {"n": 0}
    inner = emu.transport()

    def expiring(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/crm/v8/"):
            counter["n"] += 1
            if counter["n"] == 4:
                emu.expire_tokens()  # dies between two batches
        return inner.handle_request(request)

    app = zoho_app(emu, httpx.MockTransport(expiring))
    before = app.secrets.get("z")["access_token"]
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(250))
    summary = push(app, source=str(src), connection="z")
    assert (summary.created, summary.failed) == (250, 0), summary
    assert app.secrets.get("z")["access_token"] != before  # persisted at once
    assert len(emu.records("Calls")) == 250


def test_missing_idempotency_field_is_a_config_error() -> None:
    emu = ZohoEmulator()
    emu.fields_by_module["Calls"] = [f for f in emu.fields_by_module["Calls"] if f.api_name != MARKER]
    emu.field_index["Calls"].pop(MARKER)
    provider = provider_of(zoho_app(emu))
    with pytest.raises(ConfigError, match=MARKER):
        provider.prepare_objects(["calls"])
    assert provider.find_activities("calls", ["x"]) == {}
    assert list(provider.changes("calls", None, fields=["Subject"])) == []


def test_fields_metadata() -> None:
    provider = provider_of(zoho_app(ZohoEmulator()))
    calls = {f.name: f for f in provider.fields("calls")}
    assert calls[MARKER].unique and calls[MARKER].custom and calls[MARKER].max_length == 100
    assert calls["Call_Type"].required and calls["Call_Type"].options == ["Outbound", "Inbound", "Missed"]
    assert calls["Call_Start_Time"].type == "datetime" and calls["Who_Id"].type == "reference"
    assert calls["Created_Time"].read_only


def test_rate_limits_retry_concurrency_and_give_up_on_credits() -> None:
    emu = ZohoEmulator(contacts=3)
    inner = emu.transport()
    busy = {"next": False, "sent": 0}

    def maybe_busy(request: httpx.Request) -> httpx.Response:
        if busy["next"] and request.url.path.endswith("/coql"):
            busy["next"], busy["sent"] = False, busy["sent"] + 1
            return emu.rate_limited_response("concurrency", 0.0)  # Zoho's 429: no Retry-After
        return inner.handle_request(request)

    provider = provider_of(zoho_app(emu, httpx.MockTransport(maybe_busy)))
    provider.http.sleep = lambda seconds: None  # the test checks behaviour, not waiting
    busy["next"] = True
    assert len(next(iter(provider.list_ids("contacts")))) == 3 and busy["sent"] == 1
    assert provider.http.stats.rate_limited == 1 and provider.http.stats.retries == 1
    emu.credit_limit = emu.credits_used  # the day's budget is spent
    with pytest.raises(RetriableError, match="24 hour"):
        list(provider.list_ids("contacts"))
    assert provider.http.stats.retries == 1  # no point waiting for a rolling 24-hour window
    assert provider.quota()["credits_used_estimate"] >= 2


# -- notifications -----------------------------------------------------------------------------------


def test_subscribe_and_renew_a_channel() -> None:
    emu = ZohoEmulator()
    provider = provider_of(zoho_app(emu))
    expiry = provider.subscribe(channel_id="1000000068001", notify_url="https://hooks.example/z?k=v", token="t0k")
    now = datetime.now(UTC)
    assert timedelta(days=6) < expiry - now <= timedelta(days=7)
    assert provider.renew_if_needed(channel_id="1000000068001") == expiry  # plenty of time left
    later = now + timedelta(days=6, hours=12)
    emu.clock_offset = (later - now).total_seconds()
    renewed = provider.renew_if_needed(channel_id="1000000068001", now=later)
    assert renewed is not None and renewed - later > timedelta(days=6)
    assert {c["module"] for c in emu.channels()} == {"Contacts", "Accounts", "Deals"}
    emu.create("Contacts", {"Last_Name": "Hook"})
    assert emu.pending_notifications()[0][1]["token"] == "t0k"
    with pytest.raises(UsageError):
        provider.subscribe(channel_id="1", notify_url="https://x.example", token="t" * 51)
    emu.clock_offset += 8 * 86400
    assert provider.renew_if_needed(channel_id="1000000068001", now=later + timedelta(days=8)) is None


# -- specs, helpers, CLI -------------------------------------------------------------------------------


def test_provider_traffic_validates_against_the_official_specs(checker: SpecCheck, tmp_path: Path) -> None:
    emu = ZohoEmulator(seed=4, contacts=40, accounts=8, deals=10)
    transport: CheckedTransport = checker.wrap(emu)
    app = zoho_app(emu, transport)
    assert all(r.outcome == "ok" for r in pull(app))
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(30, company_every=3, deal_every=5))
    summary = push(app, source=str(src), connection="z")
    assert (summary.created, summary.failed) == (30, 0)
    for rid in [r["id"] for r in emu.records("Contacts")][:3]:
        emu.delete("Contacts", rid)
    assert all(r.outcome == "ok" for r in pull(app))
    provider = provider_of(app)
    provider.fetch("contacts", [r["id"] for r in emu.records("Contacts")][:5], fields=["Email"])
    list(provider.list_ids("deals"))
    provider.lookup("companies", [{"domain": "co1.example"}, {"name": "co 2"}], fields=["Account_Name"])
    provider.fields("deals")
    provider.subscribe(channel_id="77", notify_url="https://hooks.example/z", token="tok")
    provider.renew_if_needed(channel_id="77", within=timedelta(days=30))
    assert transport.problems == [], transport.problems[:3]
    assert transport.checked > 25
    assert {u.split(" ")[1] for u in transport.unchecked} <= {"/oauth/v2/token", "/crm/v8/org"}


def test_coql_text_helpers() -> None:
    assert quote("O'Brien") == "'O\\'Brien'"
    assert _nest("and", ["a", "b", "c"]) == "(a and (b and c))"
    assert domain_of("HTTPS://www.Acme.example/x") == "acme.example"
    assert zoho_time(datetime(2025, 6, 1, 10, 0, 0, 999, tzinfo=UTC)) == "2025-06-01T10:00:00+00:00"


@pytest.mark.slow
def test_cli_pull_and_push_end_to_end(home: Path, tmp_path: Path) -> None:
    emu = ZohoEmulator(contacts=12)
    with emu.serve() as server:
        app = App()
        options = {"client_id": emu.client_id, "grant_code": emu.grant_code()}
        connect(app, provider="zoho", name="zc", base_url=server.url, options=options, io=ScriptIO(emu.client_secret))
        secret = json.dumps(app.secrets.get("zc"))
        app.close()
        env = cli_env(home, "zc", secret)
        pulled = run_cli(["--json", "pull", "-c", "zc", "--object", "contacts"], env)
        assert pulled.code == 0, pulled.stderr
        src = tmp_path / "o.jsonl"
        src.write_text(outcome_lines(5, prefix="cli"))
        pushed = run_cli(["--json", "push", str(src), "-c", "zc"], env)
        assert pushed.code == 0, pushed.stderr
        assert pushed.json_lines()[-1]["summary"]["created"] == 5
    assert len(emu.records("Calls")) == 5
