"""Pipedrive records <-> the flat properties the mapping speaks.

Pipedrive nests what the mapping keeps flat: a person's emails and phones are lists of
``{value, primary, label}``, custom fields sit under ``custom_fields`` by a 40-character code, and an
activity's time is ``due_date`` + ``due_time`` with its ``duration`` as ``HH:MM``. The mapping names
pseudo-fields (``email``, ``phone``, ``due_at``, ``duration_seconds``, ``crmsync_deal_key``…) and
this module translates them both ways, so no other part of crmsync knows these shapes.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

#: Custom fields crmsync creates (label -> entity). Their codes differ per company.
CUSTOM = {"crmsync_deal_key": "deal", "crmsync_domain": "organization"}
MARKER_RE = re.compile(r"\[crmsync:([^\]\s]+)\]")
OBJ = {
    "contacts": "persons",
    "companies": "organizations",
    "deals": "deals",
    "calls": "activities",
    "tasks": "activities",
}
ENTITY = {"persons": "person", "organizations": "organization", "deals": "deal", "activities": "activity"}


def parse_time(value: Any) -> datetime | None:
    """Pipedrive's RFC 3339 (``2026-01-01T10:20:00Z``) or v1 ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    if not value or not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration_text(seconds: Any) -> str | None:
    """Seconds as Pipedrive's ``HH:MM`` (rounded up to the minute, so a 20 s call is not 00:00)."""
    try:
        total = int(float(seconds))
    except (TypeError, ValueError):
        return None
    minutes = (max(0, total) + 59) // 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def duration_seconds(text: Any) -> int | None:
    """``HH:MM`` or ``HH:MM:SS`` (the v2 spec's example) as seconds."""
    if not isinstance(text, str) or not text:
        return None
    parts = text.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        return None
    if len(nums) == 2:
        return nums[0] * 3600 + nums[1] * 60
    if len(nums) == 3:
        return nums[0] * 3600 + nums[1] * 60 + nums[2]
    return None


def marker_of(note: Any) -> str | None:
    match = MARKER_RE.search(note or "") if isinstance(note, str) else None
    return match.group(1) if match else None


def with_marker(note: str | None, marker: str) -> str:
    """The note with crmsync's idempotency marker on its own line (HTML, as Pipedrive keeps notes)."""
    body = note or ""
    if marker_of(body) == marker:
        return body
    return f"{body}<p>[crmsync:{marker}]</p>" if body else f"<p>[crmsync:{marker}]</p>"


def _primary(entries: Any) -> str | None:
    if not isinstance(entries, list) or not entries:
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("primary"):
            return str(entry.get("value") or "") or None
    first = entries[0]
    return str(first.get("value") or "") or None if isinstance(first, dict) else str(first)


def flatten(obj: str, raw: dict[str, Any], codes: dict[str, str]) -> dict[str, Any]:
    """A v2 record as flat properties: primary email/phone, crmsync's custom fields by label."""
    props = {k: v for k, v in raw.items() if k not in ("custom_fields", "emails", "phones", "participants")}
    custom = raw.get("custom_fields") or {}
    for label, code in codes.items():
        if code in custom:
            props[label] = custom[code]
    for code, value in custom.items():
        props.setdefault(code, value)
    if obj == "persons":
        props["email"] = _primary(raw.get("emails"))
        props["phone"] = _primary(raw.get("phones"))
    if obj == "activities":
        if raw.get("due_date"):
            time_part = raw.get("due_time") or "00:00"
            props["due_at"] = f"{raw['due_date']}T{time_part if time_part.count(':') == 2 else time_part + ':00'}Z"
        props["duration_seconds"] = duration_seconds(raw.get("duration"))
        props["crmsync_marker"] = marker_of(raw.get("note"))
    return props


def links(obj: str, raw: dict[str, Any]) -> dict[str, list[str]]:
    """The associations crmsync stores for a record: contact->company, deal->contact/company, call->all."""
    out: dict[str, list[str]] = {}
    if raw.get("org_id") and obj in ("persons", "deals", "activities"):
        out["companies"] = [str(raw["org_id"])]
    if obj == "deals" and raw.get("person_id"):
        out["contacts"] = [str(raw["person_id"])]
    if obj == "activities":
        people = [str(p["person_id"]) for p in raw.get("participants") or [] if p.get("person_id")]
        if not people and raw.get("person_id"):
            people = [str(raw["person_id"])]
        if people:
            out["contacts"] = people
        if raw.get("deal_id"):
            out["deals"] = [str(raw["deal_id"])]
    return out


def body(obj: str, props: dict[str, Any], codes: dict[str, str], links_to: dict[str, str]) -> dict[str, Any]:
    """A v2 create/patch body from mapped properties and links (remote ids as strings)."""
    out: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for key, value in props.items():
        if key in codes:
            custom[codes[key]] = value
        elif key == "email" and obj == "persons":
            if value:
                out["emails"] = [{"value": value, "primary": True, "label": "work"}]
        elif key == "phone" and obj == "persons":
            if value:
                out["phones"] = [{"value": value, "primary": True, "label": "work"}]
        elif key in ("due_at", "duration_seconds", "crmsync_marker", "disposition", "direction", "recording_url"):
            continue  # activity pseudo-fields: see activity_body
        elif len(key) == 40 and re.fullmatch(r"[0-9a-f]{40}", key):
            custom[key] = value
        elif key == "owner_id":
            if value not in (None, ""):
                out[key] = int(value)  # v2 takes ids as numbers, never numeric strings
        else:
            out[key] = value
    if custom:
        out["custom_fields"] = custom
    if obj == "persons" and "name" not in out and (out.get("first_name") or out.get("last_name")):
        out["name"] = " ".join(p for p in (out.get("first_name"), out.get("last_name")) if p)
    if obj == "persons" and not out.get("name") and not out.get("first_name"):
        out["name"] = props.get("email") or props.get("phone") or "Unknown"
    if links_to.get("companies") and obj in ("persons", "deals"):
        out["org_id"] = int(links_to["companies"])
    if links_to.get("contacts") and obj == "deals":
        out["person_id"] = int(links_to["contacts"])
    return out


def activity_body(kind: str, props: dict[str, Any], marker: str, links_to: dict[str, str]) -> dict[str, Any]:
    """A v2 activity: a done call or an open task, the marker in its note, the person as primary participant."""
    note_lines = []
    if props.get("disposition"):
        note_lines.append(f"<p>Outcome: {props['disposition']}</p>")
    if props.get("direction"):
        note_lines.append(f"<p>Direction: {props['direction']}</p>")
    if props.get("recording_url"):
        note_lines.append(f"<p>Recording: {props['recording_url']}</p>")
    note = (props.get("note") or "") + "".join(note_lines)
    out: dict[str, Any] = {
        "subject": props.get("subject") or ("Call" if kind == "calls" else "Follow-up"),
        "type": props.get("type") or ("call" if kind == "calls" else "task"),
        "done": kind == "calls",
        "note": with_marker(note, marker),
    }
    when = parse_time(props.get("due_at"))
    if when is not None:
        when = when.astimezone(UTC)
        out["due_date"] = when.strftime("%Y-%m-%d")
        if kind == "calls" or when.time() != datetime.min.time():
            out["due_time"] = when.strftime("%H:%M")
    if kind == "calls" and props.get("duration_seconds") is not None:
        text = duration_text(props["duration_seconds"])
        if text:
            out["duration"] = text
    if props.get("owner_id") is not None:
        out["owner_id"] = int(props["owner_id"])
    if links_to.get("contacts"):
        out["participants"] = [{"person_id": int(links_to["contacts"]), "primary": True}]
    if links_to.get("deals"):
        out["deal_id"] = int(links_to["deals"])
    if links_to.get("companies"):
        out["org_id"] = int(links_to["companies"])
    return out
