"""Secrets: the only module that imports keyring.

Each connection has one secret: a small JSON document holding a private-app token, or OAuth
client credentials plus access/refresh tokens and their expiry. Nothing secret is ever written
to the config file, the store or a log.

Where a secret is kept, chosen at ``connect``: the OS keyring (service ``crmsync``, user = the
connection name); with ``--insecure-storage`` a 0600 file in a 0700 directory under the data
directory (``secrets/<name>.json``, the convention of ``gh auth login``); or nowhere, when it is
given in the environment. Where a secret is read from, in order: that file; the OS keyring;
``CRMSYNC_SECRET_<CONNECTION>`` (the JSON document or a bare token);
``CRMSYNC_SECRET_FILE_<CONNECTION>`` (a path, e.g. a mounted secret). A refreshed OAuth token goes
back where its secret came from; a secret from the environment keeps it for the run only.

The in-memory keyring below is for the tests and ``crmsync demo``: it is not viable, so keyring
never picks it by itself, and a headless box can never report "connected" and lose the secret.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import keyring
import keyring.errors
from filelock import FileLock
from keyring.backend import KeyringBackend

from crmsync.errors import AuthError, ConfigError
from crmsync.redact import register_secret

log = logging.getLogger(__name__)

SERVICE = "crmsync"
PROBE_USER = "crmsync-probe"  # the keyring entry written and removed to prove the keyring can store
_SECRET_KEYS = (
    "token",
    "access_token",
    "refresh_token",
    "client_secret",
    "api_key",
    "password",
    "webhook_secret",
)

Storage = Literal["keyring", "file", "env"]


def env_name(connection: str, *, file: bool = False) -> str:
    """``CRMSYNC_SECRET_<CONNECTION>`` with the name upper-cased and non-alphanumerics as ``_``."""
    suffix = re.sub(r"[^A-Za-z0-9]", "_", connection).upper()
    return f"CRMSYNC_SECRET_{'FILE_' if file else ''}{suffix}"


NO_KEYRING_HELP = (
    "no usable OS keyring to keep the secret of connection {name!r}{reason}. Options: "
    "(1) install and unlock an OS keyring (e.g. `apt-get install gnome-keyring dbus-user-session`, "
    "then run inside an unlocked D-Bus session); "
    "(2) pass --insecure-storage to `crmsync connect` to keep it in a file readable by you only, under {data_dir}; "
    "(3) set {env} to the secret (a token, or the JSON crmsync stores) or {env_file} to a file holding it"
)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) with mode 0700; an existing directory is left as it is."""
    if not path.is_dir():
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
        except OSError as exc:
            raise ConfigError(f"cannot create the directory {path}: {exc.strerror}") from None
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename) with mode 0600."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself must reach the disk, or a crash could bring back the previous file
    # (Windows cannot open a directory for this, and its rename is already durable enough).
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class MemoryKeyring(KeyringBackend):
    """A keyring that lives in this process only: for `crmsync demo` and the tests.

    Not viable, so keyring's discovery never selects it; use it with ``keyring.set_keyring``.
    """

    priority = 0
    viable = False

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


@dataclass(frozen=True)
class SecretLocation:
    """Where a connection's secret lives; never the secret itself."""

    storage: Literal["keyring", "file", "environment", "none"]
    where: str | None = None  # the file's path or the variable's name

    def as_dict(self) -> dict[str, str | None]:
        return {"storage": self.storage, "where": self.where}

    def __str__(self) -> str:
        return f"{self.storage} ({self.where})" if self.where else self.storage


class SecretStore:
    """Reads and writes connection secrets; every secret read is registered for redaction."""

    def __init__(
        self,
        *,
        lock_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        secrets_dir: Path | None = None,
    ) -> None:
        self.env = os.environ if env is None else env
        self.lock_dir = lock_dir
        self.secrets_dir = secrets_dir
        self._lock = threading.RLock()
        self._kept: dict[str, dict[str, Any]] = {}  # refreshed tokens that had nowhere durable to go
        self._sources: dict[str, SecretLocation] = {}
        self._keyring_error: str | None = None

    def _register(self, secret: Mapping[str, Any]) -> None:
        for key in _SECRET_KEYS:
            value = secret.get(key)
            if isinstance(value, str):
                register_secret(value)

    def file_path(self, connection: str) -> Path | None:
        """The --insecure-storage file of a connection (None when this store has no data directory)."""
        if self.secrets_dir is None:
            return None
        return self.secrets_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', connection)}.json"

    def _read(self, connection: str) -> tuple[str | None, SecretLocation]:
        path = self.file_path(connection)
        if path is not None and path.exists():
            try:
                return path.read_text(encoding="utf-8").strip(), SecretLocation("file", str(path))
            except OSError as exc:
                raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from None
        if keyring_usable():
            try:
                raw = keyring.get_password(SERVICE, connection)
            except keyring.errors.KeyringError as exc:
                # A locked keyring: remembered so a missing secret can be explained, not just reported.
                self._keyring_error = f"{type(exc).__name__}: {exc}".strip(": ")
                raw = None
            if raw is not None:
                return raw, SecretLocation("keyring")
        name = env_name(connection)
        if self.env.get(name) is not None:
            return self.env[name], SecretLocation("environment", name)
        file_var = env_name(connection, file=True)
        if self.env.get(file_var):
            target = Path(self.env[file_var])
            try:
                return target.read_text(encoding="utf-8").strip(), SecretLocation("environment", file_var)
            except OSError as exc:
                raise ConfigError(f"cannot read the secret file named by {file_var}: {exc.strerror}") from None
        return None, SecretLocation("none")

    def locate(self, connection: str) -> SecretLocation:
        """Where the connection's secret would be read from now."""
        return self._read(connection)[1]

    def get(self, connection: str) -> dict[str, Any] | None:
        """The connection's secret document, or None when none is stored anywhere."""
        kept = self._kept.get(connection)
        if kept is not None:
            return dict(kept)
        raw, where = self._read(connection)
        if raw is None:
            return None
        self._sources[connection] = where
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        secret = doc if isinstance(doc, dict) else {"token": raw.strip()}
        self._register(secret)
        return secret

    def _no_keyring(self, connection: str, reason: str = "") -> ConfigError:
        data_dir = self.secrets_dir.parent if self.secrets_dir else "the data directory"
        return ConfigError(
            NO_KEYRING_HELP.format(
                name=connection,
                reason=f" ({reason})" if reason else "",
                data_dir=data_dir,
                env=env_name(connection),
                env_file=env_name(connection, file=True),
            )
        )

    def require(self, connection: str) -> dict[str, Any]:
        """Like get(), but a missing secret is a clear ConfigError with the options."""
        secret = self.get(connection)
        if secret is not None:
            return secret
        if not keyring_usable():
            raise self._no_keyring(connection)
        if self._keyring_error:
            raise ConfigError(
                f"the OS keyring could not be read for connection {connection!r}: {self._keyring_error}",
                hint=f"unlock the keyring, or set {env_name(connection)}",
            )
        raise AuthError(
            f"no secret is stored for connection {connection!r}",
            hint=f"run `crmsync connect` again, or set {env_name(connection)}",
        )

    def probe(self, connection: str, storage: Storage) -> None:
        """Prove ``storage`` can keep a secret now, before anything one-time is spent; ConfigError if not."""
        if storage == "env":
            return
        if storage == "file":
            path = self.file_path(connection)
            if path is None:
                raise ConfigError("--insecure-storage needs a data directory, and this store has none")
            try:
                private_dir(path.parent)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".probe.")
                os.close(fd)
                os.unlink(tmp)
            except OSError as exc:
                raise ConfigError(f"cannot write secrets under {path.parent}: {exc.strerror}") from None
            return
        if not keyring_usable():
            raise self._no_keyring(connection)
        try:
            keyring.set_password(SERVICE, PROBE_USER, "ok")
            keyring.delete_password(SERVICE, PROBE_USER)
        except (keyring.errors.KeyringError, OSError) as exc:
            raise self._no_keyring(connection, f"it refused a test entry: {type(exc).__name__}") from None

    def set(self, connection: str, secret: Mapping[str, Any], *, storage: Storage | None = None) -> None:
        """Store the secret where the connection keeps it, or in ``storage`` (then only there)."""
        self._register(secret)
        path = self.file_path(connection)
        target = storage or ("file" if path is not None and path.exists() else "keyring")
        text = json.dumps(dict(secret), sort_keys=True)
        with self._lock:
            self._kept.pop(connection, None)
            if target == "file":
                if path is None:
                    raise ConfigError("--insecure-storage needs a data directory, and this store has none")
                try:
                    write_private(path, text)
                except OSError as exc:
                    raise ConfigError(f"cannot write the secret file {path}: {exc.strerror}") from None
                self._sources[connection] = SecretLocation("file", str(path))
                if storage:
                    self._delete_keyring(connection)
                return
            if target == "env":
                # The environment holds it: an older copy elsewhere would shadow it.
                self._delete_keyring(connection)
                self._delete_file(connection)
                return
            if not keyring_usable():
                raise self._no_keyring(connection)
            try:
                keyring.set_password(SERVICE, connection, text)
            except keyring.errors.KeyringError as exc:
                raise ConfigError(
                    f"the OS keyring refused to store the secret of {connection!r}: {type(exc).__name__}"
                ) from None
            self._sources[connection] = SecretLocation("keyring")
            if storage:
                self._delete_file(connection)

    def save_refreshed(self, connection: str, secret: Mapping[str, Any]) -> None:
        """A refreshed token goes back where the secret came from; from the environment, it lasts the run."""
        source = self._sources.get(connection) or self.locate(connection)
        if source.storage in ("file", "keyring"):
            try:
                self.set(connection, secret)
                return
            except ConfigError as exc:
                log.warning("the refreshed token of %r is kept for this run only: %s", connection, exc)
        elif source.where == env_name(connection, file=True):
            path = Path(self.env[source.where])
            if os.access(path, os.W_OK):
                try:
                    write_private(path, json.dumps(dict(secret), sort_keys=True))
                except OSError as exc:
                    log.warning("cannot write the refreshed token back to %s: %s", path, exc.strerror)
        self._register(secret)
        self._kept[connection] = dict(secret)

    def update(self, connection: str, **changes: Any) -> dict[str, Any]:
        """Read-modify-write of one connection's secret (under the connection's lock)."""
        with self._lock:
            secret = self.get(connection) or {}
            secret.update(changes)
            self.set(connection, secret)
            return secret

    def _delete_keyring(self, connection: str) -> None:
        if not keyring_usable():
            return
        with contextlib.suppress(keyring.errors.KeyringError):
            keyring.delete_password(SERVICE, connection)

    def _delete_file(self, connection: str) -> None:
        path = self.file_path(connection)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def delete(self, connection: str) -> None:
        """Remove the connection's secret from the keyring and the secret file."""
        with self._lock:
            self._kept.pop(connection, None)
            self._sources.pop(connection, None)
            self._delete_keyring(connection)
            self._delete_file(connection)

    def file_lock(self, connection: str) -> FileLock | None:
        """A cross-process lock serialising token refreshes of one connection."""
        if self.lock_dir is None:
            return None
        private_dir(self.lock_dir)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", connection)
        return FileLock(str(self.lock_dir / f"{safe}.refresh.lock"), timeout=60)


class PendingSecrets(SecretStore):
    """The secret a ``connect`` is building, held in memory until the connection is verified.

    Providers store the secret as soon as they have it and then verify it; with this in their
    way, a connect that fails at any step leaves no secret behind in a keyring or a file.
    """

    def __init__(self, store: SecretStore, connection: str) -> None:
        super().__init__(lock_dir=None, env={})
        self.store, self.connection = store, connection
        self.pending: dict[str, Any] | None = None

    def get(self, connection: str) -> dict[str, Any] | None:
        if connection != self.connection:
            return self.store.get(connection)
        return dict(self.pending) if self.pending is not None else None

    def require(self, connection: str) -> dict[str, Any]:
        secret = self.get(connection)
        if secret is None:
            raise AuthError(f"no secret was given for connection {connection!r}")
        return secret

    def locate(self, connection: str) -> SecretLocation:
        return SecretLocation("none")

    def set(self, connection: str, secret: Mapping[str, Any], *, storage: Storage | None = None) -> None:
        if connection != self.connection:
            raise ConfigError(f"connect {self.connection!r} tried to store the secret of {connection!r}")
        self._register(secret)
        self.pending = dict(secret)

    def save_refreshed(self, connection: str, secret: Mapping[str, Any]) -> None:
        self.set(connection, secret)

    def delete(self, connection: str) -> None:
        if connection == self.connection:
            self.pending = None

    def file_lock(self, connection: str) -> FileLock | None:
        return None

    def commit(self, storage: Storage) -> None:
        """Keep the verified secret in ``storage`` (for ``env``: clear older copies only)."""
        if self.pending is not None:
            self.store.set(self.connection, self.pending, storage=storage)


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

    A refreshed token is written back where the secret lives (keyring or file) before it is used,
    so a crash right after a refresh never strands the (possibly rotated) refresh token. Refreshes are serialised per
    connection across threads and processes; whoever waits re-reads the secret first and
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
                self.store.save_refreshed(self.connection, updated)
                self._secret = updated
                return True
            finally:
                if flock is not None:
                    flock.release()
