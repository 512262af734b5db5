"""The Odoo provider: its identity in the registry, and how a connection is made and checked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from crmsync.credentials import SecretStore
from crmsync.errors import AuthError, ConfigError, UsageError
from crmsync.providers.base import (
    ConnectContext,
    ConnectResult,
    Health,
    ProviderContext,
)
from crmsync.providers.odoo.rpc import OdooFault, OdooPolicy, _HeaderAuth, secret_value
from crmsync.providers.odoo.values import BATCH
from crmsync.providers.odoo.writes import OdooWrites
from crmsync.redact import register_secret


class OdooProvider(OdooWrites):
    name = "odoo"
    label = "Odoo"
    reference_shape = "int"  # a many2one field is written as the integer id
    emulator = "crmsync.emulators.odoo"  # no webhook_support: Odoo sends no webhooks crmsync can receive
    connect_options = frozenset({"db", "user", "transport", "password"})
    objects = ("contacts", "companies", "deals", "calls")
    batch_size = BATCH
    default_rate_limits = {}  # Odoo has none; its workers are the limit
    default_concurrency = 2
    default_base_url = ""
    policy_class = OdooPolicy

    @classmethod
    def make_auth(cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any) -> Any:
        key = secret_value(secrets.require(connection))
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
    def _bare(cls, ctx: ConnectContext, base_url: str, secret: str, login: str, *, settings: dict[str, Any]) -> Self:
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

    def _single_database(self) -> str:
        try:
            dbs = self._jsonrpc("db", "list", [], endpoint="/jsonrpc db.list")
        except (OdooFault, AuthError):
            dbs = None
        if isinstance(dbs, list) and len(dbs) == 1:
            return str(dbs[0])
        raise UsageError("Odoo needs --db-name (this server does not name a single database)")

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


class _OneSecret:
    """A SecretStore stand-in holding the key being tried during ``connect``."""

    def __init__(self, key: str) -> None:
        self.key = key

    def require(self, connection: str) -> dict[str, Any]:
        return {"api_key": self.key}

    def get(self, connection: str) -> dict[str, Any]:
        return {"api_key": self.key}
