"""Rate limits: the sliding windows CRMs count by, token buckets, slots in flight, and deferred turns.

A limit is stated as a ``RateLimit`` ("N per window"); a process paces its requests with the
``SlidingWindow`` it makes, and workers sharing a CRM account with a Redis ``TokenBucket``
(``crmsync.scaleout``). ``deferring()`` lets requests that nothing waits on yield their turn.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RateLimit:
    """At most ``requests`` in any ``per_seconds`` window (a rolling window, as CRMs count).

    ``from_answers``: a request's turn leaves the window ``per_seconds`` after its answer (exact:
    never a 429 from our own traffic, at the cost of one round trip per window, a tenth of a
    one-second window at 100 ms); False: ``per_seconds`` plus a margin after it was sent (for a
    budget set below the CRM's own limit, where the margin cannot be overrun).
    """

    requests: int
    per_seconds: float
    from_answers: bool = True

    def bucket(self) -> SlidingWindow:
        """The limiter one process uses: the CRM's own rule, counted the way the CRM counts it."""
        return SlidingWindow(self.requests, self.per_seconds, from_answers=self.from_answers)

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
#: How often a request held back by a probe looks again whether the probe's answer is in.
PROBE_POLL = 0.002
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


@dataclass(slots=True)
class _Learned:
    """Turns learned from one answer of the CRM's: how many, and when they leave the window."""

    end: float
    turns: int


class SlidingWindow:
    """At most ``requests`` requests in any window of ``per_seconds``, as the CRM counts them (thread-safe).

    This is how CRMs state and count their limits ("100 per rolling 10 s", "5 per second"), so a
    client pacing by it can spend a window's whole allowance at once and is never early for the
    next one, where a token bucket's trickle leaves part of every window unused.

    A request counts from the moment its turn is taken (it is about to be sent) until ``per_seconds``
    after the CRM counted it. The CRM counts a request when it arrives, which is after it was sent
    and before its answer came back: so once the answer is in (``settle``), its turn leaves the
    window ``per_seconds`` after the answer (plus ``SETTLED``), which can never be early whatever
    the transit times. A turn not settled (its answer not in yet, or a caller that does not settle)
    leaves ``window`` after it was taken: ``per_seconds`` stretched by a margin for the spread of
    transit times (JITTER, plus SEND per turn of a window, since a burst's last request leaves that
    much after its turn). ``pause`` holds every caller back (after a 429).

    The CRM's own count may hold requests this process never sent (a killed run's, another
    process's on the same account): ``learn`` takes what an answer says is left and counts the
    difference as turns of someone else's; ``probe`` makes a fresh window let one request go first
    and the rest only once its answer has told that count.
    """

    #: Seconds added to an unsettled turn's window for the spread of network transit times (and
    #: again after each 429 it did not cover, see ``overrun``)...
    JITTER = 0.035
    #: ...and per turn of the window, for a burst's requests leaving one after another.
    SEND = 0.0006
    #: Seconds added to a settled turn's window: only for clocks that tick at slightly different rates.
    SETTLED = 0.005

    def __init__(self, requests: int, per_seconds: float, *, from_answers: bool = True) -> None:
        self.requests = max(1, requests)
        self.from_answers = from_answers
        self.per_seconds = per_seconds
        self.window = per_seconds + self.JITTER + self.SEND * self.requests
        self.settled_window = per_seconds + self.SETTLED
        self._overrun_at = -1e9
        #: When each counted turn leaves the window (sorted).
        self.ends: deque[float] = deque()
        self.not_before = 0.0
        self.lock = threading.Lock()
        self._mine = threading.local()  # each thread's last turn (its end, when taken, settled?)
        self.waiting = 0  # callers not deferring (see ``deferring``) that found no turn free
        self.reserved = 0  # turns deferring callers leave free for requests about to be sent (``reserve``)
        #: Turns learned from the CRM's count (someone else's), one batch per answer that added some,
        #: soonest to leave first; ``foreign_turns`` in all (a CRM stating a limit far below the
        #: configured one may imply thousands at once).
        self.foreign: deque[_Learned] = deque()
        self.foreign_turns = 0
        self._seq = 0  # turns taken so far: tells which of ours were sent after an answered one
        self._flying: set[int] = set()  # the turns taken whose answer is not in yet
        #: ``probe``: "waiting" while the first request's answer is awaited, "sent" once it is out.
        self._probe: str | None = None
        self._probe_seq = 0
        self._probe_at = 0.0

    def reserve(self, turns: int) -> None:
        """Keep ``turns`` more (fewer, if negative) free of deferring requests: requests that others
        depend on will ask for them as soon as the answers they wait for are in (a push's next step),
        and a leaf that took them meanwhile would push that chain into the next window."""
        with self.lock:
            self.reserved = max(0, self.reserved + turns)

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
            self._expire(now)
            if self._probe == "sent":
                if now - self._probe_at < self.per_seconds:
                    return PROBE_POLL  # the first request's answer will tell how full the CRM's window is
                self._probe = None  # no answer within a window: our own count alone, as without a probe
            held = len(self.ends) + self.foreign_turns
            yielding = low and (self.waiting > 0 or held + self.reserved >= self.requests)
            if not yielding and now >= self.not_before and held < self.requests:
                end = now + self.window
                bisect.insort(self.ends, end)
                self._flying.discard(getattr(self._mine, "seq", -1))  # this thread's earlier turn, never settled
                self._mine.flying = len(self._flying)  # sent before it, not answered yet: maybe not counted before it
                self._seq += 1
                self._flying.add(self._seq)
                self._mine.stamp, self._mine.taken, self._mine.settled, self._mine.seq = end, now, False, self._seq
                if self._probe == "waiting":
                    self._probe, self._probe_seq, self._probe_at = "sent", self._seq, now
                return 0.0
            wait = self.not_before - now
            if held >= self.requests:
                first = min(self.ends[0] if self.ends else math.inf, self.foreign[0].end if self.foreign else math.inf)
                wait = max(wait, first - now)
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
        the margins), so the margins grow by JITTER for the rest of the run, the rejected request's
        turn is given back (the CRM did not count it), and callers wait twice JITTER for the request
        the CRM still counts to leave its window. A flat second's pause cost a second each time. A
        429 for a request sent after that, within two windows, means more than jitter (another
        client on the same limit): then the flat second, as before. Requests already in flight
        count as the same 429.
        """
        taken = getattr(self._mine, "taken", None) if getattr(self._mine, "stamp", None) is not None else None
        self.give_back()  # the CRM did not count the rejected request: nor do we
        with self.lock:
            now = time.monotonic()
            if taken is not None and taken <= self._overrun_at:
                pass  # sent before the last 429 widened the margin: the same event, not a new one
            elif now - self._overrun_at < 2 * self.window:
                self._overrun_at = now
                self.not_before = max(self.not_before, now + 1.0)
                return 1.0
            else:
                self._overrun_at = now
                self.window = min(self.window + self.JITTER, self.per_seconds + self.MAX_MARGIN)
                self.settled_window = min(self.settled_window + self.JITTER, self.per_seconds + self.MAX_MARGIN)
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
            self._expire(now)
            return self.requests - len(self.ends) - self.foreign_turns

    def give_back(self) -> None:
        """Return the calling thread's last turn, not used after all."""
        end = getattr(self._mine, "stamp", None)
        self._mine.stamp = None
        with self.lock:
            if end is not None:
                with contextlib.suppress(ValueError):
                    self.ends.remove(end)
                seq = getattr(self._mine, "seq", -1)
                self._flying.discard(seq)
                if self._probe == "sent" and seq == self._probe_seq:
                    self._probe = "waiting"  # the probe was not sent after all: the next turn is

    def departed(self) -> None:
        """The calling thread's last request is being written to the socket now: an unsettled turn
        counts from now rather than from when it was taken (only ever later). The time between the
        two (a free connection, the GIL under load) is then no part of the spread JITTER covers."""
        end = getattr(self._mine, "stamp", None)
        if end is None or getattr(self._mine, "settled", True):
            return
        with self.lock:
            moved = time.monotonic() + self.window
            if moved <= end:
                return
            try:
                self.ends.remove(end)
            except ValueError:
                return  # given back meanwhile (a 429)
            bisect.insort(self.ends, moved)
            self._mine.stamp = moved

    def settle(self) -> None:
        """The answer to the calling thread's last request is in: its turn leaves the window
        ``per_seconds`` (and ``SETTLED``) from now. The CRM counted the request before answering it,
        so a window counted from the answers never runs ahead of the CRM's, whatever the transit
        times. Once per request: a second call does nothing. A turn that left the window while its
        request was still in flight (an answer slower than the window) is counted again from now."""
        end = getattr(self._mine, "stamp", None)
        if end is None or getattr(self._mine, "settled", True):
            return
        with self.lock:
            self._flying.discard(getattr(self._mine, "seq", -1))
            if not self.from_answers:
                return
            now = time.monotonic()
            with contextlib.suppress(ValueError):
                self.ends.remove(end)
            settled = now + self.settled_window
            bisect.insort(self.ends, settled)
            self._mine.stamp, self._mine.settled = settled, True

    def learn(self, remaining: int, *, counted: bool = True) -> None:
        """The CRM says ``remaining`` more requests fit in its window, as it counted when it took the
        calling thread's last request (``counted``: False for a 429, which it did not count).

        Where that is fewer than this window's free turns, the difference is someone else's (a
        killed run's, another process's): counted as turns ending one interval from now, since when
        they were made is unknown. Our requests still in flight that were sent after the answered
        one will take some of what the CRM has left, so they are not taken for someone else's. Each
        answer states the whole count again, so the turns learned before fall with it, but only as
        far as a count that took in none of our requests that may have arrived after the answered
        one allows, and never our own: our own count is the safe one.
        """
        with self.lock:
            now = time.monotonic()
            self._expire(now)
            mine = getattr(self._mine, "seq", None)
            later = sum(1 for seq in self._flying if mine is None or seq > mine)
            free = self.requests - len(self.ends) - self.foreign_turns
            if not counted and getattr(self._mine, "stamp", None) is not None:
                free += 1  # its turn, still held here, is about to be given back
            more = min(free, free - remaining + later)
            if more > 0:
                self.foreign.append(_Learned(now + self.settled_window, more))
                self.foreign_turns += more
                return
            # Ours that may have reached the CRM after it counted: in flight when this one was sent,
            # or sent after it (answered since or not).
            unsure = getattr(self._mine, "flying", 0) + self._seq - (mine or 0)
            fewer = min(remaining - free - unsure, self.foreign_turns)
            while fewer > 0:  # the soonest to leave go first
                batch = self.foreign[0]
                gone = min(fewer, batch.turns)
                batch.turns -= gone
                self.foreign_turns -= gone
                fewer -= gone
                if not batch.turns:
                    self.foreign.popleft()

    def _expire(self, now: float) -> None:
        """Drop the turns that have left the window (the lock held)."""
        while self.ends and self.ends[0] <= now:
            self.ends.popleft()
        while self.foreign and self.foreign[0].end <= now:
            self.foreign_turns -= self.foreign.popleft().turns

    def probe(self) -> None:
        """Let the next request go alone and the rest only once its answer is in (``answered``): its
        answer tells how much of the CRM's window others' requests hold (``learn``)."""
        with self.lock:
            if self._probe is None:
                self._probe = "waiting"

    def answered(self) -> None:
        """The calling thread's request got its answer (or none will come) and what it told is
        learned: if it was the probe, the other requests may go."""
        if self._probe is None:
            return  # every answer but a probe's: no lock taken
        with self.lock:
            if self._probe == "sent" and getattr(self._mine, "seq", None) == self._probe_seq:
                self._probe = None

    def occupy(self, turns: int) -> None:
        """Count ``turns`` more as taken now: the CRM says its window holds requests this one never
        sent (an earlier process, another client on the same limit)."""
        with self.lock:
            end = time.monotonic() + self.window
            for _ in range(min(max(0, turns), self.requests)):
                bisect.insort(self.ends, end)


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
