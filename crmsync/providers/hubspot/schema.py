"""Properties (fields, dispositions, the unique properties push needs) and the portal's owners."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from crmsync.errors import AuthError, FatalProviderError
from crmsync.providers.base import FieldInfo, at_once
from crmsync.providers.hubspot.api import HubSpotApi
from crmsync.providers.hubspot.values import COMPANY_KEY, DEAL_KEY, MARKER, OWNERS_PAGE, log

if TYPE_CHECKING:
    import httpx


#: The property group every portal has per object, for the properties push creates.
DEFAULT_GROUPS = {
    "contacts": "contactinformation",
    "companies": "companyinformation",
    "deals": "dealinformation",
    "calls": "callinformation",
    "tasks": "taskinformation",
}


def _token_user(secret: dict[str, Any], info: dict[str, Any] | None) -> str | None:
    """The user behind a token, from what HubSpot says of it (``HubSpotApi._token_info``)."""
    user = info.get("user_id" if secret.get("kind") == "oauth" else "userId") if info else None
    return None if user is None else str(user)


def _group(props: dict[str, dict[str, Any]]) -> str:
    """A group of the object's own properties (the first one listed)."""
    return next((str(p["groupName"]) for p in props.values() if p.get("groupName")), "contactinformation")


class HubSpotSchema(HubSpotApi):
    """Property metadata (cached per object), the unique properties push needs, and the portal's owners."""

    #: The user behind the token, once ``check`` has asked (``connect`` keeps it as ``user_id``).
    token_user: str | None = None

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
        """Create a unique property push relies on, unless it is known to exist.

        One request when it is new: the create itself, in the object's default group (the
        property list is read only when HubSpot refuses that group, or says the name exists).
        """
        key = f"{obj}.{name}"
        if key in self._ensured:
            return
        with self._lock:
            cached = self._props.get(obj)
        if cached is not None and name in cached:
            self._ensured.add(key)
            return
        group = _group(cached) if cached is not None else DEFAULT_GROUPS.get(obj, "contactinformation")
        r = self._create_property(obj, name, label, group)
        if r.status_code == 400 and cached is None:
            # Not the portal's group for this object: take one from its property list.
            props = self._properties(obj)
            if name in props:
                self._ensured.add(key)
                return
            r = self._create_property(obj, name, label, _group(props))
        if r.status_code == 201:
            with self._lock:
                if (known := self._props.get(obj)) is not None:
                    known[name] = r.json()
        elif r.status_code == 409:
            # It exists: made by another run, or by this request whose first answer was lost and
            # whose retry met it. Read it back rather than assume it usable (finds would skip it).
            with self._lock:
                self._props.pop(obj, None)
            if name not in self._properties(obj):
                raise FatalProviderError(
                    f"HubSpot refused to create property {obj}.{name} ({r.status_code}) yet does not list it",
                    hint="it may be archived: restore it in Settings > Properties, then push again",
                )
        else:
            raise FatalProviderError(f"HubSpot refused to create property {obj}.{name} ({r.status_code})")
        self._ensured.add(key)

    def _create_property(self, obj: str, name: str, label: str, group: str) -> httpx.Response:
        return self.http.request(
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
            expect=(400, 409),
        )

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
        user = self.ctx.settings.get("user_id")
        if user is None:
            user = _token_user(*self._token_info())
        if user is None:
            return None
        try:
            return self._owner_index()[1].get(str(user))
        except AuthError as exc:
            # Without the owners scope a push that names no rep still goes ahead, its calls unassigned.
            log.warning("%s: calls without a known rep are left unassigned", exc)
            return None
