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
    spent: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], options: Mapping[str, Any]) -> Budget:
        plan = str(options.get("plan") or settings.get("plan") or "lite").lower()
        seats = int(options.get("seats") or settings.get("seats") or 1)
        return cls(plan=plan if plan in PLAN_MULTIPLIER else "lite", seats=max(1, seats))

    @property
    def daily(self) -> int:
        return BASE_TOKENS * PLAN_MULTIPLIER[self.plan] * self.seats

    def spend(self, tokens: int) -> None:
        with self._lock:
            self.spent += tokens
            self.requests += 1

    def as_dict(self) -> dict[str, Any]:
        return {"daily_tokens": self.daily, "tokens_spent_this_run": self.spent, "requests": self.requests}


def push_cost(outcomes: int, *, new_people: int, with_task: int) -> tuple[int, int]:
    """(requests, tokens) of a push with no batch endpoints: per outcome a call (5), per follow-up a
    task (5), per new person a search (20) and a create (5), per known person one activity list (10)."""
    known = outcomes - new_people
    requests = outcomes + with_task + 2 * new_people + known
    tokens = 5 * outcomes + 5 * with_task + 25 * new_people + 10 * known
    return requests, tokens
