"""Deterministic benchmark data: call outcomes to push and HubSpot-shaped records to ingest."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from crmsync.providers.base import RemoteRecord

DISPOSITIONS = ("connected", "no_answer", "voicemail", "busy", "interested", "meeting_booked")
EPOCH = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def outcome(i: int, *, prefix: str = "bench", deal_stage: str | None = None) -> dict[str, Any]:
    """Outcome ``i``: a new contact; every 2nd with a (new) company, every 5th with a (new) deal."""
    o: dict[str, Any] = {
        "id": f"{prefix}-{i}",
        "occurred_at": (EPOCH + timedelta(minutes=7 * i)).isoformat(),
        "contact": {
            "email": f"{prefix}.person{i}@example.org",
            "first_name": f"Pat{i % 97}",
            "last_name": f"Bench{i}",
            "phone": f"+1 617 555 {i % 10_000:04d}",
        },
        "disposition": DISPOSITIONS[i % len(DISPOSITIONS)],
        "direction": "outbound" if i % 3 else "inbound",
        "duration_seconds": 30 + i % 600,
        "notes": f"Benchmark call {i}: talked about the renewal and next quarter's volume.",
    }
    if i % 2 == 0:
        o["company"] = {"name": f"{prefix.title()} Company {i}", "domain": f"{prefix}-co{i}.example.com"}
    if i % 5 == 0:
        deal: dict[str, Any] = {
            "name": f"{prefix.title()} deal {i}",
            "amount": 1000 + i,
            "currency": "EUR",
            "close_date": "2026-06-30",
        }
        if deal_stage:
            deal["stage"] = deal_stage
        o["deal"] = deal
    return o


def write_outcomes(path: Path, n: int, *, prefix: str = "bench", deal_stage: str | None = None) -> dict[str, int]:
    """Write ``n`` outcomes as JSONL; returns how many objects of each type they hold."""
    counts = {"contacts": 0, "companies": 0, "deals": 0, "calls": 0}
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            o = outcome(i, prefix=prefix, deal_stage=deal_stage)
            counts["contacts"] += 1
            counts["calls"] += 1
            counts["companies"] += "company" in o
            counts["deals"] += "deal" in o
            f.write(json.dumps(o) + "\n")
    return counts


def read_outcomes(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            out.append(json.loads(line))
    return out


def hubspot_contact_page(start: int, n: int, *, edited: bool) -> list[RemoteRecord]:
    """A page of contacts as HubSpot's list endpoint returns them (string properties, one company)."""
    page = []
    for i in range(start, start + n):
        modified = EPOCH + timedelta(seconds=i, days=30 if edited else 0)
        stamp = modified.isoformat().replace("+00:00", "Z")
        props = {
            "createdate": (EPOCH + timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
            "email": f"ingest.person{i}@example.org",
            "firstname": f"Ann{i % 89}",
            "lastname": f"Ingest{i}" + (" Jr" if edited else ""),
            "phone": f"+1 617 555 {i % 10_000:04d}",
            "jobtitle": ("CEO", "Buyer", "Head of Sales", "Engineer")[i % 4],
            "company": f"Ingest Company {i // 5}",
            "city": ("Boston", "Berlin", "Lisbon")[i % 3],
            "lifecyclestage": "lead",
            "lastmodifieddate": stamp,
            "hs_object_id": str(1_000_000 + i),
        }
        page.append(
            RemoteRecord(
                id=str(1_000_000 + i),
                properties=props,
                updated_at=modified,
                associations={"companies": [str(5_000_000 + i // 5)]},
            )
        )
    return page
