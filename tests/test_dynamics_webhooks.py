"""Dataverse webhooks through the receiver: the connection's key (constant time, before the body is read),
RemoteExecutionContext bodies stored once by their OperationId, and the pull that applies them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from crmsync.app import App
from crmsync.emulators.dynamics import DynamicsEmulator
from crmsync.errors import UsageError
from crmsync.store.events import list_events
from crmsync.sync.connect import connect
from crmsync.sync.pull import pull
from crmsync.webhooks import WebhookReceiver
from crmsync.webhooks.subscriptions import store_secret
from tests.e2e import ScriptIO

KEY = "0123456789abcdef0123456789abcdef"


def _body(entity_id: str, message: str = "Update", operation: str = "9f1d6a3e-0000-4000-8000-000000000001") -> bytes:
    """A RemoteExecutionContext as a Dataverse service endpoint posts it (JSON, WCF dates)."""
    return json.dumps(
        {
            "MessageName": message,
            "PrimaryEntityName": "contact",
            "PrimaryEntityId": entity_id,
            "OperationId": operation,
            "OperationCreatedOn": "/Date(1765090000000)/",
            "Depth": 1,
            "InputParameters": [
                {
                    "key": "Target",
                    "value": {
                        "__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts",
                        "Attributes": [{"key": "lastname", "value": "Changed"}],
                        "Id": entity_id,
                        "LogicalName": "contact",
                    },
                }
            ],
        }
    ).encode()


@pytest.fixture
def wired(tmp_path: Path):  # type: ignore[no-untyped-def]
    emulator = DynamicsEmulator()
    app = App(db=str(tmp_path / "dy.db"), transport=lambda _: emulator.transport())
    connect(
        app,
        provider="dynamics",
        name="dy",
        base_url="https://contoso.crm4.dynamics.com",
        options={"tenant": emulator.tenant, "client_id": emulator.client_id},
        io=ScriptIO(emulator.client_secret),
    )
    receiver = WebhookReceiver(app, host="127.0.0.1", port=0).start()
    receiver.secrets.reload_after = 0
    try:
        yield emulator, app, receiver
    finally:
        receiver.stop()
        app.close()


def test_a_short_key_is_refused_in_one_line(wired) -> None:  # type: ignore[no-untyped-def]
    _, app, _ = wired
    with pytest.raises(UsageError, match="at least 16"):
        store_secret(app, "dy", "short")


def test_key_checked_events_stored_once_and_the_pull_applies_them(wired) -> None:  # type: ignore[no-untyped-def]
    emulator, app, receiver = wired
    store_secret(app, "dy", KEY)
    contact = emulator.create("contacts", {"firstname": "Ann", "lastname": "Old", "emailaddress1": "ann@x.org"})
    cid = str(contact["contactid"])
    assert pull(app, connections=["dy"], objects=["contacts"])[0].outcome == "ok"
    hook = f"{receiver.url}/hooks/dynamics/dy"
    with httpx.Client(timeout=10) as http:
        assert http.post(hook, content=_body(cid)).status_code == 401  # no key
        assert http.post(hook, params={"code": KEY[:-1] + "x"}, content=_body(cid)).status_code == 401
        assert http.post(hook, headers={"x-crmsync-key": "nope" * 5}, content=_body(cid)).status_code == 401
        first = http.post(hook, params={"code": KEY}, content=_body(cid))
        assert first.status_code == 200 and first.json() == {"stored": 1, "duplicates": 0}
        again = http.post(hook, params={"code": KEY}, content=_body(cid))  # Dataverse retried the delivery
        assert again.json() == {"stored": 0, "duplicates": 1}
        by_header = http.post(hook, headers={"x-crmsync-key": KEY}, content=_body(cid, operation="op-2"))
        assert by_header.json() == {"stored": 1, "duplicates": 0}
        assert http.post(hook, params={"code": KEY}, content=b'{"MessageName": 1}').status_code == 400
        assert http.post(hook, params={"code": KEY}, content=b"[" * 100 + b"]" * 100).status_code == 400
    assert len(list_events(app.store, connection="dy")) == 2
    emulator.update("contacts", cid, {"lastname": "Changed"})
    assert pull(app, connections=["dy"], objects=["contacts"])[0].outcome == "ok"
    (record,) = [r for r in app.store.mirror.records("dy", "contacts") if r.remote_id == cid]
    assert "Changed" in record.properties.values(), record.properties
