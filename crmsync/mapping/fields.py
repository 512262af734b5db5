"""The canonical side of a mapping: object types, their fields and the closed value sets.

This is the vocabulary a mapping file's keys are checked against; the CRM side has no such list
here (it comes from ``Provider.fields`` at ``map check``).
"""

from __future__ import annotations

import difflib
from typing import Any

from crmsync.errors import MappingError
from crmsync.providers.base import OBJECTS, SECTION

#: Object type for each mapping-file section (``contact`` -> ``contacts``).
OBJECT_OF = {section: obj for obj, section in SECTION.items()}

#: Canonical fields per object type and their kind (string|number|date|datetime).
CANONICAL_FIELDS: dict[str, dict[str, str]] = {
    "contacts": {
        "email": "string",
        "phone": "string",
        "first_name": "string",
        "last_name": "string",
        "title": "string",
        "owner_email": "string",
    },
    "companies": {"name": "string", "domain": "string"},
    "deals": {
        "name": "string",
        "stage": "string",
        "amount": "number",
        "currency": "string",
        "close_date": "date",
        "key": "string",
        "owner_email": "string",
    },
    "calls": {
        "outcome_id": "string",
        "occurred_at": "datetime",
        "disposition": "string",
        "direction": "string",
        "duration_seconds": "number",
        "notes": "string",
        "recording_url": "string",
        "owner_email": "string",
        "title": "string",
    },
    "tasks": {
        "outcome_id": "string",
        "type": "string",
        "due_at": "datetime",
        "notes": "string",
        "title": "string",
        "owner_email": "string",
    },
}

#: Canonical fields with a closed set of values (value_map keys are checked against these).
ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("calls", "disposition"): (
        "connected",
        "no_answer",
        "busy",
        "voicemail",
        "wrong_number",
        "not_interested",
        "interested",
        "meeting_booked",
        "callback_requested",
        "do_not_call",
    ),
    ("calls", "direction"): ("inbound", "outbound"),
    ("tasks", "type"): ("call", "email", "meeting", "todo"),
}


def suggest(word: str, choices: Any) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def object_type(obj: str) -> str:
    """``contacts`` or its section name ``contact`` -> ``contacts``; anything else is a MappingError."""
    if obj in CANONICAL_FIELDS:
        return obj
    if obj in OBJECT_OF:
        return OBJECT_OF[obj]
    raise MappingError(f"unknown object type {obj!r} (one of {', '.join(OBJECTS)})")
