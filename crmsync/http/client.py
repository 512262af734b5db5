"""One HTTP client per connection: rate limits, concurrency, retries, refresh, redaction, metrics.

A response is sorted into ok / retry / refresh / fatal by a ``ResponsePolicy`` (``policy``) that a
provider may subclass; limits and slots in flight are in ``limits``.
"""

from __future__ import annotations

import functools
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay

from crmsync.errors import AuthError, FatalProviderError, RetriableError
from crmsync.http.limits import Bucket, RateLimit, Slots
from crmsync.http.policy import ResponsePolicy
from crmsync.http.tuning import read_in_larger_pieces
from crmsync.redact import redact

log = logging.getLogger("crmsync.http")


class UnconfirmedWrite(RetriableError):
    """A write that may have reached the CRM but whose answer was lost (dropped connection, 5xx).

    Raised instead of a retry for requests sent with ``replay=False``: sending such a write again
    could do it twice, so the caller looks it up by its key or marker first.
    """


class Auth(Protocol):
    """How a provider authenticates its requests."""

    def headers(self) -> dict[str, str]: ...
    def refresh(self, stale: Mapping[str, str]) -> bool: ...


class NoAuth:
    def headers(self) -> dict[str, str]:
        return {}

    def refresh(self, stale: Mapping[str, str]) -> bool:
        return False


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

    Every httpx client otherwise builds its own, and loading the CA bundle is slow; it releases the
    GIL, so started early it overlaps the imports and set-up before the first request.
    """
    global _tls
    with _tls_lock:
        if _tls is not None:
            return
        future: Future[ssl.SSLContext] = Future()
        _tls = future

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


def tls_verify(transport: httpx.BaseTransport | None) -> ssl.SSLContext | bool:
    """``verify`` for an httpx.Client: the shared context, unless a given transport makes no TLS of its own."""
    return tls_context() if transport is None else True


RequestObserver = Callable[[str, str, str, int, float], None]  # provider, connection, endpoint, status, seconds


class _Retry(Exception):
    def __init__(self, message: str, wait: float | None, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.wait = wait
        self.response = response


def _on_trace(departed: Callable[[], None], event: str, info: Any) -> None:
    """httpcore's trace hook (a documented request extension): the request's turn counts from the
    moment its headers start on the wire."""
    if event.endswith("send_request_headers.started"):
        departed()


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
        read_in_larger_pieces()
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

    def after_quiet(self, seconds: float | None) -> None:
        """Other requests on this connection (an earlier run's, another process's) ended ``seconds``
        ago: 0 when some may still be going on, None when there were none.

        They may still hold part of the CRM's window, which a fresh client's windows cannot know
        until an answer states the CRM's count: so each window whose answers state it (the policy's
        ``counts_stated``) and that they may still be in lets its first request go alone
        (``SlidingWindow.probe``). A client that has already sent requests has learned from their
        answers; windows the CRM stated nothing for, and runs a window or more apart, start at once.
        """
        if seconds is None or self.stats.requests:
            return
        for name in getattr(self.policy, "counts_stated", ()):
            window = self.buckets.get(name)
            probe = getattr(window, "probe", None)
            if probe is not None and seconds < getattr(window, "per_seconds", 0.0):
                probe()

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
            if (departed := getattr(limiter, "departed", None)) is not None:
                request.extensions["trace"] = functools.partial(_on_trace, departed)
            self._admit(limiter)
            try:
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
                    # Answered or not, the CRM counted the request (if at all) by now: its turn
                    # leaves the window from now.
                    if (settle := getattr(limiter, "settle", None)) is not None:
                        settle()
                self._observe(endpoint, response.status_code, time.monotonic() - t0)
                self.policy.observe(response, self, bucket)
            finally:
                # What the answer said of the CRM's count is learned (or no answer came): a probe's
                # window lets the others go.
                if (answered := getattr(limiter, "answered", None)) is not None:
                    answered()
            kwargs["headers"] = {k: v for k, v in headers.items() if k not in auth_headers}
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
