"""Dataverse rows <-> the flat properties the mapping speaks, for the five tables crmsync writes.

The mapping names columns as Dataverse does (``emailaddress1``, ``subject``) plus a few pseudo-fields
this module translates: ``ownerid`` (written as ``ownerid@odata.bind``, read from ``_ownerid_value``),
``duration_seconds`` (a phone call's ``actualdurationminutes``, rounded up to the minute),
``direction`` (``directioncode``: true = outgoing) and ``disposition`` (phone calls have no such
column: it becomes a line of the description). Links are navigation-property binds
(``parentcustomerid_account@odata.bind``, ``regardingobjectid_contact_phonecall@odata.bind``), and a
phone call's from/to are ``phonecall_activity_parties`` (mask 1 sender, 2 recipient).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from crmsync.providers.base import RemoteRecord


@dataclass(frozen=True)
class Table:
    logical: str  # contact
    entity_set: str  # contacts
    key: str  # contactid


TABLES = {
    "contacts": Table("contact", "contacts", "contactid"),
    "companies": Table("account", "accounts", "accountid"),
    "deals": Table("opportunity", "opportunities", "opportunityid"),
    "calls": Table("phonecall", "phonecalls", "activityid"),
    "tasks": Table("task", "tasks", "activityid"),
}
#: The column each canonical match key is looked up by (``key``: deals are found by their derived id).
MATCH_COLUMN = {
    ("contacts", "email"): "emailaddress1",
    ("contacts", "phone"): "telephone1",
    ("companies", "domain"): "websiteurl",
    ("companies", "name"): "name",
    ("deals", "name"): "name",
}
PARTY_FROM, PARTY_TO = 1, 2
#: Phone call and task states (reference §4): closed = state 1, status 2 (phone call "Made") / 5 (task "Completed").
CLOSED = {"calls": {"statecode": 1, "statuscode": 2}, "tasks": {"statecode": 1, "statuscode": 5}}
#: Columns each table's pull reads whatever the mapping says (ids of links, the clock).
ALWAYS = {
    "contacts": ["modifiedon", "_parentcustomerid_value", "_ownerid_value"],
    "companies": ["modifiedon", "_ownerid_value"],
    "deals": ["modifiedon", "_customerid_value", "_parentcontactid_value", "_parentaccountid_value", "_ownerid_value"],
    "calls": ["modifiedon", "_regardingobjectid_value", "_ownerid_value", "statecode"],
    "tasks": ["modifiedon", "_regardingobjectid_value", "_ownerid_value", "statecode"],
}
PSEUDO = {"duration_seconds": "actualdurationminutes", "direction": "directioncode", "ownerid": "_ownerid_value"}
REGARDING = ("deals", "contacts", "companies")  # what a call is about: its deal, else the person called
NAV = {"deals": "opportunity", "companies": "account", "contacts": "contact"}


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def utc_text(when: datetime) -> str:
    """Dataverse's datetime literal: UTC with a ``Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def minutes(seconds: Any) -> int | None:
    """Seconds as whole minutes, rounded up (a 20-second call is one minute, not zero)."""
    try:
        total = int(float(seconds))
    except (TypeError, ValueError):
        return None
    return (max(0, total) + 59) // 60


def select(obj: str, fields: list[str] | tuple[str, ...]) -> list[str]:
    """The ``$select`` columns for a pull: the mapping's fields (pseudo-fields translated) and ``ALWAYS``."""
    cols = [PSEUDO.get(f, f) for f in fields if f not in ("disposition",)]
    return list(dict.fromkeys([TABLES[obj].key, *cols, *ALWAYS[obj]]))


def bind(table: str, rid: str) -> str:
    return f"/{TABLES[table].entity_set}({rid})"


def body(obj: str, props: dict[str, Any], associations: dict[str, str]) -> dict[str, Any]:
    """The JSON a contact, account or opportunity is written with."""
    out = {k: v for k, v in props.items() if k not in ("ownerid",)}
    if props.get("ownerid"):
        out["ownerid@odata.bind"] = f"/systemusers({props['ownerid']})"
    if obj == "contacts" and associations.get("companies"):
        out["parentcustomerid_account@odata.bind"] = bind("companies", associations["companies"])
    if obj == "deals":
        # The customer is required: the account when there is one, else the contact.
        if associations.get("companies"):
            out["customerid_account@odata.bind"] = bind("companies", associations["companies"])
            if associations.get("contacts"):
                out["parentcontactid@odata.bind"] = bind("contacts", associations["contacts"])
        elif associations.get("contacts"):
            out["customerid_contact@odata.bind"] = bind("contacts", associations["contacts"])
    return out


def activity_body(
    obj: str, props: dict[str, Any], marker: str, associations: dict[str, str], *, me: str | None, marker_column: bool
) -> dict[str, Any]:
    """The JSON a phone call or task is created with: every column, its parties and what it is about.

    ``me`` is the connection's own systemuser: the caller's side of a call when no owner is named.
    """
    logical = TABLES[obj].logical
    out: dict[str, Any] = {}
    owner = props.get("ownerid") or None
    for key, value in props.items():
        if key in ("ownerid", "disposition", "duration_seconds", "direction"):
            continue
        out[key] = value
    if marker_column:
        out["crmsync_outcomeid"] = marker
    if owner:
        out["ownerid@odata.bind"] = f"/systemusers({owner})"
    for table in REGARDING:
        if associations.get(table):
            out[f"regardingobjectid_{NAV[table]}_{logical}@odata.bind"] = bind(table, associations[table])
            break
    if obj == "calls":
        if props.get("duration_seconds") is not None:
            out["actualdurationminutes"] = minutes(props["duration_seconds"])
        outgoing = str(props.get("direction", "outbound")).lower() not in ("inbound", "false", "0")
        out["directioncode"] = outgoing
        if props.get("disposition"):
            text = str(out.get("description") or "")
            out["description"] = (text + "\n" if text else "") + f"Disposition: {props['disposition']}"
        user = owner or me
        parties = []
        contact = associations.get("contacts")
        user_party = {"partyid_systemuser@odata.bind": f"/systemusers({user})"} if user else None
        contact_party = {"partyid_contact@odata.bind": bind("contacts", contact)} if contact else None
        caller, callee = (user_party, contact_party) if outgoing else (contact_party, user_party)
        if caller:
            parties.append({**caller, "participationtypemask": PARTY_FROM})
        if callee:
            parties.append({**callee, "participationtypemask": PARTY_TO})
        if parties:
            out["phonecall_activity_parties"] = parties
    return out


def record(obj: str, row: dict[str, Any]) -> RemoteRecord:
    """A row as the engine stores it: pseudo-fields filled in, links as associations."""
    table = TABLES[obj]
    props = {k: v for k, v in row.items() if not k.startswith("@") and "@" not in k}
    links: dict[str, list[str]] = {}
    if row.get("_ownerid_value"):
        props["ownerid"] = row["_ownerid_value"]
    if obj in ("calls", "tasks"):
        if row.get("actualdurationminutes") is not None:
            props["duration_seconds"] = int(row["actualdurationminutes"]) * 60
        if "directioncode" in row:
            props["direction"] = "outbound" if row["directioncode"] else "inbound"
        regarding = row.get("_regardingobjectid_value")
        kind = row.get("_regardingobjectid_value@Microsoft.Dynamics.CRM.lookuplogicalname")
        target = {v: k for k, v in NAV.items()}.get(str(kind))
        if regarding and target:
            links[target] = [str(regarding)]
    if obj == "contacts" and row.get("_parentcustomerid_value"):
        kind = row.get("_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname", "account")
        if kind == "account":
            links["companies"] = [str(row["_parentcustomerid_value"])]
    if obj == "deals":
        account = row.get("_parentaccountid_value")
        customer = row.get("_customerid_value")
        kind = row.get("_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname")
        if account or (customer and kind == "account"):
            links["companies"] = [str(account or customer)]
        contact = row.get("_parentcontactid_value") or (customer if kind == "contact" else None)
        if contact:
            links["contacts"] = [str(contact)]
    return RemoteRecord(
        id=str(row[table.key]).lower(),
        properties=props,
        updated_at=parse_time(row.get("modifiedon")),
        associations=links,
    )
