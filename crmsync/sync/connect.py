"""`crmsync connect`: provider-specific credential flow, then a verified connection row."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from crmsync.errors import CrmsyncError, UsageError
from crmsync.providers import get_provider
from crmsync.providers.base import ConnectContext, ConnectIO
from crmsync.store import CrmConnection

if TYPE_CHECKING:
    from crmsync.app import App

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def connect(
    app: App, *, provider: str, name: str, base_url: str | None, options: dict[str, Any], io: ConnectIO
) -> CrmConnection:
    """Run the provider's connect flow and record the connection (no secrets in the store)."""
    if not NAME_RE.match(name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    cls = get_provider(provider)
    ctx = ConnectContext(
        name=name,
        base_url=base_url.rstrip("/") if base_url else None,
        options=options,
        secrets=app.secrets,
        io=io,
        client=lambda url, auth: app.http_client(cls, name, url, auth),
        token_client=lambda: app.token_client(name),
    )
    try:
        result = cls.connect(ctx)
    except CrmsyncError:
        raise
    from crmsync.model import utcnow

    conn = CrmConnection(
        name=name,
        provider=cls.name,
        account_id=result.account_id,
        base_url=result.base_url,
        scopes=result.scopes,
        settings=result.settings,
        last_checked_at=utcnow(),
        last_ok_at=utcnow(),
        auth_state="ok",
    )
    return app.store.save_connection(conn)
