"""Push's tuning knobs, passed down from ``push`` (tests and benchmarks pass their own)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True, slots=True)
class PushSettings:
    """How much push does at once; the defaults are what the command uses."""

    #: Outcomes per delivery round: lanes overlap lookups with other outcomes' writes only within a
    #: round, so a round holds enough to fill a rate window from its first second.
    round_size: int = 10_000
    #: Outcomes per round when workers share one store (PostgreSQL): smaller leases let each take a share.
    shared_round_size: int = 500
    #: Outcomes read, validated and queued per part of the input.
    enqueue_chunk: int = 500
    #: Outcomes per lane, at most: the first lanes' writes start after a fraction of a round's lookups.
    lane_size: int = 1000
    #: Lookups sent ahead while the input is queued (``Prefetch``) in flight at once, at most.
    prefetch_in_flight: int = 5
    #: Look-ups and re-sends a step makes, within one run, for writes whose answers were lost.
    confirm_rounds: int = 4
    #: A claim older than this (never renewed: its worker died) is taken over.
    lease: timedelta = timedelta(minutes=10)
    #: Attempts after which an outcome that keeps failing temporarily is failed for good.
    max_attempts: int = 5


DEFAULT = PushSettings()
