"""Writing records: batched creates, grouped writes, call activities created and marked done, their markers."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from crmsync.http import UnconfirmedWrite
from crmsync.providers.base import (
    ItemResult,
    Outgoing,
    OutgoingActivity,
    at_once,
    chunks,
)
from crmsync.providers.odoo.reads import OdooReads
from crmsync.providers.odoo.rpc import OdooFault
from crmsync.providers.odoo.schema import ItemError
from crmsync.providers.odoo.values import (
    CALL_XMLID,
    DEAL_KEY_FIELD,
    MARKER_FIELD,
    MODELS,
    PSEUDO,
    TODO_XMLID,
    note_html,
    or_domain,
)

log = logging.getLogger("crmsync.odoo")

LOOKUP_IN = 1000  # markers per search on the marker field
LOOKUP_ILIKE = 100  # markers per search on notes or message bodies (one OR-ed ilike each)
CONFIRM_ATTEMPTS = 4  # action_done sent again after lost answers, for the activities still open


class OdooWrites(OdooReads):
    """Push: records upserted in batches, calls and tasks as mail.activity (or chatter notes), found again by marker."""

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
            # Created as asked: known without reading the model's fields again (a round trip before the deals).
            known = self._fields.get(model)
            if known is not None:
                self._fields[model] = {
                    **known,
                    name: {"type": "char", "string": label, "required": False, "readonly": False, "manual": True},
                }
            else:
                self._fields.pop(model, None)

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
            except ItemError as exc:
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
            raise ItemError("an activity needs a contact, company or deal to attach to")
        note = note_html(str(props.pop("note", "") or ""))
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
            except ItemError as exc:
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
        parts = list(chunks(wanted, LOOKUP_IN if marker_field else LOOKUP_ILIKE))

        def search(chunk: list[str]) -> list[dict[str, Any]]:
            if marker_field:
                domain: list[Any] = [(MARKER_FIELD, "in", chunk)]
            else:
                domain = or_domain([("note", "ilike", f"[crmsync:{m}]") for m in chunk])
            rows: list[dict[str, Any]] = self._call(
                "mail.activity",
                "search_read",
                domain=domain,
                fields=fields,
                order="id asc",
                context={"active_test": False},
            )
            return rows

        for chunk, rows in zip(parts, at_once(search, parts, most=int(self.http.concurrency)), strict=True):
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
        if rest and obj == "calls" and self._calls_from_messages():
            # Up to 18 a done activity is gone; its chatter message still carries the marker.
            found.update(self._find_in_messages(rest))
        return found

    def _find_in_messages(self, markers: Sequence[str], *, any_type: bool = False) -> dict[str, str]:
        found: dict[str, str] = {}
        parts = list(chunks(list(markers), LOOKUP_ILIKE))

        def search(chunk: list[str]) -> list[dict[str, Any]]:
            domain = or_domain([("body", "ilike", f"[crmsync:{m}]") for m in chunk])
            rows: list[dict[str, Any]] = self._call(
                "mail.message", "search_read", domain=domain, fields=["body"], order="id asc"
            )
            return rows

        for chunk, rows in zip(parts, at_once(search, parts, most=int(self.http.concurrency)), strict=True):
            for row in rows:
                marker = next((m for m in chunk if f"[crmsync:{m}]" in str(row.get("body") or "")), None)
                if marker and marker not in found:
                    found[marker] = str(row["id"])
        return found
