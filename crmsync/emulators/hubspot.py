"""A stateful, offline look-alike of HubSpot's CRM API (v3 objects, search, v4 associations, properties,
owners, OAuth, account info, call dispositions), plus what peers' connectors read first: the custom-object
schemas (none) and the legacy v1/v2 property lists.

Built from ``shared/reference/hubspot.md`` and the official OpenAPI specs in ``tests/specs/hubspot/``;
``tests/openapi_check.py`` validates the emulator's requests and responses against those specs.
Where the real API is known to depart from its spec the emulator follows the real API:

* 429 bodies carry ``errorType``/``policyName`` and no ``category`` (the spec's Error requires one);
* OAuth token errors are ``{status: "BAD_AUTH_CODE" | ..., message, correlationId}``;
* no ``Retry-After`` on 429: HubSpot's docs and changelog describe the ``X-HubSpot-RateLimit-*`` headers
  and no HubSpot page found promises Retry-After (a third-party PR, PostHog#64726, reports one on
  ``/oauth/v1/token`` 429s; unverified);
* requested-but-unset properties are left out instead of sent as ``null`` (the spec types them string).

Data structures keep a list page O(page) for a million records (ids are handed out in ascending order,
so each object type keeps a sorted id list and ``after`` is a bisect), and a search walk O(page) per
request after the first (the sorted match list is cached per query until the next write).
"""

from __future__ import annotations

import bisect
import calendar
import datetime as dt
import fnmatch
import functools
import json
import math
import random
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx

from crmsync.emulators.base import Emulator, Faults, _SlidingWindow, json_response, request_json
from crmsync.emulators.sandbox import Sandbox, SandboxOptions

__all__ = ["DEFAULT_DISPOSITIONS", "HubSpotEmulator", "build_hubspot"]

JSON = dict[str, Any]

BATCH_LIMIT = 100
LIST_LIMIT_MAX = 100
SEARCH_LIMIT_MAX = 200
SEARCH_WINDOW = 10_000
ASSOC_READ_LIMIT = 1_000
ASSOC_CREATE_LIMIT = 2_000
OWNERS_LIMIT_MAX = 500
#: Standard HubSpot objects the emulator does not model, answered as a portal whose app lacks their scope.
UNGRANTED_OBJECTS = {
    "tickets": "tickets",
    "0-5": "tickets",
    "products": "e-commerce",
    "line_items": "e-commerce",
    "quotes": "crm.objects.quotes.read",
}
DEFAULT_TOKEN_TTL = 1800.0
AUTH_CODE_TTL = 600.0
# HubSpot Professional private-app defaults (reference §6); used for the headers when no rate-limit
# fault is configured, so a client reading X-HubSpot-RateLimit-* sees the numbers it would in production.
DEFAULT_TEN_SECONDLY = (190, 10.0)
DEFAULT_DAILY_LIMIT = 650_000
# Seed data is anchored to a fixed instant so the same seed gives byte-identical records on every run.
SEED_EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z

NOT_FOUND_AUTH = (
    "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find "
    "more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview"
)

#: The six default call outcomes every portal has (reference §8): GUID → label.
DEFAULT_DISPOSITIONS: dict[str, str] = {
    "9d9162e7-6cf3-4944-bf63-4dff82258764": "Busy",
    "f240bbac-87c9-4f6e-bf70-924b57d47db7": "Connected",
    "a4c4c377-d246-4b32-a13b-75a56a4cd0ff": "Left live message",
    "b2cf5968-551e-4856-9783-52b3da59a7d0": "Left voicemail",
    "73a0d17f-1163-4015-bdd5-ec830791da20": "No answer",
    "17b47fee-58de-441e-a44c-c6300d46f273": "Wrong number",
}


# -- object types --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectType:
    """One CRM object type as HubSpot names it."""

    name: str  # plural path name, e.g. "contacts"
    type_id: str  # "0-1"
    singular: str  # "contact", used in v3 association type names
    scope: str  # the crm.objects.<scope>.* family that guards it
    created_prop: str
    modified_prop: str
    default_props: tuple[str, ...]
    text_props: tuple[str, ...]  # searched by the free-text `query`
    required: tuple[str, ...] = ()


OBJECT_TYPES: dict[str, ObjectType] = {
    o.name: o
    for o in (
        ObjectType(
            "contacts",
            "0-1",
            "contact",
            "contacts",
            "createdate",
            "lastmodifieddate",
            ("firstname", "lastname", "email"),
            ("firstname", "lastname", "email", "phone", "company"),
        ),
        ObjectType(
            "companies",
            "0-2",
            "company",
            "companies",
            "createdate",
            "hs_lastmodifieddate",
            ("name", "domain"),
            ("name", "domain", "phone", "website"),
        ),
        ObjectType(
            "deals",
            "0-3",
            "deal",
            "deals",
            "createdate",
            "hs_lastmodifieddate",
            ("dealname", "amount", "dealstage", "pipeline", "closedate"),
            ("dealname", "description"),
        ),
        ObjectType(
            "calls",
            "0-48",
            "call",
            "contacts",  # the spec guards calls with the contacts scopes
            "hs_createdate",
            "hs_lastmodifieddate",
            (),
            ("hs_call_title", "hs_call_body"),
            required=("hs_timestamp",),
        ),
        ObjectType(
            "tasks",
            "0-27",
            "task",
            "contacts",
            "hs_createdate",
            "hs_lastmodifieddate",
            (),
            ("hs_task_subject", "hs_task_body"),
            required=("hs_timestamp",),
        ),
    )
}
_BY_ALIAS: dict[str, ObjectType] = {}
for _o in OBJECT_TYPES.values():
    _BY_ALIAS[_o.name] = _BY_ALIAS[_o.type_id] = _BY_ALIAS[_o.singular] = _o

ALL_SCOPES: tuple[str, ...] = (
    "oauth",
    "crm.objects.contacts.read",
    "crm.objects.contacts.write",
    "crm.objects.companies.read",
    "crm.objects.companies.write",
    "crm.objects.deals.read",
    "crm.objects.deals.write",
    "crm.objects.owners.read",
    "crm.schemas.contacts.read",
    "crm.schemas.contacts.write",
    "crm.schemas.companies.read",
    "crm.schemas.companies.write",
    "crm.schemas.deals.read",
    "crm.schemas.deals.write",
)

# -- associations (reference §4: HUBSPOT_DEFINED type ids depend on direction) ------------------------
# (from, to) -> (default unlabelled type id, {type id: label or None})
ASSOCIATION_TYPES: dict[tuple[str, str], tuple[int, dict[int, str | None]]] = {
    ("contacts", "companies"): (279, {279: None, 1: "Primary"}),
    ("companies", "contacts"): (280, {280: None, 2: "Primary"}),
    ("deals", "contacts"): (3, {3: None}),
    ("contacts", "deals"): (4, {4: None}),
    ("deals", "companies"): (341, {341: None, 5: "Primary"}),
    ("companies", "deals"): (342, {342: None, 6: "Primary"}),
    ("calls", "contacts"): (194, {194: None}),
    ("contacts", "calls"): (193, {193: None}),
    ("calls", "companies"): (182, {182: None}),
    ("companies", "calls"): (181, {181: None}),
    ("calls", "deals"): (206, {206: None}),
    ("deals", "calls"): (205, {205: None}),
    ("tasks", "contacts"): (204, {204: None}),
    ("contacts", "tasks"): (203, {203: None}),
    ("tasks", "companies"): (192, {192: None}),
    ("companies", "tasks"): (191, {191: None}),
    ("tasks", "deals"): (216, {216: None}),
    ("deals", "tasks"): (215, {215: None}),
}
INVERSE_TYPE: dict[int, int] = {}
for (_a, _b), (_default, _types) in ASSOCIATION_TYPES.items():
    _back_default, _back_types = ASSOCIATION_TYPES[(_b, _a)]
    INVERSE_TYPE[_default] = _back_default
    for _tid, _label in _types.items():
        if _label is not None:
            INVERSE_TYPE[_tid] = next(t for t, lab in _back_types.items() if lab == _label)
# A labelled ("Primary") type may be held by one target only, and always comes with the unlabelled type.
PRIMARY_TYPES = frozenset(t for _d, types in ASSOCIATION_TYPES.values() for t, lab in types.items() if lab)


def _v3_type_name(from_obj: str, to_obj: str, type_id: int) -> str:
    """The v3 ``associations`` ``type`` string: primary pairs call the unlabelled one ``*_unlabeled``."""
    a, b = OBJECT_TYPES[from_obj].singular, OBJECT_TYPES[to_obj].singular
    default, types = ASSOCIATION_TYPES[(from_obj, to_obj)]
    if type_id == default and len(types) > 1:
        return f"{a}_to_{b}_unlabeled"
    return f"{a}_to_{b}"


# -- property definitions --------------------------------------------------------------------------
def _prop(
    name: str,
    label: str,
    type_: str,
    field_type: str,
    group: str,
    *,
    options: Iterable[tuple[str, str]] = (),
    read_only: bool = False,
    calculated: bool = False,
    external: bool = False,
    unique: bool = False,
    description: str = "",
) -> JSON:
    return {
        "name": name,
        "label": label,
        "type": type_,
        "fieldType": field_type,
        "description": description,
        "groupName": group,
        "options": [
            {"label": lab, "value": val, "displayOrder": i, "hidden": False} for i, (val, lab) in enumerate(options)
        ],
        "displayOrder": -1,
        "calculated": calculated,
        "externalOptions": external,
        "hasUniqueValue": unique,
        "hidden": False,
        "hubspotDefined": True,
        "modificationMetadata": {
            "archivable": False,
            "readOnlyDefinition": True,
            "readOnlyValue": read_only,
        },
        "formField": not read_only,
        "dataSensitivity": "non_sensitive",
        "archived": False,
    }


_LIFECYCLE = (
    ("subscriber", "Subscriber"),
    ("lead", "Lead"),
    ("marketingqualifiedlead", "Marketing Qualified Lead"),
    ("salesqualifiedlead", "Sales Qualified Lead"),
    ("opportunity", "Opportunity"),
    ("customer", "Customer"),
    ("evangelist", "Evangelist"),
    ("other", "Other"),
)
_LEAD_STATUS = (
    ("NEW", "New"),
    ("OPEN", "Open"),
    ("IN_PROGRESS", "In Progress"),
    ("OPEN_DEAL", "Open Deal"),
    ("UNQUALIFIED", "Unqualified"),
    ("ATTEMPTED_TO_CONTACT", "Attempted to Contact"),
    ("CONNECTED", "Connected"),
    ("BAD_TIMING", "Bad Timing"),
)
_DEAL_STAGES = (
    ("appointmentscheduled", "Appointment Scheduled"),
    ("qualifiedtobuy", "Qualified To Buy"),
    ("presentationscheduled", "Presentation Scheduled"),
    ("decisionmakerboughtin", "Decision Maker Bought-In"),
    ("contractsent", "Contract Sent"),
    ("closedwon", "Closed Won"),
    ("closedlost", "Closed Lost"),
)
_CALL_STATUS = tuple(
    (s, s.replace("_", " ").title())
    for s in (
        "BUSY",
        "CALLING_CRM_USER",
        "CANCELED",
        "COMPLETED",
        "CONNECTING",
        "FAILED",
        "IN_PROGRESS",
        "MISSED",
        "NO_ANSWER",
        "QUEUED",
        "RINGING",
    )
)
_TASK_STATUS = (
    ("NOT_STARTED", "Not started"),
    ("IN_PROGRESS", "In progress"),
    ("WAITING", "Waiting"),
    ("COMPLETED", "Completed"),
    ("DEFERRED", "Deferred"),
)


def _owner() -> JSON:
    prop = _prop("hubspot_owner_id", "Owner", "enumeration", "select", "sales_properties", external=True)
    prop["referencedObjectType"] = "OWNER"
    return prop


def _meta(obj: ObjectType) -> list[JSON]:
    """The read-only properties every object has."""
    group = f"{obj.singular}information"
    return [
        _prop(obj.created_prop, "Create Date", "datetime", "date", group, read_only=True),
        _prop(obj.modified_prop, "Last Modified Date", "datetime", "date", group, read_only=True, calculated=True),
        _prop("hs_object_id", "Record ID", "number", "number", group, read_only=True),
    ]


def _builtin_properties() -> dict[str, dict[str, JSON]]:
    c, co, d, ca, t = (OBJECT_TYPES[n] for n in ("contacts", "companies", "deals", "calls", "tasks"))
    ci, coi, di = "contactinformation", "companyinformation", "dealinformation"
    defs: dict[str, list[JSON]] = {
        "contacts": [
            _prop("email", "Email", "string", "text", ci),
            _prop("firstname", "First Name", "string", "text", ci),
            _prop("lastname", "Last Name", "string", "text", ci),
            _prop("phone", "Phone Number", "string", "phonenumber", ci),
            _prop("mobilephone", "Mobile Phone Number", "string", "phonenumber", ci),
            _prop("company", "Company Name", "string", "text", ci),
            _prop("jobtitle", "Job Title", "string", "text", ci),
            _prop("website", "Website URL", "string", "text", ci),
            _prop("address", "Street Address", "string", "text", ci),
            _prop("city", "City", "string", "text", ci),
            _prop("state", "State/Region", "string", "text", ci),
            _prop("zip", "Postal Code", "string", "text", ci),
            _prop("country", "Country/Region", "string", "text", ci),
            _prop("lifecyclestage", "Lifecycle Stage", "enumeration", "radio", ci, options=_LIFECYCLE),
            _prop("hs_lead_status", "Lead Status", "enumeration", "radio", "sales_properties", options=_LEAD_STATUS),
            _owner(),
            _prop("associatedcompanyid", "Primary Associated Company ID", "number", "number", ci),
            _prop("hs_email_domain", "Email Domain", "string", "text", ci, read_only=True, calculated=True),
            _prop("notes_last_contacted", "Last Contacted", "datetime", "date", ci, read_only=True, calculated=True),
            *_meta(c),
        ],
        "companies": [
            _prop("name", "Company name", "string", "text", coi),
            _prop("domain", "Company Domain Name", "string", "text", coi),
            _prop("phone", "Phone Number", "string", "phonenumber", coi),
            _prop("website", "Website URL", "string", "text", coi),
            _prop("address", "Street Address", "string", "text", coi),
            _prop("city", "City", "string", "text", coi),
            _prop("state", "State/Region", "string", "text", coi),
            _prop("zip", "Postal Code", "string", "text", coi),
            _prop("country", "Country/Region", "string", "text", coi),
            _prop("numberofemployees", "Number of Employees", "number", "number", coi),
            _prop("annualrevenue", "Annual Revenue", "number", "number", coi),
            _prop("description", "Description", "string", "textarea", coi),
            _prop("lifecyclestage", "Lifecycle Stage", "enumeration", "radio", coi, options=_LIFECYCLE),
            _owner(),
            _prop(
                "num_associated_contacts",
                "Number of Associated Contacts",
                "number",
                "number",
                coi,
                read_only=True,
                calculated=True,
            ),
            *_meta(co),
        ],
        "deals": [
            _prop("dealname", "Deal Name", "string", "text", di),
            _prop("amount", "Amount", "number", "number", di),
            _prop("dealstage", "Deal Stage", "enumeration", "radio", di, options=_DEAL_STAGES),
            _prop("pipeline", "Pipeline", "enumeration", "select", di, options=(("default", "Sales Pipeline"),)),
            _prop("closedate", "Close Date", "datetime", "date", di),
            # Multi-currency portals: the values are the currencies the portal has enabled.
            _prop(
                "deal_currency_code",
                "Currency",
                "enumeration",
                "select",
                di,
                options=(("USD", "US Dollar"), ("EUR", "Euro"), ("GBP", "British Pound")),
            ),
            _prop(
                "dealtype",
                "Deal Type",
                "enumeration",
                "radio",
                di,
                options=(("newbusiness", "New Business"), ("existingbusiness", "Existing Business")),
            ),
            _prop("description", "Deal Description", "string", "textarea", di),
            _owner(),
            *_meta(d),
        ],
        "calls": [
            _prop("hs_timestamp", "Activity date", "datetime", "date", "call"),
            _prop("hs_call_title", "Call Title", "string", "text", "call"),
            _prop("hs_call_body", "Call notes", "string", "html", "call"),
            _prop("hs_call_duration", "Call duration", "number", "number", "call"),
            _prop(
                "hs_call_direction",
                "Call direction",
                "enumeration",
                "select",
                "call",
                options=(("INBOUND", "Inbound"), ("OUTBOUND", "Outbound")),
            ),
            _prop("hs_call_status", "Call status", "enumeration", "select", "call", options=_CALL_STATUS),
            # Outcomes are per-portal GUIDs served by /calling/v1/dispositions, not fixed options.
            _prop("hs_call_disposition", "Call outcome", "enumeration", "select", "call", external=True),
            _prop("hs_call_from_number", "From number", "string", "text", "call"),
            _prop("hs_call_to_number", "To number", "string", "text", "call"),
            _prop("hs_call_recording_url", "Recording URL", "string", "text", "call"),
            _owner(),
            *_meta(ca),
        ],
        "tasks": [
            _prop("hs_timestamp", "Due date", "datetime", "date", "task"),
            _prop("hs_task_subject", "Task Title", "string", "text", "task"),
            _prop("hs_task_body", "Notes", "string", "html", "task"),
            _prop("hs_task_status", "Task Status", "enumeration", "select", "task", options=_TASK_STATUS),
            _prop(
                "hs_task_priority",
                "Priority",
                "enumeration",
                "select",
                "task",
                options=(("NONE", "None"), ("LOW", "Low"), ("MEDIUM", "Medium"), ("HIGH", "High")),
            ),
            _prop(
                "hs_task_type",
                "Task Type",
                "enumeration",
                "select",
                "task",
                options=(("CALL", "Call"), ("EMAIL", "Email"), ("TODO", "To-do")),
            ),
            _owner(),
            *_meta(t),
        ],
    }
    return {obj: {p["name"]: p for p in props} for obj, props in defs.items()}


# -- time helpers --------------------------------------------------------------------------------
def iso_ms(ms: int) -> str:
    """Epoch milliseconds as HubSpot writes datetimes: ``2024-01-02T03:04:05.678Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=65_536)
def to_ms(value: str) -> int | None:
    """A datetime filter or property value (ms epoch, ISO 8601 or a date) as epoch ms; None if invalid."""
    value = value.strip()
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return calendar.timegm(parsed.utctimetuple()) * 1000 + parsed.microsecond // 1000


def _new_correlation_id() -> str:
    return str(uuid.uuid4())


# -- records -------------------------------------------------------------------------------------
class _Record:
    """One CRM record. ``props`` holds only stored values; the meta properties derive from the fields."""

    __slots__ = ("archived_at", "created", "id", "props", "updated")

    def __init__(self, id_: int, props: dict[str, str], created: int, updated: int) -> None:
        self.id = id_
        self.props = props
        self.created = created
        self.updated = updated
        self.archived_at: int | None = None


class _Store:
    """The records of one object type, with the indexes the endpoints need."""

    def __init__(self) -> None:
        self.records: dict[int, _Record] = {}
        self.active: list[int] = []  # sorted ascending; ids are issued in ascending order
        self.archived: list[int] = []  # sorted ascending
        self.unique: dict[str, dict[str, int]] = {}  # property -> normalised value -> id
        self.version = 0  # bumped by every write; keys the search cache


class _ItemError(Exception):
    """One failed batch input (or a failed single write)."""

    def __init__(
        self,
        status: int,
        category: str,
        message: str,
        *,
        errors: list[JSON] | None = None,
        context: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.category, self.message = status, category, message
        self.errors = errors or [{"message": message}]
        self.context = context or {}


@dataclass
class _Token:
    scopes: list[str]
    expires_at: float  # emulator clock seconds
    refresh: str


@dataclass
class _Refresh:
    scopes: list[str]
    client_id: str


class HubSpotEmulator(Emulator):
    """HubSpot's CRM API, in memory. See the module docstring for what is covered."""

    provider = "hubspot"

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        seed: int = 0,
        contacts: int = 0,
        companies: int = 0,
        deals: int = 0,
        private_app_token: str = "pat-na1-00000000-0000-4000-8000-000000000000",
        client_id: str = "emulator-client-id",
        client_secret: str = "emulator-client-secret",
        portal_id: int = 12345678,
        scopes: list[str] | None = None,
    ) -> None:
        super().__init__(faults=faults)
        self.seed_value = seed
        self.private_app_token = private_app_token
        self.client_id = client_id
        self.client_secret = client_secret
        self.portal_id = portal_id
        self.app_id = 3456789
        self.user_id = 7654321
        self.user = "emulator.user@example.com"
        self.hub_domain = f"emulator-{portal_id}.hubspot.test"
        self.private_app_scopes = list(scopes) if scopes is not None else list(ALL_SCOPES)
        self.daily_limit = DEFAULT_DAILY_LIMIT
        self._stores: dict[str, _Store] = {name: _Store() for name in OBJECT_TYPES}
        self._props = _builtin_properties()
        self._next_id = 100
        self._links: dict[tuple[str, int], dict[str, dict[int, set[int]]]] = {}
        self._search_cache: OrderedDict[tuple[Any, ...], list[int]] = OrderedDict()
        #: Search's index lag (reference §3: "Indexing lags a few seconds"); 0 by default so other
        #: tests see writes at once. A record written less than this long ago is not yet found.
        self.search_lag_ms = 0.0
        self._tokens: dict[str, _Token] = {}
        self._refresh_tokens: dict[str, _Refresh] = {}
        self._codes: dict[str, tuple[str, str, list[str], float]] = {}  # code -> client, redirect, scopes, exp
        self._dispositions: dict[str, str] = dict(DEFAULT_DISPOSITIONS)
        self._id_rng = random.Random(f"hubspot-ids-{seed}")
        self._owner_rng = random.Random(f"hubspot-owners-{seed}")
        # The connection's own user and two reps; add_owner() adds more.
        self._owners: list[JSON] = []
        self._live_owners: set[str] = set()  # ids a record's hubspot_owner_id may take
        for email, first, last, user_id in (
            (self.user, "Emulator", "User", self.user_id),
            ("ada.rep@example.com", "Ada", "Rep", self.user_id + 1),
            ("ben.rep@example.com", "Ben", "Rep", self.user_id + 2),
        ):
            self.add_owner(email, first_name=first, last_name=last, user_id=user_id)
        self._header_window = _SlidingWindow(*DEFAULT_TEN_SECONDLY)
        self._daily_day = ""
        self._daily_count = 0
        self._register_routes()
        if contacts or companies or deals:
            self.seed(contacts=contacts, companies=companies, deals=deals)

    # -- routes --------------------------------------------------------------------------------
    def _register_routes(self) -> None:
        obj = r"(?P<obj>[A-Za-z0-9_-]+)"
        rid = r"(?P<record_id>[^/]+)"
        r = self.route
        r("GET", f"/crm/v3/objects/{obj}", self._h_list, name="crm.objects.list")
        r("POST", f"/crm/v3/objects/{obj}/search", self._h_search, bucket="search", name="crm.objects.search")
        for op in ("read", "create", "update", "upsert", "archive"):
            r("POST", f"/crm/v3/objects/{obj}/batch/{op}", self._h_batch, name=f"crm.objects.batch.{op}")
        r("POST", f"/crm/v3/objects/{obj}", self._h_create, name="crm.objects.create")
        r("GET", f"/crm/v3/objects/{obj}/{rid}", self._h_get, name="crm.objects.get")
        r("PATCH", f"/crm/v3/objects/{obj}/{rid}", self._h_update, name="crm.objects.update")
        r("DELETE", f"/crm/v3/objects/{obj}/{rid}", self._h_archive, name="crm.objects.archive")

        pair = r"/(?P<from_obj>[A-Za-z0-9_-]+)/(?P<from_id>[^/]+)/associations"
        r(
            "PUT",
            f"/crm/v4/objects{pair}/default/(?P<to_obj>[^/]+)/(?P<to_id>[^/]+)",
            self._h_v4_put_default,
            name="crm.associations.default",
        )
        r("GET", f"/crm/v4/objects{pair}/(?P<to_obj>[^/]+)", self._h_v4_list, name="crm.associations.list")
        r(
            "PUT",
            f"/crm/v4/objects{pair}/(?P<to_obj>[^/]+)/(?P<to_id>[^/]+)",
            self._h_v4_put_labels,
            name="crm.associations.labels",
        )
        r(
            "DELETE",
            f"/crm/v4/objects{pair}/(?P<to_obj>[^/]+)/(?P<to_id>[^/]+)",
            self._h_v4_delete,
            name="crm.associations.delete",
        )
        batch = r"/crm/v4/associations/(?P<from_obj>[^/]+)/(?P<to_obj>[^/]+)/batch"
        r("POST", f"{batch}/read", self._h_v4_batch_read, name="crm.associations.batch.read")
        r("POST", f"{batch}/create", self._h_v4_batch_create, name="crm.associations.batch.create")
        r("POST", f"{batch}/associate/default", self._h_v4_batch_default, name="crm.associations.batch.default")
        r("POST", f"{batch}/archive", self._h_v4_batch_archive, name="crm.associations.batch.archive")
        r("POST", f"{batch}/labels/archive", self._h_v4_batch_labels_archive, name="crm.associations.batch.unlabel")

        r("GET", f"/crm/v3/properties/{obj}", self._h_props_list, name="crm.properties.list")
        r("POST", f"/crm/v3/properties/{obj}", self._h_props_create, name="crm.properties.create")
        r("GET", f"/crm/v3/properties/{obj}/(?P<prop>[^/]+)", self._h_props_get, name="crm.properties.get")

        r("GET", "/crm/v3/owners/?", self._h_owners, name="crm.owners.list")
        r("GET", "/crm/v3/owners/(?P<owner_id>[^/]+)", self._h_owner, name="crm.owners.get")
        r("GET", "/crm/v3/schemas/?", self._h_schemas, name="crm.schemas.list")
        # The path the official SDKs use for the same listing.
        r("GET", "/crm-object-schemas/v3/schemas/?", self._h_schemas, name="crm.schemas.list.sdk")
        # Legacy property lists, still served and still read by Singer's tap-hubspot (4.x).
        r("GET", "/properties/v(?P<version>[12])/(?P<obj>[a-z]+)/properties", self._h_legacy_props, name="legacy.props")
        r("GET", "/companies/v2/properties", self._h_legacy_company_props, name="legacy.company-props")

        r("GET", "/calling/v1/dispositions", self._h_dispositions, name="calling.dispositions")
        r("GET", "/account-info/v3/details", self._h_account, name="account.details")
        r("GET", "/account-info/v3/api-usage/daily/private-apps", self._h_usage, name="account.usage")
        # Documented at the end of developers.hubspot.com/docs/api/private-apps: a token's own scopes.
        r(
            "POST",
            "/oauth/v2/private-apps/get/access-token-info",
            self._h_private_token_info,
            bucket="oauth",
            name="oauth.private-apps.token-info",
        )

        r("GET", "/oauth/authorize", self._h_authorize, bucket="none", name="oauth.authorize")
        r("POST", "/oauth/v1/token", self._h_token, bucket="oauth", name="oauth.token")
        r("POST", "/oauth/v3/token", self._h_token, bucket="oauth", name="oauth.v3.token")
        r(
            "GET",
            "/oauth/v1/access-tokens/(?P<token>[^/]+)",
            self._h_access_token_info,
            bucket="oauth",
            name="oauth.access-token",
        )
        r(
            "GET",
            "/oauth/v1/refresh-tokens/(?P<token>[^/]+)",
            self._h_refresh_token_info,
            bucket="oauth",
            name="oauth.refresh-token",
        )
        r(
            "DELETE",
            "/oauth/v1/refresh-tokens/(?P<token>[^/]+)",
            self._h_refresh_token_delete,
            bucket="oauth",
            name="oauth.refresh-token.delete",
        )
        # Named so the base does not count introspection as a write.
        r("POST", "/oauth/v3/token/introspect", self._h_introspect, bucket="oauth", name="oauth.introspect.read")
        r("POST", "/oauth/v3/token/revoke", self._h_revoke, bucket="oauth", name="oauth.revoke")

    # -- error envelopes -----------------------------------------------------------------------
    def error_response(self, status: int, message: str, **extra: Any) -> httpx.Response:
        """HubSpot's error body: ``{status: "error", message, correlationId, category, ...}``."""
        category = extra.pop("category", None) or _default_category(status)
        body = {"status": "error", "message": message, "correlationId": _new_correlation_id(), "category": category}
        body.update(extra)
        return json_response(body, status)

    def rate_limited_response(self, bucket: str, retry_after: float) -> httpx.Response:
        """HubSpot's 429: ten-secondly for the default bucket, secondly for search (no Retry-After)."""
        if bucket in ("search", "concurrency"):
            message, policy, group = "You have reached your secondly limit.", "SECONDLY", "search-api-calls-secondly"
        else:
            message, policy = "You have reached your ten_secondly_rolling limit.", "TEN_SECONDLY_ROLLING"
            group = "private-app-api-calls-ten-secondly"
        body = {
            "status": "error",
            "message": message,
            "errorType": "RATE_LIMIT",
            "correlationId": _new_correlation_id(),
            "policyName": policy,
            "groupName": f"publicapi:{group}:{self.portal_id}",
        }
        return json_response(body, 429)

    def unknown_route(self, request: httpx.Request) -> httpx.Response:
        """404 for paths HubSpot does not have."""
        return self.error_response(
            404, f"Unable to route {request.method} {request.url.path}", category="OBJECT_NOT_FOUND"
        )

    def _bad(self, message: str, **extra: Any) -> httpx.Response:
        return self.error_response(400, message, category="VALIDATION_ERROR", **extra)

    # -- auth ----------------------------------------------------------------------------------
    def _bearer(self, request: httpx.Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    def authenticate(self, request: httpx.Request, route_name: str) -> httpx.Response | None:
        """401 unless the request carries the private-app token or a live OAuth access token."""
        if route_name.startswith("oauth"):
            return None
        token = self._bearer(request)
        if token and token == self.private_app_token:
            return None
        info = self._tokens.get(token) if token else None
        if info is None:
            return self.error_response(401, NOT_FOUND_AUTH, category="INVALID_AUTHENTICATION")
        now = self.now()
        if info.expires_at <= now:
            return self.error_response(
                401,
                f"The OAuth token used to make this call expired {_ago(now - info.expires_at)} ago.",
                category="EXPIRED_AUTHENTICATION",
            )
        return None

    def _scopes_of(self, request: httpx.Request) -> list[str]:
        token = self._bearer(request)
        if token == self.private_app_token:
            return self.private_app_scopes
        info = self._tokens.get(token)
        return info.scopes if info else []

    def _require(self, request: httpx.Request, *any_of: str) -> httpx.Response | None:
        """403 MISSING_SCOPES unless the token holds one of ``any_of``."""
        granted = self._scopes_of(request)
        if any(scope in granted for scope in any_of):
            return None
        return self._missing_scopes(*any_of)

    def _object_access(self, request: httpx.Request, obj: ObjectType, access: str) -> httpx.Response | None:
        return self._require(request, f"crm.objects.{obj.scope}.{access}")

    # -- rate-limit headers and the daily quota --------------------------------------------------
    def _dispatch(self, request: httpx.Request, in_flight: int) -> httpx.Response:
        matched = self._match(request)
        bucket = matched[2] if matched else ""
        private_app = self._bearer(request) == self.private_app_token
        if bucket == "default" and private_app:
            with self.lock:
                self._roll_day()
                if self._daily_count >= self.daily_limit:
                    self.stats.requests += 1
                    self.stats.rate_limited += 1
                    return self._daily_limited()
        response = super()._dispatch(request, in_flight)
        if bucket != "default":
            return response  # HubSpot sends no rate-limit headers on search (or OAuth) responses
        with self.lock:
            limit, window = self.faults.rate_limits.get("default") or DEFAULT_TEN_SECONDLY
            now = time.monotonic()
            counter = self._windows.get("default")
            if counter is None:
                counter = self._header_window
                counter.admit(now)
            used = counter.used(now, window)
            response.headers["X-HubSpot-RateLimit-Max"] = str(limit)
            response.headers["X-HubSpot-RateLimit-Remaining"] = str(max(0, limit - used))
            response.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] = str(int(window * 1000))
            if private_app:  # OAuth calls carry no daily headers (there is no daily cap for them)
                if response.status_code != 429:
                    self._daily_count += 1
                response.headers["X-HubSpot-RateLimit-Daily"] = str(self.daily_limit)
                response.headers["X-HubSpot-RateLimit-Daily-Remaining"] = str(
                    max(0, self.daily_limit - self._daily_count)
                )
        return response

    def _roll_day(self) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime(self.now()))
        if day != self._daily_day:
            self._daily_day, self._daily_count = day, 0

    def _daily_limited(self) -> httpx.Response:
        body = {
            "status": "error",
            "message": "You have reached your daily limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": _new_correlation_id(),
            "policyName": "DAILY",
            "groupName": f"publicapi:private-app-api-calls-daily:{self.portal_id}",
        }
        response = json_response(body, 429)
        response.headers["X-HubSpot-RateLimit-Daily"] = str(self.daily_limit)
        response.headers["X-HubSpot-RateLimit-Daily-Remaining"] = "0"
        return response

    # -- lookup helpers --------------------------------------------------------------------------
    def _object(self, name: str) -> ObjectType | None:
        return _BY_ALIAS.get(name.lower())

    def _unknown_object(self, name: str) -> httpx.Response:
        scope = UNGRANTED_OBJECTS.get(name.lower())
        if scope is not None:
            # A standard object the emulated private app holds no scope for (tickets, products ...).
            return self._missing_scopes(scope)
        return self._bad(f"Unable to infer object type from: {name}")

    def _missing_scopes(self, *scopes: str) -> httpx.Response:
        """403 MISSING_SCOPES naming the scopes any one of which would do."""
        return self.error_response(
            403,
            "This app hasn't been granted all required scopes to make this call. Read more about required "
            "scopes here: https://developers.hubspot.com/scopes.",
            category="MISSING_SCOPES",
            errors=[
                {
                    "message": "One or more of the following scopes are required.",
                    "context": {"requiredGranularScopes": list(scopes)},
                }
            ],
        )

    def _now_ms(self) -> int:
        return int(self.now() * 1000)

    def _issue_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _find(self, obj: ObjectType, ident: str, id_property: str | None = None) -> _Record | None:
        """A live or archived record by id, or by a unique property's value."""
        store = self._stores[obj.name]
        if id_property and id_property != "hs_object_id":
            rid = store.unique.get(id_property, {}).get(_unique_key(id_property, ident))
            return store.records.get(rid) if rid is not None else None
        try:
            return store.records.get(int(ident))
        except ValueError:
            return None

    def _is_unique_prop(self, obj: ObjectType, name: str) -> bool:
        if obj.name == "contacts" and name == "email":
            return True
        definition = self._props[obj.name].get(name)
        return bool(definition and definition.get("hasUniqueValue"))

    # -- shaping records -------------------------------------------------------------------------
    def _prop_value(self, obj: ObjectType, rec: _Record, name: str) -> str | None:
        if name == "hs_object_id":
            return str(rec.id)
        if name == obj.created_prop:
            return iso_ms(rec.created)
        if name == obj.modified_prop:
            return iso_ms(rec.updated)
        return rec.props.get(name)

    def _shape(
        self,
        obj: ObjectType,
        rec: _Record,
        wanted: Iterable[str] | None = None,
        *,
        history: Iterable[str] = (),
        associations: Iterable[str] = (),
    ) -> JSON:
        """The v3 record JSON. ``wanted=None`` returns every stored property."""
        names = list(rec.props) if wanted is None else list(wanted)
        props: dict[str, str] = {}
        for name in (*names, obj.created_prop, obj.modified_prop, "hs_object_id"):
            value = self._prop_value(obj, rec, name)
            if value is not None:  # the spec types values as strings, so unset ones are left out
                props[name] = value
        body: JSON = {
            "id": str(rec.id),
            "properties": props,
            "createdAt": iso_ms(rec.created),
            "updatedAt": iso_ms(rec.updated),
            "archived": rec.archived_at is not None,
        }
        if rec.archived_at is not None:
            body["archivedAt"] = iso_ms(rec.archived_at)
        hist = {}
        for name in history:
            value = self._prop_value(obj, rec, name)
            if value is not None:
                hist[name] = [{"value": value, "timestamp": iso_ms(rec.updated), "sourceType": "API"}]
        if hist:
            body["propertiesWithHistory"] = hist
        assoc: JSON = {}
        for to_name in associations:
            to_obj = self._object(to_name)
            if to_obj is None or (obj.name, to_obj.name) not in ASSOCIATION_TYPES:
                continue  # the spec: unknown association types are ignored
            results = [
                {"id": str(to_id), "type": _v3_type_name(obj.name, to_obj.name, type_id)}
                for to_id, types in self._targets(obj.name, rec.id, to_obj.name).items()
                for type_id in sorted(types, key=lambda t: t != ASSOCIATION_TYPES[(obj.name, to_obj.name)][0])
            ]
            if results:
                assoc[to_name] = {"results": results}
        if assoc:
            body["associations"] = assoc
        return body

    def _requested(self, obj: ObjectType, names: list[str]) -> list[str]:
        """The property names a read returns: the ones asked for, else the object's defaults."""
        return names if names else list(obj.default_props)

    # -- property validation ---------------------------------------------------------------------
    def _validate(self, obj: ObjectType, raw: Any, *, creating: bool) -> dict[str, str]:
        """Normalise a write's properties or raise ``_ItemError`` (HubSpot's VALIDATION_ERROR)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _ItemError(400, "VALIDATION_ERROR", "properties must be an object of property names to values")
        defs = self._props[obj.name]
        problems: list[JSON] = []
        out: dict[str, str] = {}

        def invalid(name: str, code: str, message: str) -> None:
            problems.append({"isValid": False, "message": message, "error": code, "name": name})

        for name, value in raw.items():
            definition = defs.get(name)
            if definition is None or definition.get("archived"):
                invalid(name, "PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist')
                continue
            if definition["modificationMetadata"]["readOnlyValue"]:
                invalid(name, "READ_ONLY_VALUE", f'"{name}" is a read only property; its value cannot be set.')
                continue
            if value is None:
                value = ""
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, int | float):
                value = str(value)
            elif not isinstance(value, str):
                invalid(name, "INVALID_VALUE", f"{json.dumps(value)} is not a valid value for {name}")
                continue
            if value == "":
                out[name] = ""  # "" clears the value
                continue
            normalised = _normalise(definition, value)
            if normalised is None:
                invalid(name, _invalid_code(definition), f"{value!r} is not a valid {definition['type']} for {name}")
                continue
            if definition.get("referencedObjectType") == "OWNER" and not self._is_owner(normalised):
                invalid(name, "INVALID_OPTION", f"{value} was not one of the allowed options: the portal's owners")
                continue
            out[name] = normalised
        if creating:
            for name in obj.required:
                if not out.get(name):
                    invalid(name, "REQUIRED_PROPERTY", f"{name} is required")
        if problems:
            raise _ItemError(
                400,
                "VALIDATION_ERROR",
                f"Property values were not valid: {json.dumps(problems)}",
                errors=[
                    {"message": p["message"], "code": p["error"], "context": {"propertyName": [p["name"]]}}
                    for p in problems
                ],
            )
        return out

    def _is_owner(self, owner_id: str) -> bool:
        return owner_id in self._live_owners

    def _check_unique(self, obj: ObjectType, props: Mapping[str, str], self_id: int | None) -> None:
        store = self._stores[obj.name]
        for name, value in props.items():
            if value == "" or not self._is_unique_prop(obj, name):
                continue
            owner = store.unique.get(name, {}).get(_unique_key(name, value))
            if owner is not None and owner != self_id:
                label = "Contact" if obj.name == "contacts" else obj.singular.capitalize()
                message = (
                    f"{label} already exists. Existing ID: {owner}"
                    if name == "email"
                    else f"A {obj.singular} with the unique value {value!r} for {name} already exists. "
                    f"Existing ID: {owner}"
                )
                raise _ItemError(409, "CONFLICT", message)

    # -- writing ---------------------------------------------------------------------------------
    def _insert(self, obj: ObjectType, props: dict[str, str], ms: int) -> _Record:
        store = self._stores[obj.name]
        rec = _Record(self._issue_id(), {k: v for k, v in props.items() if v != ""}, ms, ms)
        if obj.name == "contacts" and rec.props.get("email"):
            rec.props["hs_email_domain"] = rec.props["email"].rpartition("@")[2]
        store.records[rec.id] = rec
        store.active.append(rec.id)  # ids ascend, so appending keeps the list sorted
        self._index(obj, rec, rec.props)
        store.version += 1
        return rec

    def _index(self, obj: ObjectType, rec: _Record, props: Mapping[str, str]) -> None:
        store = self._stores[obj.name]
        for name, value in props.items():
            if value and self._is_unique_prop(obj, name):
                store.unique.setdefault(name, {})[_unique_key(name, value)] = rec.id

    def _apply(self, obj: ObjectType, rec: _Record, props: Mapping[str, str], ms: int) -> None:
        store = self._stores[obj.name]
        for name, value in props.items():
            old = rec.props.get(name)
            if old and self._is_unique_prop(obj, name):
                store.unique.get(name, {}).pop(_unique_key(name, old), None)
            if value == "":
                rec.props.pop(name, None)
            else:
                rec.props[name] = value
        if obj.name == "contacts" and "email" in props:
            domain = rec.props.get("email", "").rpartition("@")[2]
            if domain:
                rec.props["hs_email_domain"] = domain
            else:
                rec.props.pop("hs_email_domain", None)
        self._index(obj, rec, {k: v for k, v in props.items() if v})
        rec.updated = max(ms, rec.updated)
        store.version += 1

    def _archive(self, obj: ObjectType, rec: _Record, ms: int) -> None:
        if rec.archived_at is not None:
            return
        store = self._stores[obj.name]
        del store.active[bisect.bisect_left(store.active, rec.id)]
        bisect.insort(store.archived, rec.id)
        for name, value in rec.props.items():
            if self._is_unique_prop(obj, name):
                store.unique.get(name, {}).pop(_unique_key(name, value), None)
        rec.archived_at = ms
        rec.updated = max(ms, rec.updated)
        store.version += 1

    def _create_one(self, obj: ObjectType, item: Any) -> _Record:
        """Validate and insert one create input (properties + inline associations)."""
        if not isinstance(item, dict):
            raise _ItemError(400, "VALIDATION_ERROR", "each input must be an object")
        props = self._validate(obj, item.get("properties"), creating=True)
        if obj.name == "contacts" and props.get("email"):
            props["email"] = props["email"].lower()
        links = self._parse_inline_associations(obj, item.get("associations") or [])
        self._check_unique(obj, props, None)
        rec = self._insert(obj, props, self._now_ms())
        for to_obj, to_id, type_id in links:
            self._link(obj.name, rec.id, to_obj, to_id, type_id)
        return rec

    def _parse_inline_associations(self, obj: ObjectType, items: Any) -> list[tuple[str, int, int]]:
        if not isinstance(items, list):
            raise _ItemError(400, "VALIDATION_ERROR", "associations must be a list")
        links: list[tuple[str, int, int]] = []
        bad_ids: list[str] = []
        for assoc in items:
            to_id = str(((assoc or {}).get("to") or {}).get("id", ""))
            types = (assoc or {}).get("types") or []
            if not types:
                raise _ItemError(400, "VALIDATION_ERROR", "association types are required")
            for spec in types:
                category = (spec or {}).get("associationCategory")
                type_id = (spec or {}).get("associationTypeId")
                to_name = _target_of(obj.name, type_id) if category == "HUBSPOT_DEFINED" else None
                if to_name is None:
                    raise _ItemError(
                        400,
                        "VALIDATION_ERROR",
                        f"{category}/{type_id} is not a valid association type from {obj.singular}",
                    )
                target = self._find(OBJECT_TYPES[to_name], to_id)
                if target is None or target.archived_at is not None:
                    bad_ids.append(to_id)
                    continue
                links.append((to_name, target.id, int(type_id)))
        if bad_ids:
            raise _ItemError(
                400,
                "VALIDATION_ERROR",
                f"One or more associations are invalid: objects {sorted(set(bad_ids))} do not exist",
                context={"toObjectId": sorted(set(bad_ids))},
            )
        return links

    def _update_one(self, obj: ObjectType, rec: _Record | None, ident: str, raw: Any) -> _Record:
        if rec is None or rec.archived_at is not None:
            raise _ItemError(404, "OBJECT_NOT_FOUND", f"Object not found. objectId: {ident}", context={"ids": [ident]})
        props = self._validate(obj, raw, creating=False)
        if obj.name == "contacts" and props.get("email"):
            props["email"] = props["email"].lower()
        self._check_unique(obj, props, rec.id)
        self._apply(obj, rec, props, self._now_ms())
        return rec

    # -- v3 object handlers ----------------------------------------------------------------------
    def _params_list(self, request: httpx.Request, name: str) -> list[str]:
        return [v.strip() for raw in request.url.params.get_list(name) for v in raw.split(",") if v.strip()]

    def _flag(self, request: httpx.Request, name: str) -> bool:
        return request.url.params.get(name, "false").lower() == "true"

    def _h_list(self, request: httpx.Request, obj: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        denied = self._object_access(request, o, "read")
        if denied:
            return denied
        try:
            limit = int(request.url.params.get("limit", "10"))
            after = int(request.url.params.get("after", "0") or "0")
        except ValueError:
            return self._bad("limit and after must be integers")
        if not 1 <= limit <= LIST_LIMIT_MAX:
            return self._bad(f"limit must be between 1 and {LIST_LIMIT_MAX}")
        store = self._stores[o.name]
        ids = store.archived if self._flag(request, "archived") else store.active
        start = bisect.bisect_left(ids, after)
        page = ids[start : start + limit + 1]
        wanted = self._requested(o, self._params_list(request, "properties"))
        history = self._params_list(request, "propertiesWithHistory")
        assoc = self._params_list(request, "associations")
        results = [self._shape(o, store.records[i], wanted, history=history, associations=assoc) for i in page[:limit]]
        body: JSON = {"results": results}
        if len(page) > limit:
            nxt = str(page[limit])
            body["paging"] = {"next": {"after": nxt, "link": str(request.url.copy_set_param("after", nxt))}}
        return json_response(body)

    def _h_get(self, request: httpx.Request, obj: str, record_id: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        denied = self._object_access(request, o, "read")
        if denied:
            return denied
        id_property = request.url.params.get("idProperty")
        if id_property and not self._is_unique_prop(o, id_property) and id_property != "hs_object_id":
            return self._bad(f"{id_property} is not a unique property of {o.name}")
        rec = self._find(o, record_id, id_property)
        if rec is None or (rec.archived_at is not None) != self._flag(request, "archived"):
            return self.error_response(404, "resource not found", category="OBJECT_NOT_FOUND")
        wanted = self._requested(o, self._params_list(request, "properties"))
        return json_response(
            self._shape(
                o,
                rec,
                wanted,
                history=self._params_list(request, "propertiesWithHistory"),
                associations=self._params_list(request, "associations"),
            )
        )

    def _h_create(self, request: httpx.Request, obj: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        denied = self._object_access(request, o, "write")
        if denied:
            return denied
        body = request_json(request)
        if not isinstance(body, dict):
            return self._bad("Invalid input JSON: expected an object")
        try:
            rec = self._create_one(o, body)
        except _ItemError as e:
            return self._item_error_response(e)
        return json_response(self._shape(o, rec), 201)

    def _h_update(self, request: httpx.Request, obj: str, record_id: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        denied = self._object_access(request, o, "write")
        if denied:
            return denied
        body = request_json(request)
        if not isinstance(body, dict):
            return self._bad("Invalid input JSON: expected an object")
        id_property = request.url.params.get("idProperty")
        try:
            rec = self._update_one(o, self._find(o, record_id, id_property), record_id, body.get("properties"))
        except _ItemError as e:
            return self._item_error_response(e)
        return json_response(self._shape(o, rec))

    def _h_archive(self, request: httpx.Request, obj: str, record_id: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        denied = self._object_access(request, o, "write")
        if denied:
            return denied
        rec = self._find(o, record_id)
        if rec is not None:
            self._archive(o, rec, self._now_ms())
        return httpx.Response(204)  # HubSpot answers 204 for unknown ids as well

    def _item_error_response(self, e: _ItemError) -> httpx.Response:
        extra: JSON = {"errors": e.errors}
        if e.context:
            extra["context"] = e.context
        return self.error_response(e.status, e.message, category=e.category, **extra)

    # -- batch -------------------------------------------------------------------------------------
    def _h_batch(self, request: httpx.Request, obj: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        op = request.url.path.rsplit("/", 1)[1]
        denied = self._object_access(request, o, "read" if op == "read" else "write")
        if denied:
            return denied
        body = request_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            return self._bad("Invalid input JSON: expected {inputs: [...]}")
        inputs: list[Any] = body["inputs"]
        if len(inputs) > BATCH_LIMIT:
            return self._bad(f"Batch input limit exceeded: {len(inputs)} inputs, the limit is {BATCH_LIMIT}")
        if not all(isinstance(item, dict) for item in inputs):
            return self._bad("Invalid input JSON: each input must be an object")
        started = iso_ms(self._now_ms())
        if op == "archive":
            for item in inputs:
                rec = self._find(o, str(item.get("id", "")))
                if rec is not None:
                    self._archive(o, rec, self._now_ms())
            return httpx.Response(204)
        if op == "read":
            return self._batch_read(request, o, body, inputs, started)
        if op in ("update", "upsert"):
            ids = [str(item.get("id", "")) for item in inputs]
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                return self._bad(f"Duplicate IDs found in batch input: {dupes}. IDs must be unique")
        if op == "upsert":
            for item in inputs:
                id_property = item.get("idProperty") or "hs_object_id"
                if id_property != "hs_object_id" and not self._is_unique_prop(o, id_property):
                    return self._bad(
                        f"{id_property} is not a unique property; upsert needs a property with hasUniqueValue"
                        + (" or email" if o.name == "contacts" else "")
                    )
        results: list[JSON] = []
        errors: list[JSON] = []
        for index, item in enumerate(inputs):
            trace = item.get("objectWriteTraceId")
            try:
                self._maybe_fail_partially()
                if op == "create":
                    shaped = self._shape(o, self._create_one(o, item))
                elif op == "update":
                    ident = str(item.get("id", ""))
                    rec = self._find(o, ident, item.get("idProperty"))
                    shaped = self._shape(o, self._update_one(o, rec, ident, item.get("properties")))
                else:
                    shaped = self._upsert_one(o, item)
            except _ItemError as e:
                errors.append(self._batch_error(e, item, op, index, trace))
                continue
            if trace:
                shaped["objectWriteTraceId"] = trace
            results.append(shaped)
        return self._batch_response(results, errors, started, 201 if op == "create" else 200)

    def _maybe_fail_partially(self) -> None:
        rate = self.faults.partial_rate
        if rate and self.rng.random() < rate:
            raise _ItemError(500, "INTERNAL_ERROR", "The input could not be processed (injected partial failure)")

    def _upsert_one(self, o: ObjectType, item: Any) -> JSON:
        ident = str(item.get("id", ""))
        id_property = item.get("idProperty") or "hs_object_id"
        rec = self._find(o, ident, id_property)
        if rec is not None and rec.archived_at is None:
            shaped = self._shape(o, self._update_one(o, rec, ident, item.get("properties")))
            shaped["new"] = False
            return shaped
        if id_property == "hs_object_id":
            raise _ItemError(404, "OBJECT_NOT_FOUND", f"Object not found. objectId: {ident}", context={"ids": [ident]})
        create = {"properties": {**(item.get("properties") or {}), id_property: ident}}
        shaped = self._shape(o, self._create_one(o, create))
        shaped["new"] = True
        return shaped

    def _batch_error(self, e: _ItemError, item: Any, op: str, index: int, trace: str | None) -> JSON:
        context = dict(e.context)
        if trace:
            context["objectWriteTraceId"] = [str(trace)]
        if op != "create" and isinstance(item, dict) and "ids" not in context:
            context["ids"] = [str(item.get("id", ""))]
        return {
            "status": "error",
            "category": e.category,
            "message": e.message,
            "context": context,
            "errors": e.errors,
            "links": {},
        }

    def _batch_response(self, results: list[JSON], errors: list[JSON], started: str, ok: int) -> httpx.Response:
        body: JSON = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": iso_ms(self._now_ms()),
        }
        if errors:
            body["numErrors"] = len(errors)
            body["errors"] = errors
            return json_response(body, 207)
        return json_response(body, ok)

    def _batch_read(
        self, request: httpx.Request, o: ObjectType, body: JSON, inputs: list[Any], started: str
    ) -> httpx.Response:
        id_property = body.get("idProperty")
        if id_property and not self._is_unique_prop(o, id_property):
            return self._bad(f"{id_property} is not a unique property of {o.name}")
        archived = self._flag(request, "archived")
        wanted = self._requested(o, [str(p) for p in body.get("properties") or []])
        history = [str(p) for p in body.get("propertiesWithHistory") or []]
        results, missing = [], []
        for item in inputs:
            ident = str((item or {}).get("id", ""))
            rec = self._find(o, ident, id_property)
            if rec is None or (rec.archived_at is not None) != archived:
                missing.append(ident)
                continue
            results.append(self._shape(o, rec, wanted, history=history))
        errors = []
        if missing:
            errors.append(
                {
                    "status": "error",
                    "category": "OBJECT_NOT_FOUND",
                    "message": f"Could not get some {o.singular.upper()} objects, they may be deleted or not "
                    "exist. Check that ids are valid.",
                    "context": {"ids": missing},
                    "errors": [{"message": f"{len(missing)} ids not found", "code": "OBJECT_NOT_FOUND"}],
                    "links": {},
                }
            )
        return self._batch_response(results, errors, started, 200)

    # -- search ------------------------------------------------------------------------------------
    def _h_search(self, request: httpx.Request, obj: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        denied = self._object_access(request, o, "read")
        if denied:
            return denied
        body = request_json(request)
        if not isinstance(body, dict):
            return self._bad("Invalid input JSON: expected an object")
        try:
            limit = int(body.get("limit") if body.get("limit") is not None else 10)
            after = int(body.get("after") or 0)
        except (TypeError, ValueError):
            return self._bad("limit and after must be integers")
        if not 0 <= limit <= SEARCH_LIMIT_MAX or after < 0:
            return self._bad(f"limit must be between 0 and {SEARCH_LIMIT_MAX}")
        if after + limit > SEARCH_WINDOW:
            return self._bad(
                f"Search results are limited to {SEARCH_WINDOW} per query: after ({after}) + limit ({limit}) "
                f"is above {SEARCH_WINDOW}. Narrow the filters and start a new query."
            )
        groups = body.get("filterGroups") or []
        if not isinstance(groups, list) or len(groups) > 5:
            return self._bad("filterGroups must be a list of at most 5 groups")
        if sum(len((g or {}).get("filters") or []) for g in groups) > 18:
            return self._bad("A search may use at most 18 filters across all filterGroups")
        sorts = body.get("sorts") or []
        query = str(body.get("query") or "")
        key = (o.name, json.dumps(groups, sort_keys=True), json.dumps(sorts[:1]), query)
        store = self._stores[o.name]
        cached = None if self.search_lag_ms else self._search_cache.get((*key, store.version))
        if cached is None:
            try:
                cached = self._run_search(o, groups, sorts, query)
            except _ItemError as e:
                return self._item_error_response(e)
            if not self.search_lag_ms:  # a lagging index changes with the clock, not only with writes
                self._search_cache[(*key, store.version)] = cached
            while len(self._search_cache) > 16:
                self._search_cache.popitem(last=False)
        else:
            self._search_cache.move_to_end((*key, store.version))
        wanted = self._requested(o, [str(p) for p in body.get("properties") or []])
        page = cached[after : after + limit]
        result: JSON = {
            "total": len(cached),
            "results": [self._shape(o, store.records[i], wanted) for i in page],
        }
        if after + limit < len(cached) and limit:
            result["paging"] = {"next": {"after": str(after + limit)}}
        return json_response(result)

    def _run_search(self, o: ObjectType, groups: list[Any], sorts: list[Any], query: str) -> list[int]:
        store = self._stores[o.name]
        by_id = self._id_range_only(store, groups, sorts, query)
        if by_id is not None:
            return by_id
        predicates = [[self._compile_filter(o, f) for f in (g or {}).get("filters") or []] for g in groups]
        text = query.lower().split()
        matched: list[_Record] = []
        indexed_before = self._now_ms() - self.search_lag_ms
        for rid in self._id_candidates(store, groups):
            rec = store.records[rid]
            if self.search_lag_ms and rec.updated > indexed_before:
                continue  # not indexed yet (its older version is not kept: missing, not stale)
            if predicates and not any(all(p(rec) for p in group) for group in predicates):
                continue
            if text and not self._text_match(o, rec, text):
                continue
            matched.append(rec)
        if sorts:
            name, descending = _parse_sort(sorts[0])
            if name not in self._props[o.name]:
                raise _ItemError(400, "VALIDATION_ERROR", f"Cannot sort on unknown property {name!r}")
            getter = self._sort_getter(o, name)
            present = [(getter(r), r.id) for r in matched]
            have = [p for p in present if p[0] is not None]
            # Missing values go last in both directions, as Elasticsearch (HubSpot's search) does.
            have.sort(key=lambda p: p[1])
            have.sort(key=lambda p: p[0], reverse=descending)
            return [rid for _, rid in have] + [rid for v, rid in present if v is None]
        return [r.id for r in matched]

    def _id_range_only(self, store: _Store, groups: list[Any], sorts: list[Any], query: str) -> list[int] | None:
        """A search bounded on nothing but ``hs_object_id`` and sorted by it: the sorted id index itself.

        The same answer the scan gives, without touching each record (a real search is indexed).
        """
        if query or self.search_lag_ms or len(groups) > 1:
            return None
        filters = ((groups[0] or {}).get("filters") or []) if groups else []
        for f in filters:
            if not (
                isinstance(f, dict)
                and f.get("propertyName") == "hs_object_id"
                and f.get("operator") in ("GT", "GTE", "LT", "LTE")
                and re.fullmatch(r"-?\d+", str(f.get("value")))
            ):
                return None
        name, descending = _parse_sort(sorts[0]) if sorts else ("hs_object_id", False)
        if name != "hs_object_id":
            return None
        ids = self._id_candidates(store, groups)
        return ids[::-1] if descending else list(ids)

    @staticmethod
    def _id_candidates(store: _Store, groups: list[Any]) -> list[int]:
        """The active ids a one-group search bounded on ``hs_object_id`` can match (as an index would).

        Only narrows: every candidate still goes through the filters, so the answer is unchanged.
        """
        if len(groups) != 1:
            return store.active
        lo, hi = 0, len(store.active)
        for f in (groups[0] or {}).get("filters") or []:
            if not isinstance(f, dict) or f.get("propertyName") != "hs_object_id":
                continue
            try:
                value = int(str(f.get("value")))
            except ValueError:
                continue
            op = f.get("operator")
            if op in ("GT", "GTE"):
                lo = max(lo, bisect.bisect_left(store.active, value + (op == "GT")))
            elif op in ("LT", "LTE"):
                hi = min(hi, bisect.bisect_right(store.active, value - (op == "LT")))
        return store.active if (lo, hi) == (0, len(store.active)) else store.active[lo:hi]

    def _text_match(self, o: ObjectType, rec: _Record, words: list[str]) -> bool:
        hay = " ".join(rec.props.get(p, "") for p in o.text_props).lower()
        return all(w in hay for w in words)

    def _kind(self, o: ObjectType, name: str) -> str:
        definition = self._props[o.name].get(name)
        if definition is None:
            raise _ItemError(400, "VALIDATION_ERROR", f"There is no property named {name!r} on {o.name}")
        return "number" if definition["type"] in ("number", "datetime", "date") else "string"

    def _numeric_getter(self, o: ObjectType, name: str) -> Callable[[_Record], float | None]:
        if name == "hs_object_id":
            return lambda r: float(r.id)
        if name == o.created_prop:
            return lambda r: float(r.created)
        if name == o.modified_prop:
            return lambda r: float(r.updated)
        kind = self._props[o.name][name]["type"]

        def get(r: _Record) -> float | None:
            raw = r.props.get(name)
            if raw is None:
                return None
            if kind in ("datetime", "date"):
                ms = to_ms(raw)
                return float(ms) if ms is not None else None
            try:
                return float(raw)
            except ValueError:
                return None

        return get

    def _sort_getter(self, o: ObjectType, name: str) -> Callable[[_Record], Any]:
        if self._kind(o, name) == "number":
            return self._numeric_getter(o, name)
        return lambda r: r.props[name].lower() if name in r.props else None

    def _compile_filter(self, o: ObjectType, f: Any) -> Callable[[_Record], bool]:
        if not isinstance(f, dict) or "propertyName" not in f or "operator" not in f:
            raise _ItemError(400, "VALIDATION_ERROR", "each filter needs propertyName and operator")
        name, op = str(f["propertyName"]), str(f["operator"])
        kind = self._kind(o, name)
        if op in ("HAS_PROPERTY", "NOT_HAS_PROPERTY"):
            has: Callable[[_Record], bool] = (
                (lambda r: True)
                if name in ("hs_object_id", o.created_prop, o.modified_prop)
                else (lambda r: bool(r.props.get(name)))
            )
            return has if op == "HAS_PROPERTY" else (lambda r: not has(r))
        if kind == "number":
            return self._numeric_filter(o, name, op, f)
        return self._string_filter(name, op, f)

    def _numeric_filter(self, o: ObjectType, name: str, op: str, f: JSON) -> Callable[[_Record], bool]:
        getter = self._numeric_getter(o, name)
        dated = self._props[o.name][name]["type"] in ("datetime", "date")

        def num(raw: Any) -> float:
            text = str(raw)
            value = to_ms(text) if dated else None
            try:
                return float(value) if value is not None else float(text)
            except ValueError:
                raise _ItemError(400, "VALIDATION_ERROR", f"{text!r} is not a valid value for {name}") from None

        if op in ("IN", "NOT_IN"):
            values = {num(v) for v in f.get("values") or []}
            if op == "IN":
                return lambda r: getter(r) in values
            return lambda r: getter(r) not in values
        if op == "BETWEEN":
            low, high = num(f.get("value")), num(f.get("highValue"))
            return lambda r: (v := getter(r)) is not None and low <= v <= high
        compare: dict[str, Callable[[float, float], bool]] = {
            "EQ": lambda a, b: a == b,
            "NEQ": lambda a, b: a != b,
            "LT": lambda a, b: a < b,
            "LTE": lambda a, b: a <= b,
            "GT": lambda a, b: a > b,
            "GTE": lambda a, b: a >= b,
        }
        if op not in compare:
            raise _ItemError(400, "VALIDATION_ERROR", f"Operator {op} is not supported for {name}")
        target, cmp = num(f.get("value")), compare[op]
        if op == "NEQ":
            return lambda r: (v := getter(r)) is None or cmp(v, target)
        return lambda r: (v := getter(r)) is not None and cmp(v, target)

    def _string_filter(self, name: str, op: str, f: JSON) -> Callable[[_Record], bool]:
        def get(r: _Record) -> str | None:
            value = r.props.get(name)
            return value.lower() if value is not None else None

        value = str(f.get("value", "")).lower()
        if op == "EQ":
            return lambda r: get(r) == value
        if op == "NEQ":
            return lambda r: get(r) != value
        if op in ("IN", "NOT_IN"):
            values = {str(v).lower() for v in f.get("values") or []}
            if op == "IN":
                return lambda r: get(r) in values
            return lambda r: get(r) not in values
        if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
            pattern = value if "*" in value else None

            def contains(r: _Record) -> bool:
                v = get(r)
                if v is None:
                    return False
                tokens = [t for t in re.split(r"[^\w@.+-]+", v) if t]
                if pattern is not None:
                    return fnmatch.fnmatchcase(v, pattern) or any(fnmatch.fnmatchcase(t, pattern) for t in tokens)
                return value in tokens or value in re.split(r"[^\w]+", v)

            return contains if op == "CONTAINS_TOKEN" else (lambda r: not contains(r))
        if op in ("LT", "LTE", "GT", "GTE", "BETWEEN"):
            high = str(f.get("highValue", "")).lower()
            compare: dict[str, Callable[[str], bool]] = {
                "LT": lambda v: v < value,
                "LTE": lambda v: v <= value,
                "GT": lambda v: v > value,
                "GTE": lambda v: v >= value,
                "BETWEEN": lambda v: value <= v <= high,
            }
            cmp = compare[op]
            return lambda r: (v := get(r)) is not None and cmp(v)
        raise _ItemError(400, "VALIDATION_ERROR", f"Unknown operator {op}")

    # -- associations ------------------------------------------------------------------------------
    def _targets(self, from_obj: str, from_id: int, to_obj: str) -> dict[int, set[int]]:
        """Live targets of one record in one object type: {to id: {type ids}}."""
        targets = self._links.get((from_obj, from_id), {}).get(to_obj, {})
        records = self._stores[to_obj].records
        return {
            tid: types
            for tid, types in targets.items()
            if types and tid in records and records[tid].archived_at is None
        }

    def _link(self, a_obj: str, a_id: int, b_obj: str, b_id: int, type_id: int) -> None:
        default, _types = ASSOCIATION_TYPES[(a_obj, b_obj)]
        if type_id in PRIMARY_TYPES:
            # One primary per record: moving it drops the old one (both directions).
            for other, types in self._links.get((a_obj, a_id), {}).get(b_obj, {}).items():
                if type_id in types and other != b_id:
                    types.discard(type_id)
                    self._links[(b_obj, other)][a_obj][a_id].discard(INVERSE_TYPE[type_id])
        for t in {type_id, default}:
            self._links.setdefault((a_obj, a_id), {}).setdefault(b_obj, {}).setdefault(b_id, set()).add(t)
            back = INVERSE_TYPE[t]
            self._links.setdefault((b_obj, b_id), {}).setdefault(a_obj, {}).setdefault(a_id, set()).add(back)

    def _unlink(self, a_obj: str, a_id: int, b_obj: str, b_id: int, type_ids: Iterable[int] | None = None) -> None:
        forward = self._links.get((a_obj, a_id), {}).get(b_obj, {})
        backward = self._links.get((b_obj, b_id), {}).get(a_obj, {})
        if type_ids is None:
            forward.pop(b_id, None)
            backward.pop(a_id, None)
            return
        drop = set(type_ids)
        default, _types = ASSOCIATION_TYPES[(a_obj, b_obj)]
        if default in drop:  # removing the unlabelled type removes every link (reference §4)
            drop |= forward.get(b_id, set())
        for t in drop:
            forward.get(b_id, set()).discard(t)
            backward.get(a_id, set()).discard(INVERSE_TYPE.get(t, -1))

    def _assoc_spec(self, from_obj: str, to_obj: str, type_id: int, *, with_label: bool) -> JSON:
        label = ASSOCIATION_TYPES[(from_obj, to_obj)][1].get(type_id)
        if not with_label:
            return {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": type_id}
        spec: JSON = {"category": "HUBSPOT_DEFINED", "typeId": type_id}
        if label:
            spec["label"] = label
        return spec

    def _pair(
        self, request: httpx.Request, from_obj: str, to_obj: str, access: str
    ) -> tuple[ObjectType, ObjectType] | httpx.Response:
        a, b = self._object(from_obj), self._object(to_obj)
        if a is None or b is None:
            return self._unknown_object(from_obj if a is None else to_obj)
        if (a.name, b.name) not in ASSOCIATION_TYPES:
            return self._bad(f"No associations are defined from {a.name} to {b.name}")
        denied = self._object_access(request, a, access)
        return denied if denied else (a, b)

    def _live(self, o: ObjectType, ident: str) -> _Record | None:
        rec = self._find(o, ident)
        return rec if rec is not None and rec.archived_at is None else None

    def _h_v4_put_default(
        self, request: httpx.Request, from_obj: str, from_id: str, to_obj: str, to_id: str
    ) -> httpx.Response:
        pair = self._pair(request, from_obj, to_obj, "write")
        if isinstance(pair, httpx.Response):
            return pair
        a, b = pair
        started = iso_ms(self._now_ms())
        ra, rb = self._live(a, from_id), self._live(b, to_id)
        if ra is None or rb is None:
            return self.error_response(404, "One or both objects do not exist", category="OBJECT_NOT_FOUND")
        default = ASSOCIATION_TYPES[(a.name, b.name)][0]
        self._link(a.name, ra.id, b.name, rb.id, default)
        results = [
            {
                "from": {"id": str(ra.id)},
                "to": {"id": str(rb.id)},
                "associationSpec": self._assoc_spec(a.name, b.name, default, with_label=False),
            },
            {
                "from": {"id": str(rb.id)},
                "to": {"id": str(ra.id)},
                "associationSpec": self._assoc_spec(b.name, a.name, INVERSE_TYPE[default], with_label=False),
            },
        ]
        return self._batch_response(results, [], started, 200)

    def _labels_between(self, a: ObjectType, a_id: int, b: ObjectType, b_id: int) -> JSON:
        types = self._links.get((a.name, a_id), {}).get(b.name, {}).get(b_id, set())
        labels = ASSOCIATION_TYPES[(a.name, b.name)][1]
        return {
            "fromObjectTypeId": a.type_id,
            "fromObjectId": str(a_id),
            "toObjectTypeId": b.type_id,
            "toObjectId": str(b_id),
            "labels": sorted(str(labels[t]) for t in types if labels.get(t)),
        }

    def _h_v4_put_labels(
        self, request: httpx.Request, from_obj: str, from_id: str, to_obj: str, to_id: str
    ) -> httpx.Response:
        pair = self._pair(request, from_obj, to_obj, "write")
        if isinstance(pair, httpx.Response):
            return pair
        a, b = pair
        specs = request_json(request)
        if not isinstance(specs, list) or not specs:
            return self._bad("Expected a non-empty list of {associationCategory, associationTypeId}")
        ra, rb = self._live(a, from_id), self._live(b, to_id)
        if ra is None or rb is None:
            return self.error_response(404, "One or both objects do not exist", category="OBJECT_NOT_FOUND")
        types = ASSOCIATION_TYPES[(a.name, b.name)][1]
        wanted = []
        for spec in specs:
            type_id = (spec or {}).get("associationTypeId")
            if (spec or {}).get("associationCategory") != "HUBSPOT_DEFINED" or type_id not in types:
                return self._bad(f"{type_id} is not a valid association type from {a.name} to {b.name}")
            wanted.append(int(type_id))
        self._unlink(a.name, ra.id, b.name, rb.id)  # PUT replaces the labels (reference §4)
        for type_id in wanted:
            self._link(a.name, ra.id, b.name, rb.id, type_id)
        return json_response(self._labels_between(a, ra.id, b, rb.id), 201)

    def _h_v4_delete(
        self, request: httpx.Request, from_obj: str, from_id: str, to_obj: str, to_id: str
    ) -> httpx.Response:
        pair = self._pair(request, from_obj, to_obj, "write")
        if isinstance(pair, httpx.Response):
            return pair
        a, b = pair
        ra, rb = self._find(a, from_id), self._find(b, to_id)
        if ra is not None and rb is not None:
            self._unlink(a.name, ra.id, b.name, rb.id)
        return httpx.Response(204)

    def _v4_targets(self, a: ObjectType, a_id: int, b: ObjectType) -> list[JSON]:
        return [
            {
                "toObjectId": str(tid),
                "associationTypes": [
                    self._assoc_spec(a.name, b.name, t, with_label=True) for t in sorted(types, reverse=True)
                ],
            }
            for tid, types in self._targets(a.name, a_id, b.name).items()
        ]

    def _h_v4_list(self, request: httpx.Request, from_obj: str, from_id: str, to_obj: str) -> httpx.Response:
        pair = self._pair(request, from_obj, to_obj, "read")
        if isinstance(pair, httpx.Response):
            return pair
        a, b = pair
        ra = self._live(a, from_id)
        if ra is None:
            return self.error_response(404, "resource not found", category="OBJECT_NOT_FOUND")
        try:
            limit = int(request.url.params.get("limit", "500"))
            after = int(request.url.params.get("after", "0") or "0")
        except ValueError:
            return self._bad("limit and after must be integers")
        everything = self._v4_targets(a, ra.id, b)
        page = everything[after : after + limit]
        body: JSON = {"results": page}
        if after + limit < len(everything):
            nxt = str(after + limit)
            body["paging"] = {"next": {"after": nxt, "link": str(request.url.copy_set_param("after", nxt))}}
        return json_response(body)

    def _v4_inputs(self, request: httpx.Request, limit: int) -> list[Any] | httpx.Response:
        body = request_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            return self._bad("Invalid input JSON: expected {inputs: [...]}")
        inputs: list[Any] = body["inputs"]
        if len(inputs) > limit:
            return self._bad(f"Batch input limit exceeded: {len(inputs)} inputs, the limit is {limit}")
        if not all(isinstance(item, dict) for item in inputs):
            return self._bad("Invalid input JSON: each input must be an object")
        return inputs

    def _h_v4_batch_read(self, request: httpx.Request, from_obj: str, to_obj: str) -> httpx.Response:
        pair = self._pair(request, from_obj, to_obj, "read")
        if isinstance(pair, httpx.Response):
            return pair
        a, b = pair
        inputs = self._v4_inputs(request, ASSOC_READ_LIMIT)
        if isinstance(inputs, httpx.Response):
            return inputs
        started = iso_ms(self._now_ms())
        results, missing = [], []
        for item in inputs:
            ident = str((item or {}).get("id", ""))
            rec = self._live(a, ident)
            if rec is None:
                missing.append(ident)
                continue
            results.append({"from": {"id": str(rec.id)}, "to": self._v4_targets(a, rec.id, b)})
        errors = []
        if missing:
            errors.append(
                {
                    "status": "error",
                    "category": "OBJECT_NOT_FOUND",
                    "message": f"No {a.singular}s found with ids {missing}",
                    "context": {"fromObjectId": missing},
                    "errors": [{"message": "object not found", "code": "OBJECT_NOT_FOUND"}],
                    "links": {},
                }
            )
        return self._batch_response(results, errors, started, 200)

    def _pair_inputs(self, a: ObjectType, b: ObjectType, item: Any) -> tuple[_Record, _Record]:
        from_id = str(((item or {}).get("from") or {}).get("id", ""))
        to_id = str(((item or {}).get("to") or {}).get("id", ""))
        ra, rb = self._live(a, from_id), self._live(b, to_id)
        if ra is None or rb is None:
            missing = [i for i, r in ((from_id, ra), (to_id, rb)) if r is None]
            raise _ItemError(
                404, "OBJECT_NOT_FOUND", f"Objects not found: {missing}", context={"fromObjectId": [from_id]}
            )
        return ra, rb

    def _h_v4_batch_create(self, request: httpx.Request, from_obj: str, to_obj: str) -> httpx.Response:
        pair = self._pair(request, from_obj, to_obj, "write")
        if isinstance(pair, httpx.Response):
            return pair
        a, b = pair
        inputs = self._v4_inputs(request, ASSOC_CREATE_LIMIT)
        if isinstance(inputs, httpx.Response):
            return inputs
        started = iso_ms(self._now_ms())
        types = ASSOCIATION_TYPES[(a.name, b.name)][1]
        results, errors = [], []
        for index, item in enumerate(inputs):
            try:
                self._maybe_fail_partially()
                ra, rb = self._pair_inputs(a, b, item)
                wanted = []
                for spec in (item or {}).get("types") or []:
                    type_id = (spec or {}).get("associationTypeId")
                    if (spec or {}).get("associationCategory") != "HUBSPOT_DEFINED" or type_id not in types:
                        raise _ItemError(400, "VALIDATION_ERROR", f"{type_id} is not a valid association type")
                    wanted.append(int(type_id))
                if not wanted:
                    raise _ItemError(400, "VALIDATION_ERROR", "types must not be empty")
            except _ItemError as e:
                errors.append(self._batch_error(e, None, "create", index, None))
                continue
            for type_id in wanted:
                self._link(a.name, ra.id, b.name, rb.id, type_id)
            results.append(self._labels_between(a, ra.id, b, rb.id))
        return self._batch_response(results, errors, started, 201)

    def _h_v4_batch_default(self, request: httpx.Request, from_obj: str, to_obj: str) -> httpx.Response:
        pair = self._pair(request, from_obj, to_obj, "write")
        if isinstance(pair, httpx.Response):
            return pair
        a, b = pair
        inputs = self._v4_inputs(request, ASSOC_CREATE_LIMIT)
        if isinstance(inputs, httpx.Response):
            return inputs
        started = iso_ms(self._now_ms())
        default = ASSOCIATION_TYPES[(a.name, b.name)][0]
        results, errors = [], []
        for index, item in enumerate(inputs):
            try:
                ra, rb = self._pair_inputs(a, b, item)
            except _ItemError as e:
                errors.append(self._batch_error(e, None, "create", index, None))
                continue
            self._link(a.name, ra.id, b.name, rb.id, default)
            results.append(
                {
                    "from": {"id": str(ra.id)},
                    "to": {"id": str(rb.id)},
                    "associationSpec": self._assoc_spec(a.name, b.name, default, with_label=False),
                }
            )
        # The spec gives this operation no 207: per-input errors travel in the 200 body.
        body: JSON = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": iso_ms(self._now_ms()),
        }
        if errors:
            body["numErrors"], body["errors"] = len(errors), errors
        return json_response(body)

    def _h_v4_batch_archive(self, request: httpx.Request, from_obj: str, to_obj: str) -> httpx.Response:
        pair = self._pair(request, from_obj, to_obj, "write")
        if isinstance(pair, httpx.Response):
            return pair
        a, b = pair
        inputs = self._v4_inputs(request, ASSOC_CREATE_LIMIT)
        if isinstance(inputs, httpx.Response):
            return inputs
        for item in inputs:
            ra = self._find(a, str(((item or {}).get("from") or {}).get("id", "")))
            for to in (item or {}).get("to") or []:
                rb = self._find(b, str((to or {}).get("id", "")))
                if ra is not None and rb is not None:
                    self._unlink(a.name, ra.id, b.name, rb.id)
        return httpx.Response(204)

    def _h_v4_batch_labels_archive(self, request: httpx.Request, from_obj: str, to_obj: str) -> httpx.Response:
        pair = self._pair(request, from_obj, to_obj, "write")
        if isinstance(pair, httpx.Response):
            return pair
        a, b = pair
        inputs = self._v4_inputs(request, ASSOC_CREATE_LIMIT)
        if isinstance(inputs, httpx.Response):
            return inputs
        for item in inputs:
            ra = self._find(a, str(((item or {}).get("from") or {}).get("id", "")))
            rb = self._find(b, str(((item or {}).get("to") or {}).get("id", "")))
            type_ids = [int(s.get("associationTypeId", -1)) for s in item.get("types") or [] if isinstance(s, dict)]
            if ra is not None and rb is not None:
                self._unlink(a.name, ra.id, b.name, rb.id, type_ids)
        return httpx.Response(204)

    # -- properties API ----------------------------------------------------------------------------
    def _h_props_list(self, request: httpx.Request, obj: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        denied = self._require(request, f"crm.objects.{o.scope}.read", f"crm.schemas.{o.scope}.read")
        if denied:
            return denied
        archived = self._flag(request, "archived")
        results = [p for p in self._props[o.name].values() if bool(p.get("archived")) == archived]
        return json_response({"results": results})

    def _h_props_get(self, request: httpx.Request, obj: str, prop: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        denied = self._require(request, f"crm.objects.{o.scope}.read", f"crm.schemas.{o.scope}.read")
        if denied:
            return denied
        definition = self._props[o.name].get(prop)
        if definition is None or bool(definition.get("archived")) != self._flag(request, "archived"):
            return self.error_response(404, f"Unable to find property {prop!r}", category="OBJECT_NOT_FOUND")
        return json_response(definition)

    def _h_props_create(self, request: httpx.Request, obj: str) -> httpx.Response:
        o = self._object(obj)
        if o is None:
            return self._unknown_object(obj)
        denied = self._require(request, f"crm.schemas.{o.scope}.write")
        if denied:
            return denied
        body = request_json(request)
        if not isinstance(body, dict):
            return self._bad("Invalid input JSON: expected an object")
        missing = [k for k in ("name", "label", "type", "fieldType", "groupName") if not body.get(k)]
        if missing:
            return self._bad(f"Missing required fields: {missing}")
        name = str(body["name"])
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            return self._bad(f"Property name {name!r} must start with a letter and use lowercase letters, digits, _")
        if body["type"] not in ("string", "number", "date", "datetime", "enumeration", "bool", "phone_number"):
            return self._bad(f"Unknown property type {body['type']!r}")
        if name in self._props[o.name]:
            return self.error_response(409, f"Property named '{name}' already exists.", category="CONFLICT")
        options = [
            {
                "label": str(opt.get("label")),
                "value": str(opt.get("value")),
                "displayOrder": int(opt.get("displayOrder", i)),
                "hidden": bool(opt.get("hidden", False)),
            }
            for i, opt in enumerate(body.get("options") or [])
        ]
        if body["type"] == "enumeration" and not options and not body.get("externalOptions"):
            return self._bad("Enumeration properties need at least one option")
        now = iso_ms(self._now_ms())
        definition = _prop(
            name,
            str(body["label"]),
            str(body["type"]),
            str(body["fieldType"]),
            str(body["groupName"]),
            unique=bool(body.get("hasUniqueValue", False)),
            external=bool(body.get("externalOptions", False)),
            description=str(body.get("description", "")),
        )
        definition.update(
            options=options,
            hubspotDefined=False,
            formField=bool(body.get("formField", False)),
            hidden=bool(body.get("hidden", False)),
            displayOrder=int(body.get("displayOrder", -1)),
            createdAt=now,
            updatedAt=now,
            modificationMetadata={"archivable": True, "readOnlyDefinition": False, "readOnlyValue": False},
        )
        self._props[o.name][name] = definition
        response = json_response(definition, 201)
        response.headers["Location"] = f"/crm/v3/properties/{o.name}/{name}"
        return response

    # -- owners, schemas, legacy property lists ---------------------------------------------------
    def _h_owners(self, request: httpx.Request) -> httpx.Response:
        denied = self._require(request, "crm.objects.owners.read")
        if denied:
            return denied
        params = request.url.params
        try:
            limit = int(params.get("limit", "100"))
            start = int(params.get("after") or 0)
        except ValueError:
            return self._bad("limit and after must be integers")
        if not 1 <= limit <= OWNERS_LIMIT_MAX or start < 0:
            return self._bad(f"limit must be between 1 and {OWNERS_LIMIT_MAX}")
        archived = self._flag(request, "archived")
        email = (params.get("email") or "").lower()
        rows = [o for o in self._owners if o["archived"] == archived and (not email or o["email"] == email)]
        page = rows[start : start + limit]
        body: JSON = {"results": page}
        if start + limit < len(rows):
            after = str(start + limit)
            query = urlencode({**dict(params), "after": after})
            base = self.host if self.host.startswith("http") else "https://api.hubapi.com"
            body["paging"] = {"next": {"after": after, "link": f"{base}/crm/v3/owners/?{query}"}}
        return json_response(body)

    def _h_owner(self, request: httpx.Request, owner_id: str) -> httpx.Response:
        denied = self._require(request, "crm.objects.owners.read")
        if denied:
            return denied
        key = "userId" if request.url.params.get("idProperty") == "userId" else "id"
        archived = self._flag(request, "archived")
        for owner in self._owners:
            if str(owner[key]) == owner_id and owner["archived"] == archived:
                return json_response(owner)
        return self.error_response(404, f"Owner {owner_id} not found", category="OBJECT_NOT_FOUND")

    def _h_schemas(self, request: httpx.Request) -> httpx.Response:
        # A portal without custom objects (this one) answers an empty list, not a 404.
        return json_response({"results": []})

    def _h_legacy_props(self, request: httpx.Request, version: str, obj: str) -> httpx.Response:
        o = self._object(obj)
        if o is None or o.name not in ("contacts", "companies", "deals"):
            return self.error_response(404, f"Unknown object type {obj!r}", category="OBJECT_NOT_FOUND")
        denied = self._require(request, f"crm.objects.{o.scope}.read", f"crm.schemas.{o.scope}.read")
        if denied:
            return denied
        return json_response([_legacy_prop(p) for p in self._props[o.name].values() if not p.get("archived")])

    def _h_legacy_company_props(self, request: httpx.Request) -> httpx.Response:
        return self._h_legacy_props(request, "2", "companies")

    # -- dispositions, account -------------------------------------------------------------------
    def _h_dispositions(self, request: httpx.Request) -> httpx.Response:
        return json_response([{"id": gid, "label": label} for gid, label in self._dispositions.items()])

    def _h_account(self, request: httpx.Request) -> httpx.Response:
        return json_response(
            {
                "portalId": self.portal_id,
                "accountType": "STANDARD",
                "timeZone": "US/Eastern",
                "companyCurrency": "USD",
                "additionalCurrencies": ["EUR", "GBP"],
                "utcOffset": "-05:00",
                "utcOffsetMilliseconds": -18_000_000,
                "uiDomain": "app.hubspot.com",
                "dataHostingLocation": "na1",
            }
        )

    def _h_private_token_info(self, request: httpx.Request) -> httpx.Response:
        body = request_json(request)
        key = body.get("tokenKey") if isinstance(body, dict) else None
        if key != self.private_app_token:
            return self.error_response(404, "Token not found", category="OBJECT_NOT_FOUND")
        return json_response(
            {"userId": self.user_id, "hubId": self.portal_id, "appId": 4242, "scopes": list(self.private_app_scopes)}
        )

    def _h_usage(self, request: httpx.Request) -> httpx.Response:
        self._roll_day()
        now = self.now()
        midnight = (int(now) // 86_400 + 1) * 86_400
        return json_response(
            {
                "results": [
                    {
                        "name": "private-apps-api-calls-daily",
                        "usageLimit": self.daily_limit,
                        "currentUsage": self._daily_count,
                        "collectedAt": iso_ms(int(now * 1000)),
                        "fetchStatus": "SUCCESS",
                        "resetsAt": iso_ms(midnight * 1000),
                    }
                ]
            }
        )

    # -- OAuth -------------------------------------------------------------------------------------
    def _oauth_error(self, status: str, message: str) -> httpx.Response:
        return json_response({"status": status, "message": message, "correlationId": _new_correlation_id()}, 400)

    def _h_authorize(self, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        if params.get("client_id") != self.client_id:
            return self._oauth_error("BAD_CLIENT_ID", "missing or unknown client id")
        redirect = params.get("redirect_uri", "")
        if not redirect:
            return self._oauth_error("BAD_REDIRECT_URI", "missing redirect_uri")
        scopes = [s for s in (params.get("scope", "") + " " + params.get("optional_scope", "")).split() if s]
        if not scopes:
            return self._oauth_error("BAD_SCOPES", "at least one scope is required")
        code = secrets.token_hex(16)
        self._codes[code] = (self.client_id, redirect, list(dict.fromkeys(scopes)), self.now() + AUTH_CODE_TTL)
        query = {"code": code}
        if "state" in params:
            query["state"] = params["state"]
        separator = "&" if "?" in redirect else "?"
        return httpx.Response(302, headers={"Location": f"{redirect}{separator}{urlencode(query)}"})

    def _form(self, request: httpx.Request) -> dict[str, str]:
        form = dict(parse_qsl(request.content.decode("utf-8", "replace"), keep_blank_values=True))
        # The v1 spec also accepts client_secret and refresh_token in the query string.
        for key, value in request.url.params.items():
            form.setdefault(key, value)
        return form

    def _h_token(self, request: httpx.Request) -> httpx.Response:
        form = self._form(request)
        grant = form.get("grant_type", "")
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return self._oauth_error("BAD_CLIENT_ID", "missing or unknown client id, or the secret does not match")
        if grant == "authorization_code":
            entry = self._codes.pop(form.get("code", ""), None)
            if entry is None or entry[3] < self.now():
                return self._oauth_error("BAD_AUTH_CODE", "missing or unknown auth code")
            if form.get("redirect_uri") != entry[1]:
                return self._oauth_error("BAD_REDIRECT_URI", "redirect_uri does not match the authorization request")
            access, refresh = self.issue_token(entry[2])
        elif grant == "refresh_token":
            held = self._refresh_tokens.get(form.get("refresh_token", ""))
            if held is None:
                return self._oauth_error("BAD_REFRESH_TOKEN", "missing or unknown refresh token")
            # HubSpot refresh tokens stay valid after use, and the same one comes back.
            refresh = form["refresh_token"]
            access = self._new_access(held.scopes, refresh, None)
        else:
            return self._oauth_error("BAD_GRANT_TYPE", f"unsupported grant_type {grant!r}")
        info = self._tokens[access]
        return json_response(
            {
                "token_type": "bearer",
                "access_token": access,
                "refresh_token": refresh,
                "expires_in": round(info.expires_at - self.now()),
                "token_use": "access_token",
                "hub_id": self.portal_id,
                "user_id": self.user_id,
                "scopes": info.scopes,
            }
        )

    def _new_access(self, scopes: list[str], refresh: str, ttl: float | None) -> str:
        lifetime = ttl if ttl is not None else (self.faults.token_ttl or DEFAULT_TOKEN_TTL)
        access = "CO" + secrets.token_urlsafe(48)
        self._tokens[access] = _Token(list(scopes), self.now() + lifetime, refresh)
        return access

    def _h_access_token_info(self, request: httpx.Request, token: str) -> httpx.Response:
        info = self._tokens.get(token)
        if info is None or info.expires_at <= self.now():
            return self.error_response(404, "Token not found or expired", category="OBJECT_NOT_FOUND")
        return json_response(
            {
                "token": token,
                "user": self.user,
                "hub_domain": self.hub_domain,
                "scopes": info.scopes,
                "hub_id": self.portal_id,
                "app_id": self.app_id,
                "expires_in": int(info.expires_at - self.now()),
                "user_id": self.user_id,
                "token_type": "access",
            }
        )

    def _h_refresh_token_info(self, request: httpx.Request, token: str) -> httpx.Response:
        held = self._refresh_tokens.get(token)
        if held is None:
            return self.error_response(404, "Refresh token not found", category="OBJECT_NOT_FOUND")
        return json_response(
            {
                "token": token,
                "user": self.user,
                "hub_domain": self.hub_domain,
                "scopes": held.scopes,
                "hub_id": self.portal_id,
                "client_id": held.client_id,
                "user_id": self.user_id,
                "token_type": "refresh",
            }
        )

    def _h_refresh_token_delete(self, request: httpx.Request, token: str) -> httpx.Response:
        if self._refresh_tokens.pop(token, None) is None:
            return self.error_response(404, "Refresh token not found", category="OBJECT_NOT_FOUND")
        return httpx.Response(204)

    def _h_introspect(self, request: httpx.Request) -> httpx.Response:
        form = self._form(request)
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return self._oauth_error("BAD_CLIENT_ID", "missing or unknown client id, or the secret does not match")
        token = form.get("token", "")
        now = self.now()
        common = {
            "active": True,
            "app_id": self.app_id,
            "client_id": self.client_id,
            "hub_id": self.portal_id,
            "hub_domain": self.hub_domain,
            "user": self.user,
            "user_id": self.user_id,
            "token": token,
        }
        info = self._tokens.get(token)
        if info is not None and info.expires_at > now:
            return json_response(
                {
                    **common,
                    "scopes": info.scopes,
                    "expires_in": int(info.expires_at - now),
                    "token_type": "access",
                    "token_use": "access_token",
                    "is_private_distribution": False,
                    "signed_access_token": {
                        "appId": self.app_id,
                        "appInstallId": str(self.portal_id),
                        "audience": "emulator",
                        "expiresAt": int(info.expires_at * 1000),
                        "hubId": self.portal_id,
                        "hublet": "na1",
                        "installingUserId": self.user_id,
                        "isPrivateDistribution": False,
                        "isServiceAccount": False,
                        "isUserLevel": False,
                        "newSignature": "",
                        "scopeToScopeGroupPks": "",
                        "scopes": "",
                        "signature": "",
                        "trialScopeToScopeGroupPks": "",
                        "trialScopes": "",
                        "userId": self.user_id,
                    },
                }
            )
        held = self._refresh_tokens.get(token)
        if held is not None:
            return json_response(
                {**common, "scopes": held.scopes, "token_type": "refresh", "token_use": "refresh_token"}
            )
        return json_response({"active": False})  # RFC 7662; HubSpot's exact body for this is unverified

    def _h_revoke(self, request: httpx.Request) -> httpx.Response:
        form = self._form(request)
        token = form.get("token", "")
        held = self._refresh_tokens.pop(token, None)
        if held is not None:
            for access in [a for a, t in self._tokens.items() if t.refresh == token]:
                del self._tokens[access]
        self._tokens.pop(token, None)
        return httpx.Response(204)

    # -- public helpers for tests, benchmarks and `crmsync sandbox serve` -------------------------
    def issue_token(self, scopes: Iterable[str] | None = None, ttl: float | None = None) -> tuple[str, str]:
        """Mint an OAuth (access, refresh) pair as a finished code flow would."""
        with self.lock:
            granted = list(scopes) if scopes is not None else list(ALL_SCOPES)
            refresh = str(uuid.uuid4())
            self._refresh_tokens[refresh] = _Refresh(granted, self.client_id)
            return self._new_access(granted, refresh, ttl), refresh

    def expire_tokens(self) -> None:
        """Make every issued access token expired now (refresh tokens keep working)."""
        with self.lock:
            now = self.now()
            for info in self._tokens.values():
                info.expires_at = min(info.expires_at, now - 1)

    def add_owner(
        self,
        email: str,
        *,
        first_name: str = "",
        last_name: str = "",
        user_id: int | None = None,
        archived: bool = False,
    ) -> str:
        """Add a HubSpot user as an owner (``/crm/v3/owners``); returns its owner id."""
        with self.lock:
            owner_id = str(self._owner_rng.randrange(10_000_000, 999_999_999))
            uid = user_id if user_id is not None else self._owner_rng.randrange(10_000_000, 99_999_999)
            stamp = iso_ms(SEED_EPOCH_MS)
            self._owners.append(
                {
                    "id": owner_id,
                    "email": email.lower(),
                    "type": "PERSON",
                    "firstName": first_name,
                    "lastName": last_name,
                    "userId": None if archived else uid,  # HubSpot keeps only the "including inactive" id
                    "userIdIncludingInactive": uid,
                    "createdAt": stamp,
                    "updatedAt": stamp,
                    "archived": archived,
                    "teams": [],
                }
            )
            if not archived:
                self._live_owners.add(owner_id)
            return owner_id

    def owner_id(self, email: str) -> str | None:
        """The owner id of a live owner by email, or None."""
        with self.lock:
            return next((o["id"] for o in self._owners if o["email"] == email.lower() and not o["archived"]), None)

    def add_disposition(self, label: str) -> str:
        """Add a custom call outcome; returns its GUID."""
        with self.lock:
            gid = str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))
            self._dispositions[gid] = label
            return gid

    def seed(self, *, contacts: int = 0, companies: int = 0, deals: int = 0) -> None:
        """Add deterministic sample data (from the constructor's ``seed``): companies, contacts, deals."""
        with self.lock:
            _Seeder(self, random.Random(f"{self.seed_value}-{len(self._stores['contacts'].records)}")).run(
                contacts=contacts, companies=companies, deals=deals
            )

    def bulk_create(
        self,
        obj: str,
        n: int,
        *,
        modified_at: float | None = None,
        properties_fn: Callable[[int], Mapping[str, str]] | None = None,
    ) -> list[str]:
        """Insert ``n`` records fast, without validation; they may all share one modified time."""
        o = OBJECT_TYPES[_BY_ALIAS[obj].name]
        with self.lock:
            ms = int(modified_at * 1000) if modified_at is not None else self._now_ms()
            store = self._stores[o.name]
            ids: list[str] = []
            for i in range(n):
                rid = self._issue_id()
                if properties_fn is not None:
                    props = {k: str(v) for k, v in properties_fn(i).items() if v is not None and v != ""}
                else:
                    props = _bulk_defaults(o.name, rid, ms)
                rec = _Record(rid, props, ms, ms)
                store.records[rid] = rec
                store.active.append(rid)
                if props:
                    self._index(o, rec, props)
                ids.append(str(rid))
            store.version += 1
            return ids

    def edit(self, obj: str, record_id: str | int, props: Mapping[str, str], at: float | None = None) -> None:
        """Change a record as a HubSpot user would (no API validation); bumps the modified time."""
        o = OBJECT_TYPES[_BY_ALIAS[obj].name]
        with self.lock:
            rec = self._stores[o.name].records[int(record_id)]
            ms = int(at * 1000) if at is not None else self._now_ms()
            self._apply(o, rec, {k: "" if v is None else str(v) for k, v in props.items()}, ms)
            rec.updated = ms

    def archive(self, obj: str, record_id: str | int) -> None:
        """Archive (soft-delete) a record."""
        o = OBJECT_TYPES[_BY_ALIAS[obj].name]
        with self.lock:
            self._archive(o, self._stores[o.name].records[int(record_id)], self._now_ms())

    def records(self, obj: str, archived: bool = False) -> list[JSON]:
        """Every live (or archived) record of a type, in the API's JSON shape with all properties."""
        o = OBJECT_TYPES[_BY_ALIAS[obj].name]
        with self.lock:
            store = self._stores[o.name]
            ids = store.archived if archived else store.active
            return [self._shape(o, store.records[i]) for i in ids]

    def get(self, obj: str, record_id: str | int) -> JSON | None:
        """One record (live or archived) in the API's JSON shape with all properties, or None."""
        o = OBJECT_TYPES[_BY_ALIAS[obj].name]
        with self.lock:
            rec = self._stores[o.name].records.get(int(record_id))
            return self._shape(o, rec) if rec is not None else None

    def associations(self, from_obj: str, record_id: str | int, to_obj: str) -> list[str]:
        """Ids of the live records of ``to_obj`` linked to one record."""
        a, b = _BY_ALIAS[from_obj].name, _BY_ALIAS[to_obj].name
        with self.lock:
            return [str(i) for i in self._targets(a, int(record_id), b)]

    def link(
        self, from_obj: str, from_id: str | int, to_obj: str, to_id: str | int, type_id: int | None = None
    ) -> None:
        """Associate two records (the unlabelled default type unless ``type_id`` is given)."""
        a, b = _BY_ALIAS[from_obj].name, _BY_ALIAS[to_obj].name
        with self.lock:
            self._link(a, int(from_id), b, int(to_id), type_id or ASSOCIATION_TYPES[(a, b)][0])


# -- small pure helpers ----------------------------------------------------------------------------
def _default_category(status: int) -> str:
    return {
        400: "VALIDATION_ERROR",
        401: "INVALID_AUTHENTICATION",
        403: "MISSING_SCOPES",
        404: "OBJECT_NOT_FOUND",
        409: "CONFLICT",
        429: "RATE_LIMITS",
    }.get(status, "INTERNAL_ERROR" if status >= 500 else "VALIDATION_ERROR")


def _ago(seconds: float) -> str:
    """HubSpot's "expired N unit(s) ago" wording."""
    seconds = max(1, int(seconds))
    for size, unit in ((86_400, "day"), (3_600, "hour"), (60, "minute")):
        if seconds >= size:
            return f"{seconds // size} {unit}(s)"
    return f"{seconds} second(s)"


def _unique_key(name: str, value: str) -> str:
    return value.lower() if name == "email" else value


def _target_of(from_obj: str, type_id: Any) -> str | None:
    for (a, b), (_default, types) in ASSOCIATION_TYPES.items():
        if a == from_obj and type_id in types:
            return b
    return None


def _parse_sort(sort: Any) -> tuple[str, bool]:
    """``"prop"``/``"-prop"`` (the spec's string form) or ``{propertyName, direction}``."""
    if isinstance(sort, dict):
        return str(sort.get("propertyName", "")), str(sort.get("direction", "")).upper() == "DESCENDING"
    text = str(sort)
    return (text[1:], True) if text.startswith("-") else (text, False)


def _invalid_code(definition: JSON) -> str:
    return {
        "number": "INVALID_FLOAT",
        "datetime": "INVALID_DATE",
        "date": "INVALID_DATE",
        "enumeration": "INVALID_OPTION",
        "bool": "INVALID_BOOLEAN",
    }.get(definition["type"], "INVALID_VALUE")


def _normalise(definition: JSON, value: str) -> str | None:
    """A property value as HubSpot stores it, or None when it is not valid for the property's type."""
    kind = definition["type"]
    if kind == "number":
        try:
            number = float(value)
        except ValueError:
            return None
        return value.strip() if math.isfinite(number) else None
    if kind in ("datetime", "date"):
        ms = to_ms(value)
        if ms is None:
            return None
        if kind == "date":
            return time.strftime("%Y-%m-%d", time.gmtime(ms // 1000))
        return iso_ms(ms)
    if kind == "bool":
        lowered = value.lower()
        return lowered if lowered in ("true", "false") else None
    if kind == "enumeration" and not definition.get("externalOptions"):
        allowed = {opt["value"] for opt in definition["options"]}
        parts = value.split(";") if definition.get("fieldType") == "checkbox" else [value]
        return value if all(p in allowed for p in parts) else None
    return value


def _legacy_prop(definition: JSON) -> JSON:
    """A v3 property definition in the legacy v1/v2 shape (a flat object, options with readOnly)."""
    meta = definition.get("modificationMetadata") or {}
    return {
        "name": definition["name"],
        "label": definition["label"],
        "description": definition.get("description", ""),
        "groupName": definition["groupName"],
        "type": definition["type"],
        "fieldType": definition["fieldType"],
        "options": [{**o, "description": "", "readOnly": False} for o in definition.get("options", [])],
        "displayOrder": definition.get("displayOrder", -1),
        "calculated": definition.get("calculated", False),
        "externalOptions": definition.get("externalOptions", False),
        "hasUniqueValue": definition.get("hasUniqueValue", False),
        "hidden": definition.get("hidden", False),
        "hubspotDefined": definition.get("hubspotDefined", False),
        "formField": definition.get("formField", False),
        "readOnlyValue": bool(meta.get("readOnlyValue", False)),
        "readOnlyDefinition": bool(meta.get("readOnlyDefinition", False)),
        "mutableDefinitionNotDeletable": bool(definition.get("hubspotDefined", False)),
        "favorited": False,
        "favoritedOrder": -1,
        "displayMode": "current_value",
        "showCurrencySymbol": False,
        "searchableInGlobalSearch": False,
        "deleted": False,
    }


def _bulk_defaults(obj: str, rid: int, ms: int) -> dict[str, str]:
    if obj == "contacts":
        return {"email": f"bulk{rid}@example.com", "firstname": "Bulk", "lastname": f"Contact {rid}"}
    if obj == "companies":
        return {"name": f"Bulk Company {rid}", "domain": f"bulk{rid}.example.com"}
    if obj == "deals":
        return {"dealname": f"Bulk deal {rid}", "dealstage": "appointmentscheduled", "pipeline": "default"}
    if obj == "calls":
        return {"hs_timestamp": iso_ms(ms), "hs_call_title": f"Call {rid}", "hs_call_direction": "OUTBOUND"}
    return {"hs_timestamp": iso_ms(ms), "hs_task_subject": f"Task {rid}", "hs_task_status": "NOT_STARTED"}


# -- deterministic seed data ------------------------------------------------------------------------
# fmt: off
_FIRST = (
    "Ada", "Alan", "Alice", "Amara", "Anna", "Ben", "Bianca", "Carlos", "Chen", "Clara", "Daniel", "Diego",
    "Elena", "Emma", "Farah", "Felix", "Grace", "Hana", "Hugo", "Ines", "Isaac", "Ivy", "Jamal", "James",
    "Jana", "Jonas", "Julia", "Kai", "Karin", "Leo", "Lina", "Luca", "Maya", "Mei", "Mila", "Nadia", "Noah",
    "Nora", "Omar", "Oscar", "Paula", "Priya", "Rafael", "Rosa", "Sami", "Sara", "Sofia", "Tariq", "Tom", "Uma",
    "Vera", "Victor", "Wei", "Yara", "Yusuf", "Zoe", "Aiko", "Bruno", "Dara", "Eli", "Femi", "Gita",
)
_LAST = (
    "Abbott", "Adeyemi", "Bauer", "Becker", "Brown", "Castro", "Chen", "Costa", "Dubois", "Eriksen", "Fischer",
    "Garcia", "Gomez", "Hansen", "Hoffmann", "Ibrahim", "Ito", "Jensen", "Johnson", "Kim", "Kowalski", "Kumar",
    "Larsen", "Lee", "Lopez", "Martin", "Meyer", "Moreau", "Muller", "Nakamura", "Nguyen", "Novak", "Okafor",
    "Olsen", "Park", "Patel", "Perez", "Petrov", "Quinn", "Rossi", "Santos", "Schmidt", "Silva", "Singh",
    "Smith", "Sorensen", "Tanaka", "Taylor", "Thomas", "Torres", "Vogel", "Wagner", "Walker", "Weber",
    "Williams", "Wilson", "Wong", "Yamamoto", "Zhang", "Ziegler", "Keller", "Lindqvist", "Moretti", "Haddad",
)
_WORDS_A = (
    "Blue", "Bright", "Cedar", "Clear", "Delta", "Iron", "North", "Nova", "Oak", "Pine", "Quantum", "Red",
    "Silver", "Solar", "Summit", "Swift",
)
_WORDS_B = (
    "Analytics", "Bakery", "Dynamics", "Foods", "Freight", "Health", "Labs", "Logistics", "Media", "Motors",
    "Robotics", "Systems", "Works",
)
# fmt: on
_SUFFIX = ("Inc", "LLC", "GmbH", "Ltd", "Co", "Group")
_CITIES = ("Berlin", "Boston", "Lisbon", "London", "Lyon", "Madrid", "Oslo", "Paris", "Toronto", "Vienna")
_TITLES = ("CEO", "CTO", "Head of Sales", "Account Executive", "Office Manager", "Buyer", "Engineer", "COO")
_PRODUCTS = ("Pilot", "Renewal", "Expansion", "Annual plan", "Starter pack", "Enterprise rollout")


class _Seeder:
    """Generates deterministic, realistic records: unique domains, emails, names and phones."""

    def __init__(self, emulator: HubSpotEmulator, rng: random.Random) -> None:
        self.emu, self.rng = emulator, rng
        stores = emulator._stores
        self.domains = set(stores["companies"].unique.get("domain", {}))
        self.names = {
            (r.props.get("firstname", ""), r.props.get("lastname", "")) for r in stores["contacts"].records.values()
        }
        self.phones = {r.props.get("phone") for s in stores.values() for r in s.records.values()}
        # Where the search for a free numbered domain or email resumes, so each is found in O(1).
        self.next_suffix: dict[str, int] = {}

    def _ms(self) -> tuple[int, int]:
        created = SEED_EPOCH_MS + self.rng.randrange(0, 300 * 86_400_000)
        return created, created + self.rng.randrange(0, 30 * 86_400_000)

    def _phone(self) -> str:
        # Each block of 100,000 numbers (an area code) takes at most 50,000 seeded phones, so a draw
        # finds a free number in two tries on average however many records are seeded.
        block = len(self.phones) // 50_000
        area = 617 if block == 0 else 200 + (block - 1) % 800
        exchange = 556 + (block - 1) // 800 if block else 555
        while True:
            phone = f"+1 {area} {exchange} {self.rng.randrange(10_000):04d}{self.rng.randrange(10)}"
            if phone not in self.phones:
                self.phones.add(phone)
                return phone

    def _insert(self, obj: str, props: dict[str, str]) -> _Record:
        created, updated = self._ms()
        rec = self.emu._insert(OBJECT_TYPES[obj], props, created)
        rec.updated = updated
        return rec

    def run(self, *, contacts: int, companies: int, deals: int) -> None:
        emu, rng = self.emu, self.rng
        company_recs = [self._company() for _ in range(companies)]
        if not company_recs and (contacts or deals):
            live = emu._stores["companies"].active
            company_recs = [emu._stores["companies"].records[i] for i in live]
        contact_recs = [self._contact(rng.choice(company_recs) if company_recs else None) for _ in range(contacts)]
        if not contact_recs and deals:
            contact_recs = [emu._stores["contacts"].records[i] for i in emu._stores["contacts"].active]
        for _ in range(deals):
            self._deal(
                rng.choice(contact_recs) if contact_recs else None,
                rng.choice(company_recs) if company_recs else None,
            )

    def _company(self) -> _Record:
        rng = self.rng
        while True:
            name = f"{rng.choice(_WORDS_A)} {rng.choice(_WORDS_B)}"
            base = name.lower().replace(" ", "")
            domain = f"{base}.example.com"
            n = self.next_suffix.get(base, 2)
            while domain in self.domains:
                domain = f"{base}{n}.example.com"
                n += 1
            self.next_suffix[base] = n
            break
        self.domains.add(domain)
        city = rng.choice(_CITIES)
        props = {
            "name": f"{name} {rng.choice(_SUFFIX)}",
            "domain": domain,
            "website": f"https://www.{domain}",
            "phone": self._phone(),
            "city": city,
            "numberofemployees": str(rng.choice((5, 12, 40, 120, 450, 2000))),
            "lifecyclestage": rng.choice(("lead", "opportunity", "customer")),
        }
        return self._insert("companies", props)

    def _contact(self, company: _Record | None) -> _Record:
        rng = self.rng
        # Past half of a name pool, free names are rare: start at the next pool, or take a repeat.
        plain = len(_FIRST) * len(_LAST)
        first_try = 20 if len(self.names) >= plain // 2 else 0
        last_try = first_try + 1 if len(self.names) >= plain * 26 // 2 else 50
        for attempt in range(first_try, last_try):
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            if attempt >= 20:  # past the name pool: a middle initial keeps full names unique
                first = f"{first} {chr(65 + rng.randrange(26))}."
            if (first, last) not in self.names:
                break
        self.names.add((first, last))
        domain = company.props["domain"] if company else "example.net"
        local = re.sub(r"[^a-z]+", ".", f"{first}.{last}".lower()).strip(".")
        email, n = f"{local}@{domain}", self.next_suffix.get(f"{local}@{domain}", 2)
        emails = self.emu._stores["contacts"].unique.setdefault("email", {})
        while email in emails:
            email, n = f"{local}{n}@{domain}", n + 1
        self.next_suffix[f"{local}@{domain}"] = n
        props = {
            "firstname": first,
            "lastname": last,
            "email": email,
            "phone": self._phone(),
            "jobtitle": rng.choice(_TITLES),
            "lifecyclestage": rng.choice(("lead", "marketingqualifiedlead", "salesqualifiedlead", "customer")),
        }
        if company:
            props["company"] = company.props["name"]
            props["city"] = company.props.get("city", "")
            props["associatedcompanyid"] = str(company.id)
        rec = self._insert("contacts", props)
        if company:
            self.emu._link("contacts", rec.id, "companies", company.id, 1)
        return rec

    def _deal(self, contact: _Record | None, company: _Record | None) -> _Record:
        rng = self.rng
        stage = rng.choice([v for v, _ in _DEAL_STAGES])
        label = company.props["name"] if company else "Direct"
        props = {
            "dealname": f"{label} - {rng.choice(_PRODUCTS)}",
            "amount": str(rng.randrange(5, 500) * 100),
            "dealstage": stage,
            "pipeline": "default",
            "closedate": iso_ms(SEED_EPOCH_MS + rng.randrange(0, 400) * 86_400_000),
        }
        rec = self._insert("deals", props)
        if contact:
            self.emu._link("deals", rec.id, "contacts", contact.id, 3)
        if company:
            self.emu._link("deals", rec.id, "companies", company.id, 5)
        return rec


def build_hubspot(**kwargs: Any) -> HubSpotEmulator:
    """The factory behind ``crmsync sandbox serve hubspot --seed N --contacts N ...``."""
    return HubSpotEmulator(**kwargs)


def sandbox(options: SandboxOptions) -> Sandbox:
    """A seeded HubSpot for `crmsync sandbox serve` and `crmsync demo` (a private-app token connects)."""
    emu = build_hubspot(
        seed=options.seed,
        contacts=options.contacts,
        companies=options.companies,
        deals=options.deals,
        faults=options.faults,
    )
    return Sandbox(emu, secret=emu.private_app_token, credentials={"token": emu.private_app_token})
