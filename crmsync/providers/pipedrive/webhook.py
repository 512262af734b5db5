"""Pipedrive webhooks (payload version 2.0): HTTP Basic credentials checked in constant time, events by ``meta.id``.

Pipedrive signs nothing: a webhook carries the Basic credentials given when it was created
(``http_auth_user``/``http_auth_password``), which crmsync generates and keeps with the connection's
secret. Deliveries are retried after 3, 30 and 150 s and may repeat or arrive out of order, so each
event is stored once by its ``meta.id`` and only hints that a record changed: the pull reads it fresh.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

USER_KEY = "webhook_user"
PASSWORD_KEY = "webhook_password"
#: Pipedrive entity -> crmsync object type (activities are calls or tasks: the pull sorts them).
OBJECTS = {"person": "contacts", "organization": "companies", "deal": "deals", "activity": "calls"}
ACTIONS = {"create": "creation", "change": "update", "delete": "deletion"}
#: One webhook per entity, every action: four of the 40 a user may have.
SUBSCRIBE = ("person", "organization", "deal", "activity")


class Unauthorized(Exception):
    """The request's Basic credentials are missing or wrong."""


class Malformed(ValueError):
    """The body is not a Pipedrive v2.0 webhook event."""


def check_basic(secret: Mapping[str, str], headers: Mapping[str, str]) -> None:
    """Compare the request's Basic credentials with the stored ones, in constant time.

    Raises:
        Unauthorized: none stored, none sent, or a mismatch.
    """
    user, password = secret.get(USER_KEY), secret.get(PASSWORD_KEY)
    if not user or not password:
        raise Unauthorized("no webhook credentials stored (run `crmsync webhook subscribe`)")
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        raise Unauthorized("no Basic credentials in the request")
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Unauthorized("malformed Basic credentials") from None
    expected = f"{user}:{password}".encode()
    if not hmac.compare_digest(given, expected):
        raise Unauthorized("wrong Basic credentials")


def parse_event(doc: Any) -> tuple[str, str, str, str, datetime | None, dict[str, Any]] | None:
    """(dedupe key, object, remote id, event type, when, kept payload), or None for entities crmsync does not sync.

    Raises:
        Malformed: not a v2.0 event (``meta`` with action, entity, entity_id and id).
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
        raise Malformed("a Pipedrive webhook is a JSON object with `meta` (payload version 2.0)")
    meta = doc["meta"]
    action, entity, rid, event_id = meta.get("action"), meta.get("entity"), meta.get("entity_id"), meta.get("id")
    if not all(
        isinstance(v, str | int) and not isinstance(v, bool) and str(v) for v in (action, entity, rid, event_id)
    ):
        raise Malformed("meta needs action, entity, entity_id and id")
    obj = OBJECTS.get(str(entity))
    if obj is None:
        return None
    event_type = ACTIONS.get(str(action), "update")
    if event_type == "deletion" and meta.get("merged_to_id"):
        event_type = "merge"
    when = None
    if isinstance(meta.get("timestamp"), str):
        try:
            when = datetime.fromisoformat(meta["timestamp"].replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            when = None
    kept = {
        "meta": {
            k: meta.get(k) for k in ("action", "entity", "entity_id", "id", "timestamp", "merged_to_id", "attempt")
        }
    }
    return str(event_id), obj, str(rid), event_type, when, kept
