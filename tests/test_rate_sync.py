"""The rate window learns the CRM's own count: requests this process never sent (a killed run's, another
process's on the same account) hold the next ones back instead of drawing 429s (issue #31).

Unit tests of ``SlidingWindow.learn``/``probe``; the HubSpot emulator in process with its rolling limit
(100 requests, over a tenth of HubSpot's interval so the tests need not wait ten seconds); and one CLI
backfill SIGKILLed and re-run at once against the emulator on loopback, at HubSpot's own 100 per 10 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.app import App
from crmsync.emulators.base import Faults
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.http import RateLimit, SlidingWindow
from crmsync.model import utcnow
from crmsync.providers.hubspot import HubSpotPolicy
from crmsync.providers.hubspot.provider import HubSpotProvider
from crmsync.store.tables import CrmSyncLog
from crmsync.sync.run import Run, run
from tests.e2e import cli_env, hubspot_app, run_cli, write_config

LIST = "/crm/v3/objects/contacts"


def _taken_elsewhere(window: SlidingWindow, n: int) -> None:
    """``n`` turns taken by other threads and still in flight (their answers not in yet)."""
    for _ in range(n):
        t = threading.Thread(target=window.acquire)
        t.start()
        t.join()


# -- the window ------------------------------------------------------------------------------------
def test_a_count_above_ours_holds_the_next_requests_back() -> None:
    window = SlidingWindow(100, 10.0)
    for _ in range(5):
        window.acquire()
        window.settle()
    window.learn(65)  # the CRM counted our 5 and 30 more
    assert window.foreign_turns == 30 and window.free() == 65
    assert all(window.try_acquire() for _ in range(65))
    assert window.try_acquire() is False  # the 66th would be the CRM's 101st


def test_our_requests_sent_after_the_answered_one_are_not_taken_for_someone_elses() -> None:
    window = SlidingWindow(100, 10.0)
    window.acquire()  # the request whose answer comes in
    _taken_elsewhere(window, 3)  # sent after it, still in flight: the CRM had not counted them
    window.settle()
    window.learn(99)  # the CRM counted this one only
    assert not window.foreign_turns and window.free() == 96
    window.learn(89)  # ... and ten of someone else's
    assert window.foreign_turns == 10 and window.free() == 86
    window.learn(89)  # told again: the same ten, not ten more
    assert window.foreign_turns == 10
    window.learn(94)  # five of them left the CRM's window
    assert window.foreign_turns == 5 and window.free() == 91


def test_learning_never_lowers_our_own_count_and_a_429_was_not_counted() -> None:
    window = SlidingWindow(10, 10.0)
    for _ in range(5):
        window.acquire()
        window.settle()
    window.learn(10)  # the CRM counts none of them (its window began afresh): ours stand
    assert window.free() == 5 and not window.foreign_turns
    window.acquire()
    window.settle()
    window.learn(0, counted=False)  # refused and not counted: its turn will be given back
    assert window.foreign_turns == 5
    window.give_back()
    assert window.free() == 0


def test_a_crm_stating_a_limit_far_below_ours_is_learned_at_once() -> None:
    """A budget configured far above the CRM's stated limit: each answer implies a hundred thousand
    turns of someone else's, learned in one step, not one by one."""
    window = SlidingWindow(100_000, 10.0)
    window.acquire()
    window.settle()
    t0 = time.perf_counter()
    for _ in range(100):
        window.learn(0)
    assert time.perf_counter() - t0 < 0.1
    assert window.foreign_turns == 99_999 and window.try_acquire() is False


def test_an_answer_without_the_headers_changes_nothing() -> None:
    window = RateLimit(100, 10.0).bucket()
    client = type("Client", (), {"buckets": {"default": window, "search": RateLimit(5, 1.0).bucket()}})()
    window.acquire()
    window.settle()
    HubSpotPolicy().observe(httpx.Response(200), client, "default")
    HubSpotPolicy().observe(httpx.Response(200), client, "search")  # search answers state no count
    HubSpotPolicy().observe(httpx.Response(200, headers={"X-HubSpot-RateLimit-Remaining": "x"}), client, "default")
    assert window.free() == 99 and not window.foreign_turns
    HubSpotPolicy().observe(httpx.Response(200, headers={"X-HubSpot-RateLimit-Remaining": "9"}), client, "default")
    assert window.foreign_turns == 90


def test_a_probe_goes_alone_and_the_rest_once_its_answer_is_learned() -> None:
    window = SlidingWindow(100, 10.0)
    window.probe()
    assert window.try_acquire() is True
    assert window.try_acquire() is False  # held back while the probe is out
    window.give_back()  # the probe found no free slot: the next request is the probe
    assert window.try_acquire() is True and window.try_acquire() is False
    window.settle()
    window.learn(50)
    window.answered()
    assert window.free() == 50 and window.try_acquire() is True
    window.probe()  # once per client: the next request goes alone again only if asked again
    assert window.try_acquire() is True and window.try_acquire() is False


def test_a_probe_that_gets_no_answer_holds_the_rest_back_one_window_at_most() -> None:
    window = SlidingWindow(10, 0.05)
    window.probe()
    assert window.try_acquire() is True and window.try_acquire() is False
    time.sleep(0.06)
    assert window.try_acquire() is True and window.try_acquire() is True


# -- the HubSpot emulator in process ---------------------------------------------------------------
SCALED = 1.0  # seconds: the emulator's and crmsync's windows, HubSpot's 100 requests over a tenth of 10 s


@pytest.fixture
def emulator() -> HubSpotEmulator:
    emu = HubSpotEmulator(seed=5)
    emu.bulk_create("contacts", 10, modified_at=time.time() - 7200)
    return emu


@pytest.fixture
def scaled(monkeypatch: pytest.MonkeyPatch, emulator: HubSpotEmulator, home: Path) -> None:
    limits = {"default": RateLimit(100, SCALED), "search": RateLimit(50, 1.0, from_answers=False)}
    monkeypatch.setattr(HubSpotProvider, "default_rate_limits", limits)
    # Answers 20 ms after the request: 16 requests in flight at once, before the first answer.
    emulator.faults = Faults(latency_ms=20, rate_limits={"default": (100, SCALED), "search": (50, 1.0)})
    write_config(home, "hs", concurrency=16)


def _transport(emulator: HubSpotEmulator) -> Any:
    return lambda _name: httpx.MockTransport(emulator)


@pytest.fixture
def first(emulator: HubSpotEmulator, scaled: None) -> Iterator[App]:
    app = hubspot_app("http://hubspot.test", emulator.private_app_token, transport=_transport(emulator))
    yield app
    app.close()


def _burst(app: App, n: int, threads: int = 20) -> None:
    """A run that sends ``n`` requests on the ten-secondly limit as fast as ``threads`` threads can."""

    def body(r: Run) -> None:
        assert r.provider is not None
        http = r.provider.http
        left = iter(range(n))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                http.get(LIST, params={"limit": 1})

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    run(app, app.connection("hs"), "pull", body)


def test_a_fresh_process_right_after_another_draws_no_429(emulator: HubSpotEmulator, first: App) -> None:
    _burst(first, 90)
    emulator.stats.rate_limited = 0
    second = App(transport=_transport(emulator))  # as a new process: its own client, an empty window
    try:
        t0 = time.monotonic()
        _burst(second, 40)
        assert emulator.stats.rate_limited == 0
        assert time.monotonic() - t0 > 0.5 * SCALED  # it waited for the first one's turns to leave
        window = second.provider(second.connection("hs")).http.buckets["default"]
        assert isinstance(window, SlidingWindow)
        assert window._probe is None  # the probe went, and the rest after its answer
    finally:
        second.close()


def test_without_the_probe_a_fresh_burst_would_draw_429s(emulator: HubSpotEmulator, first: App) -> None:
    """What the probe saves: the same burst from a client that believes the window empty."""
    _burst(first, 90)
    emulator.stats.rate_limited = 0
    second = App(transport=_transport(emulator))
    try:
        http = second.provider(second.connection("hs")).http
        http.max_attempts = 1

        def one() -> None:
            try:
                http.get(LIST, params={"limit": 1})
            except Exception:
                pass

        pool = [threading.Thread(target=one) for _ in range(16)]  # all in flight before the first answer
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert emulator.stats.rate_limited > 0
    finally:
        second.close()


def _previous_run(app: App, *, ended_ago: float | None, requests: int = 50, status: str = "ok") -> None:
    with app.store.runs.db.session() as s:
        started = utcnow() - timedelta(seconds=(ended_ago or 0.0) + 5)
        finished = None if ended_ago is None else utcnow() - timedelta(seconds=ended_ago)
        s.add(
            CrmSyncLog(
                connection="hs",
                command="pull",
                started_at=started,
                finished_at=finished,
                status=status,
                requests=requests,
                pid=2**22 + 7,  # no such process: a killed run
            )
        )


def _first_window(app: App) -> SlidingWindow:
    """The default window of a fresh process's client as a run leaves it before its first request."""
    fresh = App(transport=app.transport, db=None)
    seen: list[SlidingWindow] = []

    def body(r: Run) -> None:
        assert r.provider is not None
        window = r.provider.http.buckets["default"]
        assert isinstance(window, SlidingWindow)
        seen.append(window)

    try:
        run(fresh, fresh.connection("hs"), "pull", body)
    finally:
        fresh.close()
    return seen[0]


def test_only_a_run_right_after_another_starts_with_a_probe(first: App) -> None:
    assert _first_window(first)._probe is None  # the connection's first run (connecting sent none as a run)
    _previous_run(first, ended_ago=600.0)
    assert _first_window(first)._probe is None  # cron, minutes apart: the first burst goes at once
    _previous_run(first, ended_ago=0.2, requests=0)
    assert _first_window(first)._probe is None  # a run that sent nothing left nothing in the window
    _previous_run(first, ended_ago=0.2)
    assert _first_window(first)._probe == "waiting"


def test_a_killed_run_makes_the_next_start_with_a_probe(first: App) -> None:
    _previous_run(first, ended_ago=None, status="running")  # its process is gone: abandoned now
    assert _first_window(first)._probe == "waiting"


# -- as the user meets it --------------------------------------------------------------------------
@pytest.mark.slow
def test_a_backfill_sigkilled_and_rerun_at_once_draws_no_429(home: Path) -> None:
    """HubSpot's own 100 per 10 s: the killed run's requests are still in the portal's window."""
    from tests.test_resilience import _run_and_kill

    emulator = HubSpotEmulator(seed=9)
    emulator.bulk_create("contacts", 12_000, modified_at=time.time() - 7200)
    emulator.faults = Faults(rate_limits={"default": (100, 10.0), "search": (5, 1.0)})
    server = emulator.serve()
    try:
        app = hubspot_app(server.url, emulator.private_app_token)
        app.close()
        # Two searches a second of the portal's five: a killed run's last second of them and the
        # re-run's first cannot overrun it (search answers state no count to learn from).
        write_config(home, "hs", search_rate_limit=2)
        env = cli_env(home, "hs", emulator.private_app_token)
        args = ["--quiet", "backfill", "-c", "hs", "--object", "contacts"]
        emulator._windows.clear()
        assert _run_and_kill(args, env, emulator, after_requests=70, then=0.1) is None
        emulator.stats.rate_limited = 0
        rerun = run_cli(["--json", *args[1:]], env)
        assert rerun.code == 0, rerun.stderr
        assert emulator.stats.rate_limited == 0
        check = App(env={"CRMSYNC_HOME": str(home)})
        last = check.store.runs.last("hs", "backfill")
        assert last is not None and last.rate_limited == 0 and last.requests > 0
        check.close()
    finally:
        server.stop()
