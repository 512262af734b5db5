"""Requests to Zoho: the error envelope (``ZohoPolicy``) and the calls every layer makes, with credits counted."""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx

from crmsync.http import ResponsePolicy
from crmsync.providers.base import Provider, ProviderContext
from crmsync.providers.zoho.values import _json


def _needed_scope(request: httpx.Request | None) -> str | None:
    """The scope a refused request needed, for the error message."""
    if request is None:
        return None
    path = request.url.path
    m = re.search(r"/crm/v\d+/(.+)$", path)
    rest = m.group(1) if m else path
    if rest.startswith("coql"):
        return "ZohoCRM.coql.READ (plus the module's READ)"
    if rest.startswith("settings/fields"):
        return "ZohoCRM.settings.fields.READ"
    if rest.startswith("actions/watch"):
        return "ZohoCRM.notifications.ALL"
    if rest.startswith("org"):
        return "ZohoCRM.org.READ"
    if rest.startswith("users"):
        return "ZohoCRM.users.READ"
    module = rest.split("/")[0]
    op = {"GET": "READ", "POST": "CREATE", "PUT": "UPDATE", "DELETE": "DELETE"}.get(request.method, "ALL")
    if rest.endswith("/upsert"):
        op = "CREATE and UPDATE"
    return f"ZohoCRM.modules.{module}.{op} (or ZohoCRM.modules.ALL)"


class ZohoPolicy(ResponsePolicy):
    """Zoho's error envelope: ``INVALID_TOKEN`` refreshes, 500 retries, the daily-credit 429 gives up."""

    def is_auth_expired(self, response: httpx.Response) -> bool:
        # Zoho has been seen answering an expired token with AUTHENTICATION_FAILURE too
        # (rikas/zoho_hub#34): one refresh-and-retry is cheap, a second failure is final.
        return response.status_code == 401 and _json(response).get("code") in (
            "INVALID_TOKEN",
            "AUTHENTICATION_FAILURE",
        )

    def is_retriable(self, response: httpx.Response) -> bool:
        return response.status_code in (429, 500, 502, 503, 504)

    def give_up(self, response: httpx.Response) -> bool:
        # The credit budget is a rolling 24 hours: no wait inside a run's deadline refills it.
        return response.status_code == 429 and "24 hour" in str(_json(response).get("message", ""))

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        body = _json(response)
        if not body:
            return response.text[:300], None
        code = body.get("code")
        message = str(body.get("message") or code or "")
        details: dict[str, Any] = found if isinstance(found := body.get("details"), dict) else {}
        if code == "OAUTH_SCOPE_MISMATCH":
            try:
                request: httpx.Request | None = response.request
            except RuntimeError:
                request = None
            needed = _needed_scope(request)
            message = f"{message}: the token lacks {needed}" if needed else message
        elif code == "NO_PERMISSION" and details.get("permissions"):
            message = f"{message}: the user's profile lacks {', '.join(map(str, details['permissions']))}"
        elif details:
            where = details.get("api_name") or details.get("param_name") or details.get("column_name")
            if where:
                message = f"{message} ({where})"
        if code:
            message = f"{code}: {message}" if not message.startswith(str(code)) else message
        return message[:500], code


class ZohoApi(Provider):
    """The bottom layer of ``ZohoProvider``: one place that sends a request and counts its credits."""

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        self._lock = threading.Lock()
        self._credits = 0

    # -- requests ------------------------------------------------------------------------------
    def _spend(self, credits: int) -> None:
        with self._lock:
            self._credits += credits

    def _get(self, path: str, *, endpoint: str, **kwargs: Any) -> httpx.Response:
        self._spend(1)
        return self.http.get(path, endpoint=endpoint, **kwargs)

    def _coql(self, query: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """One COQL call: (rows, more_records); 204 is no rows."""
        self._spend(1 if limit <= 200 else 2 if limit <= 1000 else 3)
        body = _json(self.http.post("/coql", json={"select_query": query}, endpoint="/coql"))
        return list(body.get("data") or []), bool((body.get("info") or {}).get("more_records"))

    def quota(self) -> dict[str, Any]:
        """Credits this provider spent (Zoho sends no credit headers; counted per the reference §4)."""
        return {"credits_used_estimate": self._credits}
