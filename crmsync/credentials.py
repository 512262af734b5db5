"""Secrets: the only module that imports keyring.

Each connection has one keyring entry (service ``crmsync``, user = connection name) holding a
small JSON document: a private-app token, or OAuth client credentials plus access/refresh tokens
and their expiry. Nothing secret is ever written to the config file, the store or a log.

Where a secret comes from, in order: the OS keyring; ``CRMSYNC_SECRET_<CONNECTION>`` (the JSON
document or a bare token); ``CRMSYNC_SECRET_FILE_<CONNECTION>`` (a path, e.g. a mounted secret).
The environment forms exist for servers and containers that have no keyring daemon.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keyring
import keyring.errors
from filelock import FileLock
from keyring.backend import KeyringBackend

from crmsync.errors import AuthError, ConfigError
from crmsync.redact import register_secret

SERVICE = "crmsync"
_SECRET_KEYS = (
    "token",
    "access_token",
    "refresh_token",
    "client_secret",
    "api_key",
    "password",
    "webhook_secret",
)


def env_name(connection: str, *, file: bool = False) -> str:
    """``CRMSYNC_SECRET_<CONNECTION>`` with the name upper-cased and non-alphanumerics as ``_``."""
    suffix = re.sub(r"[^A-Za-z0-9]", "_", connection).upper()
    return f"CRMSYNC_SECRET_{'FILE_' if file else ''}{suffix}"


NO_KEYRING_HELP = (
    "no usable OS keyring to keep the secret of connection {name!r}. Options: "
    "(1) install and unlock a Secret Service (e.g. `apt-get install gnome-keyring dbus-user-session` "
    "and run inside a D-Bus session); "
    "(2) use an encrypted file: `pip install keyrings.cryptfile` and set "
    "PYTHON_KEYRING_BACKEND=keyrings.cryptfile.cryptfile.CryptFileKeyring; "
    "(3) set {env} to the secret (a token, or the JSON crmsync stores) or {env_file} to a file holding it"
)


class MemoryKeyring(KeyringBackend):
    """A keyring that lives in this process only: for `crmsync demo` and the tests."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if (service, username) not in self.entries:
            raise keyring.errors.PasswordDeleteError(username)
        del self.entries[(service, username)]


def keyring_usable() -> bool:
    """False when keyring has no backend that can store anything (a headless box)."""
    backend = keyring.get_keyring()
    name = type(backend).__module__ + "." + type(backend).__name__
    if name.startswith("keyring.backends.fail") or "null" in name.lower():
        return False
    if name.startswith("keyring.backends.chainer"):
        return bool(getattr(backend, "backends", []))
    return True


class SecretStore:
    """Reads and writes connection secrets; every secret read is registered for redaction."""

    def __init__(self, *, lock_dir: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.env = os.environ if env is None else env
        self.lock_dir = lock_dir
        self._lock = threading.RLock()

    def _register(self, secret: Mapping[str, Any]) -> None:
        for key in _SECRET_KEYS:
            value = secret.get(key)
            if isinstance(value, str):
                register_secret(value)

    def get(self, connection: str) -> dict[str, Any] | None:
        """The connection's secret document, or None when none is stored anywhere."""
        raw: str | None = None
        if keyring_usable():
            try:
                raw = keyring.get_password(SERVICE, connection)
            except keyring.errors.KeyringError:
                raw = None
        if raw is None:
            raw = self.env.get(env_name(connection))
        if raw is None and self.env.get(env_name(connection, file=True)):
            path = Path(self.env[env_name(connection, file=True)])
            try:
                raw = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the secret file named by {env_name(connection, file=True)}: {exc.strerror}"
                ) from None
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        secret = doc if isinstance(doc, dict) else {"token": raw.strip()}
        self._register(secret)
        return secret

    def require(self, connection: str) -> dict[str, Any]:
        """Like get(), but a missing secret is a clear ConfigError with the options."""
        secret = self.get(connection)
        if secret is not None:
            return secret
        if not keyring_usable():
            raise ConfigError(
                NO_KEYRING_HELP.format(
                    name=connection, env=env_name(connection), env_file=env_name(connection, file=True)
                )
            )
        raise AuthError(
            f"no secret is stored for connection {connection!r}",
            hint=f"run `crmsync connect` again, or set {env_name(connection)}",
        )

    def set(self, connection: str, secret: Mapping[str, Any]) -> None:
        """Store the secret document in the OS keyring."""
        self._register(secret)
        if not keyring_usable():
            raise ConfigError(
                NO_KEYRING_HELP.format(
                    name=connection, env=env_name(connection), env_file=env_name(connection, file=True)
                )
            )
        try:
            keyring.set_password(SERVICE, connection, json.dumps(dict(secret), sort_keys=True))
        except keyring.errors.KeyringError as exc:
            raise ConfigError(
                f"the OS keyring refused to store the secret of {connection!r}: {type(exc).__name__}"
            ) from None

    def update(self, connection: str, **changes: Any) -> dict[str, Any]:
        """Read-modify-write of one connection's secret (under the connection's lock)."""
        with self._lock:
            secret = self.get(connection) or {}
            secret.update(changes)
            self.set(connection, secret)
            return secret

    def delete(self, connection: str) -> None:
        if not keyring_usable():
            return
        try:
            keyring.delete_password(SERVICE, connection)
        except keyring.errors.PasswordDeleteError:
            pass

    def file_lock(self, connection: str) -> FileLock | None:
        """A cross-process lock serialising token refreshes of one connection."""
        if self.lock_dir is None:
            return None
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", connection)
        return FileLock(str(self.lock_dir / f"{safe}.refresh.lock"), timeout=60)


class StaticAuth:
    """A token that never expires (HubSpot private apps, Odoo API keys)."""

    def __init__(self, header: str, value: str) -> None:
        register_secret(value)
        self._headers = {header: value}

    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    def refresh(self, stale: Mapping[str, str]) -> bool:
        return False


Refresher = Callable[[dict[str, Any]], dict[str, Any]]


class OAuthSession:
    """OAuth 2.0 access tokens with refresh before expiry and on a 401.

    A refreshed token is written to the keyring before it is used, so a crash right after a
    refresh never strands the (possibly rotated) refresh token. Refreshes are serialised per
    connection across threads and processes; whoever waits re-reads the keyring first and
    uses a token another refresher already got.
    """

    def __init__(
        self,
        *,
        store: SecretStore,
        connection: str,
        refresher: Refresher,
        header: Callable[[str], dict[str, str]],
        skew: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.connection = store, connection
        self.refresher, self.header = refresher, header
        self.skew, self.clock = skew, clock
        self._lock = threading.Lock()
        self._secret = store.require(connection)

    @property
    def expires_at(self) -> float | None:
        value = self._secret.get("expires_at")
        return float(value) if value is not None else None

    def headers(self) -> dict[str, str]:
        exp = self.expires_at
        if exp is not None and exp - self.skew <= self.clock():
            self.refresh(self.header(self._secret.get("access_token", "")))
        return self.header(self._secret.get("access_token", ""))

    def refresh(self, stale: Mapping[str, str]) -> bool:
        with self._lock:
            if self.header(self._secret.get("access_token", "")) != dict(stale):
                return True  # another thread refreshed while we waited
            flock = self.store.file_lock(self.connection)
            if flock is not None:
                flock.acquire()
            try:
                current = self.store.get(self.connection) or self._secret
                fresh_elsewhere = current.get("access_token") != self._secret.get("access_token") and (
                    float(current.get("expires_at") or 0) - self.skew > self.clock()
                )
                if fresh_elsewhere:
                    self._secret = current
                    return True
                if not current.get("refresh_token"):
                    return False
                try:
                    new = self.refresher(dict(current))
                except AuthError:
                    raise
                updated = {**current, **new}
                if "expires_in" in new:
                    updated["expires_at"] = self.clock() + float(new["expires_in"])
                    updated.pop("expires_in", None)
                self.store.set(self.connection, updated)
                self._secret = updated
                return True
            finally:
                if flock is not None:
                    flock.release()
