"""OAuth per data centre: the accounts servers, the scopes crmsync asks for and needs, the token call."""

from __future__ import annotations

from typing import Any

import httpx

from crmsync.errors import AuthError
from crmsync.providers.zoho.values import _json

#: Data centre -> accounts server (reference §1; Canada's is zohocloud.ca, not zoho.ca).
ACCOUNTS: dict[str, str] = {
    "us": "https://accounts.zoho.com",
    "eu": "https://accounts.zoho.eu",
    "in": "https://accounts.zoho.in",
    "au": "https://accounts.zoho.com.au",
    "jp": "https://accounts.zoho.jp",
    "ca": "https://accounts.zohocloud.ca",
    "sa": "https://accounts.zoho.sa",
    "cn": "https://accounts.zoho.com.cn",
    "uk": "https://accounts.zoho.uk",
}
DEFAULT_SCOPES = ",".join(
    [
        "ZohoCRM.modules.ALL",
        "ZohoCRM.settings.fields.READ",
        "ZohoCRM.settings.modules.READ",
        "ZohoCRM.coql.READ",
        "ZohoCRM.notifications.ALL",
        "ZohoCRM.org.READ",
        "ZohoCRM.users.READ",
    ]
)
#: What a sync needs: (name shown when missing, scopes that grant it, any one suffices).
REQUIRED_SCOPES: list[tuple[str, tuple[str, ...]]] = [
    *(
        (f"ZohoCRM.modules.{module}.{op}", ("ZohoCRM.modules.ALL", f"ZohoCRM.modules.{op}",
                                            f"ZohoCRM.modules.{module}.ALL", f"ZohoCRM.modules.{module}.{op}"))
        for module in ("Contacts", "Accounts", "Deals", "Calls")
        for op in ("READ", "CREATE", "UPDATE")
    ),
    ("ZohoCRM.coql.READ", ("ZohoCRM.coql.READ", "ZohoCRM.coql.ALL")),
    ("ZohoCRM.settings.fields.READ", ("ZohoCRM.settings.fields.READ", "ZohoCRM.settings.fields.ALL",
                                      "ZohoCRM.settings.ALL", "ZohoCRM.settings.READ")),
]  # fmt: skip


def _accounts_server(returned: str | None, configured: str) -> str:
    """The accounts server the redirect names: only a known Zoho one, or the one we were pointed at."""
    if not returned:
        return configured
    returned = returned.rstrip("/")
    if returned == configured or returned in ACCOUNTS.values():
        return returned
    raise AuthError(f"the authorisation redirect named an unknown accounts server: {returned}")


def _token_request(client: httpx.Client, url: str, form: dict[str, str]) -> dict[str, Any]:
    """POST to Zoho's token endpoint; errors (HTTP 200 with ``error``) become AuthError, no secrets echoed."""
    try:
        response = client.post(url, data=form, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        from crmsync.errors import RetriableError

        raise RetriableError(f"the Zoho accounts server could not be reached: {type(exc).__name__}") from None
    body = _json(response)
    if response.status_code != 200 or "access_token" not in body:
        reason = body.get("error") or f"HTTP {response.status_code}"
        hint = "run `crmsync connect zoho` again" + (
            " (a grant code works once and for minutes only)" if reason == "invalid_code" else ""
        )
        raise AuthError(f"Zoho refused the token request: {reason}", hint=hint)
    return {k: body[k] for k in ("access_token", "refresh_token", "expires_in", "api_domain", "scope") if k in body}
