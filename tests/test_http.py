"""The HTTP layer: limits, retries, Retry-After, refresh on 401, redaction, metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from crmsync.errors import AuthError, FatalProviderError, RetriableError
from crmsync.http import HttpClient, RateLimit, TokenBucket, parse_retry_after
from crmsync.redact import RedactingFilter, redact, register_secret


class Script:
    """A transport answering from a list of (status, headers, body) and recording requests."""

    def __init__(self, answers: list[tuple[int, dict[str, str], dict | str]]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, headers, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(body, dict):
            return httpx.Response(status, json=body, headers=headers)
        return httpx.Response(status, text=body, headers=headers)


def client(script: Script, **kw: object) -> tuple[HttpClient, list[float]]:
    slept: list[float] = []
    c = HttpClient(
        provider="test",
        connection="c1",
        base_url="http://crm.test",
        transport=httpx.MockTransport(script),
        sleep=slept.append,
        **kw,
    )  # type: ignore[arg-type]
    return c, slept


def test_retry_after_seconds_is_honoured_over_backoff() -> None:
    script = Script([(429, {"Retry-After": "7"}, {"message": "slow down"}), (200, {}, {"ok": True})])
    c, slept = client(script, backoff_base=0.01)
    assert c.get("/x").json() == {"ok": True}
    assert slept == [7.0]
    assert c.stats.rate_limited == 1 and c.stats.retries == 1


def test_retry_after_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    assert 28 <= (parse_retry_after(format_datetime(when, usegmt=True)) or 0) <= 30
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("0") == 0.0


def test_retry_after_is_capped_by_the_deadline() -> None:
    script = Script([(503, {"Retry-After": "3600"}, "down"), (200, {}, {"ok": True})])
    c, slept = client(script, deadline=5.0)
    c.get("/x")
    assert slept and slept[0] <= 5.0


def test_backoff_stays_within_full_jitter_bounds() -> None:
    c, _ = client(Script([(200, {}, {})]), backoff_base=0.5, backoff_cap=8.0)
    for attempt in range(1, 12):
        for _ in range(200):
            wait = c.backoff(attempt)
            assert 0 <= wait <= min(8.0, 0.5 * 2 ** (attempt - 1))


def test_gives_up_with_retriable_error_after_max_attempts() -> None:
    script = Script([(502, {}, "bad gateway")])
    c, slept = client(script, max_attempts=4, backoff_base=0.01)
    with pytest.raises(RetriableError):
        c.get("/x")
    assert len(script.requests) == 4 and len(slept) == 3


def test_connection_errors_and_timeouts_are_retried() -> None:
    calls = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ConnectError("refused", request=request)
        if calls["n"] == 2:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200, json={"ok": True})

    c = HttpClient(
        provider="t",
        connection="c",
        base_url="http://crm.test",
        transport=httpx.MockTransport(flaky),
        sleep=lambda s: None,
        backoff_base=0.001,
    )
    assert c.get("/x").json() == {"ok": True}
    assert calls["n"] == 3


def test_other_4xx_is_fatal_and_not_retried() -> None:
    script = Script([(400, {}, {"message": "bad property"})])
    c, slept = client(script)
    with pytest.raises(FatalProviderError) as exc:
        c.post("/x", json={})
    assert exc.value.status == 400 and "bad property" in str(exc.value)
    assert len(script.requests) == 1 and slept == []


class CountingAuth:
    def __init__(self, fixes: bool) -> None:
        self.token, self.refreshes, self.fixes = "old-token-123", 0, fixes

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def refresh(self, stale: Mapping[str, str]) -> bool:
        self.refreshes += 1
        if self.fixes:
            self.token = "new-token-456"
        return True


def test_401_refreshes_once_then_retries() -> None:
    def app(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer new-token-456":
            return httpx.Response(200, json={"ok": True})
        return httpx.Response(401, json={"message": "expired"})

    auth = CountingAuth(fixes=True)
    c = HttpClient(
        provider="t", connection="c", base_url="http://crm.test", transport=httpx.MockTransport(app), auth=auth
    )
    assert c.get("/x").json() == {"ok": True}
    assert auth.refreshes == 1 and c.stats.refreshes == 1


def test_401_that_refresh_does_not_fix_fails_cleanly() -> None:
    seen = []

    def app(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"message": "invalid token"})

    auth = CountingAuth(fixes=False)
    c = HttpClient(
        provider="t", connection="c", base_url="http://crm.test", transport=httpx.MockTransport(app), auth=auth
    )
    with pytest.raises(AuthError):
        c.get("/x")
    assert auth.refreshes == 1 and len(seen) == 2


@pytest.mark.slow
def test_token_bucket_never_exceeds_the_window() -> None:
    bucket = RateLimit(20, 1.0).bucket()
    stamps = []
    start = time.monotonic()
    while time.monotonic() - start < 2.2:
        bucket.acquire()
        stamps.append(time.monotonic())
    for i, t in enumerate(stamps):
        assert sum(1 for u in stamps[i:] if u - t < 1.0) <= 20


def test_token_bucket_pause_holds_callers() -> None:
    bucket = TokenBucket(rate=1000, capacity=5)
    bucket.pause(0.2)
    t0 = time.monotonic()
    bucket.acquire()
    assert time.monotonic() - t0 >= 0.18


SECRET = "pat-na1-11111111-2222-4333-8444-555555555555"


def test_redaction_of_headers_query_and_known_secrets() -> None:
    register_secret("s3cr3t-refresh-value")
    text = (
        f"Authorization: Bearer {SECRET} GET /x?access_token=abc123&client_secret=zzz&limit=5 "
        '{"refresh_token": "s3cr3t-refresh-value"} Zoho-oauthtoken 1000.abcdefabcdef'
    )
    clean = redact(text)
    for leaked in (SECRET, "abc123", "zzz", "s3cr3t-refresh-value", "1000.abcdefabcdef"):
        assert leaked not in clean
    assert "limit=5" in clean


def test_token_never_in_logs_or_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    def app(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"message": f"token {SECRET} is not allowed here"})

    c = HttpClient(
        provider="t",
        connection="c",
        base_url="http://crm.test",
        transport=httpx.MockTransport(app),
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    logger = logging.getLogger("crmsync.http")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.DEBUG, logger="crmsync"), pytest.raises(FatalProviderError) as exc:
        c.get(f"/x?access_token={SECRET}")
    logger.removeFilter(RedactingFilter())
    assert SECRET not in str(exc.value)
    assert SECRET not in caplog.text


def test_observer_gets_endpoint_status_and_duration() -> None:
    seen = []
    c = HttpClient(
        provider="p",
        connection="c",
        base_url="http://crm.test",
        transport=httpx.MockTransport(lambda r: httpx.Response(204)),
        observer=lambda *a: seen.append(a),
    )
    c.request("DELETE", "/crm/v3/objects/contacts/123", endpoint="/crm/v3/objects/{type}/{id}")
    assert seen[0][:4] == ("p", "c", "/crm/v3/objects/{type}/{id}", 204)


def test_sliding_window_spends_a_whole_window_at_once_and_takes_back_unused_turns() -> None:
    window = RateLimit(5, 1.0).bucket()
    t0 = time.monotonic()
    for _ in range(5):
        window.acquire()
    assert time.monotonic() - t0 < 0.05  # the whole allowance at once, as the CRM counts it
    window.give_back()  # the last turn was not used: one more may go now
    window.acquire()
    assert time.monotonic() - t0 < 0.05
    window.acquire()  # the sixth in this window waits for the first to leave it
    assert time.monotonic() - t0 >= 1.0


def test_requests_waiting_for_a_full_window_hold_no_slot_another_limit_could_use() -> None:
    """General requests queued behind a spent 10-second window must not starve searches of slots."""
    import threading

    def app(request: httpx.Request) -> httpx.Response:
        time.sleep(0.3 if request.url.path == "/slow" else 0.01)
        return httpx.Response(200, json={})

    c = HttpClient(
        provider="t",
        connection="c",
        base_url="http://crm.test",
        transport=httpx.MockTransport(app),
        limits={"default": RateLimit(2, 30.0), "search": RateLimit(100, 1.0)},
        concurrency=1,
    )
    # /slow holds the only slot; /b and /c get turns but no slot, so they hand their turns back and
    # wait for the slot; /b then goes and spends the window: /c must wait for a turn without the slot.
    threads = [threading.Thread(target=c.get, args=(path,), daemon=True) for path in ("/slow", "/b", "/c")]
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.6)
    t0 = time.monotonic()
    c.post("/search", json={}, bucket="search")
    assert time.monotonic() - t0 < 2.0  # the search goes now (it waited ~30 s while /c held the slot)


def test_hubspot_edge_of_the_portal_holds_back_only_when_another_integration_spends_it() -> None:
    """X-HubSpot-RateLimit-Remaining near 0 is ours when our own window is spent: no extra pause.

    Before, every response that filled our own window paused all requests for a second, once per
    10-second window of a long push. When the portal has fewer left than our window, the window
    counts the difference as someone else's (it used to pause for a second instead).
    """
    from types import SimpleNamespace

    from crmsync.providers.hubspot import HubSpotPolicy

    def seen(remaining: int, window: object) -> None:
        response = httpx.Response(200, headers={"X-HubSpot-RateLimit-Remaining": str(remaining)})
        HubSpotPolicy().observe(response, SimpleNamespace(buckets={"default": window}), "default")

    ours = RateLimit(3, 10.0).bucket()
    for _ in range(3):
        ours.acquire()
    seen(0, ours)  # the portal's last turn went to us: our window already waits for it
    assert ours.try_acquire() is False and ours.not_before == 0.0

    shared = RateLimit(100, 10.0).bucket()
    shared.acquire()
    seen(1, shared)  # we used one turn, the portal has one left: someone else spends it
    assert shared.try_acquire() is True  # the portal's last turn
    assert shared.try_acquire() is False and shared.free() == 0


def _who_goes_first(acquire: Callable[[], object], release: Callable[[], None], *, entity: str) -> list[str]:
    """A deferring call waits for ``acquire`` first, an entity (not deferring) next; who gets through first?

    Each releases what it got; ``release`` is called once more, after both wait, to free what the
    test holds (a no-op for a window, whose turn comes back by itself).
    """
    import contextlib
    import threading

    from crmsync.http import deferring

    order: list[str] = []

    def take(name: str, defer: bool) -> None:
        with deferring() if defer else contextlib.nullcontext():
            acquire()
        order.append(name)
        release()

    leaf = threading.Thread(target=take, args=("call", True))
    leaf.start()
    time.sleep(0.05)
    other = threading.Thread(target=take, args=(entity, False))
    other.start()
    time.sleep(0.05)
    release()
    leaf.join(3)
    other.join(3)
    return order


def test_deferring_requests_take_a_turn_only_when_no_other_request_waits_for_one() -> None:
    """Calls (the leaves of a push) let companies, contacts and deals have the next turns."""
    window = RateLimit(1, 0.3).bucket()
    window.acquire()  # spent: the turn comes back 0.3 s on
    order = _who_goes_first(window.acquire, lambda: None, entity="contact")
    # The call waited first, but the contact (waiting too) has the first turn that frees up.
    assert order == ["contact", "call"]


def test_deferring_requests_take_a_slot_in_flight_only_when_no_other_request_waits_for_one() -> None:
    """Zoho limits requests in flight: its 5 slots go first to what the rest of a push waits for."""
    from crmsync.http import Slots

    slots = Slots(1)
    slots.acquire()  # the only slot is taken
    order = _who_goes_first(slots.acquire, slots.release, entity="lookup")
    assert order == ["lookup", "call"]
    assert slots.acquire(blocking=False) and not slots.acquire(blocking=False)


def test_clients_share_one_verifying_tls_context() -> None:
    """Each client built its own context (the CA bundle loaded each time); verification must stay on."""
    import ssl

    from crmsync.http import tls_context

    clients = [HttpClient(provider="x", connection=c, base_url="https://crm.example.invalid") for c in "ab"]
    try:
        contexts = {id(c.client._transport._pool._ssl_context) for c in clients}  # type: ignore[attr-defined]
        assert contexts == {id(tls_context())}
        assert tls_context().verify_mode == ssl.CERT_REQUIRED and tls_context().check_hostname
    finally:
        for c in clients:
            c.close()


def test_a_429_our_window_did_not_expect_waits_for_its_oldest_turn_then_a_flat_second() -> None:
    """No Retry-After: the first surprise 429 widens the margin and waits for a turn; a second one a second."""
    from crmsync.http import SlidingWindow

    script = Script([(200, {}, {}), (429, {}, {"policyName": "SECONDLY"}), (200, {}, {}), (429, {}, {}), (200, {}, {})])
    c, slept = client(script, limits={"default": RateLimit(5, 1.0)})
    window = c.buckets["default"]
    assert isinstance(window, SlidingWindow)
    before = window.window
    c.get("/a")
    c.get("/b")  # rejected although our window had turns left, then sent again
    assert window.window == pytest.approx(before + SlidingWindow.JITTER)
    assert slept == [pytest.approx(2 * SlidingWindow.JITTER)]  # not a flat second
    c.get("/c")
    assert slept[1:] == [1.0]  # another within two windows: not jitter, someone else spends this limit
    assert c.stats.rate_limited == 2


def test_429s_for_requests_already_in_flight_count_as_one_overrun() -> None:
    """A burst's requests rejected together widen the margin once and cost no flat second."""
    import threading

    from crmsync.http import SlidingWindow

    window = SlidingWindow(5, 1.0)
    before = window.window
    taken = threading.Barrier(2)
    first_done = threading.Event()
    waits: dict[str, float] = {}

    def request(name: str, first: bool) -> None:
        assert window.try_acquire()
        taken.wait()  # both in flight
        if not first:
            first_done.wait()
        waits[name] = window.overrun()
        if first:
            first_done.set()

    threads = [threading.Thread(target=request, args=(n, n == "a")) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert window.window == pytest.approx(before + SlidingWindow.JITTER)  # once, not twice
    assert waits["a"] == waits["b"] == pytest.approx(2 * SlidingWindow.JITTER)  # b: not the flat second
    assert window.free() == 5


def test_a_surprise_429_on_a_ten_second_window_waits_for_the_margin_not_the_oldest_turn() -> None:
    from crmsync.http import SlidingWindow

    window = SlidingWindow(100, 10.0)
    assert window.try_acquire() and window.try_acquire()  # the second is refused by the CRM
    assert window.overrun() == pytest.approx(2 * SlidingWindow.JITTER)  # not the ~10 s until the first turn leaves
    assert window.free() == 99  # the refused turn given back


def test_answers_are_read_in_pieces_of_up_to_a_mebibyte() -> None:
    """Each socket read gives up the GIL; a 450 KB page should be one or two reads, not seven."""
    import httpcore._sync.http11 as http11

    from crmsync.http import READ_BYTES

    HttpClient(provider="x", connection="y", base_url="http://127.0.0.1:1").close()
    assert http11.HTTP11Connection.READ_NUM_BYTES >= READ_BYTES == 1 << 20


def test_reads_retry_a_500_and_writes_that_must_not_repeat_do_not() -> None:
    """A CRM's occasional 500 (HubSpot's here) passes on the next try: a read (or an upsert by key) is
    sent again; a create without a key is not (the 500 may have come after it was done)."""
    from crmsync.http.client import UnconfirmedWrite
    from crmsync.providers.hubspot import HubSpotPolicy

    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.method)
        if len(sent) % 2:
            return httpx.Response(500, json={"status": "error", "message": "internal error"})
        return httpx.Response(200, json={"results": []})

    client = HttpClient(
        provider="hubspot",
        connection="hs",
        base_url="http://hs.test",
        policy=HubSpotPolicy(),
        transport=httpx.MockTransport(answer),
        sleep=lambda _s: None,
    )
    try:
        assert client.post("/crm/v3/objects/contacts/search", json={}).status_code == 200
        assert sent == ["POST", "POST"]
        with pytest.raises(UnconfirmedWrite):
            client.post("/crm/v3/objects/calls/batch/create", json={}, replay=False)
        assert len(sent) == 3
    finally:
        client.close()
