"""The HubSpot provider: its identity in the registry, how a connection is made and checked, its quota."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from crmsync.credentials import SecretStore, StaticAuth
from crmsync.errors import AuthError, UsageError
from crmsync.http import RateLimit
from crmsync.providers.base import ConnectContext, ConnectResult, Health
from crmsync.providers.hubspot.api import HubSpotPolicy, _token_request
from crmsync.providers.hubspot.schema import _token_user
from crmsync.providers.hubspot.values import API, AUTHORIZE_URL, BATCH, DEFAULT_OAUTH_SCOPES, REQUIRED_SCOPES
from crmsync.providers.hubspot.writes import HubSpotWrites


class HubSpotProvider(HubSpotWrites):
    name = "hubspot"
    label = "HubSpot"
    connect_options = frozenset({"oauth", "client_id", "no_browser", "scopes"})
    objects = ("contacts", "companies", "deals", "calls")
    batch_size = BATCH
    # Search: the reference's budget of 4 per second (HubSpot documents 4, some portals get 5: set
    # search_rate_limit); the sliding window keeps a margin for jitter on top.
    # Search's window is one second: counting each turn from its answer would cost a round trip in
    # every window (a seventh of the search budget at 150 ms), so it keeps the sent-plus-margin count,
    # whose margin grows after a 429 it did not expect.
    default_rate_limits = {"default": RateLimit(100, 10.0), "search": RateLimit(4, 1.0, from_answers=False)}
    # HubSpot caps requests per 10 s, not requests in flight. At ~150 ms a request, 10 in flight need
    # 1.5 s to send one window's 100 and a sliding window repeats that spread in every later window
    # (the last window's spread is added to the run); 25 send it in well under a second.
    default_concurrency = 25
    optimistic_creates = frozenset({"contacts", "deals"})  # email and crmsync_deal_key are unique
    unique_markers = frozenset({"calls", "tasks"})  # crmsync_outcome_id has hasUniqueValue
    webhook_support = "crmsync.providers.hubspot.webhook:HubSpotWebhooks"
    emulator = "crmsync.emulators.hubspot"
    default_base_url = API
    policy_class = HubSpotPolicy

    # -- connection ------------------------------------------------------------------------------
    @classmethod
    def make_auth(cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any) -> Any:
        secret = secrets.require(connection)
        if secret.get("kind", "private_app") == "private_app":
            if not secret.get("token"):
                raise AuthError(f"the secret of connection {connection!r} holds no token")
            return StaticAuth("Authorization", f"Bearer {secret['token']}")
        from crmsync.oauth import refresh_session

        token_url = settings.get("token_url") or f"{settings.get('oauth_base', API)}/oauth/v3/token"
        return refresh_session(
            secrets=secrets,
            connection=connection,
            token_client=token_client,
            token_url=token_url,
            token_request=_token_request,
            scheme="Bearer",
        )

    @classmethod
    def connect(cls, ctx: ConnectContext) -> ConnectResult:
        from crmsync import oauth

        base_url = (ctx.base_url or API).rstrip("/")
        opts = ctx.options
        settings: dict[str, Any] = {}
        given = ctx.given or {}
        if opts.get("oauth") or given.get("kind") == "oauth":
            client_id = opts.get("client_id") or given.get("client_id") or ""
            if not client_id:
                raise UsageError("--oauth needs --client-id")
            client_secret = ctx.io.secret("HubSpot app client secret")
            register = {"kind": "oauth", "client_id": client_id, "client_secret": client_secret}
            token_url = opts.get("token_url") or f"{base_url}/oauth/v3/token"
            if given.get("refresh_token"):
                # The environment's secret already holds a grant: renew it rather than ask for another.
                form = {"grant_type": "refresh_token", "refresh_token": str(given["refresh_token"])}
            else:
                authorize_url = opts.get("authorize_url") or (
                    AUTHORIZE_URL if base_url == API else f"{base_url}/oauth/authorize"
                )
                grant = oauth.authorize(
                    ctx.io,
                    authorize_url=authorize_url,
                    params={"client_id": client_id, "scope": opts.get("scopes") or DEFAULT_OAUTH_SCOPES},
                    no_browser=bool(opts.get("no_browser")),
                )
                form = {
                    "grant_type": "authorization_code",
                    "redirect_uri": grant.redirect_uri,
                    "code": grant.code,
                    "code_verifier": grant.code_verifier,
                }
            tokens = _token_request(
                ctx.token_client(), token_url, {"client_id": client_id, "client_secret": client_secret, **form}
            )
            if form.get("refresh_token"):
                tokens.setdefault("refresh_token", form["refresh_token"])
            secret = {**register, **tokens, "expires_at": time.time() + float(tokens.pop("expires_in", 1800))}
            secret.pop("expires_in", None)
            settings.update({"auth": "oauth", "token_url": token_url, "oauth_base": base_url})
        else:
            token = ctx.io.secret("HubSpot private-app access token").strip()
            if not token:
                raise UsageError("no token was given")
            secret = {"kind": "private_app", "token": token}
            settings["auth"] = "private_app"
        ctx.secrets.set(ctx.name, secret)
        auth = cls.make_auth(
            connection=ctx.name, settings=settings, secrets=ctx.secrets, token_client=ctx.token_client()
        )
        http = ctx.client(base_url, auth)
        from crmsync.providers.base import ProviderContext

        provider = cls(
            ProviderContext(connection=ctx.name, base_url=base_url, settings=settings, http=http, secrets=ctx.secrets)
        )
        try:
            health = provider.check()
        finally:
            provider.close()
        if health.missing_scopes:
            raise AuthError(
                "the HubSpot credentials lack scopes crmsync needs: " + ", ".join(health.missing_scopes),
                hint="add them to the private app (or the OAuth app's scopes) and connect again",
            )
        settings["portal_id"] = health.account
        if provider.token_user is not None:
            settings["user_id"] = provider.token_user  # the default owner's user, without a request per push
        return ConnectResult(
            base_url=base_url, account_id=health.account, scopes=health.scopes, settings=settings, health=health
        )

    def check(self) -> Health:
        details = self.http.get("/account-info/v3/details", endpoint="/account-info/v3/details").json()
        account = str(details.get("portalId", "")) or None
        scopes: list[str] = []
        secret, info = self._token_info()
        self.token_user = _token_user(secret, info)
        expires_at = None
        if info and (secret.get("kind") != "oauth" or info.get("active")):
            scopes = list(info.get("scopes", []))
        if secret.get("kind") == "oauth" and secret.get("access_token") and secret.get("expires_at"):
            expires_at = datetime.fromtimestamp(float(secret["expires_at"]), tz=UTC)
        missing: list[str] = []
        if scopes:
            missing = [s for s in REQUIRED_SCOPES if s not in scopes]
        else:
            # No introspection available: probe each object with a one-record read.
            for obj in ("contacts", "companies", "deals"):
                r = self.http.request(
                    "GET",
                    f"/crm/v3/objects/{obj}",
                    params={"limit": 1},
                    expect=(403,),
                    endpoint=f"/crm/v3/objects/{obj}",
                )
                if r.status_code == 403:
                    missing.append(f"crm.objects.{obj}.read")
        return Health(
            ok=not missing,
            account=account,
            scopes=scopes,
            missing_scopes=missing,
            token_expires_at=expires_at,
            detail=f"portal {account}",
        )

    def quota(self) -> dict[str, Any]:
        policy = self.http.policy
        if isinstance(policy, HubSpotPolicy) and policy.daily_remaining is not None:
            return {"daily_remaining": policy.daily_remaining, "daily_limit": policy.daily_max}
        return {}
