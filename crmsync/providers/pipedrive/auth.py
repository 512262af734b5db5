"""Pipedrive's OAuth: the code flow on a fixed loopback redirect, its token endpoint, and the company's API host.

Pipedrive documents no PKCE and matches ``redirect_uri`` exactly against the app's registration, so
the loopback port is fixed (``redirect_port``, default ``REDIRECT_PORT``; 0 against a test server);
the token answer's ``api_domain`` (the company's host) becomes the base URL.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from crmsync import oauth
from crmsync.errors import AuthError, UsageError
from crmsync.providers.base import ConnectContext

API = "https://api.pipedrive.com"
OAUTH = "https://oauth.pipedrive.com"
#: The loopback port of the OAuth redirect: register ``http://127.0.0.1:8719/callback`` as the app's callback URL.
REDIRECT_PORT = 8719


def oauth_connect(ctx: ConnectContext, base_url: str, given: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Tokens for an OAuth connection (stored in the secret) and the settings and base URL they give."""
    opts = ctx.options
    client_id = str(opts.get("client_id") or given.get("client_id") or "")
    if not client_id:
        raise UsageError("--oauth needs --client-id (the Pipedrive app's client id)")
    client_secret = ctx.io.secret("Pipedrive app client secret").strip()
    if not client_secret:
        raise UsageError("no client secret was given")
    # The OAuth server is its own host; a test server (--base-url) serves both.
    oauth_base = OAUTH if base_url == API else base_url
    token_url = str(opts.get("token_url") or f"{oauth_base}/oauth/token")
    if given.get("refresh_token"):
        # The environment's secret already holds a grant: renew it rather than ask for another.
        form = {"grant_type": "refresh_token", "refresh_token": str(given["refresh_token"])}
    else:
        port = opts.get("redirect_port")
        grant = oauth.authorize(
            ctx.io,
            authorize_url=str(opts.get("authorize_url") or f"{oauth_base}/oauth/authorize"),
            params={"client_id": client_id},
            no_browser=bool(opts.get("no_browser")),
            pkce=False,
            port=int(port) if port is not None else (REDIRECT_PORT if base_url == API else 0),
        )
        form = {"grant_type": "authorization_code", "code": grant.code, "redirect_uri": grant.redirect_uri}
    with ctx.token_client() as client:
        tokens = token_request(client, token_url, {"client_id": client_id, "client_secret": client_secret, **form})
    domain = api_domain(tokens.get("api_domain"), https=base_url == API) or base_url
    secret = {
        "kind": "oauth",
        "client_id": client_id,
        "client_secret": client_secret,
        "access_token": tokens["access_token"],
        "refresh_token": tokens.get("refresh_token") or form.get("refresh_token", ""),
        "expires_at": time.time() + float(tokens.get("expires_in") or 3599),
    }
    ctx.secrets.set(ctx.name, secret)
    scopes = sorted(set(str(tokens.get("scope") or "").replace(",", " ").split()))
    return {"auth": "oauth", "token_url": token_url, "scopes": scopes}, domain


def api_domain(value: Any, *, https: bool) -> str | None:
    """The token answer's ``api_domain`` as a base URL, or None when it is no http(s) origin (https
    only against the real service: the tokens must never travel in clear text)."""
    if not isinstance(value, str):
        return None
    parts = urlsplit(value.strip())
    if parts.scheme not in (("https",) if https else ("http", "https")) or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def token_request(client: httpx.Client, url: str, form: dict[str, str]) -> dict[str, Any]:
    """Pipedrive's token endpoint: client credentials in a Basic header, the grant in the form."""
    client_id, client_secret = form.pop("client_id", ""), form.pop("client_secret", "")
    response = client.post(url, data=form, auth=(client_id, client_secret))
    if response.status_code != 200:
        raise AuthError(f"Pipedrive refused the token request: HTTP {response.status_code} {response.text[:200]}")
    body = response.json()
    if not isinstance(body, dict) or "access_token" not in body:
        raise AuthError("Pipedrive's token answer holds no access token")
    return body
