"""`crmsync connect`: provider-specific credential flow, then a verified connection row.

Nothing one-time is spent on a secret that cannot be kept: where the secret will live (the OS
keyring, a 0600 file with ``--insecure-storage``, or the environment) is proven writable before
the provider's flow starts, and the secret is written there only once the connection is verified,
so a failed connect leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from crmsync.credentials import PendingSecrets, Storage, env_name
from crmsync.errors import ConfigError, RetriableError, UsageError
from crmsync.model import utcnow
from crmsync.providers import get_provider
from crmsync.providers.base import ConnectContext, ConnectIO
from crmsync.store import CrmConnection

if TYPE_CHECKING:
    from crmsync.app import App

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: A server that does not answer at connect time is a typo or a server that is down: say so
#: quickly instead of retrying as a sync run would.
CONNECT_TIMEOUT = httpx.Timeout(30.0, connect=4.0)
CONNECT_DEADLINE = 8.0
CONNECT_ATTEMPTS = 2
#: Connect options every provider accepts (how the secret is read is not the provider's business).
_ANY_PROVIDER = frozenset({"token_stdin"})
#: Option keys whose command-line flag is not ``--`` + the key with dashes.
_FLAGS = {"db": "--db-name"}
#: Keys of a secret document that ``io.secret`` answers with when the secret comes from the env.
_PROMPTED_KEYS = ("token", "api_key", "password", "client_secret")


def check_base_url(base_url: str | None) -> str | None:
    """A usable --base-url (scheme and host), without its trailing slash; UsageError otherwise."""
    if not base_url:
        return None
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"--base-url {base_url!r}: give a full URL with http:// or https://, e.g. http://{base_url.strip()}"
            if parts.scheme not in ("http", "https")
            else f"--base-url {base_url!r}: the URL names no host"
        )
    try:
        _ = parts.port
    except ValueError:
        raise UsageError(f"--base-url {base_url!r}: the port is not a number from 0 to 65535") from None
    return base_url.strip().rstrip("/")


def given_secret(app: App, name: str) -> str | None:
    """The secret ``CRMSYNC_SECRET_<NAME>`` (or the file ``CRMSYNC_SECRET_FILE_<NAME>`` names) holds."""
    if app.env.get(env_name(name)) is not None:
        return app.env[env_name(name)]
    path = app.env.get(env_name(name, file=True))
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file named by {env_name(name, file=True)}: {exc.strerror}") from None


class EnvSecretIO:
    """ConnectIO answering secret prompts from ``CRMSYNC_SECRET_<NAME>`` instead of a person."""

    def __init__(self, io: ConnectIO, raw: str) -> None:
        self.io, self.interactive = io, io.interactive
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        self.doc: dict[str, Any] | None = doc if isinstance(doc, dict) else None
        if self.doc is not None:
            self.value = next((str(self.doc[k]) for k in _PROMPTED_KEYS if self.doc.get(k)), "")
        else:
            self.value = raw.strip()

    def secret(self, prompt: str) -> str:
        return self.value

    def ask(self, prompt: str) -> str:
        return self.io.ask(prompt)

    def info(self, message: str) -> None:
        self.io.info(message)

    def open_url(self, url: str) -> bool:
        return self.io.open_url(url)


def connect(
    app: App,
    *,
    provider: str,
    name: str,
    base_url: str | None,
    options: dict[str, Any],
    io: ConnectIO,
    insecure_storage: bool = False,
) -> CrmConnection:
    """Run the provider's connect flow and record the connection (no secrets in the store).

    The secret is kept in the OS keyring, in a 0600 file under the data directory with
    ``insecure_storage``, or left in ``CRMSYNC_SECRET_<NAME>`` (or ``CRMSYNC_SECRET_FILE_<NAME>``)
    when that is set; an OAuth secret given there is renewed with its refresh token.
    """
    if not NAME_RE.match(name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    cls = get_provider(provider)
    _check_options(cls.label, cls.connect_options, options)
    base_url = check_base_url(base_url)
    from_env = given_secret(app, name)
    storage: Storage = "file" if insecure_storage else "env" if from_env is not None else "keyring"
    app.secrets.probe(name, storage)  # before any prompt, grant code or request
    given: dict[str, Any] | None = None
    if from_env is not None:
        io = EnvSecretIO(io, from_env)
        given = io.doc
    pending = PendingSecrets(app.secrets, name)
    hosts: list[str] = [urlsplit(base_url).netloc] if base_url else []

    def client(url: str, auth: Any) -> Any:
        hosts.append(urlsplit(url).netloc)
        http = app.http_client(cls, name, url, auth)
        http.deadline, http.max_attempts = min(http.deadline, CONNECT_DEADLINE), CONNECT_ATTEMPTS
        http.client.timeout = CONNECT_TIMEOUT
        return http

    def token_client() -> httpx.Client:
        tokens = app.token_client(name)
        tokens.timeout = CONNECT_TIMEOUT
        tokens.event_hooks["request"].append(lambda request: _before_token_request(request, storage, name, hosts))
        return tokens

    ctx = ConnectContext(
        name=name,
        base_url=base_url,
        options=options,
        secrets=pending,
        io=io,
        client=client,
        token_client=token_client,
        given=given,
    )
    try:
        result = cls.connect(ctx)
    except RetriableError as exc:
        host = hosts[-1] if hosts else "the server"
        raise RetriableError(
            f"connecting to {host} failed: {exc.message}", hint="check --base-url and that the server is up"
        ) from None
    now = utcnow()
    conn = CrmConnection(
        name=name,
        provider=cls.name,
        account_id=result.account_id,
        base_url=result.base_url,
        scopes=result.scopes,
        settings={**result.settings, "secret_storage": storage},
        last_checked_at=now,
        last_ok_at=now,
        auth_state="ok",
    )
    pending.commit(storage)
    try:
        return app.store.connections.save(conn)
    except BaseException:
        if storage != "env":
            app.secrets.delete(name)
        raise


def _check_options(label: str, accepted: frozenset[str] | None, options: dict[str, Any]) -> None:
    """Refuse, in one line, options the provider would silently ignore."""
    if accepted is None:
        return
    unused = [k for k in options if k not in accepted and k not in _ANY_PROVIDER]
    if unused:
        flags = ", ".join(_FLAGS.get(k, "--" + k.replace("_", "-")) for k in unused)
        raise UsageError(f"{label} does not use {flags}; see crmsync connect --help")


def _before_token_request(request: httpx.Request, storage: Storage, name: str, hosts: list[str]) -> None:
    """Refuse to spend an authorisation code whose tokens would have nowhere to be kept."""
    hosts.append(request.url.netloc.decode("ascii"))
    if storage == "env" and b"grant_type=authorization_code" in request.content:
        raise ConfigError(
            f"{env_name(name)} is set, so crmsync keeps no secret of its own for {name!r}, "
            "and the tokens a new authorisation returns would be lost",
            hint=f"put the JSON secret with its refresh_token there, or unset {env_name(name)} "
            "and connect with an OS keyring or --insecure-storage",
        )
