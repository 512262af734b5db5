"""What the database has: models and fields, activity types, CRM stages, and the users records belong to."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from crmsync.providers.base import (
    FieldInfo,
    Outgoing,
    OutgoingActivity,
    ProviderContext,
    chunks,
)
from crmsync.providers.odoo.rpc import OdooFault, OdooRpc
from crmsync.providers.odoo.values import DEAL_KEY_FIELD, MARKER_FIELD, MODELS, or_domain

log = logging.getLogger("crmsync.odoo")


class ItemError(Exception):
    """One outgoing item cannot be sent as it is (unknown stage, no record to attach to)."""


class OdooSchema(OdooRpc):
    """Per-run caches of the database's schema and users, read on first use (pull and push share them)."""

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        self._lock = threading.RLock()
        self._fields: dict[str, dict[str, dict[str, Any]] | None] = {}
        #: Models whose fields_get is under way: the lanes and walks that need them too wait for its answer.
        self._fields_asked: dict[str, threading.Event] = {}
        self._xmlids: dict[str, int] | None = None
        self._type_xmlids: dict[int, str] = {}
        self._model_ids: dict[str, int] = {}
        self._stages: dict[str, int] | None = None
        self._users: dict[str, int | None] = {}
        #: Owner emails with no Odoo user this run -> how many records fell back to the connection's user.
        self.owner_fallbacks: dict[str, int] = {}
        self._warned: set[str] = set()

    def _model_fields(self, model: str) -> dict[str, dict[str, Any]]:
        """fields_get once per run and model; {} when the model does not exist on this database.

        Asked once even when several threads need it at the same moment: the others wait for that
        answer (and ask themselves if it failed).
        """
        while True:
            with self._lock:
                if model in self._fields:
                    return self._fields[model] or {}
                asked = self._fields_asked.get(model)
                if asked is None:
                    asked = self._fields_asked[model] = threading.Event()
                    break
            asked.wait()
        try:
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
        finally:
            with self._lock:
                self._fields_asked.pop(model, None)
            asked.set()
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
            raise ItemError(f"no activity type {xmlid!r} on this database")
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
                raise ItemError(f"model {model} is not installed")
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
        raise ItemError(f"no CRM stage named {name!r}; stages: {', '.join(stages)}")

    # -- owners ---------------------------------------------------------------------------------
    def resolve_owners(self, emails: Sequence[str]) -> dict[str, Any]:
        """Owner emails -> res.users ids (see ``_user_ids``).

        The ids stay integers, Odoo's many2one values: a string would be read back as an email.
        """
        return self._user_ids(emails)

    def _user_ids(self, emails: Sequence[str]) -> dict[str, int]:
        """Owner emails -> res.users ids, matched on login first, then on email; unknown ones are left out.

        Batched (one ``search_read`` per 100 emails not seen before) and cached for this provider's
        life, which is one run.
        """
        wanted = list(dict.fromkeys(str(e).strip().lower() for e in emails if e and str(e).strip()))
        with self._lock:
            new = [e for e in wanted if e not in self._users]
        for chunk in chunks(new, 100):
            leaves = [leaf for e in chunk for leaf in (("login", "=ilike", e), ("email", "=ilike", e))]
            rows = self._call(
                "res.users", "search_read", domain=or_domain(leaves), fields=["login", "email"], order="id asc"
            )
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
            uid = self._user_ids([email]).get(email)
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
        self._user_ids([v for i in items if isinstance(v := i.properties.get("user_id"), str)])
