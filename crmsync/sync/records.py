"""Canonical records: a CRM record through the mapping, and the keys push matches records on.

Pull stores what ``to_canonical`` makes; push looks records up in the mirror by ``record_keys``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crmsync.model import NOT_PHONE, company_key
from crmsync.providers.base import RemoteRecord, match_key
from crmsync.store import Canonical

if TYPE_CHECKING:
    from crmsync.mapping import Mapping


def to_canonical(mapping: Mapping, obj: str, rec: RemoteRecord, problems: list[str] | None = None) -> Canonical:
    """A remote record through the mapping, with the keys push matches on.

    A CRM value a rule cannot convert drops that one field (reported in ``problems``) instead of
    the record: skipping the record would let the cursor pass it, and it would be lost.
    """
    from crmsync.mapping import TransformError

    raw = rec.properties
    for _ in range(len(raw) + 1):
        try:
            props = mapping.to_canonical(obj, raw)
            break
        except TransformError as exc:
            if not exc.field or exc.field not in raw:
                raise
            if problems is not None:
                problems.append(f"{obj} {rec.id}: {exc}")
            raw = {k: v for k, v in raw.items() if k != exc.field}  # a copy: rec.raw keeps every value
    else:  # pragma: no cover - each round removes a field
        props = {}
    keys = record_keys(obj, props)
    return Canonical(
        remote_id=rec.id,
        properties=props,
        raw=rec.properties,
        remote_updated_at=rec.updated_at,
        archived=rec.archived,
        associations=rec.associations,
        match_key=keys[0],
        alt_key=keys[1],
    )


def record_keys(obj: str, props: dict[str, Any]) -> tuple[str | None, str | None]:
    """(match_key, alt_key) of a canonical record: what push looks it up by in the mirror."""
    if obj == "contacts":
        # contact_key() spelled out: this runs for every pulled contact.
        email, phone = props.get("email"), props.get("phone")
        phone_key = "phone:" + NOT_PHONE.sub("", str(phone)) if phone else None
        if email:
            return "email:" + str(email).lower(), phone_key
        return phone_key, None
    if obj == "companies":
        primary = company_key(props)
        name = company_key({"name": props["name"]}) if props.get("name") else None
        return (match_key(primary) if primary else None, match_key(name) if name and name != primary else None)
    if obj == "deals" and props.get("key"):
        return (f"key:{props['key']}", None)
    if obj in ("calls", "tasks") and props.get("outcome_id"):
        return (f"outcome:{props['outcome_id']}", None)
    return (None, None)
