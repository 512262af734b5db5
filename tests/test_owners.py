"""Reps own their calls: ``owner_email`` becomes the CRM user (HubSpot owner, Zoho user), once per run.

Every check reads the records back through the emulator's own API, as a rep's CRM screen would.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.cli.exits import for_push
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.emulators.zoho import ZohoEmulator
from crmsync.providers.base import Provider
from crmsync.store.outbox import OutboxRow
from crmsync.sync.push import PushSummary, push
from crmsync.sync.push.items import Item
from crmsync.sync.push.owners import Owners
from tests.e2e import cli_env, hubspot_app, run_cli
from tests.test_provider_zoho import zoho_app

REPS = ("ada.rep@example.com", "ben.rep@example.com")


def outcomes(owners: list[str | None], *, prefix: str = "o", stage: str = "appointmentscheduled") -> str:
    """One outcome per entry: a new contact, a follow-up task and a deal, owned by ``owners[i]``."""
    lines = []
    for i, owner in enumerate(owners):
        o: dict[str, Any] = {
            "id": f"{prefix}-{i}",
            "occurred_at": "2026-11-20T10:00:00+01:00",
            "contact": {"email": f"{prefix}{i}@example.org", "last_name": f"N{i}"},
            "disposition": "connected",
            "next_step": {"type": "call", "due_at": "2026-12-01T09:00:00+00:00"},
            "deal": {"name": f"Deal {i}", "amount": 100 + i, "stage": stage},
        }
        if owner is not None:
            o["owner_email"] = owner
        lines.append(json.dumps(o))
    return "\n".join(lines) + "\n"


def hubspot_api(emu: HubSpotEmulator) -> httpx.Client:
    return httpx.Client(
        transport=emu.transport(),
        base_url="https://api.hubapi.com",
        headers={"Authorization": f"Bearer {emu.private_app_token}"},
    )


def hubspot_owners_of(api: httpx.Client, obj: str) -> dict[str, str | None]:
    """``{crmsync_outcome_id or email: hubspot_owner_id}`` of every record of ``obj``, via the list API."""
    key = "email" if obj == "contacts" else "dealname" if obj == "deals" else "crmsync_outcome_id"
    out: dict[str, str | None] = {}
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100, "properties": f"{key},hubspot_owner_id"}
        if after:
            params["after"] = after
        body = api.get(f"/crm/v3/objects/{obj}", params=params).raise_for_status().json()
        for rec in body["results"]:
            out[rec["properties"][key]] = rec["properties"].get("hubspot_owner_id")
        after = ((body.get("paging") or {}).get("next") or {}).get("after")
        if not after:
            return out


# -- HubSpot -----------------------------------------------------------------------------------------


def test_hubspot_calls_tasks_contacts_and_deals_belong_to_the_rep_named(tmp_path: Path) -> None:
    emu = HubSpotEmulator(seed=5)
    emu.keep_log = True
    app = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    src = tmp_path / "o.jsonl"
    owners = [REPS[i % 2] for i in range(30)]
    src.write_text(outcomes(owners))
    summary = push(app, source=str(src), connection="hs")
    assert (summary.created, summary.failed, summary.owners_defaulted) == (30, 0, 0), summary

    ids = {email: emu.owner_id(email) for email in REPS}
    api = hubspot_api(emu)
    calls, tasks = hubspot_owners_of(api, "calls"), hubspot_owners_of(api, "tasks")
    contacts, deals = hubspot_owners_of(api, "contacts"), hubspot_owners_of(api, "deals")
    for i, email in enumerate(owners):
        assert calls[f"o-{i}"] == ids[email], i
        assert tasks[f"o-{i}:task"] == ids[email], i
        assert contacts[f"o{i}@example.org"] == ids[email], i
        assert deals[f"Deal {i}"] == ids[email], i
    # One listing of the owners for the whole run (30 outcomes, 2 reps).
    assert [p for _, p, _ in emu.stats.log if p.startswith("/crm/v3/owners")] == ["/crm/v3/owners/"]


def test_hubspot_unknown_owner_falls_back_to_the_connection_user_and_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    emu = HubSpotEmulator(seed=6)
    app = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes(["gone@example.com", REPS[0], "gone@example.com", None]))
    with caplog.at_level(logging.WARNING, logger="crmsync.push"):
        summary = push(app, source=str(src), connection="hs")
    assert (summary.created, summary.failed, summary.owners_defaulted) == (4, 0, 2), summary
    assert [r.getMessage() for r in caplog.records].count(
        "owner_email gone@example.com is no user of the CRM: the connection's user owns its records"
    ) == 1
    me, ada = emu.owner_id(emu.user), emu.owner_id(REPS[0])
    assert me and ada and me != ada
    api = hubspot_api(emu)
    calls, tasks = hubspot_owners_of(api, "calls"), hubspot_owners_of(api, "tasks")
    # Unknown rep and no rep at all: the connection's own user; nothing is left unassigned.
    assert [calls[f"o-{i}"] for i in range(4)] == [me, ada, me, me]
    assert [tasks[f"o-{i}:task"] for i in range(4)] == [me, ada, me, me]
    contacts = hubspot_owners_of(api, "contacts")
    assert [contacts[f"o{i}@example.org"] for i in range(4)] == [me, ada, me, None]  # no rep named: HubSpot's own


def test_hubspot_strict_owners_fails_the_outcome_before_anything_of_it_is_written(tmp_path: Path) -> None:
    emu = HubSpotEmulator(seed=7)
    app = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes([REPS[1], "Gone@Example.com"]))
    summary = push(app, source=str(src), connection="hs", strict_owners=True)
    assert (summary.created, summary.failed, summary.owners_defaulted, for_push(summary)) == (1, 1, 0, 1)
    assert [c["properties"]["email"] for c in emu.records("contacts")] == ["o0@example.org"]
    assert len(emu.records("calls")) == 1 and len(emu.records("deals")) == 1
    from crmsync.sync.push import receipt

    failed = receipt(app, "hs", "o-1")
    assert failed.status == "failed" and "gone@example.com is not a user of the CRM" in (failed.error or "")


def test_an_existing_contact_keeps_its_owner_but_the_call_is_the_reps(tmp_path: Path) -> None:
    """crm-wins on contact.owner_email: the rep owns the call, the contact stays with its owner."""
    emu = HubSpotEmulator(seed=8)
    ada, ben = emu.owner_id(REPS[0]), emu.owner_id(REPS[1])
    emu.bulk_create("contacts", 1, properties_fn=lambda _i: {"email": "o0@example.org", "hubspot_owner_id": ben})
    app = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes([REPS[0]]))
    summary = push(app, source=str(src), connection="hs")
    assert (summary.created, summary.failed) == (1, 0), summary
    api = hubspot_api(emu)
    assert hubspot_owners_of(api, "contacts") == {"o0@example.org": ben}
    assert hubspot_owners_of(api, "calls") == {"o-0": ada}


def test_hubspot_owners_are_read_in_pages_once_per_run(tmp_path: Path) -> None:
    emu = HubSpotEmulator(seed=9)
    for n in range(700):  # two pages of 500
        emu.add_owner(f"rep{n}@example.com", first_name="Rep", last_name=str(n))
    emu.keep_log = True
    app = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes(["rep650@example.com", "REP3@example.com"]))
    summary = push(app, source=str(src), connection="hs")
    assert (summary.created, summary.owners_defaulted) == (2, 0), summary
    calls = hubspot_owners_of(hubspot_api(emu), "calls")
    assert calls == {"o-0": emu.owner_id("rep650@example.com"), "o-1": emu.owner_id("rep3@example.com")}
    assert len([p for _, p, _ in emu.stats.log if p.startswith("/crm/v3/owners")]) == 2


@pytest.mark.slow
def test_push_without_the_owners_scope_exits_3_naming_it(tmp_path: Path, home: Path) -> None:
    scopes = [s for s in HubSpotEmulator().private_app_scopes if s != "crm.objects.owners.read"]
    emu = HubSpotEmulator(seed=10, scopes=scopes)
    server = emu.serve()
    try:
        hubspot_app(server.url, emu.private_app_token).close()
        src = tmp_path / "o.jsonl"
        src.write_text(outcomes([REPS[0]]))
        result = run_cli(["push", str(src), "-c", "hs"], cli_env(home, "hs", emu.private_app_token))
    finally:
        server.stop()
    assert result.code == 3, result.stderr
    errors = [line for line in result.stderr.strip().splitlines() if "WARNING" not in line]
    assert len(errors) == 1 and "crm.objects.owners.read" in errors[0] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_strict_owners_reports_the_failure_and_exits_1(tmp_path: Path, home: Path) -> None:
    emu = HubSpotEmulator(seed=11)
    server = emu.serve()
    try:
        hubspot_app(server.url, emu.private_app_token).close()
        src = tmp_path / "o.jsonl"
        src.write_text(outcomes([REPS[0], "nobody@example.com"]))
        env = cli_env(home, "hs", emu.private_app_token)
        result = run_cli(["--json", "push", str(src), "-c", "hs", "--strict-owners"], env)
        lenient = run_cli(["push", str(src), "-c", "hs", "--retry-failed"], env)  # the default policy
    finally:
        server.stop()
    assert result.code == 1, result.stderr
    assert lenient.code == 0, lenient.stderr
    assert "1 outcome(s) named an owner_email that is no CRM user: yours instead" in lenient.stdout
    assert emu.records("calls")[-1]["properties"]["hubspot_owner_id"] == emu.owner_id(emu.user)
    docs = result.json_lines()
    failed = [d for d in docs if d.get("status") == "failed"]
    assert [d["id"] for d in failed] == ["o-1"] and "nobody@example.com" in failed[0]["error"]
    assert docs[-1]["summary"]["failed"] == 1 and docs[-1]["summary"]["owners_defaulted"] == 0


# -- Zoho --------------------------------------------------------------------------------------------


def zoho_owners_of(emu: ZohoEmulator, module: str) -> dict[str, str | None]:
    """``{crmsync_outcome_id or Email or Deal_Name: Owner id}`` read through GET /crm/v8/{module}."""
    key = {"Contacts": "Email", "Deals": "Deal_Name"}.get(module, "crmsync_outcome_id")
    token = emu.issue_token()["access_token"]
    api = httpx.Client(transport=emu.transport(), base_url="https://www.zohoapis.com/crm/v8")
    headers = {"Authorization": f"Zoho-oauthtoken {token}"}
    out: dict[str, str | None] = {}
    page = 1
    while True:
        r = api.get(f"/{module}", params={"fields": f"{key},Owner", "page": page, "per_page": 200}, headers=headers)
        if r.status_code == 204:
            return out
        body = r.raise_for_status().json()
        for rec in body["data"]:
            out[rec[key]] = (rec.get("Owner") or {}).get("id")
        if not body["info"]["more_records"]:
            return out
        page += 1


def test_zoho_calls_and_tasks_belong_to_the_rep_and_unknown_reps_to_you(tmp_path: Path) -> None:
    emu = ZohoEmulator(seed=4)
    ben = emu.add_user("benrep002@zylkr.com", first_name="Ben")
    amelia = next(u["id"] for u in emu.users if u["email"] == "aburrows1@zylkr.com")
    me = emu.current_user["id"]
    emu.keep_log = True
    app = zoho_app(emu)
    src = tmp_path / "o.jsonl"
    owners = ["aburrows1@zylkr.com", "BenRep002@zylkr.com", "gone@zylkr.com", None]
    src.write_text(outcomes(owners, stage="Qualification"))
    summary = push(app, source=str(src), connection="z")
    assert (summary.created, summary.failed, summary.owners_defaulted) == (4, 0, 1), summary
    expected = [amelia, ben, me, me]
    calls, tasks = zoho_owners_of(emu, "Calls"), zoho_owners_of(emu, "Tasks")
    assert [calls[f"o-{i}"] for i in range(4)] == expected
    assert [tasks[f"o-{i}:task"] for i in range(4)] == expected
    contacts, deals = zoho_owners_of(emu, "Contacts"), zoho_owners_of(emu, "Deals")
    assert [contacts[f"o{i}@example.org"] for i in range(3)] == expected[:3]
    assert [deals[f"Deal {i}"] for i in range(3)] == expected[:3]
    users = [p for m, p, _ in emu.stats.log if p == "/crm/v8/users"]
    assert len(users) == 2  # one listing of the active users, one of the current user


def test_zoho_users_are_read_in_pages_and_strict_owners_fails_unknown_reps(tmp_path: Path) -> None:
    emu = ZohoEmulator(seed=5)
    for n in range(250):
        emu.add_user(f"rep{n:05d}zz@zylkr.com", first_name="Rep")
    emu.keep_log = True
    app = zoho_app(emu)
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes(["rep00240zz@zylkr.com", "gone@zylkr.com"], stage="Qualification"))
    summary = push(app, source=str(src), connection="z", strict_owners=True)
    assert (summary.created, summary.failed, summary.owners_defaulted) == (1, 1, 0), summary
    rep = next(u["id"] for u in emu.users if u["email"] == "rep00240zz@zylkr.com")
    assert zoho_owners_of(emu, "Calls") == {"o-0": rep}
    assert [r["Email"] for r in emu.records("Contacts")] == ["o0@example.org"]
    assert len([p for _, p, _ in emu.stats.log if p == "/crm/v8/users"]) == 3  # two pages, and the current user


# -- the policy on its own ---------------------------------------------------------------------------


class _NoOwners(Provider):
    """A provider that maps owner_email itself (as the contract's default says)."""

    name = "none"

    def __init__(self) -> None:
        pass

    @classmethod
    def connect(cls, ctx: Any) -> Any: ...
    @classmethod
    def make_auth(cls, **kw: Any) -> Any: ...
    def check(self) -> Any: ...
    def fields(self, obj: str) -> Any: ...
    def changes(self, *a: Any, **kw: Any) -> Any: ...
    def fetch(self, *a: Any, **kw: Any) -> Any: ...
    def list_ids(self, obj: str) -> Any: ...
    def lookup(self, *a: Any, **kw: Any) -> Any: ...
    def upsert(self, *a: Any, **kw: Any) -> Any: ...
    def create_activities(self, *a: Any, **kw: Any) -> Any: ...
    def find_activities(self, *a: Any, **kw: Any) -> Any: ...


def test_a_provider_that_does_not_resolve_owners_gets_owner_email_untouched() -> None:

    row = OutboxRow(1, "o-1", "pending", {}, {}, 0, None, False, datetime.now(UTC), None, None, None)
    canon = {"deals": {"name": "D", "owner_email": "rep@x.io"}, "calls": {"owner_email": "rep@x.io"}}
    item = Item(row, None, canon)  # type: ignore[arg-type]
    summary = PushSummary("c", "none")
    Owners(_NoOwners(), strict=True).apply([item], summary)
    assert canon["deals"]["owner_email"] == "rep@x.io" and not item.failed and summary.owners_defaulted == 0


def test_without_the_owners_scope_a_push_naming_no_rep_still_goes_ahead(tmp_path: Path) -> None:
    scopes = [s for s in HubSpotEmulator().private_app_scopes if s != "crm.objects.owners.read"]
    emu = HubSpotEmulator(seed=12, scopes=scopes)
    app = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes([None, None]))
    summary = push(app, source=str(src), connection="hs")
    assert (summary.created, summary.failed, for_push(summary)) == (2, 0, 0), summary
    assert hubspot_owners_of(hubspot_api(emu), "calls") == {"o-0": None, "o-1": None}


def test_zoho_without_the_users_scope_pushes_unnamed_reps_and_refuses_named_ones(tmp_path: Path) -> None:
    emu = ZohoEmulator(seed=13)
    scopes = [s for s in emu.scopes if s != "ZohoCRM.users.READ"]
    app = zoho_app(emu, scopes=scopes)
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes([None], stage="Qualification"))
    summary = push(app, source=str(src), connection="z")
    assert (summary.created, summary.failed, for_push(summary)) == (1, 0, 0), summary
    assert zoho_owners_of(emu, "Calls") == {"o-0": emu.current_user["id"]}  # Zoho's own default owner
    named = tmp_path / "named.jsonl"
    named.write_text(outcomes(["aburrows1@zylkr.com"], prefix="n", stage="Qualification"))
    refused = push(app, source=str(named), connection="z")
    assert for_push(refused) == 3 and "ZohoCRM.users.READ" in (refused.error or ""), refused


def test_hubspot_oauth_connection_owns_unnamed_calls_as_the_user_who_granted_it(tmp_path: Path) -> None:
    from crmsync.app import App
    from crmsync.sync.connect import connect
    from tests.e2e import ScriptIO

    emu = HubSpotEmulator(seed=14)
    server = emu.serve()
    try:
        app = App()
        io = ScriptIO(emu.client_secret, open_with=lambda url: httpx.get(url, follow_redirects=True))
        options = {"oauth": True, "client_id": emu.client_id}
        connect(app, provider="hubspot", name="hs", base_url=server.url, options=options, io=io)
        src = tmp_path / "o.jsonl"
        src.write_text(outcomes([None]))
        summary = push(app, source=str(src), connection="hs")
    finally:
        server.stop()
    assert (summary.created, summary.failed) == (1, 0), summary.error
    assert hubspot_owners_of(hubspot_api(emu), "calls") == {"o-0": emu.owner_id(emu.user)}


def test_hubspot_unknown_rep_and_no_owner_for_the_token_leaves_hubspots_default(tmp_path: Path) -> None:
    """The token's user is no owner (a deactivated user's app): the call is written, with no owner."""
    emu = HubSpotEmulator(seed=15)
    emu.user_id = 1  # the private app's user, who is not among the owners
    app = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes(["gone@example.com", REPS[1]]))
    summary = push(app, source=str(src), connection="hs")
    assert (summary.created, summary.failed, summary.owners_defaulted) == (2, 0, 1), summary.error
    ben = emu.owner_id(REPS[1])
    assert hubspot_owners_of(hubspot_api(emu), "calls") == {"o-0": None, "o-1": ben}
