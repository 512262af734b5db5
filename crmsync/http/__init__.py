"""One HTTP client per connection: rate limits, concurrency, retries, refresh, redaction, metrics.

The retry decision is made here once (STYLE habit 4): providers never sleep. A response is
sorted into ok / retry / refresh / fatal by a ``ResponsePolicy`` that a provider may subclass to
read its own headers and bodies (HubSpot's rate-limit headers, Zoho's ``INVALID_TOKEN``).
"""

from __future__ import annotations

import bisect
import contextlib
import email.utils
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay

from crmsync.errors import AuthError, FatalProviderError, RetriableError
from crmsync.redact import redact

log = logging.getLogger("crmsync.http")

RETRIABLE_STATUS = frozenset({429, 502, 503, 504})


class UnconfirmedWrite(RetriableError):
    """A write that may have reached the CRM but whose answer was lost (dropped connection, 5xx).

    Raised instead of a retry for requests sent with ``replay=False``: sending such a write again
    could do it twice, so the caller looks it up by its key or marker first.
    """


@dataclass(frozen=True)
class RateLimit:
    """At most ``requests`` in any ``per_seconds`` window (a rolling window, as CRMs count)."""

    requests: int
    per_seconds: float

    def bucket(self) -> SlidingWindow:
        """The limiter one process uses: the CRM's own rule, counted the way the CRM counts it."""
        return SlidingWindow(self.requests, self.per_seconds)

    def token_bucket(self) -> TokenBucket:
        """The same limit as a token bucket (state shared through Redis, see ``crmsync.scaleout``).

        A burst of c plus a refill of (requests - c) per window can never exceed the window's
        allowance, whichever window the CRM looks at; it trickles where a sliding window would
        spend the whole allowance at once.
        """
        capacity = max(1, self.requests // 20)
        return TokenBucket(rate=(self.requests - capacity) / self.per_seconds, capacity=capacity)


class Bucket(Protocol):
    def acquire(self) -> None: ...
    def pause(self, seconds: float) -> None: ...


#: How often a deferring request looks again for a turn that no other request is waiting for.
DEFER_POLL = 0.005
_defer = threading.local()


def _deferring() -> bool:
    return getattr(_defer, "on", False)


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """Requests made in this block (this thread) take a rate-limit turn only when no other request waits.

    For requests that nothing else waits on (a push's calls and tasks: the leaves of its chains):
    when a window is spent, the requests that others depend on (companies, contacts, deals) go
    first as turns free up, so the last window holds leaves that can all go at once, not a chain
    of round trips.
    """
    before = _deferring()
    _defer.on = True
    try:
        yield
    finally:
        _defer.on = before


class Slots:
    """At most ``n`` requests in flight; a deferring request (``deferring``) gets a slot only when no
    other request is waiting for one (a CRM that limits concurrency, Zoho's 5, is then spent first on
    what the rest of a push depends on)."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self.used = 0
        self.waiting = 0  # requests not deferring that wait for a slot
        self.cond = threading.Condition()

    def acquire(self, blocking: bool = True) -> bool:
        low = _deferring()
        with self.cond:
            if not low:
                self.waiting += 1
            try:
                while self.used >= self.n or (low and self.waiting):
                    if not blocking:
                        return False
                    self.cond.wait()
                self.used += 1
                return True
            finally:
                if not low:
                    self.waiting -= 1
                    if not self.waiting:
                        self.cond.notify_all()  # deferring requests may have a free slot now

    def release(self) -> None:
        with self.cond:
            if self.used <= 0:
                raise ValueError("Slots released too many times")
            self.used -= 1
            self.cond.notify_all()


class SlidingWindow:
    """At most ``requests`` request starts in any window of ``per_seconds`` (thread-safe).

    This is how CRMs state and count their limits ("100 per rolling 10 s", "5 per second"), so a
    client pacing by it can spend a window's whole allowance at once and is never early for the
    next one, where a token bucket's trickle leaves part of every window unused (a 270-request push
    under HubSpot's 100/10 s: 20 s here, 28 s with the bucket). The window is stretched by a margin,
    because we count a request when its turn is taken and the CRM when it arrives: JITTER for the
    spread of transit times, plus SEND for each turn of a window, since a window spent at once
    leaves as a burst whose last request goes out that much after its turn, while the next window's
    turns come back one at a time. Neither grows with the window's length (a 2 % stretch had cost
    0.2 s per 10-second window). ``pause`` holds every caller back (after a 429).
    """

    #: Seconds added to every window for the spread of network transit times (and again after
    #: each 429 it did not cover, see ``overrun``)...
    JITTER = 0.02
    #: ...and per turn of the window, for a burst's requests leaving one after another.
    SEND = 0.0006

    def __init__(self, requests: int, per_seconds: float) -> None:
        self.requests = max(1, requests)
        self.per_seconds = per_seconds
        self.window = per_seconds + self.JITTER + self.SEND * self.requests
        self._overrun_at = -1e9
        self.starts: deque[float] = deque()
        self.not_before = 0.0
        self.lock = threading.Lock()
        self._mine = threading.local()  # each thread's last turn, for give_back
        self.waiting = 0  # callers not deferring (see ``deferring``) that found no turn free

    def acquire(self) -> None:
        low = _deferring()
        counted = False
        try:
            while (wait := self._take(low)) > 0:
                if not low and not counted:
                    with self.lock:
                        self.waiting += 1
                    counted = True
                time.sleep(min(max(wait, 0.001), 1.0))
        finally:
            if counted:
                with self.lock:
                    self.waiting -= 1

    def try_acquire(self) -> bool:
        """Take a turn only if one is free now."""
        return self._take(_deferring()) == 0

    def _take(self, low: bool = False) -> float:
        """Take a turn if one is free (0.0), else how long until one may be."""
        with self.lock:
            now = time.monotonic()
            while self.starts and now - self.starts[0] >= self.window:
                self.starts.popleft()
            yielding = low and self.waiting > 0
            if not yielding and now >= self.not_before and len(self.starts) < self.requests:
                self.starts.append(now)
                self._mine.stamp = now
                return 0.0
            wait = self.not_before - now
            if len(self.starts) >= self.requests:
                wait = max(wait, self.starts[0] + self.window - now)
            # A deferring request sleeps until a turn may be free and then looks whether anyone else
            # still waits for it (not a busy loop while the window is spent).
            return max(wait, DEFER_POLL if yielding else 1e-6)

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.not_before = max(self.not_before, time.monotonic() + seconds)

    #: Longest the margin grows after 429s our own count did not expect.
    MAX_MARGIN = 0.25

    def overrun(self) -> float:
        """A 429 without a stated wait: how long to hold every caller back (seconds).

        The CRM counted our requests closer together than we did (transit times spread more than
        JITTER), so the margin grows by JITTER for the rest of the run, the rejected request's turn
        is given back (the CRM did not count it), and callers wait twice JITTER for the request the
        CRM still counts to leave its window. A flat second's pause cost a second each time. A 429
        for a request sent after that, within two windows, means more than jitter (another client
        on the same limit): then the flat second, as before. Requests already in flight count as
        the same 429.
        """
        stamp = getattr(self._mine, "stamp", None)
        self.give_back()  # the CRM did not count the rejected request: nor do we
        with self.lock:
            now = time.monotonic()
            if stamp is not None and stamp <= self._overrun_at:
                pass  # sent before the last 429 widened the margin: the same event, not a new one
            elif now - self._overrun_at < 2 * self.window:
                self._overrun_at = now
                self.not_before = max(self.not_before, now + 1.0)
                return 1.0
            else:
                self._overrun_at = now
                self.window = min(self.window + self.JITTER, self.per_seconds + self.MAX_MARGIN)
            # The request the CRM still counts is one our window let go of just now: it leaves the
            # CRM's window within the margin just added. (When our own window is spent, its oldest
            # turn holds the next request back anyway.)
            wait = 2 * self.JITTER
            self.not_before = max(self.not_before, now + wait)
            return wait

    def free(self) -> int:
        """Turns this window has left now (by our own count)."""
        with self.lock:
            now = time.monotonic()
            return self.requests - sum(1 for start in self.starts if now - start < self.window)

    def give_back(self) -> None:
        """Return the calling thread's last turn, not used after all."""
        stamp = getattr(self._mine, "stamp", None)
        self._mine.stamp = None
        with self.lock:
            if stamp is not None and stamp in self.starts:
                self.starts.remove(stamp)

    def settle(self) -> None:
        """Count the calling thread's last turn from now, when its answer came back: the CRM counted
        the request before answering it, so a window counted from the answers never runs ahead of
        the CRM's, whatever the transit times (for a CRM whose short window is its bottleneck)."""
        stamp = getattr(self._mine, "stamp", None)
        with self.lock:
            if stamp is None or stamp not in self.starts:
                return
            self.starts.remove(stamp)
            now = time.monotonic()
            bisect.insort(self.starts, now)
            self._mine.stamp = now

    def occupy(self, turns: int) -> None:
        """Count ``turns`` more as taken now: the CRM says its window holds requests this one never
        sent (an earlier process, another client on the same limit)."""
        with self.lock:
            now = time.monotonic()
            for _ in range(min(max(0, turns), self.requests)):
                bisect.insort(self.starts, now)


class TokenBucket:
    """A thread-safe token bucket; ``pause`` holds every caller back (after a 429)."""

    def __init__(self, *, rate: float, capacity: int) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens = float(capacity)
        self.updated = time.monotonic()
        self.not_before = 0.0
        self.lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if now >= self.not_before and self.tokens >= 1:
                    self.tokens -= 1
                    return
                wait = max(self.not_before - now, (1 - self.tokens) / self.rate if self.rate else 1.0)
            time.sleep(min(max(wait, 0.001), 1.0))

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.not_before = max(self.not_before, time.monotonic() + seconds)
            self.tokens = 0.0

    def give_back(self) -> None:
        """Return a token taken but not used."""
        with self.lock:
            self.tokens = min(self.capacity, self.tokens + 1)


class Auth(Protocol):
    """How a provider authenticates its requests."""

    def headers(self) -> dict[str, str]: ...
    def refresh(self, stale: Mapping[str, str]) -> bool: ...


class NoAuth:
    def headers(self) -> dict[str, str]:
        return {}

    def refresh(self, stale: Mapping[str, str]) -> bool:
        return False


class ResponsePolicy:
    """Sorts responses. Providers subclass it to read their own headers and error bodies."""

    def is_auth_expired(self, response: httpx.Response) -> bool:
        """True when a refresh and one retry may fix the response."""
        return response.status_code == 401

    def is_retriable(self, response: httpx.Response) -> bool:
        return response.status_code in RETRIABLE_STATUS

    def retry_after(self, response: httpx.Response) -> float | None:
        """Seconds the server asked us to wait, or None to use our own backoff."""
        return parse_retry_after(response.headers.get("Retry-After"))

    def give_up(self, response: httpx.Response) -> bool:
        """True for a retriable status that no wait within the deadline can fix (daily quota)."""
        return False

    def may_have_written(self, response: httpx.Response) -> bool:
        """True when a write answered so may still have been done (a 5xx from a proxy or the CRM)."""
        return response.status_code >= 500

    def observe(self, response: httpx.Response, client: HttpClient, bucket: str) -> None:
        """Look at every response (e.g. rate-limit headers) and slow the bucket down if needed."""

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        """(message, code) from an error body, for exceptions."""
        try:
            body = response.json()
        except ValueError:
            return response.text[:300], None
        if isinstance(body, dict):
            return str(body.get("message") or body.get("error") or body)[:500], body.get("code") or body.get("category")
        return str(body)[:300], None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class RequestStats:
    """Per-client counters, summed into the run log and metrics."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: int = 0
    refreshes: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, status: int) -> None:
        with self.lock:
            self.requests += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1
            if status == 429:
                self.rate_limited += 1

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """Counters accrued since an earlier ``as_dict()`` snapshot (one client serves many runs)."""
        now = self.as_dict()
        return {k: now[k] - before.get(k, 0) for k in now}

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "errors": self.errors,
            "refreshes": self.refreshes,
        }


_tls: Future[ssl.SSLContext] | None = None
_tls_lock = threading.Lock()


def prepare_tls() -> None:
    """Start building the process's one TLS context on a thread of its own.

    Every httpx client otherwise builds its own, and loading the CA bundle takes ~16 ms. It
    releases the GIL, so started early it overlaps the imports and set-up before the first request.
    """
    global _tls
    with _tls_lock:
        if _tls is not None:
            return
        _tls = future = Future()

    def build() -> None:
        try:
            future.set_result(httpx.create_ssl_context())
        except BaseException as exc:  # raised to whoever needs the context
            future.set_exception(exc)

    threading.Thread(target=build, name="tls-context", daemon=True).start()


def tls_context() -> ssl.SSLContext:
    """The shared, verifying TLS context (httpx's defaults: certifi, SSL_CERT_FILE/SSL_CERT_DIR honoured)."""
    prepare_tls()
    assert _tls is not None
    return _tls.result()


#: Bytes asked of the socket per read of an answer (httpcore reads 64 KiB at a time).
READ_BYTES = 1 << 20


def _read_in_larger_pieces() -> None:
    """Let httpcore read an answer in pieces of up to 1 MiB instead of 64 KiB.

    Each read gives up the GIL, and winning it back means waiting for the threads that parse,
    map and store earlier pages: a 2,000-row Zoho page (450 KB) was seven such waits on the
    chain of keyset requests (a pull of 20,000 changes, four interleaved runs each: median
    1.31 -> 1.28 s). httpcore offers no setting for it, only this class attribute; if it is
    ever gone, reads stay as they are.
    """
    try:
        from httpcore._sync.http11 import HTTP11Connection
    except ImportError:  # pragma: no cover - httpcore's layout changed
        return
    if getattr(HTTP11Connection, "READ_NUM_BYTES", READ_BYTES) < READ_BYTES:
        HTTP11Connection.READ_NUM_BYTES = READ_BYTES


def tls_verify(transport: httpx.BaseTransport | None) -> ssl.SSLContext | bool:
    """``verify`` for an httpx.Client: the shared context, unless a given transport makes no TLS of its own."""
    return tls_context() if transport is None else True


RequestObserver = Callable[[str, str, str, int, float], None]  # provider, connection, endpoint, status, seconds


class _Retry(Exception):
    def __init__(self, message: str, wait: float | None, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.wait = wait
        self.response = response


class HttpClient:
    """The only way crmsync talks to a CRM."""

    def __init__(
        self,
        *,
        provider: str,
        connection: str,
        base_url: str,
        limits: Mapping[str, RateLimit | Bucket] | None = None,
        concurrency: int = 4,
        timeout: float = 30.0,
        deadline: float = 300.0,
        max_attempts: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        auth: Auth | None = None,
        policy: ResponsePolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        observer: RequestObserver | None = None,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        _read_in_larger_pieces()
        self.provider, self.connection = provider, connection
        self.base_url = base_url.rstrip("/")
        self.buckets: dict[str, Bucket] = {
            name: (lim.bucket() if isinstance(lim, RateLimit) else lim) for name, lim in (limits or {}).items()
        }
        self.concurrency = max(1, concurrency)
        self.semaphore = Slots(self.concurrency)
        self.deadline, self.max_attempts = deadline, max_attempts
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.auth: Auth = auth or NoAuth()
        self.policy = policy or ResponsePolicy()
        self.observer = observer
        self.stats = RequestStats()
        self.sleep = sleep
        self.client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            verify=tls_verify(transport),
            headers={"User-Agent": "crmsync/0.1 (+https://github.com/crmsync)", **(headers or {})},
            limits=httpx.Limits(max_connections=max(1, concurrency) + 2, max_keepalive_connections=max(1, concurrency)),
        )

    # -- public --------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        url: str,
        *,
        bucket: str = "default",
        endpoint: str | None = None,
        expect: Collection[int] = (),
        replay: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send with limits and retries; return 2xx responses and any status in ``expect``.

        ``replay=False`` is for writes the CRM would do twice if sent twice (creates without a unique
        key): a failure after the request may have reached the CRM raises ``UnconfirmedWrite``.

        Raises:
            UnconfirmedWrite: with ``replay=False``, the write may or may not have been done.
            AuthError: 401/403 that a refresh does not fix.
            RetriableError: 429/5xx/timeouts past the retry budget or deadline.
            FatalProviderError: any other status.
        """
        endpoint = endpoint or url.split("?")[0]
        started = time.monotonic()
        retrier = Retrying(
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.deadline),
            wait=self._wait,
            retry=retry_if_exception_type(_Retry),
            reraise=True,
            sleep=self.sleep,
            before_sleep=self._before_sleep,
        )
        try:
            for attempt in retrier:
                with attempt:
                    return self._send(method, url, bucket, endpoint, expect, started, replay=replay, **kwargs)
        except _Retry as exc:
            self.stats.errors += 1
            raise RetriableError(
                f"{self.provider} {method} {endpoint}: {exc} (gave up after {time.monotonic() - started:.0f}s)",
                status=exc.response.status_code if exc.response is not None else None,
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self.client.close()

    # -- internals -----------------------------------------------------------------------------
    def backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        remaining = self.deadline - (state.seconds_since_start or 0.0)
        if isinstance(exc, _Retry) and exc.wait is not None:
            # The server knows better than our backoff, but never past our own deadline.
            return max(0.0, min(exc.wait, remaining))
        return max(0.0, min(self.backoff(state.attempt_number), remaining))

    def _before_sleep(self, state: RetryCallState) -> None:
        with self.stats.lock:
            self.stats.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        log.debug("retrying %s after %s", self.provider, redact(str(exc)))

    def _send(
        self,
        method: str,
        url: str,
        bucket: str,
        endpoint: str,
        expect: Collection[int],
        started: float,
        *,
        replay: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        if time.monotonic() - started > self.deadline:
            raise _Retry("deadline passed", None)
        refreshed = False
        while True:
            limiter = self.buckets.get(bucket) or self.buckets.get("default")
            auth_headers = self.auth.headers()
            headers = {**auth_headers, **(kwargs.pop("headers", None) or {})}
            # Built (the JSON body encoded) before the turn is taken: the CRM counts the request
            # when it arrives, and our window counts it when the turn is taken; the closer the two,
            # the smaller the margin the window needs (JITTER).
            request = self.client.build_request(method, url, headers=headers, **kwargs)
            self._admit(limiter)
            try:
                t0 = time.monotonic()
                try:
                    response = self.client.send(request)
                except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                    self._observe(endpoint, 0, time.monotonic() - t0)
                    unsent = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
                    if not replay and not isinstance(exc, unsent):
                        raise UnconfirmedWrite(
                            f"{self.provider} {method} {endpoint}: no answer ({type(exc).__name__})"
                        ) from None
                    raise _Retry(f"{type(exc).__name__}: {redact(str(exc))}", None) from None
            finally:
                self.semaphore.release()
            kwargs["headers"] = {k: v for k, v in headers.items() if k not in auth_headers}
            self._observe(endpoint, response.status_code, time.monotonic() - t0)
            self.policy.observe(response, self, bucket)
            if response.status_code in expect or (200 <= response.status_code < 300):
                if not self.policy.is_auth_expired(response):
                    return response
            if self.policy.is_auth_expired(response):
                if not refreshed and self.auth.refresh(auth_headers):
                    refreshed = True
                    with self.stats.lock:
                        self.stats.refreshes += 1
                    continue
                message, code = self.policy.error_message(response)
                raise AuthError(
                    f"{self.provider} rejected the credentials of connection {self.connection!r}: {redact(message)}",
                    hint="run `crmsync connect` again to renew them",
                )
            if not replay and self.policy.may_have_written(response):
                message, _ = self.policy.error_message(response)
                raise UnconfirmedWrite(
                    f"{self.provider} {method} {endpoint} -> HTTP {response.status_code}: {redact(message)}",
                    status=response.status_code,
                )
            if self.policy.is_retriable(response):
                message, _ = self.policy.error_message(response)
                if self.policy.give_up(response):
                    raise RetriableError(f"{self.provider}: {redact(message)}", status=response.status_code)
                wait = self.policy.retry_after(response)
                if response.status_code == 429 and limiter is not None:
                    overrun = getattr(limiter, "overrun", None)
                    if wait is None and overrun is not None:
                        wait = overrun()
                    else:
                        limiter.pause(wait if wait is not None else 1.0)
                raise _Retry(f"HTTP {response.status_code}: {redact(message)}", wait, response)
            message, code = self.policy.error_message(response)
            if response.status_code in (401, 403):
                raise AuthError(f"{self.provider} refused {method} {endpoint}: {redact(message)}")
            raise FatalProviderError(
                f"{self.provider} {method} {endpoint} -> HTTP {response.status_code}: {redact(message)}",
                status=response.status_code,
                code=code,
            )

    def _admit(self, limiter: Bucket | None) -> None:
        """Take a turn under the rate limit and a slot in flight, so that the request leaves at once.

        The turn comes first, and a request never waits for one while holding a slot: requests
        queued behind a full 10-second window would otherwise take every slot and stall another
        limit's requests (HubSpot's searches) that could go now. A turn kept while waiting for a free
        slot would reach the CRM late, bunched with later turns, and break its window: so it is
        handed back, and taken again (only if free at once) when a slot is. The caller releases the
        semaphore.
        """
        give_back = getattr(limiter, "give_back", None)
        try_acquire = getattr(limiter, "try_acquire", None)
        while True:
            if limiter is not None:
                limiter.acquire()
            if self.semaphore.acquire(blocking=False):
                return
            if give_back is None:  # a limiter that cannot hand turns back (Redis): keep the turn
                self.semaphore.acquire()
                return
            give_back()
            self.semaphore.acquire()
            try:
                if try_acquire is None:
                    limiter.acquire()  # type: ignore[union-attr]
                    return
                if try_acquire():
                    return
            except BaseException:
                self.semaphore.release()  # never leak a slot in flight (Ctrl-C, a shared limiter's error)
                raise
            self.semaphore.release()

    def _observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.stats.count(status)
        if self.observer is not None:
            self.observer(self.provider, self.connection, endpoint, status, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %s in %.0f ms", self.provider, endpoint, status, seconds * 1000)
