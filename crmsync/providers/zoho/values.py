"""Zoho's names and values: modules, link fields, COQL limits and text, timestamps, response bodies."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

API_PATH = "/crm/v8"
MODULES = {"contacts": "Contacts", "companies": "Accounts", "deals": "Deals", "calls": "Calls", "tasks": "Tasks"}
SE_MODULE_OBJECT = {"Accounts": "companies", "Deals": "deals", "Contacts": "contacts"}
#: Lookup fields read for associations: (field, object it points at; None = What_Id with $se_module).
LINKS: dict[str, list[tuple[str, str | None]]] = {
    "contacts": [("Account_Name", "companies")],
    "deals": [("Account_Name", "companies"), ("Contact_Name", "contacts")],
    "calls": [("Who_Id", "contacts"), ("What_Id", None)],
    "tasks": [("Who_Id", "contacts"), ("What_Id", None)],
}
LINK_TARGETS = {
    "contacts": ["companies"],
    "deals": ["companies", "contacts"],
    "calls": ["contacts", "deals", "companies"],
    "tasks": ["contacts", "deals", "companies"],
}
MARKER = "crmsync_outcome_id"
DEAL_KEY = "crmsync_deal_key"
BATCH = 100
COQL_ROWS = 2000
COQL_COLUMNS = 50
COQL_IN = 50  # values per IN (...)
COQL_CRITERIA = 25
#: COQL calls in flight at once: Zoho's sub-concurrency for heavy calls, whatever the edition (reference section 4).
COQL_CONCURRENCY = 10
#: Rows a walk from both ends has read before the rest is split into id ranges read side by side:
#: below three pages, walking both ends ends within two round trips, which a plan (one round trip)
#: plus a round of range pages cannot beat.
PARTITION_MIN = 3 * COQL_ROWS
#: Id ranges per COQL slot: more ranges than slots keep every slot busy when the changed records
#: crowd into part of the id space (an incremental pull's edits, a module's newest records).
RANGES_PER_SLOT = 2


# -- time and COQL text ------------------------------------------------------------------------------


def parse_ts(value: Any) -> datetime | None:
    """Zoho's ISO datetimes (with an offset) as aware UTC."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)


def zoho_time(dt: datetime) -> str:
    """An instant as Zoho wants it in queries and bodies: whole seconds with an offset (UTC here)."""
    return dt.astimezone(UTC).replace(microsecond=0).isoformat()


def quote(value: Any) -> str:
    """A COQL string literal."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _nest(op: str, conditions: Sequence[str]) -> str:
    """``A op (B op (C ...))``: COQL wants explicit brackets once a level has more than two criteria."""
    if len(conditions) == 1:
        return conditions[0]
    return f"({conditions[0]} {op} {_nest(op, conditions[1:])})"


def _in_groups(field: str, values: Sequence[str]) -> str:
    """``field in (...)`` in groups of 50 values, OR-ed together."""
    groups = [values[i : i + COQL_IN] for i in range(0, len(values), COQL_IN)]
    return _nest("or", [f"{field} in ({', '.join(quote(v) for v in g)})" for g in groups])


def domain_of(url: Any) -> str:
    """The bare domain a Website value holds (``https://www.acme.com/x`` -> ``acme.com``)."""
    text = re.sub(r"^[a-z]+://", "", str(url or "").strip().lower()).split("/")[0]
    return text.removeprefix("www.")


def _phone_key(value: Any) -> str:
    return re.sub(r"[^\d+]", "", str(value or ""))


# -- responses ---------------------------------------------------------------------------------------


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code in (204, 304) or not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
