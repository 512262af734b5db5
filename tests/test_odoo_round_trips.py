"""Odoo: what costs a round trip on the critical path is sent once, or beside the rest (issue 31).

The in-process emulator behind ``tests.test_odoo_partitions.Spy``, which holds each answer a
little so that requests of different threads overlap.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.providers.odoo.partitioned import Turns
from crmsync.sync.pull import pull
from tests.test_odoo_partitions import SETUPS, Spy, _method, make, provider


class Timed(Spy):
    """A Spy that also keeps each request's (method or path, start, end)."""

    def __init__(self, spy: Spy) -> None:
        super().__init__(spy.emu, spy.hold)
        self.spans: list[tuple[str, float, float]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        start = time.monotonic()
        try:
            return super().handle(request)
        finally:
            name = request.url.path if request.url.path == "/web/version" else _name(request)
            with self.lock:
                self.spans.append((name, start, time.monotonic()))


def _name(request: httpx.Request) -> str:
    method = _method(request)
    if method is None and b'"version"' in (request.content or b""):
        return "version"
    return str(method)


def timed(home: Path, n: int, **kw: Any) -> tuple[Any, Any, Timed]:
    # A real round trip's length: the three walks begin within it, whatever the threads' jitter.
    emu, app, spy = make(home, n, hold=0.15, **kw)
    t = Timed(spy)
    app.transport = lambda _name: httpx.MockTransport(t.handle)
    app._providers.clear()  # a fresh provider: nothing of the connect's reads cached
    return emu, app, t


def test_turns_go_to_the_range_with_most_pages_left_and_never_beyond_k() -> None:
    turns = Turns(1)
    order: list[float] = []
    inside = [0, 0]  # now, most at once
    lock = threading.Lock()

    def reader(left: float) -> None:
        with turns.turn(left):
            with lock:
                order.append(left)
                inside[0] += 1
                inside[1] = max(inside[1], inside[0])
            time.sleep(0.01)
            with lock:
                inside[0] -= 1

    with turns.turn(100):  # every reader queues behind this one
        threads = [threading.Thread(target=reader, args=(left,)) for left in (1.0, 5.0, 3.0, 4.0)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while len(turns._queue) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join(5)
    assert order == [5.0, 4.0, 3.0, 1.0] and inside[1] == 1

    two = Turns(2)
    inside[:] = [0, 0]
    threads = [threading.Thread(target=lambda: _hold(two, inside, lock)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert inside[1] == 2


def _hold(turns: Turns, inside: list[int], lock: threading.Lock) -> None:
    with turns.turn(1.0):
        with lock:
            inside[0] += 1
            inside[1] = max(inside[1], inside[0])
        time.sleep(0.02)
        with lock:
            inside[0] -= 1


@pytest.mark.parametrize(("transport", "version"), SETUPS, ids=[t for t, _ in SETUPS])
def test_a_pull_reads_each_models_fields_once_and_the_clock_once_beside_them(
    home: Path, transport: str, version: int
) -> None:
    _emu, app, spy = timed(home, 30, transport=transport, version=version, concurrency=4)
    result = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert result.outcome == "ok"
    names = [name for name, _, _ in spy.spans]
    assert names.count("fields_get") == 2  # res.partner (contacts and companies) and crm.lead, once each
    clock = [(a, b) for name, a, b in spy.spans if name in ("/web/version", "version")]
    assert len(clock) == 1  # three walks, one clock read
    fields = [(a, b) for name, a, b in spy.spans if name == "fields_get"]
    assert clock[0][0] < min(b for _, b in fields)  # in flight before the fields' answers were in
    app.close()


@pytest.mark.parametrize(("transport", "version"), SETUPS, ids=[t for t, _ in SETUPS])
def test_looking_for_lost_calls_searches_side_by_side_and_the_chatter_only_where_done_calls_are_deleted(
    home: Path, transport: str, version: int
) -> None:
    _emu, app, spy = make(home, 0, transport=transport, version=version, concurrency=4, hold=0.05)
    p = provider(app)
    spy.calls.clear()
    spy.peak = 0
    markers = [f"lost-{i}" for i in range(250)]  # three searches of notes (100 markers each)
    assert p.find_activities("calls", markers) == {}
    searched = [m for m, b in spy.calls if m == "search_read"]
    assert len(searched) >= 3 and spy.peak >= 3  # the searches were in flight together
    chatter = any("body" in str(b.get("domain")) for m, b in spy.calls if m == "search_read")
    # 19 keeps a done activity (archived): no message search; up to 18 only its message is left.
    assert chatter == (version < 19)
    app.close()
