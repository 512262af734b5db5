"""Microsoft Entra ID as msal meets it, for the Dynamics emulator: discovery, tokens, the authorisation page.

* ``/{tenant}/v2.0/.well-known/openid-configuration``: msal's tenant discovery; the endpoints are named
  ``https://`` as Entra names them (msal refuses others; crmsync maps a loopback test host itself);
* ``/common/discovery/instance``: the aliases msal asks for before it uses its token cache;
* ``/{tenant}/oauth2/v2.0/token``: client credentials with a secret (HTTP Basic, as msal sends it, or
  the form) or a certificate's signed ``client_assertion`` (``x5t``/``x5t#S256``); authorisation code
  with PKCE S256; refresh token. A token is for one environment (its scope's host, ``/.default`` or
  ``/user_impersonation``) and the Web API refuses it anywhere else;
* ``/{tenant}/oauth2/v2.0/authorize``: consents at once and redirects to a loopback ``redirect_uri``;
* errors as Entra writes them: ``{"error", "error_description": "AADSTS<n>: …", "error_codes": [n]}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import httpx

from crmsync.emulators.base import Faults, json_response


def iso(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class EntraEndpoints:
    """The Entra half of the Dynamics emulator (a mixin: the emulator holds the app registration and tokens)."""

    tenant: str
    client_id: str
    client_secret: str
    certificates: dict[str, Any]
    tokens: dict[str, tuple[float, str]]
    audiences: dict[str, str]
    refresh_tokens: dict[str, str]
    codes: dict[str, dict[str, str]]
    app_user: str
    person: str
    faults: Faults
    now: Callable[[], float]  # the emulator's clock (Emulator.now)

    def add_certificate(self, pem: str) -> None:
        """Register a certificate (its public key) on the app registration, as the portal's Certificates tab does."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        cert = x509.load_pem_x509_certificate(pem.encode())
        der = cert.public_bytes(Encoding.DER)
        for digest in (hashlib.sha1(der).digest(), hashlib.sha256(der).digest()):  # x5t and x5t#S256
            self.certificates[_b64url(digest)] = cert.public_key()

    def _authority(self, request: httpx.Request) -> str:
        """Entra's endpoints are always named https (msal refuses others); the client maps a loopback test host."""
        return f"https://{request.headers.get('host') or request.url.netloc.decode()}"

    def _discovery(self, request: httpx.Request, tenant: str) -> httpx.Response:
        if tenant not in (self.tenant, "organizations", "common"):
            return self._aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        base = f"{self._authority(request)}/{self.tenant}"
        return json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/v2.0",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": "EU",
            }
        )

    def _instance(self, request: httpx.Request) -> httpx.Response:
        """Entra's instance discovery (msal asks it for the aliases of a host before using its token cache)."""
        host = request.headers.get("host") or ""
        return json_response(
            {
                "tenant_discovery_endpoint": f"https://{host}/common/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [
                    {
                        "preferred_network": "login.microsoftonline.com",
                        "preferred_cache": "login.windows.net",
                        "aliases": [
                            "login.microsoftonline.com",
                            "login.windows.net",
                            "login.microsoft.com",
                            "sts.windows.net",
                        ],
                    }
                ],
            }
        )

    def _aad_error(self, status: int, error: str, code: int, text: str) -> httpx.Response:
        return json_response(
            {
                "error": error,
                "error_description": f"AADSTS{code}: {text} Trace ID: {uuid.uuid4()} Timestamp: {iso(self.now())}",
                "error_codes": [code],
                "timestamp": iso(self.now()),
                "trace_id": str(uuid.uuid4()),
                "correlation_id": str(uuid.uuid4()),
            },
            status,
        )

    @staticmethod
    def _audience(scopes: list[str], *suffixes: str) -> str | None:
        """The environment (host) a token is asked for: ``https://org.crm.dynamics.com/.default``."""
        for scope in scopes:
            parts = urlsplit(scope)
            if parts.scheme in ("http", "https") and parts.netloc and scope.endswith(suffixes):
                return parts.netloc
        return None

    def _issue(self, user: str, audience: str, *, refresh: bool = False, client_info: bool = False) -> dict[str, Any]:
        token = f"eyJ0eXAiOiJKV1QifQ.{secrets.token_urlsafe(32)}.sig"
        ttl = self.faults.token_ttl if self.faults.token_ttl is not None else 3599
        self.tokens[token] = (self.now() + ttl, user)
        self.audiences[token] = audience
        out: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": int(ttl),
            "ext_expires_in": int(ttl),
            "access_token": token,
        }
        if refresh:
            rt = secrets.token_urlsafe(48)
            self.refresh_tokens[rt] = user
            out["refresh_token"] = rt
        if client_info:
            out["client_info"] = _b64url(json.dumps({"uid": user, "utid": self.tenant}).encode())
        return out

    def _client_ok(self, request: httpx.Request, form: dict[str, str]) -> str | None:
        """None when the client authenticated (secret in Basic or the form, or a certificate's assertion)."""
        auth = request.headers.get("authorization", "")
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        if auth.lower().startswith("basic "):
            raw = base64.b64decode(auth[6:]).decode()
            cid, _, secret = raw.partition(":")
            client_id = unquote(cid.replace("+", " "))
            secret = unquote(secret.replace("+", " "))
        if client_id != self.client_id:
            return "AADSTS700016: Application with identifier was not found in the directory."
        if secret is not None:
            return (
                None
                if secrets.compare_digest(secret, self.client_secret)
                else "AADSTS7000215: Invalid client secret provided."
            )
        assertion = form.get("client_assertion")
        if assertion and form.get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            import jwt

            try:
                header = jwt.get_unverified_header(assertion)
                thumbprint = str(header.get("x5t#S256") or header.get("x5t") or "").rstrip("=")
                key = self.certificates.get(thumbprint)
                if key is None:
                    return (
                        "AADSTS700027: The certificate with identifier used to sign the client assertion is "
                        "not registered on application."
                    )
                claims = jwt.decode(assertion, key, algorithms=["RS256", "PS256"], options={"verify_aud": False})
            except jwt.PyJWTError as exc:
                return f"AADSTS700027: Client assertion failed signature validation. ({exc})"
            return (
                None
                if claims.get("iss") == self.client_id == claims.get("sub")
                else "AADSTS700023: Client assertion issuer mismatch."
            )
        return (
            "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'."
        )

    def _token(self, request: httpx.Request, tenant: str) -> httpx.Response:
        if tenant != self.tenant:
            return self._aad_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        scopes = form.get("scope", "").split()
        grant = form.get("grant_type")
        if grant == "client_credentials":
            problem = self._client_ok(request, form)
            if problem:
                return self._aad_error(401, "invalid_client", int(problem[6:].split(":")[0]), problem.split(": ", 1)[1])
            audience = self._audience(scopes, "/.default")
            if audience is None:
                return self._aad_error(
                    400,
                    "invalid_scope",
                    1002012,
                    "The provided value for scope is not valid. Client credential flows must have a "
                    "scope value with /.default suffixed to the resource identifier (application ID URI).",
                )
            return json_response(self._issue(self.app_user, audience))
        if form.get("client_id") != self.client_id:
            return self._aad_error(
                400, "unauthorized_client", 700016, "Application with identifier was not found in the directory."
            )
        if grant == "authorization_code":
            grant_doc = self.codes.pop(form.get("code", ""), None)
            if grant_doc is None:
                return self._aad_error(
                    400, "invalid_grant", 70000, "The provided authorization code is invalid or expired."
                )
            if grant_doc["redirect_uri"] != form.get("redirect_uri"):
                return self._aad_error(
                    400, "invalid_grant", 50148, "The redirect URI does not match the one of the authorization request."
                )
            verifier = form.get("code_verifier", "")
            if grant_doc["challenge"] and _b64url(hashlib.sha256(verifier.encode()).digest()) != grant_doc["challenge"]:
                return self._aad_error(
                    400,
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                )
            audience = self._audience(scopes, "/user_impersonation", "/.default")
            if audience is None:
                return self._aad_error(
                    400, "invalid_scope", 70011, "The provided value for the input parameter 'scope' is not valid."
                )
            out = self._issue(self.person, audience, refresh=True, client_info=True)
            out["scope"] = grant_doc["scope"]
            out["id_token"] = self._id_token(request, form.get("client_id", ""))
            return json_response(out)
        if grant == "refresh_token":
            user = self.refresh_tokens.get(form.get("refresh_token", ""))
            if user is None:
                return self._aad_error(400, "invalid_grant", 700082, "The refresh token has expired due to inactivity.")
            audience = self._audience(scopes, "/user_impersonation", "/.default")
            if audience is None:
                return self._aad_error(
                    400, "invalid_scope", 70011, "The provided value for the input parameter 'scope' is not valid."
                )
            return json_response(self._issue(user, audience, refresh=True, client_info=True))
        return self._aad_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")

    def _id_token(self, request: httpx.Request, client_id: str) -> str:
        now = int(self.now())
        claims = {
            "aud": client_id,
            "iss": f"{self._authority(request)}/{self.tenant}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "oid": self.person,
            "tid": self.tenant,
            "sub": self.person,
            "preferred_username": "admin@example.com",
            "name": "Pat Admin",
            "ver": "2.0",
        }
        return ".".join([_b64url(b'{"typ":"JWT","alg":"none"}'), _b64url(json.dumps(claims).encode()), ""])

    def _authorize(self, request: httpx.Request, tenant: str) -> httpx.Response:
        q = {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}
        redirect = q.get("redirect_uri", "")
        if q.get("client_id") != self.client_id or not redirect.startswith(("http://127.0.0.1", "http://localhost")):
            return self._aad_error(
                400,
                "invalid_request",
                50011,
                "The redirect URI specified in the request does not match the redirect URIs configured "
                "for the application.",
            )
        if q.get("code_challenge") and q.get("code_challenge_method") != "S256":
            return self._aad_error(400, "invalid_request", 501491, "Invalid code_challenge_method.")
        code = secrets.token_urlsafe(32)
        self.codes[code] = {
            "redirect_uri": redirect,
            "challenge": q.get("code_challenge", ""),
            "scope": q.get("scope", ""),
        }
        location = (
            f"{redirect}?{urlencode({'code': code, 'state': q.get('state', ''), 'session_state': str(uuid.uuid4())})}"
        )
        return httpx.Response(302, headers={"Location": location})
