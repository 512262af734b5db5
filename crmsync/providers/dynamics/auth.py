"""Microsoft Entra ID tokens for the Dataverse Web API, through ``msal``.

Two kinds of connection (reference §1):

* an **application user** (cron): client credentials, with a secret or a certificate; the token for
  ``<org-url>/.default`` is asked for again when it is near its end or refused;
* a **person** at a terminal: authorisation code with PKCE on a loopback redirect (``crmsync.oauth``),
  scope ``<org-url>/user_impersonation``; the refresh token renews it (``OAuthSession``).

msal speaks to the token endpoint through our own token client (``MsalHttp``), so tests and the
sandbox reach the emulator's Entra endpoints by the same transport as the Web API. msal accepts only
``https`` authorities; an ``http`` authority on loopback (the emulator) is given to msal as ``https``
and sent as ``http`` by ``MsalHttp``, never for any other host.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from crmsync.credentials import OAuthSession, SecretStore
from crmsync.errors import AuthError, UsageError

LOGIN = "https://login.microsoftonline.com"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: A token is asked for again this long before it ends.
SKEW = 120.0


class MsalHttp:
    """The ``http_client`` msal calls (``get``/``post`` with requests' keywords), over an httpx client."""

    def __init__(self, client: Any, plain_origin: str | None) -> None:
        self.client, self.plain_origin = client, plain_origin

    def _url(self, url: str) -> str:
        if self.plain_origin and url.startswith(f"https://{self.plain_origin}/"):
            return "http://" + url[len("https://") :]
        return url

    def get(self, url: str, params: Any = None, headers: Any = None, **_: Any) -> httpx.Response:
        return self.client.get(self._url(url), params=params, headers=headers)

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None, **_: Any) -> httpx.Response:
        if isinstance(data, dict):
            # requests form-encodes bytes as their text (a signed assertion is bytes); httpx would not.
            data = {k: v.decode() if isinstance(v, bytes) else v for k, v in data.items()}
        return self.client.post(self._url(url), params=params, data=data, headers=headers)

    def close(self) -> None:
        return None


def authority(tenant: str) -> tuple[str, str | None]:
    """(the authority msal is given, the origin reached over plain http or None) for a ``--tenant``.

    A tenant is a GUID or a domain (``contoso.onmicrosoft.com``) under Entra's global cloud; a full
    URL names another authority (a national cloud, or the emulator on loopback).
    """
    tenant = tenant.strip()
    if not tenant:
        raise UsageError("--tenant is required: the Entra tenant id or domain (e.g. contoso.onmicrosoft.com)")
    if "://" not in tenant:
        if "/" in tenant or " " in tenant:
            raise UsageError(f"--tenant {tenant!r}: give the tenant id or domain, or a full authority URL")
        return f"{LOGIN}/{tenant}", None
    parts = urlsplit(tenant)
    path = parts.path.strip("/")
    if parts.scheme not in ("http", "https") or not parts.hostname or not path:
        raise UsageError(f"--tenant {tenant!r}: an authority URL looks like https://login.example/<tenant>")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK:
        raise UsageError(f"--tenant {tenant!r}: an http:// authority is accepted on loopback only (a test server)")
    return f"https://{parts.netloc}/{path}", (parts.netloc if parts.scheme == "http" else None)


def scope_of(base_url: str, *, delegated: bool) -> str:
    """``https://org.crm.dynamics.com/.default`` (an application) or ``…/user_impersonation`` (a person)."""
    return f"{base_url.rstrip('/')}/{'user_impersonation' if delegated else '.default'}"


def certificate_credential(pem: str) -> dict[str, str]:
    """msal's certificate credential from one PEM holding the private key and the certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise UsageError("--certificate: the file holds no PEM certificate (BEGIN CERTIFICATE)") from None
    if "PRIVATE KEY-----" not in pem:
        raise UsageError("--certificate: the file holds no private key (BEGIN PRIVATE KEY)")
    thumbprint = hashlib.sha1(cert.public_bytes(Encoding.DER)).hexdigest()
    start = pem.index("-----BEGIN CERTIFICATE-----")
    end = pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return {"private_key": pem, "thumbprint": thumbprint, "public_certificate": pem[start:end]}


def _app(secret: Mapping[str, Any], http: MsalHttp) -> Any:
    import msal

    auth_url, _ = authority(str(secret["tenant"]))
    custom = not auth_url.startswith(LOGIN + "/")
    common: dict[str, Any] = {"authority": auth_url, "http_client": http}
    if custom:
        # A test or sovereign authority: no lookup of the host at login.microsoftonline.com.
        common.update(validate_authority=False, instance_discovery=False)
    try:
        if secret.get("kind") == "authorization_code":
            return msal.PublicClientApplication(str(secret["client_id"]), **common)
        credential: Any = secret.get("client_secret")
        if secret.get("kind") == "certificate":
            credential = certificate_credential(str(secret["certificate"]))
        return msal.ConfidentialClientApplication(str(secret["client_id"]), client_credential=credential, **common)
    except ValueError as exc:  # msal's discovery of the authority failed
        raise AuthError(f"the Entra authority {auth_url} could not be used: {str(exc).splitlines()[0][:200]}") from None


def _check(result: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not result or "access_token" not in result:
        result = result or {}
        detail = str(result.get("error_description") or result.get("error") or "no token").splitlines()[0]
        raise AuthError(f"Microsoft Entra ID refused the token request: {detail[:300]}")
    return result


def client_token(secret: Mapping[str, Any], http: MsalHttp, scope: str) -> Mapping[str, Any]:
    """A token for an application user (client credentials, secret or certificate)."""
    return _check(_app(secret, http).acquire_token_for_client(scopes=[scope]))


def code_token(
    secret: Mapping[str, Any], http: MsalHttp, scope: str, *, code: str, redirect_uri: str, verifier: str
) -> Mapping[str, Any]:
    """Tokens for a person, from the authorisation code and the PKCE verifier."""
    app = _app(secret, http)
    return _check(
        app.acquire_token_by_authorization_code(
            code, scopes=[scope], redirect_uri=redirect_uri, data={"code_verifier": verifier}
        )
    )


def authorize_url(secret: Mapping[str, Any], http: MsalHttp) -> str:
    """The authorisation endpoint the tenant's discovery document names."""
    return str(_app(secret, http).authority.authorization_endpoint)


class AppAuth:
    """Bearer tokens of an application user, asked for when near their end or refused (``Auth``)."""

    def __init__(self, secret: Mapping[str, Any], http: MsalHttp, scope: str, clock: Callable[[], float] = time.time):
        self.secret, self.http, self.scope, self.clock = dict(secret), http, scope, clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def _fetch(self) -> None:
        result = client_token(self.secret, self.http, self.scope)
        self._token = str(result["access_token"])
        self._expires = self.clock() + float(result.get("expires_in") or 3600)

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or self._expires - SKEW <= self.clock():
                self._fetch()
            return {"Authorization": f"Bearer {self._token}"}

    def refresh(self, stale: Mapping[str, str]) -> bool:
        with self._lock:
            if {"Authorization": f"Bearer {self._token}"} != dict(stale):
                return True  # another thread already has a new one
            self._fetch()
            return True


def user_session(*, secrets: SecretStore, connection: str, token_client: Any, scope: str) -> OAuthSession:
    """A person's tokens, renewed with the refresh token through msal."""

    def refresher(current: dict[str, Any]) -> dict[str, Any]:
        _, plain = authority(str(current["tenant"]))
        app = _app(current, MsalHttp(token_client, plain))
        result = _check(app.acquire_token_by_refresh_token(str(current.get("refresh_token") or ""), scopes=[scope]))
        out = {"access_token": result["access_token"], "expires_in": result.get("expires_in", 3600)}
        if result.get("refresh_token"):
            out["refresh_token"] = result["refresh_token"]
        return out

    return OAuthSession(
        store=secrets,
        connection=connection,
        refresher=refresher,
        header=lambda token: {"Authorization": f"Bearer {token}"},
    )


def make_auth(*, connection: str, secrets: SecretStore, token_client: Any, base_url: str) -> Any:
    """The Auth of a stored connection."""
    secret = secrets.require(connection)
    kind = secret.get("kind")
    if kind not in ("client_secret", "certificate", "authorization_code") or not secret.get("tenant"):
        raise AuthError(f"the secret of connection {connection!r} is not a Dynamics credential")
    _, plain = authority(str(secret["tenant"]))
    if kind == "authorization_code":
        return user_session(
            secrets=secrets, connection=connection, token_client=token_client, scope=scope_of(base_url, delegated=True)
        )
    return AppAuth(secret, MsalHttp(token_client, plain), scope_of(base_url, delegated=False))
