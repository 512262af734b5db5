"""Zoho CRM (API v8): OAuth per data centre, COQL keyset delta pull, upsert-based push.

Facts this file relies on are in shared/reference/zoho.md; the ones that shaped it:

* every account lives in one data centre: the token response names its ``api_domain`` and all API
  calls go there (``settings["api_base_url"]``), the token calls to the ``accounts-server`` the
  authorisation redirect names; the header is ``Zoho-oauthtoken``, and token errors arrive as
  ``{"error": ...}`` with HTTP 200;
* pull reads with COQL on a ``(Modified_Time, id)`` keyset: 2,000 rows a call for 3 credits (list
  pages cost 1 credit per 200 and stop at 100,000 records), no offsets, and a record changed during
  the walk moves behind the cursor instead of shifting a page; Modified_Time has whole seconds, so
  thousands of records share one and the id breaks the tie; a large backlog is walked from both
  ends (descending from the run's upper bound) to halve the round trips; deletions come from
  ``/deleted``, asked for alongside the walk;
* writes take 100 records, answer per record in input order (201/200, 207, 400 when all failed) and
  run workflows unless ``trigger`` is ``[]``; upsert matches on ``duplicate_check_fields``;
* calls and tasks carry ``crmsync_outcome_id``, a unique custom field: a re-sent call is refused with
  ``DUPLICATE_DATA`` naming the existing record, which is the call we were looking for;
* 429 ``TOO_MANY_REQUESTS`` has no Retry-After: the concurrency kind clears quickly (our backoff),
  the 24-hour credit kind does not (give up).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from crmsync.credentials import SecretStore
from crmsync.errors import AuthError, ConfigError, FatalProviderError, UsageError
from crmsync.http import RateLimit, ResponsePolicy, UnconfirmedWrite, deferring
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
    run_ahead,
    walk_both_ends,
)

log = logging.getLogger("crmsync.zoho")

#: Data centre -> accounts server (reference §1; Canada's is zohocloud.ca, not zoho.ca).
ACCOUNTS: dict[str, str] = {
    "us": "https://accounts.zoho.com",
    "eu": "https://accounts.zoho.eu",
    "in": "https://accounts.zoho.in",
    "au": "https://accounts.zoho.com.au",
    "jp": "https://accounts.zoho.jp",
    "ca": "https://accounts.zohocloud.ca",
    "sa": "https://accounts.zoho.sa",
    "cn": "https://accounts.zoho.com.cn",
    "uk": "https://accounts.zoho.uk",
}
API_PATH = "/crm/v8"
MODULES = {"contacts": "Contacts", "companies": "Accounts", "deals": "Deals", "calls": "Calls", "tasks": "Tasks"}
SE_MODULE_OBJECT = {"Accounts": "companies", "Deals": "deals", "Contacts": "contacts"}
#: Lookup fields read for associations: (field, object it points at; None = What_Id with $se_module).
LINKS: dict[str, list[tuple[str, str | None]]] = {
    "contacts": [("Account_Name", "companies")],
    "deals": [("Account_Name", "companies"), ("Contact_Name", "contacts")],
    "calls": [("Who_Id", "contacts"), ("What_Id", None)],
    "tasks": [("Who_Id", "contacts"), ("What_Id", None)],
}
LINK_TARGETS = {
    "contacts": ["companies"],
    "deals": ["companies", "contacts"],
    "calls": ["contacts", "deals", "companies"],
    "tasks": ["contacts", "deals", "companies"],
}
MARKER = "crmsync_outcome_id"
DEAL_KEY = "crmsync_deal_key"
BATCH = 100
COQL_ROWS = 2000
COQL_COLUMNS = 50
COQL_IN = 50  # values per IN (...)
COQL_CRITERIA = 25
RETRIABLE_ITEM_CODES = frozenset({"INTERNAL_ERROR", "RECORD_LOCKED", "TOO_MANY_REQUESTS"})
_Key = tuple[datetime, int]  # where a record sits in a walk: (Modified_Time, id)
_Low = tuple[datetime, int | str | None]  # a walk's lower end: a key, or a time with no id yet
PHONE_SEARCHES = 20  # search calls per lookup batch for phones COQL could not match exactly
CHANNEL_TTL = timedelta(days=7) - timedelta(hours=1)  # Zoho: at most a week, else one hour
CHANNEL_TOKEN_MAX = 50
DEFAULT_SCOPES = ",".join(
    [
        "ZohoCRM.modules.ALL",
        "ZohoCRM.settings.fields.READ",
        "ZohoCRM.settings.modules.READ",
        "ZohoCRM.coql.READ",
        "ZohoCRM.notifications.ALL",
        "ZohoCRM.org.READ",
        "ZohoCRM.users.READ",
    ]
)
#: What a sync needs: (name shown when missing, scopes that grant it, any one suffices).
REQUIRED_SCOPES: list[tuple[str, tuple[str, ...]]] = [
    *(
        (f"ZohoCRM.modules.{module}.{op}", ("ZohoCRM.modules.ALL", f"ZohoCRM.modules.{op}",
                                            f"ZohoCRM.modules.{module}.ALL", f"ZohoCRM.modules.{module}.{op}"))
        for module in ("Contacts", "Accounts", "Deals", "Calls")
        for op in ("READ", "CREATE", "UPDATE")
    ),
    ("ZohoCRM.coql.READ", ("ZohoCRM.coql.READ", "ZohoCRM.coql.ALL")),
    ("ZohoCRM.settings.fields.READ", ("ZohoCRM.settings.fields.READ", "ZohoCRM.settings.fields.ALL",
                                      "ZohoCRM.settings.ALL", "ZohoCRM.settings.READ")),
]  # fmt: skip


# -- time and COQL text ------------------------------------------------------------------------------


def parse_ts(value: Any) -> datetime | None:
    """Zoho's ISO datetimes (with an offset) as aware UTC."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)


def zoho_time(dt: datetime) -> str:
    """An instant as Zoho wants it in queries and bodies: whole seconds with an offset (UTC here)."""
    return dt.astimezone(UTC).replace(microsecond=0).isoformat()


def quote(value: Any) -> str:
    """A COQL string literal."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _nest(op: str, conditions: Sequence[str]) -> str:
    """``A op (B op (C ...))``: COQL wants explicit brackets once a level has more than two criteria."""
    if len(conditions) == 1:
        return conditions[0]
    return f"({conditions[0]} {op} {_nest(op, conditions[1:])})"


def _in_groups(field: str, values: Sequence[str]) -> str:
    """``field in (...)`` in groups of 50 values, OR-ed together."""
    groups = [values[i : i + COQL_IN] for i in range(0, len(values), COQL_IN)]
    return _nest("or", [f"{field} in ({', '.join(quote(v) for v in g)})" for g in groups])


def domain_of(url: Any) -> str:
    """The bare domain a Website value holds (``https://www.acme.com/x`` -> ``acme.com``)."""
    text = re.sub(r"^[a-z]+://", "", str(url or "").strip().lower()).split("/")[0]
    return text.removeprefix("www.")


def _phone_key(value: Any) -> str:
    return re.sub(r"[^\d+]", "", str(value or ""))


# -- responses ---------------------------------------------------------------------------------------


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code in (204, 304) or not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _needed_scope(request: httpx.Request | None) -> str | None:
    """The scope a refused request needed, for the error message."""
    if request is None:
        return None
    path = request.url.path
    m = re.search(r"/crm/v\d+/(.+)$", path)
    rest = m.group(1) if m else path
    if rest.startswith("coql"):
        return "ZohoCRM.coql.READ (plus the module's READ)"
    if rest.startswith("settings/fields"):
        return "ZohoCRM.settings.fields.READ"
    if rest.startswith("actions/watch"):
        return "ZohoCRM.notifications.ALL"
    if rest.startswith("org"):
        return "ZohoCRM.org.READ"
    if rest.startswith("users"):
        return "ZohoCRM.users.READ"
    module = rest.split("/")[0]
    op = {"GET": "READ", "POST": "CREATE", "PUT": "UPDATE", "DELETE": "DELETE"}.get(request.method, "ALL")
    if rest.endswith("/upsert"):
        op = "CREATE and UPDATE"
    return f"ZohoCRM.modules.{module}.{op} (or ZohoCRM.modules.ALL)"


class ZohoPolicy(ResponsePolicy):
    """Zoho's error envelope: ``INVALID_TOKEN`` refreshes, 500 retries, the daily-credit 429 gives up."""

    def is_auth_expired(self, response: httpx.Response) -> bool:
        # Zoho has been seen answering an expired token with AUTHENTICATION_FAILURE too
        # (rikas/zoho_hub#34): one refresh-and-retry is cheap, a second failure is final.
        return response.status_code == 401 and _json(response).get("code") in (
            "INVALID_TOKEN",
            "AUTHENTICATION_FAILURE",
        )

    def is_retriable(self, response: httpx.Response) -> bool:
        return response.status_code in (429, 500, 502, 503, 504)

    def give_up(self, response: httpx.Response) -> bool:
        # The credit budget is a rolling 24 hours: no wait inside a run's deadline refills it.
        return response.status_code == 429 and "24 hour" in str(_json(response).get("message", ""))

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        body = _json(response)
        if not body:
            return response.text[:300], None
        code = body.get("code")
        message = str(body.get("message") or code or "")
        details: dict[str, Any] = found if isinstance(found := body.get("details"), dict) else {}
        if code == "OAUTH_SCOPE_MISMATCH":
            try:
                request: httpx.Request | None = response.request
            except RuntimeError:
                request = None
            needed = _needed_scope(request)
            message = f"{message}: the token lacks {needed}" if needed else message
        elif code == "NO_PERMISSION" and details.get("permissions"):
            message = f"{message}: the user's profile lacks {', '.join(map(str, details['permissions']))}"
        elif details:
            where = details.get("api_name") or details.get("param_name") or details.get("column_name")
            if where:
                message = f"{message} ({where})"
        if code:
            message = f"{code}: {message}" if not message.startswith(str(code)) else message
        return message[:500], code


# -- the provider ----------------------------------------------------------------------------------


class ZohoProvider(Provider):
    name = "zoho"
    label = "Zoho CRM"
    reference_shape = "object"  # a lookup field is written as {"id": "…"}
    connect_options = frozenset({"dc", "client_id", "grant_code", "scopes", "no_browser"})
    objects = ("contacts", "companies", "deals", "calls", "tasks")
    batch_size = BATCH
    #: Zoho counts credits per day and calls in flight, not calls per second.
    default_rate_limits = dict[str, RateLimit]()
    default_concurrency = 5
    unique_markers = frozenset({"calls", "tasks"})  # prepare_objects checks crmsync_outcome_id exists, unique
    webhook_support = "crmsync.providers.zoho.webhook:ZohoWebhooks"
    emulator = "crmsync.emulators.zoho"
    default_base_url = f"https://www.zohoapis.com{API_PATH}"
    policy_class = ZohoPolicy

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        self.lookback = timedelta(seconds=float(ctx.options.get("lookback_seconds") or 30.0))
        self.triggers: list[str] = ["workflow", "approval", "blueprint"] if ctx.options.get("trigger_workflows") else []
        self._meta: dict[str, dict[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._credits = 0
        #: The org's active users, listed once: email -> user id; and the connection's own user id.
        self._users: dict[str, str] | None = None
        self._me: list[str | None] = []
        self._users_lock = threading.Lock()

    # -- connection ------------------------------------------------------------------------------
    @classmethod
    def make_auth(cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any) -> Any:
        secret = secrets.require(connection)
        if not secret.get("refresh_token") and not secret.get("access_token"):
            raise AuthError(f"the secret of connection {connection!r} holds no Zoho tokens")
        accounts = (
            settings.get("accounts_url") or secret.get("accounts_url") or ACCOUNTS[str(settings.get("dc") or "us")]
        )
        from crmsync.oauth import refresh_session

        token_url = f"{str(accounts).rstrip('/')}/oauth/v2/token"
        return refresh_session(
            secrets=secrets,
            connection=connection,
            token_client=token_client,
            token_url=token_url,
            token_request=_token_request,
            scheme="Zoho-oauthtoken",
        )

    @classmethod
    def connect(cls, ctx: ConnectContext) -> ConnectResult:
        from crmsync import oauth

        opts = ctx.options
        dc = str(opts.get("dc") or "us").lower()
        if dc not in ACCOUNTS:
            raise UsageError(f"--dc {dc!r}: choose one of {', '.join(ACCOUNTS)}")
        given = ctx.given or {}
        client_id = str(opts.get("client_id") or given.get("client_id") or "")
        if not client_id:
            raise UsageError("Zoho needs --client-id (a client of api-console.zoho.com)")
        # For Zoho, --base-url names the accounts server (an emulator, a proxy); the API domain
        # always comes from the token response.
        accounts = opts.get("accounts_url") or ctx.base_url or given.get("accounts_url") or ACCOUNTS[dc]
        accounts = str(accounts).rstrip("/")
        scopes = ",".join(s for s in re.split(r"[\s,]+", str(opts.get("scopes") or DEFAULT_SCOPES)) if s)
        client_secret = ctx.io.secret("Zoho client secret").strip()
        if not client_secret:
            raise UsageError("no client secret was given")
        form = {"client_id": client_id, "client_secret": client_secret, "grant_type": "authorization_code"}
        token_server = accounts
        if given.get("refresh_token") and not opts.get("grant_code"):
            # The environment's secret already holds a grant: renew it rather than ask for another.
            form.update({"grant_type": "refresh_token", "refresh_token": str(given["refresh_token"])})
        elif opts.get("grant_code"):
            form["code"] = str(opts["grant_code"]).strip()
        else:
            grant = oauth.authorize(
                ctx.io,
                authorize_url=f"{accounts}/oauth/v2/auth",
                params={
                    "scope": scopes,
                    "client_id": client_id,
                    "response_type": "code",
                    "access_type": "offline",
                    "prompt": "consent",
                },
                no_browser=bool(opts.get("no_browser")),
            )
            token_server = _accounts_server(grant.params.get("accounts-server"), accounts)
            dc = str(grant.params.get("location") or dc).lower()
            form.update({"code": grant.code, "redirect_uri": grant.redirect_uri, "code_verifier": grant.code_verifier})
        tokens = _token_request(ctx.token_client(), f"{token_server}/oauth/v2/token", form)
        if form["grant_type"] == "refresh_token":
            tokens = {"refresh_token": form["refresh_token"], "scope": given.get("scope"), **tokens}
        if not tokens.get("refresh_token"):
            raise AuthError(
                "Zoho returned no refresh token", hint="authorise with access_type=offline and prompt=consent"
            )
        api_domain = str(tokens.get("api_domain") or "").rstrip("/")
        if urlsplit(api_domain).scheme not in ("http", "https") or not urlsplit(api_domain).netloc:
            raise AuthError("Zoho's token response named no usable api_domain")
        secret = {
            "kind": "oauth",
            "client_id": client_id,
            "client_secret": client_secret,
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
            "expires_at": time.time() + float(tokens.get("expires_in") or 3600),
            "scope": tokens.get("scope") or scopes,
        }
        ctx.secrets.set(ctx.name, secret)
        settings: dict[str, Any] = {
            "auth": "oauth",
            "dc": dc,
            "accounts_url": token_server,
            "api_domain": api_domain,
            "api_base_url": f"{api_domain}{API_PATH}",
        }
        auth = cls.make_auth(
            connection=ctx.name, settings=settings, secrets=ctx.secrets, token_client=ctx.token_client()
        )
        http = ctx.client(settings["api_base_url"], auth)
        provider = cls(
            ProviderContext(
                connection=ctx.name,
                base_url=settings["api_base_url"],
                settings=settings,
                http=http,
                secrets=ctx.secrets,
            )
        )
        try:
            health = provider.check()
        finally:
            provider.close()
        if health.missing_scopes:
            raise AuthError(
                "the Zoho token lacks scopes crmsync needs: " + ", ".join(health.missing_scopes),
                hint=f"connect again with --scopes {DEFAULT_SCOPES}",
            )
        settings["org_id"] = health.account
        return ConnectResult(
            base_url=settings["api_base_url"],
            account_id=health.account,
            scopes=health.scopes,
            settings=settings,
            health=health,
        )

    def check(self) -> Health:
        body = _json(self._get("/org", endpoint="/org"))
        org = (body.get("org") or [{}])[0]
        account = str(org.get("id")) if org.get("id") else None
        secret = self.ctx.secrets.get(self.ctx.connection) or {}
        granted = [s for s in re.split(r"[\s,]+", str(secret.get("scope") or "")) if s]
        if granted:
            have = {s.lower() for s in granted}
            missing = [name for name, any_of in REQUIRED_SCOPES if not have & {s.lower() for s in any_of}]
        else:
            # No scope list was recorded (a secret from the environment): probe with one query.
            r = self.http.request(
                "POST",
                "/coql",
                json={"select_query": "select id from Contacts where id is not null limit 1"},
                endpoint="/coql",
                expect=(401, 403),
            )
            missing = ["ZohoCRM.coql.READ and ZohoCRM.modules.contacts.READ"] if r.status_code in (401, 403) else []
        expires_at = secret.get("expires_at")
        return Health(
            ok=not missing,
            account=account,
            scopes=granted,
            missing_scopes=missing,
            token_expires_at=datetime.fromtimestamp(float(expires_at), tz=UTC) if expires_at else None,
            detail=f"org {account} ({org.get('company_name', '')}), data centre {self.ctx.settings.get('dc', 'us')}",
            extra={"api_domain": self.ctx.settings.get("api_domain"), "time_zone": org.get("time_zone")},
        )

    # -- requests ------------------------------------------------------------------------------
    def _spend(self, credits: int) -> None:
        with self._lock:
            self._credits += credits

    def _get(self, path: str, *, endpoint: str, **kwargs: Any) -> httpx.Response:
        self._spend(1)
        return self.http.get(path, endpoint=endpoint, **kwargs)

    def _coql(self, query: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """One COQL call: (rows, more_records); 204 is no rows."""
        self._spend(1 if limit <= 200 else 2 if limit <= 1000 else 3)
        body = _json(self.http.post("/coql", json={"select_query": query}, endpoint="/coql"))
        return list(body.get("data") or []), bool((body.get("info") or {}).get("more_records"))

    # -- schema ----------------------------------------------------------------------------------
    def _fields_meta(self, obj: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            cached = self._meta.get(obj)
        if cached is not None:
            return cached
        body = _json(self._get("/settings/fields", params={"module": MODULES[obj]}, endpoint="/settings/fields"))
        meta = {f["api_name"]: f for f in body.get("fields", []) if f.get("api_name")}
        with self._lock:
            self._meta[obj] = meta
        return meta

    def fields(self, obj: str) -> list[FieldInfo]:
        out = []
        for f in self._fields_meta(obj).values():
            dt = str(f.get("data_type", ""))
            kind = {
                "text": "string",
                "textarea": "text",
                "website": "string",
                "email": "email",
                "phone": "phone",
                "picklist": "enumeration",
                "multiselectpicklist": "enumeration",
                "boolean": "bool",
                "date": "date",
                "datetime": "datetime",
                "lookup": "reference",
                "ownerlookup": "reference",
                "multimodulelookup": "reference",
                "userlookup": "reference",
            }.get(dt, "number" if dt in ("integer", "bigint", "double", "currency", "decimal", "percent") else "string")
            options = [str(p.get("actual_value")) for p in f.get("pick_list_values") or [] if p.get("type") != "unused"]
            out.append(
                FieldInfo(
                    name=f["api_name"],
                    label=str(f.get("field_label") or f.get("display_label") or ""),
                    type=kind,
                    required=bool(f.get("system_mandatory")),
                    read_only=bool(f.get("read_only") or f.get("field_read_only")),
                    unique=bool(f.get("unique")),
                    custom=bool(f.get("custom_field")),
                    options=options if kind == "enumeration" else None,
                    max_length=int(f["length"])
                    if kind in ("string", "text", "email", "phone") and f.get("length")
                    else None,
                )
            )
        return out

    def _has_field(self, obj: str, name: str) -> bool:
        return name in self._fields_meta(obj)

    def prepare_push(self) -> None:
        self.prepare_objects(["calls"])

    def prepare_objects(self, objects: Sequence[str]) -> None:
        """Check that the unique fields push relies on exist (creating them needs settings.fields.ALL)."""
        needs = {"calls": MARKER, "tasks": MARKER, "deals": DEAL_KEY}
        wanted = [(obj, needs[obj]) for obj in objects if obj in needs]
        present = at_once(lambda w: self._has_field(*w), wanted)  # one field-metadata read per module
        for (obj, name), ok in zip(wanted, present, strict=True):
            if not ok:
                raise ConfigError(
                    f"Zoho module {MODULES[obj]} has no field {name}: crmsync needs it to make writes idempotent",
                    hint=f"add a single-line custom field with API name {name}, 'Do not allow duplicate values' on "
                    f"(Setup > Customization > Modules and Fields > {MODULES[obj]})",
                )
            if name == MARKER and not (self._fields_meta(obj).get(name) or {}).get("unique"):
                # Duplicates allowed: push looks such activities up by marker before creating them.
                with self._lock:
                    self.unique_markers = self.unique_markers - {obj}

    # -- pull ------------------------------------------------------------------------------------
    def _columns(self, obj: str, fields: Sequence[str]) -> list[str]:
        """What to select: the mapping's fields, Modified_Time and the lookups behind associations."""
        wanted = [f for f in fields if f not in ("id", "$se_module")]
        return list(dict.fromkeys(["Modified_Time", *(f for f, _ in LINKS.get(obj, [])), *wanted]))

    def _record(self, obj: str, row: dict[str, Any]) -> RemoteRecord:
        if isinstance(row.get("Owner"), dict):
            row = {**row, "Owner": row["Owner"].get("id")}  # the user id, as push writes it
        assoc: dict[str, list[str]] = {t: [] for t in LINK_TARGETS.get(obj, [])}
        for field, target in LINKS.get(obj, []):
            value = row.get(field)
            rid = value.get("id") if isinstance(value, dict) else value
            if not rid:
                continue
            target = target or SE_MODULE_OBJECT.get(str(row.get("$se_module") or ""))
            if target:
                assoc.setdefault(target, []).append(str(rid))
        return RemoteRecord(
            id=str(row["id"]),
            properties=row,
            updated_at=parse_ts(row.get("Modified_Time")),
            associations={k: sorted(set(v)) for k, v in assoc.items()},
        )

    def _select(
        self, obj: str, columns: list[str], where: str, order: str, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """A COQL select of any width: the first 50 columns here, the rest joined by id."""
        module = MODULES[obj]
        head, tail = columns[:COQL_COLUMNS], columns[COQL_COLUMNS:]
        rows, more = self._coql(
            f"select {', '.join(head)} from {module} where {where} order by {order} limit {limit}", limit
        )
        for extra in chunks(tail, COQL_COLUMNS):
            by_id = {str(r["id"]): r for r in rows}
            per_query = COQL_IN * COQL_CRITERIA
            for ids in chunks(list(by_id), per_query):
                cond = _nest("or", [f"id in ({', '.join(g)})" for g in chunks(ids, COQL_IN)])
                part, _ = self._coql(
                    f"select {', '.join(extra)} from {module} where {cond} limit {COQL_ROWS}", COQL_ROWS
                )
                for r in part:
                    by_id.get(str(r["id"]), {}).update({k: v for k, v in r.items() if k != "id"})
        return rows, more

    def _scope(self, obj: str) -> list[str]:
        # Only the calls and tasks crmsync logged are pulled (an org's own call log is not ours).
        return [f"{MARKER} is not null"] if obj in ("calls", "tasks") else []

    def changes(
        self,
        obj: str,
        cursor: dict[str, Any] | None,
        *,
        fields: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Page]:
        if obj in ("calls", "tasks") and not self._has_field(obj, MARKER):
            return  # crmsync never logged one here: nothing of ours to pull
        upper = (until or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        state = dict(cursor or {})
        if not state:
            start = since.astimezone(UTC) if since else datetime(1970, 1, 1, tzinfo=UTC)
            # A first run reads every live record; deletions matter from the moment it starts.
            state = {"ts": zoho_time(start), "id": None, "deleted_ts": zoho_time(since or upper)}
            ts, last_id = start, None
        else:
            ts = parse_ts(state.get("ts")) or datetime(1970, 1, 1, tzinfo=UTC)
            last_id = state.get("id")
            # The cursor is exact, except near the last run's upper bound ("hi"): a write that
            # committed after that query can carry an earlier Modified_Time (whole seconds, a
            # write in flight, another clock). Re-read that short window; far behind it, thousands
            # of records sharing the cursor's second are not read again.
            hi = parse_ts(state.get("hi")) or ts
            if ts >= hi - self.lookback:
                ts, last_id = min(ts, hi - self.lookback), None
        state["hi"] = zoho_time(upper)
        deleted_ts = state.get("deleted_ts")
        columns = self._columns(obj, fields)

        def select(low: _Low, high: _Key | None, desc: bool) -> tuple[list[dict[str, Any]], bool]:
            """One page of the keys above ``low`` and below ``high`` (or up to ``upper``), from either end."""
            low_ts, low_id = quote(zoho_time(low[0])), low[1]
            keyset = [
                f"Modified_Time >= {low_ts}"
                if low_id is None
                else f"(Modified_Time > {low_ts} or (Modified_Time = {low_ts} and id > {int(low_id)}))",
                f"Modified_Time <= {quote(zoho_time(upper))}",
            ]
            if high is not None:
                high_ts = quote(zoho_time(high[0]))
                keyset.append(f"(Modified_Time < {high_ts} or (Modified_Time = {high_ts} and id < {high[1]}))")
            order = "Modified_Time desc, id desc" if desc else "Modified_Time asc, id asc"
            return self._select(obj, columns, _nest("and", [*keyset, *self._scope(obj)]), order, COQL_ROWS)

        def key(row: dict[str, Any]) -> _Key:
            return (parse_ts(row.get("Modified_Time")) or ts, int(row["id"]))

        def answers() -> Iterator[tuple[list[dict[str, Any]] | None, Any]]:
            """Pages of the walk, and the deletions (asked for alongside it) once they are known."""
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"coql-{obj}") as pool:
                # Asked for once two rounds are in (a page, then one from each end): the rounds where
                # every object's walk starts and widens take the slots first.
                gone: Future[tuple[list[str], str]] | None = None
                told = False
                for n, page in enumerate(walk_both_ends(select, key, (ts, last_id), pool), 1):
                    yield page
                    if gone is None:
                        if n >= 3:
                            gone = pool.submit(self._deletions, obj, deleted_ts, upper)
                    elif not told and gone.done():
                        told = True
                        yield None, gone.result()
                if not told:
                    yield None, (gone or pool.submit(self._deletions, obj, deleted_ts, upper)).result()

        # Each page's query needs the last row of the one before. A thread of the walk's own asks
        # for the next page as soon as that row is known; building this page's records and a busy
        # consumer happen elsewhere, so the chain of requests waits on nothing but the CRM.
        for rows, mark in run_ahead(answers(), 2, name=f"coql-{obj}"):
            if rows is None:
                ids, newest = mark
                state = {**state, "deleted_ts": newest}
                yield Page(records=[], cursor=dict(state), deleted=ids)
                continue
            if mark is not None:
                state = {**state, "ts": zoho_time(mark[0]), "id": str(mark[1])}
            yield Page(records=[self._record(obj, r) for r in rows], cursor=dict(state) if mark else None)

    def _deletions(self, obj: str, deleted_ts: str | None, upper: datetime) -> tuple[list[str], str]:
        """Records deleted since the last run (recycle bin and beyond): their ids and the new mark.

        Asked for alongside the walk, as a request that takes a slot only when no page waits for
        one. A page and the deletions are applied in the order they were answered, so a record
        restored or deleted while both were read ends as the later answer says (and a deletion
        answered a moment early is read again next run: the mark keeps a look-back).
        """
        known = parse_ts(deleted_ts) or upper
        since = known - self.lookback
        newest = known
        ids: list[str] = []
        page = 1
        with deferring():
            while True:
                self._spend(1)
                r = self.http.get(
                    f"/{MODULES[obj]}/deleted",
                    params={"type": "all", "page": page, "per_page": 200},
                    headers={"If-Modified-Since": zoho_time(since)},
                    endpoint="/{module}/deleted",
                    expect=(304,),
                )
                body = _json(r)
                for d in body.get("data") or []:
                    ids.append(str(d["id"]))
                    newest = max(newest, parse_ts(d.get("deleted_time")) or newest)
                if not (body.get("info") or {}).get("more_records"):
                    break
                page += 1
        return ids, zoho_time(min(newest, upper))

    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        columns = self._columns(obj, fields)
        out: dict[str, dict[str, Any]] = {}
        for chunk in chunks(list(dict.fromkeys(str(i) for i in ids)), BATCH):
            for cols in chunks(columns, COQL_COLUMNS):
                r = self._get(
                    f"/{MODULES[obj]}",
                    params={"ids": ",".join(chunk), "fields": ",".join(cols), "per_page": BATCH},
                    endpoint="/{module}",
                )
                for row in _json(r).get("data") or []:
                    out.setdefault(str(row["id"]), {}).update(row)
        return [self._record(obj, row) for row in out.values()]

    def list_ids(self, obj: str) -> Iterator[list[str]]:
        last: str | None = None
        while True:
            cond = [f"id > {int(last)}" if last else "id is not null", *self._scope(obj)]
            rows, more = self._coql(
                f"select id from {MODULES[obj]} where {_nest('and', cond)} order by id asc limit {COQL_ROWS}", COQL_ROWS
            )
            ids = [str(r["id"]) for r in rows]
            if ids:
                yield ids
            if not more or not ids:
                return
            last = ids[-1]

    # -- push ------------------------------------------------------------------------------------
    #: Canonical match kind -> the field it is looked up by, per object type.
    MATCH_FIELDS: dict[str, dict[str, str]] = {
        "contacts": {"email": "Email", "phone": "Phone"},
        "companies": {"name": "Account_Name", "domain": "Website"},
        "deals": {"key": DEAL_KEY},
    }

    @staticmethod
    def _normalise(kind: str, value: Any) -> str:
        if kind == "phone":
            return _phone_key(value)
        if kind == "domain":
            return domain_of(value)
        return str(value or "").strip().lower()

    def lookup_batch(self, obj: str, kind: str) -> int:
        # Exact keys go in 25 IN groups of 50 values: one COQL per 1,250 keys, not per 100 (a
        # 10,000-outcome push: 8 queries for its contacts, was 100). Domains need a LIKE each, and
        # phones may need a search call each: those stay at one write batch.
        return COQL_IN * COQL_CRITERIA if kind in ("email", "key") else self.batch_size

    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        found: dict[str, RemoteRecord] = {}
        by_kind: dict[str, list[str]] = {}
        for k in keys:
            kind, value = next(iter(k.items()))
            by_kind.setdefault(kind, []).append(value)
        for kind, values in by_kind.items():
            field = self.MATCH_FIELDS.get(obj, {}).get(kind)
            if field is None or (field == DEAL_KEY and not self._has_field(obj, DEAL_KEY)):
                continue
            wanted = set(values)
            columns = list(dict.fromkeys([*self._columns(obj, fields), field]))
            if kind == "domain":
                # Website holds a URL: match by substring, then compare the bare domains here.
                conds = [f"{field} like {quote('%' + v + '%')}" for v in dict.fromkeys(values)]
                queries: list[tuple[str, list[str]]] = [(_nest("or", c), []) for c in chunks(conds, COQL_CRITERIA)]
            else:
                per_query = COQL_IN * COQL_CRITERIA
                queries = [(_in_groups(field, c), c) for c in chunks(list(dict.fromkeys(values)), per_query)]
            while queries:
                where, asked = queries.pop()
                # Ordered by id, each key's oldest record comes first.
                rows, more = self._select(obj, columns, where, "id asc", COQL_ROWS)
                for row in rows:
                    value = self._normalise(kind, row.get(field))
                    if value in wanted:
                        found.setdefault(match_key({kind: value}), self._record(obj, row))
                missing = [v for v in asked if match_key({kind: v}) not in found]
                if more and missing:
                    # 2,000 rows and more (duplicates in the CRM): keys past the cut were not seen.
                    # Ask again for those: fewer each time (the rows seen matched some), so it ends.
                    queries.append((_in_groups(field, missing), missing))
            if kind == "phone":
                self._lookup_phones(obj, [v for v in dict.fromkeys(values) if f"phone:{v}" not in found], found)
        return found

    def _lookup_phones(self, obj: str, phones: Sequence[str], found: dict[str, RemoteRecord]) -> None:
        """Phones typed in Zoho's UI carry spaces and dashes, which COQL's ``in`` cannot see past:
        the search API's ``phone`` parameter matches across formats (one call per number, so capped)."""
        for phone in list(phones)[:PHONE_SEARCHES]:
            digits = re.sub(r"\D", "", phone)
            if len(digits) < 3:
                continue
            r = self._get(
                f"/{MODULES[obj]}/search", params={"phone": digits, "per_page": 10}, endpoint="/{module}/search"
            )
            for row in _json(r).get("data") or []:
                if any(re.sub(r"\D", "", str(row.get(f) or "")) == digits for f in ("Phone", "Mobile", "Home_Phone")):
                    found.setdefault(match_key({"phone": phone}), self._record(obj, row))
                    break

    def _insert_defaults(self, obj: str, item: Outgoing, props: dict[str, Any]) -> None:
        """What Zoho makes mandatory and an outcome may lack (Last_Name, Account_Name, Stage)."""
        kind, value = next(iter(item.match.items())) if item.match else ("", "")
        if obj == "contacts" and not props.get("Last_Name"):
            email = str(props.get("Email") or (value if kind == "email" else "") or "")
            props["Last_Name"] = (
                props.get("First_Name") or (email.split("@")[0] if email else "") or props.get("Phone") or "Unknown"
            )
        elif obj == "companies" and not props.get("Account_Name"):
            props["Account_Name"] = domain_of(props.get("Website")) or value or "Unknown"
        elif obj == "deals" and not props.get("Stage"):
            stage = (self._fields_meta("deals").get("Stage") or {}).get("pick_list_values") or []
            props["Stage"] = stage[0]["actual_value"] if stage else "Qualification"

    # -- owners ------------------------------------------------------------------------------------
    def _user_pages(self, kind: str) -> Iterator[dict[str, Any]]:
        """The users of one ``type`` (ActiveUsers, CurrentUser), 200 a page; 204 ends the list."""
        page = 1
        while True:
            response = self._get("/users", params={"type": kind, "page": page, "per_page": 200}, endpoint="/users")
            body = _json(response) if response.status_code != 204 else {}
            yield from body.get("users") or []
            if not (body.get("info") or {}).get("more_records"):
                return
            page += 1

    def resolve_owners(self, emails: Sequence[str]) -> dict[str, str]:
        """User ids (``Owner``) of the given emails, from one paged listing of the org's active users."""
        if not emails:
            return {}
        with self._users_lock:
            if self._users is None:
                users: dict[str, str] = {}
                try:
                    for user in self._user_pages("ActiveUsers"):
                        if user.get("email") and user.get("id"):
                            users.setdefault(str(user["email"]).lower(), str(user["id"]))
                except AuthError as exc:
                    raise AuthError(
                        f"Zoho refused to list users: {exc.message}",
                        hint=f"connect again with --scopes {DEFAULT_SCOPES} (ZohoCRM.users.READ)",
                    ) from exc
                self._users = users
        wanted = {e.strip().lower() for e in emails if e}
        return {e: self._users[e] for e in wanted if e in self._users}

    def default_owner(self) -> str | None:
        """The user id of the user who granted the connection's token."""
        with self._users_lock:
            if not self._me:
                try:
                    me = next(self._user_pages("CurrentUser"), None)
                except AuthError as exc:
                    # Without ZohoCRM.users.READ a push that names no rep goes ahead: Zoho makes you the owner.
                    log.warning("%s: records without a known rep keep Zoho's default owner", exc)
                    me = None
                self._me.append(str(me["id"]) if me and me.get("id") else None)
        return self._me[0]

    @staticmethod
    def _owned(props: dict[str, Any]) -> dict[str, Any]:
        """``Owner`` as Zoho takes it: the mapping gives the user id, Zoho wants ``{"id": ...}``."""
        owner = props.get("Owner")
        if owner is not None and not isinstance(owner, dict):
            return {**props, "Owner": {"id": str(owner)}}
        return props

    def _links(self, obj: str, associations: Mapping[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if obj in ("contacts", "deals") and associations.get("companies"):
            out["Account_Name"] = {"id": associations["companies"]}
        if obj == "deals" and associations.get("contacts"):
            out["Contact_Name"] = {"id": associations["contacts"]}
        if obj in ("calls", "tasks"):
            if associations.get("contacts"):
                out["Who_Id"] = {"id": associations["contacts"]}
            if associations.get("deals"):
                out.update({"What_Id": {"id": associations["deals"]}, "$se_module": "Deals"})
            elif associations.get("companies"):
                out.update({"What_Id": {"id": associations["companies"]}, "$se_module": "Accounts"})
        return out

    def _duplicate_fields(self, obj: str, item: Outgoing, props: dict[str, Any]) -> tuple[str, ...]:
        """Which fields upsert should match on; () means a plain insert (lookup found nothing)."""
        if obj == "contacts":
            if props.get("Email"):
                return ("Email",)
            phone = self._fields_meta("contacts").get("Phone") if props.get("Phone") else None
            # Zoho accepts only system or unique fields here; Phone is unique only if the org says so.
            return ("Phone",) if phone and phone.get("unique") else ()
        if obj == "companies" and props.get("Account_Name"):
            return ("Account_Name",)
        if obj == "deals" and props.get(DEAL_KEY):
            return (DEAL_KEY,)
        return ()

    def upsert(self, obj: str, items: Sequence[Outgoing]) -> list[ItemResult]:
        module = MODULES[obj]
        results: dict[str, ItemResult] = {}
        updates = [i for i in items if i.remote_id]
        if updates:
            data = [
                self._owned({"id": i.remote_id, **i.properties, **self._links(obj, i.associations)}) for i in updates
            ]
            results.update(self._write("PUT", f"/{module}", data, updates, created=False))
        groups: dict[tuple[str, ...], list[tuple[Outgoing, dict[str, Any]]]] = {}
        for item in (i for i in items if not i.remote_id):
            props = self._owned({**item.properties, **self._links(obj, item.associations)})
            if obj == "deals":
                name, value = next(iter(item.match.items())) if item.match else ("", "")
                props[DEAL_KEY] = item.match.get("key") or props.get(DEAL_KEY) or f"{name}:{value}"
            self._insert_defaults(obj, item, props)
            groups.setdefault(self._duplicate_fields(obj, item, props), []).append((item, props))
        for dup_fields, members in groups.items():
            batch = [m for m, _ in members]
            data = [p for _, p in members]
            if dup_fields:
                results.update(self._write("POST", f"/{module}/upsert", data, batch, dup_fields=list(dup_fields)))
            else:
                # No unique key guards a plain insert: a lost answer is looked up, not re-sent.
                results.update(self._write("POST", f"/{module}", data, batch, created=True, replay=False))
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no result from Zoho", retriable=True) for i in items
        ]

    def _write(
        self,
        method: str,
        path: str,
        data: list[dict[str, Any]],
        items: Sequence[Any],
        *,
        created: bool | None = None,
        dup_fields: list[str] | None = None,
        replay: bool = True,
    ) -> dict[str, ItemResult]:
        """One write of <= 100 records; results are matched to inputs by position.

        ``replay=False`` (inserts): a lost answer is not retried but reported as ``unconfirmed``.
        """
        body: dict[str, Any] = {"data": data, "trigger": list(self.triggers)}
        if dup_fields:
            body["duplicate_check_fields"] = dup_fields
        self._spend(max(1, math.ceil(len(data) / 10)))
        endpoint = re.sub(r"^/\w+", "/{module}", path)
        try:
            response = self.http.request(method, path, json=body, endpoint=endpoint, expect=(207, 400), replay=replay)
        except UnconfirmedWrite as exc:
            return {i.ref: ItemResult(i.ref, False, error=str(exc), retriable=True, unconfirmed=True) for i in items}
        except FatalProviderError as exc:
            return {i.ref: ItemResult(i.ref, False, error=str(exc)) for i in items}
        payload = _json(response)
        answers = payload.get("data")
        if not isinstance(answers, list):
            message, _ = ZohoPolicy().error_message(response)
            return {i.ref: ItemResult(i.ref, False, error=message) for i in items}
        out: dict[str, ItemResult] = {}
        for item, raw in zip(items, answers, strict=False):
            out[item.ref] = self._item_result(item.ref, raw, created=created, may_exist=method == "POST")
        return out

    @staticmethod
    def _item_result(ref: str, raw: dict[str, Any], *, created: bool | None, may_exist: bool) -> ItemResult:
        details: dict[str, Any] = found if isinstance(found := raw.get("details"), dict) else {}
        if raw.get("status") == "success" and details.get("id"):
            is_new = raw.get("action") == "insert" if "action" in raw else bool(created)
            return ItemResult(ref, True, remote_id=str(details["id"]), created=is_new)
        code = str(raw.get("code") or "ERROR")
        duplicate = (details.get("duplicate_record") or {}).get("id")
        if code == "DUPLICATE_DATA" and duplicate and may_exist:
            # The unique key already exists: that record is the one this item stands for.
            return ItemResult(ref, True, remote_id=str(duplicate), created=False)
        where = details.get("api_name") or details.get("param_name")
        message = f"{code}: {raw.get('message', '')}" + (f" ({where})" if where else "")
        return ItemResult(ref, False, error=message, retriable=code in RETRIABLE_ITEM_CODES)

    def create_activities(self, obj: str, items: Sequence[OutgoingActivity]) -> list[ItemResult]:
        self.prepare_objects([obj])
        data = []
        for item in items:
            props = self._owned({**item.properties, MARKER: item.marker, **self._links(obj, item.associations)})
            if obj == "calls":
                props.setdefault("Subject", "Call")
                props.setdefault("Call_Type", "Outbound")  # the mapping's direction, when it has one
            else:
                props.setdefault("Subject", "Follow up")
            data.append(props)
        # Not replayed: a lost answer is looked up as ours; DUPLICATE_DATA met first time names the
        # call another store logged.
        results = self._write("POST", f"/{MODULES[obj]}", data, items, created=True, replay=False)
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no result from Zoho", retriable=True) for i in items
        ]

    def find_activities(
        self, obj: str, markers: Sequence[str], *, context: Sequence[OutgoingActivity] = ()
    ) -> dict[str, str]:
        if not self._has_field(obj, MARKER):
            return {}
        wanted = {m.lower(): m for m in dict.fromkeys(markers)}
        found: dict[str, str] = {}
        for chunk in chunks(list(wanted.values()), COQL_IN * COQL_CRITERIA):
            rows, _ = self._coql(
                f"select id, {MARKER} from {MODULES[obj]} where {_in_groups(MARKER, chunk)} limit {COQL_ROWS}",
                COQL_ROWS,
            )
            for row in rows:
                marker = wanted.get(str(row.get(MARKER) or "").lower())
                if marker:
                    found.setdefault(marker, str(row["id"]))
        return found

    def quota(self) -> dict[str, Any]:
        """Credits this provider spent (Zoho sends no credit headers; counted per the reference §4)."""
        return {"credits_used_estimate": self._credits}

    # -- notifications ---------------------------------------------------------------------------
    def subscribe(
        self,
        *,
        channel_id: str,
        notify_url: str,
        token: str,
        events: Sequence[str] | None = None,
        expiry: datetime | None = None,
    ) -> datetime:
        """Enable a notification channel (``POST /actions/watch``); returns when it expires."""
        if len(token) > CHANNEL_TOKEN_MAX:
            raise UsageError(f"a Zoho channel token holds at most {CHANNEL_TOKEN_MAX} characters")
        if not str(channel_id).isdigit():
            raise UsageError("a Zoho channel id is a number")
        events = list(events or [f"{MODULES[o]}.all" for o in ("contacts", "companies", "deals")])
        until = min(expiry or datetime.now(UTC) + CHANNEL_TTL, datetime.now(UTC) + CHANNEL_TTL)
        item = {
            "channel_id": str(channel_id),
            "events": events,
            "notify_url": notify_url,
            "token": token,
            "channel_expiry": zoho_time(until),
            "return_affected_field_values": False,
        }
        return self._watch("POST", item)

    def renew_if_needed(
        self, *, channel_id: str, within: timedelta = timedelta(days=1), now: datetime | None = None
    ) -> datetime | None:
        """Push the channel's expiry a week out when less than ``within`` is left; None if it is gone."""
        now = now or datetime.now(UTC)
        self._spend(1)
        r = self.http.get("/actions/watch", params={"channel_id": str(channel_id)}, endpoint="/actions/watch")
        channels = _json(r).get("watch") or []
        if not channels:
            return None
        expiry = min(parse_ts(c.get("channel_expiry")) or now for c in channels)
        if expiry - now > within:
            return expiry
        events = [e for c in channels for e in c.get("events") or []]
        return self._watch(
            "PATCH", {"channel_id": str(channel_id), "events": events, "channel_expiry": zoho_time(now + CHANNEL_TTL)}
        )

    def _watch(self, method: str, item: dict[str, Any]) -> datetime:
        self._spend(1)
        r = self.http.request(method, "/actions/watch", json={"watch": [item]}, endpoint="/actions/watch")
        results = _json(r).get("watch") or [{}]
        result = results[0]
        if result.get("status") != "success":
            raise FatalProviderError(f"zoho {method} /actions/watch: {result.get('code')}: {result.get('message')}")
        events = (result.get("details") or {}).get("events") or []
        expiries = [parse_ts(e.get("channel_expiry")) for e in events]
        return (
            min(e for e in expiries if e)
            if any(expiries)
            else parse_ts(item.get("channel_expiry")) or datetime.now(UTC)
        )


def _accounts_server(returned: str | None, configured: str) -> str:
    """The accounts server the redirect names: only a known Zoho one, or the one we were pointed at."""
    if not returned:
        return configured
    returned = returned.rstrip("/")
    if returned == configured or returned in ACCOUNTS.values():
        return returned
    raise AuthError(f"the authorisation redirect named an unknown accounts server: {returned}")


def _token_request(client: httpx.Client, url: str, form: dict[str, str]) -> dict[str, Any]:
    """POST to Zoho's token endpoint; errors (HTTP 200 with ``error``) become AuthError, no secrets echoed."""
    try:
        response = client.post(url, data=form, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        from crmsync.errors import RetriableError

        raise RetriableError(f"the Zoho accounts server could not be reached: {type(exc).__name__}") from None
    body = _json(response)
    if response.status_code != 200 or "access_token" not in body:
        reason = body.get("error") or f"HTTP {response.status_code}"
        hint = "run `crmsync connect zoho` again" + (
            " (a grant code works once and for minutes only)" if reason == "invalid_code" else ""
        )
        raise AuthError(f"Zoho refused the token request: {reason}", hint=hint)
    return {k: body[k] for k in ("access_token", "refresh_token", "expires_in", "api_domain", "scope") if k in body}
