"""The rolling-window limiter against a CRM that counts requests on arrival, as CRMs do."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from crmsync.http import HttpClient, RateLimit, SlidingWindow


class RollingCrm:
    """A CRM answering 429 past ``limit`` requests in any ``per`` seconds, counted when a request
    arrives: ``there`` seconds after it was sent, then ``back`` seconds for the answer (random each)."""

    def __init__(self, limit: int, per: float, *, there: float, back: float, seed: int = 3) -> None:
        self.limit, self.per, self.there, self.back = limit, per, there, back
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.arrivals: list[float] = []
        self.sent: list[float] = []  # when each request left the client (the transport was called)
        self.answered: list[float] = []
        self.rejected = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.sent.append(time.monotonic())
            there, back = self.rng.uniform(0, self.there), self.rng.uniform(0, self.back)
        time.sleep(there)
        with self.lock:
            now = time.monotonic()
            recent = [a for a in self.arrivals if now - a < self.per]
            if len(recent) >= self.limit:
                self.rejected += 1
                status = 429
            else:
                self.arrivals.append(now)
                status = 200
        time.sleep(back)
        with self.lock:
            self.answered.append(time.monotonic())
        return httpx.Response(status, json={"message": "You have reached your ten_secondly_rolling limit."})


def _client(crm: RollingCrm, limit: int, per: float) -> HttpClient:
    return HttpClient(
        provider="test",
        connection="c1",
        base_url="http://crm.test",
        transport=httpx.MockTransport(crm),
        limits={"default": RateLimit(limit, per)},
        concurrency=2 * limit,
        backoff_base=0.01,
    )


def test_an_empty_window_is_spent_at_once_and_the_next_turn_leaves_one_window_after_the_first_answer() -> None:
    crm = RollingCrm(5, 0.4, there=0.02, back=0.02)
    c = _client(crm, 5, 0.4)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda _: c.get("/x"), range(6)))
    finally:
        c.close()
    sent = sorted(crm.sent)
    assert sent[4] - started < 0.1  # the whole allowance at once
    first_answer = min(crm.answered)
    # The sixth waits for the first to leave the window: counted from its answer (the CRM counted
    # it before answering), and not much later.
    assert 0.4 <= sent[5] - first_answer < 0.4 + 0.08
    assert crm.rejected == 0


def test_no_429_from_our_own_traffic_whatever_the_transit_times() -> None:
    """Transit times spread far more than a fixed margin could cover: a window counted from the
    answers still never runs ahead of the CRM's."""
    crm = RollingCrm(5, 0.3, there=0.12, back=0.04, seed=5)
    c = _client(crm, 5, 0.3)
    try:
        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(lambda _: c.get("/x"), range(20)))
    finally:
        c.close()
    assert crm.rejected == 0
    assert c.stats.rate_limited == 0
    assert len(crm.arrivals) == 20


def test_a_settled_turn_leaves_the_window_one_window_after_its_answer_however_long_it_was_in_flight() -> None:
    window = SlidingWindow(1, 0.2)
    assert window.try_acquire()
    time.sleep(0.1)  # in flight
    window.settle()
    answered = time.monotonic()
    window.settle()  # once per request: a second call changes nothing
    assert window.free() == 0
    window.acquire()
    waited = time.monotonic() - answered
    assert 0.2 <= waited < 0.2 + 0.05


def test_a_window_not_counted_from_answers_lets_a_turn_go_one_window_and_its_margin_after_it_was_taken() -> None:
    window = RateLimit(1, 0.2, from_answers=False).bucket()
    window.acquire()
    taken = time.monotonic()
    time.sleep(0.1)
    window.settle()  # ignored: this window counts from the turns
    window.acquire()
    assert 0.2 <= time.monotonic() - taken < 0.2 + 0.05


def test_turns_reserved_for_a_next_step_are_left_to_requests_that_do_not_defer() -> None:
    from crmsync.http import deferring

    window = SlidingWindow(3, 10.0)
    assert window.try_acquire()
    window.reserve(2)  # a lane's next step will need two
    with deferring():
        assert not window.try_acquire()  # a call may not take them
    assert window.try_acquire()  # the next step's request may
    window.reserve(-1)
    with deferring():
        assert not window.try_acquire()  # the last turn is still reserved
    window.reserve(-1)
    with deferring():
        assert window.try_acquire()  # none reserved any more
    assert window.free() == 0


def test_an_unsettled_turn_counts_from_when_its_request_left_never_earlier() -> None:
    window = RateLimit(1, 0.2, from_answers=False).bucket()
    window.acquire()
    time.sleep(0.1)  # waiting for a connection, or for the GIL, between the turn and the wire
    window.departed()
    left = time.monotonic()
    window.departed()  # a second call (a redirect, a retry's trace) moves it no earlier
    window.acquire()
    assert 0.2 <= time.monotonic() - left < 0.2 + 0.06


def test_a_request_on_the_wire_moves_its_turn_to_when_it_left() -> None:
    """Over a real socket, httpcore's trace hook tells the window when the headers leave."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    calls: list[float] = []

    class Spy(SlidingWindow):
        def departed(self) -> None:
            calls.append(time.monotonic())
            super().departed()

    url = f"http://127.0.0.1:{server.server_address[1]}"
    c = HttpClient(provider="test", connection="c1", base_url=url, limits={"default": RateLimit(5, 1.0)})
    c.buckets["default"] = Spy(5, 1.0, from_answers=False)
    try:
        started = time.monotonic()
        c.get("/x")
        c.get("/x")  # the kept-alive connection: the hook again
    finally:
        c.close()
        server.shutdown()
    assert len(calls) == 2 and calls[0] >= started
