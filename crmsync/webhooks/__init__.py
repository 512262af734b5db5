"""Webhooks: the receiver that verifies, normalises and stores CRM change events, for any CRM.

Each CRM's part (signatures or credentials, payload parsing, subscriptions) is its provider's
webhook capability (``Provider.webhooks()``, ``providers/capabilities.py``); this module routes
``/hooks/<provider>/<connection>`` to it and knows no CRM. The receiver only verifies, normalises
and stores; ``pull`` turns the stored events into one batch read of the changed records
(``crmsync.sync.events``). Nothing in the request path calls a CRM, so an answer never waits on
one, and a 2xx is sent only after the event is committed: a CRM that got a 2xx may forget the
event, so we must not.

Design choices that matter:

* **One connection, group commits** (``store.events.EventWriter``): the request thread holding the
  commit lock commits every request queued meanwhile in one transaction. SQLite has one writer at
  a time anyway; queueing in-process avoids its sleeping busy handler (latency spikes) and lets
  one fsync (``synchronous=FULL``: a 2xx survives power loss too) cover many requests. The
  events of one request always commit together (an array of events is atomic).
* **Dedupe keys** say what happened, not who sent it (each capability builds them). A redelivery
  is acknowledged and counted as a duplicate, never stored twice.
* **Secrets** are read from the keyring once per connection and cached; a failed check re-reads
  them (at most every few seconds), so a rotated secret works without a restart.
* The receiver binds loopback by default: on the internet it belongs behind a TLS-terminating
  reverse proxy, and ``public_url`` says which URL the CRM signs (``X-Forwarded-Proto``/``-Host``
  are honoured only with ``trust_proxy``, because anyone can send them).
* **Hostile traffic costs little.** Every route authenticates before it parses (a signature over
  the raw body, Basic credentials, or a secret in the URL's query checked before the body is even
  read), JSON nesting is bounded, at most ``max_connections`` connections get a thread
  (the rest are answered 503 from one overflow thread, ``/healthz`` 200), a request must arrive
  whole within ``request_deadline`` seconds however slowly it trickles, ``/metrics`` answers
  loopback clients only, and each kind of problem is logged once a minute, without a traceback.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from crmsync.errors import ConfigError, UsageError
from crmsync.providers import get_provider, provider_names
from crmsync.providers.capabilities import (
    MalformedEvent,
    VerificationFailed,
    WebhookRequest,
    WebhookSupport,
    json_body,
)
from crmsync.store.events import EventWriter, WriterStopped
from crmsync.webhooks.server import Answer, LogOnce, Server

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.store import CrmConnection

log = logging.getLogger("crmsync.webhooks")

MAX_AGE_SECONDS = 300.0  # signed timestamps older than 5 minutes (or as far ahead) are refused
SECRET_RELOAD_SECONDS = 5.0

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"  # same rule as `crmsync connect --name`
_ROUTE = re.compile(rf"^/hooks/(?P<provider>[a-z][a-z0-9_-]{{0,31}})/(?P<connection>{_NAME})$")


def capabilities() -> dict[str, WebhookSupport]:
    """The webhook capability of every registered provider that has one, by provider name."""
    found = {}
    for name in provider_names():
        try:
            support = get_provider(name).webhooks()
        except UsageError:  # a provider left out of this build
            continue
        if support is not None:
            found[name] = support
    return found


def capability(app: App, connection: str | None) -> tuple[CrmConnection, WebhookSupport]:
    """(connection, its provider's webhook capability), or a usage error naming the CRMs that have one."""
    conn = app.connection(connection)
    cls = get_provider(conn.provider)
    support = cls.webhooks()
    if support is None:
        able = ", ".join(s.label for s in capabilities().values())
        raise UsageError(
            f"{conn.name} is a connection to {cls.label}, which sends no webhooks crmsync can receive "
            f"(webhooks exist for {able}); `crmsync pull` keeps it in step"
        )
    return conn, support


# -- secrets ---------------------------------------------------------------------------------------
@dataclass
class _Secret:
    values: dict[str, str]
    loaded_at: float


class SecretCache:
    """Webhook secrets per connection, read from the keyring once and again on a miss."""

    def __init__(
        self,
        secrets: Any,
        capability_of: Callable[[str], WebhookSupport | None],
        *,
        reload_after: float = SECRET_RELOAD_SECONDS,
    ) -> None:
        self.secrets = secrets
        self.capability_of = capability_of  # connection -> its CRM's capability (which keys to read)
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
            support = self.capability_of(connection)
            keys = support.secret_keys if support is not None else ()
            values = {k: str(doc[k]) for k in keys if doc.get(k)}
            for key in support.hidden_keys if support is not None else ():
                register_secret(values.get(key))
            self._cache[connection] = _Secret(values, time.monotonic())
            return values


# -- the receiver ----------------------------------------------------------------------------------
class WebhookReceiver:
    """The HTTP receiver: ``/hooks/{provider}/{connection}`` for every CRM with webhooks, POST only.

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
        self.capabilities = capabilities()
        self.secrets = SecretCache(app.secrets, lambda name: self.capabilities.get(self._providers.get(name, "")))
        self.log_once = LogOnce()
        self.writer = EventWriter(self.store, log_once=self.log_once)
        self._providers: dict[str, str] = {}
        self._providers_loaded = 0.0
        self._counters: dict[tuple[str, str, str], Any] = {}
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
            self._httpd = Server((self.host, self.port), self)
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
        support = self.capabilities.get(provider)
        query = support.hook_query({}, reveal=False) if support is not None else ""  # secrets stay in the keyring
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
        if m is None or m["provider"] not in self.capabilities:
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
        support = self.capabilities[provider]
        request = WebhookRequest(
            method=method,
            uri=self.signed_uri(signed_path, headers),
            headers=headers,
            query=parse_qs(query),
            now=self.clock(),
            max_age=self.max_age,
        )
        if known:
            # What the caller can prove before its body is read (a secret in the URL) is checked unread.
            try:
                self._verify(connection, lambda s: support.check_before_body(s, request))
            except VerificationFailed as exc:
                self._count(provider, connection, "received")
                return self._rejected(provider, connection, str(exc), close=True)
        body = read_body(int(length))
        if not known:
            return Answer(404, {"error": "not found"})
        self._count(provider, connection, "received")
        try:
            self._verify(connection, lambda s: support.verify(s, request, body))
            events = support.events(json_body(body))
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

    def _count(self, provider: str, connection: str, result: str, n: int = 1) -> None:
        if not n:
            return
        key = (provider, connection, result)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.webhook_events.labels(*key)
        counter.inc(n)


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


def connections_with_hooks(app: App, names: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(connection, provider) pairs the receiver has routes for."""
    # With no names, no connection at all is fine: routes appear as connections are added.
    conns = app.connections(list(names)) if names else app.store.connections.all()
    able = capabilities()
    return [(c.name, c.provider) for c in conns if c.provider in able]
