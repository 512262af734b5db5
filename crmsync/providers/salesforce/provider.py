"""Salesforce (REST API, Bulk API 2.0): External ID upserts, exact SystemModstamp deltas, the daily allocation.

Facts this file relies on are in shared/reference/salesforce.md; the ones that shaped it:

* Contacts, Accounts and Opportunities are written with sObject Collections (≤ 200 records a
  request): those the store knows by Id are updated, the others upserted by crmsync's External ID
  field ``crmsync_key__c``, so a lost answer resent matches what the first send made;
* calls and follow-ups are Task creates carrying ``crmsync_outcome_id__c``, a unique External ID:
  Salesforce refuses a second Task with the same outcome (``DUPLICATE_VALUE``), and names the first;
* pulls read ``(SystemModstamp, Id)`` keyset pages by SOQL, stop a couple of minutes before now and
  re-read a short overlap; deletions come from ``getDeleted`` (15 days back); a first pull above
  ``bulk_threshold`` records is one Bulk API 2.0 query job whose id and locator are the checkpoint;
* the org-wide daily allocation binds (403 ``REQUEST_LIMIT_EXCEEDED``, no 429): every answer's
  ``Sforce-Limit-Info`` is read, and a push that would spend more than ``budget_share`` of what is
  left is refused before its first write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote as urlquote
from urllib.parse import urlsplit

import httpx

from crmsync.credentials import SecretStore
from crmsync.errors import ConfigError, FatalProviderError, RetriableError
from crmsync.http import Slots, UnconfirmedWrite
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
from crmsync.providers.salesforce import auth as sfauth
from crmsync.providers.salesforce import bulk, soql
from crmsync.providers.salesforce import records as rec
from crmsync.providers.salesforce.limits import COLLECTION_MAX, push_requests
from crmsync.providers.salesforce.policy import SalesforcePolicy, item_result
from crmsync.providers.usage import ApiUsage

log = logging.getLogger("crmsync.salesforce")

#: The pinned REST API version (Winter '25); ``api_version`` in config.yaml pins another.
API_VERSION = "62.0"
#: Above this many records a first pull is one Bulk API 2.0 query job (the docs' rule of thumb).
BULK_THRESHOLD = 2_000
SETTLE = timedelta(minutes=2)
OVERLAP = timedelta(seconds=60)
#: getDeleted reaches 15 days back; an older cursor means a full resync.
DELETED_REACH = timedelta(days=15)
#: How often the delete log is read: queryAll already brings deletions still in the recycle bin, so
#: the log (whole minutes, one request per object) is only asked for purged ones, hourly.
DELETED_EVERY = timedelta(hours=1)
#: Requests running at once: Salesforce allows 25 long-running (≥ 20 s) calls per org.
MAX_CONCURRENCY = 25
LOCK_RETRIES = 4
IDS_PER_QUERY = 200
#: Longest encoded SOQL a lookup sends in a GET (Salesforce refuses URIs above 16,384 characters).
QUERY_URL_CHARS = 12_000
FIELD_TYPES = {
    "string": "string",
    "textarea": "text",
    "email": "email",
    "phone": "phone",
    "url": "string",
    "picklist": "enumeration",
    "multipicklist": "enumeration",
    "combobox": "enumeration",
    "reference": "reference",
    "id": "string",
    "boolean": "bool",
    "int": "number",
    "double": "number",
    "currency": "number",
    "percent": "number",
    "date": "date",
    "datetime": "datetime",
}


class SalesforceProvider(Provider):
    name = "salesforce"
    label = "Salesforce"
    emulator = "crmsync.emulators.salesforce"  # no webhook_support: Change Data Capture needs gRPC streaming
    connect_options = frozenset({"oauth", "client_id", "no_browser", "jwt_key", "login_host", "user"})
    objects = ("contacts", "companies", "deals", "calls", "tasks")
    batch_size = COLLECTION_MAX
    default_concurrency = 8
    unique_markers = frozenset({"calls", "tasks"})
    default_base_url = sfauth.LOGIN_HOSTS["login"]
    policy_class = SalesforcePolicy

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        settings, options = ctx.settings, ctx.options
        self.version = str(options.get("api_version") or settings.get("api_version") or API_VERSION)
        self.instance = str(settings.get("instance_url") or _origin(ctx.base_url))
        self.settle = timedelta(seconds=_num(options, "lookback_seconds", SETTLE.total_seconds()))
        self.overlap = timedelta(seconds=_num(options, "overlap_seconds", OVERLAP.total_seconds()))
        self.bulk_threshold = int(_num(options, "bulk_threshold", BULK_THRESHOLD))
        self.deleted_every = DELETED_EVERY
        #: ``unknown_person: lead``: a person pushed without a company becomes a Lead, not a Contact.
        self.leads = str(options.get("unknown_person") or settings.get("unknown_person") or "contact") == "lead"
        self.share = float(options.get("budget_share") or 0.5)
        self._describe: dict[str, dict[str, Any]] = {}
        self._describing: dict[str, threading.Lock] = {}
        self._users: dict[str, str] | None = None
        self._lock = threading.Lock()
        if self.http.concurrency > MAX_CONCURRENCY:
            self.http.concurrency, self.http.semaphore = MAX_CONCURRENCY, Slots(MAX_CONCURRENCY)

    # -- requests --------------------------------------------------------------------------------
    @property
    def api(self) -> str:
        return f"{self.instance}/services/data/v{self.version}"

    def _raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = (
            path
            if path.startswith("http")
            else (self.instance + path if path.startswith("/services/") else self.api + path)
        )
        kwargs.setdefault("endpoint", path.split("?")[0])
        return self.http.request(method, url, **kwargs)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._raw(method, path, **kwargs)
        return response.json() if response.content else None

    def _query(self, q: str, *, all_rows: bool = False) -> Iterator[tuple[list[dict[str, Any]], int]]:
        """Pages of a SOQL query (``nextRecordsUrl`` followed), each with the query's totalSize."""
        doc = self._json("GET", "/queryAll" if all_rows else "/query", params={"q": q}, endpoint="/query")
        while True:
            yield list(doc.get("records") or []), int(doc.get("totalSize") or 0)
            nxt = doc.get("nextRecordsUrl")
            if doc.get("done", True) or not nxt:
                return
            doc = self._json("GET", str(nxt), endpoint="/query/{locator}")

    def _rows(self, q: str) -> list[dict[str, Any]]:
        return [row for rows, _ in self._query(q) for row in rows]

    # -- connection ------------------------------------------------------------------------------
    @classmethod
    def make_auth(cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any) -> Any:
        return sfauth.SalesforceSession(store=secrets, connection=connection, token_client=token_client)

    @classmethod
    def connect(cls, ctx: ConnectContext) -> ConnectResult:
        secret, tokens = sfauth.grant(ctx)
        ctx.secrets.set(ctx.name, secret)
        host, opts = secret["login_host"], ctx.options
        instance = str(tokens["instance_url"]).rstrip("/")
        org_id, user_id = sfauth.identity(str(tokens.get("id") or ""))
        version = str(opts.get("api_version") or API_VERSION)
        settings: dict[str, Any] = {
            "auth": secret["kind"],
            "login_host": host,
            "instance_url": instance,
            "api_version": version,
            "api_base_url": f"{instance}/services/data/v{version}",
            "org_id": org_id,
            "user_id": user_id,
        }
        auth = cls.make_auth(
            connection=ctx.name, settings=settings, secrets=ctx.secrets, token_client=ctx.token_client()
        )
        provider = cls(
            ProviderContext(
                connection=ctx.name,
                base_url=settings["api_base_url"],
                settings=settings,
                http=ctx.client(settings["api_base_url"], auth),
                secrets=ctx.secrets,
                options={"api_version": version},
            )
        )
        try:
            health = provider.check()
        finally:
            provider.close()
        settings.update({k: v for k, v in health.extra.items() if k in ("username", "user_email")})
        return ConnectResult(base_url=instance, account_id=org_id, settings=settings, health=health)

    def check_version(self) -> None:
        """The pinned version is one the org offers (``GET /services/data/``, no auth needed)."""
        response = self.http.request("GET", f"{self.instance}/services/data/", endpoint="/services/data/")
        offered = [str(v.get("version")) for v in response.json() if isinstance(v, dict)]
        if self.version not in offered:
            newest = max(offered, key=lambda v: float(v), default="none")
            raise ConfigError(
                f"Salesforce at {self.instance} does not offer API v{self.version} (newest: v{newest})",
                hint="set api_version in config.yaml to one the org offers",
            )

    def check(self) -> Health:
        self.check_version()
        user_id = self.ctx.settings.get("user_id")
        if user_id:
            me = self._json(
                "GET", f"/sobjects/User/{user_id}", params={"fields": "Username,Email"}, endpoint="/sobjects/User/{id}"
            )
        else:
            me = {}
            self._json("GET", "/limits")
        return Health(
            ok=True,
            account=self.ctx.settings.get("org_id"),
            detail=f"{me.get('Username', '?')} at {self.instance} (API v{self.version})",
            extra={"username": me.get("Username"), "user_email": me.get("Email"), "api_usage": self.api_usage()},
        )

    # -- schema ----------------------------------------------------------------------------------
    def describe(self, sobject: str) -> dict[str, Any]:
        """An sObject's describe, read once per run (threads asking together wait for the one request)."""
        with self._lock:
            gate = self._describing.setdefault(sobject, threading.Lock())
        with gate:
            if sobject not in self._describe:
                doc = self._json("GET", f"/sobjects/{sobject}/describe", endpoint="/sobjects/{obj}/describe")
                self._describe[sobject] = doc or {}
            return self._describe[sobject]

    def missing_fields(self, sobjects: Sequence[str] | None = None) -> list[str]:
        """``Obj.field`` for each External ID field crmsync needs that the org lacks (or has without External ID)."""
        needed = {**rec.NEEDED, **({"Lead": rec.KEY_FIELD} if self.leads else {})}
        wanted = [s for s in needed if sobjects is None or s in sobjects]
        docs = at_once(self.describe, wanted)
        out = []
        for sobject, doc in zip(wanted, docs, strict=True):
            field = needed[sobject]
            found = next((f for f in doc.get("fields") or [] if f.get("name") == field), None)
            if found is None or not found.get("externalId"):
                out.append(f"{sobject}.{field}")
        return out

    def _require_fields(self, sobjects: Sequence[str] | None = None) -> None:
        missing = self.missing_fields(sobjects)
        if missing:
            raise ConfigError(
                f"Salesforce lacks the External ID fields crmsync needs: {', '.join(missing)} (each {rec.FIELD_SPEC})",
                hint="an admin creates them in Setup > Object Manager (Task fields under Activity), "
                "with field-level security for the connected user",
            )

    def fields(self, obj: str) -> list[FieldInfo]:
        self._require_fields()
        out = []
        for f in self.describe(rec.SOBJECT[obj]).get("fields") or []:
            options = [str(p.get("value")) for p in f.get("picklistValues") or [] if p.get("active", True)] or None
            createable, updateable = bool(f.get("createable")), bool(f.get("updateable"))
            out.append(
                FieldInfo(
                    name=str(f["name"]),
                    label=str(f.get("label") or ""),
                    type=FIELD_TYPES.get(str(f.get("type")), "string"),
                    required=createable and not f.get("nillable", True) and not f.get("defaultedOnCreate"),
                    read_only=not (createable or updateable),
                    unique=bool(f.get("unique") or f.get("externalId")),
                    custom=bool(f.get("custom")),
                    options=options if f.get("type") in ("picklist", "multipicklist") else None,
                    max_length=int(f["length"]) if f.get("length") else None,
                )
            )
        return out

    def managed_fields(self, obj: str) -> set[str]:
        return {
            rec.KEY_FIELD,
            rec.MARKER_FIELD,
            "AccountId",
            "WhoId",
            "WhatId",
            "TaskSubtype",
            "Status",
            "StageName",
            "CloseDate",
            "LastName",
            "Name",
        }

    def prepare_objects(self, objects: Sequence[str]) -> None:
        # Every missing field at once (four cached describes), so an admin creates them in one go.
        self._require_fields()

    def prepare_push(self) -> None:
        self._require_fields()

    # -- pull ------------------------------------------------------------------------------------
    def _fields(self, sobject: str, fields: Sequence[str]) -> list[str]:
        return list(dict.fromkeys([*fields, *rec.LINK_FIELDS.get(sobject, [])]))

    def _record(self, sobject: str, raw: dict[str, Any]) -> RemoteRecord:
        props = rec.clean(raw)
        return RemoteRecord(
            id=str(props["Id"]),
            properties=props,
            updated_at=rec.parse_time(props.get("SystemModstamp")),
            associations=rec.links(sobject, props),
        )

    def changes(
        self,
        obj: str,
        cursor: dict[str, Any] | None,
        *,
        fields: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Page]:
        """Rows changed after the cursor's ``(SystemModstamp, Id)`` up to ``now - settle``, then deletions.

        The cursor is ``{"ts", "id", "del"}`` between runs; while a window is read it also holds
        ``until`` (and for a Bulk backfill ``bulk`` and ``locator``), so a killed run resumes on the
        page it stopped at.
        """
        sobject, where = rec.SOBJECT[obj], rec.TASK_WHERE.get(obj, "")
        cols = self._fields(sobject, fields)
        state = dict(cursor or {})
        now = datetime.now(UTC).replace(microsecond=0)
        if "until" not in state:
            end = min(until or now, now - self.settle)
            prior = rec.parse_time(state.get("ts"))
            start = (prior - self.overlap) if prior else (since or datetime(1970, 1, 1, tzinfo=UTC))
            after = str(state.get("id") or "") if prior and not self.overlap else ""
            first = not cursor and since is None
            state = {"ts": soql.stamp(start), "id": after, "until": soql.stamp(end), "del": state.get("del")}
            if first:
                total = next(self._query(soql.count(sobject, until=state["until"], where=where)))[1]
                if total > self.bulk_threshold:
                    state["bulk"] = bulk.create_job(
                        self._raw, soql.window(sobject, cols, until=state["until"], where=where)
                    )
                    state["locator"] = None
        if state.get("bulk"):
            state = yield from self._bulk_pages(sobject, state, cols, where)
        else:
            # queryAll: a delete moves SystemModstamp, so the recycle bin's rows arrive in the same keyset walk.
            q = soql.delta(
                sobject, [*cols, "IsDeleted"], after=(state["ts"], state["id"]), until=state["until"], where=where
            )
            for rows, total in self._query(q, all_rows=True):
                if rows:
                    last = rec.clean(rows[-1])
                    stamp = rec.parse_time(last.get("SystemModstamp"))
                    state = {**state, "ts": soql.stamp(stamp) if stamp else state["ts"], "id": str(last["Id"])}
                live = [self._record(sobject, r) for r in rows if not r.get("IsDeleted")]
                gone = [str(r["Id"]) for r in rows if r.get("IsDeleted")]
                yield Page(live, dict(state), deleted=gone, total=total)
        yield self._deletions(sobject, state)

    def _bulk_pages(
        self, sobject: str, state: dict[str, Any], cols: list[str], where: str
    ) -> Generator[Page, None, dict[str, Any]]:
        """The Bulk job's result pages, each with the locator as its checkpoint; returns the window's
        end as the state the deletions page (and so the next pull) starts from."""
        job = str(state["bulk"])
        try:
            bulk.wait_for(self._raw, job)
        except FatalProviderError as exc:
            if exc.status != 404:
                raise
            # Finished jobs are purged after seven days: a run resumed later starts the window again.
            log.warning("salesforce %s: Bulk job %s is gone; starting a new one", sobject, job)
            job = bulk.create_job(self._raw, soql.window(sobject, cols, until=state["until"], where=where))
            state = {**state, "bulk": job, "locator": None}
            bulk.wait_for(self._raw, job)
        for rows, nxt in bulk.pages(self._raw, job, state.get("locator")):
            if nxt is None:
                state = {"ts": state["until"], "id": "", "until": state["until"], "del": state.get("del")}
            else:
                state = {**state, "locator": nxt}
            yield Page([self._record(sobject, r) for r in rows], dict(state))
        return state

    def _deletions(self, sobject: str, state: dict[str, Any]) -> Page:
        """The window's end as the cursor, with what ``getDeleted`` reports since the last run.

        queryAll already brought the deletions still in the recycle bin; the delete log also names
        records purged from it (emptied bins, hard deletes). It takes whole minutes and 15 days.
        """
        end = rec.parse_time(state["until"].replace("Z", "+00:00")) or datetime.now(UTC)
        start = rec.parse_time(state.get("del"))
        done = {"ts": state["ts"], "id": state["id"], "del": state.get("del") or soql.stamp(end)}
        if start is None or end - start < self.deleted_every:
            return Page([], done)  # a first run has nothing to delete; queryAll brought the recent ones
        if end - start > DELETED_REACH:
            log.warning("salesforce %s: the last pull is older than getDeleted's 15 days: full resync", sobject)
            return Page([], {"del": soql.stamp(end)})
        doc = (
            self._json(
                "GET",
                f"/sobjects/{sobject}/deleted/",
                params={"start": rec.sf_time(start), "end": rec.sf_time(end)},
                endpoint="/sobjects/{obj}/deleted/",
            )
            or {}
        )
        earliest = rec.parse_time(doc.get("earliestDateAvailable"))
        if earliest is not None and earliest > start:
            log.warning("salesforce %s: deletions before %s were purged: full resync", sobject, earliest)
            return Page([], {"del": soql.stamp(end)})
        covered = rec.parse_time(doc.get("latestDateCovered")) or end
        ids = [str(d["id"]) for d in doc.get("deletedRecords") or [] if d.get("id")]
        return Page([], {**done, "del": soql.stamp(min(covered, end))}, deleted=ids)

    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        sobject = rec.SOBJECT[obj]
        cols = self._fields(sobject, fields)
        out = []
        for chunk in chunks(list(dict.fromkeys(ids)), IDS_PER_QUERY):
            out += [self._record(sobject, r) for r in self._rows(soql.in_list(sobject, cols, "Id", chunk))]
        return out

    def list_ids(self, obj: str) -> Iterator[list[str]]:
        sobject, where = rec.SOBJECT[obj], rec.TASK_WHERE.get(obj)
        q = f"SELECT Id FROM {sobject}" + (f" WHERE {where}" if where else "") + " ORDER BY Id"
        for rows, _ in self._query(q):
            yield [str(r["Id"]) for r in rows]

    def read_associations(self, obj: str, ids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        """Opportunity→Contact links live on OpportunityContactRole, not on the Opportunity."""
        if obj != "deals" or not ids:
            return {}
        out: dict[str, dict[str, list[str]]] = {}
        for chunk in chunks(list(ids), IDS_PER_QUERY):
            q = soql.in_list("OpportunityContactRole", ["OpportunityId", "ContactId"], "OpportunityId", chunk)
            for row in self._rows(q.replace("SELECT Id, SystemModstamp, ", "SELECT Id, ")):
                out.setdefault(str(row["OpportunityId"]), {}).setdefault("contacts", []).append(str(row["ContactId"]))
        return out

    # -- push: lookups ---------------------------------------------------------------------------
    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        """One SOQL per batch: crmsync's key or the natural field (Email, Website) among the values.

        Under the Lead rule, people are looked for among Leads not yet converted too; a Contact wins.
        """
        found = self._lookup(rec.SOBJECT[obj], keys, fields)
        if obj == "contacts" and self.leads:
            for key, record in self._lookup("Lead", keys, fields).items():
                found.setdefault(key, record)
        return found

    def _lookup(self, sobject: str, keys: Sequence[dict[str, str]], fields: Sequence[str]) -> dict[str, RemoteRecord]:
        by_value: dict[str, list[str]] = {}
        natural: dict[str, set[str]] = {}
        keyed: set[str] = set()
        for k in keys:
            kind, value = next(iter(k.items()))
            if not value:
                continue
            by_value.setdefault(rec.key_value(k), []).append(match_key(k))
            column = rec.LOOKUP_FIELD.get((sobject, kind))
            if column:
                natural.setdefault(column, set()).add(str(value))
            if kind != "email":
                # An email is its own key and crmsync writes it to Email too (SOQL's = ignores case):
                # asking for it twice would only lengthen the URI. The upsert by key is the safety net.
                keyed.add(rec.key_value(k))
        if not by_value:
            return {}
        clauses = [f"{c} IN ({', '.join(soql.quote(v) for v in sorted(vs))})" for c, vs in natural.items()]
        if keyed:
            clauses.insert(0, f"{rec.KEY_FIELD} IN ({', '.join(soql.quote(v) for v in sorted(keyed))})")
        q = f"SELECT {soql.field_list(self._fields(sobject, fields))} FROM {sobject} WHERE {' OR '.join(clauses)}"
        if sobject == "Lead":
            q = q.replace(" WHERE ", " WHERE IsConverted = false AND (", 1) + ")"
        if len(urlquote(q)) > QUERY_URL_CHARS and len(keys) > 1:
            # A GET's URI is limited: long keys (emails) take two smaller queries instead.
            half = len(keys) // 2
            first = self._lookup(sobject, keys[:half], fields)
            for key, record in self._lookup(sobject, keys[half:], fields).items():
                first.setdefault(key, record)
            return first
        out: dict[str, RemoteRecord] = {}
        rows = sorted(self._rows(q), key=lambda r: str(r.get("Id")))  # ties go to the oldest id
        for row in rows:
            record = self._record(sobject, row)
            candidates = {str(row.get(rec.KEY_FIELD) or "")}
            for (s, kind), column in rec.LOOKUP_FIELD.items():
                if s == sobject and row.get(column):
                    value = str(row[column])
                    candidates.add(value.lower() if kind == "email" else value)
            for value in candidates:
                for key in by_value.get(value, []):
                    out.setdefault(key, record)
        return out

    # -- push: records ---------------------------------------------------------------------------
    def upsert(self, obj: str, items: Sequence[Outgoing]) -> list[ItemResult]:
        """Known records by Id (Collections update), the others by External ID (Collections upsert)."""
        groups: dict[tuple[str, str], list[Outgoing]] = {}
        for item in items:
            sobject = self._sobject_for(obj, item)
            groups.setdefault((sobject, "update" if item.remote_id else "upsert"), []).append(item)
        jobs = [(s, mode, part) for (s, mode), group in groups.items() for part in chunks(group, COLLECTION_MAX)]
        results: dict[str, ItemResult] = {}
        for part in at_once(lambda job: self._write(*job), jobs):
            results.update({r.ref: r for r in part})
        return [results[i.ref] for i in items]

    def _sobject_for(self, obj: str, item: Outgoing) -> str:
        """Contact, or Lead for a person with no company under the ``unknown_person: lead`` rule."""
        if obj != "contacts":
            return rec.SOBJECT[obj]
        if item.remote_id:
            return "Lead" if str(item.remote_id).startswith(rec.LEAD_PREFIX) else "Contact"
        return "Lead" if self.leads and not item.associations.get("companies") else "Contact"

    def _write(self, sobject: str, mode: str, items: list[Outgoing]) -> list[ItemResult]:
        def body(item: Outgoing) -> dict[str, Any]:
            props = (
                {**item.properties, rec.KEY_FIELD: rec.key_value(item.match)} if item.match else dict(item.properties)
            )
            doc = rec.record_body(sobject, props, item.associations, create=mode == "upsert")
            if mode == "update":
                return {"attributes": {"type": sobject}, "id": item.remote_id, **doc}
            return {"attributes": {"type": sobject}, **doc}

        path = "/composite/sobjects" if mode == "update" else f"/composite/sobjects/{sobject}/{rec.KEY_FIELD}"
        return self._collection("PATCH", path, items, body, created_default=False)

    def _collection(
        self, method: str, path: str, items: Sequence[Any], body: Any, *, created_default: bool
    ) -> list[ItemResult]:
        """One Collections request (≤ 200), its per-record answers as results; locked rows sent again."""
        results: dict[str, ItemResult] = {}
        todo = list(items)
        for attempt in range(LOCK_RETRIES + 1):
            try:
                answers = self._json(method, path, json={"allOrNone": False, "records": [body(i) for i in todo]})
            except UnconfirmedWrite as exc:
                for item in todo:
                    results[item.ref] = ItemResult(item.ref, False, error=str(exc), retriable=True, unconfirmed=True)
                break
            except FatalProviderError as exc:
                for item in todo:
                    results[item.ref] = ItemResult(item.ref, False, error=str(exc), retriable=False)
                break
            locked = []
            for item, answer in zip(todo, answers or [], strict=False):
                result = item_result(item.ref, answer, created_default)
                if not result.ok and result.retriable and attempt < LOCK_RETRIES:
                    locked.append(item)
                else:
                    results[item.ref] = result
            if not locked:
                break
            todo = locked
            time.sleep(0.2 * 2**attempt)
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no answer for this record", retriable=True)
            for i in items
        ]

    # -- push: activities ------------------------------------------------------------------------
    def create_activities(self, obj: str, items: Sequence[OutgoingActivity]) -> list[ItemResult]:
        """Task creates in Collections of 200; a marker Salesforce already holds comes back ``exists``.

        The marker field is unique, so a create resent after a lost answer is refused, never doubled.
        """

        def body(item: OutgoingActivity) -> dict[str, Any]:
            return {
                "attributes": {"type": "Task"},
                **rec.task_body(obj, dict(item.properties), item.marker, item.associations),
            }

        parts = list(chunks(list(items), COLLECTION_MAX))
        out: list[ItemResult] = []
        for part in at_once(
            lambda p: self._collection("POST", "/composite/sobjects", p, body, created_default=True), parts
        ):
            out += part
        return out

    def find_activities(
        self, obj: str, markers: Sequence[str], *, context: Sequence[OutgoingActivity] = ()
    ) -> dict[str, str]:
        """One SOQL per 200 markers on the unique ``crmsync_outcome_id__c``."""
        found: dict[str, str] = {}
        for chunk in chunks(sorted(set(markers)), IDS_PER_QUERY):
            q = soql.in_list("Task", [rec.MARKER_FIELD], rec.MARKER_FIELD, chunk)
            for row in self._rows(q):
                found[str(row[rec.MARKER_FIELD])] = str(row["Id"])
        return found

    # -- owners ----------------------------------------------------------------------------------
    def resolve_owners(self, emails: Sequence[str]) -> dict[str, str]:
        with self._lock:
            users = self._users
        if users is None:
            users = {}
            for row in self._rows("SELECT Id, Email FROM User WHERE IsActive = true ORDER BY Id"):
                if row.get("Email"):
                    users.setdefault(str(row["Email"]).lower(), str(row["Id"]))
            with self._lock:
                self._users = users
        return {e.lower(): users[e.lower()] for e in emails if e and e.lower() in users}

    def default_owner(self) -> str | None:
        user = self.ctx.settings.get("user_id")
        return str(user) if user else None

    # -- limits ----------------------------------------------------------------------------------
    def _usage(self) -> dict[str, Any]:
        """The daily allocation as the last answer stated it: ``{used, limit, remaining, …}``; {} before any."""
        policy = self.http.policy
        return policy.usage.as_dict() if isinstance(policy, SalesforcePolicy) else {}

    def api_usage(self) -> ApiUsage | None:
        usage = self._usage()
        if "limit" not in usage:
            return None
        extra = {"per_app": usage["per_app"]} if "per_app" in usage else {}
        return ApiUsage(
            "requests",
            "24h",
            used=usage["used"],
            limit=usage["limit"],
            remaining=usage["remaining"],
            source="Sforce-Limit-Info",
            detail=extra,
        )

    def check_budget(self, needs: Mapping[str, int], *, spent_today: int = 0) -> None:
        """Refuse a push whose requests could pass ``budget_share`` of the allocation left today
        (Salesforce states what is left, so crmsync's own count is not needed)."""
        usage = self._usage()
        if not usage:
            self._json("GET", "/limits")  # any answer carries Sforce-Limit-Info
            usage = self._usage()
        if not usage:
            return
        wanted, allowed = push_requests(needs), int(usage["remaining"] * self.share)
        if wanted > allowed:
            raise RetriableError(
                f"this push may need up to {wanted:,} Salesforce API requests and may use {allowed:,} "
                f"({self.share:.0%} of the {usage['remaining']:,} left of the org's {usage['limit']:,} a day); "
                "nothing was sent",
                hint="push fewer outcomes at once, wait for the rolling 24 hours to free requests, "
                "or raise budget_share",
            )

    def quota(self) -> dict[str, Any]:
        return self._usage()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _num(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name)
    return default if value is None else float(value)
