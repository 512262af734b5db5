"""The Odoo provider against the Odoo emulator, over both transports (JSON-RPC and JSON-2)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.app import App
from crmsync.emulators.odoo import OdooEmulator
from crmsync.errors import AuthError, ConfigError, UsageError
from crmsync.model import CallOutcome, deal_key
from crmsync.providers.base import Outgoing, OutgoingActivity
from crmsync.providers.odoo import OdooProvider, server_version
from crmsync.sync.connect import connect
from crmsync.sync.pull import pull
from crmsync.sync.push import push
from tests.e2e import ScriptIO, cli_env, kills_before_every_page, pull_stopped_before_page, run_cli

# (transport, Odoo version): JSON-RPC on 17 (raw datetime comparisons), JSON-2 on 19 (whole seconds).
SETUPS = [("jsonrpc", 17), ("json2", 19)]


def odoo_app(
    emu: OdooEmulator, *, transport: str | None = None, name: str = "odoo", url: str = "http://odoo.test"
) -> App:
    app = App(transport=lambda _name: emu.transport()) if url == "http://odoo.test" else App()
    options = {"db": emu.db, "user": emu.login, **({"transport": transport} if transport else {})}
    connect(app, provider="odoo", name=name, base_url=url, options=options, io=ScriptIO(emu.api_key))
    return app


@pytest.fixture(params=SETUPS, ids=[f"{t}-{v}" for t, v in SETUPS])
def setup(request: pytest.FixtureRequest) -> tuple[OdooEmulator, App]:
    transport, version = request.param
    emu = OdooEmulator(version=version)
    app = odoo_app(emu, transport=transport)
    yield emu, app
    app.close()


def provider(app: App, name: str = "odoo") -> OdooProvider:
    p = app.provider(app.connection(name))
    assert isinstance(p, OdooProvider)
    return p


def settle(emu: OdooEmulator, seconds: float = 10) -> None:
    """Let the emulator clock move past pull's settle margin (hi = server time - a few seconds)."""
    emu.clock_offset += seconds


def outcome_lines(
    n: int, *, prefix: str = "o", company_every: int = 0, deal_every: int = 0, task_every: int = 0
) -> str:
    lines = []
    for i in range(n):
        o: dict[str, Any] = {
            "id": f"{prefix}-{i}",
            "occurred_at": "2026-11-20T10:00:00+01:00",
            "contact": {"email": f"person{i}@example.org", "first_name": "P", "last_name": f"N{i}"},
            "disposition": "connected" if i % 2 else "voicemail",
            "duration_seconds": 60 + i % 100,
            "notes": f"call {i}",
        }
        if company_every and i % company_every == 0:
            o["company"] = {"name": f"Co {i % 7}", "domain": f"co{i % 7}.example"}
        if deal_every and i % deal_every == 0:
            o["deal"] = {"name": f"Deal {i}", "amount": 100 + i, "stage": "Qualified"}
        if task_every and i % task_every == 0:
            # A month ahead of today: Odoo reports an activity due today as "today", not "planned".
            due = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT09:00:00+00:00")
            o["next_step"] = {"type": "call", "due_at": due, "notes": "call back"}
        lines.append(json.dumps(o))
    return "\n".join(lines) + "\n"


# -- connect --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "transport"), [(16, "jsonrpc"), (17, "jsonrpc"), (18, "jsonrpc"), (19, "json2")])
def test_connect_detects_version_and_transport(version: int, transport: str) -> None:
    emu = OdooEmulator(version=version)
    app = odoo_app(emu)
    conn = app.connection("odoo")
    assert conn.account_id == "acme"
    assert conn.settings["version"] == version and conn.settings["transport"] == transport
    assert conn.settings["uid"] == emu.uid and conn.settings["company"] == "YourCompany"
    assert app.secrets.get("odoo")["api_key"] == emu.api_key  # type: ignore[index]
    assert "api_key" not in json.dumps(conn.settings)
    health = provider(app).check()
    assert health.ok and health.account == "acme"


def test_connect_transport_override_and_its_limits() -> None:
    emu = OdooEmulator(version=19)
    app = odoo_app(emu, transport="jsonrpc")
    assert app.connection("odoo").settings["transport"] == "jsonrpc"
    with pytest.raises(UsageError, match="JSON-2 needs Odoo 19"):
        odoo_app(OdooEmulator(version=18), transport="json2", name="old")
    with pytest.raises(UsageError, match="--user"):
        connect(
            App(transport=lambda _n: emu.transport()),
            provider="odoo",
            name="x",
            base_url="http://odoo.test",
            options={"db": "acme"},
            io=ScriptIO(emu.api_key),
        )


@pytest.mark.parametrize(("transport", "version"), SETUPS)
def test_connect_errors_are_specific(transport: str, version: int) -> None:
    good = OdooEmulator(version=version)

    def attempt(emu: OdooEmulator, **options: Any) -> None:
        app = App(transport=lambda _n: emu.transport())
        opts = {"db": emu.db, "user": emu.login, "transport": transport, **options}
        connect(app, provider="odoo", name="x", base_url="http://odoo.test", options=opts, io=ScriptIO(emu.api_key))

    with pytest.raises(AuthError) as bad_key:
        attempt(OdooEmulator(version=version, api_key="f" * 40, key_expired=True))
    if version >= 18:
        assert "90 days" in str(bad_key.value)
    with pytest.raises(ConfigError, match="acmex"):
        attempt(good, db="acmex")
    with pytest.raises(ConfigError, match="CRM app is not installed"):
        attempt(OdooEmulator(version=version, crm_installed=False))


def test_expired_key_mid_run_is_an_auth_failure(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    emu.key_expired = True
    result = pull(app, objects=["contacts"])[0]
    assert result.failure.exit_code == 3 and "API key" in (result.error or "")


# -- pull -----------------------------------------------------------------------------------------------
def test_pull_maps_partners_deals_and_associations(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    acme = emu.bulk_create(
        "res.partner", 1, vals_fn=lambda i: {"name": "Acme", "is_company": True, "website": "acme.example"}
    )[0]
    ann = emu.bulk_create(
        "res.partner", 1, vals_fn=lambda i: {"name": "Ann Lee", "email": "Ann@Acme.example", "parent_id": acme}
    )[0]
    gone = emu.bulk_create(
        "res.partner", 1, vals_fn=lambda i: {"name": "Old Timer", "email": "old@x.example", "active": False}
    )[0]
    deal = emu.bulk_create(
        "crm.lead",
        1,
        vals_fn=lambda i: {"name": "Big deal", "partner_id": ann, "expected_revenue": 5000.0, "stage_id": 2},
    )[0]
    emu.bulk_create("crm.lead", 1, vals_fn=lambda i: {"name": "Just a lead", "type": "lead"})
    settle(emu)
    results = pull(app)
    assert all(r.outcome == "ok" for r in results), [r.error for r in results]
    store = app.store
    contact = store.mirror.record("odoo", "contacts", str(ann))
    assert contact is not None
    assert contact.properties == {"email": "Ann@Acme.example", "first_name": "Ann", "last_name": "Lee"}
    assert contact.associations == {"companies": [str(acme)]}
    assert store.mirror.record("odoo", "contacts", str(gone)).archived  # type: ignore[union-attr]
    company = store.mirror.record("odoo", "companies", str(acme))
    assert company is not None and company.properties == {"name": "Acme", "domain": "acme.example"}
    stored_deal = store.mirror.record("odoo", "deals", str(deal))
    assert stored_deal is not None
    assert stored_deal.properties == {"name": "Big deal", "amount": 5000, "stage": "Qualified"}
    assert stored_deal.associations == {"contacts": [str(ann)], "companies": [str(acme)]}
    assert {r.properties["name"] for r in store.mirror.records("odoo", "deals")} == {"Big deal"}


def test_fields_come_from_fields_get(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    emu.add_field("res.partner", "x_lead_source", "selection", selection=[("web", "Web"), ("call", "Call")])
    p = provider(app)
    contact_fields = {f.name: f for f in p.fields("contacts")}
    assert contact_fields["x_lead_source"].custom and contact_fields["x_lead_source"].options == ["web", "call"]
    assert contact_fields["email"].type == "email" and contact_fields["parent_id"].type == "reference"
    assert ("mobile" in contact_fields) == (emu.version < 19)
    deal_fields = {f.name: f for f in p.fields("deals")}
    assert deal_fields["stage_name"].options == sorted(["New", "Qualified", "Proposition", "Won"])
    call_fields = {f.name for f in p.fields("calls")}
    assert {"summary", "note", "date_deadline", "activity_type_xmlid", "crmsync_marker"} <= call_fields


@pytest.mark.slow
def test_pull_3000_same_second_plus_long_transaction_across_pulls(setup: tuple[OdooEmulator, App]) -> None:
    """The issue's check: nothing skipped, nothing stored twice, latest values win."""
    emu, app = setup
    base = emu._utcnow() - timedelta(seconds=30)
    bulk = emu.bulk_create(
        "res.partner",
        3000,
        write_date=base.replace(microsecond=654_321),
        vals_fn=lambda i: {"name": f"Bulk {i}", "email": f"bulk{i}@example.com"},
    )
    slow = emu.long_transaction(
        "res.partner", [{"name": f"Slow {i}", "email": f"slow{i}@example.com"} for i in range(40)], duration_s=3600
    )
    settle(emu)
    first = pull(app, objects=["contacts"])[0]
    assert first.outcome == "ok", first.error
    assert first.objects[0].pages >= 15  # pages of 200
    stored = {r.remote_id for r in app.store.mirror.records("odoo", "contacts")}
    assert set(map(str, bulk)) <= stored and not stored & set(map(str, slow.ids))
    first_hi = datetime.strptime(first.objects[0].cursor["hi"], "%Y-%m-%d %H:%M:%S")  # type: ignore[index]
    assert slow.write_date < first_hi  # when they commit, the slow rows are already "in the past"

    # Edits between pulls, and the slow transaction commits while the second pull is paging.
    for rid in bulk[::300]:
        emu.edit("res.partner", rid, {"name": "Edited Once"})
    seen = {"reads": 0}
    real = emu.transport()

    def committing(request: httpx.Request) -> httpx.Response:
        if b"search_read" in request.content or request.url.path.endswith("/search_read"):
            seen["reads"] += 1
            if seen["reads"] == 2:
                slow.commit()  # rows appear with a write_date before the previous pull's end
        response = real.handle_request(request)
        response.read()
        return response

    app.transport = lambda _name: httpx.MockTransport(committing)
    app._providers.clear()
    settle(emu)
    second = pull(app, objects=["contacts"])[0]
    assert second.outcome == "ok", second.error
    for rid in bulk[::450]:
        emu.edit("res.partner", rid, {"name": "Edited Twice"})
    settle(emu)
    third = pull(app, objects=["contacts"])[0]
    assert third.outcome == "ok", third.error

    rows = app.store.mirror.records("odoo", "contacts")
    assert len(rows) == len({r.remote_id for r in rows})  # exactly once
    live = {r["id"]: r for r in emu.records("res.partner") if not r["is_company"]}
    assert {r.remote_id for r in rows} == {str(i) for i in live}
    by_id = {r.remote_id: r for r in rows}
    for rid in [*bulk[::300], *bulk[::450], *slow.ids]:
        name = live[rid]["name"]
        assert by_id[str(rid)].properties["last_name"] == name.rsplit(" ", 1)[-1], rid
    assert by_id[str(bulk[0])].properties["last_name"] == "Twice"


def test_cursor_resumes_inside_a_window(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    emu.bulk_create("res.partner", 450, write_date=emu._utcnow() - timedelta(seconds=60))
    settle(emu)
    p = provider(app)
    fields = app.mapping(app.connection("odoo")).provider_fields("contacts")
    pages = p.changes("contacts", None, fields=fields)
    first = next(pages)
    assert set(first.cursor or {}) == {"window_lo", "window_hi", "last_id"}
    resumed = list(p.changes("contacts", first.cursor, fields=fields))
    ids = [r.id for r in first.records] + [r.id for page in resumed for r in page.records]
    assert len(ids) == len(set(ids)) == 450 + 2  # + the database's own contacts (bot user, OdooBot)
    assert resumed[-1].cursor == {"hi": first.cursor["window_hi"]}  # type: ignore[index]
    # The next run starts a new window that overlaps the last one.
    again = list(p.changes("contacts", resumed[-1].cursor, fields=fields))
    assert again == [] or all(page.cursor and "hi" in page.cursor for page in again[-1:])


def _orders(app: App, emu: OdooEmulator, during: Any = None) -> list[str]:
    """The search_read orders the emulator is asked for, in order; ``during(n)`` runs before the n-th."""
    seen: list[str] = []
    real = emu.transport()

    def spy(request: httpx.Request) -> httpx.Response:
        if b"search_read" in request.content or request.url.path.endswith("/search_read"):
            seen.append("desc" if b"id desc" in request.content else "asc")
            if during is not None:
                during(len(seen))
        response = real.handle_request(request)
        response.read()
        return response

    app.transport = lambda _name: httpx.MockTransport(spy)
    app._providers.clear()
    return seen


def _pages_of(app: App, size: int) -> None:
    conn = app.connection("odoo")
    assert conn is not None
    conn.settings = {**conn.settings, "page_size": size}
    app.store.connections.save(conn)
    app._providers.clear()


@pytest.mark.parametrize("n", [0, 7, 8, 9, 17, 25, 40])
def test_a_window_is_walked_from_both_ends_each_record_once(n: int) -> None:
    """Pages of 10 (the database has 2 contacts of its own): past the first page the walk also reads downwards."""
    emu = OdooEmulator(version=19)
    app = odoo_app(emu)
    made = emu.bulk_create("res.partner", n, write_date=emu._utcnow() - timedelta(seconds=60))
    settle(emu)
    _pages_of(app, 10)
    orders = _orders(app, emu)
    fields = app.mapping(app.connection("odoo")).provider_fields("contacts")
    pages = list(provider(app).changes("contacts", None, fields=fields))
    ids = [r.id for page in pages for r in page.records]
    assert len(ids) == len(set(ids)) == n + 2 and set(map(str, made)) <= set(ids)
    assert ("desc" in orders) == (n + 2 >= 10)  # a full page cannot tell whether more follow
    full = -(-(n + 2) // 10) or 1
    assert len(orders) <= full + 2 and orders.count("asc") <= 2 + -(-(full - 1) // 2)
    assert set(pages[-1].cursor or {}) == {"hi"}  # only a complete window moves the cursor to its end
    marks = [page.cursor["last_id"] for page in pages[:-1] if page.cursor]
    assert marks == sorted(marks) and all(page.cursor is None or "last_id" in page.cursor for page in pages[:-1])


def _window_killed_at(kill_at: int) -> bool:
    """A pull of 62 contacts in pages of 10 that edits and deletes partners while both ends are read,
    stopped before its page ``kill_at``, then rerun; checks the store. False if never stopped."""
    emu = OdooEmulator(version=19)
    app = odoo_app(emu)
    made = emu.bulk_create("res.partner", 60, write_date=emu._utcnow() - timedelta(seconds=60))
    settle(emu)
    _pages_of(app, 10)

    once = threading.Lock()

    def meddle(n: int) -> None:
        # Once, as the ends' first pages are read (the two ask at the same moment).
        if n >= 3 and once.acquire(blocking=False):
            emu.edit("res.partner", made[4], {"name": "Edited Low"})
            emu.edit("res.partner", made[57], {"name": "Edited High"})
            emu.delete("res.partner", made[30])

    _orders(app, emu, meddle)
    stopped = pull_stopped_before_page(app, kill_at, ["contacts"])
    settle(emu)
    assert pull(app, objects=["contacts"])[0].outcome == "ok"
    assert pull(app, objects=["contacts", "companies"], reconcile=True)[0].outcome == "ok"
    live = {str(r["id"]) for r in emu.records("res.partner") if not r["is_company"] and r["active"]}
    stored = {r.remote_id: r for r in app.store.mirror.records("odoo", "contacts") if not r.archived}
    assert set(stored) == live, kill_at
    assert stored[str(made[4])].properties["last_name"] == "Low"
    assert stored[str(made[57])].properties["last_name"] == "High"
    return stopped


def test_a_window_walked_from_both_ends_with_edits_during_it_and_a_kill_at_any_page(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kill_at = kills_before_every_page(monkeypatch, tmp_path, _window_killed_at)
    assert kill_at >= 6  # killed before each of 6+ pages: 62 contacts in pages of 10 read from two ends


def test_reconcile_finds_deleted_partners(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    ids = emu.bulk_create("res.partner", 5, write_date=emu._utcnow() - timedelta(seconds=60))
    settle(emu)
    pull(app, objects=["contacts"])
    emu.delete("res.partner", ids[2])
    result = pull(app, objects=["contacts"], reconcile=True)[0]
    assert result.outcome == "ok" and result.reconciled == 1
    assert app.store.mirror.record("odoo", "contacts", str(ids[2])).archived  # type: ignore[union-attr]


# -- push -----------------------------------------------------------------------------------------------
def test_push_1000_outcomes_in_at_most_40_writes_and_never_twice(
    setup: tuple[OdooEmulator, App], tmp_path: Path
) -> None:
    emu, app = setup
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcome_lines(1000))
    before = emu.stats.writes
    summary = push(app, source=str(src), connection="odoo")
    assert (summary.created, summary.failed) == (1000, 0), summary.error
    assert emu.stats.writes - before <= 40
    calls = [a for a in emu.records("mail.activity") if "[crmsync:" in (a["note"] or "")]
    messages = [m for m in emu.records("mail.message") if "[crmsync:" in (m["body"] or "")]
    assert len(messages) == 1000  # every call was marked done, which posts its message
    if emu.version >= 19:
        assert len(calls) == 1000 and all(not a["active"] and a["state"] == "done" for a in calls)
    else:
        assert calls == []  # up to 18 a done activity is deleted
    partners = {p["email"]: p["id"] for p in emu.records("res.partner") if p["email"]}
    assert all(f"person{i}@example.org" in partners for i in range(1000))
    first = messages[0]
    assert first["model"] == "res.partner" and first["res_id"] in partners.values()

    assert summary.requests <= 60, summary.requests  # reads included: look-ups, fields_get, type ids
    writes = emu.stats.writes
    again = push(app, source=str(src), connection="odoo")
    assert again.already == 1000 and again.created == 0
    assert emu.stats.writes == writes


def test_push_companies_deals_tasks_and_pull_the_calls_back(setup: tuple[OdooEmulator, App], tmp_path: Path) -> None:
    emu, app = setup
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(60, company_every=2, deal_every=5, task_every=10))
    summary = push(app, source=str(src), connection="odoo")
    assert (summary.created, summary.failed) == (60, 0), summary.error
    companies = [p for p in emu.records("res.partner") if p["is_company"] and p["name"].startswith("Co ")]
    assert len(companies) == 7  # seven distinct domains, each created once
    leads = [r for r in emu.records("crm.lead")]
    assert len(leads) == 12 and all(r["stage_id"][1] == "Qualified" and r["type"] == "opportunity" for r in leads)
    assert all(r["x_crmsync_deal_key"] for r in leads)  # the key field was added before the first deal
    tasks = [a for a in emu.records("mail.activity") if ":task]" in (a["note"] or "")]
    assert len(tasks) == 6 and all(a["state"] == "planned" for a in tasks)
    with app.store.session() as s:
        from sqlmodel import select

        from crmsync.store import CrmOutbox

        rows = list(s.exec(select(CrmOutbox)))
    partner = {p["id"]: p for p in emu.records("res.partner")}
    for row in rows:
        contact = int(row.steps["contacts"])
        if "companies" in row.steps:
            assert partner[contact]["parent_id"][0] == int(row.steps["companies"])
        if "deals" in row.steps:
            lead = next(r for r in leads if r["id"] == int(row.steps["deals"]))
            assert lead["partner_id"][0] == contact

    settle(emu)
    result = pull(app, objects=["calls"])[0]
    assert result.outcome == "ok", result.error
    calls = app.store.mirror.records("odoo", "calls")
    assert len(calls) == 60  # the follow-up tasks are not calls
    one = next(c for c in calls if c.properties["outcome_id"] == "o-3")
    assert one.properties["notes"] == "call 3" and one.properties["title"].startswith("Call with P N3")
    assert one.associations["contacts"]


def test_lookup_matches_existing_records(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    ann = emu.bulk_create("res.partner", 1, vals_fn=lambda i: {"name": "Ann", "email": "Ann_Lee@Example.org"})[0]
    emu.bulk_create("res.partner", 1, vals_fn=lambda i: {"name": "Annx", "email": "annxlee@example.org"})
    co = emu.bulk_create(
        "res.partner",
        1,
        vals_fn=lambda i: {"name": "Globex SA", "is_company": True, "website": "https://www.globex.example/"},
    )[0]
    p = provider(app)
    fields = app.mapping(app.connection("odoo")).provider_fields("contacts")
    found = p.lookup("contacts", [{"email": "ann_lee@example.org"}, {"email": "nobody@example.org"}], fields=fields)
    assert list(found) == ["email:ann_lee@example.org"] and found["email:ann_lee@example.org"].id == str(ann)
    companies = p.lookup("companies", [{"domain": "globex.example"}, {"name": "globex sa"}], fields=["name", "website"])
    assert {k: v.id for k, v in companies.items()} == {"domain:globex.example": str(co), "name:globex sa": str(co)}


def test_a_bad_record_in_a_batch_create_does_not_block_its_neighbours(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    p = provider(app)
    items = [
        Outgoing(ref="a", properties={"name": "Good A", "email": "a@example.org"}, match={"email": "a@example.org"}),
        Outgoing(ref="b", properties={"name": "Bad B", "type": "nonsense"}, match={"email": "b@example.org"}),
        Outgoing(ref="c", properties={"name": "Good C"}, match={"email": "c@example.org"}),
    ]
    results = {r.ref: r for r in p.upsert("contacts", items)}
    assert results["a"].ok and results["c"].ok and results["a"].created
    assert not results["b"].ok and "Wrong value" in (results["b"].error or "") and not results["b"].retriable
    names = {r["name"] for r in emu.records("res.partner")}
    assert {"Good A", "Good C"} <= names and "Bad B" not in names
    updated = p.upsert(
        "contacts",
        [
            Outgoing(ref="a", properties={"function": "CTO"}, match={}, remote_id=results["a"].remote_id),
            Outgoing(ref="c", properties={"function": "CTO"}, match={}, remote_id=results["c"].remote_id),
        ],
    )
    assert all(r.ok for r in updated)
    assert emu.stats.by_route["odoo res.partner.write"] == 1  # identical values: one write for both


def test_unknown_stage_is_an_item_error(setup: tuple[OdooEmulator, App]) -> None:
    _emu, app = setup
    results = provider(app).upsert(
        "deals", [Outgoing(ref="d", properties={"name": "X", "stage_name": "Negotiation"}, match={})]
    )
    assert not results[0].ok and "no CRM stage named 'Negotiation'" in (results[0].error or "")


def test_find_activities_completes_a_call_whose_done_reply_was_lost(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    p = provider(app)
    pid = emu.bulk_create("res.partner", 1)[0]
    item = OutgoingActivity(
        ref="r1",
        marker="lost-1",
        properties={"summary": "Call", "note": "hello", "date_deadline": "2026-11-20"},
        associations={"contacts": str(pid)},
    )
    # The create went through, then the connection died before action_done: simulate that state.
    vals = p._activity_vals("calls", item, marker_field=False)
    act = emu.bulk_create("mail.activity", 1, vals_fn=lambda i: vals)[0]
    assert p.find_activities("calls", ["lost-1", "never-sent"]) == {
        "lost-1": str(act)
        if emu.version >= 19
        else next(str(m["id"]) for m in emu.records("mail.message") if "[crmsync:lost-1]" in (m["body"] or ""))
    }
    assert emu.get("mail.activity", act) is None or emu.get("mail.activity", act)["active"] is False  # type: ignore[index]
    messages = [m for m in emu.records("mail.message") if "[crmsync:lost-1]" in (m["body"] or "")]
    assert len(messages) == 1  # done once, now


def test_marker_field_is_used_when_the_database_has_it(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    emu.add_field("mail.activity", "x_crmsync_outcome_id", "char")
    p = provider(app)
    pid = emu.bulk_create("res.partner", 1)[0]
    item = OutgoingActivity(
        ref="r", marker="m-1", properties={"summary": "S", "note": "n"}, associations={"contacts": str(pid)}
    )
    result = p.create_activities("calls", [item])[0]
    assert result.ok
    if emu.version >= 19:
        row = emu.get("mail.activity", int(result.remote_id))  # type: ignore[arg-type]
        assert row is not None and row["x_crmsync_outcome_id"] == "m-1" and "[crmsync:" not in row["note"]
        assert p.find_activities("calls", ["m-1"]) == {"m-1": result.remote_id}


# -- the CLI end to end, on loopback ----------------------------------------------------------------------
@pytest.mark.slow
def test_cli_pull_and_push_against_a_loopback_odoo(home: Path, tmp_path: Path) -> None:
    emu = OdooEmulator(version=19, partners=40, companies=5, leads=10)
    with emu.serve() as server:
        app = odoo_app(emu, url=server.url, name="prod")
        app.close()
        env = cli_env(home, "prod", emu.api_key)
        emu.clock_offset += 10
        pulled = run_cli(["--json", "pull", "-c", "prod"], env)
        assert pulled.code == 0, pulled.stderr
        src = tmp_path / "o.jsonl"
        src.write_text(outcome_lines(25, company_every=5, deal_every=5))
        pushed = run_cli(["--json", "push", str(src), "-c", "prod"], env)
        assert pushed.code == 0, pushed.stderr
        summary = pushed.json_lines()[-1]["summary"]
        assert summary["created"] == 25 and summary["failed"] == 0
        emu.clock_offset += 10
        again = run_cli(["--json", "pull", "-c", "prod"], env)
        assert again.code == 0, again.stderr
    assert len([m for m in emu.records("mail.message") if "[crmsync:" in (m["body"] or "")]) == 25


# -- what a real Odoo 19 showed (recordings in tests/recordings/odoo19) --------------------------------
RECORDINGS = Path(__file__).parent / "recordings" / "odoo19"


def recorded(name: str) -> Any:
    return json.loads((RECORDINGS / name).read_text())["response"]["body"]


def test_the_version_is_read_from_either_shape_odoo_answers() -> None:
    assert server_version(recorded("web_version.json")) == (19, "19.0")
    assert server_version(recorded("jsonrpc_common_version.json")["result"]) == (19, "19.0")
    assert server_version({"version_info": ["saas~18", 3, 0, "final", 0, ""], "version": "saas~18.3"}) == (
        18,
        "saas~18.3",
    )
    assert server_version({}) == (0, "")


def test_json2_can_be_asked_for_on_19_and_an_unknown_version_is_asked_again() -> None:
    emu = OdooEmulator(version=19)
    app = odoo_app(emu, transport="json2")
    conn = app.connection("odoo")
    assert (conn.settings["transport"], conn.settings["version"]) == ("json2", 19)
    # A connection made by a crmsync that misread /web/version has version 0: it is asked again.
    conn.settings = {**conn.settings, "version": 0}
    app.store.connections.save(conn)
    fresh = App(transport=lambda _name: emu.transport())
    p = provider(fresh)
    assert p.version == 0 and p._calls_from_messages() is False and p.version == 19


def test_pulled_calls_keep_notes_title_and_date_from_the_recorded_19_messages(
    setup: tuple[OdooEmulator, App],
) -> None:
    _, app = setup
    p = provider(app)
    rows = [m for m in recorded("life_09_partner_messages.json") if m["mail_activity_type_id"]]
    first, second = (p._record("calls", "mail.message", {**row, "write_date": row["date"]}) for row in rows)
    assert first.properties["note"] == "Called about renewal & bold"
    assert first.properties["summary"] == "Fixture call 1"
    assert first.properties["date_deadline"] == "2026-12-07"
    assert first.properties["crmsync_marker"] == "fixture-1" and first.associations == {"contacts": ["3355"]}
    # The feedback block after the note is not part of the note.
    assert second.properties["note"] == "Second call & bold" and second.properties["summary"] == "Fixture call 2"


@pytest.mark.parametrize(("transport", "version"), SETUPS)
@pytest.mark.slow
def test_a_missing_database_exits_3_with_one_clear_line(
    home: Path, tmp_path: Path, transport: str, version: int
) -> None:
    emu = OdooEmulator(version=version)
    with emu.serve() as server:
        odoo_app(emu, url=server.url, name="prod", transport=transport).close()
        env = cli_env(home, "prod", emu.api_key)
        emu.db = "acme_renamed"  # the database was renamed (or dropped) after connect
        src = tmp_path / "o.jsonl"
        src.write_text(outcome_lines(2))
        for args in (["pull", "-c", "prod"], ["push", str(src), "-c", "prod"]):
            result = run_cli(args, env)
            assert result.code == 3, (args, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "database 'acme' does not exist" in lines[0], result.stderr
            assert "<" not in lines[0] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_status_live_reflects_the_credentials_as_they_are_now(home: Path) -> None:
    emu = OdooEmulator(version=19)
    with emu.serve() as server:
        odoo_app(emu, url=server.url, name="prod").close()
        env = cli_env(home, "prod", emu.api_key)
        emu.clock_offset += 10
        assert run_cli(["pull", "-c", "prod"], env).code == 0
        emu.key_expired = True
        broken = run_cli(["status", "--check", "--live"], env)
        assert broken.code == 3 and "API key" in broken.stdout + broken.stderr
        emu.key_expired = False  # a new key, or the old one re-enabled
        fixed = run_cli(["status", "--check", "--live"], env)
        assert fixed.code == 0, fixed.stdout + fixed.stderr
        assert "credentials" not in fixed.stdout + fixed.stderr


def _read_back(emu: OdooEmulator, model: str, fields: list[str]) -> list[dict[str, Any]]:
    """search_read through the emulator's own JSON-RPC API (archived rows included)."""
    http = httpx.Client(transport=emu.transport(), base_url="http://odoo.test")
    args = [
        emu.db,
        emu.uid,
        emu.api_key,
        model,
        "search_read",
        [[]],
        {"fields": fields, "context": {"active_test": False}},
    ]
    body = {
        "jsonrpc": "2.0",
        "method": "call",
        "id": 1,
        "params": {"service": "object", "method": "execute_kw", "args": args},
    }
    return list(http.post("/jsonrpc", json=body).json()["result"])


def test_calls_tasks_deals_and_contacts_are_owned_by_the_rep(
    setup: tuple[OdooEmulator, App], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    emu, app = setup
    rep = emu.add_user("rita", "Rita Rep", email="Rita@Acme.example")
    lines = []
    for i, line in enumerate(outcome_lines(40, deal_every=4, task_every=2).splitlines()):
        o = json.loads(line)
        if i < 30:
            o["owner_email"] = "rita@acme.example"  # matched on the user's email, whatever its case
        elif i < 35:
            o["owner_email"] = "ghost@acme.example"  # no such user: the connection's user, with a warning
        lines.append(json.dumps(o))
    src = tmp_path / "o.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="crmsync.odoo"):
        summary = push(app, source=str(src), connection="odoo")
    assert (summary.created, summary.failed) == (40, 0), summary.error

    owner_of = {f"o-{i}": rep if i < 30 else emu.uid for i in range(40)}
    activities = _read_back(emu, "mail.activity", ["note", "user_id", "activity_type_id"])
    ours = [a for a in activities if "[crmsync:" in (a["note"] or "")]
    assert len(ours) == (40 + 20 if emu.version >= 19 else 20)  # up to 18 done calls are deleted
    for a in ours:
        marker = a["note"].split("[crmsync:")[1].split("]")[0].removesuffix(":task")
        assert a["user_id"] and a["user_id"][0] == owner_of[marker], a
    assert all(a["user_id"] for a in activities)  # nobody's activity: none
    partners = {p["email"]: p for p in _read_back(emu, "res.partner", ["email", "user_id"])}
    for i in range(40):
        contact = partners[f"person{i}@example.org"]
        assert (contact["user_id"] or [None])[0] == (rep if i < 30 else emu.uid if i < 35 else None)
    leads = _read_back(emu, "crm.lead", ["name", "user_id"])
    assert len(leads) == 10 and all(d["user_id"][0] == owner_of[f"o-{d['name'].split()[1]}"] for d in leads)
    assert emu.stats.by_route["odoo res.users.search_read"] <= 6  # batched and cached, not per record
    warned = [r for r in caplog.records if "ghost@acme.example" in r.getMessage()]
    assert len(warned) == 1 and "not an Odoo user" in warned[0].getMessage()
    p = provider(app)
    assert p.resolve_owners(["RITA", "rita@acme.example", "ghost@acme.example"]) == {
        "rita": rep,
        "rita@acme.example": rep,
    }


def test_matched_deals_are_read_in_batched_rpcs(setup: tuple[OdooEmulator, App], tmp_path: Path) -> None:
    emu, app = setup
    emu.add_field("crm.lead", "x_crmsync_deal_key", string="crmsync deal key")
    text = outcome_lines(200, deal_every=1)
    outcomes = [CallOutcome.model_validate_json(line) for line in text.splitlines()]
    contacts = emu.bulk_create(
        "res.partner", 200, vals_fn=lambda i: {"name": f"P N{i}", "email": f"person{i}@example.org"}
    )
    emu.bulk_create(
        "crm.lead",
        200,
        vals_fn=lambda i: {"name": f"Deal {i}", "partner_id": contacts[i], "x_crmsync_deal_key": deal_key(outcomes[i])},
    )
    src = tmp_path / "o.jsonl"
    src.write_text(text)
    before = emu.stats.by_route["odoo res.partner.read"]
    summary = push(app, source=str(src), connection="odoo")
    assert (summary.created + summary.updated, summary.failed) == (200, 0), summary.error
    assert len(emu.records("crm.lead")) == 200  # every deal was matched, none created again
    reads = emu.stats.by_route["odoo res.partner.read"] - before
    assert 1 <= reads <= 5, reads  # one per lookup batch, not one per matched deal


def test_a_note_with_markup_goes_in_as_text_and_comes_back_the_same(setup: tuple[OdooEmulator, App]) -> None:
    emu, app = setup
    partner = emu.bulk_create("res.partner", 1, vals_fn=lambda i: {"name": "Ann"})[0]
    note = "Renewal & pricing: <b>not</b> bold\n<script>alert(1)</script>"
    item = OutgoingActivity("r", "n-1", {"summary": "Call with Ann", "note": note}, {"contacts": str(partner)})
    [result] = provider(app).create_activities("calls", [item])
    assert result.ok, result.error
    [message] = [m for m in emu.records("mail.message") if "[crmsync:n-1]" in (m["body"] or "")]
    assert "<script>" not in message["body"] and "&lt;b&gt;not&lt;/b&gt;" in message["body"]
    settle(emu)
    assert pull(app, objects=["calls"])[0].outcome == "ok"
    [call] = app.store.mirror.records("odoo", "calls")
    assert call.properties["notes"] == note and call.properties["title"] == "Call with Ann"
