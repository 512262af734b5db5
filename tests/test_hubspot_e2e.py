"""HubSpot end to end: the real provider, engine and CLI against the emulator (issue 3's checks)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.cli.exits import for_push
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.store import CrmRecord
from crmsync.sync.pull import pull
from crmsync.sync.push import push
from tests.e2e import ScriptIO, cli_env, hubspot_app, run_cli, write_config
from tests.openapi_check import SpecCheck


@pytest.fixture
def emulator() -> HubSpotEmulator:
    return HubSpotEmulator(seed=3)


@pytest.fixture
def server(emulator: HubSpotEmulator):  # type: ignore[no-untyped-def]
    srv = emulator.serve()
    yield srv
    srv.stop()


def outcome_lines(n: int, *, prefix: str = "o", company_every: int = 0, deal_every: int = 0) -> str:
    lines = []
    for i in range(n):
        o: dict = {
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
            o["deal"] = {"name": f"Deal {i}", "amount": 100 + i, "currency": "EUR", "stage": "appointmentscheduled"}
        lines.append(json.dumps(o))
    return "\n".join(lines) + "\n"


def _contacts_pulled_once(emulator: HubSpotEmulator, server: Any, home: Path, *, search_rate_limit: int) -> Any:
    """10 contacts in the portal, pulled once into a fresh store: the app, ready for an incremental pull."""
    write_config(home, "hs", search_rate_limit=search_rate_limit, rate_limit=100000)
    emulator.seed(contacts=10)
    app = hubspot_app(server.url, emulator.private_app_token)
    first = pull(app, objects=["contacts"])[0]
    assert first.outcome == "ok" and first.objects[0].read == 10
    return app


@pytest.mark.slow
def test_pull_past_the_10k_search_cap_stores_every_record_once(emulator: HubSpotEmulator, server, home: Path) -> None:
    app = _contacts_pulled_once(emulator, server, home, search_rate_limit=1000)

    now = time.time()
    emulator.bulk_create(
        "contacts",
        25_000,
        modified_at=now - 60.0,
        properties_fn=lambda i: {"email": f"bulk{i}@example.com", "firstname": f"B{i}"},
    )
    for i in range(3_000):
        emulator.bulk_create(
            "contacts",
            1,
            modified_at=now - 50.0 + i * 0.01,
            properties_fn=lambda _j, i=i: {"email": f"late{i}@example.com", "firstname": f"L{i}"},
        )
    second = pull(app, objects=["contacts"])[0]
    assert second.outcome == "ok", second.error
    assert app.store.mirror.count_records("hs")["contacts"]["stored"] == 28_010

    live = {r["id"]: r for r in emulator.records("contacts")}
    edited = list(live)[::1000]
    for rid in edited:
        emulator.edit("contacts", rid, {"firstname": "Edited"}, at=time.time() - 1)
    gone = list(live)[7]
    emulator.archive("contacts", gone)
    third = pull(app, objects=["contacts"])[0]
    assert third.outcome == "ok", third.error
    rows = app.store.mirror.records("hs", "contacts")
    assert len(rows) == len({r.remote_id for r in rows}) == 28_010
    by_id = {r.remote_id: r for r in rows}
    for rid in edited:
        assert by_id[rid].properties["first_name"] == "Edited"
    assert by_id[gone].archived
    sample = list(live)[::997]
    for rid in sample:
        if rid in edited or rid == gone:
            continue
        assert by_id[rid].properties.get("email") == live[rid]["properties"]["email"]


def test_a_walk_past_the_cap_reads_each_record_once_even_with_ties_across_it(
    emulator: HubSpotEmulator, server, home: Path
) -> None:
    """At 10,000 results the walk starts a new search; records at the boundary's millisecond are not read twice."""
    app = _contacts_pulled_once(emulator, server, home, search_rate_limit=1000)
    start = time.time() - 60.0
    for k in range(3_500):  # three records per millisecond: the cap falls inside one of them
        emulator.bulk_create(
            "contacts", 3, modified_at=start + k * 0.001, properties_fn=lambda i, k=k: {"email": f"t{k}-{i}@x.io"}
        )
    emulator.keep_log = True
    result = pull(app, objects=["contacts"])[0]
    assert result.outcome == "ok", result.error
    assert result.objects[0].read == 10_500  # every new record, none twice
    assert app.store.mirror.count_records("hs")["contacts"]["stored"] == 10_510
    searches = [path for _, path, _ in emulator.stats.log if path.endswith("/search")]
    assert len(searches) == 53  # ceil(10,500 / 200): the new search holds exactly the rest


@pytest.mark.slow
def test_push_1000_outcomes_costs_at_most_40_requests_and_never_twice(
    emulator: HubSpotEmulator, server, home: Path, tmp_path: Path
) -> None:
    app = hubspot_app(server.url, emulator.private_app_token)
    app.close()
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcome_lines(1000))
    env = cli_env(home, "hs", emulator.private_app_token)
    result = run_cli(["--json", "push", str(src), "-c", "hs"], env)
    assert result.code == 0, result.stderr
    summary = result.json_lines()[-1]["summary"]
    assert summary["created"] == 1000
    assert summary["requests"] <= 40, summary
    calls = emulator.records("calls")
    assert len(calls) == 1000
    contacts = {r["properties"]["email"]: r["id"] for r in emulator.records("contacts")}
    for call in calls:
        i = int(call["properties"]["crmsync_outcome_id"].split("-")[1])
        assert emulator.associations("calls", call["id"], "contacts") == [contacts[f"person{i}@example.org"]]
    writes = emulator.stats.writes
    again = run_cli(["--json", "push", str(src), "-c", "hs"], env)
    assert again.code == 0, again.stderr
    summary2 = again.json_lines()[-1]["summary"]
    assert summary2["requests"] == 0 and summary2["already"] == 1000
    assert emulator.stats.writes == writes
    assert len(emulator.records("calls")) == 1000


def test_access_token_expiring_mid_pull_is_refreshed(home: Path) -> None:
    emulator = HubSpotEmulator(seed=5, contacts=450)
    server = emulator.serve()
    seen = {"n": 0}

    class ExpiringTransport(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.startswith("/crm/v3/objects/contacts"):
                seen["n"] += 1
                if seen["n"] == 3:
                    emulator.expire_tokens()  # the token dies between two pages
            return super().handle_request(request)

    try:
        from crmsync.app import App
        from crmsync.sync.connect import connect

        app = App(transport=lambda name: ExpiringTransport())
        io = ScriptIO(emulator.client_secret, open_with=lambda url: httpx.get(url, follow_redirects=True))
        conn = connect(
            app,
            provider="hubspot",
            name="oauth",
            base_url=server.url,
            options={"oauth": True, "client_id": emulator.client_id},
            io=io,
        )
        assert conn.settings["auth"] == "oauth"
        secret_before = app.secrets.get("oauth")
        result = pull(app, objects=["contacts"])[0]
        assert result.outcome == "ok", result.error
        assert result.objects[0].read == 450
        assert seen["n"] >= 3
        secret_after = app.secrets.get("oauth")
        assert secret_after["access_token"] != secret_before["access_token"]  # persisted at once
        assert secret_after["refresh_token"]
    finally:
        server.stop()


def test_provider_traffic_validates_against_the_official_specs(tmp_path: Path) -> None:
    emulator = HubSpotEmulator(seed=9, contacts=120, companies=30, deals=20)
    spec = SpecCheck.hubspot()
    transport = spec.wrap(emulator)
    app = hubspot_app("http://hubspot.test", emulator.private_app_token, transport=lambda name: transport)
    results = pull(app)
    assert all(r.outcome == "ok" for r in results)
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(150, company_every=3, deal_every=5))
    lines = src.read_text().splitlines()
    lines[0] = json.dumps(
        {**json.loads(lines[0]), "next_step": {"type": "call", "due_at": "2026-12-01T09:00:00+00:00"}}
    )
    src.write_text("\n".join(lines) + "\n")
    summary = push(app, source=str(src), connection="hs")
    assert summary.created == 150 and summary.failed == 0
    again = pull(app)
    assert all(r.outcome == "ok" for r in again)
    assert transport.problems == [], transport.problems[:5]
    assert transport.checked > 30  # type: ignore[attr-defined]
    # What no official spec covers: account info, dispositions, private-app token info, v4 batch reads.
    assert {u.split(" ")[1].split("/")[1] for u in transport.unchecked} <= {"account-info", "calling", "oauth", "crm"}


def test_push_batches_companies_deals_and_tasks_with_associations(
    emulator: HubSpotEmulator, server, tmp_path: Path
) -> None:
    app = hubspot_app(server.url, emulator.private_app_token)
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(300, company_every=2, deal_every=5))
    summary = push(app, source=str(src), connection="hs")
    assert (summary.created, summary.failed) == (300, 0)
    assert len(emulator.records("companies")) == 7  # seven distinct domains, each created once
    assert len(emulator.records("deals")) == 60
    with app.store.session() as s:
        from sqlmodel import select

        from crmsync.store import CrmOutbox

        rows = list(s.exec(select(CrmOutbox)))
    for row in rows[:50]:
        steps = row.steps
        contact = steps["contacts"]
        assert emulator.associations("calls", steps["calls"], "contacts") == [contact]
        if "companies" in steps:
            assert steps["companies"] in emulator.associations("contacts", contact, "companies")
            assert steps["companies"] in emulator.associations("calls", steps["calls"], "companies")
        if "deals" in steps:
            assert contact in emulator.associations("deals", steps["deals"], "contacts")


def test_mirror_matching_spends_no_lookups_after_a_pull(emulator: HubSpotEmulator, server, tmp_path: Path) -> None:
    emulator.seed(contacts=50)
    app = hubspot_app(server.url, emulator.private_app_token)
    pull(app, objects=["contacts"])
    known = [r for r in app.store.mirror.records("hs", "contacts") if r.properties.get("email")][:20]
    lines = []
    for i, r in enumerate(known):
        lines.append(
            json.dumps(
                {
                    "id": f"k{i}",
                    "occurred_at": "2026-11-20T10:00:00Z",
                    "contact": {"email": r.properties["email"]},
                    "disposition": "busy",
                }
            )
        )
    src = tmp_path / "k.jsonl"
    src.write_text("\n".join(lines) + "\n")
    before = dict(emulator.stats.by_route)
    summary = push(app, source=str(src), connection="hs")
    assert summary.created == 20
    used = {k: v - before.get(k, 0) for k, v in emulator.stats.by_route.items() if v != before.get(k, 0)}
    assert not any("contacts" in k and ("read" in k or "upsert" in k or "search" in k) for k in used), used


def test_lookup_matches_existing_crm_contacts_and_keeps_crm_values(
    emulator: HubSpotEmulator, server, tmp_path: Path
) -> None:
    app = hubspot_app(server.url, emulator.private_app_token)
    ids = emulator.bulk_create(
        "contacts", 1, properties_fn=lambda i: {"email": "x@example.com", "firstname": "Crm", "jobtitle": ""}
    )
    src = tmp_path / "x.jsonl"
    src.write_text(
        json.dumps(
            {
                "id": "x1",
                "occurred_at": "2026-11-20T10:00:00Z",
                "disposition": "connected",
                "contact": {"email": "x@example.com", "first_name": "Outcome", "title": "CTO"},
            }
        )
        + "\n"
    )
    summary = push(app, source=str(src), connection="hs")
    assert summary.created == 1 and summary.field_conflicts == 1
    rec = emulator.get("contacts", ids[0])
    assert rec["properties"]["firstname"] == "Crm"  # fill-empty keeps the CRM's name
    assert rec["properties"]["jobtitle"] == "CTO"  # and fills the empty title
    assert len(emulator.records("contacts")) == 1


def test_new_contacts_are_created_blind_and_only_existing_ones_looked_up(
    emulator: HubSpotEmulator, server, tmp_path: Path
) -> None:
    """Emails the mirror has never seen go straight to batch create; the CRM's CONFLICT for the ten
    that exist sends just those through lookup, the conflict rules and an update: no duplicate."""
    app = hubspot_app(server.url, emulator.private_app_token)
    existing = emulator.bulk_create(
        "contacts", 10, properties_fn=lambda i: {"email": f"person{i * 15}@example.org", "firstname": f"Crm{i}"}
    )
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(150, company_every=0, deal_every=0))
    before = emulator.stats.by_route.copy()
    summary = push(app, source=str(src), connection="hs")
    assert summary.created == 150 and summary.failed == 0
    assert len(emulator.records("contacts")) == 150
    for i, rid in enumerate(existing):
        assert emulator.get("contacts", rid)["properties"]["firstname"] == f"Crm{i}"  # fill-empty kept it
    routes = {k: v - before.get(k, 0) for k, v in emulator.stats.by_route.items() if v - before.get(k, 0)}
    reads = routes.get("POST crm.objects.batch.read", 0)
    assert reads == 1, routes  # one lookup, for the ten collisions only (not one per 100 contacts)
    assert summary.field_conflicts == 10


def test_a_whole_batch_409_is_looked_up_and_the_rest_sent_again(tmp_path: Path) -> None:
    """The reference leaves open whether HubSpot answers a duplicate email in a batch create per item
    (207) or for the whole batch (409). For the latter, the batch's keys are looked up: the existing
    contact is updated, the others created again: nothing duplicated, nothing lost."""
    emulator = HubSpotEmulator(seed=4)
    [rid] = emulator.bulk_create("contacts", 1, properties_fn=lambda i: {"email": "person7@example.org"})
    inner = emulator.transport()

    def whole_batch_409(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/crm/v3/objects/contacts/batch/create" and b"person7@" in request.content:
            body = {"status": "error", "message": f"Contact already exists. Existing ID: {rid}", "category": "CONFLICT"}
            return httpx.Response(409, json=body)
        return inner.handle_request(request)

    transport = httpx.MockTransport(whole_batch_409)
    app = hubspot_app("http://hubspot.test", emulator.private_app_token, transport=lambda name: transport)
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(40))
    summary = push(app, source=str(src), connection="hs")
    assert summary.created == 40 and summary.failed == 0
    emails = [r["properties"]["email"] for r in emulator.records("contacts")]
    assert len(emails) == 40 and len(set(emails)) == 40
    assert emulator.get("contacts", rid)["properties"]["lastname"] == "N7"  # the existing one was updated


def test_concurrent_reads_of_the_store_during_pull_are_safe(emulator: HubSpotEmulator, server) -> None:
    emulator.seed(contacts=300)
    app = hubspot_app(server.url, emulator.private_app_token)
    errors: list[Exception] = []

    def reader() -> None:
        try:
            for _ in range(20):
                with app.store.session() as s:
                    from sqlmodel import select

                    list(s.exec(select(CrmRecord).limit(10)))
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    pull(app)
    t.join()
    assert errors == []


def test_two_pulls_leave_the_store_equal_to_the_emulator(emulator: HubSpotEmulator, server) -> None:
    emulator.seed(contacts=120, companies=30, deals=25)
    app = hubspot_app(server.url, emulator.private_app_token)
    pull(app)
    companies = [r["id"] for r in emulator.records("companies")]
    deals = [r["id"] for r in emulator.records("deals")]
    emulator.edit("companies", companies[0], {"name": "Renamed Co"}, at=time.time() - 2)
    emulator.edit("deals", deals[0], {"amount": "4242"}, at=time.time() - 2)
    emulator.archive("deals", deals[1])
    emulator.bulk_create(
        "contacts",
        5,
        modified_at=time.time() - 2,
        properties_fn=lambda i: {"email": f"fresh{i}@example.com", "firstname": "Fresh"},
    )
    pull(app)
    for obj in ("contacts", "companies", "deals"):
        remote = {r["id"]: r for r in emulator.records(obj)}
        local = {r.remote_id: r for r in app.store.mirror.records("hs", obj, archived=False)}
        assert set(local) == set(remote), obj
        mapping = app.mapping(app.connection("hs"))
        for rid in list(remote)[::7]:
            expected = mapping.to_canonical(obj, remote[rid]["properties"])
            assert local[rid].properties == expected, (obj, rid)
    assert app.store.mirror.record("hs", "deals", deals[1]).archived  # type: ignore[union-attr]
    assert app.store.mirror.record("hs", "companies", companies[0]).properties["name"] == "Renamed Co"  # type: ignore[union-attr]


def test_reconcile_marks_vanished_records_and_re_reads_links(emulator: HubSpotEmulator, server) -> None:
    emulator.seed(contacts=30, companies=5)
    app = hubspot_app(server.url, emulator.private_app_token)
    pull(app, objects=["contacts", "companies"])
    contact = emulator.records("contacts")[0]["id"]
    company = emulator.records("companies")[-1]["id"]
    emulator.link("contacts", contact, "companies", company)  # linking does not bump modified dates
    # A record deleted for good (not archived) leaves no trace but its absence.
    victim = emulator.records("contacts")[1]["id"]
    with emulator.lock:
        store = emulator._stores["contacts"]
        store.records.pop(int(victim))
        store.active.remove(int(victim))
    result = pull(app, objects=["contacts"], reconcile=True)[0]
    assert result.reconciled == 1
    assert app.store.mirror.record("hs", "contacts", victim).archived  # type: ignore[union-attr]
    assert company in app.store.mirror.record("hs", "contacts", contact).associations["companies"]  # type: ignore[union-attr]
    assert result.objects[0].associations_fixed >= 1


@pytest.mark.slow
def test_oauth_without_a_browser_takes_the_pasted_redirect(home: Path) -> None:
    emulator = HubSpotEmulator(seed=1, contacts=3)
    server = emulator.serve()
    try:
        from crmsync.app import App
        from crmsync.sync.connect import connect

        class PasteIO(ScriptIO):
            def ask(self, prompt: str) -> str:
                url = next(m for m in self.messages if "http" in m).split()[-1]
                # The user opens the URL elsewhere and copies the address the browser ended on.
                redirect = httpx.get(url, follow_redirects=False)
                return redirect.headers["location"]

        app = App()
        conn = connect(
            app,
            provider="hubspot",
            name="nb",
            base_url=server.url,
            options={"oauth": True, "client_id": emulator.client_id, "no_browser": True},
            io=PasteIO(emulator.client_secret),
        )
        assert conn.account_id == str(emulator.portal_id)
        assert "crm.objects.contacts.read" in conn.scopes
    finally:
        server.stop()


def test_missing_scope_is_named_at_connect(home: Path) -> None:
    from crmsync.errors import AuthError

    emulator = HubSpotEmulator(seed=1, scopes=["crm.objects.contacts.read", "crm.objects.contacts.write"])
    server = emulator.serve()
    try:
        with pytest.raises(AuthError, match=r"crm\.objects\.deals\.read"):
            hubspot_app(server.url, emulator.private_app_token)
    finally:
        server.stop()


def test_rate_limited_portal_is_paced_without_unrecovered_429s(home: Path) -> None:
    from crmsync.emulators.base import Faults

    # A portal allowing 200 requests per rolling 10 s, and crmsync told so (rate_limit is per 10 s).
    emulator = HubSpotEmulator(
        seed=8, contacts=600, faults=Faults(rate_limits={"default": (200, 10.0), "search": (5, 1.0)})
    )
    server = emulator.serve()
    try:
        write_config(home, "hs", rate_limit=200)
        app = hubspot_app(server.url, emulator.private_app_token)
        result = pull(app, objects=["contacts"])[0]
        assert result.outcome == "ok" and result.objects[0].read == 600
        assert result.rate_limited <= 2  # the bucket keeps us under the limit; any 429 is retried
    finally:
        server.stop()


@pytest.mark.slow
def test_lanes_share_no_record_and_run_together_without_duplicates(
    emulator: HubSpotEmulator, server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many small lanes at once: a contact called with and without a company, companies and deals
    shared across outcomes; every record exactly once, every call on its contact."""
    from crmsync.model import CallOutcome, canonical
    from crmsync.sync.push import ENTITY_STEPS, PushSettings
    from crmsync.sync.push.items import Item, entity_key
    from crmsync.sync.push.lanes import split_lanes

    settings = PushSettings(lane_size=5)
    lines = []
    for i in range(240):
        o: dict = {
            "id": f"l-{i}",
            "occurred_at": f"2026-11-20T10:{i % 60:02d}:00Z",
            "contact": {"email": f"p{i % 90}@example.org"},  # each contact called 2-3 times
            "disposition": "connected",
        }
        if i % 3 == 0:
            o["company"] = {"name": f"Co {i % 11}", "domain": f"co{i % 11}.example"}
        if i % 8 == 0:
            o["deal"] = {"name": f"Deal {i % 13}", "amount": 10, "currency": "EUR", "stage": "appointmentscheduled"}
        lines.append(json.dumps(o))
    src = tmp_path / "l.jsonl"
    src.write_text("\n".join(lines) + "\n")
    items = [
        Item(type("Row", (), {"id": n, "steps": {}})(), outcome.occurred_at, canonical(outcome))  # type: ignore[arg-type]
        for n, outcome in enumerate(CallOutcome.model_validate_json(line) for line in lines)
    ]
    lanes = split_lanes(items, lane_size=settings.lane_size)
    assert len(lanes) > 3 and sum(map(len, lanes)) == 240
    owner: dict[tuple[str, str], int] = {}
    for n, lane in enumerate(lanes):
        assert [it.row.id for it in lane] == sorted(it.row.id for it in lane)  # input order kept
        for it in lane:
            for obj in ENTITY_STEPS:
                if k := entity_key(obj, it.canon):
                    assert owner.setdefault((obj, k), n) == n, (obj, k)  # a record is in one lane only

    app = hubspot_app(server.url, emulator.private_app_token)
    summary = push(app, source=str(src), connection="hs", settings=settings)
    assert (summary.created, summary.failed) == (240, 0)
    assert len(emulator.records("contacts")) == 90
    assert len(emulator.records("companies")) == 11
    assert len(emulator.records("deals")) == len({entity_key("deals", it.canon) for it in items} - {None})
    assert len(emulator.records("calls")) == 240
    contacts = {r["properties"]["email"]: r["id"] for r in emulator.records("contacts")}
    for call in emulator.records("calls"):
        i = int(call["properties"]["crmsync_outcome_id"].split("-")[1])
        assert emulator.associations("calls", call["id"], "contacts") == [contacts[f"p{i % 90}@example.org"]]


@pytest.mark.parametrize("sink_breaks", [False, True])
def test_lanes_close_their_outcomes_as_they_finish_and_a_stop_keeps_what_they_closed(
    emulator: HubSpotEmulator, server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink_breaks: bool
) -> None:
    """A lane marks its outcomes done when it takes its last step, not when the round ends: when a
    lane then stops the round (the CRM unavailable), what the others closed is done, counted and
    receipted in input order; the rest goes back to the queue, and a re-run delivers only that. A
    receipt reader gone at that moment does not turn the CRM's error into a broken pipe."""
    from crmsync.errors import ExitCode, RetriableError
    from crmsync.sync.push import PushSettings, receipt
    from crmsync.sync.push import lanes as push_lanes

    settings = PushSettings(lane_size=5)
    src = tmp_path / "f.jsonl"
    src.write_text(outcome_lines(40, prefix="f"))  # 40 contacts of their own: 8 lanes of 5
    closed = {k: threading.Event() for k in range(9)}  # lane k: outcomes f-5k ... f-5k+4
    closed[8].set()
    closing: list[int] = []
    settle, activity = push_lanes.settle, push_lanes.activity_step

    def lane_of(items: list[Any]) -> int:
        return int(items[0].row.outcome_id.split("-")[1]) // 5

    def last_first_settle(app: Any, items: list[Any], summary: Any, **kw: Any) -> Any:
        k = lane_of(items)
        assert closed[k + 1].wait(30)  # lanes close last one first; receipts still come in input order
        out = settle(app, items, summary, **kw)
        closing.append(k)
        closed[k].set()
        return out

    def failing_activity(
        app: Any, conn: Any, provider: Any, mapping: Any, obj: str, part: list[Any], *a: Any, **kw: Any
    ) -> Any:
        if obj == "calls" and lane_of(part) == 0:
            assert closed[1].wait(30)  # the other seven lanes are done before this one stops
            raise RetriableError("HubSpot is unavailable (test)")
        return activity(app, conn, provider, mapping, obj, part, *a, **kw)

    monkeypatch.setattr(push_lanes, "settle", last_first_settle)
    monkeypatch.setattr(push_lanes, "activity_step", failing_activity)
    app = hubspot_app(server.url, emulator.private_app_token)
    receipts: list[Any] = []

    def sink(receipt: Any) -> None:
        if sink_breaks:
            raise BrokenPipeError("the reader went away")
        receipts.append(receipt)

    summary = push(app, source=str(src), connection="hs", sink=sink, settings=settings)
    assert for_push(summary) == ExitCode.TEMPFAIL and summary.created == 35 and summary.pending == 5
    assert summary.error == "HubSpot is unavailable (test)"
    assert closing == [7, 6, 5, 4, 3, 2, 1]
    if not sink_breaks:
        assert [r.id for r in receipts] == [f"f-{i}" for i in range(5, 40)]  # input order, not closing order
        assert {r.status for r in receipts} == {"created"}
    assert {receipt(app, "hs", f"f-{i}").status for i in range(5)} == {"queued"}
    assert len(emulator.records("calls")) == 35

    monkeypatch.setattr(push_lanes, "activity_step", activity)
    monkeypatch.setattr(push_lanes, "settle", settle)
    again = push(app, source=None, connection="hs", settings=settings)
    assert (for_push(again), again.created, again.pending) == (0, 5, 0)
    assert len(emulator.records("calls")) == 40 and len(emulator.records("contacts")) == 40
    assert {receipt(app, "hs", f"f-{i}").status for i in range(40)} == {"created"}


def test_one_objects_search_pages_are_asked_for_side_by_side_and_stored_in_order(
    emulator: HubSpotEmulator, server, home: Path
) -> None:
    """Search paging is by offset: after the first page, the next ones go at once (the limit paces them)."""
    from crmsync.emulators.base import Faults

    app = _contacts_pulled_once(emulator, server, home, search_rate_limit=1000)
    now = time.time()
    emulator.bulk_create(
        "contacts", 1_500, modified_at=now - 20.0, properties_fn=lambda i: {"email": f"s{i}@example.com"}
    )
    emulator.faults = Faults(latency_ms=60)
    emulator.stats.concurrent_peak = 0
    result = pull(app, objects=["contacts"])[0]
    assert result.outcome == "ok", result.error
    assert emulator.stats.concurrent_peak >= 3  # one walk, several of its pages in flight
    assert app.store.mirror.count_records("hs")["contacts"]["stored"] == 1_510
    cursor = app.store.mirror.cursor("hs", "contacts")
    assert cursor is not None and cursor["mode"] == "search"


def test_the_look_back_re_reads_only_what_the_last_search_could_have_missed(
    emulator: HubSpotEmulator, server, home: Path
) -> None:
    """Search lags writes, so a pull re-reads the look-back window before the last run's start, not its cursor."""
    write_config(home, "hs", search_rate_limit=1000, rate_limit=100000)
    now = time.time()
    for k, age in enumerate((3610, 3600)):  # the last change an hour before the first run
        emulator.bulk_create("contacts", 1, modified_at=now - age, properties_fn=lambda i, k=k: {"email": f"o{k}@x.io"})
    app = hubspot_app(server.url, emulator.private_app_token)

    def read() -> int:
        result = pull(app, objects=["contacts"])[0]
        assert result.outcome == "ok", result.error
        return result.objects[0].read

    assert read() == 2  # the first run lists everything
    assert read() == 0  # the list read every record up to its newest: search goes on after it
    for k, age in enumerate((10, 2)):  # two changes just before a run
        emulator.bulk_create("contacts", 1, modified_at=now - age, properties_fn=lambda i, k=k: {"email": f"n{k}@x.io"})
    assert read() == 2
    assert read() == 2  # both again: written within the look-back of that run's start


@pytest.mark.slow
def test_the_archived_list_is_read_while_the_search_walk_runs_and_archives_are_applied(
    emulator: HubSpotEmulator, server, home: Path
) -> None:
    """Not one more round trip after the walk: the first archived page is asked for as the walk starts."""
    from crmsync.emulators.base import Faults

    app = _contacts_pulled_once(emulator, server, home, search_rate_limit=2)
    gone = [r["id"] for r in emulator.records("contacts")[:2]]
    for rid in gone:
        emulator.archive("contacts", rid)
    emulator.bulk_create(
        "contacts", 1_000, modified_at=time.time() - 20.0, properties_fn=lambda i: {"email": f"w{i}@x.io"}
    )
    emulator.faults = Faults(latency_ms=30)
    emulator.keep_log = True
    emulator.stats.log.clear()
    result = pull(app, objects=["contacts"])[0]
    assert result.outcome == "ok", result.error
    paths = [path for _, path, _ in emulator.stats.log]
    searches = [i for i, path in enumerate(paths) if path.endswith("/search")]
    listed = [i for i, path in enumerate(paths) if path == "/crm/v3/objects/contacts"]
    assert len(searches) >= 5 and listed  # a walk of several pages at 2/s, and the archived list
    assert listed[0] < searches[-1]  # read while the walk ran
    assert all(app.store.mirror.record("hs", "contacts", rid).archived for rid in gone)  # type: ignore[union-attr]
    assert app.store.mirror.count_records("hs")["contacts"]["stored"] == 1_010


def test_lanes_with_few_keys_of_an_object_share_one_lookup_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consecutive lanes whose keys of an object fit one lookup call together are looked up in one
    (and share its answer); a lane whose keys fill a call, or a kind's own smaller limit, starts the next."""
    from crmsync.sync.push.items import Item
    from crmsync.sync.push.lanes import LaneLookups

    calls: list[tuple[str, list[int]]] = []

    def fake(app: object, conn: object, provider: object, mapping: object, items: list, obj: str, _: object) -> dict:
        calls.append((obj, [it.row.id for it in items if obj in it.canon]))
        return {}

    row = lambda n: type("Row", (), {"id": n, "steps": {}})()  # noqa: E731
    deals_and_emails = [2, 1, 0, 2, 3]  # deals per lane (keys d-<lane>-<n>), each outcome with its own email
    lanes = [
        [
            Item(
                row(10 * lane + n),
                None,  # type: ignore[arg-type]
                {"contacts": {"email": f"p{lane}-{n}@x.io"}, "deals": {"key": f"d{lane}{n}"}},
            )
            for n in range(count)
        ]
        + [Item(row(10 * lane + 9), None, {"contacts": {"phone": f"+1202555{lane:04d}"}})]  # type: ignore[arg-type]
        for lane, count in enumerate(deals_and_emails)
    ]
    limits = type("Limits", (), {"lookup_batch": lambda self, obj, kind: {"key": 3, "email": 4}.get(kind, 1)})()
    lookups = LaneLookups(None, None, limits, None, threads=False, look_up=fake)  # type: ignore[arg-type]
    started = lookups.start(lanes)
    deals = [ids for obj, ids in calls if obj == "deals"]
    assert deals == [[0, 1, 10], [30, 31], [40, 41, 42]]  # 2+1(+0) deals, then 2, then 3: a call of 3 keys at most
    assert started[0][1]["deals"] is started[1][1]["deals"] is started[2][1]["deals"]  # one answer, shared
    contacts = [ids for obj, ids in calls if obj == "contacts"]
    assert all(len([i for i in ids if i % 10 == 9]) == 1 for ids in contacts)  # one phone a call: its limit is 1
    assert sum(len(ids) for ids in contacts) == sum(deals_and_emails) + len(lanes)  # every lane looked up once


def test_each_objects_lookups_go_first_for_the_lanes_that_reach_that_object_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lane that starts with contacts needs its contact lookups at once; a lane that starts with
    companies only after its companies (whose lookups are the slow ones): contacts go in that order."""
    import threading

    from crmsync.sync.push.items import Item
    from crmsync.sync.push.lanes import LaneLookups

    done: dict[str, list[int]] = {}
    lock = threading.Lock()

    def fake(app: object, conn: object, provider: object, mapping: object, items: list, obj: str, _: object) -> dict:
        with lock:
            done.setdefault(obj, []).append(items[0].row.id)
        return {}

    row = lambda n: type("Row", (), {"id": n, "steps": {}})()  # noqa: E731
    with_company = {"companies": {"domain": "a.example"}, "contacts": {"email": "a@a.example"}}
    without = {"contacts": {"email": "b@b.example"}, "deals": {"key": "d-1"}}
    lanes = [
        [Item(row(0), None, with_company)],  # type: ignore[arg-type]
        [Item(row(1), None, without)],  # type: ignore[arg-type]
    ]
    one_key = type("OneKeyPerCall", (), {"lookup_batch": lambda self, obj, kind: 1})()  # no two lanes share a call
    lookups = LaneLookups(None, None, one_key, None, threads=True, look_up=fake)  # type: ignore[arg-type]
    try:
        started = lookups.start(lanes)
        for _, known in started:
            for future in known.values():
                future.result()  # type: ignore[union-attr]
    finally:
        lookups.close()
    assert [lane[0].row.id for lane, _ in started] == [0, 1]  # lanes keep their order
    assert done["companies"] == [0]  # lane 1 has none: it shares lane 0's call (and never waits for it)
    assert done["contacts"] == [1, 0]  # the contacts-first lane is looked up first
    assert done["deals"] == [1]


def _company_outcomes(n: int) -> str:
    return "".join(
        json.dumps(
            {
                "id": f"c-{i}",
                "occurred_at": "2026-11-20T10:00:00Z",
                "disposition": "connected",
                "contact": {"email": f"c{i}@example.org"},
                "company": {"name": f"Co {i}", "domain": f"co{i}.example"},
            }
        )
        + "\n"
        for i in range(n)
    )


def test_the_first_rounds_lookups_are_sent_while_the_input_is_queued_and_not_again(
    emulator: HubSpotEmulator, server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Company searches start while the rest of the input is still read (before the outbox is
    committed); the lanes take their answers, found ones included, and search nothing again."""
    from crmsync.providers.hubspot import HubSpotProvider
    from crmsync.sync.push import PushSettings
    from crmsync.sync.push import command as push_command

    emulator.bulk_create("companies", 5, properties_fn=lambda i: {"name": f"Old {i}", "domain": f"co{i * 40}.example"})
    src = tmp_path / "c.jsonl"
    src.write_text(_company_outcomes(1250))
    searched: list[tuple[str, int]] = []
    first = threading.Event()
    lookup = HubSpotProvider.lookup

    def recorded(self: HubSpotProvider, obj: str, keys: Any, *, fields: Any) -> Any:
        searched.append((threading.current_thread().name, len(keys)))
        found = lookup(self, obj, keys, fields=fields)
        first.set()
        return found

    monkeypatch.setattr(HubSpotProvider, "lookup", recorded)
    read_outcomes = push_command.read_outcomes
    answered_while_queuing: list[bool] = []

    def slow_input(path: str, fmt: str, delimiter: str | None = None) -> Any:
        for n, parsed in enumerate(read_outcomes(path, fmt, delimiter=delimiter)):
            if n == 1000:  # two full search batches queued so far: the first answer comes before the rest is read
                answered_while_queuing.append(first.wait(10.0))
            yield parsed

    monkeypatch.setattr(push_command, "read_outcomes", slow_input)
    app = hubspot_app(server.url, emulator.private_app_token)
    summary = push(app, source=str(src), connection="hs", settings=PushSettings(enqueue_chunk=250))
    assert (summary.created, summary.failed) == (1250, 0)
    assert answered_while_queuing == [True]
    assert sorted(n for _, n in searched) == [250, 500, 500]  # 1,250 domains in searches of 500, each once
    assert all(name.startswith("prefetch") for name, _ in searched)
    companies = emulator.records("companies")
    assert len(companies) == 1250  # the 5 found were updated, not created again
    assert {c["properties"]["name"] for c in companies if c["properties"]["domain"] == "co40.example"} == {"Old 1"}


def test_a_failed_lookup_ahead_is_made_again_by_the_lane(
    emulator: HubSpotEmulator, server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sending lookups ahead never fails a push that would not have failed: the lane asks again."""
    from crmsync.errors import RetriableError
    from crmsync.providers.hubspot import HubSpotProvider

    emulator.bulk_create("companies", 1, properties_fn=lambda i: {"name": "Old", "domain": "co3.example"})
    src = tmp_path / "c.jsonl"
    src.write_text(_company_outcomes(30))
    lookup = HubSpotProvider.lookup
    lanes_asked: list[int] = []

    def flaky(self: HubSpotProvider, obj: str, keys: Any, *, fields: Any) -> Any:
        if threading.current_thread().name.startswith("prefetch"):
            raise RetriableError("HubSpot is unavailable (test)")
        lanes_asked.append(len(keys))
        return lookup(self, obj, keys, fields=fields)

    monkeypatch.setattr(HubSpotProvider, "lookup", flaky)
    app = hubspot_app(server.url, emulator.private_app_token)
    summary = push(app, source=str(src), connection="hs")
    assert (for_push(summary), summary.created, summary.failed) == (0, 30, 0)
    assert lanes_asked == [30]
    assert len(emulator.records("companies")) == 30  # co3.example found by the lane's own lookup


def test_a_key_looked_up_ahead_and_not_found_is_still_matched_by_its_link(
    emulator: HubSpotEmulator, server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer taken from ahead is no more trusted than a lane's own: a record linked meanwhile
    (written by an earlier round, not yet searchable) is matched by its link, not created again."""
    from concurrent.futures import Future

    from crmsync.sync.push.lookups import lookup

    app = hubspot_app(server.url, emulator.private_app_token)
    conn = app.connection("hs")
    provider = app.provider(conn)
    app.store.mirror.save_links("hs", "companies", {"domain:linked.example": "901"})
    answer: Future[dict[str, Any]] = Future()
    answer.set_result({})  # the search ahead found neither
    ahead = {"domain:linked.example": answer, "domain:new.example": answer}
    crm: dict[str, Any] = {}
    monkeypatch.setattr(provider, "lookup", lambda *a, **k: pytest.fail("asked again"))
    lookup(app, conn, provider, app.mapping(conn), "companies", list(ahead), crm, ahead)
    assert crm == {"domain:linked.example": ({}, "901", None)}
    assert ahead == {}  # each answer taken once


def _v4_targets(emulator: HubSpotEmulator, from_obj: str, from_id: str, to_obj: str) -> set[str]:
    """The ids linked to one record, read through the v4 associations API (as an integrator would)."""
    api = httpx.Client(
        transport=emulator.transport(),
        base_url="https://api.hubapi.com",
        headers={"Authorization": f"Bearer {emulator.private_app_token}"},
    )
    body = api.get(f"/crm/v4/objects/{from_obj}/{from_id}/associations/{to_obj}").raise_for_status().json()
    return {str(r["toObjectId"]) for r in body["results"]}


def test_existing_contacts_meeting_new_companies_are_associated_with_them(tmp_path: Path) -> None:
    """Contacts HubSpot already holds (unknown to the mirror) and contacts pushed before: both get linked."""
    emulator = HubSpotEmulator(seed=12)
    existing = emulator.bulk_create(
        "contacts",
        20,
        properties_fn=lambda i: {"email": f"person{i}@example.org", "firstname": "P", "lastname": f"N{i}"},
    )
    app = hubspot_app("http://hubspot.test", emulator.private_app_token, transport=lambda _n: emulator.transport())
    first = tmp_path / "first.jsonl"
    # Contacts 0-9: in HubSpot and pushed before (the mirror knows them); 10-19: in HubSpot only; 20-29: new.
    first.write_text(outcome_lines(10, prefix="a"))
    assert push(app, source=str(first), connection="hs").created == 10
    emulator.keep_log = True
    second = tmp_path / "second.jsonl"
    second.write_text(outcome_lines(30, prefix="b", company_every=1, deal_every=3))
    summary = push(app, source=str(second), connection="hs")
    assert (summary.created, summary.failed) == (30, 0), summary
    contacts = {r["properties"]["email"]: r["id"] for r in emulator.records("contacts")}
    companies = {r["properties"]["domain"]: r["id"] for r in emulator.records("companies")}
    assert len(contacts) == 30 and set(existing) <= set(contacts.values()) and len(companies) == 7
    for i in range(30):
        contact, company = contacts[f"person{i}@example.org"], companies[f"co{i % 7}.example"]
        assert company in _v4_targets(emulator, "contacts", contact, "companies"), i
        assert contact in _v4_targets(emulator, "companies", company, "contacts"), i
    for deal in emulator.records("deals"):
        i = int(deal["properties"]["dealname"].split()[1])
        assert _v4_targets(emulator, "deals", deal["id"], "contacts") == {contacts[f"person{i}@example.org"]}
        assert _v4_targets(emulator, "deals", deal["id"], "companies") == {companies[f"co{i % 7}.example"]}
    # The links of unchanged contacts cost one v4 batch, not a contact update each.
    paths = [p for m, p, _ in emulator.stats.log if m == "POST"]
    assert "/crm/v3/objects/contacts/batch/update" not in paths
    assert paths.count("/crm/v4/associations/contacts/companies/batch/associate/default") == 1


def test_every_batch_create_body_carries_associations_as_the_spec_requires(tmp_path: Path) -> None:
    """Phone-only contacts go through batch/create (no email to upsert on): `associations` must be there."""
    emulator = HubSpotEmulator(seed=13)
    spec = SpecCheck.hubspot()
    transport = spec.wrap(emulator)
    creates: list[dict[str, Any]] = []
    inner = transport.handle_request

    def spy(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/batch/create"):
            creates.append(json.loads(request.content))
        return inner(request)

    app = hubspot_app("http://hubspot.test", emulator.private_app_token, transport=lambda _n: httpx.MockTransport(spy))
    lines = [
        json.dumps(
            {
                "id": f"p-{i}",
                "occurred_at": "2026-11-20T10:00:00Z",
                "contact": {"phone": f"+1 617 555 01{i:02d}", "last_name": f"N{i}"},
                "company": {"name": f"Phone Co {i % 3}"},
                "disposition": "busy",
                "next_step": {"type": "todo", "due_at": "2026-12-01T09:00:00Z"},
            }
        )
        for i in range(12)
    ]
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(lines) + "\n")
    summary = push(app, source=str(src), connection="hs")
    assert (summary.created, summary.failed) == (12, 0), summary
    assert transport.problems == [], transport.problems[:5]
    inputs = [inp for body in creates for inp in body["inputs"]]
    assert len(inputs) >= 12 * 3  # contacts, calls, tasks (and the companies)
    assert all("associations" in inp for inp in inputs)
    contacts = {r["properties"]["lastname"]: r["id"] for r in emulator.records("contacts")}
    companies = {r["properties"]["name"]: r["id"] for r in emulator.records("companies")}
    for i in range(12):
        assert _v4_targets(emulator, "contacts", contacts[f"N{i}"], "companies") == {companies[f"Phone Co {i % 3}"]}
