"""HubSpot webhooks: v1/v2/v3 signatures over the raw body, and HubSpot's event arrays as stored rows.

HubSpot signs every call with the app's client secret, which `crmsync webhook secret` stores; the
subscriptions themselves are made in the app's settings, so there is nothing to subscribe here.
Dedupe keys say what happened, not who sent it: HubSpot's ``eventId`` is not unique, so the key is
subscriptionType + objectId + propertyName + occurredAt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

from crmsync.providers.capabilities import (
    Event,
    MalformedEvent,
    VerificationFailed,
    WebhookRequest,
    WebhookSupport,
    ms_datetime,
    remote_id,
    same,
)

#: Key (in the connection's secret document) of the app's client secret.
SECRET_KEY = "webhook_secret"
MAX_AGE_SECONDS = 300.0  # reject v3 timestamps older than 5 minutes (and as far ahead)

# -- HubSpot signatures ----------------------------------------------------------------------------
# HubSpot decodes exactly these escapes in the URI before signing v3 (and leaves %20, %26, %3D …).
_V3_ESCAPES = re.compile(r"%(3A|2F|3F|40|21|24|27|28|29|2A|2C|3B)", re.IGNORECASE)


def hubspot_v3_uri(uri: str) -> str:
    """The URI as HubSpot signs it for v3: only ``: / ? @ ! $ ' ( ) * , ;`` are decoded."""
    return _V3_ESCAPES.sub(lambda m: chr(int(m.group(1), 16)), uri)


def hubspot_signature_v1(secret: str, body: bytes) -> str:
    """v1: hex SHA-256 of client secret + raw body."""
    return hashlib.sha256(secret.encode() + body).hexdigest()


def hubspot_signature_v2(secret: str, method: str, uri: str, body: bytes) -> str:
    """v2: hex SHA-256 of client secret + method + URI (exactly as requested) + raw body."""
    return hashlib.sha256(secret.encode() + method.upper().encode() + uri.encode() + body).hexdigest()


def hubspot_signature_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """v3: base64 HMAC-SHA256 keyed by the client secret over method + URI + raw body + timestamp."""
    message = method.upper().encode() + hubspot_v3_uri(uri).encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def verify_hubspot(
    *,
    secret: str,
    method: str,
    uri: str,
    body: bytes,
    headers: Mapping[str, str],
    now: float | None = None,
    max_age: float = MAX_AGE_SECONDS,
) -> str:
    """Check a HubSpot request's signature; returns the version that matched.

    ``headers`` must have lower-cased names. A v3 signature, when present, is the only one
    checked: falling back to v1 would let a replayed request skip the timestamp window.

    Raises:
        VerificationFailed: no valid signature, or a v3 timestamp outside ``max_age``.
    """
    v3 = headers.get("x-hubspot-signature-v3")
    if v3 is not None:
        stamp = headers.get("x-hubspot-request-timestamp", "")
        if not stamp.isdigit():
            raise VerificationFailed("v3 signature without a valid X-HubSpot-Request-Timestamp")
        now_ms = int((time.time() if now is None else now) * 1000)
        skew = now_ms - int(stamp)
        if skew > max_age * 1000:
            raise VerificationFailed("v3 timestamp older than the allowed window")
        if -skew > max_age * 1000:
            raise VerificationFailed("v3 timestamp in the future")
        if not same(hubspot_signature_v3(secret, method, uri, body, stamp), v3):
            raise VerificationFailed("v3 signature mismatch")
        return "v3"
    given = headers.get("x-hubspot-signature")
    if given is None:
        raise VerificationFailed("no HubSpot signature header")
    version = headers.get("x-hubspot-signature-version", "").lower()
    if version == "v1":
        expected = hubspot_signature_v1(secret, body)
    elif version == "v2":
        expected = hubspot_signature_v2(secret, method, uri, body)
    else:
        raise VerificationFailed("missing or unknown X-HubSpot-Signature-Version")
    if not same(expected, given.lower()):
        raise VerificationFailed(f"{version} signature mismatch")
    return version


_HS_OBJECTS = {"contact": "contacts", "company": "companies", "deal": "deals", "call": "calls", "task": "tasks"}
_HS_TYPE_IDS = {"0-1": "contacts", "0-2": "companies", "0-3": "deals", "0-27": "tasks", "0-48": "calls"}
_HS_ACTIONS = {
    "creation": "creation",
    "propertyChange": "update",
    "deletion": "deletion",
    "privacyDeletion": "deletion",
    "restore": "restore",
}


def _hs_object(prefix: str, type_id: Any) -> str | None:
    if prefix == "object":
        return _HS_TYPE_IDS.get(str(type_id)) if type_id is not None else None
    return _HS_OBJECTS.get(prefix)


def hubspot_events(payload: Any) -> list[Event]:
    """HubSpot's JSON array of events -> stored rows (unknown object types are left out).

    Merges become a deletion of each merged-away id plus a change of the survivor; an
    association change is a change of both sides.

    Raises:
        MalformedEvent: the body is not an array of HubSpot events (nothing is stored then).
    """
    items = payload if isinstance(payload, list) else [payload]
    out: list[Event] = []
    for n, ev in enumerate(items):
        if not isinstance(ev, dict):
            raise MalformedEvent(f"event {n} is not an object")
        st = ev.get("subscriptionType")
        if not isinstance(st, str) or "." not in st:
            raise MalformedEvent(f"event {n} has no subscriptionType")
        occurred_ms, occurred = ms_datetime(ev.get("occurredAt"), f"event {n} occurredAt")
        prefix, action = st.split(".", 1)
        obj = _hs_object(prefix, ev.get("objectTypeId"))
        if action == "associationChange":
            out.extend(_hs_association(ev, st, obj, occurred_ms, occurred, n))
            continue
        if obj is None:
            continue
        if action == "merge":
            out.extend(_hs_merge(ev, st, obj, occurred_ms, occurred, n))
            continue
        event_type = _HS_ACTIONS.get(action)
        if event_type is None:
            continue  # e.g. conversation events: nothing to pull
        rid = remote_id(ev.get("objectId"), f"event {n} objectId")
        key = f"{st}:{rid}:{ev.get('propertyName') or ''}:{occurred_ms}"
        out.append(Event(key, obj, rid, event_type, occurred, ev))
    return out


def _hs_merge(ev: dict[str, Any], st: str, obj: str, ms: int, at: datetime, n: int) -> list[Event]:
    survivor = remote_id(
        ev.get("newObjectId") or ev.get("primaryObjectId") or ev.get("objectId"), f"event {n} merge target"
    )
    merged = ev.get("mergedObjectIds") or []
    if not isinstance(merged, list):
        raise MalformedEvent(f"event {n} mergedObjectIds must be a list")
    gone = [remote_id(i, f"event {n} mergedObjectIds") for i in merged]
    primary = ev.get("primaryObjectId")
    if primary is not None and str(primary) != survivor:
        gone.append(str(primary))  # merged into a new record: the primary is gone too
    base = f"{st}:{ev.get('objectId') or survivor}::{ms}"
    rows = [Event(f"{base}|keep:{survivor}", obj, survivor, "merge", at, ev)]
    rows += [
        Event(f"{base}|gone:{rid}", obj, rid, "deletion", at, ev) for rid in dict.fromkeys(gone) if rid != survivor
    ]
    return rows


def _hs_association(ev: dict[str, Any], st: str, obj: str | None, ms: int, at: datetime, n: int) -> list[Event]:
    kind = str(ev.get("associationType") or ev.get("associationTypeId") or "")
    sides = kind.split("_TO_", 1) if "_TO_" in kind else ["", ""]
    from_obj = _hs_object("object", ev["fromObjectTypeId"]) if "fromObjectTypeId" in ev else obj
    from_obj = from_obj or _HS_OBJECTS.get(sides[0].lower())
    to_obj = _hs_object("object", ev["toObjectTypeId"]) if "toObjectTypeId" in ev else None
    to_obj = to_obj or _HS_OBJECTS.get(sides[1].lower())
    from_id = remote_id(ev.get("fromObjectId"), f"event {n} fromObjectId")
    to_id = remote_id(ev.get("toObjectId"), f"event {n} toObjectId")
    base = f"{st}:{from_id}:{to_id}:{kind}:{bool(ev.get('associationRemoved'))}:{ms}"
    rows = []
    if from_obj:
        rows.append(Event(f"{base}|from", from_obj, from_id, "update", at, ev))
    if to_obj:
        rows.append(Event(f"{base}|to", to_obj, to_id, "update", at, ev))
    return rows


class HubSpotWebhooks(WebhookSupport):
    """Signed with the app's client secret (`webhook secret` stores it); subscribed in the app's settings."""

    secret_keys: ClassVar[tuple[str, ...]] = (SECRET_KEY,)
    hidden_keys: ClassVar[tuple[str, ...]] = (SECRET_KEY,)
    secret_prompt: ClassVar[str | None] = "HubSpot app client secret"

    def verify(self, secret: Mapping[str, str], request: WebhookRequest, body: bytes) -> None:
        value = secret.get(SECRET_KEY)
        if not value:
            raise VerificationFailed("no webhook secret stored (run `crmsync webhook secret`)")
        verify_hubspot(
            secret=value,
            method=request.method,
            uri=request.uri,
            body=body,
            headers=request.headers,
            now=request.now,
            max_age=request.max_age,
        )

    def events(self, doc: Any) -> list[Event]:
        return hubspot_events(doc)

    def accept_secret(self, value: str, existing: Mapping[str, Any], *, channel_id: str | None) -> dict[str, str]:
        return {SECRET_KEY: value}
