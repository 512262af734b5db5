"""The dry run: what a push would do per outcome, from the local mirror; no CRM request, no outbox write."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crmsync.model import CallOutcome, canonical
from crmsync.store.outbox import Outbox
from crmsync.sync.conflicts import Conflict, resolve
from crmsync.sync.inputs import Parsed
from crmsync.sync.push.intake import CONFLICT, chunks, failed_before, valid_outcomes, verdict
from crmsync.sync.push.items import ACTIVITY_STEPS, ENTITY_STEPS, entity_key
from crmsync.sync.push.receipts import PushSummary, Receipt, ReceiptSink
from crmsync.sync.push.settings import DEFAULT, PushSettings

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.store import CrmConnection, CrmOutbox, CrmRecord


def dry_run(
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
    settings: PushSettings = DEFAULT,
) -> None:
    """The plan per outcome from the local mirror: no CRM request, no outbox write.

    An outcome is new, unchanged, failed before, an update or a conflict by the rule enqueue applies
    (``verdict``); a record in the mirror whose values the outcome contradicts is a conflict, as
    delivery records it (``resolve``). ``mapping`` is the connection's (kept for the callers' sake:
    the plan compares canonical values).
    """
    planner = _Planner(app, conn, summary, sink, update=update, retry_failed=retry_failed)
    reject_handle = open(rejects, "w", encoding="utf-8") if rejects else None  # noqa: SIM115
    try:
        for chunk in chunks(parsed, settings.enqueue_chunk):
            planner.plan_part(valid_outcomes(chunk, summary, reject_handle, sink))
    finally:
        if reject_handle:
            reject_handle.close()
    summary.plan_counts = planner.counts


class _Planner:
    """One dry run: each part of the input planned against the mirror, the links and the outbox."""

    def __init__(
        self,
        app: App,
        conn: CrmConnection,
        summary: PushSummary,
        sink: ReceiptSink | None,
        *,
        update: bool,
        retry_failed: bool,
    ) -> None:
        self.app, self.conn, self.summary, self.sink = app, conn, summary, sink
        self.update, self.retry_failed = update, retry_failed
        self.rules = app.config.conflict_rules()
        self.counts: dict[str, dict[str, int]] = {}
        self.seen: dict[str, str] = {}
        self.mirror: dict[str, dict[str, CrmRecord]] = {}
        self.links: dict[str, dict[str, str]] = {}

    def plan_part(self, good: list[tuple[Parsed, CallOutcome]]) -> None:
        store, name = self.app.store, self.conn.name
        canon = [(p, o, canonical(o)) for p, o in good]
        keys: dict[str, set[str]] = {o: set() for o in ENTITY_STEPS}
        for _, _, c in canon:
            for obj in ENTITY_STEPS:
                if k := entity_key(obj, c):
                    keys[obj].add(k)
        self.mirror = {obj: store.mirror.find_by_keys(name, obj, ks) for obj, ks in keys.items()}
        self.links = {obj: store.mirror.links(name, obj, ks) for obj, ks in keys.items()}
        outbox = Outbox(store).rows(name, [str(o.id) for _, o in good])
        for p, outcome, c in canon:
            planned = self._outcome(p, outcome, c, outbox.get(str(outcome.id)))
            if self.sink:
                self.sink(planned)

    def _outcome(
        self, p: Parsed, outcome: CallOutcome, c: dict[str, dict[str, Any]], prior: CrmOutbox | None
    ) -> Receipt:
        oid = str(outcome.id)
        kind = verdict(
            oid, outcome.content_hash(), prior, self.seen, update=self.update, retry_failed=self.retry_failed
        )
        steps: dict[str, str] = {}
        disagreements: list[str] = []
        for obj in (*ENTITY_STEPS, *ACTIVITY_STEPS):
            if obj not in c:
                continue
            action = self._action(obj, kind, prior, c, outcome.occurred_at, disagreements)
            steps[obj] = action
            self.counts.setdefault(obj, {}).setdefault(action, 0)
            self.counts[obj][action] += 1
        if kind == "conflict":
            self.summary.conflicts += 1
            return Receipt(oid, "conflict", error=CONFLICT, line=p.line, plan=steps)
        if kind == "failed" and prior is not None:
            self.summary.failed += 1
            return Receipt(oid, "failed", error=failed_before(prior), line=p.line, plan=steps)
        return Receipt(oid, "planned", line=p.line, plan=steps, error="; ".join(disagreements) or None)

    def _action(
        self,
        obj: str,
        kind: str,
        prior: CrmOutbox | None,
        c: dict[str, dict[str, Any]],
        occurred_at: datetime,
        disagreements: list[str],
    ) -> str:
        """What the push would do with the outcome's record of ``obj``."""
        if kind in ("unchanged", "failed", "conflict"):
            return "conflict" if kind == "conflict" else "skip"
        if obj in ACTIVITY_STEPS:
            sent = kind == "update" and prior is not None and (prior.steps or {}).get(obj)
            return "update" if sent else "create"
        k = entity_key(obj, c)
        rec = self.mirror[obj].get(k) if k else None
        if rec is None:
            return "match" if k and k in self.links[obj] else "create"
        send, conflicts = resolve(
            obj,
            c[obj],
            rec.properties,
            rules=self.rules,
            occurred_at=occurred_at,
            crm_updated_at=rec.remote_updated_at,
        )
        self.summary.field_conflicts += len(conflicts)
        disagreements += [disagreement(obj, x) for x in conflicts]
        # As status counts them: a conflict stays open where the CRM's value is kept.
        if any(x.resolution == "kept_crm" for x in conflicts):
            return "conflict"
        return "update" if send else "match"


def disagreement(obj: str, c: Conflict) -> str:
    """One field conflict as a dry run reports it."""
    kept = "the CRM's value stays" if c.resolution == "kept_crm" else "the outcome's is sent"
    return f"{obj}.{c.field}: the CRM has {c.crm_value!r}, the outcome {c.outcome_value!r} ({c.rule}: {kept})"
