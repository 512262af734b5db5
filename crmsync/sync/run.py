"""One run of a command on a connection: lock -> run-log row -> body -> errors -> outcome -> finish -> metrics.

Pull, backfill (and the webhook events a pull applies first) go through ``run``; push adopts it
with its own lock, its lazily built provider and a ``settle`` hook. A run ends in an ``Outcome``
(never an exit code: the CLI decides those, in ``crmsync.cli.exits``) and, when an error stopped
it, the ``CrmsyncError`` that did.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from crmsync.errors import AuthError, CrmsyncError

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.providers.base import Provider
    from crmsync.store import CrmConnection


class Outcome(StrEnum):
    """How a run ended; the values that are also run-log statuses are spelled the same."""

    OK = "ok"
    PARTIAL = "partial"  # some records failed, the rest are done
    RETRY_LATER = "retry_later"  # work stays queued after temporary errors: a later run does it
    FAILED = "failed"  # an error stopped the run: ``failure`` is that error
    INTERRUPTED = "interrupted"  # Ctrl-C: what was committed stays, a re-run resumes
    BUSY = "busy"  # another run held the connection's lock: nothing was done

    @property
    def log_status(self) -> str:
        """The run log's status for this outcome (it knows ok, partial, failed and interrupted)."""
        if self in (Outcome.OK, Outcome.PARTIAL, Outcome.INTERRUPTED):
            return self.value
        return "ok" if self is Outcome.RETRY_LATER else "failed"


@dataclass
class Run:
    """A run in progress; the body reads its provider, mapping and id, and may mark it partial or retry-later."""

    app: App
    conn: CrmConnection
    command: str
    mapping: Mapping
    run_id: int
    provider: Provider | None = None
    outcome: Outcome = Outcome.OK
    failure: CrmsyncError | None = None
    error: str | None = None
    duration: float = 0.0
    #: HTTP statistics of this run (requests, retries, rate_limited, …).
    stats: dict[str, int] = field(default_factory=dict)
    #: What the run log keeps as the run's counts; set by the body or the ``settle`` hook.
    counts: dict[str, Any] = field(default_factory=dict)
    #: Records per object for the metrics: ``{object: {"created": n, "updated": n, …}}``.
    records: dict[str, dict[str, int]] = field(default_factory=dict)
    _before: dict[str, int] = field(default_factory=dict, repr=False)

    def use(self, provider: Provider, *, before: dict[str, int] | None = None) -> Provider:
        """Count this provider's requests from now on, or since ``before`` (a snapshot of its stats
        taken when it was built ahead of the run); a body that builds its provider late calls this."""
        self.provider, self._before = provider, before if before is not None else provider.http.stats.as_dict()
        after_quiet = getattr(provider.http, "after_quiet", None)
        if after_quiet is not None:
            after_quiet(self.quiet())
        return provider

    def quiet(self) -> float | None:
        """Seconds since the connection's other runs last sent a request: 0 when one may still be
        sending (running, or just found abandoned by a killed process), None when none ever did."""
        ended = None
        for row in self.app.store.runs.recent(self.conn.name, limit=5):
            if row.id == self.run_id or (row.status != "abandoned" and row.finished_at and not row.requests):
                continue  # this run, or a run that sent nothing
            if row.finished_at is None:
                return 0.0
            when = row.finished_at if row.finished_at.tzinfo else row.finished_at.replace(tzinfo=UTC)
            ended = when if ended is None else max(ended, when)
        return None if ended is None else max(0.0, (datetime.now(UTC) - ended).total_seconds())

    def request_stats(self) -> dict[str, int]:
        """The HTTP statistics of this run so far (what ``stats`` holds once the run is finished)."""
        return self.provider.http.stats.since(self._before) if self.provider is not None else {}

    def mark(self, outcome: Outcome) -> None:
        """Mark a run that is still OK as PARTIAL or RETRY_LATER (the first mark stands)."""
        if self.outcome is Outcome.OK:
            self.outcome = outcome


def run(
    app: App,
    conn: CrmConnection,
    command: str,
    body: Callable[[Run], None],
    *,
    lock_timeout: float | None = None,
    lock: AbstractContextManager[object] | None = None,
    mapping: Mapping | None = None,
    provider: bool = True,
    stops: tuple[type[CrmsyncError], ...] = (CrmsyncError,),
    record_interrupt: bool = False,
    settle: Callable[[Run], None] | None = None,
) -> Run:
    """Run ``body`` as one logged run of ``command`` on ``conn`` and return how it ended.

    ``lock`` (default: the connection's run lock) is taken first; ``LockHeldError`` leaves before
    anything is logged. An error in ``stops`` ends the run FAILED and is returned, not raised;
    any other exception is logged as failed and raised. Ctrl-C is logged as interrupted and
    raised, or returned as INTERRUPTED with ``record_interrupt``. ``settle`` runs last, whatever
    happened, to fill ``counts``/``records`` and judge the outcome before the run is finished.
    """
    started = time.monotonic()
    with lock if lock is not None else app.run_lock(conn.name, timeout=lock_timeout):
        if mapping is None:
            mapping = app.mapping(conn)
            app.store.connections.record_mapping(conn.name, str(mapping.path) if mapping.path else None, mapping.hash)
        r = Run(app, conn, command, mapping, app.store.runs.start(conn.name, command, mapping_hash=mapping.hash))
        if provider:
            r.use(app.provider(conn))
        try:
            body(r)
        except stops as exc:
            r.outcome, r.failure, r.error = Outcome.FAILED, exc, str(exc)
            if isinstance(exc, AuthError):
                app.store.connections.touch(conn.name, ok=False, auth_state="invalid")
        except KeyboardInterrupt:
            r.outcome, r.error = Outcome.INTERRUPTED, "interrupted"
            if not record_interrupt:
                raise
        except BaseException as exc:
            r.outcome, r.error = Outcome.FAILED, str(exc) or type(exc).__name__
            raise
        finally:
            _finish(r, started, settle)
    return r


def _finish(r: Run, started: float, settle: Callable[[Run], None] | None) -> None:
    """Close the run log row and record the run's metrics, whatever the body did."""
    app, conn = r.app, r.conn
    try:
        if settle is not None:
            settle(r)
    finally:
        r.duration = time.monotonic() - started
        r.stats = r.request_stats()
        app.store.runs.finish(r.run_id, status=r.outcome.log_status, counts=r.counts, stats=r.stats, error=r.error)
        if r.outcome.log_status == "ok":
            app.store.connections.touch(conn.name, ok=True, auth_state="ok")
            app.metrics.last_success.labels(conn.name, r.command).set(time.time())
        app.metrics.sync_seconds.labels(conn.provider, conn.name, r.command).observe(r.duration)
        for obj, counts in r.records.items():
            app.metrics.count_records(conn.name, obj, counts)
