"""Salesforce's daily API allocation as its answers state it, and how a push is weighed against it.

Every REST answer carries ``Sforce-Limit-Info: api-usage=18/5000`` (sometimes followed by
``;per-app-api-usage=17/250(appName=x)``); the org-wide daily allocation is the binding limit, and
once spent the API answers 403 ``REQUEST_LIMIT_EXCEEDED`` until the rolling 24 hours free some.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_USAGE = re.compile(r"(?P<name>[\w-]+)=(?P<used>\d+)/(?P<max>\d+)(?:\(appName=(?P<app>[^)]*)\))?")
#: Records one sObject Collections request carries.
COLLECTION_MAX = 200


@dataclass(frozen=True)
class Usage:
    used: int
    limit: int
    app: str | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


def parse_limit_info(header: str | None) -> dict[str, Usage]:
    """``api-usage=18/5000;per-app-api-usage=17/250(appName=x)`` as ``{name: Usage}``; {} when absent or garbled."""
    out: dict[str, Usage] = {}
    for part in (header or "").split(";"):
        m = _USAGE.fullmatch(part.strip())
        if m:
            out[m["name"]] = Usage(int(m["used"]), int(m["max"]), m["app"])
    return out


@dataclass
class ApiUsage:
    """The latest ``Sforce-Limit-Info`` seen by a connection, for ``status``, metrics and budgets."""

    api: Usage | None = None
    per_app: Usage | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, header: str | None) -> None:
        parsed = parse_limit_info(header)
        with self._lock:
            if "api-usage" in parsed:
                self.api = parsed["api-usage"]
            if "per-app-api-usage" in parsed:
                self.per_app = parsed["per-app-api-usage"]

    def as_dict(self) -> dict[str, Any]:
        """The generic shape ``status``/metrics read: ``{"used", "limit", "remaining"}`` (+ per-app)."""
        out: dict[str, Any] = {}
        if self.api is not None:
            out.update(used=self.api.used, limit=self.api.limit, remaining=self.api.remaining, window="24h rolling")
        if self.per_app is not None:
            out["per_app"] = {"used": self.per_app.used, "limit": self.per_app.limit, "app": self.per_app.app}
        return out


def push_requests(needs: Mapping[str, int]) -> int:
    """API requests a push may spend at most: per record type a lookup query and a Collections write
    per 200 records, one create per 200 calls and tasks, plus a handful of describes and a user list."""
    total = 8
    for obj in ("contacts", "companies", "deals"):
        total += 2 * math.ceil(needs.get(obj, 0) / COLLECTION_MAX)
    for obj in ("calls", "tasks"):
        total += math.ceil(needs.get(obj, 0) / COLLECTION_MAX)
    return total
