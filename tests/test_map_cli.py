"""`crmsync map …` end to end: the real CLI entry point against the HubSpot emulator on loopback."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync import cli
from crmsync.app import App
from crmsync.emulators.hubspot import HubSpotEmulator, build_hubspot
from crmsync.errors import FatalProviderError
from crmsync.mapping import Mapping
from crmsync.oauth import StaticIO
from crmsync.providers.base import FieldInfo
from crmsync.providers.hubspot import HubSpotProvider
from crmsync.sync.connect import connect

CONN = "hs"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run ``crmsync ARGS`` through ``cli.main`` (where errors become exit codes); capture the result."""

    def invoke(*args: str) -> Run:
        monkeypatch.setattr(sys, "argv", ["crmsync", *args])
        monkeypatch.setenv("COLUMNS", "120")  # tables laid out wide enough not to wrap the asserted text
        cli.STATE._app = None  # a fresh App per command, as in a real process
        code = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            if cli.STATE._app is not None:
                cli.STATE._app.close()
            cli.STATE._app = None
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def hubspot() -> Iterator[tuple[HubSpotEmulator, str]]:
    emulator = build_hubspot(seed=3, contacts=6, companies=2, deals=2)
    server = emulator.serve()
    try:
        yield emulator, server.url
    finally:
        server.stop()


@pytest.fixture
def conn(hubspot: tuple[HubSpotEmulator, str]) -> str:
    """A HubSpot connection named ``hs`` in this test's CRMSYNC_HOME (shared with the CLI)."""
    emulator, url = hubspot
    app = App()
    try:
        connect(app, provider="hubspot", name=CONN, base_url=url, options={}, io=StaticIO(emulator.private_app_token))
    finally:
        app.close()
    return CONN


def mapping_file(home: Path) -> Path:
    return home / "mappings" / f"{CONN}.yaml"


def add_property(hubspot: tuple[HubSpotEmulator, str], obj: str, body: dict[str, Any]) -> None:
    """Create a custom property the way a portal admin's integration would (the public API)."""
    emulator, url = hubspot
    r = httpx.post(
        f"{url}/crm/v3/properties/{obj}",
        json=body,
        headers={"Authorization": f"Bearer {emulator.private_app_token}"},
        timeout=10,
    )
    assert r.status_code == 201, r.text


def editor(tmp_path: Path, body: str) -> str:
    """An $EDITOR command: a Python script that runs ``body`` with ``path`` the file to edit."""
    script = tmp_path / "fake_editor.py"
    script.write_text("import sys\nfrom pathlib import Path\npath = Path(sys.argv[1])\n" + body)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


# -- path / init ---------------------------------------------------------------------------------
def test_path_then_init_writes_the_default_and_refuses_to_overwrite(run: Any, conn: str, home: Path) -> None:
    target = mapping_file(home)
    r = run("map", "path", "-c", conn)
    assert r.code == 0
    assert r.out.strip() == str(target)
    assert "does not exist yet" in r.err
    assert run("--json", "map", "path").json() == {
        "connection": conn,
        "provider": "hubspot",
        "path": str(target),
        "exists": False,
    }

    r = run("map", "init", "-c", conn)
    assert r.code == 0, r.err
    assert target.read_text() == Mapping.default_text("hubspot")

    target.write_text(target.read_text() + "# my edit\n")
    r = run("map", "init", "-c", conn)
    assert r.code == 2
    assert "already exists" in r.err and "--force" in r.err
    assert target.read_text().endswith("# my edit\n")

    r = run("--json", "map", "init", "-c", conn, "--force")
    assert r.code == 0
    assert r.json()["exists"] is True
    assert target.read_text() == Mapping.default_text("hubspot")
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp files left


def test_map_needs_a_connection(run: Any) -> None:
    r = run("map", "show")
    assert r.code == 3
    assert "crmsync connect" in r.err


# -- show ----------------------------------------------------------------------------------------
def test_show_lists_rules_as_a_table_or_json(run: Any, conn: str) -> None:
    r = run("map", "show", "-c", conn)
    assert r.code == 0
    assert "built-in hubspot default" in r.out
    assert "canonical field" in r.out and "CRM field" in r.out
    assert "hs_call_disposition" in r.out and "jobtitle" in r.out

    r = run("--json", "map", "show", "-c", conn, "--object", "contact")
    doc = r.json()
    assert doc["source"] == "default"
    assert {row["object"] for row in doc["rules"]} == {"contacts"}
    email = next(row for row in doc["rules"] if row["canonical"] == "email")
    assert email == {
        "object": "contacts",
        "canonical": "email",
        "field": "email",
        "transform": "[strip, lower]",
        "direction": "both",
    }

    r = run("map", "show", "-c", conn, "--object", "invoice")
    assert r.code == 2
    assert "unknown object" in r.err


# -- set / unset ---------------------------------------------------------------------------------
def test_set_starts_from_the_default_and_keeps_the_rest(run: Any, conn: str, home: Path) -> None:
    target = mapping_file(home)
    r = run("map", "set", "contact.phone=mobilephone", "--transform", "e164", "-c", conn)
    assert r.code == 0, r.err
    assert "contact.phone -> mobilephone" in r.out
    text = target.read_text()
    assert "phone: {field: mobilephone, transform: e164}" in text
    assert "# crmsync field mapping for HubSpot" in text  # the default's comments are kept
    mapping = Mapping.load("hubspot", target)
    assert mapping.field_for("contacts", "phone") == "mobilephone"
    assert mapping.field_for("calls", "disposition") == "hs_call_disposition"

    # Chained transforms, a direction, a custom field
    r = run(
        "--json",
        "map",
        "set",
        "call.custom.reason=call_reason",
        "-t",
        "strip",
        "-t",
        "lower",
        "--direction",
        "push",
        "-c",
        conn,
    )
    assert r.code == 0, r.err
    assert r.json()["rule"] == {
        "object": "calls",
        "canonical": "custom.reason",
        "field": "call_reason",
        "transform": "[strip, lower]",
        "direction": "push",
    }
    # --no-transform drops it and keeps the direction
    r = run("--json", "map", "set", "call.custom.reason=call_reason", "--no-transform", "-c", conn)
    assert r.json()["rule"]["transform"] == "" and r.json()["rule"]["direction"] == "push"


def test_set_refuses_an_invalid_rule_and_leaves_the_file(run: Any, conn: str, home: Path) -> None:
    target = mapping_file(home)
    assert run("map", "init", "-c", conn).code == 0
    before = target.read_text()
    cases = [
        (["contact.phone=mobilephone", "--transform", "e165"], "unknown transform 'e165' (did you mean e164?)"),
        (["contact.fone=mobilephone"], "unknown canonical field"),
        (["contact.first_name={x}"], None),  # any CRM name is allowed: map check judges it
        (
            ["call.title=hs_call_title", "--transform", "{template: '{notes}'}", "--direction", "pull"],
            "cannot be undone on pull",
        ),
        (["contact.phone"], "expected OBJECT.FIELD=CRM_FIELD"),
        (["contact.phone=mobilephone", "--direction", "sideways"], "--direction"),
    ]
    for args, message in cases:
        r = run("map", "set", *args, "-c", conn)
        if message is None:
            assert r.code == 0, r.err
            target.write_text(before)
            continue
        assert r.code == 2, (args, r.out)
        assert message in r.err, r.err
        assert target.read_text() == before


def test_unset_removes_one_rule(run: Any, conn: str, home: Path) -> None:
    r = run("map", "unset", "contact.title", "-c", conn)
    assert r.code == 0, r.err
    mapping = Mapping.load("hubspot", mapping_file(home))
    assert mapping.field_for("contacts", "title") is None
    assert mapping.field_for("contacts", "email") == "email"
    r = run("map", "unset", "contact.title", "-c", conn)
    assert r.code == 2
    assert "no rule for contact.title" in r.err


# -- edit ----------------------------------------------------------------------------------------
def test_edit_saves_a_valid_edit(
    run: Any, conn: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv(
        "EDITOR", editor(tmp_path, "path.write_text(path.read_text().replace('title: jobtitle', 'title: hs_title'))\n")
    )
    r = run("map", "edit", "-c", conn)  # no file yet: the edit starts from the default
    assert r.code == 0, r.err
    assert "saved" in r.out
    assert Mapping.load("hubspot", mapping_file(home)).field_for("contacts", "title") == "hs_title"

    monkeypatch.setenv("EDITOR", "true")
    r = run("--json", "map", "edit", "-c", conn)
    assert r.json()["changed"] is False


def test_edit_keeps_the_old_file_when_the_edit_is_invalid(
    run: Any, conn: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = mapping_file(home)
    assert run("map", "init", "-c", conn).code == 0
    before = target.read_text()
    bad = (
        "version: 1\ncontact:\n"
        "  email: {field: email, transform: lowr}\n"
        "  phone: {field: phone, transform: e164, x: 1}\n"
    )
    monkeypatch.setenv("VISUAL", editor(tmp_path, f"path.write_text({bad!r})\n"))
    r = run("map", "edit", "-c", conn)
    assert r.code == 2
    assert target.read_text() == before
    assert "was not changed" in r.err
    assert "contact.email.transform: unknown transform 'lowr' (did you mean lower?)" in r.err
    assert "unknown key(s) x" in r.err  # every problem, not just the first
    kept = Path(r.err.split("your edit is kept in ")[1].split(")")[0])
    assert kept.read_text() == bad
    kept.unlink()

    monkeypatch.setenv("VISUAL", editor(tmp_path, "raise SystemExit(1)\n"))
    r = run("map", "edit", "-c", conn)
    assert r.code == 2
    assert "exited with status 1" in r.err
    assert target.read_text() == before


# -- check ---------------------------------------------------------------------------------------
def test_check_passes_on_the_hubspot_default(run: Any, conn: str) -> None:
    r = run("map", "check", "-c", conn)
    assert r.code == 0, r.out + r.err
    assert "mapping OK" in r.out
    doc = run("--json", "map", "check", "-c", conn).json()
    assert doc["ok"] is True and doc["problems"] == []
    assert set(doc["objects"]) == {"contacts", "companies", "deals", "calls", "tasks"}
    # crmsync's own idempotency properties appear on the first push: reported, not failed
    assert {(p["object"], p["field"]) for p in doc["notes"]} == {
        ("deals", "crmsync_deal_key"),
        ("calls", "crmsync_outcome_id"),
        ("tasks", "crmsync_outcome_id"),
    }
    assert {p["kind"] for p in doc["notes"]} == {"created_on_push"}


def test_check_accepts_a_custom_property(run: Any, conn: str, hubspot: tuple[HubSpotEmulator, str]) -> None:
    add_property(
        hubspot,
        "calls",
        {
            "name": "call_reason",
            "label": "Call reason",
            "type": "enumeration",
            "fieldType": "select",
            "groupName": "call",
            "options": [{"label": "Pricing", "value": "pricing"}, {"label": "Support", "value": "support"}],
        },
    )
    assert (
        run(
            "map",
            "set",
            "call.custom.reason=call_reason",
            "-c",
            conn,
            "-t",
            "{value_map: {price: pricing, help: support}}",
        ).code
        == 0
    )
    r = run("map", "check", "-c", conn)
    assert r.code == 0, r.out


BROKEN = """\
version: 1
contact:
  email: {field: email, transform: [strip, lower]}
  phone: mobile_phone
  title: hs_email_domain
  first_name: associatedcompanyid
  last_name: lastname
call:
  outcome_id: crmsync_outcome_id
  title: hs_call_title
  direction: {field: hs_call_direction, transform: {value_map: {inbound: INBOUND, outbound: OUT}}}
  custom.reason: {field: call_reason, transform: {value_map: {price: pricing, bug: bugfix}}}
  duration_seconds: {field: hs_call_duration, transform: [{scale: 1000}, string]}
"""


@pytest.fixture
def required_timestamp() -> None:
    """HubSpot's property list has no required flag; the provider marks ``hs_timestamp`` on
    calls and tasks as required itself (the objects API requires it), so nothing to patch."""


def test_check_reports_every_kind_of_problem_in_one_run(
    run: Any, conn: str, home: Path, hubspot: tuple[HubSpotEmulator, str], required_timestamp: None
) -> None:
    add_property(
        hubspot,
        "calls",
        {
            "name": "call_reason",
            "label": "Call reason",
            "type": "enumeration",
            "fieldType": "select",
            "groupName": "call",
            "options": [{"label": "Pricing", "value": "pricing"}],
        },
    )
    target = mapping_file(home)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(BROKEN)

    r = run("map", "check", "-c", conn)
    assert r.code == 1, r.out + r.err
    lines = r.out.splitlines()
    expected = {
        f"{target}:4: contact.phone -> mobile_phone: hubspot contacts has no field 'mobile_phone' "
        "(did you mean mobilephone?) [unknown_field]",
        f"{target}:5: contact.title -> hs_email_domain: hs_email_domain is read-only in hubspot: "
        "use `direction: pull` [read_only]",
        f"{target}:6: contact.first_name -> associatedcompanyid: first_name gives a string but "
        "associatedcompanyid is a number field [type_mismatch]",
        f"{target}:11: call.direction -> hs_call_direction: OUT not among the options of hs_call_direction "
        "[not_an_option]",
        f"{target}:12: call.custom.reason -> call_reason: bugfix not among the options of call_reason [not_an_option]",
        f"{target}: call: hs_timestamp is required by hubspot but no rule pushes to it [required_unmapped]",
        f"{target}: task: hs_timestamp is required by hubspot but no rule pushes to it [required_unmapped]",
    }
    assert expected <= set(lines), "\n".join(lines)
    assert lines[-1].startswith("7 problems (hs, hubspot; checked contacts, companies, deals, calls, tasks)")

    doc = run("--json", "map", "check", "-c", conn).json()
    assert doc["ok"] is False
    assert sorted((p["kind"], p["field"]) for p in doc["problems"]) == [
        ("not_an_option", "call_reason"),
        ("not_an_option", "hs_call_direction"),
        ("read_only", "hs_email_domain"),
        ("required_unmapped", "hs_timestamp"),
        ("required_unmapped", "hs_timestamp"),
        ("type_mismatch", "associatedcompanyid"),
        ("unknown_field", "mobile_phone"),
    ]
    assert {"object", "section", "canonical", "field", "kind", "message", "line"} <= set(doc["problems"][0])


def test_a_required_field_the_provider_fills_itself_is_a_note(
    run: Any, conn: str, monkeypatch: pytest.MonkeyPatch, required_timestamp: None
) -> None:
    assert run("map", "unset", "call.occurred_at", "-c", conn).code == 0
    r = run("--json", "map", "check", "-c", conn)
    assert r.code == 1
    assert [(p["kind"], p["field"]) for p in r.json()["problems"]] == [("required_unmapped", "hs_timestamp")]

    def managed_fields(self: HubSpotProvider, obj: str) -> set[str]:
        return {"hs_timestamp"} if obj == "calls" else set()

    monkeypatch.setattr(HubSpotProvider, "managed_fields", managed_fields)
    r = run("--json", "map", "check", "-c", conn)
    assert r.code == 0, r.out
    assert ("set_by_provider", "hs_timestamp") in {(p["kind"], p["field"]) for p in r.json()["notes"]}


def test_check_reports_an_object_whose_fields_cannot_be_listed(
    run: Any, conn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = HubSpotProvider.fields

    def fields(self: HubSpotProvider, obj: str) -> list[FieldInfo]:
        if obj == "tasks":
            raise FatalProviderError("this account has no tasks object", status=404)
        return original(self, obj)

    monkeypatch.setattr(HubSpotProvider, "fields", fields)
    r = run("--json", "map", "check", "-c", conn)
    assert r.code == 1
    doc = r.json()
    assert [(p["object"], p["kind"]) for p in doc["problems"]] == [("tasks", "unsupported_object")]
    assert "no tasks object" in doc["problems"][0]["message"]
    assert doc["objects"] == ["contacts", "companies", "deals", "calls"]


def test_check_of_an_invalid_file_is_a_mapping_error(run: Any, conn: str, home: Path) -> None:
    target = mapping_file(home)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("version: 1\ncontact:\n  emial: email\n")
    r = run("map", "check", "-c", conn)
    assert r.code == 2
    assert f"{target}:3: contact.emial: unknown canonical field (did you mean email?)" in r.err


# -- preview -------------------------------------------------------------------------------------
OUTCOMES = [
    {
        "id": "o-1",
        "occurred_at": "2026-03-02T10:15:00+01:00",
        "contact": {
            "email": " Ada@Example.com ",
            "first_name": "Ada",
            "last_name": "Lovelace",
            "phone": "+44 20 7946 0018",
        },
        "disposition": "connected",
        "direction": "inbound",
        "duration_seconds": 42,
        "notes": "Asked for pricing",
        "company": {"name": "Engines Ltd", "domain": "engines.example"},
        "deal": {
            "name": "Engines expansion",
            "stage": "appointmentscheduled",
            "amount": 1500,
            "currency": "EUR",
            "close_date": "2026-06-30",
        },
        "next_step": {"type": "email", "due_at": "2026-03-05T09:00:00+01:00"},
    },
    {
        "id": "o-2",
        "occurred_at": "2026-03-02T11:00:00Z",
        "contact": {"email": "grace@example.com"},
        "disposition": "interested",
        "duration_seconds": 5,
    },
]


def write_outcomes(path: Path, extra: Sequence[str] = ()) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in OUTCOMES) + "".join(line + "\n" for line in extra))
    return path


def test_preview_shows_the_payload_per_object(run: Any, conn: str, tmp_path: Path) -> None:
    source = write_outcomes(tmp_path / "outcomes.jsonl", ['{"id": "o-3", "contact": {}}'])
    r = run("--json", "map", "preview", str(source), "-c", conn, "--limit", "10")
    assert r.code == 1  # one invalid record
    first, second, bad = r.lines()
    assert first["id"] == "o-1" and first["line"] == 1
    p = first["payloads"]
    assert p["contacts"] == {
        "email": "ada@example.com",
        "firstname": "Ada",
        "lastname": "Lovelace",
        "phone": "+442079460018",
    }
    assert p["companies"] == {"name": "Engines Ltd", "domain": "engines.example"}
    assert p["deals"]["amount"] == "1500" and p["deals"]["closedate"] == "2026-06-30"
    assert p["deals"]["deal_currency_code"] == "EUR" and p["deals"]["crmsync_deal_key"]
    assert p["calls"]["hs_timestamp"] == "2026-03-02T09:15:00.000+00:00"
    assert p["calls"]["hs_call_duration"] == "42000"
    assert p["calls"]["hs_call_disposition"] == "f240bbac-87c9-4f6e-bf70-924b57d47db7"
    assert p["calls"]["hs_call_direction"] == "INBOUND"
    assert p["calls"]["hs_call_status"] == "COMPLETED"
    assert p["tasks"]["hs_task_type"] == "EMAIL" and p["tasks"]["hs_timestamp"] == "2026-03-05T08:00:00.000+00:00"
    assert "hs_call_disposition" not in second["payloads"]["calls"]  # no HubSpot outcome for "interested"
    assert bad["line"] == 3 and "occurred_at" in bad["error"]

    r = run("map", "preview", str(source), "-c", conn, "--limit", "1")
    assert r.code == 0
    assert "line 1: outcome o-1" in r.out
    assert '"42000"' in r.out and "hs_call_duration" in r.out
    assert "o-2" not in r.out


def test_preview_matches_what_push_sends(run: Any, conn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: dict[str, list[dict[str, Any]]] = {}
    upsert, create = HubSpotProvider.upsert, HubSpotProvider.create_activities

    def spy_upsert(self: HubSpotProvider, obj: str, items: Any) -> Any:
        sent.setdefault(obj, []).extend(dict(i.properties) for i in items)
        return upsert(self, obj, items)

    def spy_create(self: HubSpotProvider, obj: str, items: Any) -> Any:
        sent.setdefault(obj, []).extend(dict(i.properties) for i in items)
        return create(self, obj, items)

    monkeypatch.setattr(HubSpotProvider, "upsert", spy_upsert)
    monkeypatch.setattr(HubSpotProvider, "create_activities", spy_create)
    source = write_outcomes(tmp_path / "outcomes.jsonl")
    preview = run("--json", "map", "preview", str(source), "-c", conn).lines()
    r = run("push", str(source), "-c", conn)
    assert r.code == 0, r.out + r.err
    # The owner is the one field push resolves against the CRM (its users), which preview does not ask.
    unowned = lambda props: json.dumps({k: v for k, v in props.items() if k != "hubspot_owner_id"})  # noqa: E731
    for obj in ("contacts", "companies", "deals", "calls", "tasks"):
        expected = [item["payloads"][obj] for item in preview if obj in item["payloads"]]
        assert sorted(map(unowned, sent[obj])) == sorted(map(unowned, expected)), obj


def test_preview_of_a_pulled_record(run: Any, conn: str, home: Path) -> None:
    assert run("pull", "-c", conn, "--object", "contacts").code == 0
    from sqlmodel import select

    from crmsync.store import CrmRecord

    app = App()
    try:
        with app.store.session() as s:
            record = s.exec(select(CrmRecord).where(CrmRecord.object == "contacts")).first()
    finally:
        app.close()
    assert record is not None

    r = run("--json", "map", "preview", "--pulled", f"contact:{record.remote_id}", "-c", conn)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["canonical"] == record.properties and doc["raw"] == record.raw
    assert doc["stale"] is False
    row = next(x for x in doc["rows"] if x["canonical"] == "email")
    assert row["field"] == "email" and row["raw"] == record.raw["email"] and row["value"] == record.properties["email"]

    r = run("map", "preview", "--pulled", f"contact:{record.remote_id}", "-c", conn)
    assert "canonical field" in r.out and "raw CRM value" in r.out and "firstname" in r.out
    assert "mapped now" not in r.out

    # After a mapping change the view shows what the next pull would store
    assert run("map", "unset", "contact.last_name", "-c", conn).code == 0
    doc = run("--json", "map", "preview", "--pulled", f"contacts:{record.remote_id}", "-c", conn).json()
    assert doc["stale"] is True
    assert {
        "canonical": None,
        "value": None,
        "field": "lastname",
        "raw": record.raw["lastname"],
        "current": None,
    } in doc["rows"]
    r = run("map", "preview", "--pulled", f"contact:{record.remote_id}", "-c", conn)
    assert "mapped now" in r.out and "differs from 'stored'" in r.out


def test_preview_usage_errors(run: Any, conn: str, tmp_path: Path) -> None:
    assert run("map", "preview", "-c", conn).code == 2
    source = write_outcomes(tmp_path / "o.jsonl")
    assert run("map", "preview", str(source), "--pulled", "contact:1", "-c", conn).code == 2
    r = run("map", "preview", "--pulled", "contact:nope", "-c", conn)
    assert r.code == 2 and "no stored contacts record" in r.err
    r = run("map", "preview", "--pulled", "contact", "-c", conn)
    assert r.code == 2 and "OBJECT:ID" in r.err


def test_every_map_command_has_help_with_an_example(run: Any) -> None:
    for name in ("path", "init", "show", "set", "unset", "edit", "check", "preview"):
        r = run("map", name, "--help")
        assert r.code == 0, name
        assert "Example:" in r.out, name


# -- the other providers' defaults -----------------------------------------------------------------
@pytest.mark.parametrize("version", [17, 19])
def test_check_passes_on_the_odoo_default(run: Any, version: int) -> None:
    from crmsync.emulators.odoo import build_odoo

    emulator = build_odoo(seed=1, partners=3, companies=1, leads=1, version=version)
    server = emulator.serve()
    try:
        app = App()
        try:
            connect(
                app,
                provider="odoo",
                name="od",
                base_url=server.url,
                options={"user": emulator.login},
                io=StaticIO(emulator.api_key),
            )
        finally:
            app.close()
        r = run("--json", "map", "check", "-c", "od")
        assert r.code == 0, r.out + r.err
        # Up to 18 mail.activity requires res_model_id: the provider fills it from the call's links. On 19
        # it is optional (recordings/odoo19/json2_fields_get_mail_activity.json), so nothing needs saying.
        notes = {(n["object"], n["kind"], n["field"]) for n in r.json()["notes"]}
        assert (("calls", "set_by_provider", "res_model_id") in notes) == (version < 19)
    finally:
        server.stop()


@pytest.fixture
def zoho() -> Iterator[str]:
    """A Zoho connection ``zc`` (Self Client grant code) against the Zoho emulator on loopback."""
    from crmsync.emulators.zoho import ZohoEmulator

    emulator = ZohoEmulator(contacts=3)
    with emulator.serve() as server:
        app = App()
        try:
            options = {"client_id": emulator.client_id, "grant_code": emulator.grant_code()}
            connect(
                app,
                provider="zoho",
                name="zc",
                base_url=server.url,
                options=options,
                io=StaticIO(emulator.client_secret),
            )
        finally:
            app.close()
        yield "zc"


def test_check_passes_on_the_zoho_default_and_finds_a_required_field(run: Any, zoho: str) -> None:
    r = run("map", "check", "-c", zoho)
    assert r.code == 0, r.out + r.err
    assert "mapping OK" in r.out

    # Zoho marks Last_Name mandatory: a mapping that no longer writes it cannot create contacts
    assert run("map", "unset", "contact.last_name", "-c", zoho).code == 0
    r = run("--json", "map", "check", "-c", zoho)
    assert r.code == 1
    assert [(p["object"], p["kind"], p["field"]) for p in r.json()["problems"]] == [
        ("contacts", "required_unmapped", "Last_Name")
    ]


def test_check_against_zoho_reports_every_kind_in_one_run(run: Any, zoho: str) -> None:
    """No test double: Zoho's field metadata carries read-only, mandatory and picklist flags."""
    for args in (
        ("set", "contact.phone=Mobile_Phone"),
        ("set", "contact.title=Full_Name"),
        ("set", "contact.first_name=Date_of_Birth"),
        ("unset", "contact.last_name"),
        ("set", "call.direction=Call_Type", "-t", "{value_map: {inbound: Inbound, outbound: Outgoing}}"),
    ):
        assert run("map", *args, "-c", zoho).code == 0, args

    r = run("map", "check", "-c", zoho)
    assert r.code == 1, r.out + r.err
    assert r.out.splitlines()[-1].startswith("5 problems (zc, zoho;")
    doc = run("--json", "map", "check", "-c", zoho).json()
    assert doc["ok"] is False
    assert sorted((p["kind"], p["field"]) for p in doc["problems"]) == [
        ("not_an_option", "Call_Type"),
        ("read_only", "Full_Name"),
        ("required_unmapped", "Last_Name"),
        ("type_mismatch", "Date_of_Birth"),
        ("unknown_field", "Mobile_Phone"),
    ]
    assert all(p["line"] > 0 for p in doc["problems"] if p["kind"] != "required_unmapped")
