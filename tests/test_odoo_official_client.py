"""odoorpc, the client Odoo integrators use, drives the Odoo emulator on loopback.

It asks ``/web/webclient/version_info`` first, logs in with ``common.login``, reads its context
with ``execute``, builds each model from ``fields_get`` and calls everything else with
``execute_kw``. Any exception it raises fails the test: that is what an integrator would meet.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date

import odoorpc
import pytest

from crmsync.emulators.odoo import OdooEmulator


@pytest.fixture(params=[17, 19])
def odoo(request: pytest.FixtureRequest) -> Iterator[tuple[OdooEmulator, odoorpc.ODOO]]:
    emu = OdooEmulator(version=request.param, db="acme", login="admin")
    server = emu.serve()
    try:
        host, port = server.url.removeprefix("http://").rstrip("/").split(":")
        client = odoorpc.ODOO(host, protocol="jsonrpc", port=int(port), timeout=10)
        client.login("acme", "admin", emu.api_key)
        yield emu, client
    finally:
        server.stop()


def test_version_login_and_context(odoo: tuple[OdooEmulator, odoorpc.ODOO]) -> None:
    emu, client = odoo
    assert client.version == f"{emu.version}.0"
    assert client.env.uid == emu.uid
    assert client.env.user.login == "admin"
    assert "res.partner" in client.env and "no.such.model" not in client.env
    assert client.db.list() == ["acme"]


def test_search_read_create_write_and_browse(odoo: tuple[OdooEmulator, odoorpc.ODOO]) -> None:
    _, client = odoo
    Partner = client.env["res.partner"]
    company = Partner.create({"name": "Analytical Engines", "is_company": True, "website": "https://ae.example"})
    ada = Partner.create({"name": "Ada Lovelace", "email": "ada@ae.example", "parent_id": company})
    assert isinstance(ada, int)
    Partner.write([ada], {"phone": "+44 20 7946 0958"})
    rows = Partner.search_read([("email", "=ilike", "ADA@ae.example")], ["name", "phone", "parent_id"])
    assert [(r["name"], r["phone"], r["parent_id"][0]) for r in rows] == [("Ada Lovelace", "+44 20 7946 0958", company)]
    record = Partner.browse(ada)
    assert record.parent_id.id == company and record.parent_id.name == "Analytical Engines"
    record.function = "CTO"  # odoorpc writes an assigned field at once
    assert Partner.read([ada], ["function"])[0]["function"] == "CTO"
    assert Partner.search_count([("is_company", "=", True), ("id", "=", company)]) == 1
    lead = client.env["crm.lead"].create({"name": "AE 2027", "partner_id": ada, "expected_revenue": 12000})
    assert client.env["crm.lead"].browse(lead).partner_id.id == ada


def test_activities_create_and_feedback(odoo: tuple[OdooEmulator, odoorpc.ODOO]) -> None:
    emu, client = odoo
    partner = client.env["res.partner"].create({"name": "Grace Hopper"})
    [model_id] = client.env["ir.model"].search([("model", "=", "res.partner")])
    call_type = client.env.ref("mail.mail_activity_data_call").id
    Activity = client.env["mail.activity"]
    activity = Activity.create(
        {
            "res_model_id": model_id,
            "res_id": partner,
            "activity_type_id": call_type,
            "summary": "Intro call",
            "note": "Talked about COBOL & <b>compilers</b>",
            "user_id": emu.uid,
            "date_deadline": date.today().isoformat(),
        }
    )
    [row] = Activity.read([activity], ["user_id", "note", "state"])
    assert row["user_id"][0] == emu.uid and row["note"].startswith("<p>")
    message_id = Activity.browse(activity).action_feedback(feedback="Wants a demo")
    assert isinstance(message_id, int)
    [message] = client.env["mail.message"].read([message_id], ["body", "mail_activity_type_id", "res_id"])
    assert message["res_id"] == partner and message["mail_activity_type_id"][0] == call_type
    assert "Wants a demo" in message["body"] and "Intro call" in message["body"]
