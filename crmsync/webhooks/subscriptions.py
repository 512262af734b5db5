"""Subscriptions: register the receiver with a CRM, keep the secrets its calls carry, renew what expires."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from crmsync.errors import CrmsyncError, UsageError
from crmsync.webhooks import capability

if TYPE_CHECKING:
    from crmsync.app import App

log = logging.getLogger("crmsync.webhooks")


def subscribe(
    app: App, connection: str | None, *, public_url: str | None = None, renew_within: timedelta = timedelta(days=1)
) -> dict[str, Any]:
    """Register this receiver with the connection's CRM (or renew the subscription it has).

    What the CRM's calls must carry (credentials, channel tokens, URL secrets) is generated once
    and kept in the connection's secret, where the receiver reads it; it is stored before the CRM
    is told, because the CRM may call back at once.
    """
    conn, support = capability(app, connection)
    if not support.subscribes:
        raise UsageError(
            f"{support.label} webhooks are set up in {support.label} itself: point them at "
            f"PUBLIC_URL/hooks/{conn.provider}/{conn.name} and store the secret with `crmsync webhook secret`"
        )
    base = (public_url or app.config.webhook.public_url or "").rstrip("/")
    if not base:
        raise UsageError(
            f"{support.label} must reach the receiver: pass --public-url or set webhook.public_url in the config"
        )
    doc = app.secrets.get(conn.name) or {}
    values = support.prepare_secret(doc)
    if values:
        app.secrets.update(conn.name, **values)
    secret = {k: str(v) for k, v in {**doc, **values}.items() if isinstance(v, str | int)}
    path = f"{base}/hooks/{conn.provider}/{conn.name}"
    report = support.subscribe(
        app.provider(conn), secret, path + support.hook_query(secret, reveal=True), renew_within=renew_within
    )
    return {"connection": conn.name, **report, "notify_url": path + support.hook_query(secret, reveal=False)}


def store_secret(app: App, connection: str | None, value: str, *, channel_id: str | None = None) -> dict[str, Any]:
    """Keep a webhook secret the CRM gave (read by `webhook secret`); returns the URL the CRM must call."""
    conn, support = capability(app, connection)
    doc = app.secrets.get(conn.name) or {}
    values = support.accept_secret(value, doc, channel_id=channel_id)
    app.secrets.update(conn.name, **values)
    base = (app.config.webhook.public_url or "PUBLIC_URL").rstrip("/")
    query = support.hook_query({**{k: str(v) for k, v in doc.items()}, **values}, reveal=True)
    return {"connection": conn.name, "stored": True, "notify_url": f"{base}/hooks/{conn.provider}/{conn.name}{query}"}


def secret_prompt(app: App, connection: str | None) -> str:
    """What `webhook secret` asks for on this connection, or a usage error where crmsync makes the secret."""
    conn, support = capability(app, connection)
    if support.secret_prompt is None:
        raise UsageError(
            f"crmsync generates the {support.label} webhook credentials: run `crmsync webhook subscribe -c {conn.name}`"
        )
    return support.secret_prompt


def renew(
    app: App, names: Iterable[str], last: dict[str, float], public_url: str | None, *, every: float = 3600
) -> None:
    """Renew, at most every ``every`` seconds each, the subscriptions of ``names`` that expire."""
    for name in names:
        if time.monotonic() - last.get(name, float("-inf")) < every:
            continue
        last[name] = time.monotonic()
        try:
            _, support = capability(app, name)
            if not (support.renews and support.subscribed(app.secrets.get(name) or {})):
                continue  # nothing made by `webhook subscribe`, or nothing that expires
            subscribe(app, name, public_url=public_url)
        except CrmsyncError as exc:
            log.warning("renewing the webhook subscription of %s failed: %s", name, exc)
