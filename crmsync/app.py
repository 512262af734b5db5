"""The application context: config, store, secrets and providers, built once per command.

The CLI makes one ``App`` and hands it to the library; tests make one with an emulator's
transport. Everything here is lazy, so ``crmsync --help`` never opens the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from crmsync.config import Config, Paths, load_config, resolve_paths
from crmsync.errors import ConfigError, LockHeldError, UsageError

if TYPE_CHECKING:
    from crmsync.mapping import Mapping
    from crmsync.metrics import Metrics
    from crmsync.providers.base import Provider
    from crmsync.store import CrmConnection, Store

TransportFactory = Callable[[str], httpx.BaseTransport | None]  # connection name -> transport


class App:
    """Config + store + secrets + provider factory for one command run."""

    def __init__(
        self,
        *,
        config: str | None = None,
        db: str | None = None,
        transport: TransportFactory | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = dict(os.environ) if env is None else env
        self.paths: Paths = resolve_paths(config=config, db=db, env=self.env)
        self._config_named = bool(config or self.env.get("CRMSYNC_CONFIG"))
        self.transport = transport
        self._providers: dict[str, Provider] = {}

    # -- lazily built parts ---------------------------------------------------------------------
    @cached_property
    def config(self) -> Config:
        cfg = load_config(self.paths.config_file, required=self._config_named)
        if cfg.db and not (self.env.get("CRMSYNC_DB")) and self.paths.db.endswith("crmsync.db"):
            # The config file's db applies only when neither the flag nor the environment set one.
            self.paths.db = cfg.db
        return cfg

    @cached_property
    def store(self) -> Store:
        from crmsync.credentials import private_dir
        from crmsync.store import Store

        _ = self.config  # the config may name the db
        # The data directory holds the store, the locks and maybe secret files: the user's only.
        private_dir(self.paths.data_dir)
        return Store.open(self.paths.db, wait=self.config.lock_timeout)

    @cached_property
    def secrets(self) -> Any:
        from crmsync.credentials import SecretStore, private_dir
        from crmsync.store import is_postgresql_url

        _ = self.config  # the config may name the db
        private_dir(self.paths.data_dir)  # before secrets/ and locks/ are made inside it
        if is_postgresql_url(self.paths.db):
            # Workers on several hosts: token refreshes are serialised through the shared store.
            from crmsync.scaleout import SharedSecretStore

            return SharedSecretStore(
                self.store.engine, lock_dir=self.paths.locks_dir, env=self.env, secrets_dir=self.secrets_dir
            )
        return SecretStore(lock_dir=self.paths.locks_dir, env=self.env, secrets_dir=self.secrets_dir)

    @property
    def secrets_dir(self) -> Path:
        """Where ``connect --insecure-storage`` keeps secret files (0700, each file 0600)."""
        return self.paths.data_dir / "secrets"

    @property
    def redis_url(self) -> str | None:
        """Scale-out Redis (queue and shared rate limits): CRMSYNC_REDIS_URL, else the config's."""
        return self.env.get("CRMSYNC_REDIS_URL") or self.config.redis_url

    @cached_property
    def metrics(self) -> Metrics:
        from crmsync.metrics import Metrics

        return Metrics()

    # -- connections ----------------------------------------------------------------------------
    def connection(self, name: str | None) -> CrmConnection:
        """The named connection, or the only one when no name is given."""
        if name:
            conn = self.store.connections.get(name)
            if conn is None:
                known = ", ".join(c.name for c in self.store.connections.all()) or "none"
                raise ConfigError(f"no connection named {name!r} (configured: {known})")
            return conn
        conns = self.store.connections.all()
        if not conns:
            raise ConfigError("no connection is configured; run `crmsync connect PROVIDER --name NAME` first")
        if len(conns) > 1:
            raise UsageError(
                "several connections are configured; pick one with -c/--connection: " + ", ".join(c.name for c in conns)
            )
        return conns[0]

    def connections(self, names: list[str] | None) -> list[CrmConnection]:
        """The named connections, or all of them when none is named."""
        if names:
            return [self.connection(n) for n in names]
        conns = self.store.connections.all()
        if not conns:
            raise ConfigError("no connection is configured; run `crmsync connect PROVIDER --name NAME` first")
        return conns

    # -- HTTP and providers ----------------------------------------------------------------------
    def http_client(
        self, provider_cls: type[Provider], name: str, base_url: str, auth: Any, *, account: str | None = None
    ) -> Any:
        """The connection's HttpClient with the provider's limits and the config's overrides.

        With a Redis URL the limits are shared by every worker calling the same CRM account.
        """
        from crmsync.http import HttpClient

        settings = self.config.connection(name)
        limits: dict[str, Any] = dict(provider_cls.default_rate_limits)
        # The user sets how many; how the window is counted stays the provider's choice.
        if settings.rate_limit and "default" in limits:
            limits["default"] = dataclasses.replace(limits["default"], requests=settings.rate_limit)
        if settings.search_rate_limit and "search" in limits:
            per_second = {"requests": settings.search_rate_limit, "per_seconds": 1.0}  # as config.yaml states it
            limits["search"] = dataclasses.replace(limits["search"], **per_second)
        if self.redis_url and limits:
            from crmsync.scaleout import shared_limits

            limits = shared_limits(self.redis_url, provider_cls.name, account or name, limits)
        return HttpClient(
            provider=provider_cls.name,
            connection=name,
            base_url=base_url,
            limits=limits,
            concurrency=settings.concurrency or provider_cls.default_concurrency,
            timeout=settings.timeout_seconds,
            deadline=settings.deadline_seconds,
            auth=auth,
            policy=provider_cls.policy_class(),
            transport=self.transport(name) if self.transport else None,
            observer=self.metrics.observe_request,
        )

    def token_client(self, name: str) -> httpx.Client:
        """A plain client for OAuth token endpoints, through the same transport as the API."""
        from crmsync.http import tls_verify

        transport = self.transport(name) if self.transport else None
        return httpx.Client(timeout=30.0, transport=transport, verify=tls_verify(transport))

    def provider(self, conn: CrmConnection) -> Provider:
        """The provider instance for a connection (one per App)."""
        if conn.name in self._providers:
            return self._providers[conn.name]
        from crmsync.http import prepare_tls
        from crmsync.providers import get_provider
        from crmsync.providers.base import ProviderContext

        if not self.transport:
            prepare_tls()
        cls = get_provider(conn.provider)
        auth = cls.make_auth(
            connection=conn.name,
            settings=conn.settings,
            secrets=self.secrets,
            token_client=_LazyClient(lambda: self.token_client(conn.name)),
        )
        base_url = conn.settings.get("api_base_url") or conn.base_url
        http = self.http_client(cls, conn.name, base_url, auth, account=conn.account_id)
        ctx = ProviderContext(
            connection=conn.name,
            base_url=base_url,
            settings=dict(conn.settings),
            http=http,
            secrets=self.secrets,
            options=self.config.connection(conn.name).model_dump(),
        )
        provider = cls(ctx)
        self._providers[conn.name] = provider
        return provider

    def mapping_path(self, conn: CrmConnection) -> Path:
        override = self.config.connection(conn.name).mapping
        return override or (self.paths.mappings_dir / f"{safe_name(conn.name)}.yaml")

    def mapping(self, conn: CrmConnection) -> Mapping:
        from crmsync.mapping import Mapping

        region = self.config.connection(conn.name).default_region or self.config.default_region
        return Mapping.load(conn.provider, self.mapping_path(conn), default_region=region)

    def close(self) -> None:
        for provider in self._providers.values():
            with contextlib.suppress(Exception):
                provider.close()
        self._providers.clear()
        if "store" in self.__dict__:
            self.store.close()

    # -- the run lock ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def run_lock(self, connection: str, *, timeout: float | None = None) -> Iterator[None]:
        """One pull/push/backfill per connection at a time; waits up to ``timeout`` seconds."""
        from filelock import FileLock, Timeout

        wait = self.config.lock_timeout if timeout is None else timeout
        if self.store.is_postgresql:
            from crmsync.store.locks import advisory_lock

            with advisory_lock(self.store, connection, timeout=wait), self.store.waiting(wait):
                yield
            return
        from crmsync.credentials import private_dir

        private_dir(self.paths.locks_dir)
        base = self.paths.locks_dir / f"{safe_name(self.paths.db)}.{safe_name(connection)}"
        lock = FileLock(f"{base}.lock")
        owner = Path(f"{base}.owner")
        deadline = time.monotonic() + wait
        while True:
            try:
                lock.acquire(timeout=min(0.2, max(0.0, deadline - time.monotonic())) if wait else 0)
                break
            except Timeout:
                if time.monotonic() >= deadline:
                    holder = owner.read_text().strip() if owner.exists() else "unknown"
                    raise LockHeldError(
                        f"connection {connection!r} is busy: another crmsync run holds its lock (pid {holder})",
                        hint="try again later, or pass --lock-timeout SECONDS to wait",
                    ) from None
        try:
            owner.write_text(f"{os.getpid()} on {socket.gethostname()}")
            # The same wait holds for the store itself: another process's SQLite lock is another run.
            with self.store.waiting(wait):
                yield
        finally:
            with contextlib.suppress(OSError):
                owner.unlink()
            lock.release()


def safe_name(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", value).strip("_")[:80] or "default"


class _LazyClient:
    """An httpx.Client made on first use: most runs never refresh a token, and making one costs time."""

    def __init__(self, make: Callable[[], httpx.Client]) -> None:
        self._make = make
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make()
        return getattr(self._client, name)
