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

import contextlib
import io
import ipaddress
import json
import logging
import re
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

if TYPE_CHECKING:
    from crmsync.app import App

log = logging.getLogger("crmsync.webhooks")

MAX_AGE_SECONDS = 300.0  # signed timestamps older than 5 minutes (or as far ahead) are refused
SECRET_RELOAD_SECONDS = 5.0
LOG_EVERY_SECONDS = 60.0  # one log line per kind of problem per minute; the metrics count every one

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


def capability(app: App, connection: str | None) -> tuple[Any, WebhookSupport]:
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
@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    text: str | None = None  # a plain-text body instead of JSON (metrics)


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
        self._providers = {c.name: c.provider for c in self.store.connections()}
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


def connections_with_hooks(app: App, names: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(connection, provider) pairs the receiver has routes for."""
    # With no names, no connection at all is fine: routes appear as connections are added.
    conns = app.connections(list(names)) if names else app.store.connections()
    able = capabilities()
    return [(c.name, c.provider) for c in conns if c.provider in able]


def subscribe(
    app: App, connection: str | None, *, public_url: str | None = None, renew_within: timedelta = timedelta(days=1)
) -> dict[str, Any]:
    """Register this receiver with the connection's CRM (or renew the subscription it has).

    What the CRM's calls must carry (credentials, channel tokens, URL secrets) is generated once
    and kept in the connection's secret, where the receiver reads it; it is stored before the CRM
    is told, because the CRM may call back at once.
    """
    conn, support = capability(app, connection)
    if not support.subscribes:
        raise UsageError(
            f"{support.label} webhooks are set up in {support.label} itself: point them at "
            f"PUBLIC_URL/hooks/{conn.provider}/{conn.name} and store the secret with `crmsync webhook secret`"
        )
    base = (public_url or app.config.webhook.public_url or "").rstrip("/")
    if not base:
        raise UsageError(
            f"{support.label} must reach the receiver: pass --public-url or set webhook.public_url in the config"
        )
    doc = app.secrets.get(conn.name) or {}
    values = support.prepare_secret(doc)
    if values:
        app.secrets.update(conn.name, **values)
    secret = {k: str(v) for k, v in {**doc, **values}.items() if isinstance(v, str | int)}
    path = f"{base}/hooks/{conn.provider}/{conn.name}"
    report = support.subscribe(
        app.provider(conn), secret, path + support.hook_query(secret, reveal=True), renew_within=renew_within
    )
    return {"connection": conn.name, **report, "notify_url": path + support.hook_query(secret, reveal=False)}


def store_secret(app: App, connection: str | None, value: str, *, channel_id: str | None = None) -> dict[str, Any]:
    """Keep a webhook secret the CRM gave (read by `webhook secret`); returns the URL the CRM must call."""
    conn, support = capability(app, connection)
    doc = app.secrets.get(conn.name) or {}
    values = support.accept_secret(value, doc, channel_id=channel_id)
    app.secrets.update(conn.name, **values)
    base = (app.config.webhook.public_url or "PUBLIC_URL").rstrip("/")
    query = support.hook_query({**{k: str(v) for k, v in doc.items()}, **values}, reveal=True)
    return {"connection": conn.name, "stored": True, "notify_url": f"{base}/hooks/{conn.provider}/{conn.name}{query}"}


def secret_prompt(app: App, connection: str | None) -> str:
    """What `webhook secret` asks for on this connection, or a usage error where crmsync makes the secret."""
    conn, support = capability(app, connection)
    if support.secret_prompt is None:
        raise UsageError(
            f"crmsync generates the {support.label} webhook credentials: run `crmsync webhook subscribe -c {conn.name}`"
        )
    return support.secret_prompt


def renew(
    app: App, names: Iterable[str], last: dict[str, float], public_url: str | None, *, every: float = 3600
) -> None:
    """Renew, at most every ``every`` seconds each, the subscriptions of ``names`` that expire."""
    from crmsync.errors import CrmsyncError

    for name in names:
        if time.monotonic() - last.get(name, float("-inf")) < every:
            continue
        last[name] = time.monotonic()
        try:
            _, support = capability(app, name)
            if not (support.renews and support.subscribed(app.secrets.get(name) or {})):
                continue  # nothing made by `webhook subscribe`, or nothing that expires
            subscribe(app, name, public_url=public_url)
        except CrmsyncError as exc:
            log.warning("renewing the webhook subscription of %s failed: %s", name, exc)
