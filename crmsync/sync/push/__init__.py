"""Push: call outcomes -> validation -> outbox -> batched, resumable delivery -> receipts.

Exactly-once rests on three things:

1. the outbox is keyed by (connection, outcome id): feeding an outcome again queues nothing
   (``intake``);
2. each outcome is a chain of steps (company -> contact -> deal -> call -> task) and each step's
   remote id is committed as soon as its batch answers, so a retry resumes at the failed step;
   contacts, companies and deals are matched or upserted by natural or unique keys, so re-sending
   them cannot duplicate (``steps``);
3. the CRM, not the store, says whether a call or task was logged: each carries an idempotency
   marker, and a row in flight or a write whose answer was lost is looked up by marker before
   anything is sent again (``confirm``).

The modules, in the order a push meets them: ``command`` (the run), ``intake`` (input -> outbox),
``lookahead`` (work started while the input is read), ``rounds`` (claimed rows, one round at a
time), ``lanes`` (a round's lanes side by side), ``lookups``, ``steps``, ``confirm``, ``owners``,
``receipts``; ``dry_run`` plans without sending; ``settings`` holds the tuning knobs. The outbox's
SQL is in ``crmsync.store.outbox``.
"""

from __future__ import annotations

from crmsync.sync.push.command import push
from crmsync.sync.push.dry_run import dry_run
from crmsync.sync.push.intake import enqueue, validate_all
from crmsync.sync.push.items import ACTIVITY_STEPS, ENTITY_STEPS
from crmsync.sync.push.receipts import PushSummary, Receipt, ReceiptSink, receipt
from crmsync.sync.push.rounds import deliver
from crmsync.sync.push.settings import PushSettings

__all__ = [
    "ACTIVITY_STEPS",
    "ENTITY_STEPS",
    "PushSettings",
    "PushSummary",
    "Receipt",
    "ReceiptSink",
    "deliver",
    "dry_run",
    "enqueue",
    "push",
    "receipt",
    "validate_all",
]
