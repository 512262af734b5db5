"""Scale-out: what several crmsync workers on several hosts share instead of one machine's files.

The locks they share are PostgreSQL advisory locks, in ``crmsync.store.locks`` with the rest of
the SQL; here:

* ``RedisTokenBucket``: the ``Bucket`` of ``crmsync.http`` with its state in Redis, keyed per CRM
  account, so ten workers on one HubSpot portal together keep its 100 requests / 10 s. Time comes
  from the Redis server, one clock for every host.
* ``shared_limits``: an HttpClient's rate limits turned into such buckets.
* ``SharedSecretStore``: OAuth refreshes serialised across hosts (a PostgreSQL advisory lock
  instead of a lock file), so two workers never spend one refresh token at once.

Nothing here imports redis or psycopg until it is used: the worker extra stays optional.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from crmsync.credentials import SecretStore, Storage
from crmsync.errors import RetriableError
from crmsync.store.locks import advisory_lock

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from crmsync.http import Bucket, RateLimit

log = logging.getLogger("crmsync.scaleout")


# -- the shared token bucket -----------------------------------------------------------------------
# One atomic step on the bucket's hash: refill by elapsed server time, then take a token (returns
# 0) or report how long to wait; or, for a pause, hold everyone back until now + seconds.
_BUCKET_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'not_before')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
local not_before = tonumber(state[3]) or 0
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local wait = 0
if ARGV[4] == 'pause' then
  not_before = math.max(not_before, now + tonumber(ARGV[5]))
  tokens = 0
elseif now < not_before then
  wait = not_before - now
elseif tokens >= 1 then
  tokens = tokens - 1
elseif rate > 0 then
  wait = (1 - tokens) / rate
else
  wait = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now), 'not_before', tostring(not_before))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return tostring(wait)
"""


class RedisTokenBucket:
    """A token bucket whose state lives in Redis: every process using ``key`` shares it."""

    def __init__(
        self, client: Any, key: str, *, rate: float, capacity: int, idle_ttl: float = 600.0, sleep: Any = time.sleep
    ) -> None:
        self.client, self.key = client, key
        self.rate, self.capacity = rate, capacity
        self.ttl_ms = int(idle_ttl * 1000)
        self.sleep = sleep
        self._script = client.register_script(_BUCKET_LUA)

    def _call(self, op: str, seconds: float = 0.0) -> float:
        import redis

        try:
            answer = self._script(keys=[self.key], args=[self.rate, self.capacity, self.ttl_ms, op, seconds])
        except redis.RedisError as exc:
            raise RetriableError(
                f"the shared rate limiter (Redis) is unreachable: {type(exc).__name__}: {exc}"
            ) from None
        return float(answer.decode() if isinstance(answer, bytes) else answer)

    def acquire(self) -> None:
        """Take one token, waiting as long as the shared bucket says."""
        while True:
            wait = self._call("take")
            if wait <= 0:
                return
            self.sleep(min(max(wait, 0.001), 1.0))

    def pause(self, seconds: float) -> None:
        """Hold every process sharing this bucket back for ``seconds`` (after a 429)."""
        self._call("pause", max(0.0, seconds))


_clients: dict[str, Any] = {}


def redis_client(url: str) -> Any:
    """One Redis client (connection pool) per URL and process."""
    client = _clients.get(url)
    if client is None:
        try:
            import redis
        except ImportError:
            from crmsync.errors import ConfigError

            raise ConfigError(
                "a Redis URL is configured but the redis package is missing",
                hint="pip install 'crmsync[worker]'",
            ) from None
        client = _clients[url] = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    return client


def bucket_key(provider: str, account: str, bucket: str) -> str:
    return f"crmsync:ratelimit:{provider}:{account}:{bucket}"


def shared_limits(
    url: str, provider: str, account: str, limits: Mapping[str, RateLimit | Bucket]
) -> dict[str, RateLimit | Bucket]:
    """Each RateLimit as a Redis bucket keyed by (provider, CRM account, bucket name)."""
    from crmsync.http import RateLimit

    client = redis_client(url)
    out: dict[str, RateLimit | Bucket] = {}
    for name, limit in limits.items():
        if isinstance(limit, RateLimit):
            local = limit.token_bucket()  # a window shared through Redis is kept as a bucket
            out[name] = RedisTokenBucket(
                client,
                bucket_key(provider, account, name),
                rate=local.rate,
                capacity=local.capacity,
                idle_ttl=max(60.0, limit.per_seconds * 10),
            )
        else:
            out[name] = limit
    return out


# -- OAuth refreshes across hosts ------------------------------------------------------------------
class _AdvisoryRefreshLock:
    """The ``acquire()``/``release()`` shape OAuthSession expects, as a PostgreSQL advisory lock."""

    def __init__(self, store: SharedSecretStore, connection: str, timeout: float) -> None:
        self.store, self.connection, self.timeout = store, connection, timeout
        self._cm: contextlib.AbstractContextManager[None] | None = None

    def acquire(self) -> None:
        cm = advisory_lock(self.store.engine, self.connection, self.timeout, purpose="refresh")
        cm.__enter__()
        self._cm = cm
        self.store.refreshing.add(self.connection)

    def release(self) -> None:
        self.store.refreshing.discard(self.connection)
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(None, None, None)


class SharedSecretStore(SecretStore):
    """A SecretStore for workers sharing a PostgreSQL store.

    Token refreshes of a connection are serialised across every host by an advisory lock (a lock
    file only spans one machine); whoever waits re-reads the secret first (OAuthSession does), so
    a refresh another worker already wrote is used, not repeated. Servers often have no keyring:
    a refreshed token is then written back to the ``CRMSYNC_SECRET_FILE_<NAME>`` file when it is
    writable, else kept in this process, so a refresh never fails for want of a keyring.
    """

    def __init__(self, engine: Engine, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.engine = engine
        self.refreshing: set[str] = set()  # connections whose refresh lock this process holds
        self._refreshed: dict[str, dict[str, Any]] = {}

    def file_lock(self, connection: str) -> Any:
        return _AdvisoryRefreshLock(self, connection, timeout=60.0)

    def get(self, connection: str) -> dict[str, Any] | None:
        secret = super().get(connection)
        kept = self._refreshed.get(connection)
        if kept and (secret is None or float(kept.get("expires_at") or 0) > float(secret.get("expires_at") or 0)):
            return dict(kept)
        return secret

    def set(self, connection: str, secret: Mapping[str, Any], *, storage: Storage | None = None) -> None:
        from crmsync.credentials import env_name, keyring_usable

        if keyring_usable() or connection not in self.refreshing:
            # Only a refresh may fall back: a new secret (connect) must reach a real keyring.
            super().set(connection, secret, storage=storage)
            return
        self._register(secret)
        self._refreshed[connection] = dict(secret)
        path = self.env.get(env_name(connection, file=True))
        if path and os.access(path, os.W_OK):
            import json
            import tempfile
            from pathlib import Path

            target = Path(path)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(dict(secret), out, sort_keys=True)
            os.replace(tmp, target)
            return
        log.warning(
            "no keyring and no writable secret file for %r: the refreshed token is kept in this process only",
            connection,
        )
