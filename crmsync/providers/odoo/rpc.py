"""Talking to Odoo: its faults and response policy, JSON-RPC and JSON-2 calls, authentication, the version."""

from __future__ import annotations

import email.utils
import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import httpx

from crmsync.errors import AuthError, ConfigError, FatalProviderError, RetriableError
from crmsync.http import RETRIABLE_STATUS, ResponsePolicy
from crmsync.providers.base import (
    Provider,
    ProviderContext,
)
from crmsync.providers.odoo.values import server_version
from crmsync.redact import register_secret

log = logging.getLogger("crmsync.odoo")

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


class OdooPolicy(ResponsePolicy):
    """JSON-2 statuses: 409 (LockError) is worth another try; an HTML 500 is the server, not us."""

    def is_auth_expired(self, response: httpx.Response) -> bool:
        # An API key cannot be refreshed: the provider turns a 401 into an AuthError that says why.
        return False

    def is_retriable(self, response: httpx.Response) -> bool:
        if response.status_code in RETRIABLE_STATUS or response.status_code == 409:
            return True
        return response.status_code == 500 and not json_error(response)

    def may_have_written(self, response: httpx.Response) -> bool:
        # A JSON 500 is an Odoo exception: its transaction was rolled back, nothing was written.
        return response.status_code >= 500 and not json_error(response)

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        body = json_error(response)
        if body:
            return str(body.get("message") or "")[:500], str(body.get("name") or "") or None
        return response.text[:300], None


def json_error(response: httpx.Response) -> dict[str, Any] | None:
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


def secret_value(secret: Mapping[str, Any]) -> str:
    return str(secret.get("api_key") or secret.get("password") or secret.get("token") or "")


class OdooRpc(Provider):
    """The transport: one ``_call`` over JSON-2 or JSON-RPC, the server's clock and version, the login."""

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        self.db: str = settings.get("db", "")
        self.login: str = settings.get("user", "")
        self.uid: int = int(settings.get("uid") or 0)
        self.transport: str = settings.get("transport", "jsonrpc")
        self.version: int = int(settings.get("version") or 0)
        self._key = secret_value(ctx.secrets.require(ctx.connection))
        register_secret(self._key)
        self._ids = itertools.count(1)
        self._server_time: datetime | None = None
        self._clock_lock = threading.Lock()
        self._clock: Future[datetime] | None = None  # the clock read under way (``_server_clock``)

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
            if response.status_code == 404 and json_error(response) is None:
                # Odoo's own 404s (unknown model or method) are JSON; an HTML page means no database.
                raise self._missing_database()
            if response.status_code != 200:
                body = json_error(response) or {}
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

    def _server_clock(self) -> Future[datetime]:
        """``_server_now`` in a thread of its own, so that the caller's other first requests (the
        fields it reads) go out beside it; callers that ask while a read is under way share it, as
        its answer is no later than their own would be (an earlier window end is always safe)."""
        with self._clock_lock:
            if self._clock is not None and not self._clock.done():
                return self._clock
            clock: Future[datetime] = Future()
            self._clock = clock

        def read() -> None:
            try:
                clock.set_result(self._server_now())
            except BaseException as exc:  # raised to the caller at .result()
                clock.set_exception(exc)

        threading.Thread(target=read, name="odoo-clock", daemon=True).start()
        return clock

    def _major(self) -> int:
        """The server's major version; asked once when the connection did not record it."""
        if not self.version:
            self.version = self._version_info()[0]
        return self.version

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
                if json_error(response) is None:  # Odoo's HTML page for a database it does not have
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
