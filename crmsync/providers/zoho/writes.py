"""Writing records: upserts matched on unique fields, calls and tasks with their marker, per-record results."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from crmsync.errors import FatalProviderError
from crmsync.http import UnconfirmedWrite
from crmsync.providers.base import ItemResult, Outgoing, OutgoingActivity, ProviderContext, chunks
from crmsync.providers.zoho.api import ZohoPolicy
from crmsync.providers.zoho.reads import ZohoReads
from crmsync.providers.zoho.values import (
    COQL_CRITERIA,
    COQL_IN,
    COQL_ROWS,
    DEAL_KEY,
    MARKER,
    MODULES,
    _in_groups,
    _json,
    domain_of,
)

RETRIABLE_ITEM_CODES = frozenset({"INTERNAL_ERROR", "RECORD_LOCKED", "TOO_MANY_REQUESTS"})


class ZohoWrites(ZohoReads):
    """Push's writes: each batch one request, its answers matched to the items by position."""

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        self.triggers: list[str] = ["workflow", "approval", "blueprint"] if ctx.options.get("trigger_workflows") else []

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
