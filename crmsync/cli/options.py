"""Options several commands share, and the parsing of their values."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from crmsync.errors import UsageError

ConnOpt = Annotated[
    str | None, typer.Option("--connection", "-c", help="Connection name (optional when only one exists).")
]
ConnsOpt = Annotated[
    list[str] | None, typer.Option("--connection", "-c", help="Connection name (repeatable; default: all).")
]
LockOpt = Annotated[
    float | None, typer.Option("--lock-timeout", help="Seconds to wait for another run on the connection (default 0).")
]
MetricsOpt = Annotated[
    Path | None, typer.Option("--metrics-file", help="Write Prometheus metrics here (textfile collector).")
]

_OBJECT_ALIASES = {
    "contact": "contacts",
    "company": "companies",
    "deal": "deals",
    "call": "calls",
    "task": "tasks",
    "accounts": "companies",
    "partners": "contacts",
    "leads": "deals",
    "opportunities": "deals",
}


def parse_when(value: str | None, *, name: str) -> datetime | None:
    """ISO 8601 (a date or a datetime; naive means UTC) or a relative age like 15m, 2h, 1d."""
    if not value:
        return None
    from crmsync.timeutil import parse_age

    age = parse_age(value)
    if age is not None:
        return datetime.now(UTC) - age
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{name}: {value!r} is neither an ISO 8601 date/time nor an age like 15m, 2h, 1d") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def split_objects(value: str | None) -> list[str] | None:
    """``--object contact,Deals`` -> ["contacts", "deals"] (singulars and CRM names accepted)."""
    if not value:
        return None
    out = []
    for part in value.split(","):
        part = part.strip().lower()
        if part:
            out.append(_OBJECT_ALIASES.get(part, part))
    return out
