"""Input -> outbox: validate outcomes, queue the valid ones in one transaction, say what each is.

An outcome of the input is new, unchanged, failed before, an update or a conflict by one rule
(``verdict``), which the dry run applies too, so a dry run shows what the push would do.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from crmsync.errors import InputError
from crmsync.model import CallOutcome, canonical, utcnow
from crmsync.store.outbox import Outbox, Prior, digest_and_payload
from crmsync.sync.inputs import Parsed, read_outcomes
from crmsync.sync.push.items import ParsedOutcome, public_steps
from crmsync.sync.push.receipts import PushSummary, Receipt, ReceiptSink
from crmsync.sync.push.settings import DEFAULT, PushSettings

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from crmsync.app import App

#: Why an outcome is a conflict (``verdict``), in its receipt.
CONFLICT = "this id was already sent with different content; use --update to send the change"

#: Told the canonical records of a queued part's outcomes (their lookups can start).
OnQueued = Callable[[list[dict[str, dict[str, Any]]]], None]


def spooled(source: str) -> tuple[str, Callable[[], None]]:
    """stdin can be read once; --strict reads twice, so spool it to disk (never to memory)."""
    if source != "-":
        return source, lambda: None
    fd, path = tempfile.mkstemp(prefix="crmsync-push-", suffix=".in")
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
    return path, lambda: os.unlink(path)


def write_reject(handle: TextIO, parsed: Parsed) -> None:
    """One invalid record, with its line and why, as a line of the --rejects file."""
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


def chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``it`` in lists of ``size`` (the last one shorter)."""
    batch: list[Any] = []
    for item in it:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def valid_outcomes(
    chunk: list[Parsed], summary: PushSummary, rejects: TextIO | None, sink: ReceiptSink | None
) -> list[tuple[Parsed, CallOutcome]]:
    """The valid outcomes of a part of the input; the invalid ones counted, written to --rejects, receipted."""
    valid: list[tuple[Parsed, CallOutcome]] = []
    for p in chunk:
        summary.read += 1
        if p.error is not None or p.outcome is None:
            summary.rejected += 1
            if rejects is not None:
                write_reject(rejects, p)
            if sink:
                sink(Receipt(None, "rejected", error=str(p.error), line=p.line))
            continue
        valid.append((p, p.outcome))
    summary.valid += len(valid)
    return valid


def verdict(oid: str, digest: str, prior: Any, seen: dict[str, str], *, update: bool, retry_failed: bool) -> str:
    """What an outcome of the input is to the outbox: new, unchanged, failed (its delivery failed
    before), retry (that, with --retry-failed), update or conflict.

    ``prior`` is the outbox row under its id (its ``content_hash`` and ``state``), if any; ``seen``
    the ids this input queued so far (with their hashes), which a new, retried or updated outcome
    joins.
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


def failed_before(prior: Any) -> str:
    """Why an outcome fed again is failed again (``verdict``): its outbox row's last error."""
    return f"{prior.last_error or 'failed'} (sent again only with --retry-failed)"


@dataclass
class Hooks:
    """What ``enqueue`` tells its caller while it reads (see ``enqueue``)."""

    parsed_out: dict[str, ParsedOutcome] | None = None
    on_objects: Callable[[set[str]], None] | None = None
    on_queued: OnQueued | None = None
    on_ids: Callable[[list[str]], None] | None = None


@dataclass
class _Part:
    """One part of the input on its way into the outbox."""

    new_rows: list[dict[str, Any]] = field(default_factory=list)
    objects: set[str] = field(default_factory=set)
    kept: list[dict[str, dict[str, Any]]] = field(default_factory=list)


class _Intake:
    """One enqueue: the input's parts queued in one transaction, each outcome by its ``verdict``."""

    def __init__(
        self,
        outbox: Outbox,
        connection_name: str,
        summary: PushSummary,
        *,
        update: bool,
        retry_failed: bool,
        sink: ReceiptSink | None,
        hooks: Hooks,
        settings: PushSettings,
    ) -> None:
        self.outbox, self.connection_name, self.summary = outbox, connection_name, summary
        self.update, self.retry_failed, self.sink, self.hooks = update, retry_failed, sink, hooks
        self.settings = settings
        self.seen: dict[str, str] = {}
        self.objects: set[str] = set()
        #: False when the connection's outbox was empty at the start: no id of the input can be there.
        self.priors = True

    def queue(self, db: Connection, valid: list[tuple[Parsed, CallOutcome]]) -> None:
        ids = [o.id for _, o in valid]
        if self.hooks.on_ids is not None:
            self.hooks.on_ids([i for i in ids if i])
        existing = self.outbox.priors(db, self.connection_name, ids) if self.priors else {}
        part = _Part()
        now = utcnow()
        for p, outcome in valid:
            self._one(db, p, outcome, existing.get(str(outcome.id)), part, now)
        self.outbox.insert(db, part.new_rows)
        if self.hooks.on_objects is not None and not part.objects <= self.objects:
            self.objects |= part.objects
            self.hooks.on_objects(set(self.objects))
        if self.hooks.on_queued is not None and part.kept:
            self.hooks.on_queued(part.kept)

    def _one(
        self, db: Connection, p: Parsed, outcome: CallOutcome, prior: Prior | None, part: _Part, now: datetime
    ) -> None:
        s, oid = self.summary, str(outcome.id)
        dumped = outcome.model_dump(mode="json")
        digest, payload = digest_and_payload(dumped)
        kind = verdict(oid, digest, prior, self.seen, update=self.update, retry_failed=self.retry_failed)
        if kind == "new":
            self._keep(oid, outcome, part, dumped)
            part.new_rows.append(self.outbox.new_row(self.connection_name, oid, digest, payload, now))
            s.queued += 1
        elif kind == "retry":
            s.queued += 1
        elif kind == "failed":
            # Fed again but not in the CRM: a re-run must not pass it off as sent (exit 0).
            s.failed += 1
            if self.sink and prior is not None:
                remote_ids = public_steps(prior.steps)
                self.sink(Receipt(oid, "failed", remote_ids=remote_ids, error=failed_before(prior), line=p.line))
        elif kind == "unchanged":
            s.already += 1
            if self.sink and prior is not None and prior.state == "done":
                self.sink(Receipt(oid, "unchanged", remote_ids=public_steps(prior.steps), line=p.line))
        elif kind == "update" and prior is not None:
            self._keep(oid, outcome, part, dumped)
            previous = public_steps(prior.steps)
            self.outbox.requeue_update(db, prior.id, payload=dumped, digest=digest, previous=previous, now=now)
            s.queued += 1
        else:
            s.conflicts += 1
            if self.sink:
                self.sink(Receipt(oid, "conflict", error=CONFLICT, line=p.line))

    def _keep(self, oid: str, outcome: CallOutcome, part: _Part, dumped: dict[str, Any]) -> None:
        """Hand a queued outcome (as written to its row) to delivery's first round, parsed."""
        parsed_out = self.hooks.parsed_out
        if parsed_out is not None and len(parsed_out) < self.settings.round_size:
            canon = canonical(outcome, dumped)
            parsed_out[oid] = (outcome.occurred_at, canon)
            if canon:
                part.objects.update(canon)
                part.kept.append(canon)


def enqueue(
    app: App,
    connection_name: str,
    parsed: Iterable[Parsed],
    summary: PushSummary,
    *,
    update: bool,
    rejects: TextIO | None,
    sink: ReceiptSink | None,
    hooks: Hooks | None = None,
    retry_failed: bool = False,
    settings: PushSettings = DEFAULT,
) -> None:
    """Queue every valid outcome in ONE transaction; report duplicates, conflicts and rejects.

    An outcome fed again whose delivery failed counts as failed again, unless ``retry_failed``
    (then it is queued again: ``Outbox.reset_failed``).

    ``hooks``: ``on_ids`` is told the ids of each part's valid outcomes (what this input holds).
    ``parsed_out`` receives the first round's worth of queued outcomes with their canonical
    records, so that delivery's first round need not parse again what was just parsed.
    ``on_objects`` is told, after each part of the input, the object types of the outcomes queued
    so far (when that set grew), so that what delivery needs of the CRM can be prepared while the
    rest is read; ``on_queued`` gets that part's outcomes kept in ``parsed_out`` (their canonical
    records), so that their lookups can start (``Prefetch``).
    """
    outbox = Outbox(app.store)
    intake = _Intake(
        outbox,
        connection_name,
        summary,
        update=update,
        retry_failed=retry_failed,
        sink=sink,
        hooks=hooks or Hooks(),
        settings=settings,
    )
    with outbox.transaction() as db:
        if outbox.shared:
            from crmsync.store.locks import transaction_lock

            # Concurrent pushes of one connection queue one after another, so each sees what the
            # other queued (and no unique-key race can fail a whole file).
            transaction_lock(db, connection_name, "enqueue")
        else:
            # One push per connection at a time (the run lock): what is not there now cannot appear.
            intake.priors = outbox.has_rows(db, connection_name)
        for chunk in chunks(parsed, settings.enqueue_chunk):
            intake.queue(db, valid_outcomes(chunk, summary, rejects, sink))
