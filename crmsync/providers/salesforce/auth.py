"""Salesforce OAuth: the web-server flow with PKCE, refresh, and the JWT bearer flow for cron.

Every token answer names the org's ``instance_url``: the API is called there, never on the login
host (``login.salesforce.com``, ``test.salesforce.com`` or a My Domain). Access tokens carry no
``expires_in``; they are renewed when the API answers 401 ``INVALID_SESSION_ID``: by the refresh
token, or for the JWT flow by a freshly signed assertion (that flow issues no refresh token).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from crmsync import oauth
from crmsync.credentials import SecretStore
from crmsync.errors import AuthError, UsageError
from crmsync.providers.base import ConnectContext

LOGIN_HOSTS = {"login": "https://login.salesforce.com", "test": "https://test.salesforce.com"}
TOKEN_PATH = "/services/oauth2/token"
AUTHORIZE_PATH = "/services/oauth2/authorize"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: ``api`` for REST and Bulk; ``refresh_token`` so a cron run can renew without a person.
SCOPES = "api refresh_token"
#: A JWT assertion's life: Salesforce accepts at most a few minutes.
ASSERTION_SECONDS = 180


def login_host(value: str | None) -> str:
    """``login``, ``test``, a My Domain name or a full URL, as the base URL of the token endpoint."""
    value = (value or "login").strip().rstrip("/")
    if value in LOGIN_HOSTS:
        return LOGIN_HOSTS[value]
    if value.startswith(("https://", "http://")):
        return value
    if "." not in value:
        return f"https://{value}.my.salesforce.com"
    return f"https://{value}"


def token_request(client: httpx.Client, url: str, form: dict[str, str]) -> dict[str, Any]:
    """POST a grant to the token endpoint; the answer's fields, or AuthError with Salesforce's reason."""
    try:
        response = client.post(url, data=form)
    except httpx.HTTPError as exc:
        raise AuthError(f"cannot reach the Salesforce token endpoint {url}: {type(exc).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
        reason = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
        raise AuthError(f"Salesforce refused the token request: HTTP {response.status_code} {reason or ''}".strip())
    if not body.get("instance_url"):
        raise AuthError("Salesforce's token answer names no instance_url")
    return body


def read_private_key(path: str) -> str:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--jwt-key {path!r}: cannot read it ({exc.strerror})") from None
    if "PRIVATE KEY" not in text:
        raise UsageError(f"--jwt-key {path!r}: not a PEM private key")
    return text


def jwt_assertion(*, private_key: str, client_id: str, username: str, audience: str, now: float | None = None) -> str:
    """An RS256 assertion: ``iss`` the consumer key, ``sub`` the user, ``aud`` the login host."""
    try:
        import jwt
    except ModuleNotFoundError:
        raise UsageError("the JWT bearer flow needs PyJWT: pip install 'crmsync[salesforce]'") from None
    issued = time.time() if now is None else now
    claims = {"iss": client_id, "sub": username, "aud": audience, "exp": int(issued) + ASSERTION_SECONDS}
    try:
        return str(jwt.encode(claims, private_key, algorithm="RS256"))
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise UsageError(f"the JWT key cannot sign an RS256 assertion: {exc}") from None


def jwt_grant(client: httpx.Client, secret: Mapping[str, Any]) -> dict[str, Any]:
    host = str(secret.get("login_host") or LOGIN_HOSTS["login"])
    # The audience is the production or sandbox login URL, also for a My Domain token endpoint
    # (sandbox My Domains end in .sandbox.my.salesforce.com); an emulator on plain http is its own.
    if host.startswith("http://"):
        audience = host
    elif host == LOGIN_HOSTS["test"] or ".sandbox.my.salesforce.com" in host:
        audience = LOGIN_HOSTS["test"]
    else:
        audience = LOGIN_HOSTS["login"]
    assertion = jwt_assertion(
        private_key=str(secret.get("private_key") or ""),
        client_id=str(secret.get("client_id") or ""),
        username=str(secret.get("username") or ""),
        audience=audience,
    )
    return token_request(client, host + TOKEN_PATH, {"grant_type": JWT_GRANT, "assertion": assertion})


def refresh_grant(client: httpx.Client, secret: Mapping[str, Any]) -> dict[str, Any]:
    host = str(secret.get("login_host") or LOGIN_HOSTS["login"])
    form = {
        "grant_type": "refresh_token",
        "client_id": str(secret.get("client_id") or ""),
        "refresh_token": str(secret.get("refresh_token") or ""),
    }
    if secret.get("client_secret"):
        form["client_secret"] = str(secret["client_secret"])
    return token_request(client, host + TOKEN_PATH, form)


class SalesforceSession:
    """Bearer headers from the stored secret; ``refresh`` renews once per stale token, across threads.

    The new token is written back where the secret lives before it is used, so a crash right after
    a renewal never strands it; a rotated refresh token replaces the old one.
    """

    def __init__(self, *, store: SecretStore, connection: str, token_client: Any) -> None:
        self.store, self.connection, self.token_client = store, connection, token_client
        self._lock = threading.Lock()
        self._secret = store.require(connection)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._secret.get('access_token', '')}"}

    def refresh(self, stale: Mapping[str, str]) -> bool:
        with self._lock:
            if self.headers() != dict(stale):
                return True  # another thread renewed it while this one waited
            current = self.store.get(self.connection) or self._secret
            if current.get("access_token") != self._secret.get("access_token"):
                self._secret = current  # another process renewed it
                return True
            kind = current.get("kind")
            if kind == "jwt":
                new = jwt_grant(self.token_client, current)
            elif current.get("refresh_token"):
                new = refresh_grant(self.token_client, current)
            else:
                return False
            updated = {**current, "access_token": new["access_token"], "instance_url": new["instance_url"]}
            if new.get("refresh_token"):
                updated["refresh_token"] = new["refresh_token"]
            self.store.save_refreshed(self.connection, updated)
            self._secret = updated
            return True


def grant(ctx: ConnectContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new connection's secret and token answer: the JWT bearer flow with ``--jwt-key``, else the web-server flow
    (or a refresh, when the environment's secret already holds a grant)."""
    opts, given = ctx.options, ctx.given or {}
    host = login_host(opts.get("login_host") or given.get("login_host") or ctx.base_url)
    client_id = str(opts.get("client_id") or given.get("client_id") or "")
    if not client_id:
        raise UsageError("Salesforce needs --client-id (the connected app's consumer key)")
    jwt_key = opts.get("jwt_key")
    if jwt_key or given.get("kind") == "jwt":
        username = str(opts.get("user") or opts.get("username") or given.get("username") or "")
        if not username:
            raise UsageError("the JWT bearer flow needs --username (the Salesforce user to act as)")
        key = read_private_key(str(jwt_key)) if jwt_key else str(given.get("private_key") or "")
        secret: dict[str, Any] = {
            "kind": "jwt",
            "client_id": client_id,
            "username": username,
            "private_key": key,
            "login_host": host,
        }
        tokens = jwt_grant(ctx.token_client(), secret)
    else:
        client_secret = ctx.io.secret("Salesforce connected app consumer secret (empty for none)").strip()
        secret = {"kind": "oauth", "client_id": client_id, "client_secret": client_secret, "login_host": host}
        if given.get("refresh_token"):
            # The environment's secret already holds a grant: renew it rather than ask for another.
            secret["refresh_token"] = str(given["refresh_token"])
            tokens = refresh_grant(ctx.token_client(), secret)
        else:
            code = oauth.authorize(
                ctx.io,
                authorize_url=host + AUTHORIZE_PATH,
                params={"response_type": "code", "client_id": client_id, "scope": SCOPES},
                no_browser=bool(opts.get("no_browser")),
            )
            form = {
                "grant_type": "authorization_code",
                "code": code.code,
                "client_id": client_id,
                "redirect_uri": code.redirect_uri,
                "code_verifier": code.code_verifier,
            }
            if client_secret:
                form["client_secret"] = client_secret
            tokens = token_request(ctx.token_client(), host + TOKEN_PATH, form)
    secret.update(access_token=tokens["access_token"], instance_url=tokens["instance_url"])
    if tokens.get("refresh_token"):
        secret["refresh_token"] = tokens["refresh_token"]
    return secret, tokens


def identity(url: str) -> tuple[str | None, str | None]:
    """Org and user ids from the token's ``id`` URL (``…/id/<orgId>/<userId>``)."""
    parts = [p for p in urlsplit(url).path.split("/") if p]
    if len(parts) >= 3 and parts[-3] == "id":
        return parts[-2], parts[-1]
    return None, None
