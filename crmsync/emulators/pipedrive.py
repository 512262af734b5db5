"""A Pipedrive emulator: API v2 records, the v1 routes v2 lacks, token costs, burst limits and webhooks.

Built from Pipedrive's official OpenAPI files (``shared/specs/pipedrive``: v1.yaml, v2.yaml) and its
rate-limit documentation (reference: ``shared/reference/pipedrive.md``):

* v2 answers ``{success, data, additional_data: {next_cursor}}``; creates answer **200** with the full
  object; lists page by an opaque keyset cursor (``limit`` ≤ 500); ``updated_since`` is inclusive,
  ``updated_until`` exclusive; timestamps are RFC 3339 with second precision;
* deletes are soft: lists leave deleted rows out (deals only show them with ``status=deleted``), a
  ``GET /{obj}/{id}`` still returns them with ``is_deleted: true``;
* every request costs tokens from the company's daily budget (30,000 x plan multiplier x seats) and
  counts in a rolling 2-second burst window per token (search: 10 per 2 s); over either, **429**; the
  answers carry ``x-ratelimit-limit``/``-remaining``/``-reset`` and, for API-token writes,
  ``x-daily-requests-left``;
* activities have no custom fields and no external id: a client finds its own by a marker in ``note``;
* webhooks (v1 ``/webhooks``, payload version 2.0) are delivered with HTTP Basic auth and retried
  after 3, 30 and 150 s (scaled by ``webhook_retry_scale`` here so tests need not wait).
"""

from __future__ import annotations

import base64
import bisect
import json
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode

import httpx

from crmsync.emulators.base import Emulator, Faults, _SlidingWindow, json_response, request_json

#: Daily token multiplier and API-token burst (requests per 2 s) per plan; OAuth tokens get 4x.
PLANS: dict[str, tuple[int, int]] = {"lite": (1, 20), "growth": (2, 40), "premium": (5, 100), "ultimate": (7, 120)}
BASE_TOKENS = 30_000
SEARCH_BURST = 10
BURST_WINDOW = 2.0
DAILY_WRITES = 10_000  # x-daily-requests-left: POST/PUT/PATCH per UTC day for API tokens
MAX_LIMIT = 500
SEARCH_MAX_LIMIT = 100
ENTITY = {"persons": "person", "organizations": "organization", "deals": "deal", "activities": "activity"}
OBJECTS = tuple(ENTITY)
#: Token cost per operation (the specs' ``x-token-cost``).
COST = {
    "list": 10,
    "get": 1,
    "create": 5,
    "update": 5,
    "delete": 3,
    "search": 20,
    "fields": 10,
    "v1": 2,
    "v1_write": 10,
}
WEBHOOK_RETRIES = (3.0, 30.0, 150.0)

#: Standard fields per entity (v2 ``*Fields``: field_code, field_name, field_type).
STANDARD_FIELDS: dict[str, list[tuple[str, str, str]]] = {
    "person": [
        ("name", "Name", "varchar"),
        ("first_name", "First name", "varchar"),
        ("last_name", "Last name", "varchar"),
        ("owner_id", "Owner", "user"),
        ("org_id", "Organization", "org"),
        ("emails", "Email", "varchar"),
        ("phones", "Phone", "phone"),
        ("label_ids", "Labels", "set"),
        ("visible_to", "Visible to", "visible_to"),
        ("add_time", "Person created", "date"),
        ("update_time", "Update time", "date"),
    ],
    "organization": [
        ("name", "Name", "varchar"),
        ("owner_id", "Owner", "user"),
        ("address", "Address", "address"),
        ("label_ids", "Labels", "set"),
        ("visible_to", "Visible to", "visible_to"),
        ("add_time", "Organization created", "date"),
        ("update_time", "Update time", "date"),
    ],
    "deal": [
        ("title", "Title", "varchar"),
        ("value", "Value", "monetary"),
        ("currency", "Currency", "varchar"),
        ("owner_id", "Owner", "user"),
        ("person_id", "Contact person", "people"),
        ("org_id", "Organization", "org"),
        ("pipeline_id", "Pipeline", "double"),
        ("stage_id", "Stage", "stage"),
        ("status", "Status", "status"),
        ("expected_close_date", "Expected close date", "date"),
        ("add_time", "Deal created", "date"),
        ("update_time", "Update time", "date"),
    ],
    "activity": [
        ("subject", "Subject", "varchar"),
        ("type", "Type", "varchar"),
        ("owner_id", "Assigned to user", "user"),
        ("done", "Done", "boolean"),
        ("due_date", "Due date", "date"),
        ("due_time", "Due time", "time"),
        ("duration", "Duration", "time"),
        ("note", "Note", "text"),
        ("deal_id", "Deal", "deal"),
        ("person_id", "Contact person", "people"),
        ("org_id", "Organization", "org"),
    ],
}
STATUS_OPTIONS = ("open", "won", "lost", "deleted")
ACTIVITY_TYPES = ("call", "meeting", "task", "deadline", "email", "lunch")


def iso(ts: float) -> str:
    """RFC 3339 with second precision, as Pipedrive's v2 writes ``add_time``/``update_time``."""
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: str) -> float | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _order(rec: dict[str, Any], field: str) -> tuple[Any, int]:
    """A record's place in a list sorted by ``field`` (ties by id; an empty value sorts first)."""
    return (rec.get(field) or "", rec["id"])


def encode_cursor(field: str, value: Any, direction: str, last_id: int) -> str:
    raw = json.dumps({"field": field, "fieldValue": value, "sortDirection": direction, "id": last_id})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, Any] | None:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "id" in data else None


class PipedriveEmulator(Emulator):
    """A Pipedrive company with one admin user (the API token's) and a few reps."""

    provider: ClassVar[str] = "pipedrive"

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        seed: int = 0,
        plan: str = "growth",
        seats: int = 3,
        limits: bool = True,
        company_domain: str = "crmsync-sandbox",
        webhook_retry_scale: float = 1.0,
        webhook_client: Callable[[], httpx.Client] | None = None,
    ) -> None:
        super().__init__(faults=faults)
        self.seed = seed
        if plan not in PLANS:
            raise ValueError(f"plan must be one of {', '.join(PLANS)}")
        self.plan, self.seats, self.limits = plan, seats, limits
        self.company_domain = company_domain
        self.company_id = 7001
        self.api_token = f"pd{secrets.token_hex(18)}"
        self.oauth_tokens: dict[str, float] = {}  # access token -> expiry
        self.refresh_tokens: dict[str, str] = {}
        self.auth_codes: dict[str, dict[str, str]] = {}
        self.client_id, self.client_secret = "pd-client", f"pdsecret{secrets.token_hex(8)}"
        #: The company host the token answer names; None: the origin the token request was sent to.
        self.api_domain: str | None = None
        self.users = [
            {"id": 1, "name": "Admin", "email": "admin@example.com", "active_flag": True, "is_admin": 1},
            {"id": 2, "name": "Rep One", "email": "rep1@example.com", "active_flag": True, "is_admin": 0},
            {"id": 3, "name": "Rep Two", "email": "rep2@example.com", "active_flag": True, "is_admin": 0},
        ]
        self.data: dict[str, dict[int, dict[str, Any]]] = {obj: {} for obj in OBJECTS}
        self._next_id: dict[str, int] = dict.fromkeys(OBJECTS, 1)
        self.custom_fields: dict[str, list[dict[str, Any]]] = {e: [] for e in ENTITY.values()}
        self.webhooks: dict[int, dict[str, Any]] = {}
        self.deliveries: list[dict[str, Any]] = []  # every webhook POST attempt: {url, status, attempt, body}
        self.webhook_retry_scale = webhook_retry_scale
        self._webhook_client = webhook_client
        self._webhook_ids = 1
        self.tokens_used = 0
        self.writes_today = 0
        self._burst: dict[tuple[str, str], _SlidingWindow] = {}
        self._changes = 0  # bumped by every write: a kept list answer is valid while it stands
        self._sorted: dict[tuple[Any, ...], tuple[int, list[dict[str, Any]], list[tuple[Any, int]]]] = {}
        self._timers: list[threading.Timer] = []
        self._register()

    # -- budget and limits -------------------------------------------------------------------
    @property
    def daily_budget(self) -> int:
        return BASE_TOKENS * PLANS[self.plan][0] * self.seats

    def _burst_limit(self, oauth: bool, bucket: str) -> int:
        if bucket == "search":
            return SEARCH_BURST
        return PLANS[self.plan][1] * (4 if oauth else 1)

    def _meter(self, request: httpx.Request, cost: int, bucket: str) -> tuple[httpx.Response | None, dict[str, str]]:
        """Charge a request; a 429 response when a limit is spent, and the rate-limit headers."""
        oauth = request.headers.get("authorization", "").lower().startswith("bearer ")
        who = request.headers.get("authorization") or request.headers.get("x-api-token", "")
        limit = self._burst_limit(oauth, bucket)
        headers: dict[str, str] = {}
        if not self.limits:
            return None, headers
        with self._flight_lock:
            window = self._burst.setdefault((who, bucket), _SlidingWindow(limit, BURST_WINDOW))
        wait = window.admit(time.monotonic())
        used = window.used(time.monotonic(), BURST_WINDOW)
        headers["x-ratelimit-limit"] = str(limit)
        headers["x-ratelimit-remaining"] = str(max(0, limit - used))
        headers["x-ratelimit-reset"] = str(max(1, round(wait or BURST_WINDOW)))
        is_write = request.method in ("POST", "PUT", "PATCH")
        if not oauth:
            headers["x-daily-requests-left"] = str(max(0, DAILY_WRITES - self.writes_today - (1 if is_write else 0)))
        if wait:
            return self._too_many("Rate limit exceeded", headers), headers
        if self.tokens_used + cost > self.daily_budget:
            return self._too_many("Daily token budget exceeded", headers), headers
        self.tokens_used += cost
        if is_write:
            self.writes_today += 1
        return None, headers

    def _too_many(self, message: str, headers: dict[str, str]) -> httpx.Response:
        self.stats.rate_limited += 1
        body = {"success": False, "error": message, "error_info": "Please see developers.pipedrive.com", "data": None}
        return json_response(body, 429, headers=headers)

    def rate_limited_response(self, bucket: str, retry_after: float) -> httpx.Response:
        return self._too_many("Rate limit exceeded", {"x-ratelimit-reset": str(max(1, round(retry_after)))})

    def error_response(self, status: int, message: str, **extra: Any) -> httpx.Response:
        body = {"success": False, "error": message, "error_info": "Please check developers.pipedrive.com", **extra}
        body.setdefault("data", None)
        body.setdefault("additional_data", None)
        return json_response(body, status)

    def authenticate(self, request: httpx.Request, route_name: str) -> httpx.Response | None:
        if route_name.startswith("oauth"):
            return None
        if "api_token" in request.url.params:
            # The specs know only the header; a token in the query string lands in every access log.
            return self._unauthorized()
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            expiry = self.oauth_tokens.get(auth[7:].strip())
            return None if expiry and expiry > self.now() else self._unauthorized()
        if request.headers.get("x-api-token") == self.api_token:
            return None
        return self._unauthorized()

    def _unauthorized(self) -> httpx.Response:
        body = {
            "success": False,
            "error": "unauthorized access",
            "errorCode": 401,
            "error_info": "Please check developers.pipedrive.com",
        }
        return json_response(body, 401)

    # -- routes ------------------------------------------------------------------------------
    def _register(self) -> None:
        r = self._metered_route
        for obj in OBJECTS:
            r("GET", rf"/api/v2/{obj}", self._lister(obj), "list", name=f"{obj} list")
            r("POST", rf"/api/v2/{obj}", self._creator(obj), "create", name=f"{obj} create")
            r("GET", rf"/api/v2/{obj}/(?P<rid>\d+)", self._getter(obj), "get", name=f"{obj} get")
            r("PATCH", rf"/api/v2/{obj}/(?P<rid>\d+)", self._updater(obj), "update", name=f"{obj} update")
            r("DELETE", rf"/api/v2/{obj}/(?P<rid>\d+)", self._deleter(obj), "delete", name=f"{obj} delete")
        for entity in ENTITY.values():
            r("GET", rf"/api/v2/{entity}Fields", self._fields_getter(entity), "fields", name=f"{entity}Fields")
            if entity != "activity":  # activityFields are read-only
                r(
                    "POST",
                    rf"/api/v2/{entity}Fields",
                    self._field_creator(entity),
                    "create",
                    name=f"{entity}Fields create",
                )
        r("GET", r"/api/v2/deals/archived", self._archived_deals, "search", name="deals archived")
        r("GET", r"/api/v2/persons/search", self._search("persons"), "search", bucket="search", name="persons search")
        r(
            "GET",
            r"/api/v2/organizations/search",
            self._search("organizations"),
            "search",
            bucket="search",
            name="organizations search",
        )
        r("GET", r"/api/v2/deals/search", self._search("deals"), "search", bucket="search", name="deals search")
        r("GET", r"/api/v2/itemSearch/field", self._field_search, "search", bucket="search", name="itemSearch field")
        r("GET", r"/v1/users/me", self._users_me, "v1", name="users me")
        r("GET", r"/api/v1/users/me", self._users_me, "v1", name="users me")
        r("GET", r"/v1/users", self._users, "v1", name="users")
        r("GET", r"/api/v1/users", self._users, "v1", name="users")
        r("GET", r"/v1/activityTypes", self._activity_types, "v1", name="activityTypes")
        r("GET", r"/api/v1/activityTypes", self._activity_types, "v1", name="activityTypes")
        r("GET", r"/v1/webhooks", self._webhooks_list, "v1", name="webhooks")
        r("POST", r"/v1/webhooks", self._webhook_create, "v1_write", name="webhooks create")
        r("DELETE", r"/v1/webhooks/(?P<wid>\d+)", self._webhook_delete, "v1_write", name="webhooks delete")
        self.route("GET", r"/oauth/authorize", self._oauth_authorize, bucket="none", name="oauth authorize")
        self.route("POST", r"/oauth/token", self._oauth_token, bucket="none", name="oauth token")

    def _metered_route(
        self,
        method: str,
        pattern: str,
        handler: Callable[..., httpx.Response],
        cost: str,
        *,
        bucket: str = "default",
        name: str,
    ) -> None:
        price = COST[cost]

        def metered(request: httpx.Request, **params: str) -> httpx.Response:
            denied, headers = self._meter(request, price, bucket)
            if denied is not None:
                return denied
            response = handler(request, **params)
            response.headers.update(headers)
            return response

        self.route(method, pattern, metered, bucket="none", name=name)

    # -- envelopes ---------------------------------------------------------------------------
    @staticmethod
    def _ok(data: Any) -> httpx.Response:
        return json_response({"success": True, "data": data})

    @staticmethod
    def _page(data: Any, next_cursor: str | None) -> httpx.Response:
        """A list or search answer: the cursor of the next page, null on the last."""
        return json_response({"success": True, "data": data, "additional_data": {"next_cursor": next_cursor}})

    def _bad(self, message: str, status: int = 400) -> httpx.Response:
        return self.error_response(status, message)

    # -- records -----------------------------------------------------------------------------
    def _new_id(self, obj: str) -> int:
        rid = self._next_id[obj]
        self._next_id[obj] += 1
        return rid

    def records(self, obj: str, *, deleted: bool = False) -> list[dict[str, Any]]:
        """Every record of an object type (tests read the CRM's state through this)."""
        with self.lock:
            return [dict(r) for r in self.data[obj].values() if deleted or not r["is_deleted"]]

    def _custom_codes(self, entity: str) -> set[str]:
        return {f["field_code"] for f in self.custom_fields[entity]}

    def _validate(self, obj: str, body: dict[str, Any], *, creating: bool) -> str | None:
        """The first reason Pipedrive's v2 would refuse this body with a 400, or None."""
        entity = ENTITY[obj]
        allowed = {code for code, _, _ in STANDARD_FIELDS[entity]} | {"custom_fields", "participants", "visible_to"}
        allowed |= {"public_description", "priority", "busy", "location", "lead_id", "project_id", "pipeline_id"}
        for key in body:
            if key not in allowed:
                return f"Invalid property: {key}"
        if obj == "activities" and "custom_fields" in body:
            return "custom_fields is not supported for activities"
        if obj == "activities" and "person_id" in body:
            return "person_id is read-only; set a primary participant instead"
        custom = body.get("custom_fields") or {}
        if not isinstance(custom, dict):
            return "custom_fields must be an object"
        unknown = set(custom) - self._custom_codes(entity)
        if unknown:
            return f"Unknown custom field: {sorted(unknown)[0]}"
        required = {"persons": "name", "organizations": "name", "deals": "title", "activities": None}[obj]
        if creating and required and not (body.get(required) or (obj == "persons" and body.get("first_name"))):
            return f"{required} is required"
        for key in ("owner_id", "org_id", "person_id", "deal_id", "stage_id", "pipeline_id"):
            if (
                key in body
                and body[key] is not None
                and (isinstance(body[key], bool) or not isinstance(body[key], int))
            ):
                return f"{key} must be an integer"
        if "done" in body and not isinstance(body["done"], bool):
            return "done must be a boolean"
        if "status" in body and body["status"] not in ("open", "won", "lost"):
            return "status must be one of open, won, lost"
        if (
            "owner_id" in body
            and body["owner_id"] is not None
            and body["owner_id"] not in {u["id"] for u in self.users}
        ):
            return f"User {body['owner_id']} not found"
        for key, target in (("org_id", "organizations"), ("person_id", "persons"), ("deal_id", "deals")):
            if body.get(key) is not None and body[key] not in self.data[target]:
                return f"{key} {body[key]} not found"
        for part in body.get("participants") or []:
            if part.get("person_id") not in self.data["persons"]:
                return f"participant person {part.get('person_id')} not found"
        for key in ("emails", "phones"):
            for entry in body.get(key) or []:
                if not isinstance(entry, dict) or not entry.get("value"):
                    return f"{key} entries need a value"
        return None

    def _apply(self, obj: str, rec: dict[str, Any], body: dict[str, Any]) -> None:
        self._changes += 1
        for key, value in body.items():
            if key == "custom_fields":
                rec.setdefault("custom_fields", {}).update(value)
            elif key in ("emails", "phones"):
                entries = [
                    {"value": e["value"], "primary": bool(e.get("primary")), "label": e.get("label") or "work"}
                    for e in value
                ]
                if entries and not any(e["primary"] for e in entries):
                    entries[0]["primary"] = True
                rec[key] = entries
            elif key == "participants":
                rec["participants"] = [{"person_id": p["person_id"], "primary": bool(p.get("primary"))} for p in value]
                primary = next((p["person_id"] for p in rec["participants"] if p["primary"]), None)
                rec["person_id"] = (
                    primary
                    if primary is not None
                    else (rec["participants"][0]["person_id"] if rec["participants"] else None)
                )
            else:
                rec[key] = value
        if obj == "persons" and ("first_name" in body or "last_name" in body) and "name" not in body:
            rec["name"] = " ".join(p for p in (rec.get("first_name"), rec.get("last_name")) if p)
        if obj == "activities" and body.get("done") and not rec.get("marked_as_done_time"):
            rec["marked_as_done_time"] = iso(self.now())

    def _blank(self, obj: str, rid: int) -> dict[str, Any]:
        now = iso(self.now())
        rec: dict[str, Any] = {"id": rid, "add_time": now, "update_time": now, "is_deleted": False, "owner_id": 1}
        if obj in ("persons", "organizations", "deals"):
            rec.update({"visible_to": 3, "label_ids": [], "custom_fields": {}})
        if obj == "persons":
            rec.update({"name": "", "first_name": None, "last_name": None, "org_id": None, "emails": [], "phones": []})
        elif obj == "organizations":
            rec.update({"name": "", "address": None})
        elif obj == "deals":
            rec.update(
                {
                    "title": "",
                    "value": 0,
                    "currency": "USD",
                    "person_id": None,
                    "org_id": None,
                    "pipeline_id": 1,
                    "stage_id": 1,
                    "status": "open",
                    "expected_close_date": None,
                    "is_archived": False,
                }
            )
        else:
            rec.update(
                {
                    "subject": "",
                    "type": "task",
                    "creator_user_id": 1,
                    "deal_id": None,
                    "lead_id": None,
                    "person_id": None,
                    "org_id": None,
                    "project_id": None,
                    "due_date": None,
                    "due_time": None,
                    "duration": None,
                    "busy": False,
                    "done": False,
                    "marked_as_done_time": None,
                    "participants": [],
                    "note": None,
                    "priority": None,
                }
            )
        return rec

    def create(self, obj: str, body: dict[str, Any], *, actor: int = 1) -> dict[str, Any]:
        """Create a record as the API would (tests seed and edit the CRM through this)."""
        with self.lock:
            rec = self._blank(obj, self._new_id(obj))
            if obj == "activities":
                rec["creator_user_id"] = actor
            self._apply(obj, rec, body)
            self.data[obj][rec["id"]] = rec
            self._emit("create", obj, rec, None)
            return dict(rec)

    def update(self, obj: str, rid: int, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            rec = self.data[obj][rid]
            before = dict(rec)
            self._apply(obj, rec, body)
            rec["update_time"] = iso(self.now())
            previous = {k: before.get(k) for k in body if before.get(k) != rec.get(k)}
            self._emit("change", obj, rec, previous)
            return dict(rec)

    def delete(self, obj: str, rid: int) -> None:
        with self.lock:
            rec = self.data[obj][rid]
            previous = dict(rec)
            self._changes += 1
            rec["is_deleted"] = True
            if obj == "deals":
                rec["status"] = "deleted"
            rec["update_time"] = iso(self.now())
            self._emit("delete", obj, None, previous)

    def bulk_create(
        self, obj: str, n: int, body_fn: Callable[[int], dict[str, Any]], *, at: float | None = None
    ) -> list[int]:
        """Seed n records quickly, without webhooks (sandbox and benchmarks); ``at``: their add/update time."""
        ids: list[int] = []
        with self.lock:
            for i in range(n):
                rec = self._blank(obj, self._new_id(obj))
                self._apply(obj, rec, body_fn(i))
                if at is not None:
                    rec["add_time"] = rec["update_time"] = iso(at)
                self.data[obj][rec["id"]] = rec
                ids.append(rec["id"])
        return ids

    def _creator(self, obj: str) -> Callable[..., httpx.Response]:
        def handle(request: httpx.Request) -> httpx.Response:
            body = request_json(request)
            if not isinstance(body, dict):
                return self._bad("Request body must be a JSON object")
            with self.lock:
                problem = self._validate(obj, body, creating=True)
                if problem:
                    return self._bad(problem)
                return self._ok(self.create(obj, body))

        return handle

    def _getter(self, obj: str) -> Callable[..., httpx.Response]:
        def handle(request: httpx.Request, rid: str) -> httpx.Response:
            with self.lock:
                rec = self.data[obj].get(int(rid))
                if rec is None:
                    return self._bad(f"{ENTITY[obj].capitalize()} not found", 404)
                return self._ok(dict(rec))

        return handle

    def _updater(self, obj: str) -> Callable[..., httpx.Response]:
        def handle(request: httpx.Request, rid: str) -> httpx.Response:
            body = request_json(request)
            if not isinstance(body, dict):
                return self._bad("Request body must be a JSON object")
            with self.lock:
                rec = self.data[obj].get(int(rid))
                if rec is None or rec["is_deleted"]:
                    return self._bad(f"{ENTITY[obj].capitalize()} not found", 404)
                problem = self._validate(obj, body, creating=False)
                if problem:
                    return self._bad(problem)
                return self._ok(self.update(obj, int(rid), body))

        return handle

    def _deleter(self, obj: str) -> Callable[..., httpx.Response]:
        def handle(request: httpx.Request, rid: str) -> httpx.Response:
            with self.lock:
                rec = self.data[obj].get(int(rid))
                if rec is None or rec["is_deleted"]:
                    return self._bad(f"{ENTITY[obj].capitalize()} not found", 404)
                self.delete(obj, int(rid))
                return self._ok({"id": int(rid)})

        return handle

    # -- lists -------------------------------------------------------------------------------
    def _lister(self, obj: str) -> Callable[..., httpx.Response]:
        def handle(request: httpx.Request) -> httpx.Response:
            return self._list(obj, request, archived=False)

        return handle

    def _archived_deals(self, request: httpx.Request) -> httpx.Response:
        return self._list("deals", request, archived=True)

    def _list(self, obj: str, request: httpx.Request, *, archived: bool) -> httpx.Response:
        q = request.url.params
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            return self._bad("limit must be an integer")
        if not 1 <= limit <= MAX_LIMIT:
            return self._bad(f"limit must be between 1 and {MAX_LIMIT}")
        sort_by = q.get("sort_by", "id")
        allowed_sorts = ("id", "update_time", "add_time") + (("due_date",) if obj == "activities" else ())
        if sort_by not in allowed_sorts:
            return self._bad(f"sort_by must be one of {', '.join(allowed_sorts)}")
        direction = q.get("sort_direction", "asc")
        if direction not in ("asc", "desc"):
            return self._bad("sort_direction must be asc or desc")
        since = until = None
        if "updated_since" in q:
            since = parse_iso(q["updated_since"])
            if since is None:
                return self._bad("updated_since must be RFC 3339")
        if "updated_until" in q:
            until = parse_iso(q["updated_until"])
            if until is None:
                return self._bad("updated_until must be RFC 3339")
        after = None
        if q.get("cursor"):
            after = decode_cursor(q["cursor"])
            if after is None or after.get("field") != sort_by or after.get("sortDirection") != direction:
                return self._bad("Invalid cursor")
        ids = {int(x) for x in q["ids"].split(",") if x.strip().isdigit()} if q.get("ids") else None
        if ids is not None and len(ids) > 100:
            return self._bad("ids takes at most 100 ids")
        statuses = set(q.get("status", "open,won,lost").split(",")) if obj == "deals" else None
        filters = {k: int(q[k]) for k in ("owner_id", "org_id", "person_id", "deal_id") if q.get(k, "").isdigit()}
        done = q.get("done")

        def keep(rec: dict[str, Any]) -> bool:
            if ids is not None and rec["id"] not in ids:
                return False
            if obj == "deals":
                assert statuses is not None
                if bool(rec.get("is_archived")) != archived:
                    return False
                if rec["is_deleted"] and "deleted" not in statuses:
                    return False
                if not rec["is_deleted"] and rec["status"] not in statuses:
                    return False
            elif rec["is_deleted"]:
                return False
            if any(self._linked(obj, rec, k) != v for k, v in filters.items()):
                return False
            if done is not None and rec.get("done") != (done in ("true", "1")):
                return False
            # update_time is always iso()'s fixed form, so comparing text is comparing whole seconds.
            stamp = rec["update_time"]
            return (low is None or stamp >= low) and (high is None or stamp < high)

        low = iso(math.ceil(since)) if since is not None else None
        high = iso(math.ceil(until)) if until is not None else None

        with self.lock:
            if sort_by == "id":
                return self._id_page(obj, keep, limit, direction, after)
            # A walk asks the same question page after page: while no record changed, the sorted answer
            # is kept and each page found by the cursor's position in it.
            query = (obj, archived, tuple(sorted((k, v) for k, v in q.multi_items() if k not in ("cursor", "limit"))))
            cached = self._sorted.get(query)
            if cached is None or cached[0] != self._changes:
                rows = sorted((rec for rec in self.data[obj].values() if keep(rec)), key=lambda r: _order(r, sort_by))
                cached = (self._changes, rows, [_order(r, sort_by) for r in rows])
                self._sorted = {query: cached}
            _, rows, keys = cached
            mark = (after.get("fieldValue") or "", after["id"]) if after is not None else None
            if direction == "asc":
                start = bisect.bisect_right(keys, mark) if mark is not None else 0
                page, more = rows[start : start + limit], start + limit < len(rows)
            else:
                end = bisect.bisect_left(keys, mark) if mark is not None else len(rows)
                page, more = rows[max(0, end - limit) : end][::-1], end > limit
            nxt = encode_cursor(sort_by, page[-1].get(sort_by), direction, page[-1]["id"]) if more else None
            return self._page([dict(r) for r in page], nxt)

    def _id_page(
        self,
        obj: str,
        keep: Callable[[dict[str, Any]], bool],
        limit: int,
        direction: str,
        after: dict[str, Any] | None,
    ) -> httpx.Response:
        """A page by id from the cursor on: the keyset is walked from its position, not scanned whole."""
        table = self.data[obj]
        keys = sorted(table)
        if direction == "asc":
            at = bisect.bisect_right(keys, after["id"]) if after is not None else 0
            order = range(at, len(keys))
        else:
            at = bisect.bisect_left(keys, after["id"]) if after is not None else len(keys)
            order = range(at - 1, -1, -1)
        page: list[dict[str, Any]] = []
        more = False
        for i in order:
            rec = table[keys[i]]
            if keep(rec):
                if len(page) == limit:
                    more = True
                    break
                page.append(rec)
        nxt = encode_cursor("id", page[-1]["id"], direction, page[-1]["id"]) if more else None
        return self._page([dict(r) for r in page], nxt)

    @staticmethod
    def _linked(obj: str, rec: dict[str, Any], key: str) -> Any:
        if obj == "activities" and key == "person_id":
            ids = {p["person_id"] for p in rec.get("participants") or []}
            return next(iter(ids)) if len(ids) == 1 else (rec.get("person_id") if rec.get("person_id") in ids else None)
        return rec.get(key)

    # -- search ------------------------------------------------------------------------------
    def _search(self, obj: str) -> Callable[..., httpx.Response]:
        def handle(request: httpx.Request) -> httpx.Response:
            q = request.url.params
            term = q.get("term", "")
            exact = q.get("exact_match") in ("true", "1")
            if len(term) < (1 if exact else 2):
                return self._bad("term must be at least 2 characters long (1 with exact_match)")
            fields = set((q.get("fields") or "name,email,phone,custom_fields,notes").split(","))
            limit = min(int(q.get("limit", "100") or 100), SEARCH_MAX_LIMIT)
            org = int(q["organization_id"]) if q.get("organization_id", "").isdigit() else None
            needle = term.lower()
            with self.lock:
                hits = []
                for rec in self.data[obj].values():
                    if rec["is_deleted"] or (org is not None and rec.get("org_id") != org):
                        continue
                    values = self._searchable(obj, rec, fields)
                    if any((v.lower() == needle) if exact else (needle in v.lower()) for v in values):
                        hits.append(rec)
                hits.sort(key=lambda r: r["id"])
                items = [
                    {"result_score": 1.0 if exact else 0.5, "item": self._search_item(obj, r)} for r in hits[:limit]
                ]
            return self._page({"items": items}, None)

        return handle

    def _searchable(self, obj: str, rec: dict[str, Any], fields: set[str]) -> list[str]:
        values: list[str] = []
        if "name" in fields:
            values.append(str(rec.get("name") or rec.get("title") or ""))
        if "email" in fields and obj == "persons":
            values += [e["value"] for e in rec.get("emails") or []]
        if "phone" in fields and obj == "persons":
            values += [p["value"] for p in rec.get("phones") or []]
        if "custom_fields" in fields:
            values += [str(v) for v in (rec.get("custom_fields") or {}).values() if isinstance(v, str | int)]
        return values

    def _search_item(self, obj: str, rec: dict[str, Any]) -> dict[str, Any]:
        item: dict[str, Any] = {"id": rec["id"], "type": ENTITY[obj], "visible_to": rec.get("visible_to", 3)}
        item["owner"] = {"id": rec.get("owner_id")}
        if obj == "persons":
            item["name"] = rec["name"]
            item["emails"] = [e["value"] for e in rec.get("emails") or []]
            item["phones"] = [p["value"] for p in rec.get("phones") or []]
            org = self.data["organizations"].get(rec.get("org_id") or 0)
            item["organization"] = {"id": org["id"], "name": org["name"], "address": None} if org else None
            item["custom_fields"], item["notes"] = [], []
        elif obj == "organizations":
            item["name"] = rec["name"]
            item["address"] = None
            item["custom_fields"], item["notes"] = [], []
        else:
            item["title"] = rec["title"]
            item["value"], item["currency"], item["status"] = rec["value"], rec["currency"], rec["status"]
            item["person"] = {"id": rec["person_id"]} if rec.get("person_id") else None
            item["organization"] = {"id": rec["org_id"]} if rec.get("org_id") else None
            item["custom_fields"], item["notes"] = [], []
        return item

    def _field_search(self, request: httpx.Request) -> httpx.Response:
        q = request.url.params
        term, entity, field = q.get("term", ""), q.get("entity_type", ""), q.get("field", "")
        objs = {v: k for k, v in ENTITY.items()}
        if entity not in objs or entity == "activity":
            return self._bad("entity_type must be one of deal, lead, person, organization, product, project")
        if not term or not field:
            return self._bad("term and field are required")
        match = q.get("match", "exact")
        obj = objs[entity]
        with self.lock:
            if field not in {c for c, _, _ in STANDARD_FIELDS[entity]} | self._custom_codes(entity):
                return self._bad(f"Field {field} not found")
            out = []
            for rec in self.data[obj].values():
                if rec["is_deleted"]:
                    continue
                value = (rec.get("custom_fields") or {}).get(field, rec.get(field))
                if not isinstance(value, str):
                    continue
                # Exact matching is case-sensitive here (reference §4), beginning/middle are not.
                if (
                    (match == "exact" and value == term)
                    or (match == "beginning" and value.lower().startswith(term.lower()))
                    or (match == "middle" and term.lower() in value.lower())
                ):
                    out.append({"id": rec["id"], "name": rec.get("name") or rec.get("title")})
            out.sort(key=lambda r: r["id"])
        return self._page(out[: min(int(q.get("limit", "100") or 100), SEARCH_MAX_LIMIT)], None)

    # -- fields ------------------------------------------------------------------------------
    def _fields_getter(self, entity: str) -> Callable[..., httpx.Response]:
        def handle(request: httpx.Request) -> httpx.Response:
            out = []
            for code, label, ftype in STANDARD_FIELDS[entity]:
                options = None
                if code == "status" and entity == "deal":
                    options = [{"id": i + 1, "label": s} for i, s in enumerate(STATUS_OPTIONS)]
                if code == "type" and entity == "activity":
                    options = [{"id": i + 1, "label": t} for i, t in enumerate(ACTIVITY_TYPES)]
                out.append(self._field_doc(code, label, ftype, options, custom=False))
            with self.lock:
                out += [dict(f) for f in self.custom_fields[entity]]
            return self._ok(out)

        return handle

    @staticmethod
    def _field_doc(
        code: str, label: str, ftype: str, options: list[dict[str, Any]] | None, *, custom: bool
    ) -> dict[str, Any]:
        return {
            "field_name": label,
            "field_code": code,
            "field_type": ftype,
            "options": options,
            "subfields": None,
            "is_custom_field": custom,
            "is_optional_response_field": False,
        }

    def _field_creator(self, entity: str) -> Callable[..., httpx.Response]:
        def handle(request: httpx.Request) -> httpx.Response:
            body = request_json(request)
            if not isinstance(body, dict) or not body.get("field_name") or not body.get("field_type"):
                return self._bad("field_name and field_type are required")
            code = uuid.uuid5(
                uuid.NAMESPACE_URL, f"{entity}/{body['field_name']}/{len(self.custom_fields[entity])}"
            ).hex
            code = (code + code)[:40]
            options = [{"id": i + 1, "label": o["label"]} for i, o in enumerate(body.get("options") or [])] or None
            doc = self._field_doc(code, str(body["field_name"]), str(body["field_type"]), options, custom=True)
            with self.lock:
                self.custom_fields[entity].append(doc)
            return self._ok(dict(doc))

        return handle

    # -- v1 ----------------------------------------------------------------------------------
    def _users_me(self, request: httpx.Request) -> httpx.Response:
        me = dict(self.users[0])
        me.update(
            {
                "company_id": self.company_id,
                "company_name": "crmsync sandbox",
                "company_domain": self.company_domain,
                "language": {"language_code": "en", "country_code": "US"},
                "locale": "en_US",
                "timezone_name": "UTC",
            }
        )
        return self._ok(me)

    def _users(self, request: httpx.Request) -> httpx.Response:
        return self._ok([dict(u) for u in self.users])

    def _activity_types(self, request: httpx.Request) -> httpx.Response:
        return self._ok(
            [
                {
                    "id": i + 1,
                    "name": t.capitalize(),
                    "key_string": t,
                    "active_flag": True,
                    "is_custom_flag": False,
                    "order_nr": i + 1,
                }
                for i, t in enumerate(ACTIVITY_TYPES)
            ]
        )

    # -- webhooks ----------------------------------------------------------------------------
    def _webhooks_list(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            return self._ok([self._public_hook(h) for h in self.webhooks.values()])

    @staticmethod
    def _public_hook(hook: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in hook.items() if k != "http_auth_password"}

    def _webhook_create(self, request: httpx.Request) -> httpx.Response:
        body = request_json(request)
        if not isinstance(body, dict):
            return self._bad("Request body must be a JSON object")
        errors = {}
        url = str(body.get("subscription_url") or "")
        if not url.startswith(("http://", "https://")):
            errors["subscription_url"] = ["subscription_url must be a valid URL"]
        if body.get("event_action") not in ("create", "change", "delete", "*"):
            errors["event_action"] = ["event_action is invalid"]
        if body.get("event_object") not in (
            *ENTITY.values(),
            "lead",
            "note",
            "pipeline",
            "product",
            "stage",
            "user",
            "*",
        ):
            errors["event_object"] = ["event_object is invalid"]
        if not str(body.get("name") or "").strip():
            errors["name"] = ["name is required"]  # required by the current v1 spec
        if errors:
            return json_response({"status": "error", "success": False, "errors": errors}, 400)
        with self.lock:
            if len(self.webhooks) >= 40:
                return self._bad("Webhooks limit reached", 422)
            wid = self._webhook_ids
            self._webhook_ids += 1
            hook = {
                "id": wid,
                "company_id": self.company_id,
                "owner_id": 1,
                "user_id": int(body.get("user_id") or 1),
                "event_action": body["event_action"],
                "event_object": body["event_object"],
                "subscription_url": url,
                "name": body.get("name") or "",
                "version": str(body.get("version") or "2.0"),
                "is_active": 1,
                "add_time": iso(self.now()),
                "remove_time": None,
                "type": "general",
                "http_auth_user": body.get("http_auth_user"),
                "http_auth_password": body.get("http_auth_password"),
                "last_delivery_time": None,
                "last_http_status": None,
                "admin_id": 1,
            }
            self.webhooks[wid] = hook
        return json_response({"status": "ok", "success": True, "data": self._public_hook(hook)}, 201)

    def _webhook_delete(self, request: httpx.Request, wid: str) -> httpx.Response:
        with self.lock:
            if self.webhooks.pop(int(wid), None) is None:
                return self._bad("Webhook not found", 404)
        return json_response({"status": "ok", "success": True}, 200)

    def _emit(self, action: str, obj: str, current: dict[str, Any] | None, previous: dict[str, Any] | None) -> None:
        """Queue a v2.0 webhook event for every matching subscription (delivered off the request path)."""
        entity = ENTITY[obj]
        for hook in list(self.webhooks.values()):
            if hook["event_action"] not in ("*", action) or hook["event_object"] not in ("*", entity):
                continue
            rid = (current or previous or {}).get("id")
            body = {
                "meta": {
                    "action": action,
                    "entity": entity,
                    "entity_id": str(rid),
                    "id": str(uuid.uuid4()),
                    "company_id": str(self.company_id),
                    "user_id": "1",
                    "webhook_id": str(hook["id"]),
                    "webhook_owner_id": "1",
                    "correlation_id": str(uuid.uuid4()),
                    "timestamp": iso(self.now()),
                    "attempt": 1,
                    "change_source": "api",
                    "is_bulk_edit": False,
                    "host": f"{self.company_domain}.pipedrive.com",
                    "type": "general",
                    "permitted_user_ids": ["1"],
                    "version": "2.0",
                },
                "data": dict(current) if current else None,
                "previous": previous,
            }
            self._deliver(hook, body, 1)

    def _deliver(self, hook: dict[str, Any], body: dict[str, Any], attempt: int) -> None:
        def send() -> None:
            body["meta"]["attempt"] = attempt
            auth = None
            if hook.get("http_auth_user"):
                auth = httpx.BasicAuth(hook["http_auth_user"], hook.get("http_auth_password") or "")
            status = 0
            try:
                client = self._webhook_client() if self._webhook_client else httpx.Client(timeout=10.0)
                with client:
                    status = client.post(hook["subscription_url"], json=body, auth=auth).status_code
            except httpx.HTTPError:
                status = 0
            with self.lock:
                self.deliveries.append(
                    {"url": hook["subscription_url"], "status": status, "attempt": attempt, "body": body}
                )
                hook["last_delivery_time"], hook["last_http_status"] = iso(self.now()), status
            if not 200 <= status < 300 and attempt <= len(WEBHOOK_RETRIES):
                self._deliver(hook, json.loads(json.dumps(body)), attempt + 1)

        delay = 0.0 if attempt == 1 else WEBHOOK_RETRIES[attempt - 2] * self.webhook_retry_scale
        timer = threading.Timer(delay, send)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def wait_for_deliveries(self, timeout: float = 10.0) -> None:
        """Block until every queued webhook delivery has run (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                timers = list(self._timers)
            if all(not t.is_alive() for t in timers):
                return
            time.sleep(0.01)

    # -- OAuth -------------------------------------------------------------------------------
    def authorize(self, redirect_uri: str, state: str = "") -> str:
        """What the consent screen would redirect to: a fresh code bound to redirect_uri."""
        code = secrets.token_urlsafe(12)
        self.auth_codes[code] = {"redirect_uri": redirect_uri, "issued": str(self.now())}
        return f"{redirect_uri}?{urlencode({'code': code, 'state': state})}"

    def _oauth_authorize(self, request: httpx.Request) -> httpx.Response:
        """The consent screen, approved at once: a redirect to redirect_uri with a code and the state."""
        params = request.url.params
        redirect = params.get("redirect_uri", "")
        if params.get("client_id") != self.client_id or not redirect:
            return json_response({"success": False, "error": "invalid_client", "message": "Unknown client"}, 400)
        return httpx.Response(302, headers={"Location": self.authorize(redirect, params.get("state", ""))})

    def _oauth_token(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        basic = request.headers.get("authorization", "")
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if basic != expected:
            return json_response(
                {"success": False, "error": "invalid_client", "message": "Invalid client credentials"}, 401
            )
        grant = form.get("grant_type")
        with self.lock:
            if grant == "authorization_code":
                issued = self.auth_codes.pop(form.get("code", ""), None)
                if (
                    issued is None
                    or issued["redirect_uri"] != form.get("redirect_uri")
                    or self.now() - float(issued["issued"]) > 300
                ):
                    return json_response({"success": False, "error": "invalid_grant", "message": "Invalid grant"}, 400)
                refresh = secrets.token_urlsafe(24)
            elif grant == "refresh_token":
                refresh = form.get("refresh_token", "")
                if refresh not in self.refresh_tokens:
                    return json_response(
                        {"success": False, "error": "invalid_grant", "message": "Invalid refresh token"}, 400
                    )
            else:
                return json_response({"success": False, "error": "unsupported_grant_type"}, 400)
            access = f"v1:{secrets.token_urlsafe(24)}"
            ttl = self.faults.token_ttl or 3599.0
            self.oauth_tokens[access] = self.now() + ttl
            self.refresh_tokens[refresh] = access
        api_domain = self.api_domain or f"{request.url.scheme}://{request.url.netloc.decode()}"
        return json_response(
            {
                "access_token": access,
                "token_type": "Bearer",
                "refresh_token": refresh,
                "scope": "base,deals:full,contacts:full,activities:full,search:read,admin",
                "expires_in": int(ttl),
                "api_domain": api_domain,
            }
        )


def build_pipedrive(
    *,
    seed: int = 0,
    contacts: int = 100,
    companies: int = 25,
    deals: int = 10,
    faults: Faults | None = None,
    plan: str = "growth",
) -> PipedriveEmulator:
    """A Pipedrive company seeded with persons, organizations and deals (sandbox and benchmarks)."""
    emu = PipedriveEmulator(faults=faults, seed=seed, plan=plan)
    emu.clock_offset = -3600  # seeded an hour ago: a pull's window (which ends a minute before now) holds it
    emu.bulk_create("organizations", companies, lambda i: {"name": f"Company {seed}-{i}"})
    emu.bulk_create(
        "persons",
        contacts,
        lambda i: {
            "name": f"Person {i}",
            "first_name": "Person",
            "last_name": str(i),
            "emails": [{"value": f"person{i}@example.com", "primary": True}],
            # Numbers from the reserved 555-01xx block, widened by the index so any size stays unique.
            "phones": [{"value": f"+1202555{i:07d}", "primary": True}],
            "org_id": (i % companies) + 1 if companies else None,
        },
    )
    emu.bulk_create(
        "deals",
        deals,
        lambda i: {"title": f"Deal {i}", "value": 1000 + i, "person_id": (i % contacts) + 1 if contacts else None},
    )
    emu.clock_offset = 0.0
    return emu


# -- sandbox factory (added by engineer `capabilities`, issue #27: one `sandbox(options)` per emulator) --
from crmsync.emulators.sandbox import Sandbox, SandboxOptions  # noqa: E402  (kept inside this block)


def sandbox(options: SandboxOptions) -> Sandbox:
    """A seeded Pipedrive company for `crmsync sandbox serve` and `crmsync demo` (an API token connects)."""
    emu = build_pipedrive(
        seed=options.seed,
        contacts=options.contacts,
        companies=options.companies,
        deals=options.deals,
        faults=options.faults,
    )
    return Sandbox(emu, secret=emu.api_token, credentials={"token": emu.api_token})
