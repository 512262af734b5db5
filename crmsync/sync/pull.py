"""Incremental pull and backfill: cursor -> pages -> canonical records -> store, one page at a time.

Each page is stored together with the cursor that follows it in one transaction
(``Mirror.apply_page``), so a crash or kill between pages loses nothing and repeats at most one
page. Memory stays flat: one page is in flight at a time.

Backfill is the same walk from the beginning, checkpointed under its own cursor kind so it
never disturbs the incremental cursor until it completes; then it seeds that cursor.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from crmsync.errors import AuthError, CrmsyncError, LockHeldError, RetriableError, StoreError
from crmsync.providers import usage
from crmsync.providers.base import Page, Provider, run_ahead
from crmsync.store import ApplyCounts, Store
from crmsync.sync.records import to_canonical
from crmsync.sync.run import Outcome, Run, run

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.store import CrmConnection

log = logging.getLogger("crmsync.pull")

PULL_CONCURRENCY = 4  # objects walked at once (contacts, companies, deals, calls)

Progress = Callable[[str, str, int, int | None], None]  # connection, object, records so far, total


@dataclass
class ObjectResult:
    object: str
    read: int = 0
    created: int = 0
    updated: int = 0
    archived: int = 0
    unchanged: int = 0
    failed: int = 0
    pages: int = 0
    associations_fixed: int = 0
    #: Records a reconcile by ids marked vanished; None when this run did not reconcile the object.
    reconciled: int | None = None
    error: str | None = None
    cursor: dict[str, Any] | None = None

    def add(self, counts: ApplyCounts, read: int) -> None:
        self.read += read
        self.created += counts.created
        self.updated += counts.updated
        self.archived += counts.archived
        self.unchanged += counts.unchanged
        self.pages += 1


@dataclass
class ConnectionResult:
    connection: str
    provider: str
    command: str
    objects: list[ObjectResult] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    duration: float = 0.0
    error: str | None = None
    events_applied: int = 0
    reconciled: int = 0
    outcome: Outcome = Outcome.OK
    #: The error that stopped the run (its message is ``error``); the CLI turns it into the exit code.
    failure: CrmsyncError | None = None

    @property
    def busy(self) -> bool:
        """Another run held the connection's lock: nothing was pulled."""
        return self.outcome is Outcome.BUSY

    def as_dict(self) -> dict[str, Any]:
        return {
            "connection": self.connection,
            "provider": self.provider,
            "command": self.command,
            "objects": {o.object: {k: v for k, v in o.__dict__.items() if k != "object"} for o in self.objects},
            "requests": self.requests,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "duration_seconds": round(self.duration, 3),
            "events_applied": self.events_applied,
            "reconciled": self.reconciled,
            "error": self.error,
            "outcome": self.outcome.value,
            "busy": self.busy,
        }


def _objects(provider: Provider, wanted: Sequence[str] | None) -> list[str]:
    if not wanted:
        return list(provider.objects)
    unknown = [o for o in wanted if o not in provider.objects]
    if unknown:
        from crmsync.errors import UsageError

        raise UsageError(
            f"{provider.label} cannot pull {', '.join(unknown)}; choose from {', '.join(provider.objects)}"
        )
    return list(wanted)


def pull(
    app: App,
    *,
    connections: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
    since: datetime | None = None,
    full: bool = False,
    reconcile: bool = False,
    lock_timeout: float | None = None,
    progress: Progress | None = None,
) -> list[ConnectionResult]:
    """Pull every named (or configured) connection; one result per connection.

    A connection whose lock another run holds is skipped (its result ``busy``) and the others are
    pulled; only when every one is busy does ``LockHeldError`` stop the pull.
    """
    results = []
    busy: list[LockHeldError] = []
    for conn in app.connections(list(connections) if connections else None):
        try:
            result = _run(
                app,
                conn,
                "pull",
                lock_timeout=lock_timeout,
                body=lambda res, provider, mapping, run_id, conn=conn: _pull_connection(
                    app,
                    conn,
                    provider,
                    mapping,
                    res,
                    run_id,
                    objects=objects,
                    since=since,
                    full=full,
                    reconcile=reconcile,
                    progress=progress,
                ),
            )
        except LockHeldError as exc:
            busy.append(exc)
            result = ConnectionResult(conn.name, conn.provider, "pull", error=str(exc), outcome=Outcome.BUSY)
            result.failure = exc
        results.append(result)
    if len(busy) == len(results) == 1:
        raise busy[0]
    if len(busy) == len(results):
        raise LockHeldError("every connection is busy: " + "; ".join(e.message for e in busy), hint=busy[0].hint)
    return results


def backfill(
    app: App,
    *,
    connection: str | None = None,
    objects: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    lock_timeout: float | None = None,
    progress: Progress | None = None,
) -> ConnectionResult:
    """Import the full history (resumable); on completion seed the incremental cursor."""
    conn = app.connection(connection)
    return _run(
        app,
        conn,
        "backfill",
        lock_timeout=lock_timeout,
        body=lambda res, provider, mapping, run_id: _backfill_connection(
            app, conn, provider, mapping, res, run_id, objects=objects, since=since, until=until, progress=progress
        ),
    )


def _run(
    app: App, conn: CrmConnection, command: str, *, lock_timeout: float | None, body: Callable[..., None]
) -> ConnectionResult:
    """One pull or backfill of a connection through the shared run lifecycle (``sync.run``)."""
    res = ConnectionResult(connection=conn.name, provider=conn.provider, command=command)

    def step(r: Run) -> None:
        body(res, r.provider, r.mapping, r.run_id)

    def settle(r: Run) -> None:
        if any(o.error for o in res.objects):
            r.mark(Outcome.PARTIAL)
        r.counts = {
            o.object: {k: v for k, v in o.__dict__.items() if k not in ("object", "cursor")} for o in res.objects
        }
        if r.provider is not None:
            r.counts["_quota"] = r.provider.quota()
            r.counts.update(usage.recorded(r.provider))
        r.records = {
            o.object: {k: getattr(o, k) for k in ("created", "updated", "archived", "unchanged", "failed")}
            for o in res.objects
        }

    r = run(app, conn, command, step, lock_timeout=lock_timeout, settle=settle)
    res.outcome, res.failure = r.outcome, r.failure
    res.requests, res.retries, res.rate_limited = r.stats["requests"], r.stats["retries"], r.stats["rate_limited"]
    res.error = res.error or r.error
    res.duration = r.duration
    return res


def ingest_pages(
    store: Store,
    connection: str,
    mapping: Mapping,
    obj: str,
    pages: Iterable[Page],
    *,
    run_id: int | None,
    cursor_kind: str = "incremental",
    cancel: threading.Event | None = None,
) -> Iterator[tuple[Page, ApplyCounts, int]]:
    """Map and store pages in order, each page with its cursor in one transaction.

    The next page is fetched in a second thread while this one is mapped and written (network and
    CPU overlap). Mapping stays in this thread: moved to the fetching thread it measured 10 % slower,
    the two threads contending for the GIL. Yields, per page, (page, what was stored, records read).
    ``benchmarks/`` measures local ingest through here.
    """
    for page in _prefetched(pages):
        if cancel is not None and cancel.is_set():
            break  # another object's walk failed for good or the user interrupted: stop at a page boundary
        problems: list[str] = []
        records = [to_canonical(mapping, obj, r, problems) for r in page.records]
        for problem in problems[:5]:
            log.warning("unconvertible value kept raw only: %s", problem)
        counts = store.mirror.apply_page(
            connection, obj, records, cursor=page.cursor, cursor_kind=cursor_kind, deleted=page.deleted, run_id=run_id
        )
        yield page, counts, len(records)


def _apply_pages(
    app: App,
    conn: CrmConnection,
    mapping: Mapping,
    obj: str,
    pages: Any,
    out: ObjectResult,
    run_id: int,
    *,
    cursor_kind: str = "incremental",
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Page | None:
    last: Page | None = None
    total: int | None = None
    for page, counts, read in ingest_pages(
        app.store, conn.name, mapping, obj, pages, run_id=run_id, cursor_kind=cursor_kind, cancel=cancel
    ):
        out.add(counts, read)
        if page.cursor is not None:
            out.cursor = page.cursor
        total = page.total if page.total is not None else total
        if progress:
            progress(conn.name, obj, out.read, total)
        last = page
    return last


def _pull_connection(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    res: ConnectionResult,
    run_id: int,
    *,
    objects: Sequence[str] | None,
    since: datetime | None,
    full: bool,
    reconcile: bool,
    progress: Progress | None,
) -> None:
    objs = _objects(provider, objects)
    from crmsync.sync.events import apply_pending_events

    res.events_applied = apply_pending_events(app, conn, provider, mapping, run_id, objects=objs, convert=to_canonical)
    counting = threading.Lock()  # the objects' walks run in threads of their own

    def one(obj: str, out: ObjectResult, cancel: threading.Event) -> None:
        cursor = None if (full or since) else app.store.mirror.cursor(conn.name, obj)
        try:
            pages = provider.changes(obj, cursor, fields=mapping.provider_fields(obj), since=since)
            _apply_pages(app, conn, mapping, obj, pages, out, run_id, progress=progress, cancel=cancel)
            if reconcile and not cancel.is_set():
                live: set[str] = set()
                for ids in provider.list_ids(obj):
                    live.update(ids)
                    links = provider.read_associations(obj, ids)
                    if links:
                        out.associations_fixed += app.store.mirror.update_associations(
                            conn.name, obj, links, run_id=run_id
                        )
                vanished = app.store.mirror.mark_missing(conn.name, obj, live, run_id=run_id)
                with counting:
                    res.reconciled += vanished
                    out.reconciled = vanished
        except (RetriableError, AuthError, StoreError):
            raise  # the whole connection stops; the cursor stays at the last good page
        except CrmsyncError as exc:
            out.error = str(exc)
            out.failed += 1
            log.warning("pull %s %s failed: %s", conn.name, obj, exc)

    _each_object(app, res, objs, one, meanwhile=mapping.warm)


def _each_object(
    app: App,
    res: ConnectionResult,
    objs: Sequence[str],
    walk: Callable[[str, ObjectResult, threading.Event], None],
    meanwhile: Callable[[], None] | None = None,
) -> None:
    """Walk the objects concurrently (each has its own cursor; the HttpClient keeps the CRM's pace).

    A pull is a chain of dependent page requests per object, so one object at a time leaves the
    rate limit mostly unused. A failure that stops the connection (auth, rate limit past the
    deadline) or Ctrl-C tells the other walks to stop at their next page boundary.
    """
    outs = [ObjectResult(obj) for obj in objs]
    res.objects.extend(outs)
    cancel = threading.Event()
    workers = min(len(objs), PULL_CONCURRENCY) if app.store.concurrent_writers else 1
    if workers <= 1:
        for obj, out in zip(objs, outs, strict=True):
            walk(obj, out, cancel)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull") as pool:
        futures = [pool.submit(walk, obj, out, cancel) for obj, out in zip(objs, outs, strict=True)]
        first: BaseException | None = None
        try:
            if meanwhile is not None:
                meanwhile()  # while the first requests are in flight
            for future in futures:
                try:
                    future.result()
                except BaseException as exc:  # re-raised below once every walk has stopped
                    cancel.set()
                    first = first or exc
        except BaseException:  # Ctrl-C while waiting: let the walks stop at a page boundary, then go
            cancel.set()
            raise
    if first is not None:
        raise first


def _backfill_connection(
    app: App,
    conn: CrmConnection,
    provider: Provider,
    mapping: Mapping,
    res: ConnectionResult,
    run_id: int,
    *,
    objects: Sequence[str] | None,
    since: datetime | None,
    until: datetime | None,
    progress: Progress | None,
) -> None:
    def one(obj: str, out: ObjectResult, cancel: threading.Event) -> None:
        checkpoint = app.store.mirror.cursor(conn.name, obj, "backfill")
        pages = provider.changes(obj, checkpoint, fields=mapping.provider_fields(obj), since=since, until=until)
        try:
            _apply_pages(
                app, conn, mapping, obj, pages, out, run_id, cursor_kind="backfill", progress=progress, cancel=cancel
            )
        except CrmsyncError as exc:
            if isinstance(exc, (RetriableError, AuthError, StoreError)):
                raise
            out.error = str(exc)
            return
        if cancel.is_set():
            return
        final = app.store.mirror.cursor(conn.name, obj, "backfill")
        if final is not None and until is None:
            # Seed the incremental cursor and drop the checkpoint in one transaction.
            app.store.mirror.apply_page(
                conn.name, obj, [], cursor=final, cursor_kind="incremental", extra_cursors=[("backfill", None)]
            )
        elif final is not None:
            app.store.mirror.set_cursor(conn.name, obj, None, "backfill")
        out.cursor = final

    _each_object(app, res, _objects(provider, objects), one, meanwhile=mapping.warm)


def _prefetched(pages: Iterable[Page], depth: int = 2) -> Iterator[Page]:
    """Fetch the next page while the caller stores this one: network and CPU overlap.

    At most ``depth`` pages wait beyond the one being stored, so memory stays flat. Two, not one:
    with one, the request for page n+3 waited until page n was stored, and a keyset walk (each
    page's query needs the previous page's last row) stalled 20-60 ms per page behind the store. Pages still
    reach the caller in order, and a page's cursor is stored only with that page, so resuming
    after a kill is unchanged. An error in fetching surfaces at the page where it happened.
    """
    return run_ahead(pages, depth, name="pull-prefetch")
