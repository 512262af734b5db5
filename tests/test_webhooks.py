"""Webhooks: HubSpot/Zoho verification, the loopback receiver, consumption by pull, crash safety."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlmodel import select

from crmsync.app import App
from crmsync.model import to_utc
from crmsync.providers.capabilities import MalformedEvent, VerificationFailed
from crmsync.providers.hubspot.webhook import (
    hubspot_events,
    hubspot_signature_v1,
    hubspot_signature_v2,
    hubspot_signature_v3,
    hubspot_v3_uri,
    verify_hubspot,
)
from crmsync.providers.zoho.webhook import verify_zoho, zoho_events
from crmsync.store import CrmConnection, CrmWebhookEvent, Store
from crmsync.store.events import list_events
from crmsync.webhooks import WebhookReceiver, serve

# -- the reference's test vectors (hubspot.md §7) ----------------------------------------------------
VEC_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
VEC_URI = "https://www.example.com/webhook_uri"
BODY_V1 = (
    b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,'
    b'"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,"changeSource":"CRM",'
    b'"changeFlag":"NEW","appId":54321}]'
)
SINGLE = b"{'example_field':'example_value'}"
DOUBLE = b'{"example_field":"example_value"}'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (BODY_V1, "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"),
        (SINGLE, "69fc6631a867edd4f9e9e627fc5c1148e3fbdd8b21837b6d2b8901c1fa57f750"),
    ],
)
def test_v1_vectors(body: bytes, expected: str) -> None:
    assert hubspot_signature_v1(VEC_SECRET, body) == expected
    verify_hubspot(
        secret=VEC_SECRET,
        method="POST",
        uri=VEC_URI,
        body=body,
        headers={"x-hubspot-signature": expected, "x-hubspot-signature-version": "v1"},
    )


@pytest.mark.parametrize(
    ("method", "body", "expected"),
    [
        ("GET", b"", "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e"),
        ("POST", DOUBLE, "9569219f8ba981ffa6f6f16aa0f48637d35d728c7e4d93d0d52efaa512af7900"),
        ("POST", SINGLE, "4fe4e3a7d3cf09db53be39d0a58130e2aaba074ec123a9e355b876a689a1c383"),
    ],
)
def test_v2_vectors(method: str, body: bytes, expected: str) -> None:
    assert hubspot_signature_v2(VEC_SECRET, method, VEC_URI, body) == expected
    headers = {"x-hubspot-signature": expected, "x-hubspot-signature-version": "v2"}
    assert verify_hubspot(secret=VEC_SECRET, method=method, uri=VEC_URI, body=body, headers=headers) == "v2"
    with pytest.raises(VerificationFailed):
        verify_hubspot(secret=VEC_SECRET, method=method, uri=VEC_URI + "x", body=body, headers=headers)


@pytest.mark.parametrize(
    ("uri", "body", "stamp", "expected"),
    [
        (VEC_URI, SINGLE, "1693657560000", "K36dawei4A+QBNolUOqo7s91KQDWQ5MXZ/QufNYuk/Y="),
        (VEC_URI, SINGLE, "1700000300000", "RnbPH7+UMKVkbV32P8bz450N4M56aPmcru1+D3kSDtw="),
        (VEC_URI, SINGLE, "15000000", "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw="),
        (VEC_URI, DOUBLE, "1564113600000", "eT0ip2TKVpsIi1vb5C2Uu42eNdHL+oTE3NRZOF67O2U="),
        (
            VEC_URI + "?email=jane%40example.com&name=a%20b",
            DOUBLE,
            "1564113600000",
            "4dRtwADUiFI5MoEENe/aP+spncwTd40hgCSRw5WRtIE=",
        ),
    ],
)
def test_v3_vectors_and_window(uri: str, body: bytes, stamp: str, expected: str) -> None:
    assert hubspot_signature_v3(VEC_SECRET, "POST", uri, body, stamp) == expected
    headers = {"x-hubspot-signature-v3": expected, "x-hubspot-request-timestamp": stamp}
    sent = int(stamp) / 1000
    ok = {"secret": VEC_SECRET, "method": "POST", "uri": uri, "body": body, "headers": headers}
    assert verify_hubspot(**ok, now=sent + 299) == "v3"
    assert verify_hubspot(**ok, now=sent - 299) == "v3"  # a little clock skew is fine
    for now in (sent + 301, sent - 301):  # too old, or from the future
        with pytest.raises(VerificationFailed):
            verify_hubspot(**ok, now=now)


def test_v3_decodes_only_the_listed_escapes() -> None:
    assert hubspot_v3_uri("/a%3Ab%2Fc%3Fd%40e%21%24%27%28%29%2A%2C%3B") == "/a:b/c?d@e!$'()*,;"
    assert hubspot_v3_uri("/q?x=a%20b%26c%3Dd") == "/q?x=a%20b%26c%3Dd"
    undecoded = base64.b64encode(
        hmac.new(
            VEC_SECRET.encode(),
            b"POST" + VEC_URI.encode() + b"?email=jane%40example.com&name=a%20b" + DOUBLE + b"1564113600000",
            hashlib.sha256,
        ).digest()
    ).decode()
    assert undecoded.startswith("aFWUxg6Q")  # the reference's "undecoded" value: we must not produce it
    assert (
        hubspot_signature_v3(
            VEC_SECRET, "POST", VEC_URI + "?email=jane%40example.com&name=a%20b", DOUBLE, "1564113600000"
        )
        != undecoded
    )


def test_a_v3_header_is_never_bypassed_by_v1() -> None:
    v1 = hubspot_signature_v1(VEC_SECRET, DOUBLE)
    headers = {
        "x-hubspot-signature": v1,
        "x-hubspot-signature-version": "v1",
        "x-hubspot-signature-v3": "forged",
        "x-hubspot-request-timestamp": str(int(time.time() * 1000)),
    }
    with pytest.raises(VerificationFailed):
        verify_hubspot(secret=VEC_SECRET, method="POST", uri=VEC_URI, body=DOUBLE, headers=headers)
    with pytest.raises(VerificationFailed):  # a v1/v2 signature needs its version header
        verify_hubspot(secret=VEC_SECRET, method="POST", uri=VEC_URI, body=DOUBLE, headers={"x-hubspot-signature": v1})


# -- normalisation -----------------------------------------------------------------------------------
def _ev(st: str, **extra: Any) -> dict[str, Any]:
    return {"eventId": 1, "subscriptionType": st, "occurredAt": 1_700_000_000_000, "portalId": 1, **extra}


def test_hubspot_events_map_to_objects_and_types() -> None:
    rows = hubspot_events(
        [
            _ev("contact.creation", objectId=1),
            _ev("contact.propertyChange", objectId=1, propertyName="email", propertyValue="a@b.c"),
            _ev("company.deletion", objectId=2),
            _ev("deal.restore", objectId=3),
            _ev("contact.privacyDeletion", objectId=4),
            _ev("object.propertyChange", objectTypeId="0-48", objectId=5, propertyName="hs_call_title"),
            _ev("ticket.creation", objectId=6),  # not synced: left out
            _ev("conversation.newMessage", objectId=7),
        ]
    )
    assert [(r.object, r.remote_id, r.event_type) for r in rows] == [
        ("contacts", "1", "creation"),
        ("contacts", "1", "update"),
        ("companies", "2", "deletion"),
        ("deals", "3", "restore"),
        ("contacts", "4", "deletion"),
        ("calls", "5", "update"),
    ]
    assert rows[1].dedupe_key == "contact.propertyChange:1:email:1700000000000"
    assert rows[1].occurred_at is not None and rows[1].occurred_at.year == 2023
    # eventId does not take part: the same change delivered with another eventId is the same event
    again = hubspot_events([_ev("contact.propertyChange", objectId=1, propertyName="email", eventId=99)])
    assert again[0].dedupe_key == rows[1].dedupe_key


def test_hubspot_merge_and_association_change() -> None:
    merge = hubspot_events([_ev("contact.merge", objectId=10, primaryObjectId=10, mergedObjectIds=[11, 12])])
    assert {(r.remote_id, r.event_type) for r in merge} == {("10", "merge"), ("11", "deletion"), ("12", "deletion")}
    into_new = hubspot_events(
        [_ev("deal.merge", objectId=20, primaryObjectId=20, mergedObjectIds=[21], newObjectId=22)]
    )
    assert {(r.remote_id, r.event_type) for r in into_new} == {("22", "merge"), ("20", "deletion"), ("21", "deletion")}
    assoc = hubspot_events(
        [
            _ev(
                "contact.associationChange",
                fromObjectId=30,
                toObjectId=31,
                associationType="CONTACT_TO_COMPANY",
                associationRemoved=False,
            )
        ]
    )
    assert {(r.object, r.remote_id, r.event_type) for r in assoc} == {
        ("contacts", "30", "update"),
        ("companies", "31", "update"),
    }
    assert len({r.dedupe_key for r in merge + into_new + assoc}) == 8  # one key per stored row


@pytest.mark.parametrize(
    "payload",
    [
        {"subscriptionType": "contact.creation"},
        [1],
        [_ev("contact.creation")],
        [_ev("contact.creation", objectId=1, occurredAt="soon")],
    ],
)
def test_malformed_hubspot_payloads(payload: Any) -> None:
    with pytest.raises(MalformedEvent):
        hubspot_events(payload)


ZOHO = {"token": "tok-123456", "channel_id": "1000000068001", "url_secret": "url-secret-xyz"}


def _zoho_body(**extra: Any) -> dict[str, Any]:
    return {
        "server_time": 1718117126473,
        "query_params": {"crmsync_key": ZOHO["url_secret"]},
        "module": "Contacts",
        "resource_uri": "https://www.zohoapis.com/crm/v2/Contacts",
        "ids": ["5725767000003000064", "5725767000003000065"],
        "affected_fields": [],
        "operation": "update",
        "channel_id": ZOHO["channel_id"],
        "token": ZOHO["token"],
        **extra,
    }


def test_zoho_verification_and_events() -> None:
    verify_zoho(**ZOHO, event=_zoho_body(), query={})
    verify_zoho(**ZOHO, event=_zoho_body(query_params={}), query={"crmsync_key": [ZOHO["url_secret"]]})
    for bad in (
        {"event": _zoho_body(token="tok-123457"), "query": {}},
        {"event": _zoho_body(channel_id="1000000068002"), "query": {}},
        {"event": _zoho_body(query_params={}), "query": {}},
        {"event": _zoho_body(), "query": {"crmsync_key": ["wrong"]}},
    ):
        with pytest.raises(VerificationFailed):
            verify_zoho(**ZOHO, **bad)
    rows = zoho_events(_zoho_body())
    assert [(r.object, r.remote_id, r.event_type) for r in rows] == [
        ("contacts", "5725767000003000064", "update"),
        ("contacts", "5725767000003000065", "update"),
    ]
    assert "token" not in rows[0].payload and "query_params" not in rows[0].payload  # secrets are not stored
    assert zoho_events(_zoho_body(module="Accounts", operation="delete"))[0].event_type == "deletion"
    assert zoho_events(_zoho_body(module="Leads")) == []


# -- the receiver on loopback ------------------------------------------------------------------------
SECRET = "hubspot-client-secret-0123456789"
PUBLIC = "https://hooks.example.com/crm"


def sign_v3(secret: str, method: str, uri: str, body: bytes, stamp: str) -> str:
    """HubSpot's documented v3 algorithm, written out here independently of crmsync."""
    source = (method + uri).encode() + body + stamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()


def signed_headers(body: bytes, uri: str, *, secret: str = SECRET, stamp: int | None = None) -> dict[str, str]:
    ts = str(stamp if stamp is not None else int(time.time() * 1000))
    return {
        "Content-Type": "application/json",
        "X-HubSpot-Signature-v3": sign_v3(secret, "POST", uri, body, ts),
        "X-HubSpot-Request-Timestamp": ts,
    }


def hs_event(
    object_id: int, occurred: int | None = None, st: str = "contact.propertyChange", **extra: Any
) -> dict[str, Any]:
    return {
        "eventId": 100,
        "subscriptionId": 1,
        "portalId": 62515,
        "appId": 54321,
        "occurredAt": occurred if occurred is not None else int(time.time() * 1000),
        "subscriptionType": st,
        "attemptNumber": 0,
        "objectId": object_id,
        "propertyName": "email",
        "propertyValue": f"c{object_id}@example.com",
        "changeSource": "CRM",
        **extra,
    }


def _events(app: App) -> list[CrmWebhookEvent]:
    with app.store.session() as s:
        return list(s.exec(select(CrmWebhookEvent).order_by(CrmWebhookEvent.id)))  # type: ignore[arg-type]


def _metric(app: App, result: str, connection: str = "hs", provider: str = "hubspot") -> float:
    value = app.metrics.registry.get_sample_value(
        "crm_webhook_events_total", {"provider": provider, "connection": connection, "result": result}
    )
    return value or 0.0


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    a = App(db=str(tmp_path / "store.db"))
    a.store.connections.save(CrmConnection(name="hs", provider="hubspot", base_url="http://unused"))
    a.store.connections.save(CrmConnection(name="zo", provider="zoho", base_url="http://unused"))
    a.secrets.update("hs", webhook_secret=SECRET)
    a.secrets.update(
        "zo", webhook_secret=ZOHO["url_secret"], webhook_token=ZOHO["token"], webhook_channel_id=ZOHO["channel_id"]
    )
    yield a
    a.close()


@pytest.fixture
def receiver(app: App) -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(app, host="127.0.0.1", port=0, public_url=PUBLIC, body_limit=64 * 1024).start()
    yield r
    r.stop()


@pytest.fixture
def client(receiver: WebhookReceiver) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=receiver.url, timeout=10) as c:
        yield c


HS_PATH = "/hooks/hubspot/hs"
HS_URI = PUBLIC + HS_PATH


def test_signed_request_for_the_public_url_is_stored(app: App, client: httpx.Client) -> None:
    body = json.dumps([hs_event(1)]).encode()
    r = client.post(HS_PATH, content=body, headers=signed_headers(body, HS_URI))
    assert r.status_code == 200, r.text
    assert r.json() == {"stored": 1, "duplicates": 0}
    (row,) = _events(app)
    assert (row.connection, row.provider, row.object, row.remote_id, row.event_type) == (
        "hs",
        "hubspot",
        "contacts",
        "1",
        "update",
    )
    assert row.processed_at is None and row.payload["propertyName"] == "email"
    sent = json.loads(body)[0]["occurredAt"]
    assert row.occurred_at is not None and to_utc(row.occurred_at) == datetime.fromtimestamp(sent / 1000, UTC)
    # the proxy may also forward the public path prefix itself; the signed URI is the same
    body2 = json.dumps([hs_event(2)]).encode()
    assert client.post("/crm" + HS_PATH, content=body2, headers=signed_headers(body2, HS_URI)).status_code == 200
    assert _metric(app, "stored") == 2


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_any_one_byte_change_or_an_old_timestamp_is_401_and_stores_nothing(app: App, client: httpx.Client) -> None:
    body = json.dumps([hs_event(7)]).encode()
    now = int(time.time() * 1000)
    good = signed_headers(body, HS_URI, stamp=now)
    attempts = {
        "body": (_flip(body, 20), good),
        "uri": (body, signed_headers(body, _flip(HS_URI.encode(), len(HS_URI) - 1).decode(), stamp=now)),
        "timestamp": (body, {**good, "X-HubSpot-Request-Timestamp": str(now + 1)}),
        "secret": (body, signed_headers(body, HS_URI, secret=_flip(SECRET.encode(), 3).decode(), stamp=now)),
        "old": (body, signed_headers(body, HS_URI, stamp=now - 301_000)),
        "unsigned": (body, {"Content-Type": "application/json"}),
    }
    for name, (content, headers) in attempts.items():
        r = client.post(HS_PATH, content=content, headers=headers)
        assert r.status_code == 401, name
        assert r.json() == {"error": "unauthorized"}  # nothing about the secret or the reason
    query = client.post(HS_PATH + "?x=1", content=body, headers=good)  # a query the CRM did not sign
    assert query.status_code == 401
    assert _events(app) == []
    assert _metric(app, "rejected") == len(attempts) + 1
    assert client.post(HS_PATH, content=body, headers=good).status_code == 200  # the original is fine


def test_redelivery_is_acknowledged_not_duplicated(app: App, client: httpx.Client) -> None:
    events = [hs_event(1), hs_event(2)]
    body = json.dumps(events).encode()
    assert client.post(HS_PATH, content=body, headers=signed_headers(body, HS_URI)).json() == {
        "stored": 2,
        "duplicates": 0,
    }
    # HubSpot retries with a new timestamp and attemptNumber, and eventId is not unique anyway
    again = json.dumps([{**e, "attemptNumber": 1, "eventId": 555} for e in events]).encode()
    r = client.post(HS_PATH, content=again, headers=signed_headers(again, HS_URI))
    assert r.status_code == 200 and r.json() == {"stored": 0, "duplicates": 2}
    assert len(_events(app)) == 2
    assert _metric(app, "duplicate") == 2


def test_malformed_json_oversized_and_wrong_method(app: App, client: httpx.Client) -> None:
    for bad in (b"[{not json", b'{"no": "subscriptionType"}', b"[1, 2]"):
        r = client.post(HS_PATH, content=bad, headers=signed_headers(bad, HS_URI))
        assert r.status_code == 400
    big = json.dumps([hs_event(i) for i in range(1000)]).encode()
    assert len(big) > 64 * 1024
    assert client.post(HS_PATH, content=big, headers=signed_headers(big, HS_URI)).status_code == 413
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = client.request(method, HS_PATH)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert client.post("/hooks/hubspot/nope", content=b"[]").status_code == 404
    assert client.post("/hooks/zoho/hs", content=b"{}").status_code == 404  # hs is a HubSpot connection
    assert client.get("/healthz").status_code == 200
    assert _events(app) == []


def test_an_array_is_stored_in_one_transaction(app: App, client: httpx.Client, receiver: WebhookReceiver) -> None:
    batch = [hs_event(i) for i in range(1, 6)]
    bad = [*batch[:4], {"subscriptionType": "contact.creation", "occurredAt": 1}]  # last one has no objectId
    body = json.dumps(bad).encode()
    assert client.post(HS_PATH, content=body, headers=signed_headers(body, HS_URI)).status_code == 400
    assert _events(app) == []
    # the store fails half-way through the array: nothing of it is committed, and the CRM must retry
    real = receiver.writer._write
    calls = {"n": 0}

    def failing(conn: Any, jobs: Any) -> list[list[bool]]:
        calls["n"] += 1
        real(conn, jobs)  # the rows are written, then the transaction fails
        raise RuntimeError("disk full")

    receiver.writer._write = failing  # type: ignore[method-assign]
    body = json.dumps(batch).encode()
    r = client.post(HS_PATH, content=body, headers=signed_headers(body, HS_URI))
    assert r.status_code == 503 and calls["n"] >= 1
    assert _events(app) == []
    receiver.writer._write = real  # type: ignore[method-assign]
    r = client.post(HS_PATH, content=body, headers=signed_headers(body, HS_URI))
    assert r.json() == {"stored": 5, "duplicates": 0}
    assert sorted(int(e.remote_id) for e in _events(app)) == [1, 2, 3, 4, 5]


def test_the_portable_writer_path_dedupes_the_same_way(app: App) -> None:
    # PostgreSQL stores take the SQLAlchemy Core path; run it here on SQLite.
    r = WebhookReceiver(app, host="127.0.0.1", port=0, public_url=PUBLIC)
    r.writer._sqlite = False
    r.start()
    try:
        # A duplicate inside one array, too: the same event twice (two hs_event calls can straddle a
        # millisecond and differ in occurredAt).
        two = hs_event(2)
        events = [hs_event(1), two, dict(two)]
        body = json.dumps(events).encode()
        first = httpx.post(r.url + HS_PATH, content=body, headers=signed_headers(body, HS_URI))
        assert first.json() == {"stored": 2, "duplicates": 1}
        again = httpx.post(r.url + HS_PATH, content=body, headers=signed_headers(body, HS_URI))
        assert again.json() == {"stored": 0, "duplicates": 3}
    finally:
        r.stop()
    rows = _events(app)
    assert sorted(e.remote_id for e in rows) == ["1", "2"]
    assert rows[0].occurred_at is not None and rows[0].payload["objectId"] == 1


def test_forwarded_headers_count_only_with_trust_proxy(app: App) -> None:
    body = json.dumps([hs_event(3)]).encode()
    proxied_uri = "https://edge.example.net" + HS_PATH
    headers = {
        **signed_headers(body, proxied_uri),
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "edge.example.net",
    }
    for trust, expected in ((False, 401), (True, 200)):
        r = WebhookReceiver(app, host="127.0.0.1", port=0, trust_proxy=trust).start()
        try:
            assert httpx.post(r.url + HS_PATH, content=body, headers=headers).status_code == expected
        finally:
            r.stop()


def test_zoho_notifications(app: App, client: httpx.Client) -> None:
    path = "/hooks/zoho/zo?crmsync_key=" + ZOHO["url_secret"]
    ok = client.post(path, json=_zoho_body())
    assert ok.status_code == 200 and ok.json() == {"stored": 2, "duplicates": 0}
    assert client.post(path, json=_zoho_body()).json() == {"stored": 0, "duplicates": 2}
    assert client.post(path, json=_zoho_body(token="nope-nope")).status_code == 401
    assert client.post("/hooks/zoho/zo", json=_zoho_body(query_params={})).status_code == 401
    assert client.post(path, content=b"{oops").status_code == 400
    rows = [e for e in _events(app) if e.connection == "zo"]
    assert len(rows) == 2 and all("token" not in e.payload for e in rows)
    assert _metric(app, "rejected", "zo", "zoho") == 2


def test_a_rotated_secret_is_picked_up_without_restart(
    app: App, receiver: WebhookReceiver, client: httpx.Client
) -> None:
    receiver.secrets.reload_after = 0
    app.secrets.update("hs", webhook_secret="rotated-secret-abcdef")
    body = json.dumps([hs_event(9)]).encode()
    r = client.post(HS_PATH, content=body, headers=signed_headers(body, HS_URI, secret="rotated-secret-abcdef"))
    assert r.status_code == 200


# -- consumption by pull -----------------------------------------------------------------------------
def test_pull_applies_events_and_never_rolls_back(tmp_path: Path) -> None:
    from crmsync.emulators.hubspot import build_hubspot
    from crmsync.sync.pull import pull
    from tests.e2e import hubspot_app

    emulator = build_hubspot(seed=5, contacts=6, companies=2, deals=1)
    server = emulator.serve()
    app = hubspot_app(server.url, emulator.private_app_token, db=str(tmp_path / "pull.db"))
    app.secrets.update("hs", webhook_secret=SECRET)
    receiver = WebhookReceiver(app, host="127.0.0.1", port=0, public_url=PUBLIC).start()
    try:
        pull(app, connections=["hs"])
        ids = [str(r["id"]) for r in emulator.records("contacts")]
        changed, deleted = ids[0], ids[1]
        before_edit = int(time.time() * 1000) - 60_000
        emulator.edit("contacts", changed, {"firstname": "Changed"})
        emulator.archive("contacts", deleted)

        def post(events: list[dict[str, Any]]) -> None:
            body = json.dumps(events).encode()
            r = httpx.post(receiver.url + HS_PATH, content=body, headers=signed_headers(body, HS_URI))
            assert r.status_code == 200

        post([hs_event(int(changed), propertyName="firstname"), hs_event(int(deleted), st="contact.deletion")])
        reads = emulator.stats.by_route["POST crm.objects.batch.read"]
        (res,) = pull(app, connections=["hs"])
        assert res.events_applied == 2
        assert emulator.stats.by_route["POST crm.objects.batch.read"] > reads  # fetched by id
        rec = app.store.mirror.record("hs", "contacts", changed)
        assert rec is not None and rec.raw["firstname"] == "Changed"
        gone = app.store.mirror.record("hs", "contacts", deleted)
        assert gone is not None and gone.archived
        assert list_events(app.store, pending=True) == []

        # an older event arrives late: it is applied (processed) but the record keeps its newer state
        post([hs_event(int(changed), occurred=before_edit, propertyName="firstname", propertyValue="Old")])
        (res,) = pull(app, connections=["hs"])
        assert res.events_applied == 1
        rec = app.store.mirror.record("hs", "contacts", changed)
        assert rec is not None and rec.raw["firstname"] == "Changed"
        assert all(e.processed_at is not None for e in _events(app))
    finally:
        receiver.stop()
        app.close()
        server.stop()


def test_a_deletion_never_archives_a_record_the_crm_still_has(tmp_path: Path) -> None:
    from crmsync.emulators.hubspot import build_hubspot
    from crmsync.sync.pull import pull
    from tests.e2e import hubspot_app

    emulator = build_hubspot(seed=6, contacts=3)
    server = emulator.serve()
    app = hubspot_app(server.url, emulator.private_app_token, db=str(tmp_path / "restore.db"))
    app.secrets.update("hs", webhook_secret=SECRET)
    receiver = WebhookReceiver(app, host="127.0.0.1", port=0, public_url=PUBLIC).start()
    try:
        pull(app, connections=["hs"])
        rid = str(emulator.records("contacts")[0]["id"])
        t0 = int(time.time() * 1000) - 10_000
        # deleted, then restored in HubSpot: the record is live; the deletion may even arrive last
        body = json.dumps(
            [
                hs_event(int(rid), occurred=t0 + 1, st="contact.restore"),
                hs_event(int(rid), occurred=t0, st="contact.deletion"),
            ]
        ).encode()
        assert httpx.post(receiver.url + HS_PATH, content=body, headers=signed_headers(body, HS_URI)).status_code == 200
        (res,) = pull(app, connections=["hs"])
        assert res.events_applied == 2
        rec = app.store.mirror.record("hs", "contacts", rid)
        assert rec is not None and not rec.archived
    finally:
        receiver.stop()
        app.close()
        server.stop()


def test_zoho_channel_callbacks_reach_the_store_and_pull(tmp_path: Path) -> None:
    from crmsync.emulators.zoho import ZohoEmulator
    from crmsync.sync.connect import connect
    from crmsync.sync.pull import pull
    from crmsync.webhooks.subscriptions import subscribe
    from tests.e2e import ScriptIO

    emu = ZohoEmulator(seed=3, contacts=5)
    transport = emu.transport()
    app = App(db=str(tmp_path / "zoho.db"), transport=lambda _name: transport)
    options = {"client_id": emu.client_id, "grant_code": emu.grant_code()}
    connect(app, provider="zoho", name="z", base_url=None, options=options, io=ScriptIO(emu.client_secret))
    first = subscribe(app, "z", public_url=PUBLIC)
    assert not first["renewed"] and "***" in first["notify_url"]
    channels = emu.channels()  # one per watched module, all on the same channel id and URL
    assert {c["channel_id"] for c in channels} == {first["channel_id"]}
    assert all(c["notify_url"].startswith(PUBLIC + "/hooks/zoho/z?crmsync_key=") for c in channels)
    again = subscribe(app, "z", public_url=PUBLIC, renew_within=timedelta(days=30))
    assert again["renewed"] and again["channel_id"] == first["channel_id"]
    assert len(emu.channels()) == len(channels)

    receiver = WebhookReceiver(app, host="127.0.0.1", port=0, public_url=PUBLIC).start()
    try:
        pull(app, connections=["z"])
        ids = [r["id"] for r in emu.records("Contacts")]
        emu.edit("Contacts", ids[0], {"Last_Name": "Webhooked"})
        emu.delete("Contacts", ids[1])
        statuses = []
        emu.deliver(
            lambda url, body: statuses.append(httpx.post(url.replace(PUBLIC, receiver.url), json=body).status_code)
        )
        assert statuses == [200, 200]
        assert {(e.remote_id, e.event_type) for e in list_events(app.store, pending=True)} == {
            (ids[0], "update"),
            (ids[1], "deletion"),
        }
        (res,) = pull(app, connections=["z"])
        assert res.events_applied == 2
        rec = app.store.mirror.record("z", "contacts", ids[0])
        assert rec is not None and rec.raw["Last_Name"] == "Webhooked"
        gone = app.store.mirror.record("z", "contacts", ids[1])
        assert gone is not None and gone.archived
    finally:
        receiver.stop()
        app.close()


def test_serve_loop_ticks_and_stops_cleanly(app: App) -> None:
    ticks: list[float] = []
    stop = threading.Event()
    ready: list[str] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if len(ticks) >= 2:
            stop.set()

    receiver = WebhookReceiver(app, host="127.0.0.1", port=0, public_url=PUBLIC)
    serve(receiver, tick=tick, interval=0.2, stop=stop, on_ready=lambda r: ready.append(r.url), handle_signals=False)
    assert len(ticks) == 2 and ready
    with pytest.raises(httpx.TransportError):
        httpx.post(ready[0] + HS_PATH, content=b"[]", timeout=2)


# -- the CLI -----------------------------------------------------------------------------------------
def test_cli_secret_and_events(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from crmsync import cli

    monkeypatch.setattr(cli.STATE, "_app", None)
    runner = CliRunner()
    db = app.paths.db
    result = runner.invoke(cli.app, ["--db", db, "webhook", "secret", "-c", "hs"], input="new-client-secret-42\n")
    assert result.exit_code == 0, result.output
    assert "new-client-secret-42" not in result.output
    assert app.secrets.get("hs")["webhook_secret"] == "new-client-secret-42"
    monkeypatch.setattr(cli.STATE, "_app", None)
    result = runner.invoke(
        cli.app, ["--db", db, "webhook", "secret", "-c", "zo", "--channel-id", "42"], input="tok-42\n"
    )
    assert result.exit_code == 0, result.output
    doc = app.secrets.get("zo")
    assert (doc["webhook_token"], doc["webhook_channel_id"]) == ("tok-42", "42")
    assert doc["webhook_secret"] == ZOHO["url_secret"]  # the URL secret Zoho already has is kept

    receiver = WebhookReceiver(app, host="127.0.0.1", port=0, public_url=PUBLIC).start()
    body = json.dumps([hs_event(1), hs_event(2)]).encode()
    headers = signed_headers(body, HS_URI, secret="new-client-secret-42")
    assert httpx.post(receiver.url + HS_PATH, content=body, headers=headers).status_code == 200
    receiver.stop()
    monkeypatch.setattr(cli.STATE, "_app", None)
    result = runner.invoke(cli.app, ["--db", db, "--json", "webhook", "events", "--pending"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)["events"]
    assert sorted(e["remote_id"] for e in listed) == ["1", "2"]
    assert all(e["processed_at"] is None and e["object"] == "contacts" for e in listed)


# -- crash safety: SIGKILL the receiver while events stream in ----------------------------------------
def _start_receiver(home: Path, db: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_SECRET")}
    env.update(
        {
            "CRMSYNC_HOME": str(home),
            "CRMSYNC_DB": db,
            "NO_COLOR": "1",
            "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
            "CRMSYNC_SECRET_HS": json.dumps({"webhook_secret": SECRET}),
        }
    )
    cmd = [sys.executable, "-m", "crmsync", "--json", "webhook", "serve", "--port", "0", "--public-url", PUBLIC]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the receiver did not start"
    return proc, json.loads(line)["listening"]


@pytest.mark.slow
def test_killing_the_receiver_loses_no_acknowledged_event(tmp_path: Path, home: Path) -> None:
    db = str(tmp_path / "kill.db")
    store = Store.open(db)
    store.connections.save(CrmConnection(name="hs", provider="hubspot", base_url="http://unused"))
    total, threads = 1200, 4
    acked: set[int] = set()
    lock = threading.Lock()

    def send(url: str, ids: list[int], stop_on_error: bool) -> None:
        with httpx.Client(timeout=5) as c:
            for i in ids:
                body = json.dumps([hs_event(i, occurred=1_700_000_000_000 + i)]).encode()
                try:
                    r = c.post(url + HS_PATH, content=body, headers=signed_headers(body, HS_URI))
                except httpx.TransportError:
                    if stop_on_error:
                        return
                    continue
                if r.status_code == 200:
                    with lock:
                        acked.add(i)

    proc, url = _start_receiver(home, db)
    workers = [
        threading.Thread(target=send, args=(url, list(range(t + 1, total + 1, threads)), True)) for t in range(threads)
    ]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # mid-stream, with requests in flight
    proc.wait(10)
    for w in workers:
        w.join(30)
    assert 200 <= len(acked) < total
    stored = {int(e.remote_id) for e in list_events(store, limit=10 * total)}
    assert acked <= stored  # every 2xx was committed before it was sent

    # restart and redeliver everything (the CRM retries what it did not get a 2xx for, and more)
    proc, url = _start_receiver(home, db)
    try:
        workers = [
            threading.Thread(target=send, args=(url, list(range(t + 1, total + 1, threads)), False))
            for t in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert len(acked) == total
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = list_events(store, limit=10 * total)
    assert sorted(int(e.remote_id) for e in rows) == list(range(1, total + 1))  # each once
    store.close()


# -- hostile traffic ---------------------------------------------------------------------------------
DEEP_BODY = b"[" * 30_000 + b"]" * 30_000  # far past the recursion limit, within the 64 KiB body limit
ZOHO_PATH = "/hooks/zoho/zo?crmsync_key=" + ZOHO["url_secret"]


@pytest.fixture
def webhook_log() -> Iterator[list[logging.LogRecord]]:
    """Every record of the receiver's logger, whatever an earlier CLI test did to propagation."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("crmsync.webhooks")
    handler, level, propagate = Keep(logging.DEBUG), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # an in-process CLI test may have left a handler on a closed stream
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def _no_traceback(records: list[logging.LogRecord]) -> None:
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records if r.exc_info]
    assert not [r for r in records if "Traceback" in r.getMessage()]


def test_nested_or_unsigned_bodies_get_400_or_401_on_every_route_without_a_traceback(
    app: App, client: httpx.Client, webhook_log: list[logging.LogRecord]
) -> None:
    zoho_deep = json.dumps(_zoho_body()).encode()[:-1] + b', "x": ' + DEEP_BODY + b"}"
    answers = {
        "hubspot unsigned": client.post(HS_PATH, content=DEEP_BODY).status_code,
        "hubspot signed": client.post(
            HS_PATH, content=DEEP_BODY, headers=signed_headers(DEEP_BODY, HS_URI)
        ).status_code,
        "zoho without the URL secret": client.post("/hooks/zoho/zo", content=zoho_deep).status_code,
        "zoho with a wrong URL secret": client.post("/hooks/zoho/zo?crmsync_key=wrong", content=zoho_deep).status_code,
        "zoho with the URL secret": client.post(ZOHO_PATH, content=zoho_deep).status_code,
    }
    assert answers == {
        "hubspot unsigned": 401,
        "hubspot signed": 400,
        "zoho without the URL secret": 401,
        "zoho with a wrong URL secret": 401,
        "zoho with the URL secret": 400,
    }
    assert _events(app) == []
    _no_traceback(webhook_log)
    assert client.get("/healthz").status_code == 200


def test_callers_are_authenticated_before_their_body_is_parsed(app: App, client: httpx.Client) -> None:
    # Not JSON at all: a 401 (not a 400) shows the caller was turned away before any parsing.
    assert client.post(HS_PATH, content=b"{not json").status_code == 401
    assert client.post("/hooks/zoho/zo?crmsync_key=wrong", content=b"{not json").status_code == 401
    assert client.post(ZOHO_PATH, content=b"{not json").status_code == 400
    assert _metric(app, "rejected", "zo", "zoho") == 1 and _metric(app, "malformed", "zo", "zoho") == 1


def test_a_flood_of_bad_requests_logs_one_line_per_kind(
    app: App, client: httpx.Client, receiver: WebhookReceiver, webhook_log: list[logging.LogRecord]
) -> None:
    for _ in range(20):
        assert client.post(HS_PATH, content=b"[]").status_code == 401
        assert client.post(ZOHO_PATH, content=DEEP_BODY).status_code == 400
    loud = [r.getMessage() for r in webhook_log if r.levelno >= logging.INFO]
    assert len([m for m in loud if "rejected" in m]) == 1
    assert len([m for m in loud if "malformed" in m]) == 1
    assert _metric(app, "rejected") == 20  # the metric still counts every one

    def broken(raw_path: str) -> None:
        raise RuntimeError("a bug")

    receiver.route = broken  # type: ignore[assignment,method-assign]
    for _ in range(5):
        assert client.post(HS_PATH, content=b"[]").status_code == 500
    bugs = [r for r in webhook_log if "receiver bug" in r.getMessage()]
    assert [r.levelno for r in bugs if r.levelno >= logging.INFO] == [logging.ERROR]
    assert not [r for r in bugs if r.exc_info and r.levelno > logging.DEBUG]


def _slow_socket(url: str, first: bytes = b"POST /hooks/hubspot/hs HTTP/1.1\r\n") -> socket.socket:
    host, port = urlsplit(url).hostname, urlsplit(url).port
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(first)
    return sock


@pytest.mark.slow
def test_200_slow_connections_stay_within_the_thread_cap_and_healthz_still_answers(app: App) -> None:
    # The deadline outlasts opening 200 connections even on a loaded machine, so the pool stays full.
    r = WebhookReceiver(app, host="127.0.0.1", port=0, request_deadline=6).start()
    assert r.max_connections == 64  # the default
    threads_before = threading.active_count()
    socks = []
    try:
        for _ in range(200):
            socks.append(_slow_socket(r.url))
        time.sleep(0.5)
        assert threading.active_count() <= threads_before + r.max_connections + 2
        health = httpx.get(r.url + "/healthz", timeout=5)
        assert health.status_code == 200 and health.json() == {"ok": True}
        busy = httpx.post(r.url + HS_PATH, content=b"[]", timeout=5)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        answered = []
        for sock in socks:
            sock.settimeout(8)
            try:
                answered.append(sock.recv(64))
            except OSError:
                answered.append(b"")
        refused = [a for a in answered if a.startswith(b"HTTP/1.1 503")]
        assert len(refused) == 200 - r.max_connections  # the rest were cut at the deadline, unanswered
        settled = time.monotonic() + 3
        while threading.active_count() > threads_before and time.monotonic() < settled:
            time.sleep(0.05)
        assert threading.active_count() <= threads_before
    finally:
        for sock in socks:
            sock.close()
        r.stop()


def _trickle(sock: socket.socket, data: bytes, every: float = 0.1) -> tuple[float, bytes]:
    """Send ``data`` a byte at a time until the receiver answers or hangs up: (seconds, answer)."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(every)
        try:
            if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None:
                break  # an answer, or b"" for a closed connection
        except BlockingIOError:
            continue
        except OSError:
            break
    elapsed = time.monotonic() - started
    sock.settimeout(3)
    try:
        return elapsed, sock.recv(4096)
    except OSError:
        return elapsed, b""


@pytest.mark.slow
def test_a_trickling_request_is_cut_at_the_deadline_not_kept_alive_by_each_byte(app: App) -> None:
    r = WebhookReceiver(app, host="127.0.0.1", port=0, request_deadline=1.0).start()
    try:
        # Headers that never end, one byte every 0.1 s: a per-read timeout would never fire.
        with _slow_socket(r.url) as sock:
            elapsed, answer = _trickle(sock, b"X-Slow: " + b"x" * 100)
        assert 0.9 <= elapsed < 4 and answer == b""
        # Whole headers, then a body that trickles: answered 408 at the deadline.
        body = json.dumps([hs_event(1)]).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in signed_headers(body, HS_URI).items())
        request_head = f"POST {HS_PATH} HTTP/1.1\r\nContent-Length: {len(body)}\r\n{head}\r\n"
        with _slow_socket(r.url, request_head.encode()) as sock:
            elapsed, answer = _trickle(sock, body)
        assert 0.9 <= elapsed < 4 and answer.startswith(b"HTTP/1.1 408")
        assert _events(app) == []
        assert httpx.get(r.url + "/healthz").status_code == 200
    finally:
        r.stop()


def test_metrics_answer_loopback_clients_only(receiver: WebhookReceiver, client: httpx.Client) -> None:
    def metrics(client_address: str, **headers: str) -> int:
        return receiver.handle("GET", "/metrics", headers, lambda n: b"", client=client_address).status

    assert [metrics(a) for a in ("127.0.0.1", "::1", "::ffff:127.0.0.1")] == [200, 200, 200]
    assert [metrics(a) for a in ("203.0.113.9", "10.0.0.5", "::ffff:192.0.2.1", "")] == [403, 403, 403, 403]
    assert metrics("127.0.0.1", **{"x-forwarded-for": "203.0.113.9"}) == 403  # a proxy on this machine
    assert client.get("/metrics").status_code == 200
    assert "crm_webhook_events_total" in client.get("/metrics").text


@pytest.mark.parametrize(("address", "status"), [("203.0.113.9", b"403"), ("127.0.0.1", b"200")])
def test_the_handler_refuses_metrics_by_its_client_address(
    receiver: WebhookReceiver, address: str, status: bytes
) -> None:
    from crmsync.webhooks.server import make_handler

    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()  # a TCP pair: the handler sets TCP options on its end
    with ours, theirs:
        theirs.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        make_handler(receiver)(ours, (address, 40000), receiver._httpd)  # serves the one request
        theirs.settimeout(5)
        assert theirs.recv(64).startswith(b"HTTP/1.1 " + status)


@pytest.mark.slow
@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_serve_warns_when_bound_beyond_loopback(tmp_path: Path, home: Path, host: str, warned: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_SECRET")}
    env.update({"CRMSYNC_HOME": str(home), "NO_COLOR": "1", "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"})
    cmd = [sys.executable, "-m", "crmsync", "--json", "webhook", "serve", "--host", host, "--port", "0"]
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        assert "listening" in json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    stderr = err_path.read_text()
    assert ("TLS-terminating reverse proxy" in stderr) is warned, stderr
    assert "Traceback" not in stderr
