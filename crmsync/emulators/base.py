"""The emulator framework: a stateful fake CRM that answers ``httpx.Request`` objects.

One emulator object serves three ways:

* in-process, as ``httpx.MockTransport(emulator)`` (``emulator.transport()``), for unit tests;
* on loopback, through ``serve()`` (stdlib ``ThreadingHTTPServer``, no extra dependency), for the CLI
  end-to-end tests, the benchmarks, ``crmsync demo`` and ``crmsync sandbox serve``;
* with faults switched on (``Faults``): latency, rate limits answered with the provider's own 429,
  random 5xx, dropped connections, lost acknowledgements, token expiry and partial batch failures.

A provider's emulator subclasses ``Emulator``, registers routes with ``self.route(...)`` and
overrides the few hooks that make errors look like that provider's (``error_response``,
``rate_limited_response``, ``authenticate``).
"""

from __future__ import annotations

import collections
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx

Handler = Callable[..., httpx.Response]


@dataclass
class Faults:
    """Fault knobs. All default to off, so an emulator is a perfect CRM until told otherwise."""

    latency_ms: float = 0.0
    # Requests allowed per window per bucket, e.g. {"default": (100, 10.0), "search": (5, 1.0)}.
    rate_limits: dict[str, tuple[int, float]] = field(default_factory=dict)
    max_concurrent: int = 0  # 0 = unlimited; above it the provider's 429 is returned
    error_rate: float = 0.0  # random 500/502/503 before the request is processed
    drop_rate: float = 0.0  # connection dropped before processing
    lost_ack_rate: float = 0.0  # request processed, then the connection dropped (the reply is lost)
    partial_rate: float = 0.0  # share of batch items that fail with a per-item error
    token_ttl: float | None = None  # seconds an issued OAuth access token lives (None = provider default)
    seed: int = 0
    #: Per request, once processed: is its answer lost? (A proxy that forwards a write and drops the
    #: reply, at the points a test picks: a route, a body, a seeded draw.) Called under the lock.
    lose_reply: Callable[[httpx.Request], bool] | None = None
    #: What the client gets instead of a lost answer: 0 = the connection drops, else this status.
    lost_reply_status: int = 0


class DroppedConnection(Exception):
    """Raised inside the emulator to drop the connection (no HTTP response)."""


class _SlidingWindow:
    """A rolling-window counter, the way HubSpot's ten-secondly limit behaves."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self.hits: collections.deque[float] = collections.deque()
        self.lock = threading.Lock()

    def admit(self, now: float) -> float:
        """Record a hit and return 0, or return the seconds until a slot frees up."""
        with self.lock:
            while self.hits and now - self.hits[0] >= self.window:
                self.hits.popleft()
            if len(self.hits) >= self.limit:
                return self.window - (now - self.hits[0])
            self.hits.append(now)
            return 0.0

    def used(self, now: float, window: float) -> int:
        """Hits in the ``window`` seconds before ``now``."""
        with self.lock:
            return sum(1 for hit in self.hits if now - hit < window)


@dataclass
class Stats:
    """What the emulator saw: the tests and benchmarks read these counters."""

    requests: int = 0
    by_route: collections.Counter[str] = field(default_factory=collections.Counter)
    writes: int = 0
    rate_limited: int = 0
    errors_injected: int = 0
    dropped: int = 0
    concurrent_peak: int = 0
    log: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)


class Emulator:
    """Base class of the HubSpot, Zoho and Odoo emulators."""

    provider: ClassVar[str] = ""
    #: Routes whose name is listed here count as writes (Stats.writes).
    write_methods: ClassVar[frozenset[str]] = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def __init__(self, *, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.rng = random.Random(self.faults.seed)
        self.lock = threading.RLock()
        self.stats = Stats()
        self.clock_offset = 0.0
        self._routes: list[tuple[str, re.Pattern[str], Handler, str, str]] = []
        self._windows: dict[str, _SlidingWindow] = {}
        self._in_flight = 0
        self._flight_lock = threading.Lock()
        self.keep_log = False
        self.host = "127.0.0.1"

    # -- time ----------------------------------------------------------------------------------
    def now(self) -> float:
        """Emulated wall-clock time (seconds since the epoch); tests shift it with clock_offset."""
        return time.time() + self.clock_offset

    # -- routing -------------------------------------------------------------------------------
    def route(self, method: str, pattern: str, handler: Handler, *, bucket: str = "default", name: str = "") -> None:
        """Register ``handler(request, **path_params)`` for METHOD and a path regex with named groups."""
        self._routes.append((method, re.compile(f"^{pattern}$"), handler, bucket, name or pattern))

    def _match(self, request: httpx.Request) -> tuple[Handler, dict[str, str], str, str] | None:
        path = request.url.path
        for method, regex, handler, bucket, name in self._routes:
            if method == request.method:
                m = regex.match(path)
                if m:
                    return handler, m.groupdict(), bucket, name
        return None

    # -- provider hooks ------------------------------------------------------------------------
    def error_response(self, status: int, message: str, **extra: Any) -> httpx.Response:
        """The provider's error envelope."""
        return json_response({"status": "error", "message": message, **extra}, status)

    def rate_limited_response(self, bucket: str, retry_after: float) -> httpx.Response:
        """The provider's 429 (body and headers as the real API sends them)."""
        return self.error_response(429, "rate limited")

    def authenticate(self, request: httpx.Request, route_name: str) -> httpx.Response | None:
        """Return an error response when the request's credentials are not accepted."""
        return None

    def unknown_route(self, request: httpx.Request) -> httpx.Response:
        return self.error_response(404, f"no route for {request.method} {request.url.path}")

    # -- the entry point -----------------------------------------------------------------------
    def __call__(self, request: httpx.Request) -> httpx.Response:
        """Answer one request, applying the configured faults first."""
        f = self.faults
        started = time.monotonic()
        with self._flight_lock:
            self._in_flight += 1
            in_flight = self._in_flight
            self.stats.concurrent_peak = max(self.stats.concurrent_peak, in_flight)
        try:
            # ``latency_ms`` is the time the CRM takes to answer, as a client measures it: half of
            # it on the way there, where the CRM counts its rate limits on arrival, then the work,
            # then the rest of it on the way back. The emulator's own work is part of that time, not
            # added to it (a real CRM's servers work in parallel; the emulator's under one lock, on
            # the same machine as the client).
            if f.latency_ms:
                time.sleep(f.latency_ms / 2000.0)
            response = self._dispatch(request, in_flight)
            if f.latency_ms and (left := started + f.latency_ms / 1000.0 - time.monotonic()) > 0:
                time.sleep(left)
            return response
        finally:
            with self._flight_lock:
                self._in_flight -= 1

    def _dispatch(self, request: httpx.Request, in_flight: int) -> httpx.Response:
        f = self.faults
        matched = self._match(request)
        wait = 0.0
        if matched is not None:
            bucket = matched[2]
            limit = f.rate_limits.get(bucket) or (f.rate_limits.get("default") if bucket != "none" else None)
            if limit:
                # Counted on arrival, not after waiting for the lock behind other requests' work.
                with self._flight_lock:
                    window = self._windows.setdefault(bucket, _SlidingWindow(*limit))
                wait = window.admit(time.monotonic())
        with self.lock:
            self.stats.requests += 1
            if matched is None:
                return self._log(request, self.unknown_route(request))
            handler, params, bucket, name = matched
            self.stats.by_route[f"{request.method} {name}"] += 1
            if f.max_concurrent and in_flight > f.max_concurrent:
                self.stats.rate_limited += 1
                return self._log(request, self.rate_limited_response("concurrency", 0.0))
            if wait:
                self.stats.rate_limited += 1
                return self._log(request, self.rate_limited_response(bucket, wait))
            if f.drop_rate and self.rng.random() < f.drop_rate:
                self.stats.dropped += 1
                raise DroppedConnection()
            if f.error_rate and self.rng.random() < f.error_rate:
                self.stats.errors_injected += 1
                status = self.rng.choice((500, 502, 503))
                return self._log(request, self.error_response(status, "injected server error"))
            denied = self.authenticate(request, name)
            if denied is not None:
                return self._log(request, denied)
            if request.method in self.write_methods and not name.endswith(("search", "read", "token")):
                self.stats.writes += 1
            response = handler(request, **params)
            if f.lost_ack_rate and self.rng.random() < f.lost_ack_rate:
                self.stats.dropped += 1
                raise DroppedConnection()
            if f.lose_reply is not None and f.lose_reply(request):
                self.stats.dropped += 1
                if f.lost_reply_status:
                    message = "injected: the request was processed, its answer lost"
                    return self._log(request, self.error_response(f.lost_reply_status, message))
                raise DroppedConnection()
            return self._log(request, response)

    def _log(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if self.keep_log:
            self.stats.log.append((request.method, request.url.path, response.status_code))
        return response

    # -- ways to serve -------------------------------------------------------------------------
    def transport(self) -> httpx.MockTransport:
        """An httpx transport that answers in-process (drops become httpx.RemoteProtocolError)."""

        def handle(request: httpx.Request) -> httpx.Response:
            request.read()
            try:
                return self(request)
            except DroppedConnection:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request
                ) from None

        return httpx.MockTransport(handle)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> LoopbackServer:
        """Serve on loopback in a background thread; ``.url`` is the base URL."""
        server = LoopbackServer(self, host, port)
        server.start()
        return server

    def base_url(self) -> str:
        """Path prefix the provider's base URL must carry (e.g. Zoho's ``/crm/v8`` lives below it)."""
        return ""


class LoopbackServer:
    """A ThreadingHTTPServer that hands each request to an emulator."""

    def __init__(self, emulator: Emulator, host: str, port: int) -> None:
        self.emulator = emulator
        handler = _make_handler(emulator)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        # Keep the default listen backlog from refusing bursts of concurrent clients.
        self.httpd.request_queue_size = 128
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="emulator", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self.emulator.host = self.url
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_handler(emulator: Emulator) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in two writes; with Nagle's algorithm on, the body waits for the
        # client's delayed ACK (~40 ms a request on Linux) -- an artefact of this server, not of any CRM.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the tests read Stats
            return

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            host = self.headers.get("Host", "127.0.0.1")
            request = httpx.Request(
                self.command, f"http://{host}{self.path}", headers=list(self.headers.items()), content=body
            )
            try:
                response = emulator(request)
            except DroppedConnection:
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass
                return
            payload = response.content
            # send_response_only: the emulator's own Date (its emulated clock) must be the only one.
            self.send_response_only(response.status_code)
            if "date" not in response.headers:
                self.send_header("Date", self.date_time_string())
            for key, value in response.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    return _Handler


# -- helpers shared by the emulators -------------------------------------------------------------
def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
    """A JSON response with the content type real APIs send."""
    return httpx.Response(
        status,
        content=json.dumps(body, separators=(",", ":")).encode(),
        headers={"Content-Type": "application/json;charset=utf-8", **(headers or {})},
    )


def request_json(request: httpx.Request) -> Any:
    """The request body as JSON (None when empty or malformed; handlers answer 400 themselves)."""
    try:
        return json.loads(request.content or b"null")
    except ValueError:
        return None


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
