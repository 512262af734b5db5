"""What an org has: its fields per module (cached per run), the unique fields push needs, its users."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from crmsync.errors import AuthError, ConfigError
from crmsync.providers.base import FieldInfo, ProviderContext, at_once
from crmsync.providers.zoho.api import ZohoApi
from crmsync.providers.zoho.auth import DEFAULT_SCOPES
from crmsync.providers.zoho.values import DEAL_KEY, MARKER, MODULES, _json

log = logging.getLogger("crmsync.zoho")


class ZohoSchema(ZohoApi):
    """Field metadata and the org's users, each read once per provider and shared by its threads."""

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        self._meta: dict[str, dict[str, dict[str, Any]]] = {}
        #: The org's active users, listed once: email -> user id; and the connection's own user id.
        self._users: dict[str, str] | None = None
        self._me: list[str | None] = []
        self._users_lock = threading.Lock()

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
