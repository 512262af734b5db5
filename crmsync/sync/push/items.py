"""One outcome as delivery holds it (``Item``), its steps and the match keys of its records."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from crmsync.model import CallOutcome, canonical, company_key, contact_key
from crmsync.providers.base import match_key
from crmsync.store.outbox import OutboxRow

#: Records matched or upserted by key, in the order an outcome's chain takes them.
ENTITY_STEPS = ("companies", "contacts", "deals")
#: Records created once per outcome, with an idempotency marker.
ACTIVITY_STEPS = ("calls", "tasks")

#: An outcome as delivery needs it: when the call happened and its canonical records.
ParsedOutcome = tuple[datetime, dict[str, dict[str, Any]]]


@dataclass
class Item:
    """One outcome being delivered: its outbox row, when the call happened, its canonical records.

    Not the parsed outcome itself: a round holds thousands of these, and the pydantic models were a
    large part of a round's memory.
    """

    row: OutboxRow
    occurred_at: datetime
    canon: dict[str, dict[str, Any]]
    failed: bool = False
    #: Match keys by object, worked out once (``item_key``): lanes, lookups and steps all ask.
    keys: dict[str, str | None] = field(default_factory=dict)
    #: Objects whose record this run created (not matched): nothing can be logged on a new contact.
    created: set[str] = field(default_factory=set)
    #: Activities the CRM already held, logged by someone else's run (a lost store, another machine).
    already: set[str] = field(default_factory=set)


def entity_key(obj: str, canon: dict[str, dict[str, Any]]) -> str | None:
    """The match key of an outcome's record of ``obj`` (``kind:value``), or None when it has none."""
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


def item_key(it: Item, obj: str) -> str | None:
    """``entity_key`` of an outcome being delivered, remembered on it (its records do not change)."""
    try:
        return it.keys[obj]
    except KeyError:
        key = it.keys[obj] = entity_key(obj, it.canon)
        return key


def parse_row(row: OutboxRow, parsed: dict[str, ParsedOutcome] | None = None) -> Item:
    """The item of a claimed row: from ``parsed`` when intake parsed it in this run, else its payload."""
    if parsed and (done := parsed.get(row.outcome_id)) is not None:
        item = Item(row, *done)
    else:
        outcome = CallOutcome.model_validate(row.payload)
        item = Item(row, outcome.occurred_at, canonical(outcome))
    row.payload = None  # parsed, it is not read again (progress is saved column by column)
    return item


def public_steps(steps: dict[str, Any]) -> dict[str, str]:
    """The remote ids a receipt shows: one per record written, no bookkeeping keys."""
    return {k: str(v) for k, v in steps.items() if k in (*ENTITY_STEPS, *ACTIVITY_STEPS) and v}
