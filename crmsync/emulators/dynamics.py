"""A Dynamics 365 Sales emulator: Microsoft Entra ID's token endpoints and the Dataverse Web API v9.2.

Built from shared/reference/dynamics.md (the Learn pages it cites) and from what msal and the
PowerPlatform-Dataverse-Client SDK expect, not from what crmsync sends:

* Entra: ``/{tenant}/v2.0/.well-known/openid-configuration`` (msal's tenant discovery; endpoints
  are named ``https://`` as Entra names them), ``/{tenant}/oauth2/v2.0/token`` (client credentials
  with a secret in HTTP Basic or the form, or a certificate's signed ``client_assertion``;
  authorisation code with PKCE S256; refresh token) and ``/oauth2/v2.0/authorize`` (consents at once
  and redirects); errors as ``{"error", "error_description": "AADSTS…", "error_codes"}``;
* Web API: ``contacts``, ``accounts``, ``opportunities``, ``phonecalls``, ``tasks``, ``systemusers``;
  POST 204 + ``OData-EntityId`` (201 with ``return=representation``); PATCH as update (``If-Match``),
  create-only (``If-None-Match: *``, 412) or upsert, by id or by an alternate key the table defines;
  ``@odata.bind`` to existing rows only (404 otherwise); closed activities are read-only;
  ``$select``/``$filter``/``$orderby``/``$top``, pages of ``odata.maxpagesize`` with ``@odata.nextLink``;
  change tracking (``odata.track-changes``: ``@odata.deltaLink``, ``$deletedEntity`` tombstones,
  ``$filter``/``$orderby``/``$top`` refused, tokens that expire); multipart ``$batch`` with change
  sets (atomic) and ``odata.continue-on-error``; ``EntityDefinitions`` metadata (attributes, keys,
  option sets); ``WhoAmI``;
* service protection limits per user: requests per sliding window (6,000 per 300 s) and concurrent
  requests (52), answered 429 with ``Retry-After`` in seconds and the documented error codes.
"""

from __future__ import annotations

import copy
import email
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, unquote

import httpx

from crmsync.emulators.base import Emulator, Faults, _SlidingWindow, json_response
from crmsync.emulators.dynamics_entra import EntraEndpoints, iso
from crmsync.emulators.dynamics_odata import FilterError, key_segment, order, parse_filter
from crmsync.emulators.sandbox import Sandbox, SandboxOptions

API = "/api/data/v9.2"
MAX_PAGE = 5000
MAX_BATCH = 1000
#: entity set -> (logical name, primary key)
SETS = {
    "contacts": ("contact", "contactid"),
    "accounts": ("account", "accountid"),
    "opportunities": ("opportunity", "opportunityid"),
    "phonecalls": ("phonecall", "activityid"),
    "tasks": ("task", "activityid"),
    "systemusers": ("systemuser", "systemuserid"),
}
LOGICAL = {logical: (es, key) for es, (logical, key) in SETS.items()}
S, M, INT, B, D, L, P = "String", "Memo", "Integer", "Boolean", "DateTime", "Lookup", "Picklist"
_COMMON: dict[str, tuple[str, int | None]] = {
    "createdon": (D, None),
    "modifiedon": (D, None),
    "statecode": ("State", None),
    "statuscode": ("Status", None),
    "ownerid": ("Owner", None),
}
#: Columns per table: (attribute type, max length). Lookups are written by bind, read as _x_value.
COLUMNS: dict[str, dict[str, tuple[str, int | None]]] = {
    "contact": {
        "contactid": ("Uniqueidentifier", None),
        "firstname": (S, 50),
        "lastname": (S, 50),
        "fullname": (S, 160),
        "emailaddress1": (S, 100),
        "telephone1": (S, 50),
        "jobtitle": (S, 100),
        "parentcustomerid": ("Customer", None),
        **_COMMON,
    },
    "account": {
        "accountid": ("Uniqueidentifier", None),
        "name": (S, 160),
        "websiteurl": (S, 200),
        "telephone1": (S, 50),
        "primarycontactid": (L, None),
        **_COMMON,
    },
    "opportunity": {
        "opportunityid": ("Uniqueidentifier", None),
        "name": (S, 300),
        "estimatedvalue": ("Money", None),
        "estimatedclosedate": (D, None),
        "stepname": (S, 200),
        "salesstage": (P, None),
        "customerid": ("Customer", None),
        "parentcontactid": (L, None),
        "parentaccountid": (L, None),
        "description": (M, 2000),
        **_COMMON,
    },
    "phonecall": {
        "activityid": ("Uniqueidentifier", None),
        "subject": (S, 200),
        "description": (M, 2000),
        "phonenumber": (S, 200),
        "directioncode": (B, None),
        "actualdurationminutes": (INT, None),
        "actualstart": (D, None),
        "actualend": (D, None),
        "scheduledstart": (D, None),
        "scheduledend": (D, None),
        "leftvoicemail": (B, None),
        "regardingobjectid": (L, None),
        **_COMMON,
    },
    "task": {
        "activityid": ("Uniqueidentifier", None),
        "subject": (S, 200),
        "description": (M, 2000),
        "scheduledend": (D, None),
        "regardingobjectid": (L, None),
        **_COMMON,
    },
    "systemuser": {
        "systemuserid": ("Uniqueidentifier", None),
        "fullname": (S, 200),
        "internalemailaddress": (S, 100),
        "isdisabled": (B, None),
    },
}
#: Lookup targets allowed per (table, column).
TARGETS = {
    "parentcustomerid": {"account", "contact"},
    "customerid": {"account", "contact"},
    "parentcontactid": {"contact"},
    "parentaccountid": {"account"},
    "primarycontactid": {"contact"},
    "regardingobjectid": {"account", "contact", "opportunity"},
    "ownerid": {"systemuser"},
    "partyid": {"systemuser", "contact", "account"},
}
OPTIONS = {
    ("opportunity", "salesstage"): [(0, "Qualify"), (1, "Develop"), (2, "Propose"), (3, "Close")],
    ("phonecall", "statecode"): [(0, "Open"), (1, "Completed"), (2, "Canceled")],
    ("phonecall", "statuscode"): [(1, "Open"), (2, "Made"), (3, "Canceled"), (4, "Received")],
    ("task", "statecode"): [(0, "Open"), (1, "Completed"), (2, "Canceled")],
    ("task", "statuscode"): [(2, "Not Started"), (3, "In Progress"), (5, "Completed"), (6, "Canceled")],
    ("opportunity", "statecode"): [(0, "Open"), (1, "Won"), (2, "Lost")],
    ("opportunity", "statuscode"): [(1, "In Progress"), (2, "On Hold"), (3, "Won"), (4, "Canceled"), (5, "Out-Sold")],
}
ACTIVITIES = {"phonecall", "task"}
DEFAULT_STATUS = {"phonecall": 1, "task": 2, "opportunity": 1}
#: Service protection limits (per user, per web server).
WINDOW_REQUESTS, WINDOW_SECONDS, CONCURRENT = 6000, 300.0, 52
EXPIRED = "Version stamp associated with the client has expired. Please perform a full sync."


class DataverseError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class DynamicsEmulator(EntraEndpoints, Emulator):
    """A Dataverse environment with an application user (client credentials), a person (auth code) and reps."""

    provider: ClassVar[str] = "dynamics"

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        seed: int = 0,
        keys: dict[str, list[str]] | None = None,
        untracked: set[str] | None = None,
        marker_column: bool = True,
        limits: tuple[int, float] = (WINDOW_REQUESTS, WINDOW_SECONDS),
        concurrent: int = CONCURRENT,
        expire_days: float = 7.0,
    ) -> None:
        super().__init__(faults=faults)
        rng = __import__("random").Random(seed)
        self.seed = seed
        self.tenant = str(uuid.UUID(int=rng.getrandbits(128)))
        self.organization_id = str(uuid.UUID(int=rng.getrandbits(128)))
        self.business_unit_id = str(uuid.UUID(int=rng.getrandbits(128)))
        self.client_id = str(uuid.UUID(int=rng.getrandbits(128)))
        self.client_secret = f"dyn~{secrets.token_urlsafe(24)}"
        self.certificates: dict[str, Any] = {}  # x5t thumbprint -> public key (for client assertions)
        #: Alternate keys defined per table (logical -> columns of single-column keys).
        self.keys = {k: list(v) for k, v in (keys or {}).items()}
        self.untracked = set(untracked or ())
        self.marker_column = marker_column
        self.limits, self.concurrent, self.expire_days = limits, concurrent, expire_days
        self.tables: dict[str, dict[str, dict[str, Any]]] = {logical: {} for logical in LOGICAL}
        self.version = 1000
        self.tombstones: list[tuple[int, str, str, float]] = []  # (version, logical, id, when)
        self.expired_tokens: set[str] = set()
        self.tokens: dict[str, tuple[float, str]] = {}  # access token -> (expiry, systemuserid)
        self.audiences: dict[str, str] = {}  # access token -> the environment's host it is for
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> systemuserid
        self.codes: dict[str, dict[str, str]] = {}
        self._user_windows: dict[str, _SlidingWindow] = {}
        self._user_flight: dict[str, int] = {}
        self._pages: dict[str, tuple[list[dict[str, Any]], str | None, dict[str, Any]]] = {}
        self._burst: list[float] = []  # scripted 429s: Retry-After of each
        self.throttle_log: list[tuple[float, str]] = []  # (monotonic time, "429"|"ok") around scripted bursts
        self.request_count = 0
        self._journal: list[tuple[str, str, dict[str, Any] | None]] | None = None
        self.app_user = self._seed_user("# crmsync-app", f"app-{self.client_id[:8]}@contoso.example", app=True)
        self.person = self._seed_user("Pat Admin", "admin@example.com")
        self.reps = [self._seed_user("Rep One", "rep1@example.com"), self._seed_user("Rep Two", "rep2@example.com")]
        self._register()

    # -- set-up ----------------------------------------------------------------------------------
    def _seed_user(self, name: str, email: str, *, app: bool = False) -> str:
        uid = str(uuid.uuid4())
        self._store(
            "systemuser",
            uid,
            {"systemuserid": uid, "fullname": name, "internalemailaddress": email, "isdisabled": False},
        )
        return uid

    def _register(self) -> None:
        r = self.route
        r(
            "GET",
            r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration",
            self._discovery,
            bucket="none",
            name="oidc token",
        )
        r("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", self._token, bucket="none", name="oauth token")
        r("GET", r"/common/discovery/instance", self._instance, bucket="none", name="oidc instance")
        r("GET", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/authorize", self._authorize, bucket="none", name="oauth authorize")
        r("GET", rf"{API}/WhoAmI(?:\(\))?", self._whoami, name="whoami")
        r("POST", rf"{API}/\$batch", self._batch, name="batch")
        r("GET", rf"{API}/EntityDefinitions", self._definitions, name="metadata read")
        r("GET", rf"{API}/EntityDefinitions\((?P<ref>[^)]*)\)", self._definition, name="metadata read")
        r(
            "GET",
            rf"{API}/EntityDefinitions\((?P<ref>[^)]*)\)/Attributes(?:/(?P<cast>[A-Za-z.]+))?",
            self._attributes,
            name="metadata read",
        )
        r("GET", rf"{API}/(?P<es>[a-z]+)", self._list, name="list read")
        r("POST", rf"{API}/(?P<es>[a-z]+)", self._create, name="create")
        r("GET", rf"{API}/(?P<es>[a-z]+)\((?P<ref>.*)\)", self._get, name="get read")
        r("PATCH", rf"{API}/(?P<es>[a-z]+)\((?P<ref>.*)\)", self._patch, name="patch")
        r("DELETE", rf"{API}/(?P<es>[a-z]+)\((?P<ref>.*)\)", self._delete, name="delete")

    # -- state -----------------------------------------------------------------------------------
    def _store(self, logical: str, rid: str, row: dict[str, Any] | None) -> None:
        if self._journal is not None:
            old = self.tables[logical].get(rid)
            self._journal.append((logical, rid, copy.deepcopy(old) if old is not None else None))
        if row is None:
            self.tables[logical].pop(rid, None)
        else:
            self.tables[logical][rid] = row

    def records(self, es: str) -> list[dict[str, Any]]:
        """Rows of an entity set as stored (tests)."""
        return [dict(r) for r in self.tables[SETS[es][0]].values()]

    def create(self, es: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a row as another user of the CRM would (tests, seeding)."""
        with self.lock:
            logical, key = SETS[es]
            rid = str(body.get(key) or uuid.uuid4()).lower()
            self._write(logical, rid, {k: v for k, v in body.items() if k != key}, creating=True)
            return dict(self.tables[logical][rid])

    def update(self, es: str, rid: str, body: dict[str, Any]) -> None:
        with self.lock:
            self._write(SETS[es][0], rid, body, creating=False)

    def bulk_create(
        self, es: str, n: int, body_fn: Callable[[int], dict[str, Any]], *, at: float | None = None
    ) -> list[str]:
        """Seed ``n`` rows of plain columns fast (no validation, binds or journal), created and modified ``at``."""
        logical, key = SETS[es]
        stamp = iso(self.now() if at is None else at)
        ids: list[str] = []
        with self.lock:
            table = self.tables[logical]
            for i in range(n):
                rid = str(uuid.uuid4())
                self.version += 1
                row = {**body_fn(i), key: rid, "statecode": 0, "createdon": stamp, "modifiedon": stamp}
                row["versionnumber"] = self.version
                if logical in DEFAULT_STATUS:
                    row["statuscode"] = DEFAULT_STATUS[logical]
                if logical != "systemuser":
                    row["_ownerid_value"], row["_ownerid_value@type"] = self.app_user, "systemuser"
                if logical == "contact":
                    row["fullname"] = " ".join(p for p in (row.get("firstname"), row.get("lastname")) if p) or None
                table[rid] = row
                ids.append(rid)
        return ids

    def delete(self, es: str, rid: str) -> None:
        with self.lock:
            self._remove(SETS[es][0], rid)

    def expire_delta_tokens(self) -> None:
        """Every delta token issued so far expires (as ``expirechangetrackingindays`` passing)."""
        with self.lock:
            self.expired_tokens.add(f"<{self.version}")

    def throttle(self, retry_after: float, count: int = 1) -> None:
        """The next ``count`` authenticated requests are answered 429 with this ``Retry-After``."""
        with self.lock:
            self._burst += [retry_after] * count

    # -- links -----------------------------------------------------------------------------------
    def _origin(self, request: httpx.Request) -> str:
        """Where the Web API's own links point: the scheme and host the request came to."""
        return f"{request.url.scheme}://{request.headers.get('host') or request.url.netloc.decode()}"

    # -- the Web API's envelope, auth and limits ------------------------------------------------
    def error_response(self, status: int, message: str, **extra: Any) -> httpx.Response:
        return json_response(
            {"error": {"code": str(extra.get("code", "")), "message": message}},
            status,
            headers={"OData-Version": "4.0"},
        )

    def _error(self, exc: DataverseError) -> httpx.Response:
        return self.error_response(exc.status, exc.message, code=exc.code)

    def rate_limited_response(self, bucket: str, retry_after: float) -> httpx.Response:
        self.stats.rate_limited += 1
        seconds = max(1, math.ceil(retry_after))
        if bucket == "concurrency":
            code, message = "0x80072326", f"Number of concurrent requests exceeded the limit of {self.concurrent}."
        else:
            code = "0x80072322"
            message = (
                f"Number of requests exceeded the limit of {self.limits[0]} over time window of "
                f"{int(self.limits[1])} seconds."
            )
        response = self.error_response(429, message, code=code)
        response.headers["Retry-After"] = str(seconds)
        return response

    def authenticate(self, request: httpx.Request, route_name: str) -> httpx.Response | None:
        if route_name.startswith(("oauth", "oidc")):
            return None
        header = request.headers.get("authorization", "")
        entry = self.tokens.get(header[7:].strip()) if header.lower().startswith("bearer ") else None
        audience = self.audiences.get(header[7:].strip())
        if entry is None or entry[0] <= self.now() or audience != (request.headers.get("host") or ""):
            response = self.error_response(401, "", code="")
            response.headers["WWW-Authenticate"] = (
                f"Bearer authorization_uri=https://login.microsoftonline.com/{self.tenant}/oauth2/authorize"
            )
            return response
        self.request_count += 1
        if self._burst:
            wait = self._burst.pop(0)
            self.throttle_log.append((time.monotonic(), "429"))
            return self.rate_limited_response("requests", wait)
        if self.throttle_log:
            self.throttle_log.append((time.monotonic(), "ok"))
        user = entry[1]
        window = self._user_windows.setdefault(user, _SlidingWindow(*self.limits))
        wait = window.admit(time.monotonic())
        if wait:
            return self.rate_limited_response("requests", wait)
        return None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        # Concurrency counts per user, as the service protection limit does.
        user = self.tokens.get(request.headers.get("authorization", "")[7:].strip(), (0.0, ""))[1]
        with self._flight_lock:
            self._user_flight[user] = self._user_flight.get(user, 0) + 1
            over = bool(user) and self._user_flight[user] > self.concurrent
        try:
            if over:
                with self.lock:
                    self.stats.requests += 1
                return self.rate_limited_response("concurrency", 1.0)
            response = super().__call__(request)
            window = self._user_windows.get(user)
            if window is not None:
                # Debug headers of the service protection limits (reference §8): requests left in the window.
                left = self.limits[0] - window.used(time.monotonic(), self.limits[1])
                response.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] = str(max(0, left))
            return response
        finally:
            with self._flight_lock:
                self._user_flight[user] -= 1

    def _caller(self, request: httpx.Request) -> str:
        return self.tokens.get(request.headers.get("authorization", "")[7:].strip(), (0.0, self.app_user))[1]

    # -- rows ------------------------------------------------------------------------------------
    def _columns(self, logical: str) -> dict[str, tuple[str, int | None]]:
        cols = dict(COLUMNS[logical])
        if self.marker_column and logical in ACTIVITIES:
            cols["crmsync_outcomeid"] = (S, 100)
        return cols

    def _resolve(self, logical: str, ref: str) -> str | None:
        """The id a key segment names: a GUID, or an alternate key the table defines."""
        seg = key_segment(ref)
        if isinstance(seg, str):
            return seg
        if len(seg) != 1 or next(iter(seg)) not in self.keys.get(logical, []):
            raise DataverseError(
                400,
                "0x80060888",
                "The key in the request URI is not valid for resource "
                f"'Microsoft.Dynamics.CRM.{logical}'. Make sure to specify the correct number of key "
                "properties, and that the key properties are named correctly.",
            )
        col, value = next(iter(seg.items()))
        for rid, row in self.tables[logical].items():
            if str(row.get(col) or "").lower() == value.lower():
                return rid
        return None

    def _bind(self, value: str) -> tuple[str, str]:
        """(logical, id) of an ``@odata.bind`` target, which must exist."""
        path = value.split(API, 1)[-1].lstrip("/")
        es, _, rest = path.partition("(")
        if es not in SETS or not rest.endswith(")"):
            raise DataverseError(
                400,
                "0x80048d19",
                "Error identified in Payload provided by the user for Entity :'', For more information "
                "on this error please follow this help link "
                "https://go.microsoft.com/fwlink/?linkid=2195293 ----> InnerException : "
                f"Microsoft.OData.ODataException: The URI '{value}' is not valid.",
            )
        logical = SETS[es][0]
        rid = self._resolve(logical, rest[:-1])
        if rid is None or rid not in self.tables[logical]:
            raise DataverseError(404, "0x80040217", f"{logical} With Id = {rest[:-1]} Does Not Exist")
        return logical, rid

    def _apply(self, logical: str, row: dict[str, Any], body: dict[str, Any], *, creating: bool) -> None:
        cols = self._columns(logical)
        for name, value in body.items():
            if name.startswith("@odata") or name == "@odata.type":
                continue
            if name.endswith("@odata.bind"):
                nav = name[: -len("@odata.bind")]
                column, _, target = nav.partition("_")
                target = target.split("_")[0] if target else ""
                if column not in cols or column not in TARGETS:
                    raise DataverseError(
                        400,
                        "0x80060888",
                        f"An undeclared property '{nav}' which only has property annotations in the "
                        "payload but no property value was found in the payload. In OData, only declared "
                        "navigation properties and declared named streams can be represented as "
                        "properties without values.",
                    )
                if column == "regardingobjectid" and not nav.endswith(f"_{logical}"):
                    raise DataverseError(
                        400,
                        "0x80060888",
                        f"An undeclared property '{nav}' which only has property annotations in the "
                        "payload but no property value was found in the payload.",
                    )
                kind, rid = self._bind(str(value))
                if (target and kind != target) or kind not in TARGETS[column]:
                    raise DataverseError(
                        400, "0x80040203", f"Invalid type for entity id {rid} of type {kind} for {column}."
                    )
                row[f"_{column}_value"], row[f"_{column}_value@type"] = rid, kind
                continue
            if name == "phonecall_activity_parties" and logical == "phonecall":
                parties = []
                for party in value or []:
                    mask = party.get("participationtypemask")
                    if mask not in (1, 2):
                        raise DataverseError(
                            400,
                            "0x80040203",
                            f"Invalid participation type mask {mask} for a phone call (1 sender, 2 to recipient).",
                        )
                    binds = [(k, v) for k, v in party.items() if k.endswith("@odata.bind") and k.startswith("partyid_")]
                    if len(binds) != 1:
                        raise DataverseError(400, "0x80040203", "An activity party needs exactly one partyid bind.")
                    kind, rid = self._bind(str(binds[0][1]))
                    parties.append({"partyid": rid, "type": kind, "participationtypemask": mask})
                row["parties"] = parties
                continue
            if name not in cols or cols[name][0] in ("Lookup", "Customer", "Owner"):
                raise DataverseError(
                    400,
                    "0x80060888",
                    f"The property '{name}' does not exist on type 'Microsoft.Dynamics.CRM.{logical}'. "
                    "Make sure to only use property names that are defined by the type or mark the type "
                    "as open type.",
                )
            if name in ("statecode",) and creating:
                raise DataverseError(
                    400,
                    "0x80040203",
                    f"The entity cannot be created with the specified value for statecode: {value}. Use a "
                    "second request to set the state.",
                )
            kind, length = cols[name]
            if length and isinstance(value, str) and len(value) > length:
                raise DataverseError(
                    400,
                    "0x80044331",
                    f"A validation error occurred. The length of the '{name}' attribute of the "
                    f"'{logical}' entity exceeded the maximum allowed length of '{length}'.",
                )
            if kind == "Integer" and value is not None and not isinstance(value, int):
                raise DataverseError(
                    400, "0x80048d19", f"Cannot convert the literal '{value}' to the expected type 'Edm.Int32'."
                )
            if kind == "Boolean" and value is not None and not isinstance(value, bool):
                raise DataverseError(
                    400, "0x80048d19", f"Cannot convert the literal '{value}' to the expected type 'Edm.Boolean'."
                )
            row[name] = value

    def _write(
        self, logical: str, rid: str, body: dict[str, Any], *, creating: bool, caller: str | None = None
    ) -> None:
        existing = self.tables[logical].get(rid)
        if existing is not None and logical in ACTIVITIES and existing.get("statecode", 0) != 0:
            raise DataverseError(
                400, "0x80040203", f"This {logical} is closed and cannot be modified. Reactivate it first."
            )
        row = copy.deepcopy(existing) if existing is not None else {}
        self._apply(logical, row, body, creating=existing is None)
        now = iso(self.now())
        key = LOGICAL[logical][1]
        if existing is None:
            row.setdefault("statecode", 0)
            if logical in DEFAULT_STATUS:
                row.setdefault("statuscode", DEFAULT_STATUS[logical])
            row[key] = rid
            row["createdon"] = now
            if logical != "systemuser" and "_ownerid_value" not in row:
                row["_ownerid_value"], row["_ownerid_value@type"] = caller or self.app_user, "systemuser"
        if logical == "contact":
            row["fullname"] = " ".join(p for p in (row.get("firstname"), row.get("lastname")) if p) or None
        self.version += 1
        row["modifiedon"], row["versionnumber"] = now, self.version
        self._store(logical, rid, row)

    def _remove(self, logical: str, rid: str) -> None:
        if rid not in self.tables[logical]:
            raise DataverseError(404, "0x80040217", f"{logical} With Id = {rid} Does Not Exist")
        self._store(logical, rid, None)
        self.version += 1
        self.tombstones.append((self.version, logical, rid, self.now()))

    def _check_select(self, logical: str, select: list[str] | None) -> None:
        cols = self._columns(logical)
        for name in select or []:
            base = name[1:-6] if name.startswith("_") and name.endswith("_value") else name
            if base not in cols or (base == name and cols[name][0] in ("Lookup", "Customer", "Owner")):
                raise DataverseError(
                    400,
                    "0x80060888",
                    f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{logical}'.",
                )

    def _project(
        self, logical: str, row: dict[str, Any], select: list[str] | None, annotations: bool
    ) -> dict[str, Any]:
        key = LOGICAL[logical][1]
        out: dict[str, Any] = {"@odata.etag": f'W/"{row.get("versionnumber", 0)}"'}
        names = select or [k for k in row if not k.endswith("@type") and k != "parties"]
        for name in dict.fromkeys([*names, key]):
            out[name] = row.get(name)
            if name.startswith("_") and name.endswith("_value") and annotations and row.get(name):
                out[f"{name}@Microsoft.Dynamics.CRM.lookuplogicalname"] = row.get(f"{name}@type")
        return out

    # -- handlers ----------------------------------------------------------------------------------
    @staticmethod
    def _params(request: httpx.Request) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(request.url.query.decode(), keep_blank_values=True).items()}

    @staticmethod
    def _prefer(request: httpx.Request) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in request.headers.get("prefer", "").split(","):
            name, _, value = part.strip().partition("=")
            if name:
                out[name.lower()] = value.strip().strip('"')
        return out

    def _set(self, es: str) -> tuple[str, str]:
        if es not in SETS:
            raise DataverseError(404, "0x80060888", f"Resource not found for the segment '{es}'.")
        return SETS[es]

    def _guard(handler: Any) -> Any:
        def wrapped(self: DynamicsEmulator, request: httpx.Request, **kw: str) -> httpx.Response:
            try:
                return handler(self, request, **kw)  # type: ignore[no-any-return]
            except DataverseError as exc:
                return self._error(exc)
            except FilterError as exc:
                return self._error(DataverseError(400, "0x80060888", str(exc)))

        return wrapped

    @_guard
    def _whoami(self, request: httpx.Request) -> httpx.Response:
        return json_response(
            {
                "@odata.context": f"{self._origin(request)}{API}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
                "BusinessUnitId": self.business_unit_id,
                "UserId": self._caller(request),
                "OrganizationId": self.organization_id,
            }
        )

    def _entity_url(self, request: httpx.Request, es: str, rid: str) -> str:
        return f"{self._origin(request)}{API}/{es}({rid})"

    @_guard
    def _create(self, request: httpx.Request, es: str) -> httpx.Response:
        logical, key = self._set(es)
        body = json.loads(request.content or b"{}")
        rid = str(body.pop(key, None) or uuid.uuid4()).lower()
        if rid in self.tables[logical]:
            raise DataverseError(412, "0x80040237", "A record with matching key values already exists.")
        self._write(logical, rid, body, creating=True, caller=self._caller(request))
        return self._written(request, logical, es, rid, created=True)

    def _written(self, request: httpx.Request, logical: str, es: str, rid: str, *, created: bool) -> httpx.Response:
        headers = {"OData-Version": "4.0", "OData-EntityId": self._entity_url(request, es, rid)}
        if "return" in self._prefer(request) and self._prefer(request)["return"] == "representation":
            select = [s for s in self._params(request).get("$select", "").split(",") if s] or None
            body = self._project(logical, self.tables[logical][rid], select, False)
            del headers["OData-EntityId"]
            return json_response(body, 201 if created else 200, headers=headers)
        return httpx.Response(204, headers=headers)

    @_guard
    def _get(self, request: httpx.Request, es: str, ref: str) -> httpx.Response:
        logical, _ = self._set(es)
        rid = self._resolve(logical, unquote(ref))
        row = self.tables[logical].get(rid or "")
        if row is None:
            raise DataverseError(404, "0x80040217", f"{logical} With Id = {ref} Does Not Exist")
        etag = f'W/"{row.get("versionnumber", 0)}"'
        if request.headers.get("if-none-match") == etag:
            return httpx.Response(304)
        select = [s for s in self._params(request).get("$select", "").split(",") if s] or None
        annotations = "include-annotations" in request.headers.get("prefer", "")
        self._check_select(logical, select)
        return json_response(
            self._project(logical, row, select, annotations), headers={"OData-Version": "4.0", "ETag": etag}
        )

    @_guard
    def _patch(self, request: httpx.Request, es: str, ref: str) -> httpx.Response:
        logical, key = self._set(es)
        seg = key_segment(unquote(ref))
        rid = self._resolve(logical, unquote(ref))
        body = json.loads(request.content or b"{}")
        exists = rid is not None and rid in self.tables[logical]
        if_match, if_none = request.headers.get("if-match"), request.headers.get("if-none-match")
        if if_none == "*" and exists:
            raise DataverseError(412, "0x80040237", "A record with matching key values already exists.")
        if if_match:
            if not exists:
                raise DataverseError(404, "0x80040217", f"{logical} With Id = {ref} Does Not Exist")
            if if_match != "*" and if_match != f'W/"{self.tables[logical][rid or ""].get("versionnumber", 0)}"':
                raise DataverseError(
                    412,
                    "0x80060882",
                    "The version of the existing record doesn't match the RowVersion property provided.",
                )
        body.pop(key, None)
        if rid is None:  # created by alternate key: the key's columns are the row's
            rid = str(uuid.uuid4())
            if isinstance(seg, dict):
                body = {**body, **seg}
        self._write(logical, rid, body, creating=not exists, caller=self._caller(request))
        return self._written(request, logical, es, rid, created=not exists)

    @_guard
    def _delete(self, request: httpx.Request, es: str, ref: str) -> httpx.Response:
        logical, _ = self._set(es)
        rid = self._resolve(logical, unquote(ref))
        self._remove(logical, rid or ref)
        return httpx.Response(204, headers={"OData-Version": "4.0"})

    @_guard
    def _list(self, request: httpx.Request, es: str) -> httpx.Response:
        logical, key = self._set(es)
        params = self._params(request)
        prefer = self._prefer(request)
        size = min(int(prefer.get("odata.maxpagesize") or MAX_PAGE), MAX_PAGE)
        annotations = "odata.include-annotations" in prefer
        select = [s for s in params.get("$select", "").split(",") if s] or None
        origin = f"{self._origin(request)}{API}/{es}"
        self._check_select(logical, select)
        if "$skiptoken" in params:
            return self._next_page(request, params["$skiptoken"], size)
        headers = {"OData-Version": "4.0"}
        tracking = "odata.track-changes" in prefer or "$deltatoken" in params
        if tracking:
            for name in ("$filter", "$orderby", "$expand", "$top"):
                if name in params:
                    raise DataverseError(
                        400,
                        "0x80060888",
                        f'The "{name}" query parameter isn\'t supported when Change Tracking is enabled.',
                    )
            if logical in self.untracked:
                raise DataverseError(400, "0x80048d19", f"Entity '{logical}' is not enabled for change tracking.")
            rows, context = self._delta_rows(logical, params.get("$deltatoken"), select, annotations)
            select_q = quote(",".join(select or []), safe=",")
            token = quote(
                f"{self.version}!{datetime.fromtimestamp(self.now(), UTC).strftime('%m/%d/%Y %H:%M:%S')}", safe=""
            )
            delta = f"{origin}?$select={select_q}&$deltatoken={token}"
            headers["Preference-Applied"] = "odata.track-changes"
            return self._page(request, rows, size, delta=delta, context=context, headers=headers)
        rows = list(self.tables[logical].values())
        if "$filter" in params:
            pred = parse_filter(params["$filter"])
            rows = [r for r in rows if pred(r)]
        rows = order(rows, params["$orderby"]) if "$orderby" in params else sorted(rows, key=lambda r: r[key])
        if "$top" in params and "odata.maxpagesize" not in prefer:
            rows = rows[: int(params["$top"])]
        out = [self._project(logical, r, select, annotations) for r in rows]
        return self._page(request, out, size, delta=None, context=f"{es}", headers=headers)

    def _delta_rows(
        self, logical: str, token: str | None, select: list[str] | None, annotations: bool
    ) -> tuple[list[dict[str, Any]], str]:
        es = LOGICAL[logical][0]
        if token is None:
            rows = sorted(self.tables[logical].values(), key=lambda r: r.get("versionnumber", 0))
            return [self._project(logical, r, select, annotations) for r in rows], es
        since_text, _, stamp = unquote(token).partition("!")
        try:
            since = int(since_text)
            issued = datetime.strptime(stamp, "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise DataverseError(400, "0x80048d19", "The delta token is not valid.") from None
        expired = any(since < int(e[1:]) for e in self.expired_tokens) or self.now() - issued > self.expire_days * 86400
        if expired:
            # The status and code of this answer are not documented (reference §6): the message is what clients match.
            raise DataverseError(400, "", EXPIRED)
        changed = sorted(
            (r for r in self.tables[logical].values() if r.get("versionnumber", 0) > since),
            key=lambda r: r["versionnumber"],
        )
        out = [self._project(logical, r, select, annotations) for r in changed]
        for version, kind, rid, _ in self.tombstones:
            if kind == logical and version > since:
                out.append({"@odata.context": f"{API}/$metadata#{es}/$deletedEntity", "id": rid, "reason": "deleted"})
        return out, f"{es}/$delta"

    def _page(
        self,
        request: httpx.Request,
        rows: list[dict[str, Any]],
        size: int,
        *,
        delta: str | None,
        context: str,
        headers: dict[str, str],
    ) -> httpx.Response:
        meta = {"context": context, "delta": delta, "origin": f"{self._origin(request)}{request.url.path}"}
        return self._emit(rows, size, meta, headers)

    def _emit(
        self, rows: list[dict[str, Any]], size: int, meta: dict[str, Any], headers: dict[str, str]
    ) -> httpx.Response:
        first, rest = rows[:size], rows[size:]
        body: dict[str, Any] = {
            "@odata.context": f"{meta['origin'].split(API)[0]}{API}/$metadata#{meta['context']}",
            "value": first,
        }
        if rest:
            token = secrets.token_hex(8)
            self._pages[token] = (rest, None, meta)
            cookie = quote(
                f'<cookie pagenumber="2" pagingcookie="{token}" istracking="{bool(meta["delta"])}" />', safe=""
            )
            body["@odata.nextLink"] = f"{meta['origin']}?$skiptoken={cookie}"
        elif meta["delta"]:
            body["@odata.deltaLink"] = meta["delta"]
        return json_response(body, headers=headers)

    def _next_page(self, request: httpx.Request, skiptoken: str, size: int) -> httpx.Response:
        cookie = unquote(skiptoken)
        token = cookie.split('pagingcookie="', 1)[-1].split('"', 1)[0]
        entry = self._pages.get(token)  # a paging cookie stays valid: a resumed reader may send it again
        if entry is None:
            raise DataverseError(400, "0x80048d19", "The paging cookie is not valid or has expired.")
        rows, _, meta = entry
        headers = {"OData-Version": "4.0"}
        if meta["delta"]:
            headers["Preference-Applied"] = "odata.track-changes"
        return self._emit(rows, size, meta, headers)

    # -- $batch ----------------------------------------------------------------------------------
    @_guard
    def _batch(self, request: httpx.Request) -> httpx.Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/mixed") or "boundary=" not in content_type:
            raise DataverseError(
                400, "0x80048d19", "The content type of a $batch request must be multipart/mixed with a boundary."
            )
        go_on = "odata.continue-on-error" in self._prefer(request)
        # Read with the standard library's MIME parser, not the client's own multipart code.
        doc = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + request.content)
        groups: list[list[str] | str] = []
        for part in doc.get_payload() if doc.is_multipart() else []:
            if part.is_multipart():
                groups.append([_payload(p) for p in part.get_payload()])
            else:
                groups.append(_payload(part))
        count = sum(len(g) if isinstance(g, list) else 1 for g in groups)
        if count > MAX_BATCH:
            raise DataverseError(
                400, "0x80060888", f"The number of requests in batch exceeded the limit of {MAX_BATCH}."
            )
        out_boundary = f"batchresponse_{uuid.uuid4()}"
        chunks: list[str] = []
        for group in groups:
            if isinstance(group, str):
                response = self._inner(request, group)
                chunks.append(_http_part(response))
                failed = response.status_code >= 400
            else:
                self._journal = []
                answers = []
                failed = False
                for op in group:
                    response = self._inner(request, op)
                    if response.status_code >= 400:
                        failed = True
                        for logical, rid, old in reversed(self._journal):  # the change set rolls back
                            if old is None:
                                self.tables[logical].pop(rid, None)
                            else:
                                self.tables[logical][rid] = old
                        break
                    answers.append(response)
                self._journal = None
                if failed:
                    chunks.append(_http_part(response))
                else:
                    cs = f"changesetresponse_{uuid.uuid4()}"
                    body = "".join(f"--{cs}\r\n{_http_part(a)}\r\n" for a in answers) + f"--{cs}--"
                    chunks.append(f"Content-Type: multipart/mixed; boundary={cs}\r\n\r\n{body}")
            if failed and not go_on:
                break
        payload = "".join(f"--{out_boundary}\r\n{c}\r\n" for c in chunks) + f"--{out_boundary}--\r\n"
        return httpx.Response(
            200,
            content=payload.encode(),
            headers={"Content-Type": f"multipart/mixed; boundary={out_boundary}", "OData-Version": "4.0"},
        )

    def _inner(self, outer: httpx.Request, part: str) -> httpx.Response:
        line, _, rest = part.replace("\r\n", "\n").lstrip("\n").partition("\n")
        method, _, target = line.partition(" ")
        target = target.rsplit(" HTTP/", 1)[0]
        head, _, body = rest.partition("\n\n")
        headers = {k.strip(): v.strip() for k, _, v in (h.partition(":") for h in head.split("\n")) if k.strip()}
        if target.startswith("http"):
            target = target.split("://", 1)[1].partition("/")[2]  # the path: the part runs where the batch was sent
        elif not target.lstrip("/").startswith(API.lstrip("/")):
            target = f"{API}/{target.lstrip('/')}"
        url = httpx.URL(f"{self._origin(outer)}/{target.lstrip('/')}")
        request = httpx.Request(
            method,
            url,
            headers={**{k: v for k, v in outer.headers.items() if k.lower() in ("authorization", "host")}, **headers},
            content=body.strip().encode(),
        )
        matched = self._match(request)
        if matched is None or matched[3] == "batch":
            return self.error_response(400, f"Resource not found for the segment '{url.path}'.", code="0x80060888")
        handler, params, _, name = matched
        if request.method in self.write_methods:
            self.stats.writes += 1
        self.stats.by_route[f"{request.method} {name} (batch)"] += 1
        return handler(request, **params)

    # -- metadata --------------------------------------------------------------------------------
    def _entity_doc(self, logical: str) -> dict[str, Any]:
        es, key = LOGICAL[logical]
        return {
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, logical)),
            "LogicalName": logical,
            "SchemaName": logical.capitalize(),
            "EntitySetName": es,
            "PrimaryIdAttribute": key,
            "PrimaryNameAttribute": {"contact": "fullname", "systemuser": "fullname"}.get(
                logical, "subject" if logical in ACTIVITIES else "name"
            ),
            "ChangeTrackingEnabled": logical not in self.untracked,
            "Keys": [
                {"KeyAttributes": [col], "EntityKeyIndexStatus": "Active", "LogicalName": f"crmsync_{col}_key"}
                for col in self.keys.get(logical, [])
            ],
        }

    def _logical_of(self, ref: str) -> str:
        seg = key_segment(unquote(ref))
        logical = (
            seg.get("LogicalName", "")
            if isinstance(seg, dict)
            else next((name for name in LOGICAL if str(uuid.uuid5(uuid.NAMESPACE_URL, name)) == seg), "")
        )
        if logical not in LOGICAL:
            raise DataverseError(404, "0x80040217", f"Could not find entity with name '{logical or ref}'.")
        return logical

    @_guard
    def _definitions(self, request: httpx.Request) -> httpx.Response:
        params = self._params(request)
        docs = [self._entity_doc(name) for name in LOGICAL]
        if "$filter" in params:
            pred = parse_filter(params["$filter"])
            docs = [d for d in docs if pred(d)]
        select = [s for s in params.get("$select", "").split(",") if s]
        if select:
            docs = [{k: d[k] for k in [*select, "MetadataId"] if k in d} for d in docs]
        return json_response(
            {"@odata.context": f"{self._origin(request)}{API}/$metadata#EntityDefinitions", "value": docs}
        )

    @_guard
    def _definition(self, request: httpx.Request, ref: str) -> httpx.Response:
        doc = self._entity_doc(self._logical_of(ref))
        params = self._params(request)
        select = [s for s in params.get("$select", "").split(",") if s]
        expand = params.get("$expand", "")
        keep = set(select) | {"MetadataId"} | ({"Keys"} if "Keys" in expand else set())
        out = {k: v for k, v in doc.items() if not select or k in keep}
        if "Attributes" in expand:
            out["Attributes"] = [{"LogicalName": name} for name in self._columns(doc["LogicalName"])]
        return json_response(out)

    @_guard
    def _attributes(self, request: httpx.Request, ref: str, cast: str | None = None) -> httpx.Response:
        logical = self._logical_of(ref)
        wanted = {
            "Microsoft.Dynamics.CRM.PicklistAttributeMetadata": "Picklist",
            "Microsoft.Dynamics.CRM.StatusAttributeMetadata": "Status",
            "Microsoft.Dynamics.CRM.StateAttributeMetadata": "State",
        }.get(cast or "")
        if cast and wanted is None:
            raise DataverseError(400, "0x80060888", f"Resource not found for the segment '{cast}'.")
        out = []
        for name, (kind, length) in self._columns(logical).items():
            if wanted and kind != wanted:
                continue
            doc: dict[str, Any] = {
                "@odata.type": f"#Microsoft.Dynamics.CRM.{kind.replace('Uniqueid', 'UniqueId')}AttributeMetadata",
                "LogicalName": name,
                "SchemaName": name,
                "AttributeType": kind,
                "RequiredLevel": {
                    "Value": "SystemRequired"
                    if name == LOGICAL[logical][1]
                    else "ApplicationRequired"
                    if name in ("subject", "lastname", "name")
                    else "None"
                },
                "IsValidForCreate": name not in ("createdon", "modifiedon", "fullname", "statecode"),
                "IsValidForUpdate": name not in ("createdon", "modifiedon", "fullname", LOGICAL[logical][1]),
                "IsCustomAttribute": name.startswith("crmsync_"),
                "DisplayName": {"UserLocalizedLabel": {"Label": name.replace("_", " ").title(), "LanguageCode": 1033}},
            }
            if length:
                doc["MaxLength"] = length
            if wanted:
                doc["OptionSet"] = {
                    "Options": [
                        {"Value": v, "Label": {"UserLocalizedLabel": {"Label": label, "LanguageCode": 1033}}}
                        for v, label in OPTIONS.get((logical, name), [])
                    ]
                }
            out.append(doc)
        return json_response(
            {
                "@odata.context": f"{self._origin(request)}{API}/$metadata#EntityDefinitions('{logical}')/Attributes",
                "value": out,
            }
        )


def _payload(part: Any) -> str:
    """The HTTP request an ``application/http`` part carries."""
    raw = part.get_payload(decode=True)
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(part.get_payload())


def _http_part(response: httpx.Response) -> str:
    reason = {
        200: "OK",
        201: "Created",
        204: "No Content",
        304: "Not Modified",
        400: "Bad Request",
        404: "Not Found",
        412: "Precondition Failed",
        429: "Too Many Requests",
    }.get(response.status_code, "Error")
    lines = [
        "Content-Type: application/http",
        "Content-Transfer-Encoding: binary",
        "",
        f"HTTP/1.1 {response.status_code} {reason}",
    ]
    lines += [f"{k}: {v}" for k, v in response.headers.items() if k.lower() not in ("content-length",)]
    lines += ["", response.content.decode() if response.content else ""]
    return "\r\n".join(lines)


def build_dynamics(
    *,
    seed: int = 0,
    contacts: int = 100,
    companies: int = 25,
    deals: int = 10,
    faults: Faults | None = None,
    keys: dict[str, list[str]] | None = None,
) -> DynamicsEmulator:
    """A Dataverse environment seeded with contacts, accounts and opportunities (sandbox and benchmarks)."""
    emu = DynamicsEmulator(faults=faults, seed=seed, keys=keys)
    accounts = [
        emu.create("accounts", {"name": f"Company {seed}-{i}", "websiteurl": f"company{i}.example"})["accountid"]
        for i in range(companies)
    ]
    people = []
    for i in range(contacts):
        body: dict[str, Any] = {
            "firstname": "Person",
            "lastname": str(i),
            "emailaddress1": f"person{i}@example.com",
            "telephone1": f"+1202555{i:07d}",
        }
        if accounts:
            body["parentcustomerid_account@odata.bind"] = f"/accounts({accounts[i % len(accounts)]})"
        people.append(emu.create("contacts", body)["contactid"])
    for i in range(deals):
        body = {"name": f"Deal {i}", "estimatedvalue": 1000 + i}
        if people:
            body["customerid_contact@odata.bind"] = f"/contacts({people[i % len(people)]})"
        emu.create("opportunities", body)
    return emu


def sandbox(options: SandboxOptions) -> Sandbox:
    """A seeded environment for `crmsync sandbox serve`: the emulator is also the Entra authority, so
    ``--tenant`` is its own URL and tenant id; the client secret goes through stdin."""
    emu = build_dynamics(
        seed=options.seed,
        contacts=options.contacts,
        companies=options.companies,
        deals=options.deals,
        faults=options.faults,
    )
    return Sandbox(
        emu,
        secret=emu.client_secret,
        credentials={"tenant": emu.tenant, "client_id": emu.client_id, "client_secret": emu.client_secret},
        options={"tenant": f"{{url}}/{emu.tenant}", "client_id": emu.client_id},
    )
