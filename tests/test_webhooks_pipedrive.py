"""Pipedrive webhooks end to end: `webhook subscribe` -> emulator deliveries (Basic auth) -> stored once -> pull."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from crmsync.app import App
from crmsync.emulators.pipedrive import PipedriveEmulator, build_pipedrive
from crmsync.providers.capabilities import VerificationFailed
from crmsync.providers.pipedrive.webhook import PASSWORD_KEY, USER_KEY, PipedriveWebhooks, check_basic, parse_event
from crmsync.store import CrmConnection
from crmsync.store.events import list_events
from crmsync.sync.connect import connect
from crmsync.sync.pull import pull
from crmsync.webhooks import WebhookReceiver
from tests.e2e import ScriptIO

HOOK = "/hooks/pipedrive/pd"


def _cli(monkeypatch: pytest.MonkeyPatch, db: str, *args: str) -> tuple[int, str]:
    from crmsync import cli

    monkeypatch.setattr(cli.STATE, "_app", None)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(cli.app, ["--db", db, *args])
    finally:  # the CLI logs to the runner's stream, which closes: the receiver thread logs on
        root.handlers[:], root.level = handlers, level
    return result.exit_code, result.output


@pytest.fixture
def emulator() -> Iterator[PipedriveEmulator]:
    emu = build_pipedrive(seed=5, contacts=4, companies=1, deals=1)
    emu.webhook_retry_scale = 0.01  # Pipedrive retries after 3, 30 and 150 s; here a hundredth of that
    yield emu


def test_subscribe_deliver_store_once_and_pull(
    tmp_path: Path, emulator: PipedriveEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = emulator.serve()
    db = str(tmp_path / "pd.db")
    app = App(db=db)
    connect(app, provider="pipedrive", name="pd", base_url=server.url, options={}, io=ScriptIO(emulator.api_token))
    receiver = WebhookReceiver(app, host="127.0.0.1", port=0).start()
    receiver.secrets.reload_after = 0  # credentials stored after start are read at the first delivery
    api = httpx.Client(base_url=server.url, headers={"x-api-token": emulator.api_token})
    try:
        pull(app, connections=["pd"])
        code, out = _cli(monkeypatch, db, "--json", "webhook", "subscribe", "-c", "pd", "--public-url", receiver.url)
        assert code == 0, out
        doc = json.loads(out)
        assert doc["notify_url"] == receiver.url + HOOK and len(doc["webhooks"]) == 4
        stored = app.secrets.get("pd") or {}
        user, password = stored[USER_KEY], stored[PASSWORD_KEY]
        assert password not in out
        hooks = list(emulator.webhooks.values())
        assert {h["event_object"] for h in hooks} == {"person", "organization", "deal", "activity"}
        assert all(
            (h["subscription_url"], h["version"], h["event_action"], h["http_auth_user"], h["http_auth_password"])
            == (receiver.url + HOOK, "2.0", "*", user, password)
            for h in hooks
        )
        # Subscribing again replaces the webhooks (same credentials) instead of doubling every delivery.
        code, out = _cli(monkeypatch, db, "webhook", "subscribe", "-c", "pd", "--public-url", receiver.url)
        assert code == 0, out
        assert len(emulator.webhooks) == 4 and (app.secrets.get("pd") or {})[PASSWORD_KEY] == password

        persons = [str(p["id"]) for p in emulator.records("persons")]
        assert api.patch(f"/api/v2/persons/{persons[0]}", json={"last_name": "Webhooked"}).status_code == 200
        assert api.delete(f"/api/v2/persons/{persons[1]}").status_code == 200
        emulator.wait_for_deliveries()
        assert [d["status"] for d in emulator.deliveries] == [200, 200]
        pending = list_events(app.store, pending=True)
        assert sorted((e.remote_id, e.event_type, e.provider) for e in pending) == [
            (persons[0], "update", "pipedrive"),
            (persons[1], "deletion", "pipedrive"),
        ]
        assert {e.dedupe_key for e in pending} == {d["body"]["meta"]["id"] for d in emulator.deliveries}

        # A replayed delivery is acknowledged and stored once; forged or missing credentials are refused.
        replay = emulator.deliveries[0]["body"]
        started = time.monotonic()
        answer = httpx.post(receiver.url + HOOK, json=replay, auth=(user, password))
        assert (answer.status_code, answer.json()) == (200, {"stored": 0, "duplicates": 1})
        assert time.monotonic() - started < 10  # Pipedrive gives up on an answer after 10 s
        for auth in ((user, password + "x"), (user + "x", password), ("", ""), None):
            assert httpx.post(receiver.url + HOOK, json=replay, auth=auth).status_code == 401, auth
        bearer = {"authorization": f"Bearer {password}"}
        assert httpx.post(receiver.url + HOOK, json=replay, headers=bearer).status_code == 401
        assert len(list_events(app.store)) == 2

        (res,) = pull(app, connections=["pd"])
        assert res.events_applied == 2
        edited = app.store.mirror.record("pd", "contacts", persons[0])
        assert edited is not None and edited.raw["last_name"] == "Webhooked"
        gone = app.store.mirror.record("pd", "contacts", persons[1])
        assert gone is not None and gone.archived
        assert list_events(app.store, pending=True) == []
    finally:
        api.close()
        receiver.stop()
        app.close()
        server.stop()


def test_a_failed_delivery_is_retried_and_stored_once(tmp_path: Path, emulator: PipedriveEmulator) -> None:
    app = App(db=str(tmp_path / "retry.db"))
    app.store.connections.save(CrmConnection(name="pd", provider="pipedrive", base_url="http://unused"))
    app.secrets.update("pd", webhook_user="crmsync-u", webhook_password="p4ss")
    receiver = WebhookReceiver(app, host="127.0.0.1", port=0).start()
    answers = iter([503])

    def flaky(request: httpx.Request) -> httpx.Response:
        status = next(answers, None)
        if status is not None:
            return httpx.Response(status)  # the first attempt never reaches the receiver
        forwarded = httpx.post(str(request.url), content=request.content, headers=dict(request.headers))
        return httpx.Response(forwarded.status_code, content=forwarded.content)

    emulator._webhook_client = lambda: httpx.Client(transport=httpx.MockTransport(flaky))
    emulator.webhooks[1] = {
        "id": 1,
        "event_action": "*",
        "event_object": "person",
        "subscription_url": receiver.url + HOOK,
        "http_auth_user": "crmsync-u",
        "http_auth_password": "p4ss",
    }
    try:
        emulator.update("persons", 1, {"name": "Again"})
        emulator.wait_for_deliveries()
        assert [(d["attempt"], d["status"]) for d in emulator.deliveries] == [(1, 503), (2, 200)]
        (event,) = list_events(app.store)
        assert (event.remote_id, event.event_type) == ("1", "update")
    finally:
        receiver.stop()
        app.close()


def test_basic_credentials_and_payloads() -> None:
    secret = {USER_KEY: "u", PASSWORD_KEY: "p"}
    check_basic(secret, {"authorization": "Basic dTpw"})  # u:p
    for headers in ({}, {"authorization": "Basic dTpx"}, {"authorization": "Basic !!"}, {"authorization": "dTpw"}):
        with pytest.raises(VerificationFailed):
            check_basic(secret, headers)
    with pytest.raises(VerificationFailed):  # nothing stored: nothing passes, not even empty credentials
        check_basic({}, {"authorization": "Basic Og=="})
    meta = {"action": "delete", "entity": "person", "entity_id": "7", "id": "e-1", "timestamp": "2026-01-02T03:04:05Z"}
    event = parse_event({"meta": meta, "data": None, "previous": {"name": "x"}})
    assert event is not None
    assert (event.dedupe_key, event.object, event.remote_id, event.event_type) == ("e-1", "contacts", "7", "deletion")
    assert event.payload == {"meta": {**dict.fromkeys(("merged_to_id", "attempt")), **meta}}  # no record data kept
    merged = parse_event({"meta": {**meta, "merged_to_id": 9}})
    assert merged is not None and merged.event_type == "merge"
    assert parse_event({"meta": {**meta, "entity": "product"}}) is None
    support = PipedriveWebhooks("Pipedrive")
    made = support.prepare_secret({})
    assert support.prepare_secret(made) == made  # generated once, then kept
    assert len(made[PASSWORD_KEY]) >= 32


@pytest.mark.slow
def test_commands_without_the_capability_say_so(tmp_path: Path) -> None:
    db = str(tmp_path / "odoo.db")
    app = App(db=db)
    app.store.connections.save(CrmConnection(name="od", provider="odoo", base_url="http://unused"))
    app.store.connections.save(CrmConnection(name="pd", provider="pipedrive", base_url="http://unused"))
    app.close()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "CRMSYNC_HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "crmsync", "--db", db, *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)

    odoo = run("webhook", "subscribe", "-c", "od", "--public-url", "https://h.example")
    assert odoo.returncode == 2 and "Odoo, which sends no webhooks" in odoo.stderr
    assert len(odoo.stderr.strip().splitlines()) == 1  # one line, no traceback
    secret = run("webhook", "secret", "-c", "pd")
    assert secret.returncode == 2 and "run `crmsync webhook subscribe -c pd`" in secret.stderr
    no_url = run("webhook", "subscribe", "-c", "pd")
    assert no_url.returncode == 2 and "--public-url" in no_url.stderr
