"""Pipedrive (API v2, and v1 where v2 has no route): API token or OAuth, cursor-paged deltas, one write per record.

Facts this file relies on are in shared/reference/pipedrive.md; the ones that shaped it:

* no upsert, no batch writes, no idempotency key, and no custom field on activities: a record is
  matched by search (email, phone, name; persons from the person list where that is cheaper, see
  ``index.py``) or by crmsync's own custom field (deal key, company domain) and then created or
  patched one request at a time;
* a call is a v2 activity (``type: call``, ``done: true``) whose note carries ``[crmsync:<outcome>]``;
  before creating one for a person or deal that existed before this run, and after any reply that
  may have been lost, the person's (or deal's) activities since the call are read and the marker
  looked for: one list request per person, never a second call;
* every request costs tokens from the company's daily budget and counts in a 2-second burst window
  (search 10 per 2 s); ``PipedrivePolicy`` reads the headers, counts each window from the answers
  and syncs it to ``x-ratelimit-remaining``, ``budget.py`` refuses a run that would not fit, and
  ``api_usage`` reports the tokens spent;
* lists page by ``next_cursor`` (``limit`` ≤ 500), ``updated_since`` inclusive and ``updated_until``
  exclusive, whole seconds: pulls re-read a short overlap and stop a minute before now.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from crmsync.credentials import SecretStore, StaticAuth
from crmsync.errors import AuthError, FatalProviderError, RetriableError, UsageError
from crmsync.http import RateLimit, ResponsePolicy, SlidingWindow, UnconfirmedWrite
from crmsync.providers.base import (
    ConnectContext,
    ConnectResult,
    FieldInfo,
    Health,
    ItemResult,
    Outgoing,
    OutgoingActivity,
    Page,
    Provider,
    ProviderContext,
    RemoteRecord,
    at_once,
    chunks,
    match_key,
)
from crmsync.providers.pipedrive import budget as budget_mod
from crmsync.providers.pipedrive import index
from crmsync.providers.pipedrive import records as rec
from crmsync.providers.pipedrive.auth import API, oauth_connect, token_request
from crmsync.providers.pipedrive.budget import COSTS, Budget
from crmsync.providers.usage import ApiUsage

log = logging.getLogger("crmsync.pipedrive")

PAGE = 500
IDS_MAX = 100
#: A pull's window ends this long before now (late commits; ``lookback_seconds``) and starts this long
#: before the last one ended (``overlap_seconds``).
SETTLE = timedelta(seconds=60)
OVERLAP = timedelta(seconds=5)
#: How far before a call a marker search reads the person's activities (clock skew between the dialer and Pipedrive).
MARKER_SKEW = timedelta(minutes=10)
#: Where a batch holds only follow-ups (their calls went in an earlier run), how far back to look.
TASK_LOOKBACK = timedelta(days=30)
FIELD_TYPES = {
    "varchar": "string",
    "varchar_auto": "string",
    "text": "text",
    "double": "number",
    "int": "number",
    "monetary": "number",
    "date": "date",
    "time": "string",
    "enum": "enumeration",
    "set": "enumeration",
    "status": "enumeration",
    "phone": "phone",
    "user": "reference",
    "org": "reference",
    "people": "reference",
    "stage": "reference",
    "deal": "reference",
    "boolean": "bool",
}


class PipedrivePolicy(ResponsePolicy):
    """Pipedrive's 429s: the burst window says when it resets; a spent daily budget will not reset in a run."""

    def __init__(self) -> None:
        self.burst_limit: int | None = None
        self.burst_remaining: int | None = None
        self.daily_writes_left: int | None = None

    def _body(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def retry_after(self, response: httpx.Response) -> float | None:
        wait = super().retry_after(response)
        if wait is None and response.status_code == 429:
            try:
                return float(response.headers.get("x-ratelimit-reset", ""))
            except ValueError:
                return None
        return wait

    def give_up(self, response: httpx.Response) -> bool:
        return response.status_code == 429 and "budget" in str(self._body(response).get("error", "")).lower()

    def observe(self, response: httpx.Response, client: Any, bucket: str) -> None:
        # Pipedrive's 2-second windows are a push's bottleneck, spent to the last turn: counted from
        # the answers, a turn cannot reach Pipedrive early however its requests' transit times spread.
        limiter = client.buckets.get(bucket) or client.buckets.get("default")
        settle = getattr(limiter, "settle", None)
        if settle is not None:
            settle()
        h = response.headers
        if isinstance(limiter, SlidingWindow) and response.status_code != 429:
            try:
                stated = int(h.get("x-ratelimit-remaining", ""))
            except ValueError:
                stated = None
            if stated is not None:
                # Pipedrive counts requests this client did not send (an earlier run, another client).
                limiter.occupy(limiter.free() - stated)
        try:
            if "x-ratelimit-limit" in h:
                self.burst_limit = int(h["x-ratelimit-limit"])
                self.burst_remaining = int(h.get("x-ratelimit-remaining", "0"))
            if "x-daily-requests-left" in h:
                self.daily_writes_left = int(h["x-daily-requests-left"])
        except ValueError:
            pass

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        body = self._body(response)
        if not body:
            # A 403 HTML page is Cloudflare's ban after hammering through 429s. It is not retried (403
            # is not retriable): waiting inside the run would only extend it.
            if response.status_code == 403 and "html" in response.headers.get("content-type", ""):
                return "Pipedrive's edge refused the request (HTML 403: too many rate-limited requests?)", "BANNED"
            return response.text[:300], None
        message = str(body.get("error") or body.get("message") or body)
        if isinstance(body.get("errors"), dict):
            message += ": " + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in body["errors"].items())
        return message[:500], str(body.get("code") or body.get("errorCode") or "") or None


class PipedriveProvider(Provider):
    name = "pipedrive"
    label = "Pipedrive"
    connect_options = frozenset({"oauth", "client_id", "no_browser", "scopes"})
    objects = ("contacts", "companies", "deals", "calls")
    batch_size = 50  # records one upsert call gets; each is still one request
    # The Lite plan's API-token burst (20 per 2 s) and search's 10 per 2 s; a bigger plan sets
    # rate_limit in config.yaml (Growth 40, Premium 100, Ultimate 120; OAuth tokens get 4x).
    default_rate_limits = {"default": RateLimit(20, 2.0), "search": RateLimit(10, 2.0)}
    default_concurrency = 8
    webhook_support = "crmsync.providers.pipedrive.webhook:PipedriveWebhooks"
    emulator = "crmsync.emulators.pipedrive"
    default_base_url = API
    policy_class = PipedrivePolicy

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        self.budget = Budget.from_settings(ctx.settings, ctx.options)
        self.settle = timedelta(seconds=float(_opt(ctx.options, "lookback_seconds", SETTLE.total_seconds())))
        self.overlap = timedelta(seconds=float(_opt(ctx.options, "overlap_seconds", OVERLAP.total_seconds())))
        self._codes: dict[str, dict[str, str]] = {}  # entity -> label -> custom field code
        self._users: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._reading_fields = threading.Lock()  # one read of an entity's fields, however many threads ask
        self._persons = index.PersonIndex(lambda params: self._walk("/api/v2/persons", params, None))

    # -- requests --------------------------------------------------------------------------------
    def _req(self, method: str, path: str, cost: str, **kwargs: Any) -> dict[str, Any]:
        self.budget.spend(COSTS[cost])
        bucket = "search" if cost == "search" else "default"
        response = self.http.request(method, path, bucket=bucket, endpoint=kwargs.pop("endpoint", path), **kwargs)
        body = response.json()
        if isinstance(body, dict) and body.get("success") is False:
            raise FatalProviderError(f"pipedrive {method} {path}: {body.get('error') or body}")
        return body if isinstance(body, dict) else {"data": body}

    # -- connection ------------------------------------------------------------------------------
    @classmethod
    def make_auth(cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any) -> Any:
        secret = secrets.require(connection)
        if secret.get("kind", "api_token") == "api_token":
            if not secret.get("token"):
                raise AuthError(f"the secret of connection {connection!r} holds no API token")
            # The header, never ?api_token=: a query string lands in proxies' and servers' logs.
            return StaticAuth("x-api-token", str(secret["token"]))
        from crmsync.oauth import refresh_session

        return refresh_session(
            secrets=secrets,
            connection=connection,
            token_client=token_client,
            token_url=str(settings.get("token_url") or "https://oauth.pipedrive.com/oauth/token"),
            token_request=token_request,
            scheme="Bearer",
        )

    @classmethod
    def connect(cls, ctx: ConnectContext) -> ConnectResult:
        """An API token (hidden prompt or stdin), or OAuth: the code flow on a loopback redirect (``auth.py``)."""
        base_url = (ctx.base_url or API).rstrip("/")
        given = ctx.given or {}
        if ctx.options.get("oauth") or given.get("kind") == "oauth":
            settings, base_url = oauth_connect(ctx, base_url, given)
        else:
            settings = {"auth": "api_token"}
            token = ctx.io.secret("Pipedrive API token").strip()
            if not token:
                raise UsageError("no API token was given")
            ctx.secrets.set(ctx.name, {"kind": "api_token", "token": token})
        auth = cls.make_auth(
            connection=ctx.name,
            settings=settings,
            secrets=ctx.secrets,
            token_client=ctx.token_client() if settings["auth"] == "oauth" else None,
        )
        provider = cls(
            ProviderContext(
                connection=ctx.name,
                base_url=base_url,
                settings=settings,
                http=ctx.client(base_url, auth),
                secrets=ctx.secrets,
            )
        )
        try:
            health = provider.check()
        finally:
            provider.close()
        settings.update(health.extra)
        scopes = settings.pop("scopes", [])
        return ConnectResult(
            base_url=base_url, account_id=health.account, scopes=scopes, settings=settings, health=health
        )

    def check(self) -> Health:
        me = self._req("GET", "/v1/users/me", "v1").get("data") or {}
        account = str(me.get("company_id") or "") or None
        return Health(
            ok=True,
            account=account,
            detail=f"{me.get('email', '?')} at {me.get('company_domain', '?')}.pipedrive.com",
            extra={"company_domain": me.get("company_domain"), "user_id": me.get("id"), "user_email": me.get("email")},
        )

    # -- schema ----------------------------------------------------------------------------------
    def _field_docs(self, entity: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": PAGE}
            if cursor:
                params["cursor"] = cursor
            body = self._req("GET", f"/api/v2/{entity}Fields", "fields", params=params)
            out += body.get("data") or []
            cursor = (body.get("additional_data") or {}).get("next_cursor")
            if not cursor:
                return out

    def _custom_codes(self, entity: str) -> dict[str, str]:
        """crmsync's custom fields of an entity: label -> 40-character code (read once per run).

        The lookup threads all ask at the start of a push: the first reads, the others wait for it.
        """
        with self._reading_fields:
            with self._lock:
                if entity in self._codes:
                    return dict(self._codes[entity])
            codes = {
                str(f["field_name"]): str(f["field_code"])
                for f in self._field_docs(entity)
                if f.get("is_custom_field") and str(f.get("field_name")) in rec.CUSTOM
            }
            with self._lock:
                # Merged, not replaced: prepare_objects may have created a field while this read ran.
                merged = self._codes.setdefault(entity, {})
                for label, code in codes.items():
                    merged.setdefault(label, code)
                return dict(merged)

    def fields(self, obj: str) -> list[FieldInfo]:
        entity = rec.ENTITY[rec.OBJ[obj]]
        out = []
        for f in self._field_docs(entity):
            options = [str(o.get("label")) for o in f.get("options") or []] or None
            out.append(
                FieldInfo(
                    name=str(f["field_code"]),
                    label=str(f.get("field_name") or ""),
                    type=FIELD_TYPES.get(str(f.get("field_type")), "string"),
                    custom=bool(f.get("is_custom_field")),
                    options=options,
                )
            )
        # The pseudo-fields the mapping names, translated by records.py.
        extra = {"persons": ["email", "phone"], "activities": ["due_at", "duration_seconds", "crmsync_marker"]}
        out += [FieldInfo(name=n, label=n) for n in extra.get(rec.OBJ[obj], [])]
        out += [FieldInfo(name=label, label=label, custom=True) for label, e in rec.CUSTOM.items() if e == entity]
        return out

    def managed_fields(self, obj: str) -> set[str]:
        return {"crmsync_marker", "org_id", "person_id", "deal_id", "participants"}

    def prepare_objects(self, objects: Sequence[str]) -> None:
        """Create the custom fields the push keys live in (deal key, company domain) on first use."""
        for label, entity in rec.CUSTOM.items():
            obj = {"deal": "deals", "organization": "companies"}[entity]
            if obj not in objects or label in self._custom_codes(entity):
                continue
            doc = (
                self._req(
                    "POST", f"/api/v2/{entity}Fields", "create", json={"field_name": label, "field_type": "varchar"}
                ).get("data")
                or {}
            )
            with self._lock:
                self._codes.setdefault(entity, {})[label] = str(doc["field_code"])

    def prepare_push(self) -> None:
        self.prepare_objects(("companies", "deals"))

    # -- owners ----------------------------------------------------------------------------------
    def resolve_owners(self, emails: Sequence[str]) -> dict[str, str]:
        """email -> Pipedrive user id, from one ``/v1/users`` read per run."""
        with self._lock:
            users = self._users
        if users is None:
            data = self._req("GET", "/v1/users", "v1").get("data") or []
            users = {
                str(u["email"]).lower(): str(u["id"]) for u in data if u.get("email") and u.get("active_flag", True)
            }
            with self._lock:
                self._users = users
        return {e.lower(): users[e.lower()] for e in emails if e and e.lower() in users}

    def default_owner(self) -> str | None:
        uid = self.ctx.settings.get("user_id")
        return str(uid) if uid else None

    # -- pull ------------------------------------------------------------------------------------
    def _record(self, obj: str, raw: dict[str, Any]) -> RemoteRecord:
        v2 = rec.OBJ[obj]
        codes = self._custom_codes(rec.ENTITY[v2]) if v2 in ("organizations", "deals") else {}
        return RemoteRecord(
            id=str(raw["id"]),
            properties=rec.flatten(v2, raw, codes),
            updated_at=rec.parse_time(raw.get("update_time")),
            archived=bool(raw.get("is_deleted")) or raw.get("status") == "deleted",
            associations=rec.links(v2, raw),
        )

    def _wanted(self, obj: str, raw: dict[str, Any]) -> bool:
        """Activities: only crmsync's own (its marker in the note), and of the object's kind."""
        if obj not in ("calls", "tasks"):
            return True
        if not rec.marker_of(raw.get("note")):
            return False
        return (raw.get("type") == "call" and bool(raw.get("done"))) == (obj == "calls")

    def _walk(
        self, path: str, params: dict[str, Any], cursor: str | None
    ) -> Iterator[tuple[list[dict[str, Any]], str | None]]:
        while True:
            query = dict(params, limit=PAGE)
            if cursor:
                query["cursor"] = cursor
            body = self._req("GET", path, "list", params=query)
            cursor = (body.get("additional_data") or {}).get("next_cursor")
            yield body.get("data") or [], cursor
            if not cursor:
                return

    def changes(
        self,
        obj: str,
        cursor: dict[str, Any] | None,
        *,
        fields: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Page]:
        """Records updated in ``[since - overlap, now - settle)``, by ``update_time`` then id.

        The cursor is ``{"since": …}`` between runs and ``{"since", "until", "part", "next"}`` while a
        window is being read, so a killed run resumes on the page it stopped at. Deals are read in
        three parts: live, deleted (``status=deleted``), archived (``/deals/archived``).
        """
        v2 = rec.OBJ[obj]
        state = dict(cursor or {})
        now = datetime.now(UTC).replace(microsecond=0)
        if "until" not in state:
            start = rec.parse_time(state.get("since")) or since or datetime(1970, 1, 1, tzinfo=UTC)
            if cursor:
                start -= self.overlap
            end = min(until or now, now - self.settle)
            if end <= start:
                return
            state = {"since": rec.rfc3339(start), "until": rec.rfc3339(end), "part": 0, "next": None}
        parts: list[tuple[str, dict[str, str]]] = [(f"/api/v2/{v2}", {})]
        if v2 == "deals":
            # The spec takes one status a request (the docs show a comma-separated list): live deals,
            # then deleted ones (kept 30 days), then archived ones, which plain lists leave out.
            parts = [("/api/v2/deals", {}), ("/api/v2/deals", {"status": "deleted"}), ("/api/v2/deals/archived", {})]
        for n, (path, extra) in enumerate(parts):
            if n < int(state.get("part") or 0):
                continue
            params = {
                "updated_since": state["since"],
                "updated_until": state["until"],
                "sort_by": "update_time",
                "sort_direction": "asc",
                **extra,
            }
            for rows, nxt in self._walk(path, params, state.get("next") if n == int(state.get("part") or 0) else None):
                last_part = n == len(parts) - 1
                if nxt:
                    page_cursor = {**state, "part": n, "next": nxt}
                elif not last_part:
                    page_cursor = {**state, "part": n + 1, "next": None}
                else:
                    page_cursor = {"since": state["until"]}
                yield Page([self._record(obj, r) for r in rows if self._wanted(obj, r)], page_cursor)

    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        v2 = rec.OBJ[obj]
        out = []
        for chunk in chunks(list(dict.fromkeys(ids)), IDS_MAX):
            body = self._req("GET", f"/api/v2/{v2}", "list", params={"ids": ",".join(chunk), "limit": PAGE})
            out += [self._record(obj, r) for r in body.get("data") or [] if self._wanted(obj, r)]
        return out

    def list_ids(self, obj: str) -> Iterator[list[str]]:
        v2 = rec.OBJ[obj]
        for rows, _ in self._walk(f"/api/v2/{v2}", {"sort_by": "id"}, None):
            yield [str(r["id"]) for r in rows if self._wanted(obj, r)]

    # -- push: lookups -------------------------------------------------------------------------
    def lookup_batch(self, obj: str, kind: str) -> int:
        return IDS_MAX

    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        """One exact search per key (search has no IN; persons: the list where cheaper), then the hits
        read in one ``ids`` list."""
        v2 = rec.OBJ[obj]
        pairs = list({match_key(k): next(iter(k.items())) for k in keys}.items())
        hits: list[tuple[str, str | None]] = []
        if v2 == "persons":
            # The person list, where it is cheaper than searching (index.py); a key it cannot answer
            # yet is searched for.
            searched = [pair for pair in pairs if pair[1][0] not in index.KINDS or not pair[1][1]]
            for kind in index.KINDS:
                mine = [(key, value) for key, (k, value) in pairs if k == kind and value]
                if not mine:
                    continue
                found, rest = self._persons.find(kind, [value for _, value in mine])
                hits += [(key, found[value]) for key, value in mine if value in found]
                left = set(rest)
                searched += [(key, (kind, value)) for key, value in mine if value in left]
            pairs = searched
        hits += at_once(lambda pair: (pair[0], self._search_one(v2, *pair[1])), pairs)
        ids = sorted({rid for _, rid in hits if rid})
        if not ids:
            return {}
        by_id = {r.id: r for r in self.fetch(obj, ids, fields=fields)}
        return {key: by_id[rid] for key, rid in hits if rid and rid in by_id}

    def _search_one(self, v2: str, kind: str, value: str) -> str | None:
        """The id of the record a key names, or None. Ties go to the oldest record."""
        if not value:
            return None
        if (v2, kind) in (("deals", "key"), ("organizations", "domain"), ("organizations", "key")):
            entity = rec.ENTITY[v2]
            label = "crmsync_deal_key" if v2 == "deals" else "crmsync_domain"
            code = self._custom_codes(entity).get(label)
            if code is None:
                return None  # never pushed here: nothing can carry the key yet
            body = self._req(
                "GET",
                "/api/v2/itemSearch/field",
                "search",
                params={"term": value, "entity_type": entity, "field": code, "match": "exact", "limit": 10},
            )
            items = body.get("data") or []
            found = [int((i.get("item") or i)["id"]) for i in items if (i.get("item") or i).get("id") is not None]
            return str(min(found)) if found else None
        field = {"email": "email", "phone": "phone", "name": "name"}.get(kind)
        if field is None or v2 not in ("persons", "organizations", "deals"):
            return None
        path = f"/api/v2/{v2}/search"
        body = self._req(
            "GET", path, "search", params={"term": value, "fields": field, "exact_match": "true", "limit": 10}
        )
        wanted = value.strip().lower()
        found = []
        for hit in (body.get("data") or {}).get("items") or []:
            item = hit.get("item") or {}
            values = {"email": item.get("emails"), "phone": item.get("phones")}.get(field) or [item.get("name")]
            # Exact search ignores case; compare ourselves too (old endpoints matched substrings).
            if any(str(v or "").strip().lower() == wanted for v in values):
                found.append(int(item["id"]))
        return str(min(found)) if found else None

    # -- push: records ---------------------------------------------------------------------------
    def upsert(self, obj: str, items: Sequence[Outgoing]) -> list[ItemResult]:
        v2 = rec.OBJ[obj]
        codes = self._custom_codes(rec.ENTITY[v2]) if v2 in ("organizations", "deals") else {}
        if v2 in ("organizations", "deals"):
            label = "crmsync_deal_key" if v2 == "deals" else "crmsync_domain"
            for item in items:
                key = item.match.get("key") or item.match.get("domain")
                if key and label not in item.properties and label in codes:
                    item.properties = {**item.properties, label: key}
        return at_once(lambda item: self._write(obj, v2, item, codes), list(items))

    def _write(self, obj: str, v2: str, item: Outgoing, codes: dict[str, str]) -> ItemResult:
        payload = rec.body(v2, dict(item.properties), codes, item.associations)
        try:
            if item.remote_id:
                path = f"/api/v2/{v2}/{item.remote_id}"
                self._req("PATCH", path, "update", json=payload, endpoint=f"/api/v2/{v2}/{{id}}")
                return ItemResult(item.ref, True, remote_id=str(item.remote_id), created=False)
            # No key makes a create safe to send twice: a lost answer is looked up by the engine.
            data = self._req("POST", f"/api/v2/{v2}", "create", json=payload, replay=False).get("data") or {}
        except UnconfirmedWrite as exc:
            return ItemResult(item.ref, False, error=str(exc), retriable=True, unconfirmed=True)
        except FatalProviderError as exc:
            return ItemResult(item.ref, False, error=str(exc), retriable=False)
        return ItemResult(item.ref, True, remote_id=str(data["id"]), created=True)

    # -- push: activities ------------------------------------------------------------------------
    def create_activities(self, obj: str, items: Sequence[OutgoingActivity]) -> list[ItemResult]:
        """One create per activity; a lost answer is ``unconfirmed`` and the engine looks for its marker."""
        return at_once(lambda item: self._create_activity(obj, item), list(items))

    def _create_activity(self, obj: str, item: OutgoingActivity) -> ItemResult:
        payload = rec.activity_body(obj, dict(item.properties), item.marker, item.associations)
        try:
            data = self._req("POST", "/api/v2/activities", "create", json=payload, replay=False).get("data") or {}
        except UnconfirmedWrite as exc:
            return ItemResult(item.ref, False, error=str(exc), retriable=True, unconfirmed=True)
        except FatalProviderError as exc:
            return ItemResult(item.ref, False, error=str(exc), retriable=False)
        return ItemResult(item.ref, True, remote_id=str(data["id"]), created=True)

    @staticmethod
    def _scope(item: OutgoingActivity) -> tuple[str, str] | None:
        for obj, key in (("contacts", "person_id"), ("deals", "deal_id"), ("companies", "org_id")):
            if item.associations.get(obj):
                return (key, str(item.associations[obj]))
        return None

    def find_activities(
        self, obj: str, markers: Sequence[str], *, context: Sequence[OutgoingActivity] = ()
    ) -> dict[str, str]:
        """Markers already logged: one activity list per person (or deal) the activities belong to.

        Activities carry no key Pipedrive can search, so the marker is looked for in the notes of
        the scope's activities updated since the call (less ``MARKER_SKEW``; follow-ups alone: the
        last ``TASK_LOOKBACK``). Markers without context are looked for in every activity updated in
        the last ``TASK_LOOKBACK``.
        """
        wanted = set(markers)
        scopes: dict[tuple[str, str] | None, datetime] = {}
        by_marker = {item.marker: item for item in context}
        for marker in wanted:
            item = by_marker.get(marker)
            scope = self._scope(item) if item is not None else None
            when = rec.parse_time(item.properties.get("due_at")) if item is not None and obj == "calls" else None
            since = (when - MARKER_SKEW) if when else datetime.now(UTC) - TASK_LOOKBACK
            scopes[scope] = min(scopes.get(scope, since), since)

        def read(scope: tuple[str, str] | None) -> dict[str, str]:
            params = {"updated_since": rec.rfc3339(scopes[scope]), "sort_by": "update_time"}
            if scope is not None:
                params[scope[0]] = scope[1]
            found: dict[str, str] = {}
            for rows, _ in self._walk("/api/v2/activities", params, None):
                for row in rows:
                    marker = rec.marker_of(row.get("note"))
                    if marker in wanted and not row.get("is_deleted"):
                        found.setdefault(marker, str(row["id"]))
            return found

        out: dict[str, str] = {}
        for part in at_once(read, list(scopes)):
            out.update(part)
        return out

    # -- webhooks ----------------------------------------------------------------------------
    def subscribe_webhooks(self, url: str, user: str, password: str, entities: Sequence[str]) -> list[dict[str, Any]]:
        """One v2.0 webhook per entity to ``url``, with these Basic credentials.

        Existing webhooks to the same URL are deleted first (Pipedrive never shows their password,
        and registering twice would deliver every event twice).
        """
        existing = self._req("GET", "/v1/webhooks", "v1").get("data") or []
        for hook in existing:
            if hook.get("subscription_url") == url:
                self._req("DELETE", f"/v1/webhooks/{hook['id']}", "v1", endpoint="/v1/webhooks/{id}")
        made = []
        for entity in entities:
            body = {
                "subscription_url": url,
                "event_action": "*",
                "event_object": entity,
                "name": f"crmsync {self.ctx.connection} {entity}",
                "http_auth_user": user,
                "http_auth_password": password,
                "version": "2.0",
            }
            made.append(self._req("POST", "/v1/webhooks", "v1", json=body).get("data") or {})
        return made

    def check_budget(self, needs: Mapping[str, int], *, spent_today: int = 0) -> None:
        """Refuse a push whose token cost could pass ``budget_share`` of what is left of the company's
        daily budget.

        Pipedrive states no remaining budget, so what is left is the plan's budget less the tokens
        crmsync's own runs spent today (``spent_today``), and the cost is an upper bound (every
        person, company and deal searched and written).
        """
        tokens = budget_mod.push_tokens(needs)
        left = max(0, self.budget.daily - spent_today)
        allowed = int(left * self.budget.share)
        if tokens > allowed:
            raise RetriableError(
                f"this push may need up to {tokens:,} Pipedrive tokens and may use {allowed:,} "
                f"({self.budget.share:.0%} of the {left:,} left today of the {self.budget.daily:,} a day of the "
                f"{self.budget.plan} plan with {self.budget.seats} seat(s); crmsync spent {spent_today:,} today); "
                "nothing was sent",
                hint="push fewer outcomes at once, wait for tomorrow's budget, or raise budget_share "
                "(or plan/seats) in config.yaml",
            )

    # -- housekeeping ------------------------------------------------------------------------
    def api_usage(self) -> ApiUsage:
        """This run's tokens against the company's daily budget (plan x seats): Pipedrive states no
        remaining budget, so the spending is crmsync's own count; the burst window and the API
        token's writes left today (``x-daily-requests-left``) as the last answer gave them."""
        return _usage(self.budget, self.http.policy)

    def quota(self) -> dict[str, Any]:
        policy = self.http.policy
        out = self.budget.as_dict()
        if isinstance(policy, PipedrivePolicy):
            if policy.burst_limit is not None:
                out["burst_limit"], out["burst_remaining"] = policy.burst_limit, policy.burst_remaining
            if policy.daily_writes_left is not None:
                out["daily_writes_left"] = policy.daily_writes_left
        return out


def _usage(budget: Budget, policy: Any) -> ApiUsage:
    detail: dict[str, Any] = {"requests": budget.requests}
    if isinstance(policy, PipedrivePolicy):
        if policy.burst_limit is not None:
            detail["burst_limit"], detail["burst_remaining"] = policy.burst_limit, policy.burst_remaining
        if policy.daily_writes_left is not None:
            detail["daily_writes_left"] = policy.daily_writes_left
    return ApiUsage(
        unit="tokens",
        window="day",
        used=budget.spent,
        limit=budget.daily,
        scope="run",
        source=f"{budget.plan} plan x {budget.seats} seat(s)",
        detail=detail,
    )


def _opt(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name)
    return default if value is None else float(value)
