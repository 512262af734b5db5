"""The OAuth 2.0 authorization-code flow with a loopback redirect, shared by HubSpot and Zoho.

A one-shot HTTP server on 127.0.0.1 and a random port receives the redirect; ``state`` is a
random value checked on return: a request with another state (a stale tab, a page on the same
machine guessing the port) gets an error page and the listener keeps waiting for the real one.
PKCE (RFC 7636, S256) binds the code to this process: the authorisation request carries the
challenge and the token request the verifier, so a code seen by anyone else is worth nothing.
Without a browser (``--no-browser``, or none could open) the URL is printed and the user pastes
back the redirected URL or just the code.
"""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

from crmsync.credentials import OAuthSession, SecretStore
from crmsync.errors import AuthError, UsageError

if TYPE_CHECKING:
    from crmsync.providers.base import ConnectIO

CALLBACK_PATH = "/callback"


@dataclass
class CodeGrant:
    """What came back on the redirect."""

    code: str
    redirect_uri: str
    params: dict[str, str]
    #: The PKCE verifier to send with the token request (empty when PKCE was not used).
    code_verifier: str = ""


def pkce_pair() -> tuple[str, str]:
    """A PKCE verifier and its S256 challenge: base64url(SHA-256(verifier)) without padding."""
    verifier = secrets.token_urlsafe(64)  # 86 characters, within RFC 7636's 43..128
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class _Catcher(HTTPServer):
    result: dict[str, str] | None = None
    done: threading.Event
    state: str


def _page(title: str, text: str) -> bytes:
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>crmsync: {html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    ).encode()


def _handler() -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            if parsed.path != CALLBACK_PATH:
                self._answer(404, _page("Not found", "This address only receives crmsync's authorisation."))
                return
            server: _Catcher = self.server  # type: ignore[assignment]
            returned = dict(urllib.parse.parse_qsl(parsed.query))
            if not secrets.compare_digest(returned.get("state", ""), server.state):
                # Not the redirect crmsync started: refuse it and keep waiting for the real one.
                self._answer(
                    400,
                    _page(
                        "Authorisation not accepted",
                        "This redirect does not belong to the crmsync connect now waiting (its state differs). "
                        "Start the authorisation from the URL crmsync printed.",
                    ),
                )
                return
            server.result = returned
            self._answer(200, _page("Authorisation received", "You can close this window and return to crmsync."))
            server.done.set()

    return Handler


def authorize(
    io: ConnectIO,
    *,
    authorize_url: str,
    params: dict[str, str],
    no_browser: bool = False,
    timeout: float = 300.0,
    pkce: bool = True,
    port: int = 0,
) -> CodeGrant:
    """Run the code flow; returns the code, the redirect URI used, every returned parameter and
    the PKCE verifier the token request must carry. ``port`` 0 takes any free one; a CRM that
    matches the redirect URI exactly against the app's registration (Pipedrive) needs a fixed one."""
    state = secrets.token_urlsafe(24)
    verifier, challenge = pkce_pair() if pkce else ("", "")
    try:
        server = _Catcher(("127.0.0.1", port), _handler())
    except OSError as exc:
        raise UsageError(f"cannot listen on 127.0.0.1:{port} for the OAuth redirect: {exc.strerror}") from None
    server.done = threading.Event()
    server.state = state
    redirect_uri = f"http://127.0.0.1:{server.server_address[1]}{CALLBACK_PATH}"
    extra = {"code_challenge": challenge, "code_challenge_method": "S256"} if pkce else {}
    query = urllib.parse.urlencode({**params, "redirect_uri": redirect_uri, "state": state, **extra})
    url = f"{authorize_url}{'&' if '?' in authorize_url else '?'}{query}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        opened = False if no_browser else io.open_url(url)
        if opened:
            io.info("Waiting for the browser to return to crmsync …")
            if not server.done.wait(timeout):
                raise AuthError("no authorisation arrived in time", hint="try again, or use --no-browser")
            returned = server.result or {}
        else:
            io.info(f"Open this URL in a browser and approve access:\n  {url}")
            if server.done.wait(0.5):
                returned = server.result or {}
            else:
                pasted = io.ask("Paste the URL your browser was sent to (or just the code)").strip()
                if not pasted and server.done.wait(1):
                    returned = server.result or {}
                elif "code=" in pasted:
                    returned = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(pasted).query))
                elif pasted:
                    returned = {"code": pasted, "state": state}
                else:
                    raise UsageError("no code was given")
    finally:
        server.shutdown()
        server.server_close()
    if "error" in returned:
        raise AuthError(f"the authorisation was refused: {returned.get('error')}")
    if returned.get("state") != state:
        raise AuthError("the OAuth state did not match: the redirect was not the one crmsync started")
    code = returned.get("code")
    if not code:
        raise AuthError("the redirect carried no authorisation code")
    return CodeGrant(code=code, redirect_uri=redirect_uri, params=returned, code_verifier=verifier)


TokenRequest = Callable[[Any, str, dict[str, str]], dict[str, Any]]  # (client, url, form) -> token fields


def refresh_session(
    *,
    secrets: SecretStore,
    connection: str,
    token_client: Any,
    token_url: str,
    token_request: TokenRequest,
    scheme: str,
) -> OAuthSession:
    """An OAuthSession refreshing with the standard refresh_token grant at ``token_url``."""

    def refresher(current: dict[str, Any]) -> dict[str, Any]:
        return token_request(
            token_client,
            token_url,
            {
                "grant_type": "refresh_token",
                "client_id": current.get("client_id", ""),
                "client_secret": current.get("client_secret", ""),
                "refresh_token": current.get("refresh_token", ""),
            },
        )

    return OAuthSession(
        store=secrets,
        connection=connection,
        refresher=refresher,
        header=lambda token: {"Authorization": f"{scheme} {token}"},
    )


class StaticIO:
    """ConnectIO with a fixed secret and no person at the other end (demo, benchmarks, tests)."""

    interactive = False

    def __init__(self, secret: str = "") -> None:
        self._secret = secret
        self.messages: list[str] = []

    def secret(self, prompt: str) -> str:
        return self._secret

    def ask(self, prompt: str) -> str:
        return ""

    def info(self, message: str) -> None:
        self.messages.append(message)

    def open_url(self, url: str) -> bool:
        return False
