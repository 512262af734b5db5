"""Pipedrive's daily token budget: what each request costs and what a run has spent.

A company's budget is 30,000 tokens x the plan's multiplier x seats a day, shared by every API token
and OAuth app of the company and reset at the server's midnight; no response header states what is
left of it, so a client can only count its own spending against the budget it was told.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Token cost per kind of request (the specs' ``x-token-cost``; v1 routes cost double).
COSTS = {"list": 10, "get": 1, "create": 5, "update": 5, "delete": 3, "search": 20, "fields": 10, "v1": 2}
PLAN_MULTIPLIER = {"lite": 1, "growth": 2, "premium": 5, "ultimate": 7}
BASE_TOKENS = 30_000


@dataclass
class Budget:
    plan: str = "lite"
    seats: int = 1
    #: The share of the day's budget one push may plan to spend (``budget_share``).
    share: float = 0.5
    spent: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], options: Mapping[str, Any]) -> Budget:
        plan = str(options.get("plan") or settings.get("plan") or "lite").lower()
        seats = int(options.get("seats") or settings.get("seats") or 1)
        share = float(options.get("budget_share") or 0.5)
        return cls(
            plan=plan if plan in PLAN_MULTIPLIER else "lite", seats=max(1, seats), share=min(1.0, max(0.0, share))
        )

    @property
    def daily(self) -> int:
        return BASE_TOKENS * PLAN_MULTIPLIER[self.plan] * self.seats

    def spend(self, tokens: int) -> None:
        with self._lock:
            self.spent += tokens
            self.requests += 1

    def as_dict(self) -> dict[str, Any]:
        return {"daily_tokens": self.daily, "tokens_spent_this_run": self.spent, "requests": self.requests}


def push_tokens(needs: Mapping[str, int]) -> int:
    """Tokens a push may spend at most (no batch endpoints): each call and task a create (5); each
    person, company and deal a search (20) and a create or update (5); and, per call, one list of its
    person's activities where the store has no record of sending it (10). A person may also pay for
    a quarter page of the person list per key, email and phone (5, ``index.PAGES_PER_KEY``), and one
    catch-up list per lookup batch (under 1)."""
    calls, tasks = needs.get("calls", 0), needs.get("tasks", 0)
    records = sum(needs.get(obj, 0) for obj in ("contacts", "companies", "deals"))
    return 5 * calls + 5 * tasks + 25 * records + 10 * calls + 6 * needs.get("contacts", 0)
