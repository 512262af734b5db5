"""Webhooks: signature checks (HubSpot v1/v2/v3, Zoho channel token) and a receiver that stores events.

The receiver only verifies, normalises and stores; ``pull`` turns the stored events into one batch
read of the changed records (``crmsync.sync.events``). Nothing in the request path calls a CRM, so
an answer never waits on one, and a 2xx is sent only after the event is committed: a CRM that got
a 2xx may forget the event, so we must not.

Design choices that matter:

* **One connection, group commits** (``EventWriter``): the request thread holding the commit
  lock commits every request queued meanwhile in one transaction. SQLite has one writer at a
  time anyway; queueing in-process avoids its sleeping busy handler (latency spikes) and lets
  one fsync (``synchronous=FULL``: a 2xx survives power loss too) cover many requests. The
  events of one request always commit together (a HubSpot array is atomic).
* **Dedupe keys** say what happened, not who sent it: HubSpot's ``eventId`` is not unique, so the
  key is subscriptionType + objectId + propertyName + occurredAt; Zoho's is channel + server_time +
  operation + ids. A redelivery is acknowledged and counted as a duplicate, never stored twice.
* **Secrets** are read from the keyring once per connection and cached; a failed check re-reads
  them (at most every few seconds), so a rotated secret works without a restart.
* The receiver binds loopback by default: on the internet it belongs behind a TLS-terminating
  reverse proxy, and ``public_url`` says which URL the CRM signs (``X-Forwarded-Proto``/``-Host``
  are honoured only with ``trust_proxy``, because anyone can send them).
* **Hostile traffic costs little.** Every route authenticates before it parses (HubSpot: the
  signature over the raw body; Zoho: the notify URL's secret in the query, before the body is
  even read), JSON nesting is bounded, at most ``max_connections`` connections get a thread
  (the rest are answered 503 from one overflow thread, ``/healthz`` 200), a request must arrive
  whole within ``request_deadline`` seconds however slowly it trickles, ``/metrics`` answers
  loopback clients only, and each kind of problem is logged once a minute, without a traceback.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import re
import secrets
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from crmsync.errors import ConfigError, UsageError
from crmsync.jsonlimits import loads as json_loads
from crmsync.model import utcnow

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.store import CrmWebhookEvent, Store

log = logging.getLogger("crmsync.webhooks")

PROVIDERS = ("hubspot", "zoho")
#: Keyring keys (in the connection's secret document) the receiver reads.
SECRET_KEY = "webhook_secret"  # HubSpot: the app's client secret; Zoho: the notify URL's secret
ZOHO_TOKEN_KEY = "webhook_token"  # Zoho: the watch channel's token
ZOHO_CHANNEL_KEY = "webhook_channel_id"  # Zoho: the watch channel's id
#: Query parameter of the Zoho notify URL that carries the URL secret.
ZOHO_URL_PARAM = "crmsync_key"
MAX_AGE_SECONDS = 300.0  # HubSpot: reject v3 timestamps older than 5 minutes (and as far ahead)
SECRET_RELOAD_SECONDS = 5.0
LOG_EVERY_SECONDS = 60.0  # one log line per kind of problem per minute; the metrics count every one

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"  # same rule as `crmsync connect --name`
_ROUTE = re.compile(rf"^/hooks/(?P<provider>hubspot|zoho)/(?P<connection>{_NAME})$")


# -- HubSpot signatures ----------------------------------------------------------------------------
# HubSpot decodes exactly these escapes in the URI before signing v3 (and leaves %20, %26, %3D …).
_V3_ESCAPES = re.compile(r"%(3A|2F|3F|40|21|24|27|28|29|2A|2C|3B)", re.IGNORECASE)


def hubspot_v3_uri(uri: str) -> str:
    """The URI as HubSpot signs it for v3: only ``: / ? @ ! $ ' ( ) * , ;`` are decoded."""
    return _V3_ESCAPES.sub(lambda m: chr(int(m.group(1), 16)), uri)


def hubspot_signature_v1(secret: str, body: bytes) -> str:
    """v1: hex SHA-256 of client secret + raw body."""
    return hashlib.sha256(secret.encode() + body).hexdigest()


def hubspot_signature_v2(secret: str, method: str, uri: str, body: bytes) -> str:
    """v2: hex SHA-256 of client secret + method + URI (exactly as requested) + raw body."""
    return hashlib.sha256(secret.encode() + method.upper().encode() + uri.encode() + body).hexdigest()


def hubspot_signature_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """v3: base64 HMAC-SHA256 keyed by the client secret over method + URI + raw body + timestamp."""
    message = method.upper().encode() + hubspot_v3_uri(uri).encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


class VerificationFailed(Exception):
    """A request failed verification; the reason is for logs and never goes into a response."""


def _same(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogateescape"))


def verify_hubspot(
    *,
    secret: str,
    method: str,
    uri: str,
    body: bytes,
    headers: Mapping[str, str],
    now: float | None = None,
    max_age: float = MAX_AGE_SECONDS,
) -> str:
    """Check a HubSpot request's signature; returns the version that matched.

    ``headers`` must have lower-cased names. A v3 signature, when present, is the only one
    checked: falling back to v1 would let a replayed request skip the timestamp window.

    Raises:
        VerificationFailed: no valid signature, or a v3 timestamp outside ``max_age``.
    """
    v3 = headers.get("x-hubspot-signature-v3")
    if v3 is not None:
        stamp = headers.get("x-hubspot-request-timestamp", "")
        if not stamp.isdigit():
            raise VerificationFailed("v3 signature without a valid X-HubSpot-Request-Timestamp")
        now_ms = int((time.time() if now is None else now) * 1000)
        skew = now_ms - int(stamp)
        if skew > max_age * 1000:
            raise VerificationFailed("v3 timestamp older than the allowed window")
        if -skew > max_age * 1000:
            raise VerificationFailed("v3 timestamp in the future")
        if not _same(hubspot_signature_v3(secret, method, uri, body, stamp), v3):
            raise VerificationFailed("v3 signature mismatch")
        return "v3"
    given = headers.get("x-hubspot-signature")
    if given is None:
        raise VerificationFailed("no HubSpot signature header")
    version = headers.get("x-hubspot-signature-version", "").lower()
    if version == "v1":
        expected = hubspot_signature_v1(secret, body)
    elif version == "v2":
        expected = hubspot_signature_v2(secret, method, uri, body)
    else:
        raise VerificationFailed("missing or unknown X-HubSpot-Signature-Version")
    if not _same(expected, given.lower()):
        raise VerificationFailed(f"{version} signature mismatch")
    return version


# -- Zoho ------------------------------------------------------------------------------------------
def verify_zoho(
    *,
    token: str | None,
    channel_id: str | None,
    url_secret: str | None,
    event: Mapping[str, Any],
    query: Mapping[str, Sequence[str]],
) -> None:
    """Check a Zoho notification: channel token, channel id, and the notify URL's secret.

    Zoho signs nothing, so all three must match. The URL secret is looked for in the request's
    query string and in the body's ``query_params`` (Zoho echoes the notify URL's query there);
    every copy present must match and at least one must be.

    Raises:
        VerificationFailed: a value is missing or wrong, or the connection has none stored.
    """
    if not (token and channel_id and url_secret):
        raise VerificationFailed("no Zoho channel token/id/URL secret stored for this connection")
    if not _same(token, str(event.get("token") or "")):
        raise VerificationFailed("Zoho channel token mismatch")
    if not _same(str(channel_id), str(event.get("channel_id") or "")):
        raise VerificationFailed("Zoho channel id mismatch")
    copies = list(query.get(ZOHO_URL_PARAM, []))
    params = event.get("query_params")
    if isinstance(params, Mapping) and ZOHO_URL_PARAM in params:
        value = params[ZOHO_URL_PARAM]
        copies.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    # Evaluate every comparison (no short-circuit) so timing says nothing about which failed.
    results = [_same(url_secret, c) for c in copies]
    if not results or not all(results):
        raise VerificationFailed("Zoho notify URL secret missing or wrong")


# -- event normalisation ---------------------------------------------------------------------------
class MalformedEvent(ValueError):
    """The body is JSON but not a notification we understand (answered 400)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One stored row: a hint that one record changed (pull fetches it fresh)."""

    dedupe_key: str
    object: str
    remote_id: str
    event_type: str  # creation | update | deletion | restore | merge
    occurred_at: datetime | None
    payload: dict[str, Any] = field(hash=False, compare=False)


_HS_OBJECTS = {"contact": "contacts", "company": "companies", "deal": "deals", "call": "calls", "task": "tasks"}
_HS_TYPE_IDS = {"0-1": "contacts", "0-2": "companies", "0-3": "deals", "0-27": "tasks", "0-48": "calls"}
_HS_ACTIONS = {
    "creation": "creation",
    "propertyChange": "update",
    "deletion": "deletion",
    "privacyDeletion": "deletion",
    "restore": "restore",
}


def _ms_datetime(value: Any, what: str) -> tuple[int, datetime]:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise MalformedEvent(f"{what} must be epoch milliseconds")
    ms = int(value)
    try:
        return ms, datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        raise MalformedEvent(f"{what} is out of range") from None


def _remote_id(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or str(value) == "":
        raise MalformedEvent(f"{what} must be an id")
    return str(value)


def _hs_object(prefix: str, type_id: Any) -> str | None:
    if prefix == "object":
        return _HS_TYPE_IDS.get(str(type_id)) if type_id is not None else None
    return _HS_OBJECTS.get(prefix)


def hubspot_events(payload: Any) -> list[Event]:
    """HubSpot's JSON array of events -> stored rows (unknown object types are left out).

    Merges become a deletion of each merged-away id plus a change of the survivor; an
    association change is a change of both sides.

    Raises:
        MalformedEvent: the body is not an array of HubSpot events (nothing is stored then).
    """
    items = payload if isinstance(payload, list) else [payload]
    out: list[Event] = []
    for n, ev in enumerate(items):
        if not isinstance(ev, dict):
            raise MalformedEvent(f"event {n} is not an object")
        st = ev.get("subscriptionType")
        if not isinstance(st, str) or "." not in st:
            raise MalformedEvent(f"event {n} has no subscriptionType")
        occurred_ms, occurred = _ms_datetime(ev.get("occurredAt"), f"event {n} occurredAt")
        prefix, action = st.split(".", 1)
        obj = _hs_object(prefix, ev.get("objectTypeId"))
        if action == "associationChange":
            out.extend(_hs_association(ev, st, obj, occurred_ms, occurred, n))
            continue
        if obj is None:
            continue
        if action == "merge":
            out.extend(_hs_merge(ev, st, obj, occurred_ms, occurred, n))
            continue
        event_type = _HS_ACTIONS.get(action)
        if event_type is None:
            continue  # e.g. conversation events: nothing to pull
        rid = _remote_id(ev.get("objectId"), f"event {n} objectId")
        key = f"{st}:{rid}:{ev.get('propertyName') or ''}:{occurred_ms}"
        out.append(Event(key, obj, rid, event_type, occurred, ev))
    return out


def _hs_merge(ev: dict[str, Any], st: str, obj: str, ms: int, at: datetime, n: int) -> list[Event]:
    survivor = _remote_id(
        ev.get("newObjectId") or ev.get("primaryObjectId") or ev.get("objectId"), f"event {n} merge target"
    )
    merged = ev.get("mergedObjectIds") or []
    if not isinstance(merged, list):
        raise MalformedEvent(f"event {n} mergedObjectIds must be a list")
    gone = [_remote_id(i, f"event {n} mergedObjectIds") for i in merged]
    primary = ev.get("primaryObjectId")
    if primary is not None and str(primary) != survivor:
        gone.append(str(primary))  # merged into a new record: the primary is gone too
    base = f"{st}:{ev.get('objectId') or survivor}::{ms}"
    rows = [Event(f"{base}|keep:{survivor}", obj, survivor, "merge", at, ev)]
    rows += [
        Event(f"{base}|gone:{rid}", obj, rid, "deletion", at, ev) for rid in dict.fromkeys(gone) if rid != survivor
    ]
    return rows


def _hs_association(ev: dict[str, Any], st: str, obj: str | None, ms: int, at: datetime, n: int) -> list[Event]:
    kind = str(ev.get("associationType") or ev.get("associationTypeId") or "")
    sides = kind.split("_TO_", 1) if "_TO_" in kind else ["", ""]
    from_obj = _hs_object("object", ev["fromObjectTypeId"]) if "fromObjectTypeId" in ev else obj
    from_obj = from_obj or _HS_OBJECTS.get(sides[0].lower())
    to_obj = _hs_object("object", ev["toObjectTypeId"]) if "toObjectTypeId" in ev else None
    to_obj = to_obj or _HS_OBJECTS.get(sides[1].lower())
    from_id = _remote_id(ev.get("fromObjectId"), f"event {n} fromObjectId")
    to_id = _remote_id(ev.get("toObjectId"), f"event {n} toObjectId")
    base = f"{st}:{from_id}:{to_id}:{kind}:{bool(ev.get('associationRemoved'))}:{ms}"
    rows = []
    if from_obj:
        rows.append(Event(f"{base}|from", from_obj, from_id, "update", at, ev))
    if to_obj:
        rows.append(Event(f"{base}|to", to_obj, to_id, "update", at, ev))
    return rows


_ZOHO_OBJECTS = {"Contacts": "contacts", "Accounts": "companies", "Deals": "deals", "Calls": "calls", "Tasks": "tasks"}
_ZOHO_OPERATIONS = {
    "insert": "creation",
    "create": "creation",
    "update": "update",
    "edit": "update",
    "delete": "deletion",
}
#: Body keys that carry secrets: verified, then never stored.
_ZOHO_SECRET_FIELDS = ("token", "query_params")


def zoho_events(payload: Any) -> list[Event]:
    """A Zoho notification -> one stored row per record id (modules we do not sync are left out).

    Raises:
        MalformedEvent: the body is not a Zoho notification (nothing is stored then).
    """
    if not isinstance(payload, dict):
        raise MalformedEvent("a Zoho notification is a JSON object")
    module, operation, ids = payload.get("module"), payload.get("operation"), payload.get("ids")
    if not isinstance(module, str) or not isinstance(operation, str) or not isinstance(ids, list):
        raise MalformedEvent("a Zoho notification needs module, operation and ids")
    ms, occurred = _ms_datetime(payload.get("server_time"), "server_time")
    obj = _ZOHO_OBJECTS.get(module)
    if obj is None:
        return []
    event_type = _ZOHO_OPERATIONS.get(operation.lower(), "update")
    kept = {k: v for k, v in payload.items() if k not in _ZOHO_SECRET_FIELDS}
    channel = payload.get("channel_id") or ""
    rows = []
    for rid in dict.fromkeys(_remote_id(i, "ids") for i in ids):
        rows.append(Event(f"{channel}:{ms}:{operation}:{module}:{rid}", obj, rid, event_type, occurred, kept))
    return rows


# -- logging ---------------------------------------------------------------------------------------
class LogOnce:
    """At most one log line per kind of problem per interval; the others go to debug.

    A flood of bad requests must not become a flood of log lines (or of tracebacks): the
    metrics count every request, the log says that it happens.
    """

    def __init__(self, every: float = LOG_EVERY_SECONDS) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            due = now - self._last.get(kind, float("-inf")) >= self.every
            if due:
                self._last[kind] = now
        log.log(level if due else logging.DEBUG, message, *args)


# -- storing ---------------------------------------------------------------------------------------
@dataclass
class _Job:
    connection: str
    provider: str
    events: Sequence[Event]
    received_at: datetime
    done: bool = False
    inserted: list[bool] = field(default_factory=list)
    error: BaseException | None = None


class WriterStopped(Exception):
    """The writer is shutting down: the request is refused (the CRM retries it)."""


class EventWriter:
    """Commits the events of concurrent requests in group transactions on one connection.

    There is no writer thread: whichever request thread holds the commit lock commits every job
    queued so far, its own included. While one commit waits on the disk, the next requests queue
    up and share the next commit, so one fsync serves many requests and no thread hand-off is
    paid per request.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.log_once = LogOnce()
        self._pending: list[_Job] = []
        self._lock = threading.Lock()  # guards _pending and _accepting (held briefly)
        self._commit_lock = threading.Lock()  # one transaction at a time on self._conn
        self._accepting = False
        self._conn: Any = None
        self._stmt = _insert_ignore(store)
        self._known = _known_keys()
        self._sqlite = store.engine.dialect.name == "sqlite"
        table = self._stmt.table
        self._processors = [table.c[name].type.bind_processor(store.engine.dialect) for name in _COLUMNS]
        self._sql = (
            f"INSERT INTO {table.name} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
            "ON CONFLICT (connection, dedupe_key) DO NOTHING"
        )

    def start(self) -> None:
        with self._commit_lock:
            self._conn = self._connect()
        with self._lock:
            self._accepting = True

    def submit(self, connection: str, provider: str, events: Sequence[Event], *, timeout: float = 30.0) -> list[bool]:
        """Store events atomically; returns per event whether it was new (False: a duplicate).

        Returns only after the commit. Raises what the commit raised, ``WriterStopped`` when
        shutting down, or ``TimeoutError`` (the events may still commit; dedupe absorbs the retry).
        """
        job = _Job(connection, provider, events, utcnow())
        with self._lock:
            if not self._accepting:
                raise WriterStopped()
            self._pending.append(job)
        if not self._commit_lock.acquire(timeout=timeout):
            raise TimeoutError("the store did not commit in time")
        try:
            if not job.done:
                self._commit_pending()
        finally:
            self._commit_lock.release()
        if job.error is not None:
            raise job.error
        return job.inserted

    def stop(self) -> None:
        """Commit everything already submitted, then close the connection."""
        with self._lock:
            self._accepting = False
        with self._commit_lock:
            if self._conn is None:
                return
            self._commit_pending()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _commit_pending(self) -> None:
        with self._lock:
            jobs, self._pending = self._pending, []
        if jobs:
            self._conn = self._commit_group(self._conn, jobs)

    def _connect(self) -> Any:
        conn = self.store.engine.connect()
        if conn.dialect.name == "sqlite":
            # Survive power loss too, not only a killed process: the CRM forgets what we acknowledge.
            conn.exec_driver_sql("PRAGMA synchronous=FULL")
            conn.commit()
        return conn

    def _commit_group(self, conn: Any, jobs: list[_Job]) -> Any:
        try:
            with conn.begin():
                results = self._write(conn, jobs)
        except Exception:
            # One job's failure must not fail its neighbours: retry each in its own transaction.
            conn = self._reconnect(conn)
            for job in jobs:
                try:
                    with conn.begin():
                        (job.inserted,) = self._write(conn, [job])
                except Exception as exc:
                    self.log_once(
                        "store",
                        logging.ERROR,
                        "storing %d webhook event(s) for %s failed: %s",
                        len(job.events),
                        job.connection,
                        exc,
                    )
                    job.error = exc
                    conn = self._reconnect(conn)
                job.done = True
            return conn
        for job, inserted in zip(jobs, results, strict=True):
            job.inserted = inserted
            job.done = True
        return conn

    def _reconnect(self, conn: Any) -> Any:
        if not conn.closed and not conn.invalidated:
            return conn
        with contextlib.suppress(Exception):
            conn.close()
        return self._connect()

    def _write(self, conn: Any, jobs: Sequence[_Job]) -> list[list[bool]]:
        """Insert the events of ``jobs``; per job, which events were new (not already stored)."""
        if self._sqlite:
            return self._write_sqlite(conn, jobs)
        return self._write_portable(conn, jobs)

    def _write_sqlite(self, conn: Any, jobs: Sequence[_Job]) -> list[list[bool]]:
        # The DB-API cursor directly: SQLAlchemy's per-statement overhead was most of the
        # receiver's CPU per event. Values go through the columns' own bind processors, so they
        # are stored exactly as the ORM would store them.
        cur = conn.connection.dbapi_connection.cursor()
        try:
            results = []
            for job in jobs:
                flags = []
                for ev in job.events:
                    cur.execute(self._sql, self._values(job, ev))
                    flags.append(cur.rowcount == 1)
                results.append(flags)
            return results
        finally:
            cur.close()

    def _write_portable(self, conn: Any, jobs: Sequence[_Job]) -> list[list[bool]]:
        # Known keys are looked up first so duplicates can be reported; ON CONFLICT DO NOTHING
        # still guards against another process inserting the same event meanwhile.
        wanted: dict[str, list[str]] = {}
        for job in jobs:
            wanted.setdefault(job.connection, []).extend(ev.dedupe_key for ev in job.events)
        seen: set[tuple[str, str]] = set()
        for connection, keys in wanted.items():
            for i in range(0, len(keys), 500):
                rows = conn.execute(self._known, {"connection": connection, "keys": keys[i : i + 500]})
                seen.update((connection, key) for (key,) in rows)
        params: list[dict[str, Any]] = []
        results: list[list[bool]] = []
        for job in jobs:
            flags = []
            for ev in job.events:
                new = (job.connection, ev.dedupe_key) not in seen
                flags.append(new)
                if new:
                    seen.add((job.connection, ev.dedupe_key))
                    params.append(dict(zip(_COLUMNS, self._fields(job, ev), strict=True)))
            results.append(flags)
        if params:
            conn.execute(self._stmt, params)
        return results

    @staticmethod
    def _fields(job: _Job, ev: Event) -> tuple[Any, ...]:
        return (
            job.connection,
            job.provider,
            ev.dedupe_key,
            ev.object,
            ev.remote_id,
            ev.event_type,
            ev.occurred_at,
            ev.payload,
            job.received_at,
            None,
        )

    def _values(self, job: _Job, ev: Event) -> list[Any]:
        return [p(v) if p is not None else v for p, v in zip(self._processors, self._fields(job, ev), strict=True)]


_COLUMNS = (
    "connection",
    "provider",
    "dedupe_key",
    "object",
    "remote_id",
    "event_type",
    "occurred_at",
    "payload",
    "received_at",
    "processed_at",
)


def _known_keys() -> Any:
    from sqlalchemy import bindparam, select

    from crmsync.store import CrmWebhookEvent

    table = CrmWebhookEvent.__table__  # type: ignore[attr-defined]
    return select(table.c.dedupe_key).where(
        table.c.connection == bindparam("connection"), table.c.dedupe_key.in_(bindparam("keys", expanding=True))
    )


def _insert_ignore(store: Store) -> Any:
    """INSERT … ON CONFLICT (connection, dedupe_key) DO NOTHING for SQLite and PostgreSQL."""
    from crmsync.store import CrmWebhookEvent

    table = CrmWebhookEvent.__table__  # type: ignore[attr-defined]
    dialect = store.engine.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:
        raise ConfigError(f"the webhook receiver supports SQLite and PostgreSQL stores, not {dialect}")
    return insert(table).on_conflict_do_nothing(index_elements=["connection", "dedupe_key"])


def list_events(
    store: Store, *, connection: str | None = None, pending: bool = False, limit: int = 100
) -> list[CrmWebhookEvent]:
    """Stored events, newest first (``pending``: only those no pull has applied yet)."""
    from sqlmodel import select

    from crmsync.store import CrmWebhookEvent

    with store.session() as s:
        q = select(CrmWebhookEvent)
        if connection:
            q = q.where(CrmWebhookEvent.connection == connection)
        if pending:
            q = q.where(CrmWebhookEvent.processed_at == None)  # noqa: E711
        return list(s.exec(q.order_by(CrmWebhookEvent.id.desc()).limit(limit)))  # type: ignore[union-attr]


# -- secrets ---------------------------------------------------------------------------------------
@dataclass
class _Secret:
    values: dict[str, str]
    loaded_at: float


class SecretCache:
    """Webhook secrets per connection, read from the keyring once and again on a miss."""

    def __init__(self, secrets: Any, *, reload_after: float = SECRET_RELOAD_SECONDS) -> None:
        self.secrets = secrets
        self.reload_after = reload_after
        self._cache: dict[str, _Secret] = {}
        self._lock = threading.Lock()

    def get(self, connection: str) -> dict[str, str]:
        """The connection's webhook values (may be empty when none are stored)."""
        entry = self._cache.get(connection)
        return entry.values if entry is not None else self._load(connection)

    def reload(self, connection: str) -> bool:
        """Re-read after a failed check (rate-limited); True when something changed."""
        entry = self._cache.get(connection)
        if entry is not None and time.monotonic() - entry.loaded_at < self.reload_after:
            return False
        before = entry.values if entry is not None else None
        return self._load(connection) != before

    def _load(self, connection: str) -> dict[str, str]:
        from crmsync.redact import register_secret

        with self._lock:
            try:
                doc = self.secrets.get(connection) or {}
            except Exception as exc:  # a broken keyring must not take the receiver down
                log.warning("cannot read the webhook secret of %s: %s", connection, type(exc).__name__)
                doc = {}
            values = {k: str(doc[k]) for k in (SECRET_KEY, ZOHO_TOKEN_KEY, ZOHO_CHANNEL_KEY) if doc.get(k)}
            for key in (SECRET_KEY, ZOHO_TOKEN_KEY):
                register_secret(values.get(key))
            self._cache[connection] = _Secret(values, time.monotonic())
            return values


# -- the receiver ----------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    text: str | None = None  # a plain-text body instead of JSON (metrics)


class WebhookReceiver:
    """The HTTP receiver: ``/hooks/hubspot/{connection}`` and ``/hooks/zoho/{connection}``, POST only.

    Also ``GET /healthz`` (for a load balancer) and ``GET /metrics`` (Prometheus text).
    """

    def __init__(
        self,
        app: App,
        *,
        host: str | None = None,
        port: int | None = None,
        public_url: str | None = None,
        trust_proxy: bool | None = None,
        body_limit: int | None = None,
        max_age: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
        max_connections: int | None = None,
        request_deadline: float | None = None,
    ) -> None:
        settings = app.config.webhook
        self.app = app
        self.store = app.store
        self.metrics = app.metrics
        self.host = host or settings.host
        self.port = settings.port if port is None else port
        self.public_url = (public_url or settings.public_url or "").rstrip("/") or None
        self.trust_proxy = settings.trust_proxy if trust_proxy is None else trust_proxy
        self.body_limit = body_limit or settings.body_limit
        self.max_connections = max_connections or settings.max_connections
        self.request_deadline = request_deadline or settings.request_deadline_seconds
        self.max_age = max_age
        self.clock = clock
        self._scheme: str | None = None
        self._netloc: str | None = None
        self._prefix = ""
        if self.public_url:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ConfigError(f"webhook public URL {self.public_url!r}: use scheme://host[:port][/path]")
            self._scheme, self._netloc, self._prefix = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self.secrets = SecretCache(app.secrets)
        self.writer = EventWriter(self.store)
        self._providers: dict[str, str] = {}
        self._providers_loaded = 0.0
        self._counters: dict[tuple[str, str, str], Any] = {}
        self.log_once = LogOnce()
        self._inflight = 0
        self._closing = False
        self._idle = threading.Condition()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> WebhookReceiver:
        """Bind, load connections and secrets, and serve in a background thread."""
        self._load_connections()
        for name in self._providers:
            self.secrets.get(name)
        try:
            self._httpd = _Server((self.host, self.port), self)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.writer.start()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="webhook-receiver", daemon=True
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """The bound address (``http://127.0.0.1:PORT``)."""
        assert self._httpd is not None, "start() first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def hook_url(self, provider: str, connection: str) -> str:
        """The URL to give the CRM (built on the public URL when one is set)."""
        base = self.public_url or self.url
        query = f"?{ZOHO_URL_PARAM}=***" if provider == "zoho" else ""  # the secret stays in the keyring
        return f"{base}/hooks/{provider}/{connection}{query}"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish (their events committed), then close."""
        if self._httpd is None:
            return
        with self._idle:
            self._closing = True
        self._httpd.shutdown()
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        self.writer.stop()
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections -------------------------------------------------------------------------------
    def _load_connections(self) -> None:
        self._providers = {c.name: c.provider for c in self.store.connections.all()}
        self._providers_loaded = time.monotonic()

    def _provider_of(self, connection: str) -> str | None:
        provider = self._providers.get(connection)
        if provider is None and time.monotonic() - self._providers_loaded > SECRET_RELOAD_SECONDS:
            self._load_connections()  # a connection added after start
            provider = self._providers.get(connection)
        return provider

    # -- one request -------------------------------------------------------------------------------
    def _enter(self) -> bool:
        with self._idle:
            if self._closing:
                return False
            self._inflight += 1
            return True

    def _leave(self) -> None:
        with self._idle:
            self._inflight -= 1
            if not self._inflight:
                self._idle.notify_all()

    def route(self, raw_path: str) -> tuple[str, str, str, str] | None:
        """(provider, connection, query, signed path) for a request path, or None."""
        path, _, query = raw_path.partition("?")
        signed = path
        if self._prefix and (path == self._prefix or path.startswith(self._prefix + "/")):
            path = path[len(self._prefix) :]  # the proxy forwarded the prefix; route without it
        else:
            signed = self._prefix + path
        m = _ROUTE.match(path)
        if m is None:
            return None
        return m["provider"], m["connection"], query, signed + ("?" + query if query else "")

    def signed_uri(self, signed_path: str, headers: Mapping[str, str]) -> str:
        """The absolute URI the CRM signed: public URL's scheme and host (or the proxy's, if trusted).

        Without a public URL it is ``http://`` + the Host header, which only matches when the CRM
        calls this process directly; behind a proxy, set ``public_url`` (or ``trust_proxy``).
        """
        scheme, netloc = self._scheme, self._netloc
        if self.trust_proxy:
            scheme = _first(headers.get("x-forwarded-proto")) or scheme
            netloc = _first(headers.get("x-forwarded-host")) or netloc
        return f"{scheme or 'http'}://{netloc or headers.get('host', '')}{signed_path}"

    def handle(
        self,
        method: str,
        raw_path: str,
        headers: Mapping[str, str],
        read_body: Callable[[int], bytes],
        *,
        client: str = "",
    ) -> Answer:
        """Answer one request (``headers`` with lower-cased names; ``client`` is the peer's address)."""
        path_only = raw_path.split("?")[0]
        if method == "GET" and path_only in ("/healthz", self._prefix + "/healthz"):
            return Answer(200, {"ok": True})
        if method == "GET" and path_only in ("/metrics", self._prefix + "/metrics"):
            if not _local_client(client, headers):
                self.log_once("metrics", logging.WARNING, "refused /metrics to %s: loopback clients only", client)
                return Answer(403, {"error": "forbidden"})
            return Answer(200, {}, text=self.metrics.text())
        # Answers given before the body is read close the connection: the unread body would
        # otherwise be parsed as the next request.
        routed = self.route(raw_path)
        if routed is None:
            return Answer(404, {"error": "not found"}, close=True)
        provider, connection, query, signed_path = routed
        if method != "POST":
            return Answer(405, {"error": "method not allowed"}, {"Allow": "POST"}, close=True)
        length = headers.get("content-length")
        if length is None:
            return Answer(411, {"error": "length required"}, close=True)
        if not length.isdigit():
            return Answer(400, {"error": "bad content-length"}, close=True)
        known = self._provider_of(connection) == provider
        if int(length) > self.body_limit:
            if known:  # no metric series for made-up names
                self._count(provider, connection, "too_large")
            return Answer(413, {"error": "body too large"}, close=True)
        params = parse_qs(query)
        if provider == "zoho" and known:
            # Zoho signs nothing; the notify URL's secret is the caller's proof, checked unread.
            try:
                self._verify(connection, lambda s: _check_zoho_url(s, params))
            except VerificationFailed as exc:
                self._count(provider, connection, "received")
                return self._rejected(provider, connection, str(exc), close=True)
        body = read_body(int(length))
        if not known:
            return Answer(404, {"error": "not found"})
        self._count(provider, connection, "received")
        try:
            if provider == "hubspot":
                uri = self.signed_uri(signed_path, headers)
                self._verify(connection, lambda s: self._check_hubspot(s, method, uri, body, headers))
                events = hubspot_events(_json(body))
            else:
                doc = _json(body)
                if not isinstance(doc, dict):
                    raise MalformedEvent("a Zoho notification is a JSON object")
                self._verify(connection, lambda s: _check_zoho(s, doc, params))
                events = zoho_events(doc)
        except VerificationFailed as exc:
            return self._rejected(provider, connection, str(exc))
        except MalformedEvent as exc:
            self._count(provider, connection, "malformed")
            self.log_once(f"malformed:{connection}", logging.WARNING, "webhook for %s malformed: %s", connection, exc)
            return Answer(400, {"error": f"malformed notification: {exc}"})
        self._count(provider, connection, "verified", len(events))
        if not events:
            return Answer(200, {"stored": 0, "duplicates": 0})
        try:
            inserted = self.writer.submit(connection, provider, events)
        except Exception as exc:
            self._count(provider, connection, "error", len(events))
            if not isinstance(exc, WriterStopped):
                self.log_once("store", logging.ERROR, "webhook for %s not stored: %s", connection, exc)
            return Answer(503, {"error": "not stored, retry later"}, {"Retry-After": "5"})
        stored = sum(inserted)
        self._count(provider, connection, "stored", stored)
        self._count(provider, connection, "duplicate", len(inserted) - stored)
        return Answer(200, {"stored": stored, "duplicates": len(inserted) - stored})

    def _rejected(self, provider: str, connection: str, reason: str, *, close: bool = False) -> Answer:
        self._count(provider, connection, "rejected")
        # A flood of forged requests must not become a flood of log lines (the metric counts each).
        self.log_once(f"rejected:{connection}", logging.WARNING, "webhook for %s rejected: %s", connection, reason)
        return Answer(401, {"error": "unauthorized"}, close=close)

    def _verify(self, connection: str, check: Callable[[dict[str, str]], None]) -> None:
        try:
            check(self.secrets.get(connection))
        except VerificationFailed:
            if not self.secrets.reload(connection):
                raise
            check(self.secrets.get(connection))  # the secret was rotated since we cached it

    def _check_hubspot(
        self, secret: dict[str, str], method: str, uri: str, body: bytes, headers: Mapping[str, str]
    ) -> None:
        value = secret.get(SECRET_KEY)
        if not value:
            raise VerificationFailed("no webhook secret stored (run `crmsync webhook secret`)")
        verify_hubspot(
            secret=value, method=method, uri=uri, body=body, headers=headers, now=self.clock(), max_age=self.max_age
        )

    def _count(self, provider: str, connection: str, result: str, n: int = 1) -> None:
        if not n:
            return
        key = (provider, connection, result)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.webhook_events.labels(*key)
        counter.inc(n)


def _check_zoho(secret: dict[str, str], doc: dict[str, Any], params: Mapping[str, Sequence[str]]) -> None:
    verify_zoho(
        token=secret.get(ZOHO_TOKEN_KEY),
        channel_id=secret.get(ZOHO_CHANNEL_KEY),
        url_secret=secret.get(SECRET_KEY),
        event=doc,
        query=params,
    )


def _check_zoho_url(secret: dict[str, str], params: Mapping[str, Sequence[str]]) -> None:
    """The notify URL's secret in the request's query: what a Zoho caller proves before its body is read."""
    url_secret = secret.get(SECRET_KEY)
    if not url_secret:
        raise VerificationFailed("no Zoho notify URL secret stored for this connection")
    copies = params.get(ZOHO_URL_PARAM, [])
    results = [_same(url_secret, c) for c in copies]
    if not results or not all(results):
        raise VerificationFailed("Zoho notify URL secret missing or wrong in the request URL")


def _json(body: bytes) -> Any:
    try:
        return json_loads(body)
    except ValueError as exc:  # TooDeep and UnicodeDecodeError are ValueErrors too
        detail = f": {exc}" if "nested" in str(exc) else ""
        raise MalformedEvent(f"the body is not JSON{detail}") from None


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or a name) only reaches this machine."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _local_client(client: str, headers: Mapping[str, str]) -> bool:
    # A reverse proxy on this machine connects from loopback on behalf of anyone: its
    # forwarding headers mark a request as not local.
    if "x-forwarded-for" in headers or "forwarded" in headers or "x-real-ip" in headers:
        return False
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _first(value: str | None) -> str | None:
    return value.split(",", 1)[0].strip() or None if value else None


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose every read fits in what is left of the request's deadline.

    A per-read timeout restarts with every byte, so a client trickling one byte a second could
    hold a thread for ever; this one ends the whole request at its deadline.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


_BUSY = b'{"error": "busy, retry later"}'
_HEALTHY = b'{"ok": true}'


class _Overflow:
    """Answers connections beyond the cap from one thread: 200 to ``/healthz``, 503 to the rest.

    The first bytes of each request are awaited briefly (without a thread per connection) so
    that a load balancer's health check still passes while slow clients hold every worker.
    """

    WAIT = 1.0  # seconds for the first bytes of a request, then the 503 goes out anyway
    LINGER = 0.5  # seconds to drain what the client still sends, so the answer is not lost to a reset
    MAX_HELD = 1024  # sockets held at once; beyond, answered at once without reading

    def __init__(self, health_paths: tuple[str, ...], log_once: LogOnce) -> None:
        self.health = tuple(f"GET {p} ".encode() for p in health_paths)
        self.health += tuple(f"GET {p}?".encode() for p in health_paths)
        self.log_once = log_once
        self._selector = selectors.DefaultSelector()
        self._held: dict[socket.socket, tuple[float, bytearray, bool]] = {}  # deadline, head, answered
        self._lock = threading.Lock()
        self._incoming: list[socket.socket] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="webhook-overflow", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket) -> None:
        self.log_once("busy", logging.WARNING, "webhook receiver at its connection limit: answering 503 (Retry-After)")
        with self._lock:
            self._incoming.append(sock)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(timeout=5)
        with self._lock:
            left, self._incoming = [*self._held, *self._incoming], []
        for sock in left:
            self._close(sock)
        for end in (self._wake_r, self._wake_w):
            end.close()
        self._selector.close()

    def _run(self) -> None:
        while not self._stopped:
            for key, _ in self._selector.select(timeout=0.1):
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                self._readable(key.fileobj)  # type: ignore[arg-type]
            with self._lock:
                incoming, self._incoming = self._incoming, []
            now = time.monotonic()
            for sock in incoming:
                if len(self._held) >= self.MAX_HELD:
                    # Under pressure, answered sockets stop draining first: they already have their 503.
                    for answered_sock in [held for held, (_, _, done) in self._held.items() if done]:
                        self._close(answered_sock)
                if len(self._held) >= self.MAX_HELD:
                    self._answer(sock, b"")
                    self._close(sock)
                    continue
                sock.setblocking(False)
                self._held[sock] = (now + self.WAIT, bytearray(), False)
                self._selector.register(sock, selectors.EVENT_READ)
            for sock, (deadline, head, answered) in list(self._held.items()):
                if now >= deadline:
                    if answered:
                        self._close(sock)
                    else:
                        self._finish(sock, head)

    def _readable(self, sock: socket.socket) -> None:
        if sock not in self._held:
            return
        _, head, answered = self._held[sock]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(sock)
            return
        if answered:
            return  # draining
        head += data
        # Decided as soon as the first bytes tell: only a health check is worth waiting for.
        if head.startswith(self.health) or not any(h.startswith(bytes(head[: len(h)])) for h in self.health):
            self._finish(sock, head)

    def _finish(self, sock: socket.socket, head: bytes | bytearray) -> None:
        self._answer(sock, head)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        self._held[sock] = (time.monotonic() + self.LINGER, bytearray(), True)

    def _answer(self, sock: socket.socket, head: bytes | bytearray) -> None:
        if head.startswith(self.health):
            status, extra, body = "200 OK", "", _HEALTHY
        else:
            status, extra, body = "503 Service Unavailable", "Retry-After: 1\r\n", _BUSY
        response = (
            f"HTTP/1.1 {status}\r\nServer: crmsync\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        with contextlib.suppress(OSError):
            sock.send(response)  # a few hundred bytes always fit in an empty send buffer

    def _close(self, sock: socket.socket) -> None:
        if self._held.pop(sock, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        with contextlib.suppress(OSError):
            sock.close()


class _Server(ThreadingHTTPServer):
    """One thread per connection up to ``receiver.max_connections``; the rest go to ``_Overflow``."""

    daemon_threads = True
    block_on_close = False  # stop() waits for requests in flight; idle readers end at their deadline
    allow_reuse_address = True
    # A small backlog drops SYNs under a burst of new connections: each costs a 1 s retransmit.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        self.slots = threading.BoundedSemaphore(receiver.max_connections)
        super().__init__(address, _make_handler(receiver))
        health = ("/healthz", receiver._prefix + "/healthz") if receiver._prefix else ("/healthz",)
        self.overflow = _Overflow(health, receiver.log_once)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.overflow.add(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        kind = type(exc).__name__
        self.receiver.log_once(
            f"connection:{kind}",
            logging.WARNING,
            "webhook connection from %s failed: %s: %s",
            client_address[0],
            kind,
            exc,
        )

    def server_close(self) -> None:
        super().server_close()
        self.overflow.stop()


def _make_handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: HubSpot and load tests reuse connections
        server_version = "crmsync"
        sys_version = ""
        timeout = receiver.request_deadline  # for writes; reads follow the request's deadline
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def setup(self) -> None:
            super().setup()
            self.rfile.close()
            self._reader = _DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self._reader)

        def handle_one_request(self) -> None:
            # The deadline covers a keep-alive connection's idle wait too: idle connections hold slots.
            self._reader.deadline = time.monotonic() + receiver.request_deadline
            super().handle_one_request()

        def _serve(self) -> None:
            if not receiver._enter():
                self._send(Answer(503, {"error": "shutting down"}, {"Retry-After": "5"}, close=True))
                return
            try:
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    answer = receiver.handle(
                        self.command, self.path, headers, self.rfile.read, client=str(self.client_address[0])
                    )
                except TimeoutError:
                    receiver.log_once(
                        "timeout", logging.INFO, "webhook request cut at its %.0f s deadline", receiver.request_deadline
                    )
                    answer = Answer(408, {"error": "request timeout"}, close=True)
                except OSError as exc:
                    receiver.log_once(f"connection:{type(exc).__name__}", logging.INFO, "webhook client gone: %s", exc)
                    self.close_connection = True
                    return
                except Exception as exc:
                    # A bug: one line a minute here, the traceback only with --verbose.
                    receiver.log_once(
                        f"bug:{type(exc).__name__}",
                        logging.ERROR,
                        "webhook receiver bug: %s: %s",
                        type(exc).__name__,
                        exc,
                    )
                    log.debug("webhook receiver bug", exc_info=True)
                    answer = Answer(500, {"error": "internal error"}, close=True)
                self._send(answer)
            finally:
                receiver._leave()

        def _send(self, answer: Answer) -> None:
            text = answer.text
            payload = text.encode() if text is not None else json.dumps(answer.body).encode()
            headers = {
                "Server": self.server_version,
                "Date": self.date_time_string(),
                "Content-Type": "text/plain; version=0.0.4" if text is not None else "application/json",
                "Content-Length": str(len(payload)),
                **answer.headers,
            }
            if answer.close:
                headers["Connection"] = "close"
                self.close_connection = True
            head = f"{self.protocol_version} {answer.status} {HTTPStatus(answer.status).phrase}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            self.connection.settimeout(receiver.request_deadline)  # a client that never reads is cut too
            # One write per answer: headers and body in separate segments cost a syscall each.
            self.wfile.write(head.encode("latin-1") + (payload if self.command != "HEAD" else b""))
            self.log_request(answer.status)

        do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

        def log_error(self, format: str, *args: Any) -> None:
            # The stdlib reports timeouts and bad request lines here, once per request.
            receiver.log_once("request", logging.INFO, "webhook request refused: %s", format % args)

        def log_message(self, format: str, *args: Any) -> None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s", self.address_string(), format % args)

    return Handler


# -- the serve loop --------------------------------------------------------------------------------
def serve(
    receiver: WebhookReceiver,
    *,
    tick: Callable[[], None] | None = None,
    interval: float = 5.0,
    stop: threading.Event | None = None,
    on_ready: Callable[[WebhookReceiver], None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Run the receiver until SIGTERM/SIGINT (or ``stop``); with ``tick``, call it every ``interval`` s.

    A signal interrupts a running tick (a pull commits page by page, so it loses nothing and the
    next run resumes from the last committed page: waiting for it could outlast a service
    manager's stop timeout), lets in-flight requests finish and commit, then returns.
    """
    # Plain flags, no locks: a signal handler must never wait on a lock its own thread holds.
    state = {"stop": False, "in_tick": False}

    def on_signal(signum: int, _frame: Any) -> None:
        state["stop"] = True
        if state["in_tick"]:
            raise KeyboardInterrupt

    def stopping() -> bool:
        return state["stop"] or (stop is not None and stop.is_set())

    previous: dict[int, Any] = {}
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        receiver.start()
        if on_ready is not None:
            on_ready(receiver)
        next_tick = time.monotonic()
        while not stopping():
            if tick is not None and time.monotonic() >= next_tick:
                state["in_tick"] = True
                try:
                    tick()
                except KeyboardInterrupt:
                    break
                except Exception:
                    log.exception("applying webhook events failed; trying again in %.0fs", interval)
                finally:
                    state["in_tick"] = False
                next_tick = time.monotonic() + interval
            time.sleep(0.1)
    finally:
        receiver.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def zoho_subscribe(
    app: App, connection: str | None, *, public_url: str | None = None, renew_within: timedelta = timedelta(days=1)
) -> dict[str, Any]:
    """Create the Zoho watch channel that calls this receiver, or renew it when it expires soon.

    The channel id, its token and the notify URL's secret are generated once and kept in the
    connection's keyring entry, where the receiver reads them; they are stored before the channel
    is enabled, because Zoho may call back at once.
    """
    conn = app.connection(connection)
    if conn.provider != "zoho":
        raise UsageError(f"{conn.name} is a {conn.provider} connection; watch channels are a Zoho feature")
    base = (public_url or app.config.webhook.public_url or "").rstrip("/")
    if not base:
        raise UsageError("Zoho must reach the receiver: pass --public-url or set webhook.public_url in the config")
    doc = app.secrets.get(conn.name) or {}
    existing = doc.get(ZOHO_CHANNEL_KEY)
    channel = str(existing or secrets.randbelow(9 * 10**15) + 10**15)  # Zoho wants a numeric id
    token = str(doc.get(ZOHO_TOKEN_KEY) or secrets.token_urlsafe(24))  # 32 characters; Zoho allows 50
    url_secret = str(doc.get(SECRET_KEY) or secrets.token_urlsafe(24))
    app.secrets.update(conn.name, **{ZOHO_CHANNEL_KEY: channel, ZOHO_TOKEN_KEY: token, SECRET_KEY: url_secret})
    provider: Any = app.provider(conn)
    expiry = provider.renew_if_needed(channel_id=channel, within=renew_within) if existing else None
    renewed = expiry is not None
    if expiry is None:
        notify_url = f"{base}/hooks/zoho/{conn.name}?{ZOHO_URL_PARAM}={url_secret}"
        expiry = provider.subscribe(channel_id=channel, notify_url=notify_url, token=token)
    return {
        "connection": conn.name,
        "channel_id": channel,
        "expires_at": expiry.isoformat(),
        "renewed": renewed,
        "notify_url": f"{base}/hooks/zoho/{conn.name}?{ZOHO_URL_PARAM}=***",
    }


def connections_with_hooks(app: App, names: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(connection, provider) pairs the receiver has routes for."""
    # With no names, no connection at all is fine: routes appear as connections are added.
    conns = app.connections(list(names)) if names else app.store.connections.all()
    return [(c.name, c.provider) for c in conns if c.provider in PROVIDERS]
