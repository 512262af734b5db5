"""Constants of the HubSpot API and pure value helpers (timestamps, association inputs)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from crmsync.providers.base import RemoteRecord

log = logging.getLogger("crmsync.hubspot")

API = "https://api.hubapi.com"
AUTHORIZE_URL = "https://app.hubspot.com/oauth/authorize"
SEARCH_CAP = 10_000
SEARCH_PAGE = 200
SEARCH_AHEAD = 3  # search pages of one walk asked for at once (offset paging allows it)
IN_MAX = 100  # values in one IN / NOT_IN search filter
# Filter groups in one search (ORed; HubSpot's documented maximum): a push's lookup of domains, names
# or phones asks for five IN filters of IN_MAX values at once, so 5,000 companies take 10 searches of
# the 5/s budget, not 50, and their writes no longer wait on the search budget.
SEARCH_GROUPS = 5
PARTITION_MIN = 2_000  # records below which a first walk stays one list chain (planning costs searches)
# Changes below which an incremental pull stays one search walk: the decision reads the total off the
# walk's own first page, so a pull below it makes exactly the requests it always did; above it the
# walk has 10 or more search pages, against which the plan's one search and discarded page are small.
PULL_PARTITION_MIN = 2_000
# The changed share of the records a pull's list side has read below which it stops (the search
# side then reads down to where it stopped): its pages would carry under a tenth of what a search
# page brings, each for a request of the general budget.
PULL_PARTITION_SHARE = 0.2
PULL_LIST_TRIAL = 3  # list pages a pull's list side reads before it judges its share
PULL_RTT_CAP = 0.25  # seconds: the longest round trip a pull's plan believes of its first search
ASSOC_AHEAD = 4  # association reads a pull's search side may have waiting while it searches on
PULL_MODE = "search-partitioned"  # the cursor mode of a partitioned incremental pull under way
ASSOC_BATCH = 1_000  # ids in one v4 association batch read
MAX_SEARCH_RANGES = 8  # hs_object_id ranges read through search beside the list walk, at most
LIST_PAGE = 100
BATCH = 100
MARKER = "crmsync_outcome_id"
DEAL_KEY = "crmsync_deal_key"
COMPANY_KEY = "crmsync_company_key"

#: Modified-date property per object (contacts are the odd one out).
MODIFIED = {"contacts": "lastmodifieddate"}
#: Associations pulled and stored per object type.
PULL_ASSOCIATIONS = {"contacts": ["companies"], "deals": ["contacts", "companies"], "calls": ["contacts"]}
#: HUBSPOT_DEFINED association type ids (reference §4), from -> to.
ASSOC_TYPES: dict[tuple[str, str], int] = {
    ("contacts", "companies"): 279,
    ("deals", "contacts"): 3,
    ("deals", "companies"): 341,
    ("calls", "contacts"): 194,
    ("calls", "companies"): 182,
    ("calls", "deals"): 206,
    ("tasks", "contacts"): 204,
    ("tasks", "companies"): 192,
    ("tasks", "deals"): 216,
}
REQUIRED_SCOPES = [
    "crm.objects.contacts.read",
    "crm.objects.contacts.write",
    "crm.objects.companies.read",
    "crm.objects.companies.write",
    "crm.objects.deals.read",
    "crm.objects.deals.write",
]
#: What push needs on top: its unique properties (on contacts' calls and tasks, companies, deals) and the owners.
PUSH_SCOPES = ["crm.schemas.contacts.write", "crm.schemas.companies.write", "crm.schemas.deals.write"]
DEFAULT_OAUTH_SCOPES = " ".join([*REQUIRED_SCOPES, *PUSH_SCOPES, "crm.objects.owners.read", "oauth"])
OWNERS_PAGE = 500  # the owners API's largest page


def modified_prop(obj: str) -> str:
    return MODIFIED.get(obj, "hs_lastmodifieddate")


def parse_ts(value: Any) -> datetime | None:
    """HubSpot datetimes come as ISO strings (or ms epoch strings in properties)."""
    if value in (None, ""):
        return None
    text = str(value)
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _inline_associations(obj: str, links: dict[str, str]) -> list[dict[str, Any]]:
    """A batch create input's ``associations``: HUBSPOT_DEFINED links to the given remote ids."""
    return [
        {
            "to": {"id": to_id},
            "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": ASSOC_TYPES[(obj, to)]}],
        }
        for to, to_id in links.items()
        if to_id and (obj, to) in ASSOC_TYPES
    ]


def _prop_ms(record: RemoteRecord, prop: str) -> int | None:
    value = parse_ts(record.properties.get(prop))
    return to_ms(value) if value else None


def _plural(name: str) -> str:
    return name if name.endswith("s") else name + "s"
