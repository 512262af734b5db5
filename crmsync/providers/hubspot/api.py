"""HubSpot's response policy (401/429, rate-limit headers), the token calls, and the state every layer shares."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from crmsync.errors import AuthError
from crmsync.http import ResponsePolicy
from crmsync.providers.base import Provider
from crmsync.providers.hubspot.shares import Shares
from crmsync.providers.hubspot.values import ASSOC_BATCH, SEARCH_PAGE


class HubSpotPolicy(ResponsePolicy):
    """HubSpot's 401/429 semantics and rate-limit headers."""

    # Answers on the ten-secondly limit state the portal's count; search answers state none.
    counts_stated = frozenset({"default"})

    def __init__(self) -> None:
        self.daily_remaining: int | None = None
        self.daily_max: int | None = None

    def _body(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def is_auth_expired(self, response: httpx.Response) -> bool:
        return response.status_code == 401

    def give_up(self, response: httpx.Response) -> bool:
        # The daily quota resets at midnight: no wait inside a run's deadline will fix it.
        return response.status_code == 429 and self._body(response).get("policyName") == "DAILY"

    def observe(self, response: httpx.Response, client: Any, bucket: str) -> None:
        h = response.headers
        if "X-HubSpot-RateLimit-Daily-Remaining" in h:
            try:
                self.daily_remaining = int(h["X-HubSpot-RateLimit-Daily-Remaining"])
                self.daily_max = int(h.get("X-HubSpot-RateLimit-Daily", "0")) or None
            except ValueError:
                pass
        remaining = h.get("X-HubSpot-RateLimit-Remaining")
        if remaining is None or not remaining.isdigit():
            return
        limiter = client.buckets.get(bucket) or client.buckets.get("default")
        learn = getattr(limiter, "learn", None)
        if learn is not None:
            # The portal's count holds whatever else spent its limit (a killed run, another
            # integration): the window counts it too, so the next requests wait instead of a 429.
            learn(int(remaining), counted=response.status_code != 429)
        elif limiter is not None and int(remaining) <= 1:
            limiter.pause(1.0)  # a shared bucket (Redis) cannot learn: hold back before the portal's 429

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        body = self._body(response)
        if not body:
            return response.text[:300], None
        message = str(body.get("message") or body.get("status") or "")
        details = body.get("errors") or []
        if details and isinstance(details, list):
            inner = "; ".join(str(e.get("message", "")) for e in details[:3] if isinstance(e, dict))
            if inner and inner not in message:
                message = f"{message} ({inner})"
        if body.get("correlationId"):
            message += f" [correlationId {body['correlationId']}]"
        return message, body.get("category") or body.get("status")


def _token_request(client: httpx.Client, url: str, form: dict[str, str]) -> dict[str, Any]:
    """POST to a token endpoint; errors become AuthError without echoing any secret."""
    try:
        response = client.post(url, data=form, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        from crmsync.errors import RetriableError

        raise RetriableError(f"the token endpoint could not be reached: {type(exc).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or "access_token" not in body:
        reason = body.get("status") or body.get("error") or f"HTTP {response.status_code}"
        raise AuthError(
            f"HubSpot refused the token request: {reason}", hint="run `crmsync connect hubspot --oauth` again"
        )
    return {k: body[k] for k in ("access_token", "refresh_token", "expires_in") if k in body}


class HubSpotApi(Provider):
    """The base layer: the per-provider state every later layer shares through ``self``."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.lookback_ms = int(1000 * (ctx.options.get("lookback_seconds") or 30.0))
        general = ctx.options.get("rate_limit")
        # Requests per second each budget allows, as configured: how a first walk splits its ids.
        self._general_rps = float(general) / 10.0 if general else self.default_rate_limits["default"].requests / 10.0
        self._search_rps = float(ctx.options.get("search_rate_limit") or self.default_rate_limits["search"].requests)
        # Association reads gathered over five search pages save general requests, at the cost of
        # holding those pages: worth it only where the general budget cannot also carry the list chain.
        self._assoc_batch = ASSOC_BATCH if self._general_rps < self._search_rps + 10 else SEARCH_PAGE
        self._dispositions: dict[str, str] | None = None
        self._ensured: set[str] = set()
        self._props: dict[str, dict[str, dict[str, Any]]] = {}
        self._pending_links: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self._lock = threading.Lock()
        #: How the objects' partitioned walks share the two budgets (``shares``).
        self._shares = Shares()
        #: The portal's owners, listed once: email -> owner id, and HubSpot user id -> owner id.
        self._owners: tuple[dict[str, str], dict[str, str]] | None = None
        self._owners_lock = threading.Lock()

    def _token_info(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The connection's secret and what HubSpot says of its token (scopes, user), or None.

        OAuth tokens through v3 introspection (the v1 GET is deprecated, going away in Feb 2027),
        private-app tokens through their access-token-info.
        """
        secret = self.ctx.secrets.get(self.ctx.connection) or {}
        if secret.get("kind") == "oauth" and secret.get("access_token"):
            self.http.auth.headers()  # refreshes first if the token is about to expire
            secret = self.ctx.secrets.get(self.ctx.connection) or secret
            info = self.http.request(
                "POST",
                "/oauth/v3/token/introspect",
                data={
                    "client_id": secret.get("client_id", ""),
                    "client_secret": secret.get("client_secret", ""),
                    "token": secret["access_token"],
                    "token_type_hint": "access_token",
                },
                endpoint="/oauth/v3/token/introspect",
                expect=(400, 404),
            )
        elif secret.get("token"):
            info = self.http.request(
                "POST",
                "/oauth/v2/private-apps/get/access-token-info",
                json={"tokenKey": secret["token"]},
                endpoint="/oauth/v2/private-apps/get/access-token-info",
                expect=(400, 404),
            )
        else:
            return secret, None
        return secret, (info.json() if info.status_code == 200 else None)
