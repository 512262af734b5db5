"""Microsoft Dynamics 365 Sales through the Dataverse Web API (v9.2): Entra ID tokens, ``$batch`` writes,
phone calls logged exactly once by an id of crmsync's choosing, change tracking for pulls.

Facts are in shared/reference/dynamics.md; the ones that shaped this file:

* a record may be created under a GUID the client picks (``PATCH /{set}(<id>)``), and
  ``If-None-Match: *`` makes that a create-only write (412 when the row exists): a call's
  ``activityid`` is ``uuid5`` of its outcome id, so a lost answer, a killed run or a new store can
  never log it twice, and no search is needed to know whether it was logged;
* ``statecode`` cannot be written on create: a call is created with every column, its parties and
  what it is about, and closed (state 1, status 2 "Made") in the same change set, so the two
  succeed or fail together;
* one ``$batch`` (≤ 1,000 operations) counts as one request against the service protection limits
  (6,000 requests per 5 minutes, 52 at once, 429 + ``Retry-After``), so writes go in batches with
  ``odata.continue-on-error``, one bad row never failing its neighbours;
* change tracking (``Prefer: odata.track-changes``) gives a delta link per table with deletions as
  ``$deletedEntity`` entries; a table without it is polled by ``modifiedon`` keyset.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from crmsync.credentials import SecretStore
from crmsync.errors import AuthError, ConfigError, FatalProviderError, RetriableError, UsageError
from crmsync.http import RateLimit, UnconfirmedWrite
from crmsync.oauth import authorize
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
from crmsync.providers.dynamics import auth as entra
from crmsync.providers.dynamics import batch, odata
from crmsync.providers.dynamics import records as rec
from crmsync.providers.dynamics.odata import API_PATH, HEADERS, DynamicsPolicy, derived_id
from crmsync.providers.usage import ApiUsage

log = logging.getLogger("crmsync.dynamics")

#: Rows per pull page (``odata.maxpagesize``; Dataverse's own maximum is 5,000).
PAGE = 1000
#: Dataverse's service protection limit on requests in flight per user.
MAX_CONCURRENT = 52
#: Ids per ``$filter`` lookup: the URL stays far below the 32 KB a GET may carry.
IDS_MAX = 50
FIELD_TYPES = {
    "String": "string",
    "Memo": "text",
    "Integer": "number",
    "BigInt": "number",
    "Decimal": "number",
    "Double": "number",
    "Money": "number",
    "Boolean": "bool",
    "DateTime": "datetime",
    "Picklist": "enumeration",
    "State": "enumeration",
    "Status": "enumeration",
    "Lookup": "reference",
    "Customer": "reference",
    "Owner": "reference",
    "Uniqueidentifier": "string",
}


class DynamicsProvider(Provider):
    name = "dynamics"
    label = "Microsoft Dynamics 365 Sales"
    emulator = "crmsync.emulators.dynamics"
    webhook_support = "crmsync.providers.dynamics.webhook:DynamicsWebhooks"
    connect_options = frozenset({"tenant", "client_id", "certificate", "oauth", "no_browser"})
    objects = ("contacts", "companies", "deals", "calls", "tasks")
    #: Records or activities per ``$batch`` (a call is two operations: create, close), far under the 1,000
    #: a batch holds, so one slow or lost batch leaves few calls in doubt.
    batch_size = 100
    # The service protection limit per user (6,000 requests per 300 s); 52 at once is the cap, and
    # the docs advise far fewer per web server.
    default_rate_limits = {"default": RateLimit(6000, 300.0)}
    default_concurrency = 8
    unique_markers = frozenset({"calls", "tasks"})
    policy_class = DynamicsPolicy

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        if self.http.concurrency >= MAX_CONCURRENT:
            raise ConfigError(
                f"concurrency {self.http.concurrency} would reach Dataverse's limit of {MAX_CONCURRENT} concurrent "
                "requests per user, which answers the excess with 429",
                hint="set concurrency below it in config.yaml (the default is 8)",
            )
        self._users: dict[str, str] | None = None
        self._meta: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.optimistic_creates: frozenset[str] = frozenset()  # type: ignore[misc]

    # -- requests --------------------------------------------------------------------------------
    def _req(self, method: str, path: str, *, headers: Mapping[str, str] | None = None, **kw: Any) -> httpx.Response:
        url = path if path.startswith("http") else f"{API_PATH}/{path}"
        endpoint = kw.pop("endpoint", None) or url.split("?")[0].split("(")[0]
        return self.http.request(method, url, headers={**HEADERS, **(headers or {})}, endpoint=endpoint, **kw)

    def _get(self, path: str, **kw: Any) -> dict[str, Any]:
        body = self._req("GET", path, **kw).json()
        return body if isinstance(body, dict) else {"value": body}

    def _walk(self, path: str, params: dict[str, Any] | None = None, **kw: Any) -> Iterator[list[dict[str, Any]]]:
        """Every page of a query, by ``@odata.nextLink`` followed verbatim."""
        headers = {"Prefer": odata.prefer(maxpagesize=PAGE, annotations=True)}
        url: str | None = path
        while url:
            body = self._get(url, params=params if url == path else None, headers=headers, **kw)
            yield list(body.get("value") or [])
            url = body.get("@odata.nextLink")

    def _batch(self, groups: list[batch.Group], *, replay: bool) -> list[list[batch.Answer]]:
        root = f"{self.ctx.base_url.rstrip('/')}{API_PATH}"
        content_type, body = batch.build(groups, root)
        response = self._req(
            "POST",
            "$batch",
            headers={"Content-Type": content_type, "Prefer": "odata.continue-on-error"},
            content=body,
            replay=replay,
        )
        answers = batch.parse(response)
        return answers + [[] for _ in range(len(groups) - len(answers))]

    # -- connection ------------------------------------------------------------------------------
    @classmethod
    def make_auth(cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any) -> Any:
        return entra.make_auth(
            connection=connection, secrets=secrets, token_client=token_client, base_url=str(settings["org_url"])
        )

    @classmethod
    def connect(cls, ctx: ConnectContext) -> ConnectResult:
        """Client credentials (secret by prompt/stdin, or ``--certificate``) or, with ``--oauth``, a person's
        authorisation code with PKCE on a loopback redirect; verified with ``WhoAmI``."""
        if not ctx.base_url:
            raise UsageError("--base-url is required: your environment's URL, e.g. https://contoso.crm4.dynamics.com")
        base_url = ctx.base_url.rstrip("/")
        if base_url.endswith(API_PATH):
            base_url = base_url[: -len(API_PATH)]
        tenant = str(ctx.options.get("tenant") or (ctx.given or {}).get("tenant") or "")
        client_id = str(ctx.options.get("client_id") or (ctx.given or {}).get("client_id") or "")
        if not client_id:
            raise UsageError("--client-id is required: the application (client) id of your Entra app registration")
        _, plain = entra.authority(tenant)
        http = entra.MsalHttp(ctx.token_client(), plain)
        secret: dict[str, Any] = {"tenant": tenant, "client_id": client_id}
        given = ctx.given or {}
        if given.get("kind") == "authorization_code" and given.get("refresh_token"):
            # A person's tokens given in the environment are renewed with the refresh token, not re-authorised.
            secret.update({k: v for k, v in given.items() if k in ("kind", "refresh_token", "access_token")})
            secret["expires_at"] = float(given.get("expires_at") or 0)
        elif ctx.options.get("oauth"):
            secret["kind"] = "authorization_code"
            scope = entra.scope_of(base_url, delegated=True)
            grant = authorize(
                ctx.io,
                authorize_url=entra.authorize_url(secret, http),
                params={"client_id": client_id, "response_type": "code", "scope": f"{scope} offline_access"},
                no_browser=bool(ctx.options.get("no_browser")),
            )
            tokens = entra.code_token(
                secret, http, scope, code=grant.code, redirect_uri=grant.redirect_uri, verifier=grant.code_verifier
            )
            if not tokens.get("refresh_token"):
                raise AuthError("Entra returned no refresh token: the app registration must allow offline_access")
            secret.update(
                access_token=tokens["access_token"],
                refresh_token=tokens["refresh_token"],
                expires_at=datetime.now(UTC).timestamp() + float(tokens.get("expires_in") or 3600),
            )
        elif ctx.options.get("certificate"):
            try:
                with open(str(ctx.options["certificate"]), encoding="utf-8") as fh:
                    pem = fh.read()
            except OSError as exc:
                raise UsageError(f"--certificate {ctx.options['certificate']}: {exc.strerror}") from None
            entra.certificate_credential(pem)  # refused here, before anything is stored
            secret.update(kind="certificate", certificate=pem)
        else:
            value = ctx.io.secret("Client secret of the Entra app registration").strip()
            if not value:
                raise UsageError("no client secret was given (or use --certificate FILE, or --oauth)")
            secret.update(kind="client_secret", client_secret=value)
        ctx.secrets.set(ctx.name, secret)
        settings: dict[str, Any] = {"org_url": base_url, "auth": secret["kind"]}
        auth = cls.make_auth(
            connection=ctx.name, settings=settings, secrets=ctx.secrets, token_client=ctx.token_client()
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
        return ConnectResult(base_url=base_url, account_id=health.account, settings=settings, health=health)

    def check(self) -> Health:
        me = self._get("WhoAmI")
        user = str(me.get("UserId") or "")
        detail = user
        if user:
            row = self._get(f"systemusers({user})", params={"$select": "fullname,internalemailaddress"})
            detail = f"{row.get('fullname') or '?'} <{row.get('internalemailaddress') or '?'}>"
        return Health(
            ok=True,
            account=str(me.get("OrganizationId") or "") or None,
            detail=detail,
            extra={"user_id": user, "business_unit_id": me.get("BusinessUnitId")},
        )

    def default_owner(self) -> str | None:
        return str(self.ctx.settings.get("user_id") or "") or None

    # -- schema ----------------------------------------------------------------------------------
    def _definition(self, obj: str) -> dict[str, Any]:
        """The table's keys, change tracking and crmsync's column, read once per run."""
        with self._lock:
            if obj in self._meta:
                return self._meta[obj]
        logical = rec.TABLES[obj].logical
        # One request: the table's flags with its keys and its columns' names expanded.
        doc = self._get(
            f"EntityDefinitions(LogicalName='{logical}')",
            params={
                "$select": "LogicalName,ChangeTrackingEnabled",
                "$expand": "Keys($select=KeyAttributes,EntityKeyIndexStatus),Attributes($select=LogicalName)",
            },
        )
        keys = [
            list(k.get("KeyAttributes") or [])
            for k in doc.get("Keys") or []
            if k.get("EntityKeyIndexStatus") == "Active"
        ]
        columns = {str(a.get("LogicalName")) for a in doc.get("Attributes") or []}
        meta = {"tracked": bool(doc.get("ChangeTrackingEnabled")), "keys": keys, "columns": columns}
        with self._lock:
            self._meta[obj] = meta
        return meta

    def fields(self, obj: str) -> list[FieldInfo]:
        logical = rec.TABLES[obj].logical
        base = f"EntityDefinitions(LogicalName='{logical}')/Attributes"
        attrs = (
            self._get(
                base,
                params={
                    "$select": "LogicalName,AttributeType,RequiredLevel,IsValidForCreate,IsValidForUpdate,"
                    "IsCustomAttribute,DisplayName"
                },
            ).get("value")
            or []
        )
        options: dict[str, list[str]] = {}
        for cast in ("PicklistAttributeMetadata", "StatusAttributeMetadata", "StateAttributeMetadata"):
            for a in (
                self._get(
                    f"{base}/Microsoft.Dynamics.CRM.{cast}", params={"$select": "LogicalName", "$expand": "OptionSet"}
                ).get("value")
                or []
            ):
                opts = (a.get("OptionSet") or {}).get("Options") or []
                options[str(a["LogicalName"])] = [str(o.get("Value")) for o in opts]
        out = []
        for a in attrs:
            name = str(a.get("LogicalName"))
            label = (((a.get("DisplayName") or {}).get("UserLocalizedLabel")) or {}).get("Label") or ""
            out.append(
                FieldInfo(
                    name=name,
                    label=str(label),
                    type=FIELD_TYPES.get(str(a.get("AttributeType")), "string"),
                    required=((a.get("RequiredLevel") or {}).get("Value")) in ("SystemRequired", "ApplicationRequired"),
                    read_only=not a.get("IsValidForCreate") and not a.get("IsValidForUpdate"),
                    custom=bool(a.get("IsCustomAttribute")),
                    options=options.get(name),
                )
            )
        pseudo = {"calls": ["duration_seconds", "direction", "disposition", "ownerid"]}.get(obj, ["ownerid"])
        out += [FieldInfo(name=n, label=n) for n in pseudo if n not in {f.name for f in out}]
        return out

    def managed_fields(self, obj: str) -> set[str]:
        return {"crmsync_outcomeid", "statecode", "statuscode", "regardingobjectid", "parentcustomerid", "customerid"}

    def prepare_objects(self, objects: Sequence[str]) -> None:
        """Read the tables' alternate keys and whether ``crmsync_outcomeid`` exists (nothing is created)."""
        wanted = [o for o in objects if o in rec.TABLES]
        at_once(self._definition, wanted)
        keyed = {o for o in wanted if o in ("contacts", "companies") and self._key_column(o)}
        self.optimistic_creates = frozenset(self.optimistic_creates | keyed)  # type: ignore[misc]

    def prepare_push(self) -> None:
        self.prepare_objects(("contacts", "companies", "deals", "calls", "tasks"))

    def _key_column(self, obj: str) -> str | None:
        """The match column an Active single-column alternate key is defined on, if any."""
        meta = self._meta.get(obj) or {}
        for (o, _), column in rec.MATCH_COLUMN.items():
            if o == obj and [column] in meta.get("keys", []):
                return column
        return None

    def _select(self, obj: str, fields: list[str]) -> list[str]:
        """``$select`` columns the table has (Dataverse refuses the whole query for one unknown column)."""
        columns = self._definition(obj)["columns"]

        def known(col: str) -> bool:
            return col in columns or (col.startswith("_") and col.endswith("_value") and col[1:-6] in columns)

        return [c for c in rec.select(obj, fields) if known(c)]

    # -- pull ------------------------------------------------------------------------------------
    def changes(
        self,
        obj: str,
        cursor: dict[str, Any] | None,
        *,
        fields: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Page]:
        """Change tracking where the table has it (cursor ``{"mode": "delta", "delta"|"next": url}``),
        else ``modifiedon`` keyset polling (cursor ``{"mode": "keyset", "since", "last_id"}``), which
        ``status`` shows as the cursor's mode."""
        if self._definition(obj)["tracked"]:
            yield from self._delta(obj, cursor, list(fields))
        else:
            yield from self._keyset(obj, cursor, list(fields), since, until)

    def _delta(self, obj: str, cursor: dict[str, Any] | None, fields: list[str]) -> Iterator[Page]:
        table = rec.TABLES[obj]
        state = cursor or {}
        url = state.get("next") or state.get("delta") if state.get("mode") == "delta" else None
        baseline = f"{table.entity_set}?$select={','.join(self._select(obj, fields))}"
        headers = {"Prefer": odata.prefer(maxpagesize=PAGE, track_changes=True, annotations=True)}
        if url is None:
            url = baseline
        while url:
            try:
                body = self._get(url, headers=headers)
            except (FatalProviderError, RetriableError) as exc:
                # Matched by its message: the status Dataverse answers it with is not documented.
                if odata.EXPIRED_DELTA not in str(exc).lower() or url == baseline:
                    raise
                log.warning(
                    "dynamics: the change-tracking token of %s has expired; reading the table again from the start "
                    "(rows deleted meanwhile are found by `pull --reconcile`)",
                    table.entity_set,
                )
                url = baseline
                continue
            rows = list(body.get("value") or [])
            live = [
                r
                for r in rows
                if "$deletedEntity" not in str(r.get("@odata.context", "")) and r.get("reason") != "deleted"
            ]
            gone = [str(r.get("id")).lower() for r in rows if r not in live and r.get("id")]
            nxt = body.get("@odata.nextLink")
            delta = body.get("@odata.deltaLink")
            page_cursor = (
                {"mode": "delta", "next": nxt} if nxt else {"mode": "delta", "delta": delta or state.get("delta")}
            )
            yield Page([rec.record(obj, r) for r in live], page_cursor, deleted=gone)
            url = nxt

    def _keyset(
        self, obj: str, cursor: dict[str, Any] | None, fields: list[str], since: datetime | None, until: datetime | None
    ) -> Iterator[Page]:
        table = rec.TABLES[obj]
        state = cursor or {}
        low = state.get("since") or (rec.utc_text(since) if since else None)
        after = state.get("last_id")
        cols = ",".join(self._select(obj, fields))
        headers = {"Prefer": odata.prefer(maxpagesize=PAGE, annotations=True)}
        while True:
            clauses = []
            if low:
                tie = f" or (modifiedon eq {low} and {table.key} gt {after})" if after else ""
                clauses.append(f"(modifiedon gt {low}{tie})" if after else f"modifiedon ge {low}")
            if until:
                clauses.append(f"modifiedon le {rec.utc_text(until)}")
            params = {"$select": cols, "$orderby": f"modifiedon asc,{table.key} asc"}
            if clauses:
                params["$filter"] = " and ".join(clauses)
            body = self._get(table.entity_set, params=params, headers=headers)
            rows = list(body.get("value") or [])
            if rows:
                low, after = rows[-1].get("modifiedon"), rows[-1].get(table.key)
            more = bool(body.get("@odata.nextLink"))
            # modifiedon has whole seconds: the next run reads the last second again (from its start, not
            # after the last id), so a row saved later in that second with a smaller id is not skipped.
            cursor = {"mode": "keyset", "since": low, "last_id": after if more else None}
            yield Page([rec.record(obj, r) for r in rows], cursor)
            if not more:
                return

    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        table = rec.TABLES[obj]
        cols = ",".join(self._select(obj, list(fields)))
        out = []
        for chunk in chunks(list(dict.fromkeys(ids)), IDS_MAX):
            params = {"$select": cols, "$filter": odata.any_of(table.key, chunk)}
            for rows in self._walk(table.entity_set, params):
                out += [rec.record(obj, r) for r in rows]
        return out

    def list_ids(self, obj: str) -> Iterator[list[str]]:
        table = rec.TABLES[obj]
        for rows in self._walk(table.entity_set, {"$select": table.key}):
            yield [str(r[table.key]).lower() for r in rows]

    # -- push: records ---------------------------------------------------------------------------
    def lookup_batch(self, obj: str, kind: str) -> int:
        return IDS_MAX

    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        """One ``$filter`` query per kind of key (``a eq 1 or a eq 2 …``); deals by their derived id."""
        table = rec.TABLES[obj]
        by_kind: dict[str, dict[str, str]] = {}
        for k in keys:
            kind, value = next(iter(k.items()))
            if value:
                by_kind.setdefault(kind, {})[str(value)] = match_key(k)
        out: dict[str, RemoteRecord] = {}
        cols = self._select(obj, list(fields))
        for kind, values in by_kind.items():
            if obj == "deals" and kind == "key":
                ids = {derived_id("deals", v): mk for v, mk in values.items()}
                for r in self.fetch(obj, list(ids), fields=fields):
                    out[ids[r.id]] = r
                continue
            column = rec.MATCH_COLUMN.get((obj, kind))
            if column is None:
                continue
            wanted = {v.lower(): mk for v, mk in values.items()}
            params = {
                "$select": ",".join(dict.fromkeys([*cols, column, "createdon"])),
                "$filter": odata.any_of(column, list(values)),
                "$orderby": "createdon asc",
            }
            for rows in self._walk(table.entity_set, params):
                for row in rows:
                    mk = wanted.get(str(row.get(column) or "").lower())
                    if mk is not None and mk not in out:  # ties go to the oldest record
                        out[mk] = rec.record(obj, row)
        return out

    def _new_id(self, obj: str, item: Outgoing) -> str:
        if obj == "deals" and item.match.get("key"):
            return derived_id("deals", item.match["key"])
        return derived_id(obj, match_key(item.match) if item.match else item.ref)

    def upsert(self, obj: str, items: Sequence[Outgoing]) -> list[ItemResult]:
        """One ``$batch``: updates with ``If-Match: *``; creates under an id derived from the match key
        (an upsert, so a lost answer sent again finds its own row), or by alternate key, create-only."""
        table = rec.TABLES[obj]
        key_column = self._key_column(obj)
        groups: list[batch.Group] = []
        ids: list[str | None] = []
        for item in items:
            payload = rec.body(obj, dict(item.properties), dict(item.associations))
            if item.remote_id:
                op = batch.Op("PATCH", f"{table.entity_set}({item.remote_id})", payload, {"If-Match": "*"})
                ids.append(item.remote_id)
            elif item.create_only and key_column:
                value = next(iter(item.match.values()), "")
                key = odata.key_path(table.entity_set, {key_column: value})
                op = batch.Op("PATCH", key, payload, {"If-None-Match": "*"})
                ids.append(None)
            else:
                rid = self._new_id(obj, item)
                op = batch.Op(
                    "PATCH",
                    f"{table.entity_set}({rid})?$select={table.key}",
                    payload,
                    {"Prefer": "return=representation"},
                )
                ids.append(rid)
            groups.append(op)
        try:
            answers = self._batch(groups, replay=True)
        except (RetriableError, FatalProviderError) as exc:
            retriable = isinstance(exc, RetriableError)
            return [ItemResult(i.ref, False, error=str(exc), retriable=retriable) for i in items]
        out = []
        for item, known, parts in zip(items, ids, answers, strict=True):
            answer = parts[0] if parts else None
            if answer is None:
                out.append(ItemResult(item.ref, False, error="no answer in the $batch", retriable=True))
            elif answer.ok:
                created = answer.status == 201 or (known is None)
                found = odata.GUID_RE.findall(answer.headers.get("odata-entityid", ""))
                remote = known or (found[-1].lower() if found else None)
                if isinstance(answer.body, dict) and answer.body.get(table.key):
                    remote = str(answer.body[table.key]).lower()
                out.append(ItemResult(item.ref, True, remote_id=remote, created=created and not item.remote_id))
            elif answer.status == 412 and item.create_only:
                out.append(ItemResult(item.ref, False, exists=True, error="the key exists"))
            else:
                out.append(_failed(item.ref, answer))
        return out

    # -- push: activities ------------------------------------------------------------------------
    def _marker_column(self, obj: str) -> bool:
        return "crmsync_outcomeid" in self._definition(obj)["columns"]

    def create_activities(self, obj: str, items: Sequence[OutgoingActivity]) -> list[ItemResult]:
        """One ``$batch``: per call a change set (create-only under the derived id, then close); tasks stay open."""
        table = rec.TABLES[obj]
        marker_column = self._marker_column(obj)
        me = self.default_owner()
        groups: list[batch.Group] = []
        for item in items:
            rid = derived_id(obj, item.marker)
            payload = rec.activity_body(
                obj, dict(item.properties), item.marker, dict(item.associations), me=me, marker_column=marker_column
            )
            create = batch.Op("PATCH", f"{table.entity_set}({rid})", payload, {"If-None-Match": "*"})
            if obj in rec.CLOSED:
                close = batch.Op("PATCH", f"{table.entity_set}({rid})", dict(rec.CLOSED[obj]), {"If-Match": "*"})
                groups.append([create, close] if obj == "calls" else create)
            else:
                groups.append(create)
        try:
            answers = self._batch(groups, replay=False)
        except UnconfirmedWrite as exc:
            return [ItemResult(i.ref, False, error=str(exc), retriable=True, unconfirmed=True) for i in items]
        except (RetriableError, FatalProviderError) as exc:
            return [ItemResult(i.ref, False, error=str(exc), retriable=isinstance(exc, RetriableError)) for i in items]
        out = []
        for item, parts in zip(items, answers, strict=True):
            rid = derived_id(obj, item.marker)
            if parts and all(a.ok for a in parts):
                out.append(ItemResult(item.ref, True, remote_id=rid, created=True))
            elif parts and parts[0].status == 412:
                out.append(ItemResult(item.ref, False, remote_id=rid, exists=True, error="already logged"))
            elif not parts:
                out.append(
                    ItemResult(item.ref, False, error="no answer in the $batch", retriable=True, unconfirmed=True)
                )
            else:
                out.append(_failed(item.ref, parts[-1]))
        return out

    def find_activities(
        self, obj: str, markers: Sequence[str], *, context: Sequence[OutgoingActivity] = ()
    ) -> dict[str, str]:
        """The derived ids read back in ``$filter`` queries; a call found open (its close lost) is closed here."""
        table = rec.TABLES[obj]
        ids = {derived_id(obj, m): m for m in markers}
        found: dict[str, str] = {}
        still_open: list[str] = []
        for chunk in chunks(list(ids), IDS_MAX):
            params = {"$select": "activityid,statecode", "$filter": odata.any_of("activityid", chunk)}
            for rows in self._walk(table.entity_set, params):
                for row in rows:
                    rid = str(row["activityid"]).lower()
                    if rid in ids:
                        found[ids[rid]] = rid
                        if obj == "calls" and row.get("statecode") == 0:
                            still_open.append(rid)
        if still_open:
            close = [
                batch.Op("PATCH", f"{table.entity_set}({rid})", dict(rec.CLOSED[obj]), {"If-Match": "*"})
                for rid in still_open
            ]
            for parts in self._batch(list(close), replay=True):
                if parts and not parts[0].ok:
                    raise RetriableError(f"dynamics: closing a logged phone call failed: {_error_text(parts[0])}")
        return found

    # -- owners ----------------------------------------------------------------------------------
    def resolve_owners(self, emails: Sequence[str]) -> dict[str, str]:
        wanted = sorted({e.strip().lower() for e in emails if e and e.strip()})
        with self._lock:
            known = dict(self._users or {})
        ask = [e for e in wanted if e not in known]
        for chunk in chunks(ask, IDS_MAX):
            params = {
                "$select": "systemuserid,internalemailaddress,isdisabled",
                "$filter": odata.any_of("internalemailaddress", chunk),
            }
            for rows in self._walk("systemusers", params):
                for row in rows:
                    email = str(row.get("internalemailaddress") or "").lower()
                    if email and not row.get("isdisabled"):
                        known.setdefault(email, str(row["systemuserid"]).lower())
        with self._lock:
            self._users = known
        return {e: known[e] for e in wanted if e in known}

    # -- housekeeping ----------------------------------------------------------------------------
    def quota(self) -> dict[str, Any]:
        policy = self.http.policy
        return policy.as_dict() if isinstance(policy, DynamicsPolicy) else {}

    def api_usage(self) -> ApiUsage | None:
        """The service protection window as the last answer stated it (Dataverse sends no daily entitlement)."""
        state = self.quota()
        if "burst_remaining" not in state:
            return None
        return ApiUsage(
            "requests",
            "5m",
            remaining=state["burst_remaining"],
            source="x-ms-ratelimit-burst-remaining-xrm-requests",
            detail=state,
        )


def _error_text(answer: batch.Answer) -> str:
    message, code = odata.error_of(answer.body)
    return f"HTTP {answer.status} {code}: {message}".replace("  ", " ")


def _failed(ref: str, answer: batch.Answer) -> ItemResult:
    retriable = answer.status in (429, 500, 502, 503, 504)
    return ItemResult(ref, False, error=_error_text(answer), retriable=retriable)
