"""Dynamics 365 Sales end to end against its emulator: Entra connect flows, phone calls logged exactly once,
change-tracking pulls, service protection limits, metadata for `map check`."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.app import App
from crmsync.cli.status import describe_cursor
from crmsync.emulators.base import Faults
from crmsync.emulators.dynamics import DynamicsEmulator, build_dynamics
from crmsync.errors import AuthError
from crmsync.providers.dynamics import DynamicsProvider, batch
from crmsync.providers.dynamics.auth import authority
from crmsync.providers.dynamics.odata import derived_id
from crmsync.providers.dynamics.provider import IDS_MAX
from crmsync.providers.dynamics.records import minutes
from crmsync.sync.connect import connect
from crmsync.sync.pull import pull
from crmsync.sync.push import push
from crmsync.sync.status import connection_status
from tests.e2e import ScriptIO
from tests.test_hubspot_e2e import outcome_lines

ORG = "https://contoso.crm4.dynamics.com"


def _app(emulator: DynamicsEmulator, *, db: str | None = None, name: str = "dy") -> App:
    app = App(db=db, transport=lambda _: emulator.transport())
    connect(
        app,
        provider="dynamics",
        name=name,
        base_url=ORG,
        options={"tenant": emulator.tenant, "client_id": emulator.client_id},
        io=ScriptIO(emulator.client_secret),
    )
    return app


def _outcomes(path: Path, n: int, **kw: Any) -> Path:
    lines = []
    for i, line in enumerate(outcome_lines(n, **kw).splitlines()):
        o = json.loads(line)
        if i % 5 == 0:
            o["next_step"] = {"type": "call", "due_at": "2026-12-09T09:00:00+00:00", "notes": "call back"}
        lines.append(json.dumps(o))
    path.write_text("\n".join(lines) + "\n")
    return path


def _calls(emulator: DynamicsEmulator) -> Counter[str]:
    return Counter(str(c.get("crmsync_outcomeid")) for c in emulator.records("phonecalls"))


def _assert_calls_logged(emulator: DynamicsEmulator, n: int, *, deal_every: int = 0) -> None:
    """n phone calls, one per outcome, closed as Made, with the caller and the contact as parties."""
    calls = _calls(emulator)
    assert len(calls) == n and set(calls.values()) == {1}
    contacts = {c["emailaddress1"]: c["contactid"] for c in emulator.records("contacts")}
    deals = {d["name"]: d["opportunityid"] for d in emulator.records("opportunities")}
    for call in emulator.records("phonecalls"):
        i = int(str(call["crmsync_outcomeid"]).split("-")[1])
        assert call["activityid"] == derived_id("calls", f"o-{i}")
        assert (call["statecode"], call["statuscode"]) == (1, 2)
        contact = contacts[f"person{i}@example.org"]
        assert [(p["type"], p["participationtypemask"]) for p in call["parties"]] == [("systemuser", 1), ("contact", 2)]
        assert call["parties"][1]["partyid"] == contact
        assert call["actualdurationminutes"] == minutes(60 + i % 100) and call["directioncode"] is True
        if deal_every and i % deal_every == 0:
            assert (call["_regardingobjectid_value@type"], call["_regardingobjectid_value"]) == (
                "opportunity",
                deals[f"Deal {i}"],
            )
        else:
            assert (call["_regardingobjectid_value@type"], call["_regardingobjectid_value"]) == ("contact", contact)


def test_ids_and_durations_are_derived_the_same_way_every_time() -> None:
    assert derived_id("calls", "o-1") == derived_id("calls", "o-1") != derived_id("tasks", "o-1")
    assert minutes(0) == 0 and minutes(1) == 1 and minutes(60) == 1 and minutes(61) == 2 and minutes("x") is None
    assert authority("contoso.onmicrosoft.com") == ("https://login.microsoftonline.com/contoso.onmicrosoft.com", None)
    assert authority("http://127.0.0.1:8000/t1") == ("https://127.0.0.1:8000/t1", "127.0.0.1:8000")
    for bad in ("", "http://evil.example/t", "https://host.example/", "a/b"):
        with pytest.raises(Exception, match="tenant"):
            authority(bad)


def test_1000_outcomes_log_1000_closed_calls_in_few_batches_and_a_re_push_writes_nothing(
    home: Path, tmp_path: Path
) -> None:
    emulator = DynamicsEmulator()
    app = _app(emulator)
    src = _outcomes(tmp_path / "o.jsonl", 1000, company_every=3, deal_every=4)
    before = emulator.stats.requests
    summary = push(app, source=str(src), connection="dy")
    assert summary.outcome == "ok" and summary.created == 1000, summary.as_dict()
    requests = emulator.stats.requests - before
    _assert_calls_logged(emulator, 1000, deal_every=4)
    tasks = emulator.records("tasks")
    assert len(tasks) == 200 and all(t["statecode"] == 0 for t in tasks)
    assert len(emulator.records("accounts")) == 7 and len(emulator.records("opportunities")) == 250
    # The bound: per object type one $filter lookup per IDS_MAX keys and one $batch (one request against
    # the limits) per batch_size writes, plus a fixed few (token, metadata, owners): far below one per record.
    per = {"contacts": 1000, "companies": 7, "deals": 250, "calls": 1000, "tasks": 200}
    lookups = sum(-(-per[o] // IDS_MAX) for o in ("contacts", "companies", "deals"))
    batches = sum(-(-n // DynamicsProvider.batch_size) for n in per.values())
    assert requests <= lookups + batches + 20, requests  # 52 + 26 + 20
    print(f"\n1000 outcomes: {requests} requests ({emulator.stats.by_route['POST batch']} $batch)")
    assert emulator.stats.rate_limited == 0

    quota = app.provider(app.store.connections.get("dy")).quota()
    assert quota["throttled"] == 0 and 5000 < quota["burst_remaining"] < 6000  # what status can show

    writes = emulator.stats.writes
    again = push(app, source=str(src), connection="dy")
    assert again.outcome == "ok" and again.created == 0
    assert emulator.stats.writes == writes


def test_a_new_store_finds_the_calls_already_logged_and_logs_none_again(home: Path, tmp_path: Path) -> None:
    emulator = DynamicsEmulator()
    src = _outcomes(tmp_path / "o.jsonl", 60, company_every=3, deal_every=4)
    assert push(_app(emulator, db=str(tmp_path / "first.db")), source=str(src), connection="dy").outcome == "ok"
    counts = {es: len(emulator.records(es)) for es in ("contacts", "accounts", "opportunities", "phonecalls", "tasks")}

    second = push(_app(emulator, db=str(tmp_path / "second.db")), source=str(src), connection="dy")
    assert second.outcome == "ok", second.as_dict()
    assert second.created == 0 and second.already == 60
    assert {es: len(emulator.records(es)) for es in counts} == counts
    _assert_calls_logged(emulator, 60, deal_every=4)


def test_lost_replies_never_duplicate_a_record_or_leave_a_call_open(home: Path, tmp_path: Path) -> None:
    emulator = DynamicsEmulator(faults=Faults(lost_ack_rate=0.2, seed=4))
    app = None
    for _ in range(20):  # connect's own requests may lose their replies too
        try:
            app = _app(emulator)
            break
        except Exception:
            continue
    assert app is not None
    src = _outcomes(tmp_path / "o.jsonl", 120, company_every=3, deal_every=4)
    for _ in range(10):
        summary = push(app, source=str(src), connection="dy")
        if summary.pending == 0 and summary.failed == 0:
            break
    assert summary.outcome == "ok", summary.as_dict()
    assert emulator.stats.dropped > 5
    _assert_calls_logged(emulator, 120, deal_every=4)
    emails = Counter(c["emailaddress1"] for c in emulator.records("contacts"))
    assert len(emails) == 120 and set(emails.values()) == {1}
    assert len(emulator.records("accounts")) == 7 and len(emulator.records("opportunities")) == 30


def test_alternate_keys_create_contacts_without_a_lookup_first(home: Path, tmp_path: Path) -> None:
    emulator = DynamicsEmulator(keys={"contact": ["emailaddress1"]})
    emulator.keep_log = True
    app = _app(emulator)
    existing = emulator.create("contacts", {"emailaddress1": "person3@example.org", "lastname": "Kept"})
    summary = push(app, source=str(_outcomes(tmp_path / "o.jsonl", 10)), connection="dy")
    assert summary.outcome == "ok", summary.as_dict()
    emails = Counter(c["emailaddress1"] for c in emulator.records("contacts"))
    assert len(emails) == 10 and set(emails.values()) == {1}
    contact_lookups = [p for m, p, _ in emulator.stats.log if m == "GET" and p.endswith("/contacts")]
    assert len(contact_lookups) == 1  # only the key the CRM said exists was looked up
    call = next(c for c in emulator.records("phonecalls") if c["crmsync_outcomeid"] == "o-3")
    assert call["parties"][1]["partyid"] == existing["contactid"]


def test_without_the_crmsync_column_calls_are_still_logged_once_by_their_id(home: Path, tmp_path: Path) -> None:
    emulator = DynamicsEmulator(marker_column=False)
    src = _outcomes(tmp_path / "o.jsonl", 15)
    assert push(_app(emulator, db=str(tmp_path / "a.db")), source=str(src), connection="dy").outcome == "ok"
    assert push(_app(emulator, db=str(tmp_path / "b.db")), source=str(src), connection="dy").outcome == "ok"
    ids = [c["activityid"] for c in emulator.records("phonecalls")]
    assert sorted(ids) == sorted(derived_id("calls", f"o-{i}") for i in range(15))
    # The pull leaves the missing column out of $select (Dataverse refuses a query naming one).
    pulled = pull(_app(emulator, db=str(tmp_path / "c.db")), objects=["calls"])[0]
    assert pulled.outcome == "ok" and pulled.objects[0].created == 15


def test_pull_stores_edits_creates_and_deletions_once_over_two_runs(home: Path) -> None:
    emulator = DynamicsEmulator()
    people = [emulator.create("contacts", {"firstname": f"P{i}", "emailaddress1": f"p{i}@x.org"}) for i in range(30)]
    acme = emulator.create("accounts", {"name": "Acme"})
    deal = emulator.create(
        "opportunities", {"name": "Big", "customerid_account@odata.bind": f"/accounts({acme['accountid']})"}
    )
    app = _app(emulator)
    first = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert first.outcome == "ok"
    assert {o.object: o.created for o in first.objects} == {"contacts": 30, "companies": 1, "deals": 1}

    emulator.update("contacts", people[1]["contactid"], {"firstname": "Renamed"})
    emulator.create("contacts", {"firstname": "New", "emailaddress1": "new@x.org"})
    gone = emulator.create("contacts", {"firstname": "Brief"})
    emulator.delete("contacts", gone["contactid"])  # created and deleted between two pulls: a deletion only
    emulator.delete("opportunities", deal["opportunityid"])
    second = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert second.outcome == "ok"
    by = {o.object: o for o in second.objects}
    assert by["contacts"].created == 1 and by["contacts"].updated == 1
    assert by["deals"].archived == 1 and by["companies"].updated == 0
    stored = {r.remote_id: r for r in app.store.mirror.records("dy", "contacts")}
    assert len(stored) == 31 and stored[people[1]["contactid"]].properties["first_name"] == "Renamed"
    third = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert all(o.created == o.updated == o.archived == 0 for o in third.objects)


def test_pull_pages_by_next_link_and_resumes_with_the_delta_link(home: Path) -> None:
    emulator = build_dynamics(contacts=2300, companies=3, deals=0)
    emulator.keep_log = True
    app = _app(emulator)
    first = pull(app, objects=["contacts"])[0]
    assert first.outcome == "ok" and first.objects[0].created == 2300
    pages = [p for m, p, _ in emulator.stats.log if m == "GET" and p.endswith("/contacts")]
    assert len(pages) == 3  # 1,000 a page (odata.maxpagesize), the last one carries the delta link
    emulator.update("contacts", emulator.records("contacts")[5]["contactid"], {"jobtitle": "CEO"})
    second = pull(app, objects=["contacts"])[0]
    assert second.objects[0].updated == 1 and second.objects[0].created == 0


def test_an_expired_delta_token_re_baselines_with_a_warning(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    emulator = DynamicsEmulator()
    for i in range(5):
        emulator.create("contacts", {"firstname": f"P{i}", "emailaddress1": f"p{i}@x.org"})
    app = _app(emulator)
    assert pull(app, objects=["contacts"])[0].outcome == "ok"
    emulator.create("contacts", {"firstname": "Late", "emailaddress1": "late@x.org"})
    emulator.expire_delta_tokens()
    with caplog.at_level(logging.WARNING, logger="crmsync.dynamics"):
        run = pull(app, objects=["contacts"])[0]
    assert run.outcome == "ok" and run.objects[0].created == 1
    assert any("expired" in r.getMessage() for r in caplog.records)
    emulator.create("contacts", {"firstname": "Later", "emailaddress1": "later@x.org"})
    again = pull(app, objects=["contacts"])[0]  # the new delta link works
    assert again.objects[0].created == 1 and again.objects[0].read == 1


def test_a_table_without_change_tracking_is_polled_by_modifiedon(home: Path) -> None:
    emulator = DynamicsEmulator(untracked={"account"})
    emulator.clock_offset = -60
    for i in range(12):
        emulator.create("accounts", {"name": f"A{i}"})
    app = _app(emulator)
    emulator.clock_offset = 0
    first = pull(app, objects=["companies"])[0]
    assert first.outcome == "ok" and first.objects[0].created == 12
    status = connection_status(app, app.store.connections.get("dy"))
    assert status["objects"]["companies"]["cursor"]["mode"] == "keyset"
    assert describe_cursor(status["objects"]["companies"]["cursor"]).startswith("mode=keyset")
    emulator.update("accounts", emulator.records("accounts")[3]["accountid"], {"name": "Renamed"})
    second = pull(app, objects=["companies"])[0]
    assert second.objects[0].updated == 1 and second.objects[0].created == 0


@pytest.mark.slow
def test_a_429_burst_is_waited_out_exactly_as_retry_after_says(home: Path, tmp_path: Path) -> None:
    emulator = DynamicsEmulator()
    app = _app(emulator)
    emulator.throttle(1.0, count=2)
    summary = push(app, source=str(_outcomes(tmp_path / "o.jsonl", 5)), connection="dy")
    assert summary.outcome == "ok" and summary.created == 5
    log = emulator.throttle_log
    assert [kind for _, kind in log[:3]] == ["429", "429", "ok"]
    for (t0, _), (t1, _) in itertools.pairwise(log[:3]):
        assert 1.0 <= t1 - t0 < 1.6, log  # never early (it prolongs throttling), not much later either


def test_the_emulator_enforces_the_request_window_with_retry_after_and_the_documented_code() -> None:
    emulator = DynamicsEmulator(limits=(3, 30.0))
    token = emulator._issue(emulator.app_user, "org.test")["access_token"]
    client = httpx.Client(transport=emulator.transport(), base_url="https://org.test/api/data/v9.2")
    client.headers["Authorization"] = f"Bearer {token}"
    assert [client.get("WhoAmI").status_code for _ in range(3)] == [200, 200, 200]
    refused = client.get("WhoAmI")
    assert refused.status_code == 429 and 29 <= int(refused.headers["Retry-After"]) <= 30
    assert refused.json()["error"]["code"] == "0x80072322"


def test_the_emulator_refuses_requests_over_the_concurrency_cap_at_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    emulator = DynamicsEmulator(concurrent=2, faults=Faults(latency_ms=300))
    token = emulator._issue(emulator.app_user, "org.test")["access_token"]
    client = httpx.Client(transport=emulator.transport(), base_url="https://org.test/api/data/v9.2")
    client.headers["Authorization"] = f"Bearer {token}"
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.get("WhoAmI"), range(4)))
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) == 2 and all(a.json()["error"]["code"] == "0x80072326" for a in refused)
    assert all(int(a.headers["Retry-After"]) >= 1 for a in refused)


def test_a_configured_concurrency_at_the_service_limit_is_refused(home: Path) -> None:
    from crmsync.errors import ConfigError
    from tests.e2e import write_config

    emulator = DynamicsEmulator()
    app = _app(emulator)
    write_config(home, "dy", concurrency=52)
    app = App(transport=lambda _: emulator.transport())
    with pytest.raises(ConfigError, match="limit of 52"):
        app.provider(app.store.connections.get("dy"))


def test_create_only_update_and_key_urls_answer_as_the_web_api_does() -> None:
    emulator = DynamicsEmulator(keys={"contact": ["emailaddress1"]})
    token = emulator._issue(emulator.app_user, "org.test")["access_token"]
    api = httpx.Client(transport=emulator.transport(), base_url="https://org.test/api/data/v9.2")
    api.headers.update({"Authorization": f"Bearer {token}", "OData-Version": "4.0"})
    rid = derived_id("contacts", "x")
    made = api.patch(f"contacts({rid})", json={"lastname": "A"}, headers={"If-None-Match": "*"})
    assert made.status_code == 204 and rid in made.headers["OData-EntityId"]
    again = api.patch(f"contacts({rid})", json={"lastname": "B"}, headers={"If-None-Match": "*"})
    assert again.status_code == 412 and again.json()["error"]["code"] == "0x80040237"
    missing = api.patch(f"contacts({derived_id('contacts', 'y')})", json={"lastname": "C"}, headers={"If-Match": "*"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "0x80040217"
    by_key = api.patch("contacts(emailaddress1='k@x.org')", json={"lastname": "K"})
    assert by_key.status_code == 204
    bad_key = api.get("accounts(name='Acme')")
    assert bad_key.status_code == 400 and "key in the request URI is not valid" in bad_key.json()["error"]["message"]
    bad_bind = api.post("contacts", json={"parentcustomerid_account@odata.bind": f"/accounts({rid})"})
    assert bad_bind.status_code == 404
    bad_filter = api.get("contacts", params={"$filter": "lastname eq 'A' and"})
    assert bad_filter.status_code == 400 and "error" in bad_filter.json()
    tracked = api.get("contacts", params={"$filter": "lastname eq 'A'"}, headers={"Prefer": "odata.track-changes"})
    assert tracked.status_code == 400 and "isn't supported when Change Tracking is enabled" in tracked.text
    created = api.post("phonecalls", json={"subject": "x", "statecode": 1})
    assert created.status_code == 400  # state is set in a second write
    too_long = api.post("phonecalls", json={"subject": "x" * 201})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "0x80044331"


def test_a_change_set_rolls_back_as_a_whole_and_continue_on_error_runs_the_rest() -> None:
    emulator = DynamicsEmulator()
    token = emulator._issue(emulator.app_user, "org.test")["access_token"]
    api = httpx.Client(transport=emulator.transport(), base_url="https://org.test")
    a, b = derived_id("calls", "a"), derived_id("calls", "b")
    groups: list[batch.Group] = [
        [
            batch.Op("PATCH", f"phonecalls({a})", {"subject": "a"}, {"If-None-Match": "*"}),
            batch.Op("PATCH", f"phonecalls({a})", {"nosuchcolumn": 1}, {"If-Match": "*"}),
        ],
        batch.Op("PATCH", f"phonecalls({b})", {"subject": "b"}, {"If-None-Match": "*"}),
    ]
    content_type, body = batch.build(groups, "https://org.test/api/data/v9.2")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type, "Prefer": "odata.continue-on-error"}
    answers = batch.parse(api.post("/api/data/v9.2/$batch", content=body, headers=headers))
    assert [[x.status for x in g] for g in answers] == [[400], [204]]
    assert [c["activityid"] for c in emulator.records("phonecalls")] == [b]  # the first change set left nothing
    del headers["Prefer"]
    content_type, body = batch.build(groups, "https://org.test/api/data/v9.2")
    headers["Content-Type"] = content_type
    stopped = batch.parse(api.post("/api/data/v9.2/$batch", content=body, headers=headers))
    assert [[x.status for x in g] for g in stopped] == [[400]]  # without continue-on-error the batch stops


def test_map_check_reads_columns_and_option_sets(home: Path) -> None:
    emulator = DynamicsEmulator()
    app = _app(emulator)
    provider = app.provider(app.store.connections.get("dy"))
    fields = {f.name: f for f in provider.fields("calls")}
    assert fields["actualdurationminutes"].type == "number" and fields["subject"].max_length in (None, 200)
    assert fields["statuscode"].options == ["1", "2", "3", "4"] and fields["crmsync_outcomeid"].custom
    assert {"duration_seconds", "direction"} <= set(fields)
    assert fields["regardingobjectid"].type == "reference"


def test_calls_are_owned_by_the_rep_or_the_connection_user(home: Path, tmp_path: Path) -> None:
    emulator = DynamicsEmulator()
    app = _app(emulator)
    lines = []
    for i, owner in enumerate(["rep1@example.com", "REP2@example.com", "nobody@example.com"]):
        o = {
            "id": f"own-{i}",
            "occurred_at": "2026-12-01T10:00:00+00:00",
            "contact": {"email": f"c{i}@example.org"},
            "disposition": "connected",
            "owner_email": owner,
        }
        lines.append(json.dumps(o))
    src = tmp_path / "o.jsonl"
    src.write_text("\n".join(lines) + "\n")
    summary = push(app, source=str(src), connection="dy")
    assert summary.outcome == "ok", summary.as_dict()
    owners = {c["crmsync_outcomeid"]: c["_ownerid_value"] for c in emulator.records("phonecalls")}
    assert owners == {"own-0": emulator.reps[0], "own-1": emulator.reps[1], "own-2": emulator.app_user}
    sender = {c["crmsync_outcomeid"]: c["parties"][0]["partyid"] for c in emulator.records("phonecalls")}
    assert sender == owners


def test_connect_with_a_certificate_signs_a_client_assertion(home: Path, tmp_path: Path) -> None:
    pem = _certificate()
    path = tmp_path / "app.pem"
    path.write_text(pem)
    emulator = DynamicsEmulator()
    emulator.add_certificate(pem)
    app = App(transport=lambda _: emulator.transport())
    options = {"tenant": emulator.tenant, "client_id": emulator.client_id, "certificate": str(path)}
    conn = connect(app, provider="dynamics", name="dy", base_url=ORG, options=options, io=ScriptIO(""))
    assert conn.settings["auth"] == "certificate" and conn.settings["user_id"] == emulator.app_user

    other = DynamicsEmulator()  # the certificate is not registered there
    app2 = App(transport=lambda _: other.transport())
    options["tenant"], options["client_id"] = other.tenant, other.client_id
    with pytest.raises(AuthError, match="AADSTS700027"):
        connect(app2, provider="dynamics", name="dy2", base_url=ORG, options=options, io=ScriptIO(""))


def test_connect_refuses_a_wrong_secret_in_one_line_and_stores_nothing(home: Path) -> None:
    emulator = DynamicsEmulator()
    app = App(transport=lambda _: emulator.transport())
    options = {"tenant": emulator.tenant, "client_id": emulator.client_id}
    with pytest.raises(AuthError, match="AADSTS7000215"):
        connect(app, provider="dynamics", name="dy", base_url=ORG, options=options, io=ScriptIO("wrong"))
    assert app.secrets.get("dy") is None


def test_connect_as_a_person_uses_the_code_flow_with_pkce_on_a_loopback_redirect(home: Path) -> None:
    emulator = DynamicsEmulator()
    server = emulator.serve()
    try:
        seen: list[str] = []

        def browser(url: str) -> None:
            seen.append(url)
            with httpx.Client(follow_redirects=False) as web:
                redirect = web.get(url.replace("https://", "http://", 1)).headers["Location"]
                web.get(redirect)

        app = App()
        options = {"tenant": f"{server.url}/{emulator.tenant}", "client_id": emulator.client_id, "oauth": True}
        conn = connect(
            app, provider="dynamics", name="me", base_url=server.url, options=options, io=ScriptIO("", browser)
        )
        assert conn.settings["auth"] == "authorization_code" and conn.settings["user_id"] == emulator.person
        assert "code_challenge_method=S256" in seen[0] and "user_impersonation" in seen[0]
        secret = app.secrets.get("me") or {}
        assert secret.get("refresh_token") and "client_secret" not in secret
        app.close()
        # A later run renews the token with the refresh token (no person needed).
        emulator.tokens.clear()
        app = App()
        provider = app.provider(app.store.connections.get("me"))
        assert provider.check().extra["user_id"] == emulator.person
        app.close()
    finally:
        server.stop()


def test_a_persons_tokens_given_in_the_environment_are_renewed_not_re_authorised(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator = DynamicsEmulator()
    refresh = emulator._issue(emulator.person, "contoso.crm4.dynamics.com", refresh=True)["refresh_token"]
    doc = {"kind": "authorization_code", "tenant": emulator.tenant, "client_id": emulator.client_id}
    monkeypatch.setenv("CRMSYNC_SECRET_ME", json.dumps({**doc, "refresh_token": refresh}))
    app = App(transport=lambda _: emulator.transport())
    conn = connect(app, provider="dynamics", name="me", base_url=ORG, options={}, io=ScriptIO(""))
    assert conn.settings["user_id"] == emulator.person and not emulator.codes  # no authorisation was started


@pytest.mark.slow
def test_the_cli_connects_with_the_secret_in_the_environment_and_refuses_a_wrong_one_in_one_line(home: Path) -> None:
    from tests.e2e import cli_env, run_cli

    emulator = DynamicsEmulator()
    server = emulator.serve()
    try:
        doc = {"kind": "client_secret", "tenant": f"{server.url}/{emulator.tenant}", "client_id": emulator.client_id}
        args = ["connect", "dynamics", "--name", "dy", "--base-url", server.url, "--client-id", emulator.client_id]
        wrong = run_cli(args, cli_env(home, "dy", json.dumps({**doc, "client_secret": "nope"})), timeout=120)
        assert wrong.code == 3 and "AADSTS7000215" in wrong.stderr
        assert len(wrong.stderr.strip().splitlines()) <= 2 and "Traceback" not in wrong.stderr  # message + hint
        good = run_cli(args, cli_env(home, "dy", json.dumps({**doc, "client_secret": emulator.client_secret})))
        assert good.code == 0, good.stderr
        no_tenant = run_cli(args, cli_env(home, "dy", json.dumps({"client_secret": "x"})), timeout=120)
        assert no_tenant.code == 2 and "--tenant" in no_tenant.stderr and "Traceback" not in no_tenant.stderr
    finally:
        server.stop()


@pytest.mark.slow
def test_the_sandbox_connect_line_works_as_pasted(home: Path) -> None:
    from crmsync.cli.sandbox import make_sandbox
    from crmsync.emulators.sandbox import SandboxOptions
    from tests.e2e import cli_env

    name, box = make_sandbox("dynamics", SandboxOptions(contacts=5, companies=1, deals=1))
    server = box.serve()
    try:
        line = box.connect_command(name, server.url).replace("crmsync connect", f"{sys.executable} -m crmsync connect")
        done = subprocess.run(line, shell=True, capture_output=True, text=True, env=cli_env(home), timeout=60)
        assert done.returncode == 0, done.stderr
        assert box.emulator.stats.by_route["GET whoami"] == 1
    finally:
        server.stop()


@pytest.mark.slow
def test_push_killed_30_times_logs_each_call_exactly_once(home: Path, tmp_path: Path) -> None:
    import random

    from tests.e2e import cli_env, run_cli

    emulator = DynamicsEmulator(faults=Faults(latency_ms=60, seed=5))
    server = emulator.serve()
    try:
        app = App()
        options = {"tenant": f"{server.url}/{emulator.tenant}", "client_id": emulator.client_id}
        connect(
            app,
            provider="dynamics",
            name="dy",
            base_url=server.url,
            options=options,
            io=ScriptIO(emulator.client_secret),
        )
        app.close()
        secret = {"kind": "client_secret", "client_secret": emulator.client_secret, **options}
        env = cli_env(home, "dy", json.dumps(secret))
        src = _outcomes(tmp_path / "o.jsonl", 500, company_every=3, deal_every=4)
        rng = random.Random(30)
        kills = mid_activities = 0

        def activities() -> int:
            return len(emulator.tables["phonecall"]) + len(emulator.tables["task"])

        for i in range(30):
            before = activities()
            requests, writes = emulator.stats.requests, emulator.stats.writes
            if i < 24:  # anywhere up to the first writes: token, metadata, lookups (work is always left for these)
                after = rng.randint(1, 9)
                code = _kill_when(lambda r=requests, n=after: emulator.stats.requests - r >= n, env, src, 0.0)
            elif i < 27:  # the moment the CRM has a batch of writes, before the run can record the answer
                code = _kill_when(lambda w=writes: emulator.stats.writes > w, env, src, 0.0)
            else:  # the moment calls or tasks land: their answers are lost with the run
                code = _kill_when(lambda b=before: activities() > b, env, src, 0.0)
            kills += code is None
            mid_activities += code is None and before != activities()  # killed while calls or tasks were being written
        final = run_cli(["--json", "push", str(src), "-c", "dy"], env)
        assert final.code == 0, final.stderr
        assert kills >= 26 and mid_activities >= 1
        _assert_calls_logged(emulator, 500, deal_every=4)
        emails = Counter(c["emailaddress1"] for c in emulator.records("contacts"))
        assert len(emails) == 500 and set(emails.values()) == {1}
        assert len(emulator.records("accounts")) == 7 and len(emulator.records("opportunities")) == 125
        assert len(emulator.records("tasks")) == 100
    finally:
        server.stop()


def _kill_when(ready: Callable[[], bool], env: dict[str, str], src: Path, then: float) -> int | None:
    """Run `crmsync push` and SIGKILL it ``then`` seconds after ``ready()`` (the emulator's progress, not the
    clock, so a loaded machine still kills mid-work); None if it was killed, else its exit code."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "crmsync", "--quiet", "push", str(src), "-c", "dy"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready() and time.monotonic() < deadline:
            if proc.poll() is not None:
                return proc.returncode
            time.sleep(0.002)
        return proc.wait(timeout=then) if then else proc.poll()
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return None


def _certificate() -> str:
    """A self-signed certificate and its key in one PEM, as an admin uploads to the app registration."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crmsync test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key_pem + cert.public_bytes(serialization.Encoding.PEM).decode()


def _context(**over: Any) -> bytes:
    doc: dict[str, Any] = {
        "BusinessUnitId": "eb1167b3-67a9-c378-7c65-c1e582e2e662",
        "CorrelationId": "0ab4f0d0-2d13-4a9e-a7e4-5a2f3a5d1c11",
        "Depth": 1,
        "InitiatingUserId": "f70cd320-643e-460f-8fd5-7e3967c43d51",
        "InputParameters": [
            {
                "key": "Target",
                "value": {
                    "__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts",
                    "Attributes": [
                        {"key": "firstname", "value": "Ada"},
                        {
                            "key": "parentcustomerid",
                            "value": {
                                "__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
                                "Id": "4941DB0C-4127-5599-B4F0-49DE79B11ADE",
                                "LogicalName": "account",
                                "Name": "Acme",
                            },
                        },
                        {
                            "key": "statecode",
                            "value": {
                                "__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts",
                                "Value": 0,
                            },
                        },
                    ],
                    "Id": "d37debd2-6908-54e4-8bc9-6a22711310eb",
                    "LogicalName": "contact",
                },
            }
        ],
        "MessageName": "Update",
        "OperationCreatedOn": "/Date(1764583200000)/",
        "PrimaryEntityId": "D37DEBD2-6908-54E4-8BC9-6A22711310EB",
        "PrimaryEntityName": "contact",
        "Stage": 40,
    }
    doc.update(over)
    return json.dumps(doc).encode()


def test_a_webhook_body_becomes_one_change_and_hostile_ones_are_refused_in_one_line() -> None:
    from crmsync.providers.dynamics.webhook import parse

    change = parse(_context())
    assert change is not None and (change.object, change.action) == ("contacts", "updated")
    assert change.id == "d37debd2-6908-54e4-8bc9-6a22711310eb"
    assert change.attributes == {
        "firstname": "Ada",
        "parentcustomerid": "4941db0c-4127-5599-b4f0-49de79b11ade",
        "statecode": 0,
    }
    assert change.at is not None and change.at.isoformat() == "2025-12-01T10:00:00+00:00"
    assert parse(_context(PrimaryEntityName="invoice")) is None and parse(_context(MessageName="Assign")) is None
    for bad in (b"", b"[]", b"{", b"\xff", _context(PrimaryEntityId="1 or 1=1"), b'{"PrimaryEntityName": 3}'):
        with pytest.raises(ValueError) as info:
            parse(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="larger"):
        parse(b" " * (256 * 1024 + 1))


def test_the_webhook_key_is_compared_in_full_and_an_empty_key_admits_nothing() -> None:
    from crmsync.providers.dynamics.webhook import key_ok

    assert key_ok("s3cret", query={"code": "s3cret"}, headers={})
    assert not key_ok("s3cret", query={"code": "s3cre"}, headers={})
    assert not key_ok("s3cret", query={"code": "s3cretX"}, headers={})
    assert not key_ok("", query={"code": ""}, headers={})
    assert key_ok("k", query={}, headers={"X-Crmsync-Key": "k"}, header="x-crmsync-key")
    assert not key_ok("k", query={"code": "k"}, headers={"X-Crmsync-Key": "no"}, header="x-crmsync-key")
