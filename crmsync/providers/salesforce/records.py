"""crmsync's objects as Salesforce sObjects, both ways: write bodies, read records and their links.

Contacts, companies and deals are Contact, Account and Opportunity, each keyed by crmsync's External
ID field ``crmsync_key__c`` (the match value: an email, a domain, a deal key); calls and follow-ups
are Tasks keyed by ``crmsync_outcome_id__c``: a call closed with ``TaskSubtype = 'Call'``, a
follow-up open with its due date.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

SOBJECT = {"contacts": "Contact", "companies": "Account", "deals": "Opportunity", "calls": "Task", "tasks": "Task"}
KEY_FIELD = "crmsync_key__c"
MARKER_FIELD = "crmsync_outcome_id__c"
#: What an admin must create when a field is missing (``map check`` and ``push`` name it exactly).
NEEDED = {
    "Account": KEY_FIELD,
    "Contact": KEY_FIELD,
    "Opportunity": KEY_FIELD,
    "Task": MARKER_FIELD,
}
FIELD_SPEC = "Text(255), External ID, Unique"
#: The natural field a key kind is looked up by, besides crmsync's own key.
LOOKUP_FIELD = {
    ("Contact", "email"): "Email",
    ("Contact", "phone"): "Phone",
    ("Lead", "email"): "Email",
    ("Lead", "phone"): "Phone",
    ("Account", "domain"): "Website",
    ("Account", "name"): "Name",
}
LEAD_PREFIX = "00Q"
#: What a Lead's required Company says when the person came without one (Salesforce's own web-to-lead value).
NO_COMPANY = "[not provided]"
#: Fields the provider reads for links and keys on every record.
LINK_FIELDS = {
    "Lead": [KEY_FIELD],
    "Contact": ["AccountId", KEY_FIELD],
    "Account": [KEY_FIELD],
    "Opportunity": ["AccountId", KEY_FIELD],
    "Task": ["WhoId", "WhatId", MARKER_FIELD, "IsClosed", "TaskSubtype"],
}
#: Where a Task's call/follow-up split lies in SOQL.
TASK_WHERE = {"calls": "TaskSubtype = 'Call'", "tasks": "TaskSubtype != 'Call'"}
CLOSED_STATUS = "Completed"
OPEN_STATUS = "Not Started"
DEFAULT_STAGE = "Prospecting"


def parse_time(value: Any) -> datetime | None:
    """``2026-12-01T10:20:08.000+0000`` (or ``Z``) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    if len(text) > 5 and text[-5] in "+-" and text[-3] != ":":
        text = text[:-2] + ":" + text[-2:]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def sf_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")


def clean(raw: dict[str, Any]) -> dict[str, Any]:
    """A record without ``attributes``; Bulk's empty CSV cells become None."""
    return {k: (None if v == "" else v) for k, v in raw.items() if k != "attributes"}


def links(sobject: str, raw: dict[str, Any]) -> dict[str, list[str]]:
    """Contact→Account, Opportunity→Account, Task→Who (contact) and What (deal or account)."""
    out: dict[str, list[str]] = {}
    if sobject in ("Contact", "Opportunity") and raw.get("AccountId"):
        out["companies"] = [str(raw["AccountId"])]
    if sobject == "Task":
        who, what = raw.get("WhoId"), raw.get("WhatId")
        if who and str(who).startswith(("003", LEAD_PREFIX)):
            out["contacts"] = [str(who)]
        if what and str(what).startswith("006"):
            out["deals"] = [str(what)]
        elif what and str(what).startswith("001"):
            out["companies"] = [str(what)]
    return out


def key_value(match: dict[str, str]) -> str:
    """The External ID value of a match: the value itself (an email, a domain, a deal key)."""
    _, value = next(iter(match.items()))
    return str(value).strip().lower() if "@" in str(value) else str(value).strip()


def record_body(sobject: str, props: dict[str, Any], links_to: dict[str, str], *, create: bool) -> dict[str, Any]:
    """A Contact, Account or Opportunity body; required fields filled for a create where none were mapped."""
    out = {k: v for k, v in props.items() if v is not None or not create}
    if sobject in ("Contact", "Opportunity") and links_to.get("companies"):
        out["AccountId"] = links_to["companies"]
    if create and sobject == "Lead" and not out.get("Company"):
        out["Company"] = NO_COMPANY
    if create and sobject in ("Contact", "Lead") and not out.get("LastName"):
        email = str(out.get("Email") or "")
        out["LastName"] = email.split("@")[0] if email else str(out.get("Phone") or "Unknown")
    if create and sobject == "Account" and not out.get("Name"):
        out["Name"] = str(out.get("Website") or out.get(KEY_FIELD) or "Unknown")
    if create and sobject == "Opportunity":
        out.setdefault("StageName", DEFAULT_STAGE)
        out.setdefault("CloseDate", (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%d"))
        if not out.get("Name"):
            out["Name"] = str(out.get(KEY_FIELD) or "Deal")
    return out


def task_body(kind: str, props: dict[str, Any], marker: str, links_to: dict[str, str]) -> dict[str, Any]:
    """A closed call Task (``TaskSubtype: Call``) or an open follow-up Task, with crmsync's marker."""
    out: dict[str, Any] = {k: v for k, v in props.items() if v is not None}
    out[MARKER_FIELD] = marker
    if kind == "calls":
        out["TaskSubtype"] = "Call"
        out.setdefault("Status", CLOSED_STATUS)
        out.setdefault("Subject", "Call")
    else:
        out.setdefault("Status", OPEN_STATUS)
        out.setdefault("Subject", "Follow-up")
    when = out.get("ActivityDate")
    if isinstance(when, str) and len(when) > 10:
        out["ActivityDate"] = when[:10]  # a date field: the day of the call or the due day
    if "CallDurationInSeconds" in out:
        try:
            out["CallDurationInSeconds"] = int(float(out["CallDurationInSeconds"]))
        except (TypeError, ValueError):
            out.pop("CallDurationInSeconds")
    if links_to.get("contacts"):
        out["WhoId"] = links_to["contacts"]
    if str(out.get("WhoId") or "").startswith(LEAD_PREFIX):
        return out  # a Task on a Lead takes no WhatId
    if links_to.get("deals"):
        out["WhatId"] = links_to["deals"]
    elif links_to.get("companies"):
        out["WhatId"] = links_to["companies"]
    return out
