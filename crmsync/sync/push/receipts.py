"""What a push reports: one ``Receipt`` per outcome, the run's ``PushSummary``, and ``receipt``
(was this call logged, and where? from the store)."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from crmsync.errors import CrmsyncError, UsageError
from crmsync.store.outbox import Outbox
from crmsync.sync.push.items import public_steps
from crmsync.sync.run import Outcome

if TYPE_CHECKING:
    from crmsync.app import App


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


ReceiptSink = Callable[[Receipt], None]


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
    #: How the run ended; with ``failure``, the error that stopped it (the CLI maps both to the exit code).
    outcome: Outcome = Outcome.OK
    failure: CrmsyncError | None = field(default=None, repr=False)
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
        d.pop("failure")  # its message is ``error``
        d["outcome"] = self.outcome.value
        d["duration_seconds"] = round(d.pop("duration"), 3)
        if not self.dry_run:
            d.pop("plan_counts")
        return d

    def has_failures(self) -> bool:
        """Whether some outcome of the run was rejected, failed or conflicted (the run is partial)."""
        return bool(self.failed or self.rejected or self.conflicts or self.backlog.get("failed"))


#: Reasons of each kind kept for the default output.
REASONS_SHOWN = 5


class Tally:
    """Every receipt of a run passes here on its way to the caller's sink: the first few reasons
    are kept for the summary, and outcomes that an earlier run queued (``backlog``, their ids) are
    counted apart."""

    def __init__(self, summary: PushSummary, sink: ReceiptSink | None, backlog: Collection[str] = ()) -> None:
        self.summary, self.sink, self.backlog = summary, sink, set(backlog)

    def in_input(self, ids: list[str]) -> None:
        """Outcomes of this input are not a backlog, even if an earlier run queued them (--retry-failed)."""
        self.backlog.difference_update(ids)

    def __call__(self, r: Receipt) -> None:
        self._keep_reason(r)
        s = self.summary
        if r.id in self.backlog and r.status in ("created", "updated", "already", "failed", "queued"):
            s.backlog[r.status] = s.backlog.get(r.status, 0) + 1
        if self.sink is not None:
            self.sink(r)

    def _keep_reason(self, r: Receipt) -> None:
        s = self.summary
        if r.status == "rejected" and len(s.reject_reasons) < REASONS_SHOWN:
            s.reject_reasons.append(str(r.error))
        elif r.status == "conflict" and r.id and len(s.conflict_ids) < REASONS_SHOWN:
            s.conflict_ids.append(r.id)
        elif r.status == "planned" and r.error and len(s.disagreements) < REASONS_SHOWN:
            s.disagreements.append(f"{r.id}: {r.error}")
        elif r.status == "failed" and r.error:
            reason = readable(r.error)
            if reason in s.failure_reasons or len(s.failure_reasons) < REASONS_SHOWN:
                s.failure_reasons[reason] = s.failure_reasons.get(reason, 0) + 1

    def split_backlog(self) -> None:
        """Take what the backlog's outcomes added to the run's counts out of this input's."""
        s = self.summary
        for status, n in s.backlog.items():
            name = "requeued" if status == "queued" else status
            setattr(s, name, getattr(s, name) - n)


def readable(error: str) -> str:
    """An item's error with the messages of a JSON error list it quotes pulled out (HubSpot's
    \"Property values were not valid: [{... "message": ...}]\")."""
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


def receipt(app: App, connection: str | None, outcome_id: str) -> Receipt:
    """Was this call logged, and where? Answered from the store."""
    conn = app.connection(connection)
    row = Outbox(app.store).row(conn.name, outcome_id)
    if row is None:
        raise UsageError(f"no outcome {outcome_id!r} was ever queued on connection {conn.name!r}")
    status = {"done": "created", "pending": "queued"}.get(row.state, row.state)
    if row.state == "done" and row.update_requested:
        status = "updated"
    elif row.state == "done" and row.steps.get("already"):
        status = "already"
    return Receipt(row.outcome_id, status, remote_ids=public_steps(row.steps), error=row.last_error)
