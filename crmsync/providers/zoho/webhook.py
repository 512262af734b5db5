"""Zoho webhooks: watch channels (``/actions/watch``) and their notifications as stored rows.

Zoho signs nothing, so a notification must carry three things crmsync generated and stored before
the channel was enabled: the channel id, its token, and a secret in the notify URL's query
(checked before the body is read). Dedupe keys are channel + server_time + operation + ids.
"""

from __future__ import annotations

import secrets as pysecrets
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from crmsync.errors import UsageError
from crmsync.providers.capabilities import (
    Event,
    MalformedEvent,
    VerificationFailed,
    WebhookRequest,
    WebhookSupport,
    json_body,
    ms_datetime,
    remote_id,
    same,
)

if TYPE_CHECKING:
    from crmsync.providers.base import Provider

#: Keys (in the connection's secret document) the receiver reads.
SECRET_KEY = "webhook_secret"  # the notify URL's secret
TOKEN_KEY = "webhook_token"  # the watch channel's token
CHANNEL_KEY = "webhook_channel_id"  # the watch channel's id
#: Query parameter of the notify URL that carries the URL secret.
URL_PARAM = "crmsync_key"
TOKEN_MAX = 50  # characters Zoho allows in a channel token


def verify_zoho(
    *,
    token: str | None,
    channel_id: str | None,
    url_secret: str | None,
    event: Mapping[str, Any],
    query: Mapping[str, Sequence[str]],
) -> None:
    """Check a Zoho notification: channel token, channel id, and the notify URL's secret.

    Zoho signs nothing, so all three must match. The URL secret is looked for in the request's
    query string and in the body's ``query_params`` (Zoho echoes the notify URL's query there);
    every copy present must match and at least one must be.

    Raises:
        VerificationFailed: a value is missing or wrong, or the connection has none stored.
    """
    if not (token and channel_id and url_secret):
        raise VerificationFailed("no Zoho channel token/id/URL secret stored for this connection")
    if not same(token, str(event.get("token") or "")):
        raise VerificationFailed("Zoho channel token mismatch")
    if not same(str(channel_id), str(event.get("channel_id") or "")):
        raise VerificationFailed("Zoho channel id mismatch")
    copies = list(query.get(URL_PARAM, []))
    params = event.get("query_params")
    if isinstance(params, Mapping) and URL_PARAM in params:
        value = params[URL_PARAM]
        copies.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    # Evaluate every comparison (no short-circuit) so timing says nothing about which failed.
    results = [same(url_secret, c) for c in copies]
    if not results or not all(results):
        raise VerificationFailed("Zoho notify URL secret missing or wrong")


_ZOHO_OBJECTS = {"Contacts": "contacts", "Accounts": "companies", "Deals": "deals", "Calls": "calls", "Tasks": "tasks"}
_ZOHO_OPERATIONS = {
    "insert": "creation",
    "create": "creation",
    "update": "update",
    "edit": "update",
    "delete": "deletion",
}
#: Body keys that carry secrets: verified, then never stored.
_ZOHO_SECRET_FIELDS = ("token", "query_params")


def zoho_events(payload: Any) -> list[Event]:
    """A Zoho notification -> one stored row per record id (modules we do not sync are left out).

    Raises:
        MalformedEvent: the body is not a Zoho notification (nothing is stored then).
    """
    if not isinstance(payload, dict):
        raise MalformedEvent("a Zoho notification is a JSON object")
    module, operation, ids = payload.get("module"), payload.get("operation"), payload.get("ids")
    if not isinstance(module, str) or not isinstance(operation, str) or not isinstance(ids, list):
        raise MalformedEvent("a Zoho notification needs module, operation and ids")
    ms, occurred = ms_datetime(payload.get("server_time"), "server_time")
    obj = _ZOHO_OBJECTS.get(module)
    if obj is None:
        return []
    event_type = _ZOHO_OPERATIONS.get(operation.lower(), "update")
    kept = {k: v for k, v in payload.items() if k not in _ZOHO_SECRET_FIELDS}
    channel = payload.get("channel_id") or ""
    rows = []
    for rid in dict.fromkeys(remote_id(i, "ids") for i in ids):
        rows.append(Event(f"{channel}:{ms}:{operation}:{module}:{rid}", obj, rid, event_type, occurred, kept))
    return rows


def check_url_secret(secret: Mapping[str, str], query: Mapping[str, Sequence[str]]) -> None:
    """The notify URL's secret in the request's query: what a Zoho caller proves before its body is read."""
    url_secret = secret.get(SECRET_KEY)
    if not url_secret:
        raise VerificationFailed("no Zoho notify URL secret stored for this connection")
    copies = query.get(URL_PARAM, [])
    results = [same(url_secret, c) for c in copies]
    if not results or not all(results):
        raise VerificationFailed("Zoho notify URL secret missing or wrong in the request URL")


class ZohoWebhooks(WebhookSupport):
    """Watch channels: `webhook subscribe` enables one (a week long) and `serve --follow` renews it."""

    secret_keys: ClassVar[tuple[str, ...]] = (SECRET_KEY, TOKEN_KEY, CHANNEL_KEY)
    hidden_keys: ClassVar[tuple[str, ...]] = (SECRET_KEY, TOKEN_KEY)
    secret_prompt: ClassVar[str | None] = "Zoho channel token"
    subscribes: ClassVar[bool] = True
    renews: ClassVar[bool] = True

    def check_before_body(self, secret: Mapping[str, str], request: WebhookRequest) -> None:
        check_url_secret(secret, request.query)

    def verify(self, secret: Mapping[str, str], request: WebhookRequest, body: bytes) -> None:
        doc = json_body(body)
        if not isinstance(doc, dict):
            raise MalformedEvent("a Zoho notification is a JSON object")
        verify_zoho(
            token=secret.get(TOKEN_KEY),
            channel_id=secret.get(CHANNEL_KEY),
            url_secret=secret.get(SECRET_KEY),
            event=doc,
            query=request.query,
        )

    def events(self, doc: Any) -> list[Event]:
        return zoho_events(doc)

    def hook_query(self, secret: Mapping[str, str], *, reveal: bool) -> str:
        return f"?{URL_PARAM}={secret.get(SECRET_KEY, '') if reveal else '***'}"

    def accept_secret(self, value: str, existing: Mapping[str, Any], *, channel_id: str | None) -> dict[str, str]:
        if not channel_id:
            raise UsageError("Zoho needs --channel-id (the watch channel's id); stdin gives its token")
        if len(value) > TOKEN_MAX:
            raise UsageError(f"a Zoho channel token has at most {TOKEN_MAX} characters")
        url_secret = str(existing.get(SECRET_KEY) or pysecrets.token_urlsafe(24))
        return {SECRET_KEY: url_secret, TOKEN_KEY: value, CHANNEL_KEY: channel_id}

    def prepare_secret(self, existing: Mapping[str, Any]) -> dict[str, str]:
        # Stored before the channel is enabled, because Zoho may call back at once.
        return {
            CHANNEL_KEY: str(existing.get(CHANNEL_KEY) or pysecrets.randbelow(9 * 10**15) + 10**15),  # numeric
            TOKEN_KEY: str(existing.get(TOKEN_KEY) or pysecrets.token_urlsafe(24)),  # 32 characters
            SECRET_KEY: str(existing.get(SECRET_KEY) or pysecrets.token_urlsafe(24)),
        }

    def subscribed(self, secret: Mapping[str, Any]) -> bool:
        return bool(secret.get(CHANNEL_KEY))

    def subscribe(
        self, provider: Provider, secret: Mapping[str, str], hook_url: str, *, renew_within: timedelta
    ) -> dict[str, Any]:
        """Renew the channel when Zoho still has it, else enable it on ``hook_url``."""
        from crmsync.providers.zoho import ZohoProvider

        if not isinstance(provider, ZohoProvider):
            raise TypeError(f"a Zoho channel needs a Zoho provider, not {type(provider).__name__}")
        channel = secret[CHANNEL_KEY]
        expiry = provider.renew_if_needed(channel_id=channel, within=renew_within)
        renewed = expiry is not None
        if expiry is None:
            expiry = provider.subscribe(channel_id=channel, notify_url=hook_url, token=secret[TOKEN_KEY])
        verb = "renewed" if renewed else "enabled"
        return {
            "channel_id": channel,
            "expires_at": expiry.isoformat(),
            "renewed": renewed,
            "summary": f"channel {channel} {verb} until {expiry.isoformat()}",
        }
