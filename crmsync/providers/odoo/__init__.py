"""Odoo (16 to 19): JSON-RPC ``execute_kw`` or JSON-2, write_date windows, batched creates.

Facts this file relies on are in shared/reference/odoo.md; the ones that shaped it:

* two transports behind one ``_call(model, method, ids, **kwargs)``: JSON-2 (``/json/2``, bearer
  key, HTTP statuses) on 19 and later, JSON-RPC (``/jsonrpc``, the key in the body, errors as
  HTTP 200 bodies keyed on ``error.data.name``, never on ``error.code``) before;
* ``write_date`` is the *transaction start*, read back truncated to the second, sorted on hidden
  microseconds, and compared to whole seconds on 19 only. So pull never trusts a keyset on it:
  each run reads the window ``[previous hi - overlap, server time - settle)`` paged by ``id``,
  and the stored cursor says either "inside this window, after this id" or "the last window
  ended at hi". Re-reading the overlap is harmless (the store drops unchanged records);
* a call is a ``mail.activity`` of the Call type created in one ``create`` per batch and marked
  done with one ``action_done``; on 19 the done activity is archived (pull reads it), up to 18 it
  is deleted and only its chatter message remains (pull reads that). The idempotency marker lives
  in ``x_crmsync_outcome_id`` when the database has it, else as ``[crmsync:<marker>]`` in the note,
  which the "activity done" message copies;
* what a real 19 server answers is recorded in tests/recordings/odoo19: ``GET /web/version`` is
  ``{version_info, version}``, not common.version's ``{server_version_info, ...}``; a note is
  sanitised into HTML (so crmsync sends text as HTML and reads it back as text); an activity
  created without ``user_id`` belongs to nobody (so every one gets an owner: the rep's user from
  ``owner_email``, else the connection's); a JSON-2 call for a missing database is an HTML 404.
"""

from __future__ import annotations

import email.utils
import html
import itertools
import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from crmsync.credentials import SecretStore
from crmsync.errors import AuthError, ConfigError, FatalProviderError, RetriableError, UsageError
from crmsync.http import RETRIABLE_STATUS, ResponsePolicy, UnconfirmedWrite
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
    chunks,
    match_key,
    walk_both_ends,
)
from crmsync.redact import register_secret

log = logging.getLogger("crmsync.odoo")

PAGE = 200
BATCH = 200
LIST_PAGE = 5000
OVERLAP_SECONDS = 600.0
SETTLE_SECONDS = 5.0
MARKER_FIELD = "x_crmsync_outcome_id"
DEAL_KEY_FIELD = "x_crmsync_deal_key"
MARKER_RE = re.compile(r"\[crmsync:([^\]\s<]+)\]")
MARKER_HTML_RE = re.compile(r"\s*(?:<p>)?\[crmsync:[^\]\s<]+\](?:</p>)?")
DT_FORMAT = "%Y-%m-%d %H:%M:%S"
CALL_XMLID = "mail.mail_activity_data_call"
TASK_SUFFIX = ":task"  # the engine marks a follow-up task as "<outcome id>:task"
TODO_XMLID = "mail.mail_activity_data_todo"
LOOKUP_IN = 1000  # markers per search on the marker field
LOOKUP_ILIKE = 100  # markers per search on notes or message bodies (one OR-ed ilike each)
CONFIRM_ATTEMPTS = 4  # action_done sent again after lost answers, for the activities still open

#: The Odoo model behind each object type.
MODELS = {
    "contacts": "res.partner",
    "companies": "res.partner",
    "deals": "crm.lead",
    "calls": "mail.activity",
    "tasks": "mail.activity",
}
#: Pseudo-fields of the default mapping: not Odoo fields, translated here.
PSEUDO = frozenset({"stage_name", "activity_type_xmlid", "crmsync_marker"})
#: Odoo exceptions a later attempt may get past (a lock held by another transaction).
RETRIABLE_ERRORS = frozenset(
    {
        "odoo.exceptions.LockError",
        "psycopg2.errors.SerializationFailure",
        "psycopg2.errors.LockNotAvailable",
        "psycopg2.errors.DeadlockDetected",
        "odoo.exceptions.ConcurrencyError",
    }
)
EXPIRY_HINT = (
    "API keys of non-admin users expire after at most 90 days on Odoo 18 and 19: create a new one in "
    "Preferences > Account Security and run `crmsync connect odoo` again"
)


class OdooFault(FatalProviderError):
    """An exception Odoo raised, by its full name (``odoo.exceptions.ValidationError``)."""

    def __init__(self, kind: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"Odoo {kind.rsplit('.', 1)[-1]}: {message}", status=status, code=kind)
        self.kind = kind
        self.odoo_message = message

    @property
    def retriable(self) -> bool:
        return self.kind in RETRIABLE_ERRORS


class MissingDatabase(AuthError, ConfigError):
    """The connection's database is not on the server (renamed or dropped): nothing works until reconnected.

    An ``AuthError`` so that a run stops as a whole (exit 3) rather than per object, and a
    ``ConfigError`` because it is one.
    """


class _ItemError(Exception):
    """One outgoing item cannot be sent as it is (unknown stage, no record to attach to)."""


class OdooPolicy(ResponsePolicy):
    """JSON-2 statuses: 409 (LockError) is worth another try; an HTML 500 is the server, not us."""

    def is_auth_expired(self, response: httpx.Response) -> bool:
        # An API key cannot be refreshed: the provider turns a 401 into an AuthError that says why.
        return False

    def is_retriable(self, response: httpx.Response) -> bool:
        if response.status_code in RETRIABLE_STATUS or response.status_code == 409:
            return True
        return response.status_code == 500 and not _json_error(response)

    def may_have_written(self, response: httpx.Response) -> bool:
        # A JSON 500 is an Odoo exception: its transaction was rolled back, nothing was written.
        return response.status_code >= 500 and not _json_error(response)

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        body = _json_error(response)
        if body:
            return str(body.get("message") or "")[:500], str(body.get("name") or "") or None
        return response.text[:300], None


def _json_error(response: httpx.Response) -> dict[str, Any] | None:
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) and "name" in body else None


class _HeaderAuth:
    """Static headers: JSON-2's bearer key and database; nothing for JSON-RPC (the key is in the body)."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = dict(headers)

    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    def refresh(self, stale: Mapping[str, str]) -> bool:
        return False  # an API key cannot be refreshed: a 401 means a new key is needed


def _secret_value(secret: Mapping[str, Any]) -> str:
    return str(secret.get("api_key") or secret.get("password") or secret.get("token") or "")


def _fmt(value: datetime) -> str:
    return value.astimezone(UTC).strftime(DT_FORMAT) if value.tzinfo else value.strftime(DT_FORMAT)


def _parse(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value[:19], DT_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def _m2o_id(value: Any) -> int | None:
    if isinstance(value, list) and value:
        return int(value[0])
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _or(leaves: list[tuple[str, str, Any]]) -> list[Any]:
    """Polish-notation OR of leaves."""
    return [*(["|"] * (len(leaves) - 1)), *leaves] if leaves else []


def _host(url: Any) -> str:
    text = str(url or "").strip().lower()
    text = re.sub(r"^[a-z]+://", "", text)
    text = text.split("/")[0].split("?")[0]
    return text[4:] if text.startswith("www.") else text


def _digits(phone: Any) -> str:
    return re.sub(r"[^\d+]", "", str(phone or ""))


#: "Original note:" as its title in mail.message_activity_done: ``<strong>`` up to 18, ``fw-bold`` on 19.
_NOTE_TITLE_RE = re.compile(r"Original note:\s*(?:</strong>\s*)?</div>\s*<div[^>]*>(.*)", re.DOTALL)
#: Where the feedback block starts (it follows the note): its own ``<div>`` wrapper on 19.
_FEEDBACK_RE = re.compile(r'(?:<div>\s*)?<div class="[^"]*">\s*(?:<strong>\s*)?Feedback:', re.DOTALL)
#: The summary after "<type> done" (and "(originally assigned to ...)"): ``: <span>`` or ``<span>: </span><span>``.
_SUMMARY_RE = re.compile(
    r"</span>\s*done\b(?:\s*\([^)]*\))?\s*(?:<span>\s*:\s*</span>|:)\s*<span[^>]*>(.*?)</span>", re.DOTALL
)


def _done_note(body: str) -> str:
    """The original note inside an "activity done" message (mail.message_activity_done, 16 to 19)."""
    found = _NOTE_TITLE_RE.search(body)
    if not found:
        return ""
    rest = found.group(1)
    feedback = _FEEDBACK_RE.search(rest)
    if feedback:
        # The note's own <div> closes before the feedback block; the message wrapper after it.
        return re.sub(r"\s*</div>\s*$", "", rest[: feedback.start()])
    return re.sub(r"\s*</div>\s*</div>\s*$", "", rest)


def _done_summary(body: str) -> str | None:
    found = _SUMMARY_RE.search(body)
    return html.unescape(found.group(1)).strip() if found else None


def _note_html(text: str) -> str:
    """A plain-text note as the HTML Odoo keeps (it would sanitise raw text into ``<p>`` itself)."""
    if not text:
        return ""
    lines = [html.escape(line, quote=False) for line in text.split("\n")]
    return f"<p>{'<br>'.join(lines)}</p>"


def _html_text(value: str) -> str:
    """An Odoo html value back as plain text: paragraphs and ``<br>`` become line breaks."""
    text = re.sub(r"<br\s*/?>", "\n", value, flags=re.IGNORECASE)
    text = re.sub(r"</(?:p|div|li|h[1-6])>\s*<(?:p|div|ul|ol|li|h[1-6])[^>]*>", "\n", text, flags=re.IGNORECASE)
    text = re.sub(r"<[^>]+>", "", text)
    return html.unescape(text).strip()


def server_version(info: Mapping[str, Any]) -> tuple[int, str]:
    """(major, label) from either shape Odoo answers with.

    ``GET /web/version`` gives ``{version_info, version}``; ``common.version`` gives
    ``{server_version_info, server_version, ...}``. A SaaS major reads ``"saas~18"``.
    """
    parts = info.get("version_info") or info.get("server_version_info") or []
    label = str(info.get("version") or info.get("server_version") or "")
    head = str(parts[0]) if isinstance(parts, list) and parts else label
    found = re.search(r"\d+", head)
    return (int(found.group()) if found else 0), label


class OdooProvider(Provider):
    name = "odoo"
    label = "Odoo"
    reference_shape = "int"  # a many2one field is written as the integer id
    emulator = "crmsync.emulators.odoo"  # no webhook_support: Odoo sends no webhooks crmsync can receive
    connect_options = frozenset({"db", "user", "transport", "password"})
    objects = ("contacts", "companies", "deals", "calls")
    batch_size = BATCH
    default_rate_limits: dict[str, Any] = {}  # Odoo has none; its workers are the limit
    default_concurrency = 2
    default_base_url = ""
    policy_class = OdooPolicy

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.db: str = settings.get("db", "")
        self.login: str = settings.get("user", "")
        self.uid: int = int(settings.get("uid") or 0)
        self.transport: str = settings.get("transport", "jsonrpc")
        self.version: int = int(settings.get("version") or 0)
        self._key = _secret_value(ctx.secrets.require(ctx.connection))
        register_secret(self._key)
        options = ctx.options or {}
        self.overlap = float(options.get("overlap_seconds") or settings.get("overlap_seconds") or OVERLAP_SECONDS)
        self.settle = float(settings.get("settle_seconds", SETTLE_SECONDS))
        self.page_size = int(settings.get("page_size") or PAGE)
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._fields: dict[str, dict[str, dict[str, Any]] | None] = {}
        self._xmlids: dict[str, int] | None = None
        self._type_xmlids: dict[int, str] = {}
        self._model_ids: dict[str, int] = {}
        self._stages: dict[str, int] | None = None
        self._users: dict[str, int | None] = {}
        #: Owner emails with no Odoo user this run -> how many records fell back to the connection's user.
        self.owner_fallbacks: dict[str, int] = {}
        self._warned: set[str] = set()
        self._server_time: datetime | None = None

    # ================================================================================ transport
    def _note_date(self, response: httpx.Response) -> None:
        value = response.headers.get("Date")
        if value:
            try:
                self._server_time = email.utils.parsedate_to_datetime(value).astimezone(UTC)
            except (TypeError, ValueError):
                pass

    def _jsonrpc(self, service: str, method: str, args: list[Any], *, endpoint: str, replay: bool = True) -> Any:
        body = {
            "jsonrpc": "2.0",
            "method": "call",
            "id": next(self._ids),
            "params": {"service": service, "method": method, "args": args},
        }
        response = self.http.post("/jsonrpc", json=body, endpoint=endpoint, replay=replay)
        self._note_date(response)
        try:
            payload = response.json()
        except ValueError:
            raise FatalProviderError(f"Odoo answered {endpoint} with something that is not JSON-RPC") from None
        error = payload.get("error") if isinstance(payload, dict) else None
        if error:
            data = error.get("data") or {}
            raise self._fault(str(data.get("name") or error.get("message")), str(data.get("message") or ""), 200)
        return payload.get("result")

    def _fault(self, kind: str, message: str, status: int | None) -> Exception:
        """Sort an Odoo exception into crmsync's tree (per-item decisions stay with the caller)."""
        if kind == "odoo.exceptions.AccessDenied":
            hint = EXPIRY_HINT if self.version >= 18 else "check the login and API key, then connect again"
            return AuthError(f"Odoo refused the API key of {self.login!r} on database {self.db!r}", hint=hint)
        if kind.startswith("psycopg2.OperationalError") and "does not exist" in message:
            return self._missing_database()
        fault = OdooFault(kind, message, status=status)
        if fault.retriable:
            return RetriableError(str(fault), status=status, code=kind)
        return fault

    def _missing_database(self) -> MissingDatabase:
        return MissingDatabase(
            f"database {self.db!r} does not exist on the Odoo server at {self.ctx.base_url}",
            hint="check the database name and --base-url, then run `crmsync connect odoo` again with --db-name",
        )

    def _call(
        self, model: str, method: str, ids: Sequence[int] | None = None, *, replay: bool = True, **kwargs: Any
    ) -> Any:
        """Call a model method with named arguments (``ids`` for record methods) on either transport.

        ``replay=False`` for calls that would act twice if sent twice (``create``, ``action_done``):
        a lost answer raises ``UnconfirmedWrite`` instead of a retry.
        """
        endpoint = f"{model}.{method}"
        if self.transport == "json2":
            payload = dict(kwargs)
            if ids is not None:
                payload["ids"] = list(ids)
            try:
                response = self.http.post(
                    f"/json/2/{model}/{method}",
                    json=payload,
                    endpoint=f"/json/2/{endpoint}",
                    expect=(401, 403, 404, 422),
                    replay=replay,
                )
            except FatalProviderError as exc:  # a JSON 500: an exception Odoo did not sort
                kind = exc.code or f"HTTP {exc.status}"
                raise self._fault(kind, exc.message.split(": ", 1)[-1], exc.status) from None
            self._note_date(response)
            if response.status_code == 401:
                raise self._fault("odoo.exceptions.AccessDenied", "Invalid apikey", 401)
            if response.status_code == 404 and _json_error(response) is None:
                # Odoo's own 404s (unknown model or method) are JSON; an HTML page means no database.
                raise self._missing_database()
            if response.status_code != 200:
                body = _json_error(response) or {}
                kind = str(body.get("name") or f"HTTP {response.status_code}")
                raise self._fault(kind, str(body.get("message") or response.text[:200]), response.status_code)
            return response.json()
        positional: list[Any] = []
        if method == "create":
            # odoo.service.model.call_kw reads args[0] to tell one dict from a list: it must be positional
            positional = [kwargs.pop("vals_list")]
        elif ids is not None:
            positional = [list(ids)]
        args = [self.db, self.uid, self._key, model, method, positional, kwargs]
        return self._jsonrpc("object", "execute_kw", args, endpoint=f"/jsonrpc {endpoint}", replay=replay)

    def _version_info(self) -> tuple[int, str]:
        """(major, label) of the server, on the connection's own transport."""
        if self.transport == "json2":
            return self._detect_version()
        return server_version(self._jsonrpc("common", "version", [], endpoint="/jsonrpc common.version") or {})

    def _server_now(self) -> datetime:
        """The server's clock (HTTP Date), not ours: the window bounds are compared to its write_date."""
        self._server_time = None
        self._version_info()
        return self._server_time or datetime.now(UTC)

    def _major(self) -> int:
        """The server's major version; asked once when the connection did not record it."""
        if not self.version:
            self.version = self._version_info()[0]
        return self.version

    # ================================================================================ connection
    @classmethod
    def make_auth(cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any) -> Any:
        key = _secret_value(secrets.require(connection))
        if not key:
            raise AuthError(f"the secret of connection {connection!r} holds no Odoo API key")
        register_secret(key)
        if settings.get("transport") == "json2":
            return _HeaderAuth({"Authorization": f"bearer {key}", "X-Odoo-Database": str(settings.get("db", ""))})
        return _HeaderAuth({})

    @classmethod
    def connect(cls, ctx: ConnectContext) -> ConnectResult:
        opts = ctx.options
        if not ctx.base_url:
            raise UsageError("Odoo needs --base-url, e.g. https://acme.odoo.com")
        base_url = ctx.base_url.rstrip("/")
        login = str(opts.get("user") or "").strip()
        if not login:
            raise UsageError("Odoo needs --user (the login of the user the API key belongs to)")
        wanted = opts.get("transport")
        if wanted not in (None, "jsonrpc", "json2"):
            raise UsageError(f"--transport {wanted!r}: choose jsonrpc or json2")
        kind = "password" if opts.get("password") else "api_key"
        if kind == "password":
            ctx.io.info(
                "warning: a password works, but an API key (Preferences > Account Security) can be revoked alone"
            )
        secret = ctx.io.secret(f"Odoo {'password' if kind == 'password' else 'API key'} for {login}").strip()
        if not secret:
            raise UsageError("no API key was given")
        register_secret(secret)
        probe = cls._bare(ctx, base_url, secret, login, settings={"transport": "jsonrpc"})
        try:
            major, label = probe._detect_version()
            db = str(opts.get("db") or "") or probe._single_database()
        finally:
            probe.close()
        transport = wanted or ("json2" if major >= 19 else "jsonrpc")
        if transport == "json2" and major < 19:
            raise UsageError(f"JSON-2 needs Odoo 19 or later; this server runs {label or 'an unknown version'}")
        settings: dict[str, Any] = {
            "db": db,
            "user": login,
            "transport": transport,
            "version": major,
            "server_version": label,
        }
        ctx.secrets.set(ctx.name, {"kind": kind, kind: secret, "login": login})
        provider = cls._bare(ctx, base_url, secret, login, settings=settings)
        try:
            health = provider.check()
        finally:
            provider.close()
        settings["uid"] = provider.uid
        if not health.extra.get("crm"):
            raise ConfigError(
                f"the CRM app is not installed on database {db!r} (model crm.lead is missing)",
                hint="install CRM in Odoo (Apps > CRM), then connect again",
            )
        settings["company"] = health.extra.get("company")
        return ConnectResult(base_url=base_url, account_id=db, settings=settings, health=health)

    @classmethod
    def _bare(
        cls, ctx: ConnectContext, base_url: str, secret: str, login: str, *, settings: dict[str, Any]
    ) -> OdooProvider:
        """A provider for the connect flow, before anything is stored."""
        store = _OneSecret(secret)
        auth = cls.make_auth(connection=ctx.name, settings=settings, secrets=store, token_client=None)  # type: ignore[arg-type]
        http = ctx.client(base_url, auth)
        provider = cls(
            ProviderContext(
                connection=ctx.name,
                base_url=base_url,
                settings={**settings, "user": login},
                http=http,
                secrets=store,  # type: ignore[arg-type]
            )
        )
        return provider

    def _detect_version(self) -> tuple[int, str]:
        """``GET /web/version`` (no database, no key needed), else ``common.version`` over JSON-RPC."""
        response = self.http.get("/web/version", endpoint="/web/version", expect=(301, 302, 303, 404, 405))
        self._note_date(response)
        if response.status_code == 200:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and server_version(body)[0]:
                return server_version(body)
        return server_version(self._jsonrpc("common", "version", [], endpoint="/jsonrpc common.version") or {})

    def _single_database(self) -> str:
        try:
            dbs = self._jsonrpc("db", "list", [], endpoint="/jsonrpc db.list")
        except (OdooFault, AuthError):
            dbs = None
        if isinstance(dbs, list) and len(dbs) == 1:
            return str(dbs[0])
        raise UsageError("Odoo needs --db-name (this server does not name a single database)")

    def _authenticate(self) -> int:
        if self.transport == "json2":
            response = self.http.post(
                "/json/2/res.users/context_get",
                json={},
                endpoint="/json/2/res.users.context_get",
                expect=(401, 404),
            )
            self._note_date(response)
            if response.status_code == 401:
                raise AuthError(
                    f"Odoo refused the API key of {self.login!r} on database {self.db!r}",
                    hint=EXPIRY_HINT if self.version >= 18 else None,
                )
            if response.status_code == 404:
                if _json_error(response) is None:  # Odoo's HTML page for a database it does not have
                    raise self._missing_database()
                raise ConfigError(
                    f"JSON-2 is not served at {self.ctx.base_url} for database {self.db!r}",
                    hint="check --base-url, or connect with --transport jsonrpc",
                )
            return int(response.json().get("uid") or 0)
        uid = self._jsonrpc(
            "common", "authenticate", [self.db, self.login, self._key, {}], endpoint="/jsonrpc common.authenticate"
        )
        if not uid:
            hint = EXPIRY_HINT if self.version >= 18 else "check --user and the API key"
            raise AuthError(f"Odoo refused the login {self.login!r} with this key on database {self.db!r}", hint=hint)
        return int(uid)

    def check(self) -> Health:
        self.uid = self._authenticate()
        major, label = self._version_info()
        self.version = major or self.version
        users = self._call("res.users", "read", [self.uid], fields=["name", "company_id"])
        if not users:
            raise AuthError(f"the Odoo user {self.login!r} (uid {self.uid}) cannot read itself")
        company = users[0]["company_id"][1] if users[0].get("company_id") else None
        crm = self._has_model("crm.lead")
        detail = f"Odoo {label} database {self.db}, user {self.login} (uid {self.uid}), {self.transport}"
        if not crm:
            detail += "; CRM app missing"
        return Health(
            ok=crm,
            account=self.db,
            detail=detail,
            extra={
                "version": label,
                "uid": self.uid,
                "transport": self.transport,
                "company": company,
                "crm": crm,
            },
        )

    # ================================================================================ schema
    def _model_fields(self, model: str) -> dict[str, dict[str, Any]]:
        """fields_get once per run and model; {} when the model does not exist on this database."""
        with self._lock:
            if model in self._fields:
                return self._fields[model] or {}
        try:
            desc = self._call(
                model,
                "fields_get",
                attributes=["type", "string", "required", "readonly", "relation", "selection", "manual"],
            )
        except OdooFault as exc:
            if exc.kind in ("odoo.exceptions.UserError", "werkzeug.exceptions.NotFound"):
                desc = None
            else:
                raise
        with self._lock:
            self._fields[model] = desc
        return desc or {}

    def _has_model(self, model: str) -> bool:
        return bool(self._model_fields(model))

    def _available(self, model: str, names: Sequence[str]) -> list[str]:
        known = self._model_fields(model)
        missing = [n for n in names if n not in known]
        for name in missing:
            key = f"{model}.{name}"
            if key not in self._warned:
                self._warned.add(key)
                # crmsync's own x_crmsync_* fields appear with the first push: not worth a warning before
                level = logging.DEBUG if name.startswith("x_crmsync") else logging.WARNING
                log.log(level, "Odoo %s has no field %s on this database: it is left out", model, name)
        return [n for n in names if n in known]

    def fields(self, obj: str) -> list[FieldInfo]:
        model = MODELS[obj]
        out = []
        for name, desc in sorted(self._model_fields(model).items()):
            ftype = desc.get("type", "char")
            kind = {
                "boolean": "bool",
                "integer": "number",
                "float": "number",
                "monetary": "number",
                "date": "date",
                "datetime": "datetime",
                "selection": "enumeration",
                "many2one": "reference",
                "text": "text",
                "html": "text",
            }.get(ftype, "string")
            if name in ("email", "email_from"):
                kind = "email"
            elif name in ("phone", "mobile"):
                kind = "phone"
            options = [str(k) for k, _ in desc.get("selection") or []] if ftype == "selection" else None
            out.append(
                FieldInfo(
                    name=name,
                    label=str(desc.get("string") or ""),
                    type=kind,
                    required=bool(desc.get("required")),
                    read_only=bool(desc.get("readonly")),
                    custom=bool(desc.get("manual")) or name.startswith("x_"),
                    options=options,
                )
            )
        # The default mapping's pseudo-fields, so `map check` knows them.
        if obj == "deals" and self._has_model("crm.lead"):
            out.append(
                FieldInfo("stage_name", "Stage (by name)", "enumeration", options=sorted(self._stage_ids(), key=str))
            )
        if obj in ("calls", "tasks"):
            types = sorted(self._activity_types())
            out.append(FieldInfo("activity_type_xmlid", "Activity type (external id)", "enumeration", options=types))
            out.append(FieldInfo("crmsync_marker", "crmsync idempotency marker (in the note)", "string"))
        return out

    def managed_fields(self, obj: str) -> set[str]:
        """Fields this provider fills itself (links, types, owner, idempotency keys) for ``map check``."""
        return {
            "contacts": {"parent_id", "is_company"},
            "companies": {"is_company"},
            "deals": {"partner_id", "type", "stage_id", "user_id", DEAL_KEY_FIELD},
            "calls": {"res_model_id", "res_id", "user_id", "activity_type_id", "date_deadline", MARKER_FIELD},
            "tasks": {"res_model_id", "res_id", "user_id", "activity_type_id", "date_deadline", MARKER_FIELD},
        }.get(obj, set())

    # -- look-ups shared by pull and push -------------------------------------------------------
    def _activity_types(self) -> dict[str, int]:
        """Activity type external ids -> ids (one ir.model.data read)."""
        with self._lock:
            if self._xmlids is not None:
                return self._xmlids
        rows = self._call(
            "ir.model.data",
            "search_read",
            domain=[("model", "=", "mail.activity.type")],
            fields=["module", "name", "res_id"],
        )
        found = {f"{r['module']}.{r['name']}": int(r["res_id"]) for r in rows}
        with self._lock:
            self._xmlids = found
            self._type_xmlids = {v: k for k, v in found.items()}
        return found

    def _type_id(self, xmlid: str) -> int:
        types = self._activity_types()
        if xmlid not in types:
            raise _ItemError(f"no activity type {xmlid!r} on this database")
        return types[xmlid]

    def _ir_model_id(self, model: str) -> int:
        with self._lock:
            if model in self._model_ids:
                return self._model_ids[model]
        rows = self._call(
            "ir.model", "search_read", domain=[("model", "in", ["res.partner", "crm.lead", model])], fields=["model"]
        )
        with self._lock:
            self._model_ids.update({r["model"]: int(r["id"]) for r in rows})
            if model not in self._model_ids:
                raise _ItemError(f"model {model} is not installed")
            return self._model_ids[model]

    def _stage_ids(self) -> dict[str, int]:
        with self._lock:
            if self._stages is not None:
                return self._stages
        rows = self._call(
            "crm.stage", "search_read", domain=[], fields=["name"], order="sequence, id", context={"active_test": False}
        )
        stages: dict[str, int] = {}
        for row in rows:
            stages.setdefault(str(row["name"]), int(row["id"]))
        with self._lock:
            self._stages = stages
        return stages

    def _stage_id(self, name: Any) -> int:
        stages = self._stage_ids()
        for stage, sid in stages.items():
            if stage.lower() == str(name).strip().lower():
                return sid
        raise _ItemError(f"no CRM stage named {name!r}; stages: {', '.join(stages)}")

    # -- owners ---------------------------------------------------------------------------------
    def resolve_owners(self, emails: Sequence[str]) -> dict[str, int]:
        """Owner emails -> res.users ids, matched on login first, then on email; unknown ones are left out.

        Batched (one ``search_read`` per 100 emails not seen before) and cached for this provider's
        life, which is one run.
        """
        wanted = list(dict.fromkeys(str(e).strip().lower() for e in emails if e and str(e).strip()))
        with self._lock:
            new = [e for e in wanted if e not in self._users]
        for chunk in chunks(new, 100):
            leaves = [leaf for e in chunk for leaf in (("login", "=ilike", e), ("email", "=ilike", e))]
            rows = self._call("res.users", "search_read", domain=_or(leaves), fields=["login", "email"], order="id asc")
            found: dict[str, int] = {}
            for field in ("login", "email"):  # a login names one user; an email may be shared
                for row in rows:
                    key = str(row.get(field) or "").strip().lower()
                    if key in chunk:
                        found.setdefault(key, int(row["id"]))
            with self._lock:
                self._users.update({e: found.get(e) for e in chunk})
        with self._lock:
            return {e: uid for e in wanted if (uid := self._users.get(e))}

    def _own_uid(self) -> int:
        if not self.uid:
            self.uid = self._authenticate()
        return self.uid

    def _owner_id(self, value: Any) -> int:
        """The user a record is assigned to: the owner email's user, else the connection's own user.

        Odoo 19 leaves an activity without ``user_id`` unassigned (in nobody's queue), so there is
        always an owner; an unknown email is warned about once and counted in ``owner_fallbacks``.
        """
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        email = str(value or "").strip().lower()
        if email:
            uid = self.resolve_owners([email]).get(email)
            if uid:
                return uid
            with self._lock:
                self.owner_fallbacks[email] = self.owner_fallbacks.get(email, 0) + 1
                first = self.owner_fallbacks[email] == 1
            if first:
                log.warning(
                    "owner %s is not an Odoo user (login or email) on %s: assigned to %s instead",
                    email,
                    self.db,
                    self.login,
                )
        return self._own_uid()

    def _resolve_batch(self, items: Sequence[Outgoing] | Sequence[OutgoingActivity]) -> None:
        """Resolve a batch's owner emails in one look-up before its items are built one by one."""
        self.resolve_owners([v for i in items if isinstance(v := i.properties.get("user_id"), str)])

    # ================================================================================ pull
    def _calls_from_messages(self) -> bool:
        # Up to 18 a done activity is deleted: only its chatter message is left to read.
        return self._major() < 19 and not self.ctx.settings.get("calls_from_activities")

    def _source(self, obj: str) -> tuple[str, list[Any]]:
        """(model, domain) that selects ``obj``'s records."""
        if obj == "contacts":
            return "res.partner", [("is_company", "=", False)]
        if obj == "companies":
            return "res.partner", [("is_company", "=", True)]
        if obj == "deals":
            if not self._has_model("crm.lead"):
                raise ConfigError(f"the CRM app is not installed on database {self.db!r}: no deals to pull")
            return "crm.lead", [("type", "=", "opportunity")]
        if obj in ("calls", "tasks"):
            call_type = self._activity_types().get(CALL_XMLID)
            type_leaf = ("activity_type_id", "=", call_type or 0)
            if obj == "calls" and self._calls_from_messages():
                # Only the calls crmsync logged: a database's own chatter is not ours to mirror.
                return "mail.message", [
                    ("model", "in", ["res.partner", "crm.lead"]),
                    ("mail_activity_type_id", "=", call_type or 0),
                    ("body", "ilike", "[crmsync:"),
                    ("body", "not ilike", f"{TASK_SUFFIX}]"),
                ]
            if MARKER_FIELD in self._model_fields("mail.activity"):
                marker = [(MARKER_FIELD, "!=", False), (MARKER_FIELD, "not ilike", TASK_SUFFIX)]
            else:
                marker = [("note", "ilike", "[crmsync:"), ("note", "not ilike", f"{TASK_SUFFIX}]")]
            if obj == "tasks":
                return "mail.activity", [("note", "ilike", f"{TASK_SUFFIX}]")]
            # Follow-up tasks carry markers too (``<outcome>:task``): they are not logged calls.
            return "mail.activity", [type_leaf, *marker]
        raise UsageError(f"Odoo cannot pull {obj}")

    def _read_fields(self, obj: str, model: str, fields: Sequence[str]) -> list[str]:
        """The mapping's fields as Odoo names (pseudo-fields translated), plus what pull itself needs."""
        wanted: list[str] = []
        for name in fields:
            if name == "stage_name":
                wanted.append("stage_id")
            elif name == "activity_type_xmlid":
                wanted.append("mail_activity_type_id" if model == "mail.message" else "activity_type_id")
            elif name == "crmsync_marker":
                text_field = "body" if model == "mail.message" else "note"
                wanted.append(MARKER_FIELD if MARKER_FIELD in self._model_fields(model) else text_field)
            elif model == "mail.message":
                wanted.append({"note": "body", "date_deadline": "date"}.get(name, name))
            else:
                wanted.append(name)
        extra = {
            "res.partner": ["write_date", "active", "parent_id", "is_company"],
            "crm.lead": ["write_date", "active", "partner_id", "stage_id"],
            "mail.activity": ["write_date", "res_model", "res_id", "note", "activity_type_id"],
            "mail.message": ["write_date", "model", "res_id", "body", "date", "mail_activity_type_id"],
        }[model]
        names = list(dict.fromkeys([*wanted, *extra]))
        if model == "mail.message":
            names = [n for n in names if n not in ("summary",)]
        return self._available(model, names)

    def _records(self, obj: str, model: str, rows: list[dict[str, Any]]) -> list[RemoteRecord]:
        partners: dict[int, dict[str, Any]] = {}
        if model == "crm.lead":
            ids = sorted({pid for r in rows if (pid := _m2o_id(r.get("partner_id")))})
            if ids:
                for p in self._call(
                    "res.partner",
                    "read",
                    ids,
                    fields=["is_company", "parent_id"],
                    context={"active_test": False},
                ):
                    partners[int(p["id"])] = p
        return [self._record(obj, model, row, partners) for row in rows]

    def _record(
        self, obj: str, model: str, row: dict[str, Any], partners: Mapping[int, dict[str, Any]] | None = None
    ) -> RemoteRecord:
        props = {k: v for k, v in row.items() if k != "id"}
        assoc: dict[str, list[str]] = {}
        archived = False
        if model == "res.partner":
            archived = row.get("active") is False
            if obj == "contacts":
                parent = _m2o_id(row.get("parent_id"))
                assoc["companies"] = [str(parent)] if parent else []
        elif model == "crm.lead":
            archived = row.get("active") is False
            if "stage_id" in row:
                props["stage_name"] = row["stage_id"][1] if row["stage_id"] else False
            pid = _m2o_id(row.get("partner_id"))
            partner = (partners or {}).get(pid or 0)
            assoc = {"contacts": [], "companies": []}
            if pid and partner is not None:
                if partner.get("is_company"):
                    assoc["companies"] = [str(pid)]
                else:
                    assoc["contacts"] = [str(pid)]
                    parent = _m2o_id(partner.get("parent_id"))
                    if parent:
                        assoc["companies"] = [str(parent)]
        else:
            html_field = "body" if model == "mail.message" else "note"
            text = row.get(html_field) or ""
            marker = row.get(MARKER_FIELD) or (m.group(1) if (m := MARKER_RE.search(str(text))) else False)
            props["crmsync_marker"] = marker
            if isinstance(text, str):
                note = _done_note(text) if model == "mail.message" else text
                props["note"] = _html_text(MARKER_HTML_RE.sub("", note)) or False
            type_id = _m2o_id(row.get("mail_activity_type_id" if model == "mail.message" else "activity_type_id"))
            if type_id:
                self._activity_types()
                props["activity_type_xmlid"] = self._type_xmlids.get(type_id, False)
            if model == "mail.message":
                props["date_deadline"] = str(row["date"])[:10] if row.get("date") else False
                props["summary"] = _done_summary(str(text)) or False
            res_model = row.get("model") if model == "mail.message" else row.get("res_model")
            res_id = row.get("res_id")
            if res_id:
                assoc = {"contacts": [str(res_id)]} if res_model == "res.partner" else {"deals": [str(res_id)]}
        return RemoteRecord(
            id=str(row["id"]),
            properties=props,
            updated_at=_parse(row.get("write_date")),
            archived=archived,
            associations=assoc,
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
        model, base = self._source(obj)
        read = self._read_fields(obj, model, fields)
        server_now = self._server_now()
        limit_hi = server_now - timedelta(seconds=self.settle)
        if until is not None:
            limit_hi = min(limit_hi, until if until.tzinfo else until.replace(tzinfo=UTC))
        limit_hi = limit_hi.replace(microsecond=0)
        cur = dict(cursor or {})
        if "window_hi" in cur:
            # Resuming inside a window after a crash: same bounds, after the last stored id.
            lo, hi, last_id = cur.get("window_lo"), str(cur["window_hi"]), int(cur.get("last_id") or 0)
        else:
            prev = _parse(cur.get("hi"))
            if prev is not None and prev >= limit_hi:
                return  # nothing can have settled since the last window ended
            if prev is not None:
                lo = _fmt(prev - timedelta(seconds=self.overlap))
            elif since is not None:
                lo = _fmt(since.replace(microsecond=0))
            else:
                lo = None
            hi, last_id = _fmt(limit_hi), 0
        domain = [*base, *([("write_date", ">=", lo)] if lo else []), ("write_date", "<", hi)]
        context = {"active_test": False}

        def page(low: int, high: int | None, desc: bool) -> tuple[list[dict[str, Any]], bool]:
            rows = self._call(
                model,
                "search_read",
                domain=[*domain, ("id", ">", low), *([("id", "<", high)] if high is not None else [])],
                fields=read,
                order="id desc" if desc else "id asc",
                limit=self.page_size,
                context=context,
            )
            return rows, len(rows) == self.page_size

        def as_page(rows: list[dict[str, Any]], mark: int | None, *, last: bool, total: int | None) -> Page:
            # Only a complete window moves the cursor to its end; before that, to the lower end's id.
            if last:
                cursor: dict[str, Any] | None = {"hi": hi}
            else:
                cursor = None if mark is None else {"window_lo": lo, "window_hi": hi, "last_id": mark}
            return Page(records=self._records(obj, model, rows), cursor=cursor, total=total)

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"odoo-{obj}") as pool:
            # A new window's size (for progress) is asked alongside its first page, not before it
            # (a resumed window's was told when it began).
            count = {"domain": domain, "context": context}
            counted = None if last_id else pool.submit(self._call, model, "search_count", **count)
            held: tuple[list[dict[str, Any]], int | None] | None = None
            for rows, mark in walk_both_ends(page, lambda row: int(row["id"]), last_id, pool):
                if held is not None:  # one page held back: the last one carries the window's end
                    yield as_page(*held, last=False, total=counted and counted.result())
                held = (rows, mark)
            yield as_page(*(held or ([], None)), last=True, total=counted and counted.result())

    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        model, _ = self._source(obj)
        read = self._read_fields(obj, model, fields)
        out: list[RemoteRecord] = []
        for chunk in chunks([int(i) for i in dict.fromkeys(ids)], BATCH):
            rows = self._call(model, "read", chunk, fields=read, context={"active_test": False})
            out.extend(self._records(obj, model, rows))
        return out

    def list_ids(self, obj: str) -> Iterator[list[str]]:
        model, base = self._source(obj)
        last = 0
        while True:
            ids = self._call(
                model,
                "search",
                domain=[*base, ("id", ">", last)],
                order="id asc",
                limit=LIST_PAGE,
                context={"active_test": False},
            )
            if ids:
                yield [str(i) for i in ids]
            if len(ids) < LIST_PAGE:
                return
            last = int(ids[-1])

    # ================================================================================ push
    def prepare_push(self) -> None:
        self.prepare_objects(["calls"])

    def prepare_objects(self, objects: Sequence[str]) -> None:
        """Resolve what push relies on once; create the deal key field the default mapping uses."""
        if "deals" in objects and self._has_model("crm.lead"):
            self._ensure_field("crm.lead", DEAL_KEY_FIELD, "crmsync deal key")
        if "calls" in objects or "tasks" in objects:
            if self._has_model("mail.activity"):
                self._activity_types()

    def _ensure_field(self, model: str, name: str, label: str) -> None:
        if name in self._model_fields(model):
            return
        try:
            self._call(
                "ir.model.fields",
                "create",
                vals_list=[
                    {
                        "name": name,
                        "model_id": self._ir_model_id(model),
                        "ttype": "char",
                        "field_description": label,
                        "state": "manual",
                    }
                ],
            )
        except (OdooFault, UnconfirmedWrite) as exc:
            # Perhaps it exists after all (another run made it, or this create's answer was lost
            # and its retry met it): read the fields again rather than assume it missing.
            with self._lock:
                self._fields.pop(model, None)
            if name not in self._model_fields(model):
                log.warning(
                    "could not add %s.%s (%s): deals are matched through the local mirror only", model, name, exc
                )
            return
        with self._lock:
            self._fields.pop(model, None)

    def _matches(self, obj: str, kind: str, values: list[str], read: list[str]) -> dict[str, dict[str, Any]]:
        """Records of ``obj`` whose ``kind`` (email, phone, domain, name, key) equals one of ``values``."""
        model, base = self._source(obj)
        found: dict[str, dict[str, Any]] = {}
        for chunk in chunks(values, BATCH):
            if kind == "email" and obj == "contacts":
                leaves, field, norm = (
                    [("email", "=ilike", v) for v in chunk],
                    "email",
                    lambda x: str(x or "").strip().lower(),
                )
            elif kind == "phone" and obj == "contacts":
                leaves, field, norm = [("phone", "in", chunk)], "phone", _digits
            elif kind == "domain" and obj == "companies":
                leaves, field, norm = [("website", "ilike", v) for v in chunk], "website", _host
            elif kind == "name" and obj in ("companies", "contacts"):
                leaves, field = [("name", "=ilike", v) for v in chunk], "name"
                norm = lambda x: str(x or "").strip().lower()  # noqa: E731
            elif kind == "key" and obj == "deals" and DEAL_KEY_FIELD in self._model_fields("crm.lead"):
                leaves, field, norm = [(DEAL_KEY_FIELD, "in", chunk)], DEAL_KEY_FIELD, lambda x: str(x or "").lower()
            else:
                return found
            rows = self._call(
                model,
                "search_read",
                domain=[*base, *_or(leaves)],
                fields=list(dict.fromkeys([*read, field])),
                order="id asc",
            )
            wanted = set(chunk)
            for row in rows:
                value = norm(row.get(field))
                if value in wanted:
                    found.setdefault(value, row)  # the oldest record wins when several match
        return found

    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        if obj not in ("contacts", "companies", "deals"):
            return {}
        model, _ = self._source(obj)
        read = self._read_fields(obj, model, fields)
        by_kind: dict[str, list[str]] = {}
        for k in keys:
            name, value = next(iter(k.items()))
            by_kind.setdefault(name, []).append(str(value).lower() if name != "phone" else _digits(value))
        out: dict[str, RemoteRecord] = {}
        for kind, values in by_kind.items():
            rows = self._matches(obj, kind, list(dict.fromkeys(values)), read)
            # One call for all rows: a deal's linked partners are read in one batch, not per deal.
            for value, rec in zip(rows, self._records(obj, model, list(rows.values())), strict=True):
                out[match_key({kind: value})] = rec
        return out

    def _vals(self, obj: str, item: Outgoing) -> dict[str, Any]:
        """An outgoing item's properties as Odoo values (pseudo-fields and links resolved)."""
        model = MODELS[obj]
        props = dict(item.properties)
        if "stage_name" in props:
            stage = props.pop("stage_name")
            if stage not in (None, "", False):
                props["stage_id"] = self._stage_id(stage)
        if isinstance(props.get("user_id"), str):
            props["user_id"] = self._owner_id(props["user_id"])
        assoc = item.associations
        if obj == "contacts" and assoc.get("companies"):
            props["parent_id"] = int(assoc["companies"])
        elif obj == "deals" and (assoc.get("contacts") or assoc.get("companies")):
            props["partner_id"] = int(assoc.get("contacts") or assoc["companies"])
        if obj == "companies":
            props.setdefault("is_company", True)
        elif obj == "contacts":
            props.setdefault("is_company", False)
        elif obj == "deals":
            props.setdefault("type", "opportunity")
        for name in PSEUDO & set(props):
            props.pop(name)
        kept = set(self._available(model, list(props)))
        return {k: v for k, v in props.items() if k in kept}

    def upsert(self, obj: str, items: Sequence[Outgoing]) -> list[ItemResult]:
        if obj in ("calls", "tasks"):
            return self._update_activities(items)
        model = MODELS[obj]
        self._resolve_batch(items)
        results: dict[str, ItemResult] = {}
        creates: list[tuple[Any, dict[str, Any]]] = []
        updates: list[tuple[Any, dict[str, Any]]] = []
        for item in items:
            try:
                vals = self._vals(obj, item)
            except _ItemError as exc:
                results[item.ref] = ItemResult(item.ref, False, error=str(exc))
                continue
            (updates if item.remote_id else creates).append((item, vals))
        results.update(self._write_grouped(model, updates))
        results.update(self._create_batch(model, creates))
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no result from Odoo", retriable=True) for i in items
        ]

    def _write_grouped(self, model: str, pairs: list[tuple[Any, dict[str, Any]]]) -> dict[str, ItemResult]:
        """One ``write`` per distinct set of values (Odoo writes the same values on many ids at once)."""
        groups: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
        for item, vals in pairs:
            groups.setdefault(json.dumps(vals, sort_keys=True, default=str), []).append((item, vals))
        results: dict[str, ItemResult] = {}
        for members in groups.values():
            vals = members[0][1]
            ids = [int(item.remote_id) for item, _ in members]
            if not vals:
                results.update({item.ref: ItemResult(item.ref, True, remote_id=item.remote_id) for item, _ in members})
                continue
            try:
                self._call(model, "write", ids, vals=vals)
            except OdooFault as exc:
                if len(members) > 1:  # find the one record that fails; the others go through
                    for member in members:
                        results.update(self._write_grouped(model, [member]))
                    continue
                item = members[0][0]
                results[item.ref] = ItemResult(item.ref, False, error=str(exc))
                continue
            results.update({item.ref: ItemResult(item.ref, True, remote_id=item.remote_id) for item, _ in members})
        return results

    def _create_batch(self, model: str, pairs: list[tuple[Any, dict[str, Any]]]) -> dict[str, ItemResult]:
        """One ``create`` with a list of values; a refused batch is retried item by item."""
        if not pairs:
            return {}
        try:
            ids = self._call(model, "create", vals_list=[vals for _, vals in pairs], replay=False)
        except UnconfirmedWrite as exc:
            # Odoo keeps no key unique: a re-sent create would make a second record. Push looks
            # these up by their key or marker and sends again only what is not there.
            return {
                item.ref: ItemResult(item.ref, False, error=str(exc), retriable=True, unconfirmed=True)
                for item, _ in pairs
            }
        except OdooFault as exc:
            if len(pairs) == 1:
                item = pairs[0][0]
                return {item.ref: ItemResult(item.ref, False, error=str(exc))}
            results: dict[str, ItemResult] = {}
            for pair in pairs:
                results.update(self._create_batch(model, [pair]))
            return results
        if isinstance(ids, int):
            ids = [ids]
        return {
            item.ref: ItemResult(item.ref, True, remote_id=str(rid), created=True)
            for (item, _), rid in zip(pairs, ids, strict=False)
        }

    # -- calls and tasks -------------------------------------------------------------------------
    def _activity_vals(self, obj: str, item: OutgoingActivity, marker_field: bool) -> dict[str, Any]:
        props = dict(item.properties)
        xmlid = props.pop("activity_type_xmlid", None) or (CALL_XMLID if obj == "calls" else TODO_XMLID)
        props.pop("crmsync_marker", None)
        assoc = item.associations
        if assoc.get("contacts"):
            res_model, res_id = "res.partner", assoc["contacts"]
        elif assoc.get("companies"):
            res_model, res_id = "res.partner", assoc["companies"]
        elif assoc.get("deals"):
            res_model, res_id = "crm.lead", assoc["deals"]
        else:
            raise _ItemError("an activity needs a contact, company or deal to attach to")
        note = _note_html(str(props.pop("note", "") or ""))
        if not marker_field or (obj == "calls" and self._calls_from_messages()):
            # No field to carry the marker, or (up to 18) a done call leaves only its message, which
            # copies the note and not the field: the note carries it.
            note = f"{note}<p>[crmsync:{item.marker}]</p>"
        vals: dict[str, Any] = {
            **props,
            "res_model_id": self._ir_model_id(res_model),
            "res_id": int(res_id),
            "activity_type_id": self._type_id(str(xmlid)),
            "note": note,
        }
        if marker_field:
            vals[MARKER_FIELD] = item.marker
        # Never unassigned: Odoo 19 gives an activity no user by default.
        vals["user_id"] = self._owner_id(vals.get("user_id"))
        vals.setdefault("date_deadline", datetime.now(UTC).date().isoformat())
        kept = set(self._available("mail.activity", list(vals)))
        return {k: v for k, v in vals.items() if k in kept}

    def create_activities(self, obj: str, items: Sequence[OutgoingActivity]) -> list[ItemResult]:
        if not self._has_model("mail.activity"):
            return self._post_messages(obj, items)
        marker_field = MARKER_FIELD in self._model_fields("mail.activity")
        self._resolve_batch(items)
        results: dict[str, ItemResult] = {}
        pairs: list[tuple[Any, dict[str, Any]]] = []
        for item in items:
            try:
                pairs.append((item, self._activity_vals(obj, item, marker_field)))
            except _ItemError as exc:
                results[item.ref] = ItemResult(item.ref, False, error=str(exc))
        created = self._create_batch("mail.activity", pairs)
        results.update(created)
        if obj == "calls":
            done = [(ref, int(r.remote_id)) for ref, r in created.items() if r.ok and r.remote_id]
            for ref in self._mark_done(done):
                # Created but not done: a retry finds it by its marker and completes it.
                results[ref] = ItemResult(
                    ref, False, error="the call activity could not be marked done", retriable=True
                )
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no result from Odoo", retriable=True) for i in items
        ]

    def _mark_done(self, done: list[tuple[str, int]]) -> list[str]:
        """``action_done`` on the batch's activities in one call; returns the refs that failed.

        Not replayed (up to 18 a done activity is deleted, so a second ``action_done`` fails): after
        a lost answer the activities still open are read back and only those are marked again.
        """
        for _ in range(CONFIRM_ATTEMPTS):
            if not done:
                return []
            try:
                self._call("mail.activity", "action_done", [rid for _, rid in done], replay=False)
                return []
            except UnconfirmedWrite:
                done = self._still_open(done)
            except OdooFault as exc:
                if len(done) == 1:
                    log.warning("marking activity %s done failed: %s", done[0][1], exc)
                    return [done[0][0]]
                return [ref for pair in done for ref in self._mark_done([pair])]
        return [ref for ref, _ in done]

    def _still_open(self, done: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The activities of ``done`` not yet done: on 19 still active, before that not yet deleted."""
        archived = "active" in self._model_fields("mail.activity")
        rows = self._call(
            "mail.activity",
            "search_read",
            domain=[("id", "in", [rid for _, rid in done])],
            fields=["active"] if archived else ["id"],
            context={"active_test": False},
        )
        open_ids = {int(r["id"]) for r in rows if not archived or r.get("active")}
        return [(ref, rid) for ref, rid in done if rid in open_ids]

    def _post_messages(self, obj: str, items: Sequence[OutgoingActivity]) -> list[ItemResult]:
        """No mail.activity (stripped-down database): log each call as a note in the chatter."""
        results = []
        for item in items:
            props = item.properties
            target = item.associations.get("contacts") or item.associations.get("companies")
            if not target:
                results.append(ItemResult(item.ref, False, error="a note needs a contact to post on"))
                continue
            body = (
                f"<p><b>{props.get('summary') or obj[:-1].title()}</b></p>{props.get('note') or ''}"
                f"<p>[crmsync:{item.marker}]</p>"
            )
            try:
                result = self._call(
                    "res.partner",
                    "message_post",
                    [int(target)],
                    replay=False,
                    body=body,
                    message_type="comment",
                    subtype_xmlid="mail.mt_note",
                    **({"body_is_html": True} if self.version >= 18 else {}),
                )
            except UnconfirmedWrite as exc:
                results.append(ItemResult(item.ref, False, error=str(exc), retriable=True, unconfirmed=True))
                continue
            except OdooFault as exc:
                results.append(ItemResult(item.ref, False, error=str(exc)))
                continue
            msg_id = result[0] if isinstance(result, list) else result
            results.append(ItemResult(item.ref, True, remote_id=str(msg_id), created=True))
        return results

    def _update_activities(self, items: Sequence[Outgoing]) -> list[ItemResult]:
        self._resolve_batch(items)
        pairs = []
        for item in items:
            props = {k: v for k, v in item.properties.items() if k not in PSEUDO}
            if "user_id" in props:
                props["user_id"] = self._owner_id(props["user_id"])
            pairs.append(
                (item, {k: v for k, v in props.items() if k in set(self._available("mail.activity", list(props)))})
            )
        results = self._write_grouped("mail.activity", pairs)
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no result from Odoo", retriable=True) for i in items
        ]

    def find_activities(
        self, obj: str, markers: Sequence[str], *, context: Sequence[OutgoingActivity] = ()
    ) -> dict[str, str]:
        if not self._has_model("mail.activity"):
            return self._find_in_messages(markers, any_type=True)
        wanted = list(dict.fromkeys(markers))
        found: dict[str, str] = {}
        to_finish: list[tuple[str, int]] = []
        marker_field = MARKER_FIELD in self._model_fields("mail.activity")
        fields = [
            "note",
            *(["active"] if "active" in self._model_fields("mail.activity") else []),
            *([MARKER_FIELD] if marker_field else []),
        ]
        # An ``in`` on the marker field takes many values a query; each note marker is an ``ilike`` of its own.
        for chunk in chunks(wanted, LOOKUP_IN if marker_field else LOOKUP_ILIKE):
            if marker_field:
                domain: list[Any] = [(MARKER_FIELD, "in", chunk)]
            else:
                domain = _or([("note", "ilike", f"[crmsync:{m}]") for m in chunk])
            rows = self._call(
                "mail.activity",
                "search_read",
                domain=domain,
                fields=fields,
                order="id asc",
                context={"active_test": False},
            )
            for row in rows:
                marker = row.get(MARKER_FIELD) or next(
                    (m for m in chunk if f"[crmsync:{m}]" in str(row.get("note") or "")), None
                )
                if marker in chunk and marker not in found:
                    found[marker] = str(row["id"])
                    if obj == "calls" and row.get("active", True):
                        # The create answered, the action_done never did: finish the job now.
                        to_finish.append((marker, int(row["id"])))
        failed = set(self._mark_done(to_finish))
        for marker in failed:
            found.pop(marker, None)
        rest = [m for m in wanted if m not in found]
        if rest and obj == "calls":
            # Up to 18 a done activity is gone; its chatter message still carries the marker.
            found.update(self._find_in_messages(rest))
        return found

    def _find_in_messages(self, markers: Sequence[str], *, any_type: bool = False) -> dict[str, str]:
        found: dict[str, str] = {}
        for chunk in chunks(list(markers), LOOKUP_ILIKE):
            domain = _or([("body", "ilike", f"[crmsync:{m}]") for m in chunk])
            rows = self._call("mail.message", "search_read", domain=domain, fields=["body"], order="id asc")
            for row in rows:
                marker = next((m for m in chunk if f"[crmsync:{m}]" in str(row.get("body") or "")), None)
                if marker and marker not in found:
                    found[marker] = str(row["id"])
        return found


class _OneSecret:
    """A SecretStore stand-in holding the key being tried during ``connect``."""

    def __init__(self, key: str) -> None:
        self.key = key

    def require(self, connection: str) -> dict[str, Any]:
        return {"api_key": self.key}

    def get(self, connection: str) -> dict[str, Any]:
        return {"api_key": self.key}
