"""Canonical objects: what a call outcome is, whichever CRM it goes to.

``CallOutcome`` is the record scripts pipe into ``crmsync push``; its JSON Schema is printed by
``crmsync push --schema``. ``canonical()`` splits an outcome into the flat per-object dicts
the mapping layer turns into CRM fields.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
MAX_NOTES = 65_536  # HubSpot's call body and Zoho's Description both stop around here


class Disposition(StrEnum):
    connected = "connected"
    no_answer = "no_answer"
    busy = "busy"
    voicemail = "voicemail"
    wrong_number = "wrong_number"
    not_interested = "not_interested"
    interested = "interested"
    meeting_booked = "meeting_booked"
    callback_requested = "callback_requested"
    do_not_call = "do_not_call"


class Direction(StrEnum):
    inbound = "inbound"
    outbound = "outbound"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ContactIn(_Strict):
    email: str | None = None
    phone: str | None = None
    first_name: str | None = Field(default=None, max_length=255)
    last_name: str | None = Field(default=None, max_length=255)
    title: str | None = Field(default=None, max_length=255)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not EMAIL_RE.match(v):
            raise ValueError("not an email address")
        return v.lower()

    @field_validator("phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        digits = re.sub(r"[\s().-]", "", v)
        if not re.fullmatch(r"\+?\d{5,17}", digits):
            raise ValueError("not a phone number")
        return v

    @model_validator(mode="after")
    def _needs_key(self) -> ContactIn:
        if not self.email and not self.phone:
            raise ValueError("a contact needs an email or a phone")
        return self


class CompanyIn(_Strict):
    name: str | None = Field(default=None, max_length=255)
    domain: str | None = None

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        if not v:
            return None
        v = re.sub(r"^https?://", "", v.strip().lower()).split("/")[0]
        v = v.removeprefix("www.")
        if not DOMAIN_RE.match(v):
            raise ValueError("not a domain name")
        return v

    @model_validator(mode="after")
    def _needs_key(self) -> CompanyIn:
        if not self.name and not self.domain:
            raise ValueError("a company needs a name or a domain")
        return self


class DealIn(_Strict):
    name: str = Field(min_length=1, max_length=255)
    stage: str | None = None
    amount: float | None = Field(default=None, ge=0)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    close_date: date | None = None


class NextStep(_Strict):
    type: str = Field(default="call", pattern=r"^(call|email|meeting|todo)$")
    due_at: datetime
    notes: str | None = Field(default=None, max_length=MAX_NOTES)

    @field_validator("due_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("needs a UTC offset, e.g. 2026-01-31T09:00:00+01:00")
        return v


class CallOutcome(_Strict):
    """One call and what came of it. A contact needs an email or a phone."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, title="CallOutcome")

    id: str | None = Field(default=None, max_length=200, description="your idempotency key; default: a content hash")
    occurred_at: datetime = Field(description="ISO 8601 with a UTC offset")
    contact: ContactIn
    company: CompanyIn | None = None
    disposition: Disposition
    direction: Direction = Direction.outbound
    duration_seconds: int = Field(default=0, ge=0, le=86_400)
    notes: str | None = Field(default=None, max_length=MAX_NOTES)
    recording_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    owner_email: str | None = None
    next_step: NextStep | None = None
    deal: DealIn | None = None
    custom: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("needs a UTC offset, e.g. 2026-01-31T09:00:00+01:00")
        return v

    @field_validator("owner_email")
    @classmethod
    def _owner(cls, v: str | None) -> str | None:
        if v and not EMAIL_RE.match(v):
            raise ValueError("not an email address")
        return v.lower() if v else None

    @model_validator(mode="after")
    def _default_id(self) -> CallOutcome:
        if not self.id:
            self.id = "h-" + self.content_hash()[:32]
        return self

    def content_hash(self, dumped: dict[str, Any] | None = None) -> str:
        """sha256 of the outcome's content, id excluded: stable across runs and key order.

        ``dumped``: this outcome's ``model_dump(mode="json")``, when the caller has it already.
        """
        data = self.model_dump(mode="json") if dumped is None else dumped
        data = {k: v for k, v in data.items() if k != "id"}
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


NOT_PHONE = re.compile(r"[^\d+]")  # what a phone number loses to become a match key


def contact_key(c: dict[str, Any]) -> dict[str, str] | None:
    """How a contact is matched: email first, then phone."""
    if c.get("email"):
        return {"email": str(c["email"]).lower()}
    if c.get("phone"):
        return {"phone": NOT_PHONE.sub("", str(c["phone"]))}
    return None


def company_key(c: dict[str, Any]) -> dict[str, str] | None:
    """How a company is matched: domain first, then the lower-cased name."""
    if c.get("domain"):
        return {"domain": str(c["domain"]).lower()}
    if c.get("name"):
        return {"name": str(c["name"]).strip().lower()}
    return None


def deal_key(outcome: CallOutcome, contact_dump: dict[str, Any] | None = None) -> str:
    """crmsync's unique key for a deal: the contact's key plus the deal name, hashed.

    ``contact_dump``: the outcome's contact as ``model_dump`` gives it, when the caller has it.
    """
    assert outcome.deal is not None
    contact = contact_key(contact_dump if contact_dump is not None else outcome.contact.model_dump()) or {}
    raw = json.dumps([contact, outcome.deal.name.strip().lower()], sort_keys=True)
    return "d-" + hashlib.sha256(raw.encode()).hexdigest()[:24]


def canonical(outcome: CallOutcome, dumped: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Split an outcome into flat canonical dicts per object type (the mapping's input).

    ``dumped``: the outcome's ``model_dump(mode="json")`` when the caller has it (intake does), so the
    outcome is serialized once; the contact and company hold only strings, which both modes keep as
    they are.
    """
    if dumped is None:
        dumped = outcome.model_dump(mode="json")
    out: dict[str, dict[str, Any]] = {}
    contact = _present(dumped["contact"])
    if outcome.owner_email:
        contact["owner_email"] = outcome.owner_email
    out["contacts"] = contact
    if outcome.company:
        out["companies"] = _present(dumped["company"])
    if outcome.deal:
        deal = _present(dumped["deal"])
        deal["key"] = deal_key(outcome, dumped["contact"])
        if outcome.owner_email:
            deal["owner_email"] = outcome.owner_email
        out["deals"] = deal
    who = " ".join(p for p in (outcome.contact.first_name, outcome.contact.last_name) if p) or (
        outcome.contact.email or outcome.contact.phone or ""
    )
    call: dict[str, Any] = {
        "outcome_id": outcome.id,
        "occurred_at": outcome.occurred_at.isoformat(),
        "disposition": outcome.disposition.value,
        "direction": outcome.direction.value,
        "duration_seconds": outcome.duration_seconds,
        "title": f"Call with {who}: {outcome.disposition.value.replace('_', ' ')}",
    }
    for name in ("notes", "recording_url", "owner_email"):
        value = getattr(outcome, name)
        if value is not None:
            call[name] = value
    for name, value in outcome.custom.items():
        call[f"custom.{name}"] = value
    out["calls"] = call
    if outcome.next_step:
        step = outcome.next_step
        task: dict[str, Any] = {
            "outcome_id": outcome.id,
            "type": step.type,
            "due_at": step.due_at.isoformat(),
            "title": f"Follow up with {who}",
        }
        if step.notes:
            task["notes"] = step.notes
        if outcome.owner_email:
            task["owner_email"] = outcome.owner_email
        out["tasks"] = task
    return out


def _present(values: dict[str, Any]) -> dict[str, Any]:
    """A dumped model's fields that are set (``exclude_none``)."""
    return {k: v for k, v in values.items() if v is not None}


def utcnow() -> datetime:
    """Aware UTC now: the store keeps every instant in UTC."""
    return datetime.now(UTC)


def to_utc(value: datetime | None) -> datetime | None:
    """An aware UTC datetime (naive input is taken as UTC, as every CRM's API documents)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
