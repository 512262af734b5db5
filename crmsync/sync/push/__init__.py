"""Push: call outcomes -> validation -> outbox -> batched, resumable delivery -> receipts.

Exactly-once rests on three things:

1. the outbox is keyed by (connection, outcome id): feeding an outcome again queues nothing;
2. each outcome is a chain of steps (company -> contact -> deal -> call -> task) and each step's
   remote id is committed as soon as its batch answers, so a retry resumes at the failed step;
   contacts, companies and deals are matched or upserted by natural or unique keys, so re-sending
   them cannot duplicate;
3. the CRM, not the store, says whether a call or task was logged: each carries an idempotency
   marker; rows are marked in flight (committed) before their batch is sent, and rows still in
   flight, or (where the CRM does not keep markers unique) never sent from this store, are looked
   up by marker before anything is sent. A write whose answer was lost is not re-sent blind
   (``replay=False``, ``ItemResult.unconfirmed``): it is looked up by marker or key and sent again
   only if it is not there, within the run.

On SQLite one push per connection runs at a time (the run lock). On PostgreSQL pushes run
concurrently (workers on several hosts): each leases batches of pending rows (``SELECT … FOR
UPDATE SKIP LOCKED``, then ``claimed_by``/``claimed_at``), so no two deliver the same row. A claim
is taken over at once when its run's session has ended (a killed worker), or when its lease, renewed
after every step, is ``LEASE`` old (a hung one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, update
from sqlmodel import select

from crmsync.errors import AuthError, ExitCode, InputError, RetriableError, UsageError
from crmsync.model import CallOutcome, canonical, company_key, contact_key, utcnow
from crmsync.providers.base import ItemResult, Outgoing, OutgoingActivity, Provider, match_key
from crmsync.store import Canonical, CrmConflict, CrmOutbox, encoded, insert_rows, retry_on_conflict, update_rows
from crmsync.sync.conflicts import Conflict, resolve
from crmsync.sync.inputs import Parsed, read_outcomes

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.store import CrmConnection

log = logging.getLogger("crmsync.push")

#: An outcome as delivery needs it: when the call happened and its canonical records.
ParsedOutcome = tuple[datetime, dict[str, dict[str, Any]]]

ENTITY_STEPS = ("companies", "contacts", "deals")
ACTIVITY_STEPS = ("calls", "tasks")
#: Look-ups and re-sends a step makes, within one run, for writes whose answers were lost.
CONFIRM_ROUNDS = 4
#: Outcomes per delivery round. Lanes (``_lanes``) overlap one object's lookups with other outcomes'
#: writes only within a round, so a round holds enough to fill a rate window from its first second.
CHUNK = 10_000
#: With workers sharing one store (PostgreSQL), smaller leases let every worker take a share.
SHARED_CHUNK = 500
ENQUEUE_CHUNK = 500
#: Lookups sent ahead (``_Prefetch``) in flight at once, at most.
PREFETCH_IN_FLIGHT = 5
LEASE = timedelta(minutes=10)  # a claim older than this (never renewed: its worker died) is taken over


@dataclass
class Receipt:
    """What happened to one outcome (one JSON line with --json)."""

    id: str | None
    status: str  # created | already | updated | unchanged | queued | failed | rejected | conflict | planned
    remote_ids: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    line: int | None = None
    plan: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status, "remote_ids": self.remote_ids, "error": self.error}
        if self.line is not None:
            out["line"] = self.line
        if self.plan is not None:
            out["plan"] = self.plan
        return out


@dataclass
class PushSummary:
    connection: str
    provider: str
    read: int = 0
    valid: int = 0
    rejected: int = 0
    queued: int = 0
    already: int = 0
    conflicts: int = 0
    created: int = 0
    updated: int = 0
    failed: int = 0
    pending: int = 0
    requeued: int = 0
    field_conflicts: int = 0
    owners_defaulted: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    writes: int = 0
    duration: float = 0.0
    error: str | None = None
    exit_code: int = 0
    dry_run: bool = False
    plan_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    interrupted: bool = False
    #: Outcomes an earlier run queued that this run closed (created, updated, already, failed,
    #: queued), kept out of the counts above, which describe this input.
    backlog: dict[str, int] = field(default_factory=dict)
    #: The first few reasons, for the default output (``--json`` receipts carry every one).
    reject_reasons: list[str] = field(default_factory=list)
    failure_reasons: dict[str, int] = field(default_factory=dict)  # reason -> outcomes that failed so
    conflict_ids: list[str] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)  # a dry run's field conflicts (id: field: values)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["duration_seconds"] = round(d.pop("duration"), 3)
        if not self.dry_run:
            d.pop("plan_counts")
        return d


#: Reasons of each kind kept for the default output.
REASONS_SHOWN = 5


class _Tally:
    """Every receipt of a run passes here on its way to the caller's sink: the first few reasons
    are kept for the summary, and outcomes that an earlier run queued (``backlog``, their ids) are
    counted apart."""

    def __init__(self, summary: PushSummary, sink: ReceiptSink | None, backlog: Collection[str] = ()) -> None:
        self.summary, self.sink, self.backlog = summary, sink, set(backlog)

    def in_input(self, ids: list[str]) -> None:
        """Outcomes of this input are not a backlog, even if an earlier run queued them (--retry-failed)."""
        self.backlog.difference_update(ids)

    def __call__(self, r: Receipt) -> None:
        s = self.summary
        if r.status == "rejected" and len(s.reject_reasons) < REASONS_SHOWN:
            s.reject_reasons.append(str(r.error))
        elif r.status == "conflict" and r.id and len(s.conflict_ids) < REASONS_SHOWN:
            s.conflict_ids.append(r.id)
        elif r.status == "planned" and r.error and len(s.disagreements) < REASONS_SHOWN:
            s.disagreements.append(f"{r.id}: {r.error}")
        elif r.status == "failed" and r.error:
            reason = _readable(r.error)
            if reason in s.failure_reasons or len(s.failure_reasons) < REASONS_SHOWN:
                s.failure_reasons[reason] = s.failure_reasons.get(reason, 0) + 1
        if r.id in self.backlog and r.status in ("created", "updated", "already", "failed", "queued"):
            s.backlog[r.status] = s.backlog.get(r.status, 0) + 1
        if self.sink is not None:
            self.sink(r)

    def split_backlog(self) -> None:
        """Take what the backlog's outcomes added to the run's counts out of this input's."""
        s = self.summary
        for status, n in s.backlog.items():
            name = "requeued" if status == "queued" else status
            setattr(s, name, getattr(s, name) - n)


def _readable(error: str) -> str:
    """An item's error with the messages of a JSON error list it quotes pulled out (HubSpot's
    \"Property values were not valid: [{... "message": ...}]\")."""
    import json

    head, bracket, rest = error.partition("[")
    if not bracket:
        return error
    try:
        details = json.loads(bracket + rest)
    except ValueError:
        return error
    if not isinstance(details, list):
        return error
    messages = [str(d["message"]) for d in details if isinstance(d, dict) and d.get("message")]
    if not messages:
        return error
    prefix = head.split(":", 1)[0] + ": " if ":" in head else ""
    return prefix + "; ".join(messages)


ReceiptSink = Callable[[Receipt], None]


# -- input -> outbox ---------------------------------------------------------------------------
def _spooled(source: str) -> tuple[str, Callable[[], None]]:
    """stdin can be read once; --strict reads twice, so spool it to disk (never to memory)."""
    if source != "-":
        return source, lambda: None
    import sys

    fd, path = tempfile.mkstemp(prefix="crmsync-push-", suffix=".in")
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
    return path, lambda: os.unlink(path)


def _write_reject(handle: Any, parsed: Parsed) -> None:
    import json

    assert parsed.error is not None
    handle.write(
        json.dumps({"line": parsed.line, "error": str(parsed.error), "record": parsed.raw}, ensure_ascii=False) + "\n"
    )


def validate_all(source: str, fmt: str, delimiter: str | None = None) -> tuple[int, list[InputError]]:
    """First pass of --strict: every error of the file, nothing queued."""
    n, errors = 0, []
    for parsed in read_outcomes(source, fmt, delimiter=delimiter):
        n += 1
        if parsed.error:
            errors.append(parsed.error)
    return n, errors


def _chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in it:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def enqueue(
    app: App,
    conn: str,
    parsed: Iterable[Parsed],
    summary: PushSummary,
    *,
    update: bool,
    rejects: Any,
    sink: ReceiptSink | None,
    parsed_out: dict[str, ParsedOutcome] | None = None,
    on_objects: Callable[[set[str]], None] | None = None,
    on_queued: Callable[[list[dict[str, dict[str, Any]]]], None] | None = None,
    on_ids: Callable[[list[str]], None] | None = None,
    retry_failed: bool = False,
) -> None:
    """Queue every valid outcome in ONE transaction; report duplicates, conflicts and rejects.

    ``on_ids`` is told the ids of each chunk's valid outcomes (what this input holds).

    An outcome fed again whose delivery failed counts as failed again, unless ``retry_failed``
    (then it is queued again: ``_reset_failed``).

    ``parsed_out`` receives the first CHUNK queued outcomes with their canonical records, so that
    delivery's first round need not parse again what was just parsed. ``on_objects`` is told, after
    each part of the input, the object types of the outcomes queued so far (when that set grew), so
    that what delivery needs of the CRM can be prepared while the rest is read; ``on_queued`` gets
    that part's outcomes kept in ``parsed_out`` (their canonical records), so that their lookups can
    start (``_Prefetch``).
    """
    engine = app.store.engine
    seen: dict[str, str] = {}
    objects: set[str] = set()
    with engine.begin() as db:
        if db.dialect.name == "postgresql":
            from crmsync.store.locks import transaction_lock

            # Concurrent pushes of one connection queue one after another, so each sees what the
            # other queued (and no unique-key race can fail a whole file).
            transaction_lock(db, conn, "enqueue")
        for chunk in _chunks(parsed, ENQUEUE_CHUNK):
            valid: list[tuple[Parsed, CallOutcome]] = []
            for p in chunk:
                summary.read += 1
                if p.error is not None or p.outcome is None:
                    summary.rejected += 1
                    if rejects is not None:
                        _write_reject(rejects, p)
                    if sink:
                        sink(Receipt(None, "rejected", error=str(p.error), line=p.line))
                    continue
                valid.append((p, p.outcome))
            summary.valid += len(valid)
            ids = [o.id for _, o in valid]
            if on_ids is not None:
                on_ids([i for i in ids if i])
            t = CrmOutbox.__table__.c  # type: ignore[attr-defined]
            existing = (
                {
                    row.outcome_id: row
                    for row in db.execute(
                        select(t.id, t.outcome_id, t.content_hash, t.state, t.steps, t.last_error).where(
                            t.connection == conn, t.outcome_id.in_(ids)
                        )
                    )
                }
                if ids
                else {}
            )
            new_rows = []
            chunk_objects: set[str] = set()
            kept: list[dict[str, dict[str, Any]]] = []
            now = utcnow()
            for p, outcome in valid:
                oid = str(outcome.id)
                dumped = outcome.model_dump(mode="json")
                digest = outcome.content_hash(dumped)
                prior = existing.get(oid)
                verdict = _verdict(oid, digest, prior, seen, update=update, retry_failed=retry_failed)
                if verdict == "new":
                    if canon := _keep_parsed(parsed_out, oid, outcome):
                        chunk_objects.update(canon)
                        kept.append(canon)
                    new_rows.append(
                        {
                            "connection": conn,
                            "outcome_id": oid,
                            "content_hash": digest,
                            "payload": encoded(dumped),
                            "state": "pending",
                            "steps": {},
                            "in_flight": {},
                            "attempts": 0,
                            "update_requested": False,
                            "created_at": now,
                            "updated_at": now,
                        }
                    )
                    summary.queued += 1
                    continue
                if verdict in ("failed", "retry"):
                    if verdict == "retry":
                        summary.queued += 1
                        continue
                    # Fed again but not in the CRM: a re-run must not pass it off as sent (exit 0).
                    summary.failed += 1
                    if sink and prior is not None:
                        remote_ids = _public_steps(prior.steps)
                        sink(Receipt(oid, "failed", remote_ids=remote_ids, error=_failed_before(prior), line=p.line))
                    continue
                if verdict == "unchanged":
                    summary.already += 1
                    if sink and prior is not None and prior.state == "done":
                        sink(Receipt(oid, "unchanged", remote_ids=_public_steps(prior.steps), line=p.line))
                    continue
                if verdict == "update" and prior is not None:
                    if canon := _keep_parsed(parsed_out, oid, outcome):
                        chunk_objects.update(canon)
                        kept.append(canon)
                    db.execute(
                        CrmOutbox.__table__.update()  # type: ignore[attr-defined]
                        .where(CrmOutbox.__table__.c.id == prior.id)  # type: ignore[attr-defined]
                        .values(
                            payload=dumped,
                            content_hash=digest,
                            state="pending",
                            update_requested=True,
                            steps={"previous": _public_steps(prior.steps)},
                            in_flight={},
                            last_error=None,
                            updated_at=now,
                        )
                    )
                    summary.queued += 1
                    continue
                summary.conflicts += 1
                if sink:
                    sink(Receipt(oid, "conflict", error=CONFLICT, line=p.line))
            if new_rows:
                insert_rows(db, CrmOutbox.__table__, new_rows)  # type: ignore[attr-defined]
            if on_objects is not None and not chunk_objects <= objects:
                objects |= chunk_objects
                on_objects(set(objects))
            if on_queued is not None and kept:
                on_queued(kept)


def _failed_before(prior: Any) -> str:
    """Why an outcome fed again is failed again (``_verdict``): its outbox row's last error."""
    return f"{prior.last_error or 'failed'} (sent again only with --retry-failed)"


#: Why an outcome is a conflict (``_verdict``), in its receipt.
CONFLICT = "this id was already sent with different content; use --update to send the change"


def _verdict(oid: str, digest: str, prior: Any, seen: dict[str, str], *, update: bool, retry_failed: bool) -> str:
    """What an outcome of the input is to the outbox: new, unchanged, failed (its delivery failed
    before), retry (that, with --retry-failed), update or conflict.

    ``prior`` is the outbox row under its id (its ``content_hash`` and ``state``), if any; ``seen``
    the ids this input queued so far (with their hashes), which a new, retried or updated outcome
    joins. Enqueue and the dry run both decide here, so a dry run shows what the push would do.
    """
    before = seen.get(oid, prior.content_hash if prior is not None else None)
    if before is None:
        seen[oid] = digest
        return "new"
    if before == digest and prior is not None and prior.state == "failed" and oid not in seen:
        seen[oid] = digest
        return "retry" if retry_failed else "failed"
    if before == digest:
        return "unchanged"
    if update and prior is not None and oid not in seen:
        seen[oid] = digest
        return "update"
    return "conflict"


def _keep_parsed(
    parsed_out: dict[str, ParsedOutcome] | None, oid: str, outcome: CallOutcome
) -> dict[str, dict[str, Any]]:
    """Hand a queued outcome (as written to its row) to delivery's first round, parsed; its records."""
    if parsed_out is not None and len(parsed_out) < CHUNK:
        canon = canonical(outcome)
        parsed_out[oid] = (outcome.occurred_at, canon)
        return canon
    return {}


def _public_steps(steps: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in steps.items() if k in (*ENTITY_STEPS, *ACTIVITY_STEPS) and v}


# -- the command ------------------------------------------------------------------------------
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
) -> PushSummary:
    """Validate, queue and deliver outcomes; ``source`` None delivers what is already queued.

    ``strict_owners``: an ``owner_email`` the CRM has no user for fails its outcome (see ``_Owners``).
    """
    conn = app.connection(connection)
    summary = PushSummary(connection=conn.name, provider=conn.provider, dry_run=dry_run)
    started = time.monotonic()
    mapping = app.mapping(conn)
    cleanup = lambda: None  # noqa: E731
    path = source
    try:
        if source is not None and strict:
            path, cleanup = _spooled(source)
            n, errors = validate_all(path, fmt, delimiter)
            if errors:
                shown = "\n  ".join(str(e) for e in errors[:20])
                more = f"\n  … and {len(errors) - 20} more" if len(errors) > 20 else ""
                raise InputError(
                    f"{len(errors)} of {n} records are invalid; nothing was queued (--strict):\n  {shown}{more}"
                )
        if dry_run:
            if path is None:
                raise UsageError("--dry-run needs an input file (or - for stdin)")
            tally = _Tally(summary, sink)
            parsed_input = read_outcomes(path, fmt, delimiter=delimiter)
            plan(
                app,
                conn,
                mapping,
                parsed_input,
                summary,
                sink=tally,
                rejects=rejects,
                update=update,
                retry_failed=retry_failed,
            )
        else:
            with _delivery_lock(app, conn.name, lock_timeout):
                run_id = app.store.runs.start(conn.name, "push", mapping_hash=mapping.hash)
                status, error = "ok", None
                # With an input, what was queued before it is a backlog, counted apart from it.
                earlier = ("pending", "failed") if retry_failed else ("pending",)
                tally = _Tally(summary, sink, _queued_ids(app, conn.name, earlier) if path is not None else ())
                queued = path is None  # this input's outcomes are in the outbox (enqueue committed)
                provider: Provider | None = None
                before: dict[str, int] = {}
                warm = _Warmup(app, conn) if path is not None else None
                # Not with workers sharing the outbox (the rows queued may be another's to deliver)
                # nor with one store connection (an in-memory store: the lookups run in line).
                ahead = (
                    _Prefetch(app, conn, mapping, warm.provider_future)
                    if warm is not None and app.store.concurrent_writers and not _shared(app)
                    else None
                )
                try:
                    parsed: dict[str, ParsedOutcome] = {}
                    if path is not None:
                        reject_handle = open(rejects, "w", encoding="utf-8") if rejects else None  # noqa: SIM115
                        try:
                            enqueue(
                                app,
                                conn.name,
                                read_outcomes(path, fmt, delimiter=delimiter),
                                summary,
                                update=update,
                                rejects=reject_handle,
                                sink=tally,
                                parsed_out=parsed,
                                on_objects=warm.prepare if warm else None,
                                on_queued=ahead.add if ahead else None,
                                on_ids=tally.in_input,
                                retry_failed=retry_failed,
                            )
                        finally:
                            if reject_handle:
                                reject_handle.close()
                        queued = True
                        if ahead is not None:
                            ahead.flush()
                        if summary.read == 0:
                            raise InputError(f"{'<stdin>' if path == '-' else path}: no outcomes found (empty input)")
                    if retry_failed:
                        _reset_failed(app, conn.name)
                    provider = warm.provider() if warm else app.provider(conn)
                    before = warm.before if warm else provider.http.stats.as_dict()
                    provider.check_budget(_needs(app, conn.name, parsed))
                    deliver(
                        app,
                        conn,
                        provider,
                        mapping,
                        summary,
                        sink=tally,
                        progress=progress,
                        run_id=run_id,
                        parsed=parsed,
                        prepared=warm.gates if warm else None,
                        prefetched=ahead.found if ahead else None,
                        owners=_Owners(provider, strict=strict_owners),
                    )
                except (RetriableError, AuthError) as exc:
                    status, error = "failed", str(exc)
                    summary.error, summary.exit_code = str(exc), exc.exit_code
                    with contextlib.suppress(Exception):  # what a re-run will deliver (deliver stopped short)
                        summary.pending = _count_pending(app, conn.name)
                except InputError:
                    status = "failed"
                    raise
                except KeyboardInterrupt:
                    # Ctrl-C: every step taken is committed and the claims are handed back (deliver),
                    # so the run ends here as interrupted and a re-run delivers the rest once.
                    status = error = "interrupted"
                    summary.interrupted, summary.exit_code = True, ExitCode.INTERRUPTED
                except Exception as exc:  # the CRM refused the run, or a bug: logged as failed either way
                    status, error = "failed", str(exc)
                    raise
                finally:
                    tally.split_backlog()
                    if summary.interrupted:
                        if not queued:
                            summary.queued = 0  # enqueue's one transaction was rolled back
                        with contextlib.suppress(Exception):
                            summary.pending = _count_pending(app, conn.name)
                        summary.error = _interrupted(summary, queued=queued)
                    if ahead is not None:
                        ahead.close()
                    if warm is not None:
                        warm.close()
                    stats = provider.http.stats.since(before) if provider else {}
                    summary.requests = stats.get("requests", 0)
                    summary.retries = stats.get("retries", 0)
                    summary.rate_limited = stats.get("rate_limited", 0)
                    if status == "ok" and (
                        summary.failed or summary.rejected or summary.conflicts or summary.backlog.get("failed")
                    ):
                        status = "partial"
                    app.store.runs.finish(run_id, status=status, counts=_counts(summary), stats=stats, error=error)
                    _outbox_gauges(app, conn.name)
                    if status == "ok":
                        app.metrics.last_success.labels(conn.name, "push").set(time.time())
                    app.metrics.count_records(
                        conn.name,
                        "calls",
                        {  # what the run did, the backlog's outcomes included
                            "created": summary.created + summary.backlog.get("created", 0),
                            "updated": summary.updated + summary.backlog.get("updated", 0),
                            "failed": summary.failed + summary.backlog.get("failed", 0),
                            "rejected": summary.rejected,
                        },
                    )
    finally:
        cleanup()
        summary.duration = time.monotonic() - started
        app.metrics.sync_seconds.labels(conn.provider, conn.name, "push").observe(summary.duration)
    if not summary.exit_code and (
        summary.failed or summary.rejected or summary.conflicts or summary.backlog.get("failed")
    ):
        summary.exit_code = ExitCode.PARTIAL
    if not summary.exit_code and (summary.requeued or summary.backlog.get("queued")) and not dry_run:
        # Items left queued after retriable errors (5xx/429 per item): a later run delivers them.
        summary.exit_code = ExitCode.TEMPFAIL
        summary.error = summary.error or (
            f"{summary.requeued + summary.backlog.get('queued', 0)} outcome(s) still queued after temporary errors;"
            " run push again"
        )
    return summary


def _interrupted(s: PushSummary, *, queued: bool) -> str:
    """What an interrupted push did, and what is left for the re-run."""
    if not queued:
        return "interrupted while reading the input: nothing was queued or sent; run the push again"
    closed = ("created", "updated", "already")  # already: found logged in the CRM, so done
    delivered = s.created + s.updated + sum(s.backlog.get(k, 0) for k in closed)
    return f"interrupted: {delivered} outcome(s) delivered, {s.pending} still queued; re-run to resume"


def _queued_ids(app: App, conn: str, states: Sequence[str]) -> set[str]:
    """The ids of a connection's outcomes in ``states``."""
    t = CrmOutbox.__table__.c  # type: ignore[attr-defined]
    with app.store.session() as s:
        return set(s.exec(select(t.outcome_id).where(t.connection == conn, t.state.in_(states))))


class _Warmup:
    """The provider made, and the CRM prepared for the objects queued, while the input is still read.

    Delivery's first writes wait for the provider (credentials from the keyring) and for
    ``prepare_objects`` (idempotency properties, field metadata: a round trip or two per object).
    Both start on threads as soon as enqueue has queued outcomes of an object type, so their round
    trips overlap the rest of validating and queuing. Nothing is written to the CRM unless some
    outcome was queued (a push that queued one delivers it, so prepares it anyway); what fails here
    fails when delivery asks for it, as it would have without the head start.
    """

    def __init__(self, app: App, conn: CrmConnection) -> None:
        _ = app.metrics, app.secrets  # made here, not raced for by the thread below
        workers = 1 + len(ENTITY_STEPS) + len(ACTIVITY_STEPS)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="warmup")
        self.gates: dict[str, Future[None]] = {}
        self.before: dict[str, int] = {}  # the provider's request counters before any request of this run
        self.provider_future = self.pool.submit(self._make, app, conn)

    def _make(self, app: App, conn: CrmConnection) -> Provider:
        provider = app.provider(conn)
        self.before = provider.http.stats.as_dict()
        return provider

    def prepare(self, objects: set[str]) -> None:
        for obj in sorted(objects - set(self.gates)):
            self.gates[obj] = self.pool.submit(self._prepare, obj)

    def _prepare(self, obj: str) -> None:
        self.provider_future.result().prepare_objects([obj])

    def provider(self) -> Provider:
        return self.provider_future.result()

    def close(self) -> None:
        # Started requests finish (they are short); nothing not yet started is begun.
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Prefetch:
    """The first round's CRM lookups, sent while the rest of the input is still being queued.

    A push's lookups are read-only and depend on no write, but ``deliver`` starts them only after
    the whole input is queued, claimed and split into lanes: on a 10,000-outcome Zoho push, 0.5 s in
    which its 5 slots sat idle while lookups head every lane's chain (15.9-16.1 -> 15.2-15.5 s; a
    1,000-outcome HubSpot push 1.31-1.41 -> 1.18-1.19 s; a 10,000-outcome one, bound by the general
    window, did not change). Here each queued part's keys
    are looked up in input order, in the batches ``_lookup`` would send, as soon as the provider is
    made; ``deliver``'s lookups take the answers from ``found`` (``_lookup``) and look up only what
    is not there. Nothing is trusted beyond what a lane's own lookup would be: keys are checked
    against the mirror and the links again when an answer is taken, and a failed or cancelled
    prefetch only means the lane looks the keys up itself.
    """

    def __init__(self, app: App, conn: CrmConnection, mapping: Mapping, provider: Future[Provider]) -> None:
        self.app, self.conn, self.mapping, self._provider = app, conn, mapping, provider
        # One dispatcher keeps the input's order; the lookups go side by side behind it.
        self.dispatch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.pool: ThreadPoolExecutor | None = None
        #: object -> key -> the answer of the batch that holds the key ({key: record} found).
        self.found: dict[str, dict[str, Future[dict[str, Any]]]] = {obj: {} for obj in ENTITY_STEPS}
        self._seen: set[tuple[str, str]] = set()
        self._waiting: dict[tuple[str, str], list[str]] = {}  # (object, kind) -> keys of a part-filled batch

    def add(self, canons: list[dict[str, dict[str, Any]]]) -> None:
        """Look up these outcomes' records (called from ``enqueue`` after each queued part)."""
        self.dispatch.submit(self._add, canons)

    def flush(self) -> None:
        """Send the part-filled batches; return once every key taken is in ``found``."""
        with contextlib.suppress(Exception):  # a failed prefetch is only a lookup not made ahead
            self.dispatch.submit(self._send_waiting).result()

    def _add(self, canons: list[dict[str, dict[str, Any]]]) -> None:
        provider = self._provider.result()
        for obj in ENTITY_STEPS:
            if obj in provider.optimistic_creates:
                continue  # created blind: its few lookups (linked keys) are left to the lanes
            keys = []
            for canon in canons:
                if obj in canon and (k := _entity_key(obj, canon)) and (obj, k) not in self._seen:
                    self._seen.add((obj, k))
                    keys.append(k)
            if not keys:
                continue
            for k in _to_look_up(self.app, self.conn, provider, obj, keys):
                kind = k.split(":", 1)[0]
                waiting = self._waiting.setdefault((obj, kind), [])
                waiting.append(k)
                if len(waiting) >= provider.lookup_batch(obj, kind):
                    self._send(provider, obj, self._waiting.pop((obj, kind)))

    def _send_waiting(self) -> None:
        provider = self._provider.result()
        for (obj, _), keys in self._waiting.items():
            self._send(provider, obj, keys)
        self._waiting.clear()

    def _send(self, provider: Provider, obj: str, keys: list[str]) -> None:
        if self.pool is None:
            # A few in flight keep a rate-limited search busy; more threads would only wait for its turns.
            workers = min(provider.http.concurrency, PREFETCH_IN_FLIGHT)
            self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch-lookup")
        batch = [dict([k.split(":", 1)]) for k in keys]
        fields = self.mapping.provider_fields(obj)
        answer = self.pool.submit(provider.lookup, obj, batch, fields=fields)
        for k in keys:
            self.found[obj][k] = answer

    def close(self) -> None:
        self.dispatch.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _needs(app: App, conn: str, parsed: dict[str, ParsedOutcome]) -> dict[str, int]:
    """What the queued outcomes may write, per object type (for ``Provider.check_budget``).

    Outcomes read in this run are counted by what they carry; a backlog from earlier runs counts
    as calls with every other object too (the upper bound).
    """
    pending = _count_pending(app, conn)
    needs = {"calls": pending}
    for _, canon in parsed.values():
        for obj in canon:
            if obj != "calls":
                needs[obj] = needs.get(obj, 0) + 1
    backlog = max(0, pending - len(parsed))
    for obj in ("contacts", "companies", "deals", "tasks"):
        needs[obj] = needs.get(obj, 0) + backlog
    return needs


def _shared(app: App) -> bool:
    """True when several workers may deliver one connection at once (a PostgreSQL store)."""
    return app.store.is_postgresql


def _delivery_lock(app: App, conn: str, timeout: float | None) -> contextlib.AbstractContextManager[Any]:
    """SQLite: one push per connection (the run lock). PostgreSQL: none; runs claim outbox rows."""
    if _shared(app):
        return contextlib.nullcontext()
    return app.run_lock(conn, timeout=timeout)


def _counts(s: PushSummary) -> dict[str, Any]:
    counts: dict[str, Any] = {
        k: getattr(s, k)
        for k in (
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
    }
    if s.backlog:
        counts["backlog"] = dict(s.backlog)
    return counts


def _outbox_gauges(app: App, conn: str) -> None:
    from sqlalchemy import func

    with app.store.session() as s:
        counts = dict(
            s.exec(
                select(CrmOutbox.state, func.count()).where(CrmOutbox.connection == conn).group_by(CrmOutbox.state)
            ).all()
        )  # type: ignore[arg-type]
    for state in ("pending", "done", "failed", "conflict"):
        app.metrics.outbox.labels(conn, state).set(counts.get(state, 0))


def _reset_failed(app: App, conn: str) -> None:
    with app.store.session() as s:
        for row in s.exec(select(CrmOutbox).where(CrmOutbox.connection == conn, CrmOutbox.state == "failed")):
            row.state, row.updated_at = "pending", utcnow()
            s.add(row)


# -- dry run ----------------------------------------------------------------------------------
def plan(
    app: App,
    conn: CrmConnection,
    mapping: Mapping,
    parsed: Iterable[Parsed],
    summary: PushSummary,
    *,
    sink: ReceiptSink | None,
    rejects: Path | None,
    update: bool = False,
    retry_failed: bool = False,
) -> None:
    """The plan per outcome from the local mirror: no CRM request, no outbox write.

    An outcome is new, unchanged, failed before, an update or a conflict by the rule enqueue applies
    (``_verdict``); a record in the mirror whose values the outcome contradicts is a conflict, as
    delivery records it (``resolve``).
    """
    rules = app.config.conflict_rules()
    counts: dict[str, dict[str, int]] = {}
    seen: dict[str, str] = {}
    reject_handle = open(rejects, "w", encoding="utf-8") if rejects else None  # noqa: SIM115
    try:
        for chunk in _chunks(parsed, ENQUEUE_CHUNK):
            good = []
            for p in chunk:
                summary.read += 1
                if p.error or p.outcome is None:
                    summary.rejected += 1
                    if reject_handle:
                        _write_reject(reject_handle, p)
                    if sink:
                        sink(Receipt(None, "rejected", error=str(p.error), line=p.line))
                    continue
                good.append((p, p.outcome))
            summary.valid += len(good)
            canon = [(p, o, canonical(o)) for p, o in good]
            keys: dict[str, set[str]] = {o: set() for o in ENTITY_STEPS}
            for _, _, c in canon:
                for obj in ENTITY_STEPS:
                    k = _entity_key(obj, c)
                    if k:
                        keys[obj].add(k)
            mirror = {obj: app.store.mirror.find_by_keys(conn.name, obj, ks) for obj, ks in keys.items()}
            links = {obj: app.store.mirror.links(conn.name, obj, ks) for obj, ks in keys.items()}
            with app.store.session() as s:
                outbox = {
                    r.outcome_id: r
                    for r in s.exec(
                        select(CrmOutbox).where(
                            CrmOutbox.connection == conn.name, CrmOutbox.outcome_id.in_([str(o.id) for _, o in good])
                        )
                    )  # type: ignore[attr-defined]
                }
            for p, outcome, c in canon:
                oid = str(outcome.id)
                steps: dict[str, str] = {}
                disagreements: list[str] = []
                prior = outbox.get(oid)
                verdict = _verdict(oid, outcome.content_hash(), prior, seen, update=update, retry_failed=retry_failed)
                for obj in (*ENTITY_STEPS, *ACTIVITY_STEPS):
                    if obj not in c:
                        continue
                    if verdict in ("unchanged", "failed", "conflict"):
                        action = "conflict" if verdict == "conflict" else "skip"
                    elif obj in ACTIVITY_STEPS:
                        sent = verdict == "update" and prior is not None and (prior.steps or {}).get(obj)
                        action = "update" if sent else "create"
                    else:
                        k = _entity_key(obj, c)
                        rec = mirror[obj].get(k) if k else None
                        if rec is not None:
                            send, conflicts = resolve(
                                obj,
                                c[obj],
                                rec.properties,
                                rules=rules,
                                occurred_at=outcome.occurred_at,
                                crm_updated_at=rec.remote_updated_at,
                            )
                            # As status counts them: a conflict stays open where the CRM's value is kept.
                            kept = any(x.resolution == "kept_crm" for x in conflicts)
                            action = "conflict" if kept else "update" if send else "match"
                            summary.field_conflicts += len(conflicts)
                            disagreements += [_disagreement(obj, x) for x in conflicts]
                        elif k and k in links[obj]:
                            action = "match"
                        else:
                            action = "create"
                    steps[obj] = action
                    counts.setdefault(obj, {}).setdefault(action, 0)
                    counts[obj][action] += 1
                if verdict == "conflict":
                    summary.conflicts += 1
                    planned = Receipt(oid, "conflict", error=CONFLICT, line=p.line, plan=steps)
                elif verdict == "failed" and prior is not None:
                    summary.failed += 1
                    planned = Receipt(oid, "failed", error=_failed_before(prior), line=p.line, plan=steps)
                else:
                    planned = Receipt(oid, "planned", line=p.line, plan=steps, error="; ".join(disagreements) or None)
                if sink:
                    sink(planned)
    finally:
        if reject_handle:
            reject_handle.close()
    summary.plan_counts = counts


def _disagreement(obj: str, c: Conflict) -> str:
    """One field conflict as a dry run reports it."""
    kept = "the CRM's value stays" if c.resolution == "kept_crm" else "the outcome's is sent"
    return f"{obj}.{c.field}: the CRM has {c.crm_value!r}, the outcome {c.outcome_value!r} ({c.rule}: {kept})"


def _item_key(it: _Item, obj: str) -> str | None:
    """``_entity_key`` of an outcome being delivered, remembered on it (its records do not change)."""
    try:
        return it.keys[obj]
    except KeyError:
        key = it.keys[obj] = _entity_key(obj, it.canon)
        return key


def _entity_key(obj: str, canon: dict[str, dict[str, Any]]) -> str | None:
    c = canon.get(obj)
    if not c:
        return None
    if obj == "contacts":
        k = contact_key(c)
    elif obj == "companies":
        k = company_key(c)
    else:
        k = {"key": c["key"]} if c.get("key") else None
    return match_key(k) if k else None


# -- delivery ---------------------------------------------------------------------------------
@dataclass(slots=True)
class _Row:
    """The part of an outbox row that delivery reads and writes back (``_save_rows``).

    Plain attributes, not a ``CrmOutbox`` instance: a round holds 10,000 rows, and building, setting
    and reading ORM-instrumented SQLModel objects was most of a round's claim and close (0.4 s each).
    """

    id: int
    outcome_id: str
    state: str
    steps: dict[str, Any]
    in_flight: dict[str, Any]
    attempts: int
    last_error: str | None
    update_requested: bool
    updated_at: datetime
    delivered_at: datetime | None
    claimed_by: str | None
    claimed_at: datetime | None
    #: The outcome as queued, until it is parsed (None when the caller already has it parsed).
    payload: dict[str, Any] | None = None


#: The outbox columns a ``_Row`` is read from, in its field order (payload apart).
_ROW_COLUMNS = tuple(f for f in _Row.__slots__ if f != "payload")  # type: ignore[attr-defined]


@dataclass
class _Item:
    """One outcome being delivered: its outbox row, when the call happened, its canonical records.

    Not the parsed outcome itself: a round holds 10,000 of these, and the pydantic models were a
    third of a round's memory.
    """

    row: _Row
    occurred_at: datetime
    canon: dict[str, dict[str, Any]]
    failed: bool = False
    #: Match keys by object, worked out once (``_item_key``): lanes, lookups and steps all ask.
    keys: dict[str, str | None] = field(default_factory=dict)
    #: Objects whose record this run created (not matched): nothing can be logged on a new contact.
    created: set[str] = field(default_factory=set)
    #: Activities the CRM already held, logged by someone else's run (a lost store, another machine).
    already: set[str] = field(default_factory=set)


def deliver(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    summary: PushSummary,
    *,
    sink: ReceiptSink | None = None,
    progress: Callable[[int, int], None] | None = None,
    run_id: int | None = None,
    parsed: dict[str, ParsedOutcome] | None = None,
    prepared: dict[str, Future[None]] | None = None,
    prefetched: dict[str, dict[str, Future[dict[str, Any]]]] | None = None,
    owners: _Owners | None = None,
) -> None:
    """Deliver every pending outbox item of a connection, CHUNK outcomes at a time.

    A round is split into lanes that share no record (``_lanes``). Lanes run side by side, and each
    lane's lookups are queued per object as soon as the round starts (``_Lookups``): a lane waits
    only for its own lookups of the object it is at, so outcomes with no company write contacts and
    calls while the company searches are still under way, and the first lanes' companies are
    written while the last lanes' are still being searched. The next round's lookups queue behind
    this round's. All of this needs one store connection per thread (not an in-memory store); the
    next round's lookups also need the next rows to stay ours (not when workers share the outbox).

    ``parsed``: outcomes just queued, already parsed (see ``enqueue``). ``prepared``: object -> its
    ``prepare_objects`` future, started while they were queued (see ``_Warmup``); the first round
    waits for them and prepares any other object it holds before its first write. ``prefetched``:
    lookups of the queued outcomes' records already under way (``_Prefetch``).
    """
    last_id = 0
    done = 0
    total = _count_pending(app, conn.name)
    ready = False  # the first round's objects prepared
    shared = _shared(app)
    threads = app.store.concurrent_writers
    lookups = _Lookups(app, conn, provider, mapping, threads=threads, prefetched=prefetched)
    owners = owners or _Owners(provider, strict=False)
    ahead: tuple[list[int | None], list[tuple[list[_Item], dict[str, Known]]]] | None = None
    parsed = parsed or {}
    gates = prepared or {}
    with _claim_owner(app, shared) as owner, contextlib.closing(lookups):
        while True:
            if ahead is not None:
                # What the look-ahead parsed is not read and parsed again, whatever the claim returns.
                parsed = {it.row.outcome_id: (it.occurred_at, it.canon) for lane, _ in ahead[1] for it in lane}
            rows = _claim(app, conn.name, last_id, owner, shared=shared, have=set(parsed))
            if not rows:
                break
            last_id = rows[-1].id or last_id
            items: list[_Item] = []
            receipts: dict[str | None, Receipt] = {}  # of the lanes that closed their outcomes
            finished = False
            try:
                if ahead is not None and ahead[0] == [r.id for r in rows]:
                    # The same rows, read again: the claimed row objects are the ones to save.
                    fresh = {r.id: r for r in rows}
                    lanes = ahead[1]
                    for lane, _ in lanes:
                        for it in lane:
                            it.row = fresh[it.row.id]
                    items = [it for lane, _ in lanes for it in lane]
                else:
                    items = [_parse(row, parsed) for row in rows]
                    if not ready:
                        # Before any write: a CRM that lacks what push relies on fails the run here.
                        for gate in gates.values():
                            gate.result()
                        if objects := sorted({o for it in items for o in it.canon} - set(gates)):
                            provider.prepare_objects(objects)
                        ready = True
                    lanes = lookups.start(_lanes(items, split=threads))
                owners.apply(items, summary)
                parsed.clear()  # this round's only (the first time the caller's dict: not kept alive by it)
                ahead = None
                if threads and not shared:
                    upcoming = _peek(app, conn.name, last_id)
                    if upcoming:
                        nxt = [_parse(r) for r in upcoming]
                        ahead = ([r.id for r in upcoming], lookups.start(_lanes(nxt)))
                _run_lanes(app, conn, provider, mapping, lanes, summary, owner if shared else None, receipts)
                finished = True
            finally:
                if not finished:
                    # Stopped mid-chunk (CRM down, interrupted): hand the rows back at once; their
                    # steps and in-flight marks are kept for whoever takes them next (rows a lane
                    # closed before the stop are no longer ours to hand back).
                    with contextlib.suppress(Exception):
                        _release(app, [r.id for r in rows], owner)
                if sink and receipts:
                    # In the round's order, whichever lane closed first; after a stop, those closed
                    # (and a failing sink then does not replace the error that stopped the round).
                    closed = [r for it in items if (r := receipts.get(it.row.outcome_id)) is not None]
                    with contextlib.nullcontext() if finished else contextlib.suppress(Exception):
                        for r in closed:
                            sink(r)
            done += len(items)
            if progress:
                progress(done, total)
    summary.pending = _count_pending(app, conn.name)


class _Owners:
    """Who owns what an outcome writes: its ``owner_email`` as a CRM user, resolved once per run.

    The run's emails go to ``Provider.resolve_owners`` in one call (later rounds ask only for emails
    not seen yet); the CRM user id then replaces the email in the outcome's records before mapping.
    Policy for an email the CRM has no user for: the connection's own user (``default_owner``), a
    warning and one count in ``owners_defaulted``; with ``strict`` the outcome fails instead, before
    anything of it is written. Calls and tasks without an ``owner_email`` get the connection's own
    user too, so no activity is left unassigned where the CRM has owners (when the connection's user
    is not known either, the CRM's own default owner applies). A provider without ``default_owner``
    gets an unknown email as it is and applies its own fallback.
    """

    OWNED = ("contacts", "deals", "calls", "tasks")

    def __init__(self, provider: Provider, *, strict: bool) -> None:
        self.provider, self.strict = provider, strict
        self.users: dict[str, str | None] = {}  # email -> CRM user id (None: unknown to the CRM)
        self._default: Future[str | None] | None = None  # asked for alongside the first resolve
        self._applied: dict[str, int] = {}  # the last round's outcome ids -> id() of their records
        self._warned: set[str] = set()
        self.supported = True  # False once the provider says it maps owner_email itself
        # A provider that cannot name its own user applies its own fallback to an unknown email.
        self.own_fallback = type(provider).default_owner is Provider.default_owner

    def default(self) -> str | None:
        self._ask_default()
        assert self._default is not None
        return self._default.result()

    def _ask_default(self) -> None:
        """Start reading the connection's own user in a thread of its own (it waits on no one)."""
        if self._default is not None:
            return
        self._default = Future()

        def read(answer: Future[str | None]) -> None:
            try:
                answer.set_result(self.provider.default_owner())
            except BaseException as exc:  # raised in the lane that needs the answer
                answer.set_exception(exc)

        threading.Thread(target=read, args=(self._default,), name="default-owner", daemon=True).start()

    def apply(self, items: list[_Item], summary: PushSummary) -> None:
        todo = [it for it in items if self._applied.get(it.row.outcome_id) != id(it.canon)]
        self._applied = {}  # only the last round's records could come again; more would grow with the run
        if todo:
            self._ask_default()
        emails = {it.row.outcome_id: _owner_email(it.canon) for it in todo}
        new = sorted({e for e in emails.values() if e} - self.users.keys())
        if new and self.supported:
            try:
                found = self.provider.resolve_owners(new)
            except NotImplementedError:
                self.supported = False
            else:
                self.users.update((e, found.get(e)) for e in new)
        if not self.supported:
            return
        for it in todo:
            self._applied[it.row.outcome_id] = id(it.canon)
            email = emails[it.row.outcome_id]
            owner = self.users.get(email) if email else None
            if email and owner is None:
                if self.strict:
                    it.failed, it.row.state = True, "failed"
                    it.row.last_error = f"owner_email {email} is not a user of the CRM (--strict-owners)"
                    continue
                summary.owners_defaulted += 1
                if self.own_fallback:
                    continue  # the email goes to the provider as it is: it applies (and reports) its fallback
                if email not in self._warned:
                    self._warned.add(email)
                    log.warning("owner_email %s is no user of the CRM: the connection's user owns its records", email)
            for obj in self.OWNED:
                if obj in it.canon and (email or obj in ACTIVITY_STEPS):
                    chosen = owner if owner is not None else self.default()
                    if chosen is None:
                        it.canon[obj].pop("owner_email", None)  # the CRM's own default applies
                    else:
                        it.canon[obj]["owner_email"] = chosen


def _owner_email(canon: dict[str, dict[str, Any]]) -> str | None:
    """The outcome's ``owner_email`` (the same on its contact, deal and call), lower-cased."""
    email = next((c["owner_email"] for c in canon.values() if c.get("owner_email")), None)
    return str(email).strip().lower() if email else None


#: A lane's CRM lookups for one object: key -> (properties, remote id, updated at) or None, or the
#: future of that while the lookups are still running.
Known = dict[str, Any] | Future[dict[str, Any]]

#: Outcomes per lane, at most (a group of outcomes sharing records is never split). Ten batches per
#: object: the first lanes' writes start after a tenth of a round's lookups, not after all of them.
LANE = 1000


def _lanes(items: list[_Item], *, split: bool = True) -> list[list[_Item]]:
    """Split a round into lanes that share no company, contact or deal.

    Outcomes that share any record stay together (they merge into one write). Groups that need the
    same first entity step go to the same lanes, LANE outcomes at most per lane, so outcomes with no
    company never wait for company lookups and each lane adds at most one part-filled batch per
    object. No two lanes touch one record, so they run at the same time without racing on a match.
    """
    if not split:
        return [items] if items else []
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i, it in enumerate(items):
        for obj in ENTITY_STEPS:
            if k := _item_key(it, obj):
                parent[find((obj, k))] = find(i)
    groups: dict[Any, list[_Item]] = {}
    for i, it in enumerate(items):
        groups.setdefault(find(i), []).append(it)
    by_first: dict[str, list[list[_Item]]] = {}
    for group in groups.values():
        first = next((o for o in ENTITY_STEPS if any(o in it.canon and o not in it.row.steps for it in group)), "")
        lanes = by_first.setdefault(first, [[]])
        if lanes[-1] and len(lanes[-1]) + len(group) > LANE:
            lanes.append([])
        lanes[-1].extend(group)
    order = {id(it): n for n, it in enumerate(items)}
    return [sorted(lane, key=lambda it: order[id(it)]) for lanes in by_first.values() for lane in lanes]


def _first_step(lane: list[_Item]) -> int:
    """The index in ENTITY_STEPS of the first entity step a lane still needs (len when none)."""
    return next(
        (j for j, o in enumerate(ENTITY_STEPS) if any(o in it.canon and o not in it.row.steps for it in lane)),
        len(ENTITY_STEPS),
    )


class _Lookups:
    """Lanes' CRM lookups, queued per object (one lane at a time per object; see ``start`` for the order).

    A lane's lookups of one object do not depend on any write, so they can run long before the lane
    gets there. Without threads (in-memory store) they run in line.
    """

    def __init__(
        self,
        app: App,
        conn: CrmConnection,
        provider: Provider,
        mapping: Mapping,
        *,
        threads: bool,
        prefetched: dict[str, dict[str, Future[dict[str, Any]]]] | None = None,
    ) -> None:
        self.args = (app, conn, provider, mapping)
        self.prefetched = prefetched or {}
        self.pools = (
            {obj: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lookup-{obj}") for obj in ENTITY_STEPS}
            if threads
            else None
        )

    def start(self, lanes: list[list[_Item]]) -> list[tuple[list[_Item], dict[str, Known]]]:
        """Queue the lanes' lookups; each lane with its lookups (or their futures) per object.

        Per object, the lanes that reach that object first are looked up first: a lane that starts
        with contacts needs its contacts at once, a lane that starts with companies only after its
        companies are written (their lookups take longer than anything else of a push).
        """
        known: list[dict[str, Known]] = [{} for _ in lanes]
        firsts = [_first_step(lane) for lane in lanes]
        for j, obj in enumerate(ENTITY_STEPS):
            order = sorted(range(len(lanes)), key=lambda i: j - firsts[i] if firsts[i] <= j else len(ENTITY_STEPS))
            for group in self._groups(obj, order, lanes):
                part = lanes[group[0]] if len(group) == 1 else [it for i in group for it in lanes[i]]
                found: Known
                ahead = self.prefetched.get(obj)
                if self.pools is None:
                    found = _lookups_for(*self.args, part, obj, ahead)
                else:
                    found = self.pools[obj].submit(_lookups_for, *self.args, part, obj, ahead)
                for i in group:
                    known[i][obj] = found
        return list(zip(lanes, known, strict=True))

    def _groups(self, obj: str, order: list[int], lanes: list[list[_Item]]) -> list[list[int]]:
        """Consecutive lanes (in ``order``) whose keys of ``obj`` fit one lookup call together.

        A lane's lookups are sent per lane, so lanes with few keys each (a push's deals: ~200 a lane
        against Zoho's 1,250 a query) would each spend a query; lanes grouped share one, and their
        answer (a lane reads only its own keys in it). A lane whose keys fill a call is left alone.
        """
        provider = self.args[2]
        groups: list[list[int]] = []
        sizes: Counter[str] = Counter()
        for i in order:
            mine = Counter(k.split(":", 1)[0] for k in _group_by_key(obj, lanes[i]))
            together = sizes + mine
            if groups and all(n <= provider.lookup_batch(obj, kind) for kind, n in together.items()):
                groups[-1].append(i)
                sizes = together
            else:
                groups.append([i])
                sizes = mine
        return groups

    def close(self) -> None:
        for pool in (self.pools or {}).values():
            pool.shutdown(wait=True, cancel_futures=True)


def _run_lanes(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    lanes: list[tuple[list[_Item], dict[str, Known]]],
    summary: PushSummary,
    owner: str | None,
    receipts: dict[str | None, Receipt],
) -> None:
    """Every step of a round, its lanes at the same time; ``receipts`` gets the closed outcomes' by id.

    A lane that has taken its last step closes its outcomes (``_settle``) at once, while other
    lanes still wait for the CRM: closing a round's 10,000 rows after its last lane took 0.18 s in
    which nothing was sent. A lane stopped early (another failed, Ctrl-C) closes nothing and
    ``deliver`` hands its rows back; its finished steps are committed either way, and what every
    lane did is counted in ``summary`` even when one of them failed.
    """
    stop = threading.Event()

    def lane(part: list[_Item], known: dict[str, Known]) -> tuple[PushSummary, list[Receipt]]:
        mine = PushSummary(summary.connection, summary.provider)
        for obj in ENTITY_STEPS:
            if stop.is_set():
                return mine, []
            _entity_step(app, conn, provider, mapping, obj, part, mine, known.get(obj))
            if owner is not None:
                _renew(app, part, owner)
        for obj in ACTIVITY_STEPS:
            if stop.is_set():
                return mine, []
            _activity_step(app, conn, provider, mapping, obj, part, mine)
            if owner is not None:
                _renew(app, part, owner)
        return mine, _settle(app, part, mine)

    def count(part: PushSummary, closed: list[Receipt]) -> None:
        for name in ("field_conflicts", "writes", "created", "already", "updated", "failed", "requeued"):
            setattr(summary, name, getattr(summary, name) + getattr(part, name))
        receipts.update((r.id, r) for r in closed)

    if len(lanes) == 1:
        count(*lane(*lanes[0]))
        return
    pool = ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="lane")
    futures = [pool.submit(lane, part, known) for part, known in lanes]
    try:
        for future in futures:
            future.result()
    finally:
        # A failed lane or Ctrl-C stops the others at their next step; finished steps are committed.
        stop.set()
        pool.shutdown(wait=True)
        for future in futures:
            if not future.cancelled() and future.exception() is None:
                count(*future.result())


def _parse(row: _Row, parsed: dict[str, ParsedOutcome] | None = None) -> _Item:
    if parsed and (done := parsed.get(row.outcome_id)) is not None:
        item = _Item(row, *done)
    else:
        outcome = CallOutcome.model_validate(row.payload)
        item = _Item(row, outcome.occurred_at, canonical(outcome))
    row.payload = None  # parsed, it is not read again (progress is saved column by column)
    return item


def _read_rows(s: Any, where: Any, *, limit: int | None = None, skip_payload: Collection[str] = ()) -> list[_Row]:
    """Outbox rows as ``_Row``s, in id order; payloads only of the outcomes not in ``skip_payload``."""
    t = CrmOutbox.__table__.c  # type: ignore[attr-defined]
    q = select(*(t[c] for c in _ROW_COLUMNS)).where(where).order_by(t.id)
    if limit is not None:
        q = q.limit(limit)
    db = s.connection()  # Core rows: the ORM's loading machinery cost more than the rows themselves
    rows = [_Row(*r) for r in db.execute(q)]
    wanted = [r.id for r in rows if r.outcome_id not in skip_payload]
    if wanted:
        payloads = {rid: payload for rid, payload in db.execute(select(t.id, t.payload).where(t.id.in_(wanted)))}
        for r in rows:
            r.payload = payloads.get(r.id, r.payload)
    return rows


def _peek(app: App, conn: str, after_id: int) -> list[_Row]:
    """The rows the next round will claim (read only: nothing is leased)."""
    t = CrmOutbox.__table__.c  # type: ignore[attr-defined]
    with app.store.session() as s:
        return _read_rows(s, (t.connection == conn) & (t.state == "pending") & (t.id > after_id), limit=CHUNK)


def _claim_owner(app: App, shared: bool) -> contextlib.AbstractContextManager[str]:
    """This run's name on its claims; on PostgreSQL one that dies with the run (see scaleout)."""
    if shared:
        from crmsync.store.locks import claim_owner

        return claim_owner(app.store)
    return contextlib.nullcontext(f"0:{socket.gethostname()}:{os.getpid()}")


def _claim(app: App, conn: str, after_id: int, owner: str, *, shared: bool, have: Collection[str] = ()) -> list[_Row]:
    """Lease the next CHUNK pending rows that no live run holds.

    Under SQLite's run lock nobody else can hold a claim, so any claim found is a dead run's. On
    PostgreSQL a claim is free when its run has died (its advisory lock is gone) or its lease,
    renewed after every step, is older than LEASE. Payloads of the outcomes in ``have`` (already
    parsed) are not read.
    """
    t = CrmOutbox
    now = utcnow()
    with app.store.session() as s:
        q = select(t.id).where(t.connection == conn, t.state == "pending", t.id > after_id)  # type: ignore[operator]
        if shared:
            from crmsync.store.locks import dead_owners

            claimed = t.claimed_by.is_not(None)  # type: ignore[union-attr]
            owners = s.exec(select(t.claimed_by).where(t.connection == conn, t.state == "pending", claimed).distinct())
            dead = dead_owners(s, owners)
            free = or_(t.claimed_by.is_(None), t.claimed_by.in_(dead), t.claimed_at < now - LEASE)  # type: ignore[union-attr,operator]
            q = q.where(free)
        q = q.order_by(t.id).limit(SHARED_CHUNK if shared else CHUNK).with_for_update(skip_locked=True)  # type: ignore[arg-type]
        ids = list(s.exec(q))
        if not ids:
            return []
        s.execute(update(t).where(t.id.in_(ids)).values(claimed_by=owner, claimed_at=now))  # type: ignore[union-attr]
        return _read_rows(s, t.id.in_(ids), skip_payload=have)  # type: ignore[union-attr]


def _renew(app: App, items: list[_Item], owner: str) -> None:
    """Extend the lease of a chunk still being worked on (the rows' objects too: they are merged later)."""
    now = utcnow()
    ids = [it.row.id for it in items]
    with app.store.session() as s:
        s.execute(
            update(CrmOutbox).where(CrmOutbox.id.in_(ids), CrmOutbox.claimed_by == owner).values(claimed_at=now)  # type: ignore[union-attr]
        )
    for it in items:
        it.row.claimed_at = now


def _release(app: App, ids: list[int | None], owner: str) -> None:
    with app.store.session() as s:
        s.execute(
            update(CrmOutbox)
            .where(CrmOutbox.id.in_(ids), CrmOutbox.claimed_by == owner)  # type: ignore[union-attr]
            .values(claimed_by=None, claimed_at=None)
        )


def _count_pending(app: App, conn: str) -> int:
    from sqlalchemy import func

    with app.store.session() as s:
        return int(
            s.exec(
                select(func.count())
                .select_from(CrmOutbox)
                .where(CrmOutbox.connection == conn, CrmOutbox.state == "pending")
            ).one()
        )


def _parallel(
    provider: Provider, fn: Callable[[list[Any]], list[ItemResult]], batches: list[list[Any]]
) -> list[ItemResult]:
    """Send batches concurrently (the HttpClient's bucket keeps the CRM's pace)."""
    if len(batches) <= 1:
        return [r for b in batches for r in fn(b)]
    workers = max(1, min(len(batches), provider.http.concurrency))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="push") as pool:
        return [r for rs in pool.map(fn, batches) for r in rs]


def _deferred(fn: Callable[[str, list[Any]], list[ItemResult]], obj: str, batch: list[Any]) -> list[ItemResult]:
    """An activity write: it takes a rate-limit turn only when no entity write waits for one (``deferring``)."""
    from crmsync.http import deferring

    with deferring():
        return fn(obj, batch)


def _batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _entity_step(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    obj: str,
    items: list[_Item],
    summary: PushSummary,
    known: Known | None = None,
) -> None:
    """One entity type for a round: match (mirror, then the CRM), resolve conflicts, write, record.

    ``known`` holds the lane's keys already looked up in the CRM (see ``_Lookups``), or their future:
    the record found, or None for "not there".
    """
    by_key = _group_by_key(obj, items)
    if not by_key:
        return  # before waiting for the lookups: a lane with nothing to do here goes on at once
    if isinstance(known, Future):
        known = known.result()
    keys = list(by_key)
    mirror = app.store.mirror.find_by_keys(conn.name, obj, keys)
    unknown = [k for k in keys if k not in mirror]
    crm: dict[str, tuple[dict[str, Any], str, datetime | None]] = {
        k: (r.properties, r.remote_id, r.remote_updated_at) for k, r in mirror.items()
    }
    blind = _blind_keys(app, conn, provider, obj, unknown)
    looked = known or {}
    crm.update({k: v for k in unknown if (v := looked.get(k)) is not None})
    _lookup(app, conn, provider, mapping, obj, [k for k in unknown if k not in blind and k not in looked], crm)
    rules = app.config.conflict_rules()
    plan = _Plan()
    for k, its in by_key.items():
        _plan_key(mapping, obj, k, its, crm.get(k), rules, plan, summary, conn.name, create_only=k in blind)
    results: dict[str, ItemResult] = {}
    if plan.outgoing:
        for r in _parallel(provider, lambda b: provider.upsert(obj, b), _batches(plan.outgoing, provider.batch_size)):
            results[r.ref] = r
    unsure = [k for k, r in results.items() if r.exists or r.unconfirmed]
    for _ in range(CONFIRM_ROUNDS):
        if not unsure:
            break
        # Records the CRM already holds (someone else created them, or our own write whose answer
        # was lost): read them, apply the conflict rules, update. Those not there (a lost answer
        # before the write, a whole batch refused for a neighbour's key): created again.
        _lookup(app, conn, provider, mapping, obj, unsure, crm)
        again = _Plan()
        for k in unsure:
            del results[k]
            plan.merged.pop(k, None)
            _plan_key(mapping, obj, k, by_key[k], crm.get(k), rules, again, summary, conn.name, create_only=k in blind)
        for r in _parallel(provider, lambda b: provider.upsert(obj, b), _batches(again.outgoing, provider.batch_size)):
            results[r.ref] = r
        plan.resolved.update(again.resolved)
        plan.merged.update(again.merged)
        plan.conflicts.extend(again.conflicts)
        unsure = [o.ref for o in again.outgoing if (r := results.get(o.ref)) and (r.exists or r.unconfirmed)]
    if plan.outgoing:
        provider.flush(obj)
    for k, rid in plan.resolved.items():
        results[k] = ItemResult(k, True, remote_id=rid)
    _record_step(app, conn, obj, by_key, results, plan.merged, plan.conflicts, summary)


def _group_by_key(obj: str, items: list[_Item]) -> dict[str, list[_Item]]:
    """The items this step still has to do for ``obj``, by the record's match key."""
    by_key: dict[str, list[_Item]] = {}
    for it in items:
        if not it.failed and obj in it.canon and obj not in it.row.steps and (k := _item_key(it, obj)):
            by_key.setdefault(k, []).append(it)
    return by_key


def _blind_keys(app: App, conn: CrmConnection, provider: Provider, obj: str, unknown: list[str]) -> set[str]:
    """Keys the CRM keeps unique need no lookup: they are created blind, and only the ones the CRM
    reports as existing are looked up and merged under the conflict rules (see ``_entity_step``)."""
    if obj not in provider.optimistic_creates or not unknown:
        return set()
    linked = app.store.mirror.links(conn.name, obj, unknown)
    return {k for k in unknown if k.split(":", 1)[0] in ("email", "key") and k not in linked}


def _to_look_up(app: App, conn: CrmConnection, provider: Provider, obj: str, keys: list[str]) -> list[str]:
    """The keys of ``obj`` to ask the CRM for: not in the mirror, not created blind (``_blind_keys``)."""
    mirror = app.store.mirror.find_by_keys(conn.name, obj, keys)
    unknown = [k for k in keys if k not in mirror]
    blind = _blind_keys(app, conn, provider, obj, unknown)
    return [k for k in unknown if k not in blind]


def _lookups_for(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    items: list[_Item],
    obj: str,
    prefetched: dict[str, Future[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Look up a lane's unknown records of ``obj`` in the CRM before its writes start.

    Returns key -> (properties, remote id, updated at), or None when the CRM has none. Keys the
    mirror knows or that are created blind (``_blind_keys``) are not looked up. ``prefetched``:
    answers already asked for (``_Prefetch``).
    """
    keys = list(_group_by_key(obj, items))
    if not keys:
        return {}
    wanted = _to_look_up(app, conn, provider, obj, keys)
    crm: dict[str, tuple[dict[str, Any], str, datetime | None]] = {}
    _lookup(app, conn, provider, mapping, obj, wanted, crm, prefetched)
    return {k: crm.get(k) for k in wanted}


@dataclass
class _Plan:
    """What one entity step sends: outgoing writes, keys already right in the CRM, mirror rows, conflicts."""

    outgoing: list[Outgoing] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)
    merged: dict[str, dict[str, Any]] = field(default_factory=dict)
    conflicts: list[CrmConflict] = field(default_factory=list)


def _lookup(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    obj: str,
    keys: list[str],
    crm: dict[str, tuple[dict[str, Any], str, datetime | None]],
    prefetched: dict[str, Future[dict[str, Any]]] | None = None,
) -> None:
    """Find ``keys`` in the CRM (in parallel batches), mirror what is found, fill ``crm``.

    Keys in ``prefetched`` take their answer from there (each once: a later round asks again).
    """
    if not keys:
        return
    from crmsync.sync.pull import to_canonical

    found: dict[str, Any] = {}
    by_kind: dict[str, list[dict[str, str]]] = {}
    for k in keys:
        answer = prefetched.pop(k, None) if prefetched else None
        if answer is not None:
            try:
                if (rec := answer.result().get(k)) is not None:
                    found[k] = rec
                continue
            except Exception:  # failed or cancelled ahead: asked again below (its error, if any, the lane's)
                pass
        kind, value = k.split(":", 1)
        by_kind.setdefault(kind, []).append({kind: value})
    fields = mapping.provider_fields(obj)
    batches = [b for kind, ks in by_kind.items() for b in _batches(ks, provider.lookup_batch(obj, kind))]
    with ThreadPoolExecutor(max_workers=provider.http.concurrency, thread_name_prefix="lookup") as pool:
        for part in pool.map(lambda b: provider.lookup(obj, b, fields=fields), batches):
            found.update(part)
    if found:
        records = {rec.id: to_canonical(mapping, obj, rec) for rec in found.values()}
        app.store.mirror.apply_page(conn.name, obj, list(records.values()), cursor=None, audit=False)
        for k, rec in found.items():
            crm[k] = (records[rec.id].properties, rec.id, rec.updated_at)
    linked = app.store.mirror.links(conn.name, obj, [k for k in keys if k not in found])
    for k, rid in linked.items():
        crm[k] = ({}, rid, None)


def _plan_key(
    mapping: Mapping,
    obj: str,
    k: str,
    its: list[_Item],
    existing: tuple[dict[str, Any], str, datetime | None] | None,
    rules: dict[str, str],
    plan: _Plan,
    summary: PushSummary,
    connection: str,
    *,
    create_only: bool = False,
) -> None:
    """Merge the outcomes of one record (oldest first), resolve conflicts, and plan its write."""
    its.sort(key=lambda it: it.occurred_at)
    values: dict[str, Any] = {}
    for it in its:
        values.update({f: v for f, v in it.canon[obj].items() if v not in (None, "")})
    send, conflicts = resolve(
        obj,
        values,
        existing[0] if existing and existing[0] else None,
        rules=rules,
        occurred_at=its[-1].occurred_at,
        crm_updated_at=existing[2] if existing else None,
    )
    for c in conflicts:
        summary.field_conflicts += 1
        plan.conflicts.append(
            CrmConflict(
                connection=connection,
                object=obj,
                remote_id=existing[1] if existing else None,
                field=c.field,
                crm_value=_s(c.crm_value),
                outcome_value=_s(c.outcome_value),
                rule=c.rule,
                resolution=c.resolution,
                outcome_id=its[-1].row.outcome_id,
                open=c.resolution == "kept_crm",
            )
        )
    assoc = {}
    if obj == "contacts":
        assoc["companies"] = its[-1].row.steps.get("companies") or ""
    elif obj == "deals":
        assoc["contacts"] = its[-1].row.steps.get("contacts") or ""
        assoc["companies"] = its[-1].row.steps.get("companies") or ""
    assoc = {a: v for a, v in assoc.items() if v}
    if existing and not send and not assoc:
        plan.resolved[k] = existing[1]
        plan.merged[k] = {**(existing[0] or {}), **values} if existing[0] else values
        return
    if obj == "deals" and send:
        send.setdefault("key", values.get("key"))
    # An existing record with nothing to change still gets the links the outcome implies (no properties).
    props = mapping.to_provider(obj, send if existing else values) if send or not existing else {}
    plan.outgoing.append(
        Outgoing(
            ref=k,
            properties=props,
            match=dict([k.split(":", 1)]),
            remote_id=existing[1] if existing else None,
            associations=assoc,
            create_only=create_only and existing is None,
        )
    )
    plan.merged[k] = {**((existing[0] or {}) if existing else {}), **values}


def _s(value: Any) -> str | None:
    return None if value is None else str(value)[:500]


_ROW_FIELDS = (
    "steps",
    "in_flight",
    "state",
    "attempts",
    "last_error",
    "updated_at",
    "delivered_at",
    "claimed_by",
    "claimed_at",
)


def _save_rows(s: Any, rows: Iterable[_Row]) -> None:
    """Write the outbox rows' progress in one bulk UPDATE by primary key (not a SELECT+UPDATE per row)."""
    values = [{"id": r.id, **{f: getattr(r, f) for f in _ROW_FIELDS}} for r in rows]
    if values:
        update_rows(s, CrmOutbox.__table__, values)  # type: ignore[attr-defined]


def _record_step(
    app: App,
    conn: CrmConnection,
    obj: str,
    by_key: dict[str, list[_Item]],
    results: dict[str, ItemResult],
    merged: dict[str, dict[str, Any]],
    conflict_rows: list[CrmConflict],
    summary: PushSummary,
) -> None:
    """Commit a step: remote ids into the outbox rows, links and mirror records, conflicts."""
    from crmsync.sync.pull import record_keys

    links: dict[str, str] = {}
    mirror: list[Canonical] = []
    now = utcnow()
    for k, its in by_key.items():
        res = results.get(k)
        for it in its:
            if res is not None and res.ok and res.remote_id:
                it.row.steps = {**it.row.steps, obj: res.remote_id}
                if res.created:
                    it.created.add(obj)
            else:
                it.failed = True
                it.row.last_error = f"{obj}: {res.error if res else 'no result'}"
                it.row.attempts += 1
                if res is None or not res.retriable:
                    it.row.state = "failed"
            it.row.updated_at = now
        if res is not None and res.ok and res.remote_id:
            links[k] = res.remote_id
            props = merged.get(k) or {}
            mk, ak = record_keys(obj, props)
            mirror.append(
                Canonical(
                    remote_id=res.remote_id,
                    properties=props,
                    raw={},
                    remote_updated_at=None,
                    match_key=mk or k,
                    alt_key=ak,
                )
            )

    def write() -> None:
        with app.store.session() as s:
            _save_rows(s, (it.row for its in by_key.values() for it in its))
            app.store.mirror.save_links(conn.name, obj, links, session=s)
            for c in conflict_rows:
                s.add(c)
            app.store.mirror.merge_pushed(s, conn.name, obj, mirror)

    # Another worker may have just linked or mirrored the same company or contact (PostgreSQL).
    retry_on_conflict(write)


def _activity_step(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    obj: str,
    items: list[_Item],
    summary: PushSummary,
) -> None:
    """Create (or update) one activity type of a lane; never one the CRM already holds.

    The CRM, not the store, says whether a call was logged: rows sent before without a recorded
    answer are asked for by marker before anything is sent; where the CRM does not refuse a second
    activity with the same marker (``Provider.unique_markers``), so are the outcomes this store has
    no record of having sent, but those whose contact this run created (nothing can be logged on
    a contact that did not exist). A refused marker (``exists``) or a lost answer (``unconfirmed``)
    is looked up, and what is not there is sent again, within this run.
    """
    need = [it for it in items if not it.failed and obj in it.canon and obj not in it.row.steps]
    need = [it for it in need if it.row.steps.get("contacts")]
    if not need:
        return
    marker = (lambda it: it.row.outcome_id) if obj == "calls" else (lambda it: f"{it.row.outcome_id}:task")
    results: dict[str, ItemResult] = {}
    ask = [
        it
        for it in need
        if it.row.in_flight.get(obj) or (obj not in provider.unique_markers and "contacts" not in it.created)
    ]

    def outgoing(it: _Item) -> OutgoingActivity:
        return OutgoingActivity(
            ref=it.row.outcome_id,
            marker=marker(it),
            properties=mapping.to_provider(obj, it.canon[obj]),
            associations={a: it.row.steps[a] for a in ENTITY_STEPS if it.row.steps.get(a)},
        )

    if ask:
        found = provider.find_activities(obj, [marker(it) for it in ask], context=[outgoing(it) for it in ask])
        for it in ask:
            if (rid := found.get(marker(it))) is not None:
                # Sent by this store before (a killed run): ours. Never sent from here: someone else's.
                ours = bool(it.row.in_flight.get(obj))
                results[it.row.outcome_id] = ItemResult(it.row.outcome_id, True, remote_id=rid, created=ours)
    todo = [it for it in need if it.row.outcome_id not in results]
    updates = [it for it in todo if it.row.update_requested and (it.row.steps.get("previous") or {}).get(obj)]
    creates = [it for it in todo if it not in updates]
    for _ in range(CONFIRM_ROUNDS):
        if not creates:
            break
        now = utcnow().isoformat()
        for it in creates:
            it.row.in_flight = {**it.row.in_flight, obj: now}
        with app.store.session() as s:
            _save_rows(s, (it.row for it in creates))
        acts = [outgoing(it) for it in creates]
        send = lambda b: _deferred(provider.create_activities, obj, b)  # noqa: E731
        for r in _parallel(provider, send, _batches(acts, provider.batch_size)):
            results[r.ref] = r
        unsure = [
            it
            for it in creates
            if (r := results.get(it.row.outcome_id)) is not None and (r.exists or r.unconfirmed) and not r.ok
        ]
        creates = []
        if not unsure:
            break
        found = provider.find_activities(obj, [marker(it) for it in unsure], context=[outgoing(it) for it in unsure])
        for it in unsure:
            lost = results[it.row.outcome_id]
            if (rid := found.get(marker(it))) is not None:
                # After a lost answer, ours; refused as existing, someone else's.
                results[it.row.outcome_id] = ItemResult(
                    it.row.outcome_id, True, remote_id=rid, created=lost.unconfirmed
                )
            else:
                # Not there: the answer was lost before the write, or a whole batch was refused for
                # a neighbour's marker. Sent again (a CRM that refused it keeps refusing a real one).
                lost.retriable = True
                creates.append(it)
    if updates:
        outs = [
            Outgoing(
                ref=it.row.outcome_id,
                properties=mapping.to_provider(obj, it.canon[obj]),
                match={},
                remote_id=it.row.steps["previous"][obj],
            )
            for it in updates
        ]
        for r in _parallel(provider, lambda b: _deferred(provider.upsert, obj, b), _batches(outs, provider.batch_size)):
            results[r.ref] = r
    now_dt = utcnow()
    with app.store.session() as s:
        for it in need:
            res = results.get(it.row.outcome_id)
            if res is not None and res.ok and res.remote_id:
                it.row.steps = {**it.row.steps, obj: res.remote_id}
                it.row.in_flight = {k: v for k, v in it.row.in_flight.items() if k != obj}
                if not res.created and it not in updates:
                    it.already.add(obj)
                elif obj == "calls":
                    summary.writes += 1  # a call this push wrote (one found logged by another store is not)
            else:
                it.failed = True
                it.row.attempts += 1
                it.row.last_error = f"{obj}: {res.error if res else 'no result'}"
                if res is not None and not res.retriable:
                    # The CRM answered no: nothing was created, so nothing is in flight.
                    it.row.in_flight = {k: v for k, v in it.row.in_flight.items() if k != obj}
                    it.row.state = "failed"
            it.row.updated_at = now_dt
        _save_rows(s, (it.row for it in need))


def _settle(app: App, items: list[_Item], summary: PushSummary) -> list[Receipt]:
    """Close a lane's outcomes: done, failed or queued again, committed; their receipts to print after."""
    now = utcnow()
    receipts = []
    for it in items:
        row = it.row
        needed = [o for o in it.canon if o in (*ENTITY_STEPS, *ACTIVITY_STEPS)]
        complete = all(row.steps.get(o) for o in needed)
        if complete and not it.failed:
            row.state, row.delivered_at, row.last_error = "done", now, None
            activities = [o for o in needed if o in ACTIVITY_STEPS]
            if row.update_requested:
                status = "updated"
                summary.updated += 1
            elif activities and it.already >= set(activities):
                # Every activity of it was in the CRM already (logged from another store): nothing new.
                status = "already"
                row.steps = {**row.steps, "already": True}
                summary.already += 1
            else:
                status = "created"
                summary.created += 1
        else:
            if row.state != "failed" and row.attempts >= 5:
                row.state = "failed"
            status = "failed" if row.state == "failed" else "queued"
            if status == "failed":
                summary.failed += 1
            else:
                summary.requeued += 1
        row.updated_at = now
        row.claimed_by = row.claimed_at = None
        error = row.last_error if status not in ("created", "already") else None
        receipts.append(Receipt(row.outcome_id, status, remote_ids=_public_steps(row.steps), error=error))
    with app.store.session() as s:
        _save_rows(s, (it.row for it in items))
    return receipts


# -- receipts -----------------------------------------------------------------------------------
def receipt(app: App, connection: str | None, outcome_id: str) -> Receipt:
    """Was this call logged, and where? Answered from the store."""
    conn = app.connection(connection)
    with app.store.session() as s:
        row = s.exec(
            select(CrmOutbox).where(CrmOutbox.connection == conn.name, CrmOutbox.outcome_id == outcome_id)
        ).first()
    if row is None:
        raise UsageError(f"no outcome {outcome_id!r} was ever queued on connection {conn.name!r}")
    status = {"done": "created", "pending": "queued"}.get(row.state, row.state)
    if row.state == "done" and row.update_requested:
        status = "updated"
    elif row.state == "done" and row.steps.get("already"):
        status = "already"
    return Receipt(row.outcome_id, status, remote_ids=_public_steps(row.steps), error=row.last_error)
