"""Exactly once, whatever the store knows and whatever answers are lost (issue 25, items 1 and 2).

Two checks per CRM, each against its emulator:

* a push from a **new store** (the data directory deleted, `connect` again) of outcomes already
  pushed creates nothing: the CRM, found by marker and key, says they are there (``already``);
* a push through a proxy that forwards writes and loses their answers (dropped connections or 502s
  after the write was done), the first write of every kind and a seeded share of the rest, ends
  every outcome in one run with the CRM holding exactly what a fault-free push leaves.

CRM contents are compared as natural-key snapshots (emails, domains, deal keys, markers and which
of them each record links to), so a duplicate, a lost link or a stray record all show.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.app import App
from crmsync.cli.exits import for_push
from crmsync.emulators.base import Emulator, Faults
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.emulators.odoo import OdooEmulator
from crmsync.emulators.zoho import ZohoEmulator
from crmsync.http import HttpClient, UnconfirmedWrite
from crmsync.sync.connect import connect
from crmsync.sync.push import push
from tests.e2e import ScriptIO, cli_env, run_cli

MARK = re.compile(r"\[crmsync:([^\]\s<]+)\]")


def outcomes(n: int, *, stage: str, dispositions: tuple[str, str]) -> str:
    """``n`` outcomes: every one a call, every 2nd with one of 25 companies, every 4th a deal, every 5th a task."""
    due = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT09:00:00+00:00")
    lines = []
    for i in range(n):
        o: dict[str, Any] = {
            "id": f"x-{i}",
            "occurred_at": "2026-11-20T10:00:00+01:00",
            "contact": {"email": f"person{i}@example.org", "first_name": "P", "last_name": f"N{i}"},
            "disposition": dispositions[i % 2],
            "duration_seconds": 60 + i % 100,
            "notes": f"call {i}",
        }
        if i % 2 == 0:
            o["company"] = {"name": f"Co {i % 25}", "domain": f"co{i % 25}.example"}
        if i % 4 == 0:
            o["deal"] = {"name": f"Deal {i}", "amount": 100 + i, "stage": stage}
        if i % 5 == 0:
            o["next_step"] = {"type": "call", "due_at": due, "notes": "call back"}
        lines.append(json.dumps(o))
    return "\n".join(lines) + "\n"


# -- one CRM each: how to connect, how to read what it holds, which requests are writes ------------
@dataclass
class Crm:
    name: str
    make: Callable[[Faults | None], Emulator]
    connect: Callable[[App, Emulator, str], str]  # connects "c", returns the secret for CRMSYNC_SECRET_C
    snapshot: Callable[[Any], dict[str, Any]]
    write_kind: Callable[[httpx.Request], str | None]
    stage: str
    dispositions: tuple[str, str]
    #: Puts every 10th outcome's contact in the CRM beforehand (matched, updated and linked, not created).
    preload: Callable[[Any], None] = lambda emu: None


def _existing(i: int) -> int:
    return i * 10


def _hubspot_connect(app: App, emu: Any, url: str) -> str:
    connect(app, provider="hubspot", name="c", base_url=url, options={}, io=ScriptIO(emu.private_app_token))
    return str(emu.private_app_token)


def _hubspot_snapshot(emu: Any) -> dict[str, Any]:
    keys: dict[tuple[str, str], str] = {}
    natural = {
        "contacts": "email",
        "companies": "domain",
        "deals": "crmsync_deal_key",
        "calls": "crmsync_outcome_id",
        "tasks": "crmsync_outcome_id",
    }
    rows = {obj: emu.records(obj) for obj in natural}
    for obj, records in rows.items():
        for r in records:
            keys[(obj, str(r["id"]))] = str(r["properties"].get(natural[obj]))
    links = []
    for obj, targets in {
        "contacts": ["companies"],
        "deals": ["contacts", "companies"],
        "calls": ["contacts", "companies", "deals"],
        "tasks": ["contacts", "companies", "deals"],
    }.items():
        for r in rows[obj]:
            for to in targets:
                for rid in emu.associations(obj, r["id"], to):
                    links.append((obj, keys[(obj, str(r["id"]))], to, keys.get((to, str(rid)), f"?{rid}")))
    return {obj: sorted(keys[(obj, str(r["id"]))] for r in rs) for obj, rs in rows.items()} | {"links": sorted(links)}


def _hubspot_kind(request: httpx.Request) -> str | None:
    path = request.url.path
    if request.method != "POST" or path.endswith(("/search", "/read")):
        return None
    return re.sub(r"/\d+", "/{id}", path)


def _zoho_connect(app: App, emu: Any, url: str | None) -> str:
    options = {"client_id": emu.client_id, "grant_code": emu.grant_code()}
    connect(app, provider="zoho", name="c", base_url=url, options=options, io=ScriptIO(emu.client_secret))
    return json.dumps(app.secrets.get("c"))


def _zoho_snapshot(emu: Any) -> dict[str, Any]:
    natural = {
        "Contacts": "Email",
        "Accounts": "Website",
        "Deals": "crmsync_deal_key",
        "Calls": "crmsync_outcome_id",
        "Tasks": "crmsync_outcome_id",
    }
    rows = {m: emu.records(m) for m in natural}
    keys = {r["id"]: str(r.get(natural[m])) for m, rs in rows.items() for r in rs}
    links = []
    for m, rs in rows.items():
        for r in rs:
            for field in ("Account_Name", "Contact_Name", "Who_Id", "What_Id"):
                if isinstance(r.get(field), dict) and r[field].get("id"):
                    links.append((m, keys[r["id"]], field, keys.get(r[field]["id"], "?")))
    objects = {"Contacts": "contacts", "Accounts": "companies", "Deals": "deals", "Calls": "calls", "Tasks": "tasks"}
    return {objects[m]: sorted(keys[r["id"]] for r in rs) for m, rs in rows.items()} | {"links": sorted(links)}


def _zoho_kind(request: httpx.Request) -> str | None:
    path = request.url.path
    if request.method not in ("POST", "PUT") or path.endswith(("/coql", "/search", "/token")) or "/oauth/" in path:
        return None
    return f"{request.method} {path}"


def _odoo_connect(app: App, emu: Any, url: str) -> str:
    options = {"db": emu.db, "user": emu.login}
    connect(app, provider="odoo", name="c", base_url=url, options=options, io=ScriptIO(emu.api_key))
    return str(emu.api_key)


def _odoo_snapshot(emu: Any) -> dict[str, Any]:
    partners = {p["id"]: p for p in emu.records("res.partner")}
    contacts = sorted(str(p["email"]) for p in partners.values() if not p["is_company"] and p["email"])
    companies = sorted(str(p["website"]) for p in partners.values() if p["is_company"] and p["website"])
    leads = emu.records("crm.lead")
    deals = sorted(str(r["x_crmsync_deal_key"]) for r in leads)

    def partner_key(value: Any) -> str:
        pid = value[0] if isinstance(value, list) else value
        p = partners.get(pid)
        return str(p["email"] or p["website"]) if p else "?"

    def marker(text: Any) -> str:
        m = MARK.search(str(text or ""))
        return m.group(1) if m else "?"

    messages = [m for m in emu.records("mail.message") if MARK.search(str(m.get("body") or ""))]
    calls = sorted((marker(m["body"]), partner_key(m["res_id"])) for m in messages if m["model"] == "res.partner")
    activities = [a for a in emu.records("mail.activity") if MARK.search(str(a.get("note") or ""))]
    return {
        "contacts": contacts,
        "companies": companies,
        "deals": deals,
        "calls": calls,
        "activities": sorted((marker(a["note"]), partner_key(a["res_id"]), a["state"]) for a in activities),
        "links": sorted(
            [(str(p["email"]), partner_key(p["parent_id"])) for p in partners.values() if p.get("parent_id")]
            + [(str(r["x_crmsync_deal_key"]), partner_key(r["partner_id"])) for r in leads]
        ),
    }


def _odoo_kind(request: httpx.Request) -> str | None:
    if request.url.path.startswith("/json/2/"):
        model, method = request.url.path.split("/")[3:5]
    elif request.url.path == "/jsonrpc":
        args = json.loads(request.content)["params"]["args"]
        if len(args) < 5:
            return None
        model, method = args[3], args[4]
    else:
        return None
    return f"{model}.{method}" if method in ("create", "write", "action_done", "message_post") else None


def _hubspot_preload(emu: Any) -> None:
    emu.bulk_create("contacts", 50, properties_fn=lambda i: {"email": f"person{_existing(i)}@example.org"})


def _zoho_preload(emu: Any) -> None:
    for i in range(50):
        emu.create("Contacts", {"Last_Name": "Known", "Email": f"person{_existing(i)}@example.org"}, notify=False)


def _odoo_preload(emu: Any) -> None:
    emu.bulk_create(
        "res.partner", 50, vals_fn=lambda i: {"name": "Known", "email": f"person{_existing(i)}@example.org"}
    )


CRMS = {
    "hubspot": Crm(
        "hubspot",
        lambda faults: HubSpotEmulator(seed=3, faults=faults),
        _hubspot_connect,
        _hubspot_snapshot,
        _hubspot_kind,
        "appointmentscheduled",
        ("connected", "voicemail"),
        _hubspot_preload,
    ),
    "zoho": Crm(
        "zoho",
        lambda faults: ZohoEmulator(faults=faults),
        _zoho_connect,
        _zoho_snapshot,
        _zoho_kind,
        "Needs Analysis",
        ("interested", "no_answer"),
        _zoho_preload,
    ),
    "odoo-19": Crm(
        "odoo",
        lambda faults: OdooEmulator(version=19, faults=faults),
        _odoo_connect,
        _odoo_snapshot,
        _odoo_kind,
        "Qualified",
        ("connected", "voicemail"),
        _odoo_preload,
    ),
    "odoo-17": Crm(
        "odoo",
        lambda faults: OdooEmulator(version=17, faults=faults),
        _odoo_connect,
        _odoo_snapshot,
        _odoo_kind,
        "Qualified",
        ("connected", "voicemail"),
        _odoo_preload,
    ),
}


def _odoo_with_marker_field(version: int) -> Callable[[Faults | None], Emulator]:
    def make(faults: Faults | None) -> Emulator:
        emu = OdooEmulator(version=version, faults=faults)
        emu.add_field("mail.activity", "x_crmsync_outcome_id", "char")
        return emu

    return make


#: Databases that have the marker field: calls are looked up by it (19), or by their message (up to 18).
WITH_FIELD = {
    f"odoo-{v}-marker-field": Crm(
        "odoo",
        _odoo_with_marker_field(v),
        _odoo_connect,
        _odoo_snapshot,
        _odoo_kind,
        "Qualified",
        ("connected", "voicemail"),
    )
    for v in (17, 19)
}


def _remove_store(home: Path) -> None:
    """A new machine: nothing of the data directory is left (store, locks, config)."""
    for entry in home.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# -- 1. the CRM, not the store, says what was logged ------------------------------------------------
@pytest.mark.parametrize("which", [*CRMS, *WITH_FIELD])
@pytest.mark.slow
def test_a_push_from_a_new_store_logs_nothing_twice(which: str, home: Path, tmp_path: Path) -> None:
    crm = CRMS.get(which) or WITH_FIELD[which]
    emu = crm.make(None)
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcomes(40, stage=crm.stage, dispositions=crm.dispositions))
    with emu.serve() as server:
        app = App()
        secret = crm.connect(app, emu, server.url)
        app.close()
        first = run_cli(["--json", "push", str(src), "-c", "c"], cli_env(home, "c", secret))
        assert first.code == 0, first.stderr
        assert first.json_lines()[-1]["summary"]["created"] == 40
        before = crm.snapshot(emu)
        assert len([c for c in before["contacts"] if "person" in c]) == 40 and len(before["deals"]) == 10

        _remove_store(home)
        app = App()
        secret = crm.connect(app, emu, server.url)
        app.close()
        again = run_cli(["--json", "push", str(src), "-c", "c"], cli_env(home, "c", secret))
    assert again.code == 0, again.stderr
    lines = again.json_lines()
    summary = lines[-1]["summary"]
    assert (summary["already"], summary["created"], summary["failed"], summary["writes"]) == (40, 0, 0, 0), summary
    assert Counter(line["status"] for line in lines[:-1] if "status" in line) == {"already": 40}
    assert crm.snapshot(emu) == before  # no call, task, contact, company, deal or link more


# -- 2. a lost answer never strands an outcome ------------------------------------------------------
def _push_in_process(crm: Crm, emu: Emulator, src: Path, home: Path) -> Any:
    app = App(transport=lambda _name: emu.transport())
    try:
        crm.connect(app, emu, "http://crm.test" if crm.name != "zoho" else None)  # type: ignore[arg-type]
        return push(app, source=str(src), connection="c")
    finally:
        app.close()


@pytest.mark.parametrize("status", [0, 502], ids=["dropped", "502-after-write"])
@pytest.mark.parametrize("which", list(CRMS))
@pytest.mark.slow
def test_lost_answers_at_every_kind_of_write_end_in_one_run_exactly_once(
    which: str, status: int, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crm = CRMS[which]
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcomes(500, stage=crm.stage, dispositions=crm.dispositions))

    monkeypatch.setenv("CRMSYNC_HOME", str(home / "reference"))
    reference = crm.make(None)
    crm.preload(reference)
    clean = _push_in_process(crm, reference, src, home)
    assert (clean.created, clean.failed) == (500, 0), clean.error
    expected = crm.snapshot(reference)

    rng = random.Random(f"{which}-{status}")
    lost: Counter[str] = Counter()
    seen: set[str] = set()

    def lose(request: httpx.Request) -> bool:
        kind = crm.write_kind(request)
        if kind is None:
            return False
        if kind not in seen or rng.random() < 0.15:  # the first write of every kind, then a seeded share
            seen.add(kind)
            lost[kind] += 1
            return True
        return False

    monkeypatch.setenv("CRMSYNC_HOME", str(home / "faulty"))
    emu = crm.make(Faults(lose_reply=lose, lost_reply_status=status))
    crm.preload(emu)
    summary = _push_in_process(crm, emu, src, home)
    # Our own writes whose answers were lost end "created", not "already": found as ours.
    assert (summary.created, summary.failed, summary.pending) == (500, 0, 0), summary
    assert for_push(summary) == 0, summary.error
    assert sum(lost.values()) >= len(seen) >= 4, lost
    assert crm.snapshot(emu) == expected, lost


def test_hubspot_marker_property_whose_creation_answer_was_lost_is_found_not_assumed_missing(
    home: Path, tmp_path: Path
) -> None:
    """The field report: the property's creation answer lost, then a call batch's; every call and
    follow-up task still ends created, in one run, and none twice."""
    crm = CRMS["hubspot"]
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcomes(100, stage=crm.stage, dispositions=crm.dispositions))
    dropped: list[str] = []

    def lose(request: httpx.Request) -> bool:
        path = request.url.path
        first = path not in dropped
        if request.method == "POST" and first and path.endswith(("/properties/calls", "/calls/batch/create")):
            dropped.append(path)
            return True
        return False

    emu = crm.make(Faults(lose_reply=lose))
    summary = _push_in_process(crm, emu, src, home)
    assert dropped == ["/crm/v3/properties/calls", "/crm/v3/objects/calls/batch/create"]
    assert (summary.created, summary.failed, for_push(summary)) == (100, 0, 0), summary
    assert len(emu.records("calls")) == 100 and len(emu.records("tasks")) == 20


def test_a_plain_rerun_of_a_failed_outcome_says_failed_and_retry_failed_sends_it(home: Path, tmp_path: Path) -> None:
    crm = CRMS["hubspot"]
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcomes(3, stage=crm.stage, dispositions=crm.dispositions))
    emu = crm.make(Faults(partial_rate=1.0))  # every batch item refused: the outcomes end failed
    app = App(transport=lambda _name: emu.transport())
    try:
        crm.connect(app, emu, "http://crm.test")
        first = push(app, source=str(src), connection="c")
        assert (first.failed, for_push(first)) == (3, 1)
        emu.faults.partial_rate = 0.0
        got: list[Any] = []
        again = push(app, source=str(src), connection="c", sink=got.append)
        assert (again.failed, again.already, for_push(again)) == (3, 0, 1)  # not "already sent", not exit 0
        assert {r.status for r in got} == {"failed"} and all("--retry-failed" in (r.error or "") for r in got)
        retried = push(app, source=str(src), connection="c", retry_failed=True)
        assert (retried.created, retried.failed, for_push(retried)) == (3, 0, 0), retried
    finally:
        app.close()
    assert len(emu.records("calls")) == 3


@pytest.mark.parametrize(
    ("failure", "unconfirmed"),
    [
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), True),
        (httpx.ReadTimeout("read timed out"), True),
        (502, True),
        (500, True),
        (httpx.ConnectError("connection refused"), False),  # never reached the CRM: sent again
        (429, False),  # counted, not done: sent again
    ],
)
def test_a_write_sent_without_replay_is_never_sent_twice_after_it_may_have_arrived(
    failure: Exception | int, unconfirmed: bool
) -> None:
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        if len(sent) > 1:
            return httpx.Response(201, json={"ok": True})
        if isinstance(failure, int):
            return httpx.Response(failure, json={"message": "boom"}, headers={"Retry-After": "0"})
        raise failure

    client = HttpClient(
        provider="t",
        connection="t",
        base_url="http://crm.test",
        transport=httpx.MockTransport(answer),
        sleep=lambda _s: None,
    )
    if unconfirmed:
        with pytest.raises(UnconfirmedWrite):
            client.post("/create", json={}, replay=False)
        assert sent == ["/create"]
    else:
        assert client.post("/create", json={}, replay=False).status_code == 201
        assert sent == ["/create", "/create"]


def test_hubspot_whole_batch_conflicts_from_a_new_store_cost_one_lookup_a_batch(home: Path, tmp_path: Path) -> None:
    """HubSpot may refuse a whole batch create for the first unique value it already holds (409,
    nothing created), as reported for contacts. A push from a new store then looks each refused
    batch up once and creates nothing; it does not split batches down to single items."""
    crm = CRMS["hubspot"]
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcomes(200, stage=crm.stage, dispositions=crm.dispositions))
    emu: Any = crm.make(None)
    inner = emu.transport()
    unique = {
        "contacts": "email",
        "deals": "crmsync_deal_key",
        "calls": "crmsync_outcome_id",
        "tasks": "crmsync_outcome_id",
    }

    def whole_batch(request: httpx.Request) -> httpx.Response:
        obj = request.url.path.removeprefix("/crm/v3/objects/").removesuffix("/batch/create")
        if request.method == "POST" and obj in unique:
            for item in json.loads(request.content)["inputs"]:
                value = str(item["properties"].get(unique[obj], ""))
                held = {str(r["properties"].get(unique[obj], "")).lower(): r["id"] for r in emu.records(obj)}
                if value.lower() in held:
                    rid = held[value.lower()]
                    message = f"A {obj[:-1]} with the unique value {value!r} already exists. Existing ID: {rid}"
                    return httpx.Response(409, json={"status": "error", "message": message, "category": "CONFLICT"})
        return inner.handle_request(request)

    transport = httpx.MockTransport(whole_batch)
    for store in ("first", "second"):
        app = App(db=str(tmp_path / f"{store}.db"), transport=lambda _name: transport)
        try:
            crm.connect(app, emu, "http://crm.test")
            before = crm.snapshot(emu)
            summary = push(app, source=str(src), connection="c")
        finally:
            app.close()
        assert summary.failed == 0 and summary.created + summary.already == 200, summary
    assert (summary.already, summary.created, summary.failed) == (200, 0, 0), summary
    assert crm.snapshot(emu) == before
    assert summary.requests <= 30, summary  # a lookup per refused batch, not a split per item


def test_zoho_marker_field_without_unique_values_is_looked_up_before_creating(home: Path, tmp_path: Path) -> None:
    """An org whose crmsync_outcome_id allows duplicates: Zoho would log a call twice, so push asks
    for the markers of outcomes the store never sent before creating them."""
    import dataclasses

    crm = CRMS["zoho"]
    emu: Any = crm.make(None)
    for module in ("Calls", "Tasks"):
        specs = emu.fields_by_module[module]
        specs[:] = [dataclasses.replace(f, unique=False) if f.api_name == "crmsync_outcome_id" else f for f in specs]
        emu._unique[module].pop("crmsync_outcome_id", None)
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcomes(30, stage=crm.stage, dispositions=crm.dispositions))
    for store in ("first", "second"):
        app = App(db=str(tmp_path / f"{store}.db"), transport=lambda _name: emu.transport())
        try:
            crm.connect(app, emu, None)  # type: ignore[arg-type]
            summary = push(app, source=str(src), connection="c")
        finally:
            app.close()
    assert (summary.already, summary.created, summary.failed) == (30, 0, 0), summary
    assert len(emu.records("Calls")) == 30 and len(emu.records("Tasks")) == 6


def test_hubspot_marker_property_refused_yet_not_listed_stops_the_push_with_a_hint(home: Path, tmp_path: Path) -> None:
    """A 409 for a property the portal does not list (archived): never push on without the marker."""
    from crmsync.errors import FatalProviderError

    crm = CRMS["hubspot"]
    emu: Any = crm.make(None)
    inner = emu.transport()

    def archived(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/crm/v3/properties/calls":
            return httpx.Response(409, json={"status": "error", "message": "exists", "category": "CONFLICT"})
        return inner.handle_request(request)

    transport = httpx.MockTransport(archived)
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcomes(3, stage=crm.stage, dispositions=crm.dispositions))
    app = App(transport=lambda _name: transport)
    try:
        crm.connect(app, emu, "http://crm.test")
        with pytest.raises(FatalProviderError, match="archived"):
            push(app, source=str(src), connection="c")
    finally:
        app.close()
    assert emu.records("calls") == []
