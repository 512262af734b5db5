"""The Zoho provider: its identity in the registry, and how a connection is made and checked."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from crmsync.credentials import SecretStore
from crmsync.errors import AuthError, UsageError
from crmsync.http import RateLimit
from crmsync.providers.base import ConnectContext, ConnectResult, Health, ProviderContext
from crmsync.providers.zoho.api import ZohoPolicy
from crmsync.providers.zoho.auth import ACCOUNTS, DEFAULT_SCOPES, REQUIRED_SCOPES, _accounts_server, _token_request
from crmsync.providers.zoho.channels import ZohoChannels
from crmsync.providers.zoho.values import API_PATH, BATCH, _json


class ZohoProvider(ZohoChannels):
    name = "zoho"
    label = "Zoho CRM"
    reference_shape = "object"  # a lookup field is written as {"id": "…"}
    connect_options = frozenset({"dc", "client_id", "grant_code", "scopes", "no_browser"})
    objects = ("contacts", "companies", "deals", "calls", "tasks")
    batch_size = BATCH
    #: Zoho counts credits per day and calls in flight, not calls per second.
    default_rate_limits = dict[str, RateLimit]()
    default_concurrency = 5
    unique_markers = frozenset({"calls", "tasks"})  # prepare_objects checks crmsync_outcome_id exists, unique
    webhook_support = "crmsync.providers.zoho.webhook:ZohoWebhooks"
    emulator = "crmsync.emulators.zoho"
    default_base_url = f"https://www.zohoapis.com{API_PATH}"
    policy_class = ZohoPolicy

    # -- connection ------------------------------------------------------------------------------
    @classmethod
    def make_auth(cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any) -> Any:
        secret = secrets.require(connection)
        if not secret.get("refresh_token") and not secret.get("access_token"):
            raise AuthError(f"the secret of connection {connection!r} holds no Zoho tokens")
        accounts = (
            settings.get("accounts_url") or secret.get("accounts_url") or ACCOUNTS[str(settings.get("dc") or "us")]
        )
        from crmsync.oauth import refresh_session

        token_url = f"{str(accounts).rstrip('/')}/oauth/v2/token"
        return refresh_session(
            secrets=secrets,
            connection=connection,
            token_client=token_client,
            token_url=token_url,
            token_request=_token_request,
            scheme="Zoho-oauthtoken",
        )

    @classmethod
    def connect(cls, ctx: ConnectContext) -> ConnectResult:
        from crmsync import oauth

        opts = ctx.options
        dc = str(opts.get("dc") or "us").lower()
        if dc not in ACCOUNTS:
            raise UsageError(f"--dc {dc!r}: choose one of {', '.join(ACCOUNTS)}")
        given = ctx.given or {}
        client_id = str(opts.get("client_id") or given.get("client_id") or "")
        if not client_id:
            raise UsageError("Zoho needs --client-id (a client of api-console.zoho.com)")
        # For Zoho, --base-url names the accounts server (an emulator, a proxy); the API domain
        # always comes from the token response.
        accounts = opts.get("accounts_url") or ctx.base_url or given.get("accounts_url") or ACCOUNTS[dc]
        accounts = str(accounts).rstrip("/")
        scopes = ",".join(s for s in re.split(r"[\s,]+", str(opts.get("scopes") or DEFAULT_SCOPES)) if s)
        client_secret = ctx.io.secret("Zoho client secret").strip()
        if not client_secret:
            raise UsageError("no client secret was given")
        form = {"client_id": client_id, "client_secret": client_secret, "grant_type": "authorization_code"}
        token_server = accounts
        if given.get("refresh_token") and not opts.get("grant_code"):
            # The environment's secret already holds a grant: renew it rather than ask for another.
            form.update({"grant_type": "refresh_token", "refresh_token": str(given["refresh_token"])})
        elif opts.get("grant_code"):
            form["code"] = str(opts["grant_code"]).strip()
        else:
            grant = oauth.authorize(
                ctx.io,
                authorize_url=f"{accounts}/oauth/v2/auth",
                params={
                    "scope": scopes,
                    "client_id": client_id,
                    "response_type": "code",
                    "access_type": "offline",
                    "prompt": "consent",
                },
                no_browser=bool(opts.get("no_browser")),
            )
            token_server = _accounts_server(grant.params.get("accounts-server"), accounts)
            dc = str(grant.params.get("location") or dc).lower()
            form.update({"code": grant.code, "redirect_uri": grant.redirect_uri, "code_verifier": grant.code_verifier})
        tokens = _token_request(ctx.token_client(), f"{token_server}/oauth/v2/token", form)
        if form["grant_type"] == "refresh_token":
            tokens = {"refresh_token": form["refresh_token"], "scope": given.get("scope"), **tokens}
        if not tokens.get("refresh_token"):
            raise AuthError(
                "Zoho returned no refresh token", hint="authorise with access_type=offline and prompt=consent"
            )
        api_domain = str(tokens.get("api_domain") or "").rstrip("/")
        if urlsplit(api_domain).scheme not in ("http", "https") or not urlsplit(api_domain).netloc:
            raise AuthError("Zoho's token response named no usable api_domain")
        secret = {
            "kind": "oauth",
            "client_id": client_id,
            "client_secret": client_secret,
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
            "expires_at": time.time() + float(tokens.get("expires_in") or 3600),
            "scope": tokens.get("scope") or scopes,
        }
        ctx.secrets.set(ctx.name, secret)
        settings: dict[str, Any] = {
            "auth": "oauth",
            "dc": dc,
            "accounts_url": token_server,
            "api_domain": api_domain,
            "api_base_url": f"{api_domain}{API_PATH}",
        }
        auth = cls.make_auth(
            connection=ctx.name, settings=settings, secrets=ctx.secrets, token_client=ctx.token_client()
        )
        http = ctx.client(settings["api_base_url"], auth)
        provider = cls(
            ProviderContext(
                connection=ctx.name,
                base_url=settings["api_base_url"],
                settings=settings,
                http=http,
                secrets=ctx.secrets,
            )
        )
        try:
            health = provider.check()
        finally:
            provider.close()
        if health.missing_scopes:
            raise AuthError(
                "the Zoho token lacks scopes crmsync needs: " + ", ".join(health.missing_scopes),
                hint=f"connect again with --scopes {DEFAULT_SCOPES}",
            )
        settings["org_id"] = health.account
        return ConnectResult(
            base_url=settings["api_base_url"],
            account_id=health.account,
            scopes=health.scopes,
            settings=settings,
            health=health,
        )

    def check(self) -> Health:
        body = _json(self._get("/org", endpoint="/org"))
        org = (body.get("org") or [{}])[0]
        account = str(org.get("id")) if org.get("id") else None
        secret = self.ctx.secrets.get(self.ctx.connection) or {}
        granted = [s for s in re.split(r"[\s,]+", str(secret.get("scope") or "")) if s]
        if granted:
            have = {s.lower() for s in granted}
            missing = [name for name, any_of in REQUIRED_SCOPES if not have & {s.lower() for s in any_of}]
        else:
            # No scope list was recorded (a secret from the environment): probe with one query.
            r = self.http.request(
                "POST",
                "/coql",
                json={"select_query": "select id from Contacts where id is not null limit 1"},
                endpoint="/coql",
                expect=(401, 403),
            )
            missing = ["ZohoCRM.coql.READ and ZohoCRM.modules.contacts.READ"] if r.status_code in (401, 403) else []
        expires_at = secret.get("expires_at")
        return Health(
            ok=not missing,
            account=account,
            scopes=granted,
            missing_scopes=missing,
            token_expires_at=datetime.fromtimestamp(float(expires_at), tz=UTC) if expires_at else None,
            detail=f"org {account} ({org.get('company_name', '')}), data centre {self.ctx.settings.get('dc', 'us')}",
            extra={"api_domain": self.ctx.settings.get("api_domain"), "time_zone": org.get("time_zone")},
        )
