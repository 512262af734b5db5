"""HubSpot (CRM v3 API): private-app tokens or OAuth 2.0, search-based incremental pull, batch writes.

Facts this file relies on are in shared/reference/hubspot.md; the ones that shaped it:

* search returns at most 10,000 results per query (HTTP 400 beyond) and 200 per page, and lags
  the writes by a few seconds: pull re-anchors its window before the cap, slices a timestamp
  that more than 10,000 records share by ``hs_object_id``, and looks back a little;
* search has its own 5/s limit, the rest 100 requests per rolling 10 s (private apps, Free/Starter):
  a first walk (backfill, first pull) reads the lowest ids down the list chain and the rest as
  ``hs_object_id`` ranges over search side by side (``providers.partitions``), spending both;
* batch endpoints take 100 inputs and answer 207 with per-input errors;
* calls and tasks carry ``crmsync_outcome_id``, a unique property created on first push, so a call
  whose reply was lost is read back by that id (batch read by idProperty, strongly consistent)
  instead of being created twice.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx

from crmsync.credentials import SecretStore, StaticAuth
from crmsync.errors import AuthError, FatalProviderError, UsageError
from crmsync.http import RateLimit, ResponsePolicy, UnconfirmedWrite
from crmsync.providers import partitions
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
    RemoteRecord,
    at_once,
    chunks,
    match_key,
)

log = logging.getLogger("crmsync.hubspot")

API = "https://api.hubapi.com"
AUTHORIZE_URL = "https://app.hubspot.com/oauth/authorize"
SEARCH_CAP = 10_000
SEARCH_PAGE = 200
SEARCH_AHEAD = 3  # search pages of one walk asked for at once (offset paging allows it)
IN_MAX = 100  # values in one IN / NOT_IN search filter
PARTITION_MIN = 2_000  # records below which a first walk stays one list chain (planning costs searches)
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


class HubSpotPolicy(ResponsePolicy):
    """HubSpot's 401/429 semantics and rate-limit headers."""

    def __init__(self) -> None:
        self.daily_remaining: int | None = None
        self.daily_max: int | None = None

    def _body(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def is_auth_expired(self, response: httpx.Response) -> bool:
        return response.status_code == 401

    def give_up(self, response: httpx.Response) -> bool:
        # The daily quota resets at midnight: no wait inside a run's deadline will fix it.
        return response.status_code == 429 and self._body(response).get("policyName") == "DAILY"

    def observe(self, response: httpx.Response, client: Any, bucket: str) -> None:
        h = response.headers
        if "X-HubSpot-RateLimit-Daily-Remaining" in h:
            try:
                self.daily_remaining = int(h["X-HubSpot-RateLimit-Daily-Remaining"])
                self.daily_max = int(h.get("X-HubSpot-RateLimit-Daily", "0")) or None
            except ValueError:
                pass
        remaining = h.get("X-HubSpot-RateLimit-Remaining")
        if remaining is not None and remaining.isdigit() and int(remaining) <= 1:
            # The portal says we are at its edge. If our own window is spent too, that is just us
            # (and our window already holds the next request back); if it still has turns, another
            # integration shares the portal's limit, so hold back before the portal answers 429.
            limiter = client.buckets.get(bucket) or client.buckets.get("default")
            free = getattr(limiter, "free", None)
            if limiter is not None and (free is None or free() > int(remaining) + 1):
                limiter.pause(1.0)

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        body = self._body(response)
        if not body:
            return response.text[:300], None
        message = str(body.get("message") or body.get("status") or "")
        details = body.get("errors") or []
        if details and isinstance(details, list):
            inner = "; ".join(str(e.get("message", "")) for e in details[:3] if isinstance(e, dict))
            if inner and inner not in message:
                message = f"{message} ({inner})"
        if body.get("correlationId"):
            message += f" [correlationId {body['correlationId']}]"
        return message, body.get("category") or body.get("status")


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


class HubSpotProvider(Provider):
    name = "hubspot"
    label = "HubSpot"
    connect_options = frozenset({"oauth", "client_id", "no_browser", "scopes"})
    objects = ("contacts", "companies", "deals", "calls")
    batch_size = BATCH
    # Search: the reference's budget of 4 per second (HubSpot documents 4, some portals get 5: set
    # search_rate_limit); the sliding window keeps a margin for jitter on top.
    default_rate_limits = {"default": RateLimit(100, 10.0), "search": RateLimit(4, 1.0)}
    # HubSpot caps requests per 10 s, not requests in flight. At ~150 ms a request, 10 in flight need
    # 1.5 s to send one window's 100 and a sliding window repeats that spread in every later window
    # (the last window's spread is added to the run); 25 send it in well under a second.
    default_concurrency = 25
    optimistic_creates = frozenset({"contacts", "deals"})  # email and crmsync_deal_key are unique
    unique_markers = frozenset({"calls", "tasks"})  # crmsync_outcome_id has hasUniqueValue
    webhook_support = "crmsync.providers.hubspot.webhook:HubSpotWebhooks"
    emulator = "crmsync.emulators.hubspot"
    default_base_url = API
    policy_class = HubSpotPolicy

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.lookback_ms = int(1000 * (ctx.options.get("lookback_seconds") or 30.0))
        general = ctx.options.get("rate_limit")
        # Requests per second each budget allows, as configured: how a first walk splits its ids.
        self._general_rps = float(general) / 10.0 if general else self.default_rate_limits["default"].requests / 10.0
        self._search_rps = float(ctx.options.get("search_rate_limit") or self.default_rate_limits["search"].requests)
        # Association reads gathered over five search pages save general requests, at the cost of
        # holding those pages: worth it only where the general budget cannot also carry the list chain.
        self._assoc_batch = ASSOC_BATCH if self._general_rps < self._search_rps + 10 else SEARCH_PAGE
        self._dispositions: dict[str, str] | None = None
        self._ensured: set[str] = set()
        self._props: dict[str, dict[str, dict[str, Any]]] = {}
        self._pending_links: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self._lock = threading.Lock()
        #: The portal's owners, listed once: email -> owner id, and HubSpot user id -> owner id.
        self._owners: tuple[dict[str, str], dict[str, str]] | None = None
        self._owners_lock = threading.Lock()

    # -- connection ------------------------------------------------------------------------------
    @classmethod
    def make_auth(cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any) -> Any:
        secret = secrets.require(connection)
        if secret.get("kind", "private_app") == "private_app":
            if not secret.get("token"):
                raise AuthError(f"the secret of connection {connection!r} holds no token")
            return StaticAuth("Authorization", f"Bearer {secret['token']}")
        from crmsync.oauth import refresh_session

        token_url = settings.get("token_url") or f"{settings.get('oauth_base', API)}/oauth/v3/token"
        return refresh_session(
            secrets=secrets,
            connection=connection,
            token_client=token_client,
            token_url=token_url,
            token_request=_token_request,
            scheme="Bearer",
        )

    @classmethod
    def connect(cls, ctx: ConnectContext) -> ConnectResult:
        from crmsync import oauth

        base_url = (ctx.base_url or API).rstrip("/")
        opts = ctx.options
        settings: dict[str, Any] = {}
        given = ctx.given or {}
        if opts.get("oauth") or given.get("kind") == "oauth":
            client_id = opts.get("client_id") or given.get("client_id") or ""
            if not client_id:
                raise UsageError("--oauth needs --client-id")
            client_secret = ctx.io.secret("HubSpot app client secret")
            register = {"kind": "oauth", "client_id": client_id, "client_secret": client_secret}
            token_url = opts.get("token_url") or f"{base_url}/oauth/v3/token"
            if given.get("refresh_token"):
                # The environment's secret already holds a grant: renew it rather than ask for another.
                form = {"grant_type": "refresh_token", "refresh_token": str(given["refresh_token"])}
            else:
                authorize_url = opts.get("authorize_url") or (
                    AUTHORIZE_URL if base_url == API else f"{base_url}/oauth/authorize"
                )
                grant = oauth.authorize(
                    ctx.io,
                    authorize_url=authorize_url,
                    params={"client_id": client_id, "scope": opts.get("scopes") or DEFAULT_OAUTH_SCOPES},
                    no_browser=bool(opts.get("no_browser")),
                )
                form = {
                    "grant_type": "authorization_code",
                    "redirect_uri": grant.redirect_uri,
                    "code": grant.code,
                    "code_verifier": grant.code_verifier,
                }
            tokens = _token_request(
                ctx.token_client(), token_url, {"client_id": client_id, "client_secret": client_secret, **form}
            )
            if form.get("refresh_token"):
                tokens.setdefault("refresh_token", form["refresh_token"])
            secret = {**register, **tokens, "expires_at": time.time() + float(tokens.pop("expires_in", 1800))}
            secret.pop("expires_in", None)
            settings.update({"auth": "oauth", "token_url": token_url, "oauth_base": base_url})
        else:
            token = ctx.io.secret("HubSpot private-app access token").strip()
            if not token:
                raise UsageError("no token was given")
            secret = {"kind": "private_app", "token": token}
            settings["auth"] = "private_app"
        ctx.secrets.set(ctx.name, secret)
        auth = cls.make_auth(
            connection=ctx.name, settings=settings, secrets=ctx.secrets, token_client=ctx.token_client()
        )
        http = ctx.client(base_url, auth)
        from crmsync.providers.base import ProviderContext

        provider = cls(
            ProviderContext(connection=ctx.name, base_url=base_url, settings=settings, http=http, secrets=ctx.secrets)
        )
        try:
            health = provider.check()
        finally:
            provider.close()
        if health.missing_scopes:
            raise AuthError(
                "the HubSpot credentials lack scopes crmsync needs: " + ", ".join(health.missing_scopes),
                hint="add them to the private app (or the OAuth app's scopes) and connect again",
            )
        settings["portal_id"] = health.account
        return ConnectResult(
            base_url=base_url, account_id=health.account, scopes=health.scopes, settings=settings, health=health
        )

    def _token_info(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The connection's secret and what HubSpot says of its token (scopes, user), or None.

        OAuth tokens through v3 introspection (the v1 GET is deprecated, going away in Feb 2027),
        private-app tokens through their access-token-info.
        """
        secret = self.ctx.secrets.get(self.ctx.connection) or {}
        if secret.get("kind") == "oauth" and secret.get("access_token"):
            self.http.auth.headers()  # refreshes first if the token is about to expire
            secret = self.ctx.secrets.get(self.ctx.connection) or secret
            info = self.http.request(
                "POST",
                "/oauth/v3/token/introspect",
                data={
                    "client_id": secret.get("client_id", ""),
                    "client_secret": secret.get("client_secret", ""),
                    "token": secret["access_token"],
                    "token_type_hint": "access_token",
                },
                endpoint="/oauth/v3/token/introspect",
                expect=(400, 404),
            )
        elif secret.get("token"):
            info = self.http.request(
                "POST",
                "/oauth/v2/private-apps/get/access-token-info",
                json={"tokenKey": secret["token"]},
                endpoint="/oauth/v2/private-apps/get/access-token-info",
                expect=(400, 404),
            )
        else:
            return secret, None
        return secret, (info.json() if info.status_code == 200 else None)

    def check(self) -> Health:
        details = self.http.get("/account-info/v3/details", endpoint="/account-info/v3/details").json()
        account = str(details.get("portalId", "")) or None
        scopes: list[str] = []
        secret, info = self._token_info()
        expires_at = None
        if info and (secret.get("kind") != "oauth" or info.get("active")):
            scopes = list(info.get("scopes", []))
        if secret.get("kind") == "oauth" and secret.get("access_token") and secret.get("expires_at"):
            expires_at = datetime.fromtimestamp(float(secret["expires_at"]), tz=UTC)
        missing: list[str] = []
        if scopes:
            missing = [s for s in REQUIRED_SCOPES if s not in scopes]
        else:
            # No introspection available: probe each object with a one-record read.
            for obj in ("contacts", "companies", "deals"):
                r = self.http.request(
                    "GET",
                    f"/crm/v3/objects/{obj}",
                    params={"limit": 1},
                    expect=(403,),
                    endpoint=f"/crm/v3/objects/{obj}",
                )
                if r.status_code == 403:
                    missing.append(f"crm.objects.{obj}.read")
        return Health(
            ok=not missing,
            account=account,
            scopes=scopes,
            missing_scopes=missing,
            token_expires_at=expires_at,
            detail=f"portal {account}",
        )

    # -- schema ----------------------------------------------------------------------------------
    def _properties(self, obj: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            cached = self._props.get(obj)
        if cached is not None:
            return cached
        body = self.http.get(f"/crm/v3/properties/{obj}", endpoint="/crm/v3/properties/{type}").json()
        props = {p["name"]: p for p in body.get("results", [])}
        with self._lock:
            self._props[obj] = props
        return props

    def dispositions(self) -> dict[str, str]:
        """The portal's call outcomes, label -> GUID (portals add their own)."""
        if self._dispositions is None:
            body = self.http.get("/calling/v1/dispositions", endpoint="/calling/v1/dispositions").json()
            self._dispositions = {d["label"]: d["id"] for d in body}
        return self._dispositions

    def fields(self, obj: str) -> list[FieldInfo]:
        out = []
        for p in self._properties(obj).values():
            if p.get("archived"):
                continue
            options = [o["value"] for o in p.get("options", []) if not o.get("hidden")] or None
            if p["name"] == "hs_call_disposition":
                options = list(self.dispositions().values())
            meta = p.get("modificationMetadata") or {}
            out.append(
                FieldInfo(
                    name=p["name"],
                    label=p.get("label", ""),
                    type={
                        "bool": "bool",
                        "enumeration": "enumeration",
                        "number": "number",
                        "date": "date",
                        "datetime": "datetime",
                        "phone_number": "phone",
                    }.get(p.get("type", ""), "string"),
                    read_only=bool(meta.get("readOnlyValue") or p.get("calculated")),
                    # The properties API has no "required" flag; the objects API requires hs_timestamp
                    # on engagements (reference §8), so map check must see it as required.
                    required=p["name"] == "hs_timestamp" and obj in ("calls", "tasks"),
                    unique=bool(p.get("hasUniqueValue")),
                    custom=not p.get("hubspotDefined", False) and not p["name"].startswith("hs_"),
                    options=options if p.get("type") == "enumeration" or p["name"] == "hs_call_disposition" else None,
                )
            )
        return out

    def managed_fields(self, obj: str) -> set[str]:
        return {"calls": {MARKER}, "tasks": {MARKER}, "deals": {DEAL_KEY}, "companies": {COMPANY_KEY}}.get(obj, set())

    def _ensure_property(self, obj: str, name: str, label: str) -> None:
        key = f"{obj}.{name}"
        if key in self._ensured:
            return
        props = self._properties(obj)
        if name not in props:
            group = next((p.get("groupName") for p in props.values() if p.get("groupName")), "contactinformation")
            r = self.http.request(
                "POST",
                f"/crm/v3/properties/{obj}",
                json={
                    "name": name,
                    "label": label,
                    "type": "string",
                    "fieldType": "text",
                    "groupName": group,
                    "hasUniqueValue": True,
                    "description": "Written by crmsync: its idempotency key.",
                },
                endpoint="/crm/v3/properties/{type}",
                expect=(409,),
            )
            if r.status_code == 201:
                props[name] = r.json()
            else:
                # It exists: made by another run, or by this request whose first answer was lost and
                # whose retry met it. Read it back rather than assume it missing (finds would skip it).
                with self._lock:
                    self._props.pop(obj, None)
                if name not in self._properties(obj):
                    raise FatalProviderError(
                        f"HubSpot refused to create property {obj}.{name} ({r.status_code}) yet does not list it",
                        hint="it may be archived: restore it in Settings > Properties, then push again",
                    )
        self._ensured.add(key)

    def prepare_push(self) -> None:
        self._ensure_property("calls", MARKER, "crmsync outcome id")

    def prepare_objects(self, objects: Sequence[str]) -> None:
        """Create the unique idempotency properties the objects of this push rely on.

        Each is a read and maybe a create, independent of the others: they go at once, not one after
        another (a push's first writes wait for them).
        """
        wanted = []
        for obj in objects:
            if obj in ("calls", "tasks"):
                wanted.append((obj, MARKER, "crmsync outcome id"))
            elif obj == "deals":
                wanted.append(("deals", DEAL_KEY, "crmsync deal key"))
            elif obj == "companies":
                wanted.append(("companies", COMPANY_KEY, "crmsync company key"))
        at_once(lambda w: self._ensure_property(*w), wanted)

    # -- pull ------------------------------------------------------------------------------------
    def _record(self, obj: str, raw: dict[str, Any]) -> RemoteRecord:
        assoc: dict[str, list[str]] = {}
        for to, block in (raw.get("associations") or {}).items():
            ids = sorted({str(a["id"]) for a in block.get("results", [])})
            assoc[_plural(to)] = ids
        props = raw.get("properties") or {}
        return RemoteRecord(
            id=str(raw["id"]),
            properties=props,
            updated_at=parse_ts(raw.get("updatedAt")) or parse_ts(props.get(modified_prop(obj))),
            archived=bool(raw.get("archived")),
            associations=assoc,
        )

    def read_associations(self, obj: str, ids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        """Linked ids per record, one v4 batch read per target type and 1,000 ids."""
        out: dict[str, dict[str, list[str]]] = {i: {} for i in ids}
        for to in PULL_ASSOCIATIONS.get(obj, []):
            for chunk in chunks(list(ids), 1000):
                body = self.http.post(
                    f"/crm/v4/associations/{obj}/{to}/batch/read",
                    json={"inputs": [{"id": i} for i in chunk]},
                    endpoint="/crm/v4/associations/{from}/{to}/batch/read",
                    expect=(207,),
                ).json()
                for i in chunk:
                    out[i][to] = []
                for result in body.get("results", []):
                    rid = str(result.get("from", {}).get("id"))
                    if rid in out:
                        out[rid][to] = sorted({str(t["toObjectId"]) for t in result.get("to", [])})
        return out

    def _with_associations(self, obj: str, records: list[RemoteRecord]) -> list[RemoteRecord]:
        """Search results carry no associations: read them in one v4 batch per target type."""
        if not records or not PULL_ASSOCIATIONS.get(obj):
            return records
        links = self.read_associations(obj, [r.id for r in records])
        for r in records:
            r.associations.update(links.get(r.id, {}))
        return records

    def _list(self, obj: str, fields: Sequence[str], *, after: str | None, archived: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": LIST_PAGE, "properties": ",".join(fields), "archived": str(archived).lower()}
        if PULL_ASSOCIATIONS.get(obj) and not archived:
            params["associations"] = ",".join(PULL_ASSOCIATIONS[obj])
        if after:
            params["after"] = after
        return self.http.get(f"/crm/v3/objects/{obj}", params=params, endpoint="/crm/v3/objects/{type}").json()

    def _search(
        self,
        obj: str,
        groups: list[list[dict[str, Any]]],
        sort: str,
        fields: Sequence[str],
        after: int,
        *,
        limit: int = SEARCH_PAGE,
    ) -> dict[str, Any]:
        """One search page; ``groups`` are filter groups (ANDed filters, the groups ORed)."""
        body = {
            "filterGroups": [{"filters": filters} for filters in groups],
            "sorts": [sort],
            "properties": list(fields),
            "limit": limit,
            "after": str(after),
        }
        return self.http.post(
            f"/crm/v3/objects/{obj}/search", json=body, bucket="search", endpoint="/crm/v3/objects/{type}/search"
        ).json()

    def _marker_filter(self, obj: str) -> list[dict[str, Any]]:
        # Only the calls crmsync logged are pulled (a portal's own call log is not ours to mirror).
        if obj == "calls":
            return [{"propertyName": MARKER, "operator": "HAS_PROPERTY"}]
        return []

    def changes(
        self,
        obj: str,
        cursor: dict[str, Any] | None,
        *,
        fields: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Page]:
        fields = sorted({*fields, modified_prop(obj), "hs_object_id"})
        if obj == "calls" and MARKER not in self._properties("calls"):
            return  # crmsync never logged a call here: nothing of ours to pull
        run_start = to_ms(until) if until else int(time.time() * 1000)
        cursor = dict(cursor or {})
        if not cursor and since is not None:
            cursor = {"mode": "search", "ts": to_ms(since), "archived_ts": to_ms(since), "after_ts": False}
        if cursor.get("mode") == "partitioned" or (cursor.get("mode") is None and not self._marker_filter(obj)):
            plan = cursor if cursor.get("mode") == "partitioned" else self._plan_partitions(obj, run_start)
            if plan is not None:
                yield from self._partitioned(obj, plan, fields)
                return
        if cursor.get("mode") in (None, "list") and not self._marker_filter(obj):
            yield from self._list_phase(obj, cursor, fields, run_start)
            return
        if cursor.get("mode") is None:
            cursor = {"mode": "search", "ts": 0}
        last = cursor
        # The first page of archived records is read while the search walk runs, not after it (a
        # round trip off the end of every pull). A record archived meanwhile is newer than any it
        # holds, so the next pull finds it, as it finds one archived after a later read.
        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"archived-{obj}")
        try:
            first = ahead.submit(self._list, obj, fields, after=None, archived=True)
            for page in self._search_phase(obj, cursor, fields, run_start):
                last = page.cursor or last
                yield page
            yield from self._archived_phase(obj, last, fields, first=first)
        finally:
            ahead.shutdown(wait=False, cancel_futures=True)

    def _plan_partitions(self, obj: str, run_start: int) -> dict[str, Any] | None:
        """Split a first walk's id space: the list chain reads the lowest ids, search ranges the rest.

        Two one-record searches (lowest and highest ``hs_object_id``, side by side) tell the span,
        the count and the round trip; below PARTITION_MIN records the plain list walk is cheaper.
        Each side gets the share of ids it reads in the same time: the list is one chain of pages of
        100 on the general budget (less the association reads that search pages need); the search
        ranges, enough of them to keep the search budget busy, read pages of 200.
        """

        def edge(sort: str) -> dict[str, Any]:
            return self._search(obj, [], sort, ["hs_object_id"], 0, limit=1)

        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"plan-{obj}") as pool:
            low_f, high_f = pool.submit(edge, "hs_object_id"), pool.submit(edge, "-hs_object_id")
            low, high = low_f.result(), high_f.result()
        rtt = min(max(time.monotonic() - began, 0.01), 2.0)
        total = int(high.get("total") or 0)
        if total < PARTITION_MIN or not low.get("results") or not high.get("results"):
            return None
        lo, hi = int(low["results"][0]["id"]), int(high["results"][0]["id"])
        ranges_n = min(MAX_SEARCH_RANGES, max(1, math.ceil(self._search_rps * rtt) + 1))
        search_rate = min(ranges_n / rtt, self._search_rps)  # search pages per second
        assoc_rate = search_rate * SEARCH_PAGE / self._assoc_batch * len(PULL_ASSOCIATIONS.get(obj, []))
        list_rate = max(0.1, min(1 / rtt, self._general_rps - assoc_rate))  # list pages per second
        list_share = (LIST_PAGE * list_rate) / (LIST_PAGE * list_rate + SEARCH_PAGE * search_rate)
        span = hi - lo + 1
        below = lo + max(1, round(span * list_share))
        step = max(1, math.ceil((hi + 1 - below) / ranges_n))
        ranges = [[a, min(a + step - 1, hi)] for a in range(below, hi + 1, step)]
        if not ranges:
            return None
        return {"mode": "partitioned", "started": run_start, "list_below": below, "ranges": ranges, "total": total}

    def _partitioned(self, obj: str, plan: dict[str, Any], fields: Sequence[str]) -> Iterator[Page]:
        """The list walk below ``list_below`` and each search range side by side (``partitions``).

        Each page carries every partition's position as of the pages handed over so far, so a kill
        resumes each range after its last stored page; the ranges are disjoint, so no record is
        read twice. Records created or changed after the walk began (and any the search index had
        not caught up with) are the next pull's: the hand-over cursor starts at the walk's start,
        without the list's "listed" flag, so that pull looks back for index lag as every search does.
        """
        started = int(plan["started"])
        below = int(plan["list_below"])
        ranges = [(int(a), int(b)) for a, b in plan["ranges"]]
        extra = {k: plan[k] for k in ("mode", "started", "list_below", "ranges", "total")}
        parts: dict[str, partitions.PartitionFn] = {"list": functools.partial(self._list_below, obj, fields, below)}
        for i, (a, b) in enumerate(ranges):
            parts[f"search{i}"] = functools.partial(self._id_range, obj, fields, a, b)
        total = int(plan.get("total") or 0) or None
        final: dict[str, Any] | None = plan
        for page in partitions.interleave(parts, plan, depth=2, name=f"partition-{obj}", extra=extra):
            page.total = total
            yield page
            final = page.cursor
        states = partitions.parse(final)
        newest = max([0, *(int((s["at"] or {}).get("newest", 0)) for s in states.values())])
        # The newest modification read, never later than the start: derived from the data, so a
        # resumed walk hands over at the same point as an uninterrupted one.
        handover = min(started, newest) if newest else started
        yield Page(records=[], cursor={"mode": "search", "ts": handover, "archived_ts": handover})

    def _list_below(self, obj: str, fields: Sequence[str], below: int, at: Any) -> Iterator[Page]:
        """The list walk from its start (or the ``after`` it stopped at) up to id ``below``."""
        after = (at or {}).get("after")
        newest = int((at or {}).get("newest", 0))
        prop = modified_prop(obj)
        while True:
            body = self._list(obj, fields, after=after)
            raws = body.get("results", [])
            records = [self._record(obj, r) for r in raws if int(r["id"]) < below]
            newest = max([newest, *(_prop_ms(r, prop) or 0 for r in records)])
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if len(records) < len(raws) or not after:
                if records:
                    yield Page(records=records, cursor={"after": after, "newest": newest})
                return
            yield Page(records=records, cursor={"after": after, "newest": newest})

    def _id_range(self, obj: str, fields: Sequence[str], lo: int, hi: int, at: Any) -> Iterator[Page]:
        """Ids ``lo``..``hi`` through search, keyset-paged by id (so the 10,000-result cap never binds).

        Each search needs only the previous page's last id, so the searches form the range's only
        chain; the associations of up to ASSOC_BATCH ids (five pages) are read in one request
        beside it, which leaves the general budget to the list walk.
        """
        last = int(at["last"]) if at else lo - 1
        newest = int((at or {}).get("newest", 0))
        prop = modified_prop(obj)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"assoc-{obj}")
        pending: tuple[Future[list[RemoteRecord]], dict[str, Any]] | None = None
        batch: list[RemoteRecord] = []
        try:
            while True:
                filters = [
                    {"propertyName": "hs_object_id", "operator": "GT", "value": str(last)},
                    {"propertyName": "hs_object_id", "operator": "LTE", "value": str(hi)},
                ]
                body = self._search(obj, [filters], "hs_object_id", fields, 0)
                records = [self._record(obj, r) for r in body.get("results", [])]
                if records:
                    last = max(int(r.id) for r in records)
                    newest = max([newest, *(_prop_ms(r, prop) or 0 for r in records)])
                    batch.extend(records)
                end = not records or not ((body.get("paging") or {}).get("next") or {}).get("after")
                if pending is not None and (pending[0].done() or (batch and (end or len(batch) >= self._assoc_batch))):
                    yield Page(records=pending[0].result(), cursor=pending[1])
                    pending = None
                if batch and (end or len(batch) >= self._assoc_batch):
                    pending = (pool.submit(self._with_associations, obj, batch), {"last": last, "newest": newest})
                    batch = []
                if end:
                    break
            if pending is not None:
                yield Page(records=pending[0].result(), cursor=pending[1])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _list_phase(self, obj: str, cursor: dict[str, Any], fields: Sequence[str], run_start: int) -> Iterator[Page]:
        """First run: the list endpoint has no 10k cap. Then hand over to search.

        The hand-over point is the newest modification seen, but never later than the moment the
        list began: whatever changed after that is found again by search. Deriving it from the
        data (not the clock) makes a resumed run end on the same cursor as an uninterrupted one.
        """
        started = int(cursor.get("started", run_start))
        newest = int(cursor.get("newest", 0))
        after = cursor.get("after")
        prop = modified_prop(obj)
        while True:
            body = self._list(obj, fields, after=after)
            records = [self._record(obj, r) for r in body.get("results", [])]
            for r in records:
                newest = max(newest, _prop_ms(r, prop) or 0)
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if after:
                yield Page(
                    records=records, cursor={"mode": "list", "after": after, "started": started, "newest": newest}
                )
            else:
                handover = min(started, newest) if newest else started
                # Every record modified at or before the newest seen was read at that version
                # (a later write would be stamped after the list began), so when the newest is
                # before the start, search continues strictly after it: no boundary re-read.
                yield Page(
                    records=records,
                    cursor={
                        "mode": "search",
                        "ts": handover,
                        "archived_ts": handover,
                        "listed": True,
                        "after_ts": bool(newest) and newest < started,
                    },
                )
                return

    def _search_phase(self, obj: str, cursor: dict[str, Any], fields: Sequence[str], run_start: int) -> Iterator[Page]:
        prop = modified_prop(obj)
        base_filters = self._marker_filter(obj)
        ts = int(cursor.get("ts", 0))
        # A hand-over from the list endpoint ("listed") read the records themselves, not the
        # search index: nothing to look back for.
        if cursor.get("slice_id") is None and not cursor.get("after_ts") and not cursor.get("listed"):
            # Search lags writes by seconds, so the last run may have missed a record written just
            # before it searched: one modified after its start ("hi") less the look-back. Only a
            # cursor inside that window is moved back; one far behind it (the last change long
            # before that run) cannot hide anything. Cursors from before "hi" always look back.
            hi = cursor.get("hi")
            if hi is None:
                ts = max(0, ts - self.lookback_ms)
            elif ts > int(hi) - self.lookback_ms:
                ts = max(0, int(hi) - self.lookback_ms)
        archived_ts = cursor.get("archived_ts", 0)
        upper = run_start

        def cur(**kw: Any) -> dict[str, Any]:
            return {"mode": "search", "archived_ts": archived_ts, "hi": upper, **kw}

        slice_id = cursor.get("slice_id")
        after_ts = bool(cursor.get("after_ts"))
        expect = 0  # how many results the next search is known to hold (0: unknown)
        seen_at: list[str] = []  # after a re-anchor: ids at ts already read
        while True:
            if slice_id is not None:
                # More than 10,000 records share ts: walk that one millisecond by object id.
                last = slice_id
                offset = 0
                while True:
                    filters = [
                        *base_filters,
                        {"propertyName": prop, "operator": "EQ", "value": str(ts)},
                        {"propertyName": "hs_object_id", "operator": "GT", "value": str(last)},
                    ]
                    body = self._search(obj, [filters], "hs_object_id", fields, offset)
                    records = self._with_associations(obj, [self._record(obj, r) for r in body.get("results", [])])
                    if records:
                        max_id = max(int(r.id) for r in records)
                        yield Page(records=records, cursor=cur(ts=ts, slice_id=max_id), total=body.get("total"))
                    nxt = ((body.get("paging") or {}).get("next") or {}).get("after")
                    if not nxt or not records:
                        break
                    offset = int(nxt)
                    if offset + SEARCH_PAGE > SEARCH_CAP:
                        last, offset = max(int(r.id) for r in records), 0
                slice_id, after_ts = None, True
                yield Page(records=[], cursor=cur(ts=ts, after_ts=True))
            op = "GT" if after_ts or seen_at else "GTE"
            groups = [
                [
                    *base_filters,
                    {"propertyName": prop, "operator": op, "value": str(ts)},
                    {"propertyName": prop, "operator": "LTE", "value": str(upper)},
                ]
            ]
            if seen_at:
                # After the cap: the records at ts not read yet, then those after it.
                groups.append(
                    [
                        *base_filters,
                        {"propertyName": prop, "operator": "EQ", "value": str(ts)},
                        {"propertyName": "hs_object_id", "operator": "NOT_IN", "values": seen_at},
                    ]
                )
            reanchor = False
            for body, records in self._search_pages(obj, groups, prop, fields, expect=expect):
                if not records:
                    return
                stamps = [_prop_ms(r, prop) or (to_ms(r.updated_at) if r.updated_at else ts) for r in records]
                page_ts = min(max(max(stamps), ts), upper)
                yield Page(records=records, cursor=cur(ts=page_ts), total=body.get("total"))
                nxt = ((body.get("paging") or {}).get("next") or {}).get("after")
                if not nxt:
                    return
                if int(nxt) + SEARCH_PAGE > SEARCH_CAP:
                    reanchor = True
                    # The next search leaves out this page's records at page_ts (HubSpot takes up
                    # to IN_MAX values in NOT_IN; more are read again, as GTE would): its total is
                    # the rest past the cap, so its pages are asked for at once, not after its
                    # first answer. Fewer (a record that moved on since) costs one empty page.
                    seen_at = [r.id for r, stamp in zip(records, stamps, strict=True) if stamp == page_ts]
                    if len(seen_at) > IN_MAX:
                        seen_at = []
                    expect = int(body.get("total") or 0) - int(nxt) + stamps.count(page_ts) - len(seen_at)
                    break
            if reanchor:
                if page_ts == ts:
                    # A whole window of 10,000 results at one timestamp: slice it by id.
                    slice_id, after_ts, expect, seen_at = 0, False, 0, []
                else:
                    ts, after_ts = page_ts, False

    def _search_pages(
        self, obj: str, groups: list[list[dict[str, Any]]], sort: str, fields: Sequence[str], *, expect: int = 0
    ) -> Iterator[tuple[dict[str, Any], list[RemoteRecord]]]:
        """A search's pages in order, with their associations, the next SEARCH_AHEAD asked for at once.

        A search's ``after`` is an offset, so once a page tells the total, the pages after it can
        be asked for side by side (the search limit still paces them): one object's walk no longer
        waits two round trips (search, then associations) per page and leaves the search budget
        idle. Pages past the 10,000 cap are never asked for; the caller re-anchors there.
        ``expect``: the total when the caller knows it, so the first pages go at once too.
        """

        def fetch(offset: int) -> tuple[dict[str, Any], list[RemoteRecord]]:
            body = self._search(obj, groups, sort, fields, offset)
            return body, self._with_associations(obj, [self._record(obj, r) for r in body.get("results", [])])

        ahead: deque[tuple[int, Future[tuple[dict[str, Any], list[RemoteRecord]]]]] = deque()
        pool: ThreadPoolExecutor | None = None
        expected, total, planned = 0, min(expect, SEARCH_CAP), 0

        def fill() -> None:
            nonlocal pool, planned
            while len(ahead) < SEARCH_AHEAD and planned < total and planned + SEARCH_PAGE <= SEARCH_CAP:
                pool = pool or ThreadPoolExecutor(max_workers=SEARCH_AHEAD, thread_name_prefix=f"search-{obj}")
                ahead.append((planned, pool.submit(fetch, planned)))
                planned += SEARCH_PAGE

        try:
            if total > SEARCH_PAGE:
                fill()
            while True:
                if ahead and ahead[0][0] == expected:
                    body, records = ahead.popleft()[1].result()
                else:
                    for _, f in ahead:
                        f.cancel()
                    ahead.clear()
                    body, records = fetch(expected)
                    planned = expected + SEARCH_PAGE
                yield body, records
                nxt = ((body.get("paging") or {}).get("next") or {}).get("after")
                if not nxt or not records:
                    return
                expected = int(nxt)
                total = min(int(body.get("total") or 0), SEARCH_CAP)  # the answer, not a caller's estimate
                planned = max(planned, expected)
                fill()
        finally:
            for _, f in ahead:
                f.cancel()
            if pool is not None:
                pool.shutdown(wait=False)

    def _archived_phase(
        self, obj: str, cursor: dict[str, Any], fields: Sequence[str], *, first: Future[dict[str, Any]] | None = None
    ) -> Iterator[Page]:
        """Search never returns archived records: list them and keep those archived since last time.

        ``first``: the first page, already asked for.
        """
        since = int(cursor.get("archived_ts", 0))
        newest = since
        after = None
        while True:
            if first is not None:
                body, first = first.result(), None
            else:
                body = self._list(obj, fields, after=after, archived=True)
            fresh = []
            for raw in body.get("results", []):
                archived_at = parse_ts(raw.get("archivedAt"))
                ms = to_ms(archived_at) if archived_at else 0
                if ms >= since:
                    rec = self._record(obj, raw)
                    rec.archived = True
                    fresh.append(rec)
                    newest = max(newest, ms)
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if fresh or not after:
                yield Page(records=fresh, cursor=None if after else {**cursor, "archived_ts": newest})
            if not after:
                return

    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        out: list[RemoteRecord] = []
        props = sorted({*fields, modified_prop(obj), "hs_object_id"})
        for chunk in chunks(list(dict.fromkeys(ids)), BATCH):
            body = self.http.post(
                f"/crm/v3/objects/{obj}/batch/read",
                json={"properties": props, "propertiesWithHistory": [], "inputs": [{"id": i} for i in chunk]},
                endpoint="/crm/v3/objects/{type}/batch/read",
                expect=(207, 404),
            ).json()
            out.extend(self._record(obj, r) for r in body.get("results", []))
        return self._with_associations(obj, out)

    def list_ids(self, obj: str) -> Iterator[list[str]]:
        after = None
        while True:
            params: dict[str, Any] = {"limit": LIST_PAGE, "properties": "hs_object_id"}
            if after:
                params["after"] = after
            body = self.http.get(f"/crm/v3/objects/{obj}", params=params, endpoint="/crm/v3/objects/{type}").json()
            yield [str(r["id"]) for r in body.get("results", [])]
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return

    # -- push ------------------------------------------------------------------------------------
    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        found: dict[str, RemoteRecord] = {}
        props = sorted({*fields, modified_prop(obj), "hs_object_id"})
        by_kind: dict[str, list[str]] = {}
        for k in keys:
            name, value = next(iter(k.items()))
            by_kind.setdefault(name, []).append(value)
        id_props = {"email": "email", "key": DEAL_KEY if obj == "deals" else COMPANY_KEY}
        for kind, values in by_kind.items():
            values = list(dict.fromkeys(values))
            if kind in id_props and (kind != "key" or obj in ("deals", "companies")):
                id_prop = id_props[kind]
                if id_prop not in ("email",) and id_prop not in self._properties(obj):
                    continue  # never pushed here: nothing can carry the key yet
                for chunk in chunks(values, BATCH):
                    body = self.http.post(
                        f"/crm/v3/objects/{obj}/batch/read",
                        json={
                            "properties": [*props, id_prop],
                            "propertiesWithHistory": [],
                            "idProperty": id_prop,
                            "inputs": [{"id": v} for v in chunk],
                        },
                        endpoint="/crm/v3/objects/{type}/batch/read",
                        expect=(207, 404),
                    ).json()
                    for raw in body.get("results", []):
                        rec = self._record(obj, raw)
                        value = str((raw.get("properties") or {}).get(id_prop) or "").lower()
                        if value:
                            found[match_key({kind: value})] = rec
            else:
                prop = {"phone": "phone", "domain": "domain", "name": "name"}.get(kind)
                if prop is None:
                    continue
                for chunk in chunks(values, IN_MAX):
                    body = self._search(
                        obj,
                        [[{"propertyName": prop, "operator": "IN", "values": chunk}]],
                        "hs_object_id",
                        [*props, prop],
                        0,
                    )
                    for raw in body.get("results", []):
                        rec = self._record(obj, raw)
                        value = str((raw.get("properties") or {}).get(prop) or "").lower()
                        if value:
                            found.setdefault(match_key({kind: value}), rec)
        return found

    def upsert(self, obj: str, items: Sequence[Outgoing]) -> list[ItemResult]:
        results: dict[str, ItemResult] = {}
        updates = [i for i in items if i.remote_id]
        blind = [i for i in items if not i.remote_id and i.create_only and obj in self.optimistic_creates]
        blind_refs = {i.ref for i in blind}
        creates = [i for i in items if not i.remote_id and i.ref not in blind_refs]
        if blind:
            results.update(self._create_only(obj, blind))
        for item in [i for i in updates if not i.properties]:
            # Nothing to change, only links to make (an existing record meets a new company): no write.
            results[item.ref] = ItemResult(item.ref, True, remote_id=item.remote_id, created=False)
        updates = [i for i in updates if i.properties]
        if updates:
            inputs = [{"id": i.remote_id, "properties": i.properties, "objectWriteTraceId": i.ref} for i in updates]
            results.update(self._batch(obj, "update", inputs, updates, created=False))
        keyed = {"contacts": "email", "companies": COMPANY_KEY, "deals": DEAL_KEY}
        upserts, plain = [], []
        for item in creates:
            name, value = next(iter(item.match.items())) if item.match else ("", "")
            if obj == "contacts" and name == "email":
                upserts.append((item, "email", value))
            elif obj in ("companies", "deals") and obj in keyed:
                key_value = item.match.get("key") or f"{name}:{value}"
                item.properties = {**item.properties, keyed[obj]: key_value}
                upserts.append((item, keyed[obj], key_value))
            else:
                plain.append(item)
        if upserts:
            inputs = [
                {"idProperty": prop, "id": value, "properties": i.properties, "objectWriteTraceId": i.ref}
                for i, prop, value in upserts
            ]
            results.update(self._batch(obj, "upsert", inputs, [u[0] for u in upserts], created=None))
        if plain:
            # No unique key guards these: a create whose answer was lost is looked up, not re-sent. The
            # spec requires `associations` on every create input; the links go in one v4 batch (flush).
            creating = [{"properties": i.properties, "associations": [], "objectWriteTraceId": i.ref} for i in plain]
            results.update(self._batch(obj, "create", creating, plain, created=True, replay=False))
        self._associate(
            obj,
            [
                i
                for i in items
                if i.associations and i.ref not in blind_refs and results.get(i.ref, ItemResult(i.ref, False)).ok
            ],
            results,
        )
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no result from HubSpot", retriable=True)
            for i in items
        ]

    def _create_only(self, obj: str, items: Sequence[Outgoing]) -> dict[str, ItemResult]:
        """Batch-create records believed new, links inline; an existing email or key answers CONFLICT."""
        inputs = []
        for item in items:
            props = dict(item.properties)
            if obj == "contacts":
                props.setdefault("email", item.match.get("email", ""))
            else:
                props[DEAL_KEY] = item.match.get("key") or props.get(DEAL_KEY)
            inputs.append(
                {
                    "properties": props,
                    "associations": _inline_associations(obj, item.associations),
                    "objectWriteTraceId": item.ref,
                }
            )
        return self._batch(obj, "create", inputs, items, created=True)

    def _batch(
        self,
        obj: str,
        action: str,
        inputs: list[dict[str, Any]],
        items: Sequence[Any],
        *,
        created: bool | None,
        replay: bool = True,
    ) -> dict[str, ItemResult]:
        """One batch request; 207 errors become per-item failures, matched by objectWriteTraceId.

        ``replay=False``: a lost answer is not retried but reported per item as ``unconfirmed``.
        """
        results: dict[str, ItemResult] = {}
        try:
            response = self.http.post(
                f"/crm/v3/objects/{obj}/batch/{action}",
                json={"inputs": inputs},
                endpoint=f"/crm/v3/objects/{{type}}/batch/{action}",
                expect=(207,),
                replay=replay,
            )
        except UnconfirmedWrite as exc:
            return {i.ref: ItemResult(i.ref, False, error=str(exc), retriable=True, unconfirmed=True) for i in items}
        except FatalProviderError as exc:
            if action == "create" and exc.status == 409:
                # A whole batch refused for the first key or marker it already holds (nothing was
                # created): every item is looked up by the engine, and what is not there sent again.
                return {i.ref: ItemResult(i.ref, False, error=str(exc), exists=True) for i in items}
            if len(items) == 1:
                return {items[0].ref: ItemResult(items[0].ref, False, error=str(exc))}
            # One bad input can fail the whole request (400): split and retry so it fails alone.
            half = len(items) // 2
            results.update(self._batch(obj, action, inputs[:half], items[:half], created=created, replay=replay))
            results.update(self._batch(obj, action, inputs[half:], items[half:], created=created, replay=replay))
            return results
        body = response.json()
        refs = [i.ref for i in items]
        for pos, raw in enumerate(body.get("results", [])):
            ref = raw.get("objectWriteTraceId")
            if ref not in refs:
                ref = self._correlate(obj, action, raw, items, results) or (refs[pos] if pos < len(refs) else None)
            if ref is None:
                continue
            is_new = raw.get("new") if created is None else created
            results[ref] = ItemResult(ref, True, remote_id=str(raw["id"]), created=bool(is_new))
        for err in body.get("errors", []):
            context = err.get("context") or {}
            trace = context.get("objectWriteTraceId") or []
            failed = [t for t in trace if t in refs] or self._error_refs(err, inputs, items)
            message = err.get("message") or err.get("category") or "failed"
            retriable = str(err.get("status", "")).startswith("5") or err.get("category") == "RATE_LIMITS"
            exists = action == "create" and err.get("category") == "CONFLICT"
            for ref in failed:
                if ref not in results:
                    results[ref] = ItemResult(ref, False, error=message, retriable=retriable, exists=exists)
        return results

    def _correlate(
        self, obj: str, action: str, raw: dict[str, Any], items: Sequence[Any], done: dict[str, ItemResult]
    ) -> str | None:
        """Match a result without a trace id back to its input by its key or id."""
        props = raw.get("properties") or {}
        for item in items:
            if item.ref in done:
                continue
            if getattr(item, "remote_id", None) and str(item.remote_id) == str(raw.get("id")):
                return str(item.ref)
            marker = getattr(item, "marker", None)
            if marker and props.get(MARKER) == marker:
                return str(item.ref)
            for prop in ("email", DEAL_KEY, COMPANY_KEY):
                if prop in item.properties and str(props.get(prop, "")).lower() == str(item.properties[prop]).lower():
                    return str(item.ref)
        return None

    def _error_refs(self, err: dict[str, Any], inputs: list[dict[str, Any]], items: Sequence[Any]) -> list[str]:
        context = err.get("context") or {}
        values = {str(v).lower() for vals in context.values() if isinstance(vals, list) for v in vals}
        refs = []
        for inp, item in zip(inputs, items, strict=False):
            keys = {str(inp.get("id", "")).lower(), *(str(v).lower() for v in (inp.get("properties") or {}).values())}
            if values & keys:
                refs.append(item.ref)
        return refs

    def _associate(self, obj: str, items: Sequence[Outgoing], results: dict[str, ItemResult]) -> None:
        """Queue contact->company, deal->contact/company links; ``flush`` sends them in bulk."""
        with self._lock:
            for item in items:
                rid = results[item.ref].remote_id
                for to, to_id in item.associations.items():
                    if rid and to_id:
                        self._pending_links.setdefault((obj, to), []).append((rid, to_id))

    def flush(self, obj: str) -> None:
        """Send the queued links of ``obj``: one v4 request per 2,000 pairs, not one per upsert batch."""
        with self._lock:
            queued = {key: pairs for key, pairs in self._pending_links.items() if key[0] == obj}
            for key in queued:
                del self._pending_links[key]
        for (_, to), links in queued.items():
            for chunk in chunks(links, 2000):
                self.http.post(
                    f"/crm/v4/associations/{obj}/{to}/batch/associate/default",
                    json={"inputs": [{"from": {"id": a}, "to": {"id": b}} for a, b in chunk]},
                    endpoint="/crm/v4/associations/{from}/{to}/batch/associate/default",
                    expect=(207,),
                )

    # -- owners ------------------------------------------------------------------------------------
    def _owner_index(self) -> tuple[dict[str, str], dict[str, str]]:
        """Every active owner of the portal, read once (paged) and kept for this provider's life."""
        with self._owners_lock:
            if self._owners is not None:
                return self._owners
            by_email: dict[str, str] = {}
            by_user: dict[str, str] = {}
            after: str | None = None
            while True:
                params: dict[str, Any] = {"limit": OWNERS_PAGE, "archived": "false"}
                if after:
                    params["after"] = after
                try:
                    body = self.http.get("/crm/v3/owners/", params=params, endpoint="/crm/v3/owners").json()
                except AuthError as exc:
                    raise AuthError(
                        f"HubSpot refused to list owners: {exc.message}",
                        hint="grant the crm.objects.owners.read scope to the private app (or OAuth app)",
                    ) from exc
                for owner in body.get("results", []):
                    if owner.get("id") and owner.get("email"):
                        by_email.setdefault(str(owner["email"]).lower(), str(owner["id"]))
                    if owner.get("id") and owner.get("userId") is not None:
                        by_user[str(owner["userId"])] = str(owner["id"])
                after = ((body.get("paging") or {}).get("next") or {}).get("after")
                if not after:
                    break
            self._owners = (by_email, by_user)
            return self._owners

    def resolve_owners(self, emails: Sequence[str]) -> dict[str, str]:
        """Owner ids (``hubspot_owner_id``) of the given emails, from one paged listing of the owners."""
        if not emails:
            return {}
        by_email, _ = self._owner_index()
        wanted = {e.strip().lower() for e in emails if e}
        return {e: by_email[e] for e in wanted if e in by_email}

    def default_owner(self) -> str | None:
        """The owner id of the user behind the token (the private app's or the OAuth grant's user)."""
        secret, info = self._token_info()
        user = info.get("user_id" if secret.get("kind") == "oauth" else "userId") if info else None
        if user is None:
            return None
        try:
            return self._owner_index()[1].get(str(user))
        except AuthError as exc:
            # Without the owners scope a push that names no rep still goes ahead, its calls unassigned.
            log.warning("%s: calls without a known rep are left unassigned", exc)
            return None

    def create_activities(self, obj: str, items: Sequence[OutgoingActivity]) -> list[ItemResult]:
        self.prepare_objects([obj])
        inputs: list[dict[str, Any]] = []
        for item in items:
            inputs.append(
                {
                    "properties": {**item.properties, MARKER: item.marker},
                    "associations": _inline_associations(obj, item.associations),
                    "objectWriteTraceId": item.ref,
                }
            )
        # Not replayed: the engine tells a lost answer (ours, look it up) from a unique-value
        # conflict met first time (``exists``: logged before, by another store).
        results = self._batch(obj, "create", inputs, items, created=True, replay=False)
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no result from HubSpot", retriable=True)
            for i in items
        ]

    def find_activities(
        self, obj: str, markers: Sequence[str], *, context: Sequence[OutgoingActivity] = ()
    ) -> dict[str, str]:
        if MARKER not in self._properties(obj):
            return {}
        found: dict[str, str] = {}
        for chunk in chunks(list(dict.fromkeys(markers)), BATCH):
            body = self.http.post(
                f"/crm/v3/objects/{obj}/batch/read",
                json={
                    "properties": [MARKER],
                    "propertiesWithHistory": [],
                    "idProperty": MARKER,
                    "inputs": [{"id": m} for m in chunk],
                },
                endpoint="/crm/v3/objects/{type}/batch/read",
                expect=(207, 404),
            ).json()
            for raw in body.get("results", []):
                marker = (raw.get("properties") or {}).get(MARKER)
                if marker:
                    found[marker] = str(raw["id"])
        return found

    def quota(self) -> dict[str, Any]:
        policy = self.http.policy
        if isinstance(policy, HubSpotPolicy) and policy.daily_remaining is not None:
            return {"daily_remaining": policy.daily_remaining, "daily_limit": policy.daily_max}
        return {}


def _prop_ms(record: RemoteRecord, prop: str) -> int | None:
    value = parse_ts(record.properties.get(prop))
    return to_ms(value) if value else None


def _plural(name: str) -> str:
    return name if name.endswith("s") else name + "s"


def _token_request(client: httpx.Client, url: str, form: dict[str, str]) -> dict[str, Any]:
    """POST to a token endpoint; errors become AuthError without echoing any secret."""
    try:
        response = client.post(url, data=form, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        from crmsync.errors import RetriableError

        raise RetriableError(f"the token endpoint could not be reached: {type(exc).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or "access_token" not in body:
        reason = body.get("status") or body.get("error") or f"HTTP {response.status_code}"
        raise AuthError(
            f"HubSpot refused the token request: {reason}", hint="run `crmsync connect hubspot --oauth` again"
        )
    return {k: body[k] for k in ("access_token", "refresh_token", "expires_in") if k in body}
