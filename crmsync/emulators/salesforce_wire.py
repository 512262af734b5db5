"""The Salesforce emulator's wire formats: API versions, timestamps, error bodies, CSV, a refused write.

Both the emulator's state (``salesforce.py``) and its routes (``salesforce_routes.py``) use them.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

VERSIONS = ("58.0", "59.0", "60.0", "61.0", "62.0", "63.0", "64.0", "65.0")


def sf_time(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")


def parse_time(value: str) -> float | None:
    text = value.strip().replace("Z", "+00:00")
    if len(text) > 5 and text[-5] in "+-" and text[-3] != ":":
        text = text[:-2] + ":" + text[-2:]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def err(message: str, code: str, fields: list[str] | None = None) -> dict[str, Any]:
    return {"message": message, "errorCode": code, "fields": fields or []}


class Refused(Exception):
    """A write refused with Salesforce's error (status, message, errorCode, fields)."""

    def __init__(self, status: int, message: str, code: str, fields: list[str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.fields = status, message, code, fields or []
        self.extra = extra


def to_csv(rows: list[dict[str, Any]], fields: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        writer.writerow(["" if row.get(f) is None else row.get(f) for f in fields])
    return out.getvalue()
