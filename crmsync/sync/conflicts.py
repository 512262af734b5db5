"""Per-field rules for when the CRM already holds a value the outcome disagrees with.

* ``crm-wins``: keep the CRM's value (owner, lifecycle stage by default);
* ``outcome-wins``: send the outcome's value;
* ``newest-wins``: send it only if the call happened after the CRM record last changed;
* ``fill-empty``: send it only where the CRM has nothing (names, phone, title by default).

An empty CRM value is always filled, whatever the rule: no rule protects an empty field.
Every disagreement is recorded (``crm_conflict``) and counted by ``status``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crmsync.providers.base import SECTION

#: Field (``section.name``) -> its rule.
Rules = Mapping[str, str]

FALLBACK_RULE = "newest-wins"


@dataclass
class Conflict:
    field: str
    crm_value: Any
    outcome_value: Any
    rule: str
    resolution: str  # kept_crm | sent_outcome


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == []


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().lower() == b.strip().lower()
    try:
        return float(a) == float(b)  # "42" from HubSpot vs 42 from the outcome
    except (TypeError, ValueError):
        return bool(a == b)


def resolve(
    obj: str,
    outcome: dict[str, Any],
    crm: dict[str, Any] | None,
    *,
    rules: Rules,
    occurred_at: datetime | None,
    crm_updated_at: datetime | None,
) -> tuple[dict[str, Any], list[Conflict]]:
    """The canonical fields to send for one record, and the conflicts seen on the way."""
    if crm is None:
        return dict(outcome), []
    section = SECTION[obj]
    send: dict[str, Any] = {}
    conflicts: list[Conflict] = []
    for name, value in outcome.items():
        if _empty(value):
            continue
        current = crm.get(name)
        if _empty(current):
            send[name] = value
            continue
        if _same(current, value):
            continue
        rule = rules.get(f"{section}.{name}", FALLBACK_RULE)
        if rule == "outcome-wins":
            take = True
        elif rule == "newest-wins":
            take = occurred_at is not None and (crm_updated_at is None or occurred_at > crm_updated_at)
        else:  # crm-wins, fill-empty
            take = False
        if take:
            send[name] = value
        conflicts.append(Conflict(name, current, value, rule, "sent_outcome" if take else "kept_crm"))
    return send, conflicts
