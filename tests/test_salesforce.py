"""Salesforce end to end against its emulator: connect (JWT, web server + PKCE), push exactly once by
External IDs, pull exact deltas with deletions, Bulk 2.0 backfills, the daily allocation."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import httpx
import pytest

from crmsync.app import App
from crmsync.cli.exits import for_push
from crmsync.emulators.base import Faults
from crmsync.emulators.salesforce import SalesforceEmulator, build_salesforce
from crmsync.errors import AuthError, ConfigError
from crmsync.providers.salesforce import soql
from crmsync.providers.salesforce.limits import parse_limit_info, push_requests
from crmsync.sync.connect import connect
from crmsync.sync.pull import pull
from crmsync.sync.push import push
from tests.e2e import ScriptIO, cli_env, pull_stopped_before_page, run_cli, write_config
from tests.test_hubspot_e2e import outcome_lines

USER = "admin@example.com.sandbox"


def _key(emulator: SalesforceEmulator, home: Path) -> Path:
    path = home / "sf-key.pem"
    if not path.exists():
        path.write_text(emulator.generate_certificate())
        path.chmod(0o600)
    return path


def _app(emulator: SalesforceEmulator, home: Path, *, db: str | None = None, transport: Any = None) -> App:
    app = App(db=db, transport=transport or (lambda name: emulator.transport()))
    options = {"client_id": emulator.client_id, "jwt_key": str(_key(emulator, home)), "user": USER}
    connect(app, provider="salesforce", name="sf", base_url="http://sf.test", options=options, io=ScriptIO())
    return app


def _outcomes(path: Path, n: int, **kw: Any) -> Path:
    lines = []
    for i, line in enumerate(outcome_lines(n, **kw).splitlines()):
        o = json.loads(line)
        if "deal" in o:
            o["deal"]["stage"] = "Prospecting"
        if i % 5 == 0:
            o["next_step"] = {"type": "call", "due_at": "2026-12-09T09:00:00+00:00", "notes": "call back"}
        lines.append(json.dumps(o))
    path.write_text("\n".join(lines) + "\n")
    return path


def _calls(emulator: SalesforceEmulator) -> Counter[str]:
    return Counter(str(t["crmsync_outcome_id__c"]) for t in emulator.records("Task") if t["TaskSubtype"] == "Call")


# -- pieces ---------------------------------------------------------------------------------------
def test_limit_info_is_read_from_every_shape_salesforce_sends() -> None:
    parsed = parse_limit_info("api-usage=18/5000;per-app-api-usage=17/250(appName=crmsync)")
    assert parsed["api-usage"].remaining == 4982 and parsed["per-app-api-usage"].app == "crmsync"
    assert parse_limit_info(None) == {} and parse_limit_info("api-usage=x/y") == {}
    assert push_requests({"calls": 1000, "contacts": 1000, "companies": 7, "deals": 250}) == 8 + 10 + 2 + 4 + 5


def test_long_keys_are_looked_up_in_queries_that_fit_a_uri(home: Path, tmp_path: Path) -> None:
    emulator = SalesforceEmulator()
    app = _app(emulator, home)
    rows = [
        json.dumps(
            {
                "id": f"long-{i}",
                "occurred_at": "2026-12-01T10:00:00+00:00",
                "disposition": "connected",
                "contact": {"email": f"{'x' * 60}.{i}@{'example' * 3}.org"},
            }
        )
        for i in range(200)
    ]
    src = tmp_path / "o.jsonl"
    src.write_text("\n".join(rows) + "\n")
    longest = {"n": 0}

    def measure(request: httpx.Request) -> bool:
        longest["n"] = max(longest["n"], len(str(request.url)))
        return False

    emulator.faults.lose_reply = measure
    assert push(app, source=str(src), connection="sf").outcome == "ok"
    assert len(_calls(emulator)) == 200 and 8_000 < longest["n"] < 16_384


@pytest.mark.parametrize("hostile", ["o'brien@x.org", "a\\' OR Id != '", "x') OR (Name != '"])
def test_hostile_values_stay_inside_their_soql_literal(hostile: str) -> None:
    emulator = SalesforceEmulator()
    emulator.create("Contact", {"LastName": "Victim", "Email": "victim@x.org"})
    emulator.create("Contact", {"LastName": "OBrien", "Email": "o'brien@x.org"})
    token = emulator.issue(emulator.users[0])["access_token"]
    client = httpx.Client(transport=emulator.transport(), base_url="http://sf.test/services/data/v62.0")
    q = soql.in_list("Contact", ["Email"], "Email", [hostile])
    doc = client.get("/query", params={"q": q}, headers={"Authorization": f"Bearer {token}"}).json()
    assert [r["Email"] for r in doc["records"]] == ([hostile] if hostile == "o'brien@x.org" else [])


# -- connect --------------------------------------------------------------------------------------
def test_jwt_connect_uses_the_instance_url_and_a_wrong_key_is_refused(home: Path, tmp_path: Path) -> None:
    emulator = SalesforceEmulator()
    app = _app(emulator, home)
    conn = app.store.connections.get("sf") if hasattr(app.store, "connection") else None
    assert emulator.stats.by_route["POST oauth token"] == 1 and emulator.stats.by_route["GET versions"] == 1
    if conn is not None:
        assert conn.settings["api_base_url"] == "http://sf.test/services/data/v62.0"
    other = SalesforceEmulator()
    wrong = tmp_path / "wrong.pem"
    wrong.write_text(other.generate_certificate())
    options = {"client_id": emulator.client_id, "jwt_key": str(wrong), "user": USER}
    with pytest.raises(AuthError, match=r"invalid_grant|invalid assertion"):
        connect(
            App(transport=lambda n: emulator.transport()),
            provider="salesforce",
            name="sf2",
            base_url="http://sf.test",
            options=options,
            io=ScriptIO(),
        )


def test_web_server_flow_with_pkce_through_the_loopback_redirect(home: Path) -> None:
    emulator = SalesforceEmulator()
    seen: list[str] = []

    def browser(url: str) -> None:
        seen.append(url)
        with httpx.Client(transport=emulator.transport()) as sf:
            location = sf.get(url).headers["location"]
        httpx.get(location)  # the browser follows the redirect to crmsync's loopback listener

    app = App(transport=lambda name: emulator.transport())
    connect(
        app,
        provider="salesforce",
        name="sf",
        base_url="http://sf.test",
        options={"client_id": emulator.client_id},
        io=ScriptIO(emulator.client_secret, open_with=browser),
    )
    assert "code_challenge=" in seen[0] and "code_challenge_method=S256" in seen[0]
    assert len(emulator.refresh_tokens) == 1
    emulator.expire_tokens()  # the session timed out: the refresh token renews it, once
    summary = push(app, source=str(_outcomes(home / "o.jsonl", 3)), connection="sf")
    assert for_push(summary) == 0 and len(_calls(emulator)) == 3
    assert emulator.stats.by_route["POST oauth token"] == 2


def test_a_code_without_its_pkce_verifier_is_refused() -> None:
    emulator = SalesforceEmulator()
    with httpx.Client(transport=emulator.transport(), base_url="http://sf.test") as sf:
        params = {
            "response_type": "code",
            "client_id": emulator.client_id,
            "redirect_uri": "http://127.0.0.1:1/cb",
            "code_challenge": "x" * 43,
            "code_challenge_method": "S256",
            "state": "s",
        }
        location = sf.get("/services/oauth2/authorize", params=params).headers["location"]
        code = dict(httpx.URL(location).params)["code"]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": emulator.client_id,
            "client_secret": emulator.client_secret,
            "redirect_uri": "http://127.0.0.1:1/cb",
        }
        answer = sf.post("/services/oauth2/token", data=form)
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "q",
    [
        "SELECT FROM Contact",
        "SELECT Id FROM Nope",
        "SELECT Id FROM Contact WHERE Email = ",
        "SELECT Id FROM Contact WHERE Email IN ('a'",
        "DELETE FROM Contact",
        "SELECT Id, Bogus FROM Contact",
    ],
)
def test_malformed_soql_gets_the_real_error_envelope(q: str) -> None:
    emulator = SalesforceEmulator()
    token = emulator.issue(emulator.users[0])["access_token"]
    with httpx.Client(transport=emulator.transport(), base_url="http://sf.test/services/data/v62.0") as sf:
        answer = sf.get("/query", params={"q": q}, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 400
    [error] = answer.json()
    assert set(error) == {"message", "errorCode", "fields"}
    assert error["errorCode"] in ("MALFORMED_QUERY", "INVALID_FIELD", "INVALID_TYPE")


def test_an_expired_session_is_renewed_once_and_the_request_retried(home: Path, tmp_path: Path) -> None:
    emulator = SalesforceEmulator()
    app = _app(emulator, home)
    emulator.expire_tokens()
    summary = push(app, source=str(_outcomes(tmp_path / "o.jsonl", 5)), connection="sf")
    assert for_push(summary) == 0 and len(_calls(emulator)) == 5
    assert emulator.stats.by_route["POST oauth token"] == 2  # connect + one renewal


def test_a_pinned_version_the_org_does_not_offer_is_named(home: Path) -> None:
    write_config(home, "sf", api_version="99.0")
    emulator = SalesforceEmulator()
    app = _app(emulator, home)
    with pytest.raises(ConfigError, match=r"does not offer API v99.0 \(newest: v65.0\)"):
        app.provider(app.store.connections.all()[0]).check()


# -- push -----------------------------------------------------------------------------------------
def test_1000_outcomes_in_few_requests_each_call_linked_and_a_re_push_writes_nothing(
    home: Path, tmp_path: Path
) -> None:
    emulator = SalesforceEmulator()
    app = _app(emulator, home)
    src = _outcomes(tmp_path / "o.jsonl", 1000, company_every=3, deal_every=4)
    before = emulator.stats.requests
    summary = push(app, source=str(src), connection="sf")
    spent = emulator.stats.requests - before
    assert for_push(summary) == 0 and summary.created == 1000, summary.as_dict()
    assert spent <= 60, dict(emulator.stats.by_route)
    print(f"\n1000 outcomes: {spent} requests {dict(emulator.stats.by_route)}")
    calls = _calls(emulator)
    assert len(calls) == 1000 and set(calls.values()) == {1}
    contacts = {c["Id"]: c for c in emulator.records("Contact")}
    deals = {d["Id"]: d for d in emulator.records("Opportunity")}
    assert len(contacts) == 1000 and len(deals) == 250 and len(emulator.records("Account")) == 7
    for task in emulator.records("Task"):
        if task["TaskSubtype"] != "Call":
            continue
        i = int(task["crmsync_outcome_id__c"].split("-")[1])
        assert task["Status"] == "Completed" and task["IsClosed"] is True
        assert contacts[task["WhoId"]]["Email"] == f"person{i}@example.org"
        assert task["CallDurationInSeconds"] == 60 + i % 100 and task["Description"] == f"call {i}"
        assert (task.get("WhatId") in deals) == (i % 4 == 0)
    follow_ups = [t for t in emulator.records("Task") if t["TaskSubtype"] != "Call"]
    assert len(follow_ups) == 200 and all(not t["IsClosed"] and t["ActivityDate"] == "2026-12-09" for t in follow_ups)

    writes, requests = emulator.stats.writes, emulator.stats.requests
    again = push(app, source=str(src), connection="sf")
    assert for_push(again) == 0 and again.created == 0 and emulator.stats.writes == writes
    assert emulator.stats.requests - requests <= 3


def test_a_new_store_creates_no_second_task(home: Path, tmp_path: Path) -> None:
    emulator = SalesforceEmulator()
    src = _outcomes(tmp_path / "o.jsonl", 60, company_every=3, deal_every=4)
    assert push(_app(emulator, home, db=str(tmp_path / "a.db")), source=str(src), connection="sf").outcome == "ok"
    counts = {s: len(emulator.records(s)) for s in ("Contact", "Account", "Opportunity", "Task")}
    second = push(_app(emulator, home, db=str(tmp_path / "b.db")), source=str(src), connection="sf")
    assert for_push(second) == 0, second.as_dict()
    assert {s: len(emulator.records(s)) for s in counts} == counts
    assert set(_calls(emulator).values()) == {1}
    write_config(home, "sf", lookback_seconds=0)
    time.sleep(1.1)
    pulled = pull(_app(emulator, home, db=str(tmp_path / "c.db")), objects=["calls", "tasks"])[0]
    assert pulled.outcome == "ok" and {o.object: o.read for o in pulled.objects} == {"calls": 60, "tasks": 12}


@pytest.mark.slow
def test_lost_replies_and_locked_rows_never_duplicate_a_record_or_a_call(home: Path, tmp_path: Path) -> None:
    lose = {"n": 0}

    def lost(request: httpx.Request) -> bool:
        if "/composite/sobjects" in request.url.path and lose["n"] < 6:
            lose["n"] += 1
            return True
        return False

    emulator = SalesforceEmulator(faults=Faults(lose_reply=lost, partial_rate=0.1, seed=4))
    app = _app(emulator, home)
    src = _outcomes(tmp_path / "o.jsonl", 300, company_every=3, deal_every=4)
    for _ in range(5):
        summary = push(app, source=str(src), connection="sf")
        if summary.pending == 0 and summary.failed == 0:
            break
    assert for_push(summary) == 0, summary.as_dict()
    assert lose["n"] == 6
    calls = _calls(emulator)
    assert len(calls) == 300 and set(calls.values()) == {1}
    emails = Counter(c["Email"] for c in emulator.records("Contact"))
    assert len(emails) == 300 and set(emails.values()) == {1}


def test_a_duplicate_rule_is_reported_for_its_outcome_only(home: Path, tmp_path: Path) -> None:
    emulator = SalesforceEmulator()
    emulator.duplicate_emails.add("person3@example.org")
    app = _app(emulator, home)
    summary = push(app, source=str(_outcomes(tmp_path / "o.jsonl", 6)), connection="sf")
    assert summary.failed == 1 and len(_calls(emulator)) == 5
    reason = " ".join(summary.failure_reasons)
    assert "duplicate rules blocked" in reason and "Standard_Contact_Duplicate_Rule" in reason


def test_missing_external_id_fields_are_named_by_push_and_map_check(home: Path, tmp_path: Path) -> None:
    from crmsync.sync.mapping_ops import check_mapping

    emulator = SalesforceEmulator(external_ids=False)
    app = _app(emulator, home)
    expected = "Account.crmsync_key__c, Contact.crmsync_key__c, Opportunity.crmsync_key__c, Task.crmsync_outcome_id__c"
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        push(app, source=str(_outcomes(tmp_path / "o.jsonl", 3)), connection="sf")
    assert emulator.stats.writes == 0
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        check_mapping(app, "sf")


def test_owners_come_from_users_by_email(home: Path, tmp_path: Path) -> None:
    emulator = SalesforceEmulator()
    app = _app(emulator, home)
    rows = []
    for i, owner in enumerate(["rep1@example.com", "REP2@example.com", "nobody@example.com"]):
        rows.append(
            json.dumps(
                {
                    "id": f"own-{i}",
                    "occurred_at": "2026-12-01T10:00:00+00:00",
                    "contact": {"email": f"c{i}@example.org"},
                    "owner_email": owner,
                    "disposition": "connected",
                }
            )
        )
    src = tmp_path / "o.jsonl"
    src.write_text("\n".join(rows) + "\n")
    assert push(app, source=str(src), connection="sf").outcome == "ok"
    owners = {t["crmsync_outcome_id__c"]: t.get("OwnerId") for t in emulator.records("Task")}
    assert owners == {"own-0": emulator.users[1], "own-1": emulator.users[2], "own-2": emulator.users[0]}


def test_a_push_beyond_the_share_of_the_allocation_left_stops_before_writing(home: Path, tmp_path: Path) -> None:
    write_config(home, "sf", budget_share=0.5)
    emulator = SalesforceEmulator(daily_limit=1000)
    app = _app(emulator, home)
    emulator.api_used = 990
    summary = push(app, source=str(_outcomes(tmp_path / "o.jsonl", 400, company_every=3)), connection="sf")
    assert for_push(summary) == 75 and emulator.stats.writes == 0
    assert "may need up to" in (summary.error or "") and "left of the org's 1,000 a day" in (summary.error or "")


def test_a_spent_daily_allocation_stops_the_run_with_exit_75(home: Path, tmp_path: Path) -> None:
    emulator = SalesforceEmulator(daily_limit=1000)

    def spend_it_all(request: httpx.Request) -> bool:
        if "/composite/sobjects" in request.url.path:
            emulator.api_used = emulator.daily_limit  # other integrations spent the rest meanwhile
        return False

    emulator.faults.lose_reply = spend_it_all
    app = _app(emulator, home)
    summary = push(app, source=str(_outcomes(tmp_path / "o.jsonl", 10, company_every=2)), connection="sf")
    assert for_push(summary) == 75 and "REQUEST_LIMIT_EXCEEDED" in (summary.error or ""), summary.as_dict()


# -- pull -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pull_stores_edits_creates_and_deletions_exactly_once(home: Path) -> None:
    write_config(home, "sf", lookback_seconds=0, overlap_seconds=0)
    emulator = build_salesforce(contacts=30, companies=3, deals=4)
    app = _app(emulator, home)
    first = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert first.outcome == "ok"
    assert {o.object: o.created for o in first.objects} == {"contacts": 30, "companies": 3, "deals": 4}

    contacts = emulator.records("Contact")
    emulator.update("Contact", contacts[1]["Id"], {"FirstName": "Renamed"})
    emulator.create("Contact", {"LastName": "New", "Email": "new@x.org"})
    emulator.delete("Opportunity", emulator.records("Opportunity")[0]["Id"])
    time.sleep(1.1)  # whole seconds: the edits' second must be over before a window can end after it
    second = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert second.outcome == "ok"
    by = {o.object: o for o in second.objects}
    assert by["contacts"].created == 1 and by["contacts"].updated == 1, by["contacts"]
    assert by["deals"].archived == 1
    time.sleep(1.1)
    third = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert all(o.created == o.updated == o.archived == 0 for o in third.objects)


def test_a_backfill_above_the_threshold_is_one_bulk_job_resumed_after_a_kill(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crmsync.providers.salesforce import bulk

    monkeypatch.setattr(bulk, "PAGE_ROWS", 600)
    write_config(home, "sf", bulk_threshold=100)
    emulator = build_salesforce(contacts=3_000, companies=0, deals=0)
    app = _app(emulator, home)
    assert pull_stopped_before_page(app, 1, ["contacts"])  # killed after storing the first page
    assert len(emulator.jobs) == 1
    read_before = emulator.stats.by_route["GET bulk query results"]
    done = pull(app, objects=["contacts"])[0]
    assert done.outcome == "ok"
    assert len(emulator.jobs) == 1  # the same job, its locator the checkpoint
    stored = app.store.mirror.records("sf", "contacts")
    assert len({r.remote_id for r in stored}) == 3_000 == len(stored)
    # Resumed at the second page's locator: four pages, not the five of a new start.
    assert emulator.stats.by_route["GET bulk query results"] - read_before == 4
    # The Bulk read ends the window: the next pull starts there and reads nothing again.
    time.sleep(1.1)  # whole seconds: the next window must end after the first one's second
    again = pull(app, objects=["contacts"])[0]
    assert again.outcome == "ok" and again.objects[0].read == 0, again.objects[0]

    # A job purged before the run resumed (seven days) is started again, not an error.
    write_config(home, "sf", bulk_threshold=100)
    other = App(db=str(home / "other.db"), transport=lambda name: emulator.transport())
    connect(
        other,
        provider="salesforce",
        name="sf",
        base_url="http://sf.test",
        io=ScriptIO(),
        options={"client_id": emulator.client_id, "jwt_key": str(_key(emulator, home)), "user": USER},
    )
    assert pull_stopped_before_page(other, 1, ["contacts"])
    emulator.jobs.clear()
    assert pull(other, objects=["contacts"])[0].outcome == "ok"
    assert len(other.store.mirror.records("sf", "contacts")) == 3_000
    assert emulator.stats.by_route["GET query read"] <= 2  # the COUNT(), then one incremental query at most


# -- CLI ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_sandbox_connect_line_works_as_pasted(home: Path) -> None:
    import shlex

    from crmsync.cli.sandbox import make_sandbox
    from crmsync.emulators.sandbox import SandboxOptions

    name, box = make_sandbox("salesforce", SandboxOptions(contacts=5, companies=1, deals=1))
    assert name == "salesforce" and box.secret is None  # the JWT key file is the credential
    assert oct(Path(box.options["jwt_key"]).stat().st_mode & 0o777) == "0o600"
    server = box.serve()
    try:
        words = shlex.split(box.connect_command(name, server.url))
        assert words[:3] == ["crmsync", "connect", "salesforce"]
        result = run_cli(words[1:], cli_env(home))
        assert result.code == 0, result.stderr
        pulled = run_cli(["--json", "pull", "-c", "sandbox", "--object", "contacts"], cli_env(home))
        assert pulled.code == 0, pulled.stderr
    finally:
        server.stop()


@pytest.mark.slow
def test_push_killed_30_times_logs_each_call_exactly_once(home: Path, tmp_path: Path) -> None:
    import random

    from tests.test_resilience import _run_and_kill

    emulator = SalesforceEmulator(faults=Faults(latency_ms=20, seed=5))
    server = emulator.serve()
    try:
        app = App()
        options = {"client_id": emulator.client_id, "jwt_key": str(_key(emulator, home)), "user": USER}
        connect(
            app,
            provider="salesforce",
            name="sf",
            base_url=server.url,
            options=options,
            io=ScriptIO(),
            insecure_storage=True,
        )
        app.close()
        env = cli_env(home)
        src = _outcomes(tmp_path / "o.jsonl", 500, company_every=3, deal_every=4)
        rng = random.Random(29)
        kills = 0
        for _ in range(30):
            code = _run_and_kill(
                ["--quiet", "push", str(src), "-c", "sf"],
                env,
                emulator,  # type: ignore[arg-type]
                after_requests=rng.randint(1, 12),
                then=rng.uniform(0, 0.05),
            )
            kills += code is None
        final = run_cli(["--json", "push", str(src), "-c", "sf"], env)
        assert final.code == 0, final.stderr
        # Later runs have less left to do and may end before their kill; how many do is timing.
        assert kills >= 5
        calls = _calls(emulator)
        assert len(calls) == 500 and set(calls.values()) == {1}
        emails = Counter(c["Email"] for c in emulator.records("Contact"))
        assert len(emails) == 500 and set(emails.values()) == {1}
        assert len(emulator.records("Account")) == 7 and len(emulator.records("Opportunity")) == 125
        assert len([t for t in emulator.records("Task") if t["TaskSubtype"] != "Call"]) == 100
    finally:
        server.stop()


# -- Salesforce's own Postman collection, replayed --------------------------------------------------
POSTMAN = Path(__file__).resolve().parent / "specs" / "salesforce"


#: The collection's requests crmsync sends, with what fills their placeholders (the collection's own
#: bodies are type templates such as "Boolean"; their method, path, query and form keys are kept).
REPLAYED = {
    "auth/jwt_bearer_token_flow.json": 200,
    "auth/refresh_token.json": 200,
    "rest/versions.json": 200,
    "rest/limit.json": 200,
    "rest/query.json": 200,
    "rest/queryall.json": 200,
    "rest/sobject_describe.json": 200,
    "rest/sobject_get_deleted.json": 200,
    "rest/sobject_rows.json": 200,
    "rest/sobject_create.json": 201,
    "rest/sobject_rows_by_external_id.json": 200,
    "composite/sobject_collections_create.json": 200,
    "query/create_job_query.json": 200,
    "query/get_job_info_query.json": 200,
    "query/get_job_query_result.json": 200,
}


def test_the_postman_collection_requests_crmsync_uses_are_answered_as_documented() -> None:
    import jwt

    base = POSTMAN
    emulator = SalesforceEmulator()
    pem = emulator.generate_certificate()
    tokens = emulator.issue(emulator.users[0])
    account = emulator.create("Account", {"Name": "Acme", "crmsync_key__c": "acme.example"})
    now = datetime.now(UTC)
    values: dict[str, str] = {
        "{{url}}": "http://sf.test",
        "{{site}}": "",
        "{{_endpoint}}": "http://sf.test",
        "{{version}}": "62.0",
        "{{clientId}}": emulator.client_id,
        "{{clientSecret}}": emulator.client_secret,
        "{{_refreshToken}}": tokens["refresh_token"],
        "<SOBJECT_API_NAME>": "Account",
        "<RECORD_ID>": account["Id"],
        "<FIELD_NAME>": "crmsync_key__c",
        "<FIELD_VALUE>": "acme.example",
    }
    client = httpx.Client(transport=emulator.transport())
    job = ""
    for name, status in REPLAYED.items():
        doc = json.loads((base / name).read_text())
        url = doc["url"]
        for key, value in {**values, "{{_jobId}}": job}.items():
            url = url.replace(key, value)
        url = url.split("?")[0]
        params = {q["key"]: unquote_plus(q["value"]) for q in doc.get("queryParams") or [] if q.get("value")}
        if name.endswith("get_deleted.json"):
            params = {"start": (now - timedelta(hours=1)).isoformat(), "end": now.isoformat()}
        if name.endswith("query_result.json"):
            params = {"maxRecords": "100"}
        headers = {h["key"]: h["value"] for h in doc.get("headerData") or [] if h["key"] != "Authorization"}
        headers["Authorization"] = f"Bearer {tokens['access_token']}"
        kwargs: dict[str, Any] = {}
        if doc.get("dataMode") in ("urlencoded", "params"):
            form = {d["key"]: d["value"] for d in doc["data"]}
            for key in form:
                for k, v in values.items():
                    form[key] = form[key].replace(k, v)
            if form.get("grant_type", "").endswith("jwt-bearer"):
                claims = {
                    "iss": emulator.client_id,
                    "sub": USER,
                    "aud": "https://login.salesforce.com",
                    "exp": int(time.time()) + 120,
                }
                form["assertion"] = jwt.encode(claims, pem, algorithm="RS256")
            kwargs["data"] = form
        elif doc["method"] in ("POST", "PATCH"):
            raw = doc.get("rawModeData") or ""
            if name.endswith("collections_create.json"):
                raw = json.dumps(
                    {"allOrNone": False, "records": [{"attributes": {"type": "Contact"}, "LastName": "X"}]}
                )
            elif name.endswith("create_job_query.json"):
                raw = json.dumps(
                    {
                        "operation": "query",
                        "query": "SELECT Id, Name FROM Account",
                        "contentType": "CSV",
                        "columnDelimiter": "COMMA",
                        "lineEnding": "LF",
                    }
                )
            kwargs["content"] = raw.encode()
        response = client.request(doc["method"], url, params=params, headers=headers, **kwargs)
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        if response.headers.get("content-type", "").startswith("application/json") and name.startswith(
            ("rest/q", "rest/s", "comp")
        ):
            assert response.headers["sforce-limit-info"].startswith("api-usage=")
        if name.endswith("create_job_query.json"):
            job = response.json()["id"]
        if name.endswith("query_result.json"):
            assert response.text.splitlines()[0] == "Id,Name" and response.headers["sforce-locator"] == "null"
        if name == "rest/query.json":
            assert response.json()["records"][0]["Name"] == "Acme"


def test_purged_deletions_come_from_the_delete_log_and_an_old_cursor_means_a_resync(home: Path) -> None:
    write_config(home, "sf", lookback_seconds=0, overlap_seconds=0)
    emulator = build_salesforce(contacts=5, companies=0, deals=0)
    app = _app(emulator, home)
    assert pull(app, objects=["contacts"])[0].outcome == "ok"
    provider = app.provider(app.store.connections.all()[0])
    provider.deleted_every = timedelta(0)  # type: ignore[attr-defined]
    gone = emulator.records("Contact")[0]["Id"]
    emulator.clock_offset = -300  # five minutes ago: the log covers whole minutes up to the window's end
    emulator.delete("Contact", gone)
    emulator.clock_offset = 0
    emulator.data["Contact"].pop(gone)  # emptied from the recycle bin: queryAll no longer sees it
    time.sleep(1.1)
    page = list(
        provider.changes(
            "contacts",
            {"ts": "2026-01-01T00:00:00Z", "id": "", "del": soql.stamp(datetime.now(UTC) - timedelta(hours=2))},
            fields=["Email"],
        )
    )[-1]
    assert page.deleted == [gone]
    emulator.purged_before = emulator.now()  # the log was purged after the cursor: a full resync
    page = list(
        provider.changes(
            "contacts",
            {"ts": "2026-01-01T00:00:00Z", "id": "", "del": soql.stamp(datetime.now(UTC) - timedelta(hours=2))},
            fields=["Email"],
        )
    )[-1]
    assert page.deleted == [] and page.cursor is not None and "ts" not in page.cursor
    old = {"ts": "2026-01-01T00:00:00Z", "id": "", "del": soql.stamp(datetime.now(UTC) - timedelta(days=16))}
    assert "ts" not in (list(provider.changes("contacts", old, fields=["Email"]))[-1].cursor or {"ts": 1})


def test_the_lead_rule_makes_people_without_a_company_leads_and_links_their_calls(home: Path, tmp_path: Path) -> None:
    write_config(home, "sf", unknown_person="lead")
    emulator = SalesforceEmulator()
    app = _app(emulator, home)
    src = _outcomes(tmp_path / "o.jsonl", 12, company_every=3, deal_every=4)
    summary = push(app, source=str(src), connection="sf")
    assert for_push(summary) == 0, summary.as_dict()
    leads = {r["Id"]: r for r in emulator.records("Lead")}
    contacts = {r["Id"]: r for r in emulator.records("Contact")}
    assert len(contacts) == 4 and len(leads) == 8  # every third came with a company
    assert all(r["Company"] == "[not provided]" for r in leads.values())
    for task in emulator.records("Task"):
        if task["WhoId"] in leads:
            assert not task.get("WhatId")  # a Task on a Lead has no WhatId
    again = push(_app(emulator, home, db=str(tmp_path / "b.db")), source=str(src), connection="sf")
    assert for_push(again) == 0 and len(emulator.records("Lead")) == 8 and len(_calls(emulator)) == 12


def test_map_check_reads_describe_and_the_default_mapping_fits(home: Path) -> None:
    from crmsync.sync.mapping_ops import check_mapping

    write_config(home, "sf", concurrency=64)
    emulator = SalesforceEmulator()
    app = _app(emulator, home)
    result = check_mapping(app, "sf")
    assert [p.message for p in result.problems] == []
    assert emulator.stats.by_route["GET describe"] == 4  # four sObjects, described once each
    provider = app.provider(app.store.connections.all()[0])
    stage = next(f for f in provider.fields("deals") if f.name == "StageName")
    assert stage.required and stage.options and "Closed Won" in stage.options
    assert provider.http.concurrency == 25  # Salesforce's long-running request limit


@pytest.mark.slow
def test_the_cli_pulls_and_says_in_one_line_that_salesforce_has_no_webhooks(home: Path) -> None:
    emulator = build_salesforce(contacts=20, companies=2, deals=2)
    server = emulator.serve()
    try:
        options = {"client_id": emulator.client_id, "jwt_key": str(_key(emulator, home)), "user": USER}
        app = App()
        connect(
            app,
            provider="salesforce",
            name="sf",
            base_url=server.url,
            options=options,
            io=ScriptIO(),
            insecure_storage=True,
        )
        app.close()
        env = cli_env(home)
        pulled = run_cli(["--json", "pull", "-c", "sf"], env)
        assert pulled.code == 0, pulled.stderr
        assert "20" in pulled.stdout
        hook = run_cli(["webhook", "secret", "-c", "sf"], env, stdin="x\n")
        assert hook.code == 2 and len(hook.stderr.strip().splitlines()) == 1 and "Salesforce" in hook.stderr
        assert "Traceback" not in hook.stderr
    finally:
        server.stop()


def test_a_rest_pull_pages_by_next_records_url_and_resumes_at_its_keyset_after_a_kill(home: Path) -> None:
    write_config(home, "sf", bulk_threshold=100_000, lookback_seconds=0)
    emulator = build_salesforce(contacts=4_500, companies=0, deals=0)  # one second: ties broken by Id
    app = _app(emulator, home)
    assert pull_stopped_before_page(app, 1, ["contacts"])
    done = pull(app, objects=["contacts"])[0]
    assert done.outcome == "ok"
    stored = app.store.mirror.records("sf", "contacts")
    assert len({r.remote_id for r in stored}) == 4_500 == len(stored)
    assert emulator.stats.by_route["GET query more read"] >= 1 and not emulator.jobs


def test_opportunity_contact_roles_are_read_as_deal_associations(home: Path) -> None:
    emulator = SalesforceEmulator()
    app = _app(emulator, home)
    deal = emulator.create("Opportunity", {"Name": "D", "StageName": "Prospecting", "CloseDate": "2027-01-01"})
    people = [emulator.create("Contact", {"LastName": f"C{i}"})["Id"] for i in range(2)]
    for person in people:
        emulator.create("OpportunityContactRole", {"OpportunityId": deal["Id"], "ContactId": person})
    provider = app.provider(app.store.connections.all()[0])
    assert provider.read_associations("deals", [deal["Id"]]) == {deal["Id"]: {"contacts": people}}
    assert provider.read_associations("contacts", people) == {}


@pytest.mark.parametrize(
    ("given", "host"),
    [
        (None, "https://login.salesforce.com"),
        ("test", "https://test.salesforce.com"),
        ("acme", "https://acme.my.salesforce.com"),
        ("acme--uat.sandbox.my.salesforce.com", "https://acme--uat.sandbox.my.salesforce.com"),
    ],
)
def test_login_hosts(given: str | None, host: str) -> None:
    from crmsync.providers.salesforce.auth import login_host

    assert login_host(given) == host
