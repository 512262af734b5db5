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
import secrets as pysecrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from crmsync.providers.capabilities import (
    Event,
    MalformedEvent,
    VerificationFailed,
    WebhookRequest,
    WebhookSupport,
)
from crmsync.providers.pipedrive.provider import PipedriveProvider

if TYPE_CHECKING:
    from crmsync.providers.base import Provider

USER_KEY = "webhook_user"
PASSWORD_KEY = "webhook_password"
#: Pipedrive entity -> crmsync object type (activities are calls or tasks: the pull sorts them).
OBJECTS = {"person": "contacts", "organization": "companies", "deal": "deals", "activity": "calls"}
ACTIONS = {"create": "creation", "change": "update", "delete": "deletion"}
#: One webhook per entity, every action: four of the 40 a user may have.
SUBSCRIBE = ("person", "organization", "deal", "activity")
#: Meta fields kept with a stored event (the record itself is read fresh by the pull).
KEPT_META = ("action", "entity", "entity_id", "id", "timestamp", "merged_to_id", "attempt")


def check_basic(secret: Mapping[str, str], headers: Mapping[str, str]) -> None:
    """Compare the request's Basic credentials with the stored ones, in constant time.

    Raises:
        VerificationFailed: none stored, none sent, or a mismatch.
    """
    user, password = secret.get(USER_KEY), secret.get(PASSWORD_KEY)
    if not user or not password:
        raise VerificationFailed("no webhook credentials stored (run `crmsync webhook subscribe`)")
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        raise VerificationFailed("no Basic credentials in the request")
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise VerificationFailed("malformed Basic credentials") from None
    expected = f"{user}:{password}".encode()
    if not hmac.compare_digest(given, expected):
        raise VerificationFailed("wrong Basic credentials")


def parse_event(doc: Any) -> Event | None:
    """One v2.0 delivery as a stored row, or None for entities crmsync does not sync.

    Raises:
        MalformedEvent: not a v2.0 event (``meta`` with action, entity, entity_id and id).
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
        raise MalformedEvent("a Pipedrive webhook is a JSON object with `meta` (payload version 2.0)")
    meta = doc["meta"]
    action, entity, rid, event_id = meta.get("action"), meta.get("entity"), meta.get("entity_id"), meta.get("id")
    if not all(
        isinstance(v, str | int) and not isinstance(v, bool) and str(v) for v in (action, entity, rid, event_id)
    ):
        raise MalformedEvent("meta needs action, entity, entity_id and id")
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
    kept = {"meta": {k: meta.get(k) for k in KEPT_META}}
    return Event(str(event_id), obj, str(rid), event_type, when, kept)


class PipedriveWebhooks(WebhookSupport):
    """Basic credentials crmsync generates; `webhook subscribe` creates one v1 webhook per entity."""

    secret_keys: ClassVar[tuple[str, ...]] = (USER_KEY, PASSWORD_KEY)
    hidden_keys: ClassVar[tuple[str, ...]] = (PASSWORD_KEY,)
    subscribes: ClassVar[bool] = True

    def verify(self, secret: Mapping[str, str], request: WebhookRequest, body: bytes) -> None:
        check_basic(secret, request.headers)

    def events(self, doc: Any) -> list[Event]:
        event = parse_event(doc)
        return [event] if event is not None else []

    def prepare_secret(self, existing: Mapping[str, Any]) -> dict[str, str]:
        # Kept once made: a subscribe run again re-creates the webhooks with the same credentials.
        return {
            USER_KEY: str(existing.get(USER_KEY) or f"crmsync-{pysecrets.token_hex(4)}"),
            PASSWORD_KEY: str(existing.get(PASSWORD_KEY) or pysecrets.token_urlsafe(24)),
        }

    def subscribed(self, secret: Mapping[str, Any]) -> bool:
        return bool(secret.get(USER_KEY) and secret.get(PASSWORD_KEY))

    def subscribe(
        self, provider: Provider, secret: Mapping[str, str], hook_url: str, *, renew_within: timedelta
    ) -> dict[str, Any]:
        """Create the webhooks (any to the same URL are replaced: Pipedrive never shows their password)."""
        if not isinstance(provider, PipedriveProvider):
            raise TypeError(f"Pipedrive webhooks need a Pipedrive provider, not {type(provider).__name__}")
        made = provider.subscribe_webhooks(hook_url, secret[USER_KEY], secret[PASSWORD_KEY], SUBSCRIBE)
        ids = [str(h.get("id")) for h in made]
        return {
            "webhooks": ids,
            "entities": list(SUBSCRIBE),
            "summary": f"{len(ids)} webhooks ({', '.join(SUBSCRIBE)}) created",
        }
