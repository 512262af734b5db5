"""``push``: validate, queue and deliver outcomes in one run (or plan them, with ``dry_run``).

The run's lifecycle (lock, run log, errors, metrics) is the shared ``crmsync.sync.run``; what the
run does, and how it is judged, is ``_PushRun``. The summary ends in an ``Outcome``, never an exit
code: the CLI decides those.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from crmsync.errors import AuthError, InputError, RetriableError, UsageError
from crmsync.model import utcnow
from crmsync.providers import usage
from crmsync.store.outbox import Outbox
from crmsync.sync.inputs import read_outcomes
from crmsync.sync.push.dry_run import dry_run as plan_dry_run
from crmsync.sync.push.intake import Hooks, enqueue, spooled, validate_all
from crmsync.sync.push.items import ParsedOutcome
from crmsync.sync.push.lookahead import Prefetch, Warmup, count_from_answers
from crmsync.sync.push.owners import Owners
from crmsync.sync.push.receipts import PushSummary, ReceiptSink, Tally
from crmsync.sync.push.rounds import deliver
from crmsync.sync.push.settings import DEFAULT, PushSettings
from crmsync.sync.run import Outcome, Run, run

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.store import CrmConnection

#: Invalid records listed in a --strict refusal; the rest are counted.
STRICT_SHOWN = 20


def push(
    app: App,
    *,
    source: str | None,
    connection: str | None = None,
    fmt: str = "auto",
    delimiter: str | None = None,
    strict: bool = False,
    rejects: Path | None = None,
    dry_run: bool = False,
    update: bool = False,
    retry_failed: bool = False,
    lock_timeout: float | None = None,
    sink: ReceiptSink | None = None,
    progress: Callable[[int, int], None] | None = None,
    strict_owners: bool = False,
    settings: PushSettings = DEFAULT,
) -> PushSummary:
    """Validate, queue and deliver outcomes; ``source`` None delivers what is already queued.

    ``connection`` is the connection's name (None: the only one). ``strict_owners``: an
    ``owner_email`` the CRM has no user for fails its outcome (see ``Owners``). The summary
    ends in an ``Outcome`` (and the error that stopped the run, if one did): the CLI turns it
    into the exit code.
    """
    conn = app.connection(connection)
    summary = PushSummary(connection=conn.name, provider=conn.provider, dry_run=dry_run)
    started = time.monotonic()
    mapping = app.mapping(conn)
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    path = source
    try:
        if source is not None and strict:
            path, cleanup = spooled(source)
            _refuse_invalid(path, fmt, delimiter)
        if dry_run:
            if path is None:
                raise UsageError("--dry-run needs an input file (or - for stdin)")
            try:
                plan_dry_run(
                    app,
                    conn,
                    mapping,
                    read_outcomes(path, fmt, delimiter=delimiter),
                    summary,
                    sink=Tally(summary, sink),
                    rejects=rejects,
                    update=update,
                    retry_failed=retry_failed,
                    settings=settings,
                )
            finally:
                app.metrics.sync_seconds.labels(conn.provider, conn.name, "push").observe(time.monotonic() - started)
            if summary.has_failures():
                summary.outcome = Outcome.PARTIAL
        else:
            work = _PushRun(
                app,
                conn,
                mapping,
                summary,
                path=path,
                fmt=fmt,
                delimiter=delimiter,
                rejects=rejects,
                update=update,
                retry_failed=retry_failed,
                sink=sink,
                progress=progress,
                strict_owners=strict_owners,
                settings=settings,
            )
            # SQLite: one push per connection (the run lock). PostgreSQL: none; runs claim outbox rows.
            r = run(
                app,
                conn,
                "push",
                work.run,
                lock_timeout=lock_timeout,
                lock=contextlib.nullcontext() if work.outbox.shared else None,
                mapping=mapping,
                provider=False,
                stops=(RetriableError, AuthError),
                # Ctrl-C: every step taken is committed and the claims are handed back (deliver),
                # so the run ends as interrupted and a re-run delivers the rest once.
                record_interrupt=True,
                settle=work.settle,
            )
            summary.outcome, summary.failure = r.outcome, r.failure
    finally:
        cleanup()
        summary.duration = time.monotonic() - started
    return summary


def _refuse_invalid(path: str, fmt: str, delimiter: str | None) -> None:
    """--strict: every error of the input, and nothing queued, if any record is invalid."""
    n, errors = validate_all(path, fmt, delimiter)
    if errors:
        shown = "\n  ".join(str(e) for e in errors[:STRICT_SHOWN])
        more = f"\n  … and {len(errors) - STRICT_SHOWN} more" if len(errors) > STRICT_SHOWN else ""
        raise InputError(f"{len(errors)} of {n} records are invalid; nothing was queued (--strict):\n  {shown}{more}")


def _judge(r: Run, summary: PushSummary) -> None:
    """How a push that was not stopped ended: partial when outcomes failed, else retry-later when
    some stay queued after temporary errors (5xx/429 per item), which a later run delivers."""
    if summary.has_failures():
        r.mark(Outcome.PARTIAL)
    still_queued = summary.requeued + summary.backlog.get("queued", 0)
    if still_queued:
        r.mark(Outcome.RETRY_LATER)
    if r.outcome is Outcome.RETRY_LATER:
        summary.error = (
            summary.error or f"{still_queued} outcome(s) still queued after temporary errors; run push again"
        )


def _records(summary: PushSummary) -> dict[str, dict[str, int]]:
    """What the run did to calls for the metrics, the backlog's outcomes included."""
    return {
        "calls": {
            "created": summary.created + summary.backlog.get("created", 0),
            "updated": summary.updated + summary.backlog.get("updated", 0),
            "failed": summary.failed + summary.backlog.get("failed", 0),
            "rejected": summary.rejected,
        }
    }


class _PushRun:
    """What one push run does inside its lifecycle: queue the input (if any), then deliver."""

    def __init__(
        self,
        app: App,
        conn: CrmConnection,
        mapping: Mapping,
        summary: PushSummary,
        *,
        path: str | None,
        fmt: str,
        delimiter: str | None,
        rejects: Path | None,
        update: bool,
        retry_failed: bool,
        sink: ReceiptSink | None,
        progress: Callable[[int, int], None] | None,
        strict_owners: bool,
        settings: PushSettings,
    ) -> None:
        self.app, self.conn, self.mapping, self.summary = app, conn, mapping, summary
        self.path, self.fmt, self.delimiter, self.rejects = path, fmt, delimiter, rejects
        self.update, self.retry_failed, self.sink, self.progress = update, retry_failed, sink, progress
        self.strict_owners, self.settings = strict_owners, settings
        self.outbox = Outbox(app.store)
        self.tally = Tally(summary, sink)
        self.queued = path is None  # this input's outcomes are in the outbox (enqueue committed)
        self.warm: Warmup | None = None
        self.ahead: Prefetch | None = None
        #: The owners, their default asked for as soon as an outcome is queued (see ``_on_objects``).
        self.owners: Future[Owners] | None = None
        self.restore: Callable[[], None] = lambda: None  # the provider's rate windows as they were

    def run(self, r: Run) -> None:
        """The run's body, under its lock: queue the input (if any), then deliver what is queued."""
        self._start()
        self._deliver(r)

    def _start(self) -> None:
        """What was queued before the input is a backlog; look-ahead starts."""
        app, conn = self.app, self.conn
        if self.path is None:
            return
        earlier = ("pending", "failed") if self.retry_failed else ("pending",)
        self.tally = Tally(self.summary, self.sink, self.outbox.queued_ids(conn.name, earlier))
        self.warm = Warmup(app, conn)
        # Not with workers sharing the outbox (the rows queued may be another's to deliver)
        # nor with one store connection (an in-memory store: the lookups run in line).
        if app.store.concurrent_writers and not self.outbox.shared:
            self.ahead = Prefetch(app, conn, self.mapping, self.warm.provider_future, settings=self.settings)

    def _deliver(self, r: Run) -> None:
        app, conn, summary = self.app, self.conn, self.summary
        parsed: dict[str, ParsedOutcome] = {}
        if self.path is not None:
            self._enqueue(self.path, parsed)
        if self.retry_failed:
            self.outbox.reset_failed(conn.name)
        # The warm-up built the provider ahead of the run: its requests count from then.
        provider = r.use(self.warm.provider(), before=self.warm.before) if self.warm else r.use(app.provider(conn))
        self.restore = count_from_answers(provider)
        spent = usage.latest(app.store.runs.recent(conn.name, limit=200), utcnow()) or {}
        provider.check_budget(
            _needs(self.outbox.count_pending(conn.name), parsed), spent_today=int(spent.get("used_today") or 0)
        )
        deliver(
            app,
            conn,
            provider,
            self.mapping,
            summary,
            sink=self.tally,
            progress=self.progress,
            parsed=parsed,
            prepared=self.warm.gates if self.warm else None,
            prefetched=self.ahead.found if self.ahead else None,
            owners=self.owners.result() if self.owners is not None else Owners(provider, strict=self.strict_owners),
            settings=self.settings,
        )

    def _enqueue(self, path: str, parsed: dict[str, ParsedOutcome]) -> None:
        hooks = Hooks(
            parsed_out=parsed,
            on_objects=self._on_objects if self.warm else None,
            on_queued=self.ahead.add if self.ahead else None,
            on_ids=self.tally.in_input,
        )
        reject_handle: TextIO | None = open(self.rejects, "w", encoding="utf-8") if self.rejects else None  # noqa: SIM115
        try:
            enqueue(
                self.app,
                self.conn.name,
                read_outcomes(path, self.fmt, delimiter=self.delimiter),
                self.summary,
                update=self.update,
                rejects=reject_handle,
                sink=self.tally,
                hooks=hooks,
                retry_failed=self.retry_failed,
                settings=self.settings,
            )
        finally:
            if reject_handle:
                reject_handle.close()
        self.queued = True
        if self.ahead is not None:
            self.ahead.flush()
        if self.summary.read == 0:
            raise InputError(f"{'<stdin>' if path == '-' else path}: no outcomes found (empty input)")

    def _on_objects(self, objects: set[str]) -> None:
        """Outcomes of these types are queued: prepare the CRM for them, and ask for the connection's
        own user (the default owner of calls and tasks), whose round trips would otherwise come
        between the last outcome queued and the first write."""
        assert self.warm is not None
        self.warm.prepare(objects)
        if self.owners is None:
            warm, strict = self.warm, self.strict_owners

            def owners() -> Owners:
                made = Owners(warm.provider(), strict=strict)
                made.start()
                return made

            self.owners = warm.pool.submit(owners)

    def settle(self, r: Run) -> None:
        """After the run, however it ended: counts settled, look-ahead stopped, the outcome judged,
        what the run log and the metrics keep."""
        summary, conn = self.summary, self.conn
        self.tally.split_backlog()
        summary.interrupted = r.outcome is Outcome.INTERRUPTED
        if r.failure is not None:
            summary.error = str(r.failure)
        if summary.interrupted or r.failure is not None:
            if summary.interrupted and not self.queued:
                summary.queued = 0  # enqueue's one transaction was rolled back
            with contextlib.suppress(Exception):  # what a re-run will deliver (deliver stopped short)
                summary.pending = self.outbox.count_pending(conn.name)
        if summary.interrupted:
            summary.error = _interrupted(summary, queued=self.queued)
        if self.ahead is not None:
            self.ahead.close()
        if self.warm is not None:
            self.warm.close()
        self.restore()
        stats = r.request_stats()
        summary.requests = stats.get("requests", 0)
        summary.retries = stats.get("retries", 0)
        summary.rate_limited = stats.get("rate_limited", 0)
        _judge(r, summary)
        r.counts = _counts(summary) | usage.recorded(r.provider)
        r.records = _records(summary)
        states = self.outbox.state_counts(conn.name)
        for state in ("pending", "done", "failed", "conflict"):
            self.app.metrics.outbox.labels(conn.name, state).set(states.get(state, 0))


def _interrupted(s: PushSummary, *, queued: bool) -> str:
    """What an interrupted push did, and what is left for the re-run."""
    if not queued:
        return "interrupted while reading the input: nothing was queued or sent; run the push again"
    closed = ("created", "updated", "already")  # already: found logged in the CRM, so done
    delivered = s.created + s.updated + sum(s.backlog.get(k, 0) for k in closed)
    return f"interrupted: {delivered} outcome(s) delivered, {s.pending} still queued; re-run to resume"


def _needs(pending: int, parsed: dict[str, ParsedOutcome]) -> dict[str, int]:
    """What the queued outcomes may write, per object type (for ``Provider.check_budget``).

    Outcomes read in this run are counted by what they carry; a backlog from earlier runs counts
    as calls with every other object too (the upper bound).
    """
    needs = {"calls": pending}
    for _, canon in parsed.values():
        for obj in canon:
            if obj != "calls":
                needs[obj] = needs.get(obj, 0) + 1
    backlog = max(0, pending - len(parsed))
    for obj in ("contacts", "companies", "deals", "tasks"):
        needs[obj] = needs.get(obj, 0) + backlog
    return needs


def _counts(s: PushSummary) -> dict[str, Any]:
    """The run log's counts of a push."""
    names = (
        "read",
        "valid",
        "rejected",
        "queued",
        "already",
        "conflicts",
        "created",
        "updated",
        "failed",
        "pending",
        "field_conflicts",
        "owners_defaulted",
    )
    counts: dict[str, Any] = {k: getattr(s, k) for k in names}
    if s.backlog:
        counts["backlog"] = dict(s.backlog)
    return counts
