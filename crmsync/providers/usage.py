"""A CRM's API allowance, provider-neutral: what ``Provider.api_usage()`` answers and runs record.

Each CRM counts differently (Salesforce requests per rolling 24 h in ``Sforce-Limit-Info``,
Pipedrive tokens per company day, Dynamics requests per 5-minute window), so the record names its
unit and window and says whether the CRM stated the figures (``account``: the whole org's
spending) or crmsync counted its own (``run``: this run's spending only). A run stores it in its
counts under ``_api_usage``; ``status`` shows the last one and adds up a day's ``run`` figures.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

log = logging.getLogger("crmsync.usage")

KEY = "_api_usage"


@dataclass(frozen=True)
class ApiUsage:
    """How much of its API allowance a connection has used, as last seen.

    ``used``/``limit``/``remaining`` are in ``unit`` (``requests``, ``tokens``, ``credits``) over
    ``window`` (``day``: the CRM's calendar day; ``24h``: rolling; ``5m``...); any may be None where
    the CRM does not say. ``scope`` is ``account`` when the CRM stated the figures for the whole
    org, ``run`` when crmsync counted this run's own spending against a limit it was configured with.
    """

    unit: str
    window: str
    used: int | None = None
    limit: int | None = None
    remaining: int | None = None
    scope: str = "account"
    resets_at: datetime | None = None
    #: Where the figures come from (a header's name, ``configured plan``...), shown to the operator.
    source: str = ""
    #: Further provider figures worth showing (e.g. a burst window's state), JSON-ready.
    detail: dict[str, Any] = field(default_factory=dict)

    def left(self) -> int | None:
        if self.remaining is not None:
            return self.remaining
        if self.used is not None and self.limit is not None:
            return max(0, self.limit - self.used)
        return None

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["resets_at"] = _iso(self.resets_at)
        doc["remaining"] = self.left()
        return doc


class _HasUsage(Protocol):
    def api_usage(self) -> ApiUsage | None: ...


def recorded(provider: _HasUsage | None) -> dict[str, Any]:
    """``{"_api_usage": {...}}`` for a run's counts, or {}: a provider failing to say never fails the run."""
    if provider is None:
        return {}
    try:
        usage = provider.api_usage()
    except Exception as exc:  # a bug in one provider's figures must not lose the run's record
        log.warning("api usage unavailable: %s", exc)
        return {}
    return {KEY: usage.as_dict()} if usage is not None else {}


def latest(runs: Iterable[Any], now: datetime) -> dict[str, Any] | None:
    """The last recorded usage of a connection's runs (newest first), with ``recorded_at`` and
    ``command``; for ``run``-scoped daily figures also ``used_today``: the sum over today's runs (UTC)."""
    out: dict[str, Any] | None = None
    today = 0
    start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    for run in runs:
        doc = (getattr(run, "counts", None) or {}).get(KEY)
        finished = getattr(run, "finished_at", None)
        if not isinstance(doc, dict) or finished is None:
            continue
        finished = finished if finished.tzinfo else finished.replace(tzinfo=UTC)
        if out is None:
            out = {**doc, "recorded_at": _iso(finished), "command": getattr(run, "command", None)}
        if doc.get("scope") == "run" and finished >= start and isinstance(doc.get("used"), int):
            if doc.get("unit") == out.get("unit") and doc.get("window") == out.get("window"):
                today += doc["used"]
    if out is not None and out.get("scope") == "run" and out.get("window") == "day":
        out["used_today"] = today
        if isinstance(out.get("limit"), int):
            out["remaining_today"] = max(0, out["limit"] - today)
    return out


def describe(doc: dict[str, Any]) -> str:
    """One line for ``status``, within 80 columns where the figures allow it."""
    unit, window = doc.get("unit", "?"), doc.get("window", "?")
    limit = doc.get("limit")
    of = f" of {limit:,}" if isinstance(limit, int) else ""
    if doc.get("scope") == "run" and "used_today" in doc:
        text = f"api usage: {doc['used_today']:,}{of} {unit}/{window} spent today (counted by crmsync)"
    elif doc.get("used") is not None:
        text = f"api usage: {doc['used']:,}{of} {unit}/{window}"
    elif doc.get("remaining") is not None:
        text = f"api usage: {doc['remaining']:,} {unit} left this {window}"
    else:
        text = f"api usage: {unit}/{window}{of}"
    if doc.get("resets_at"):
        text += f", resets {doc['resets_at']}"
    if doc.get("source") and doc.get("scope") != "run":
        text += f" [{doc['source']}]"
    return text


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="seconds")
