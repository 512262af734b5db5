"""Writing records: batch upserts, queued associations, calls with their unique marker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crmsync.errors import FatalProviderError
from crmsync.http import UnconfirmedWrite
from crmsync.providers.base import ItemResult, Outgoing, OutgoingActivity, chunks
from crmsync.providers.hubspot.reads import HubSpotReads
from crmsync.providers.hubspot.values import BATCH, COMPANY_KEY, DEAL_KEY, MARKER, _inline_associations


class HubSpotWrites(HubSpotReads):
    """Batch upserts, associations queued until ``flush``, and calls."""

    def upsert(self, obj: str, items: Sequence[Outgoing]) -> list[ItemResult]:
        results: dict[str, ItemResult] = {}
        updates = [i for i in items if i.remote_id]
        blind = [i for i in items if not i.remote_id and i.create_only and obj in self.optimistic_creates]
        blind_refs = {i.ref for i in blind}
        creates = [i for i in items if not i.remote_id and i.ref not in blind_refs]
        if blind:
            results.update(self._create_only(obj, blind))
        for item in [i for i in updates if not i.properties]:
            # Nothing to change, only links to make (an existing record meets a new company): no write.
            results[item.ref] = ItemResult(item.ref, True, remote_id=item.remote_id, created=False)
        updates = [i for i in updates if i.properties]
        if updates:
            inputs = [{"id": i.remote_id, "properties": i.properties, "objectWriteTraceId": i.ref} for i in updates]
            results.update(self._batch(obj, "update", inputs, updates, created=False))
        keyed = {"contacts": "email", "companies": COMPANY_KEY, "deals": DEAL_KEY}
        upserts, plain = [], []
        for item in creates:
            name, value = next(iter(item.match.items())) if item.match else ("", "")
            if obj == "contacts" and name == "email":
                upserts.append((item, "email", value))
            elif obj in ("companies", "deals") and obj in keyed:
                key_value = item.match.get("key") or f"{name}:{value}"
                item.properties = {**item.properties, keyed[obj]: key_value}
                upserts.append((item, keyed[obj], key_value))
            else:
                plain.append(item)
        if upserts:
            inputs = [
                {"idProperty": prop, "id": value, "properties": i.properties, "objectWriteTraceId": i.ref}
                for i, prop, value in upserts
            ]
            results.update(self._batch(obj, "upsert", inputs, [u[0] for u in upserts], created=None))
        if plain:
            # No unique key guards these: a create whose answer was lost is looked up, not re-sent. The
            # spec requires `associations` on every create input; the links go in one v4 batch (flush).
            creating = [{"properties": i.properties, "associations": [], "objectWriteTraceId": i.ref} for i in plain]
            results.update(self._batch(obj, "create", creating, plain, created=True, replay=False))
        self._associate(
            obj,
            [
                i
                for i in items
                if i.associations and i.ref not in blind_refs and results.get(i.ref, ItemResult(i.ref, False)).ok
            ],
            results,
        )
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no result from HubSpot", retriable=True)
            for i in items
        ]

    def _create_only(self, obj: str, items: Sequence[Outgoing]) -> dict[str, ItemResult]:
        """Batch-create records believed new, links inline; an existing email or key answers CONFLICT."""
        inputs = []
        for item in items:
            props = dict(item.properties)
            if obj == "contacts":
                props.setdefault("email", item.match.get("email", ""))
            else:
                props[DEAL_KEY] = item.match.get("key") or props.get(DEAL_KEY)
            inputs.append(
                {
                    "properties": props,
                    "associations": _inline_associations(obj, item.associations),
                    "objectWriteTraceId": item.ref,
                }
            )
        return self._batch(obj, "create", inputs, items, created=True)

    def _batch(
        self,
        obj: str,
        action: str,
        inputs: list[dict[str, Any]],
        items: Sequence[Any],
        *,
        created: bool | None,
        replay: bool = True,
    ) -> dict[str, ItemResult]:
        """One batch request; 207 errors become per-item failures, matched by objectWriteTraceId.

        ``replay=False``: a lost answer is not retried but reported per item as ``unconfirmed``.
        """
        results: dict[str, ItemResult] = {}
        try:
            response = self.http.post(
                f"/crm/v3/objects/{obj}/batch/{action}",
                json={"inputs": inputs},
                endpoint=f"/crm/v3/objects/{{type}}/batch/{action}",
                expect=(207,),
                replay=replay,
            )
        except UnconfirmedWrite as exc:
            return {i.ref: ItemResult(i.ref, False, error=str(exc), retriable=True, unconfirmed=True) for i in items}
        except FatalProviderError as exc:
            if action == "create" and exc.status == 409:
                # A whole batch refused for the first key or marker it already holds (nothing was
                # created): every item is looked up by the engine, and what is not there sent again.
                return {i.ref: ItemResult(i.ref, False, error=str(exc), exists=True) for i in items}
            if len(items) == 1:
                return {items[0].ref: ItemResult(items[0].ref, False, error=str(exc))}
            # One bad input can fail the whole request (400): split and retry so it fails alone.
            half = len(items) // 2
            results.update(self._batch(obj, action, inputs[:half], items[:half], created=created, replay=replay))
            results.update(self._batch(obj, action, inputs[half:], items[half:], created=created, replay=replay))
            return results
        body = response.json()
        refs = [i.ref for i in items]
        for pos, raw in enumerate(body.get("results", [])):
            ref = raw.get("objectWriteTraceId")
            if ref not in refs:
                ref = self._correlate(obj, action, raw, items, results) or (refs[pos] if pos < len(refs) else None)
            if ref is None:
                continue
            is_new = raw.get("new") if created is None else created
            results[ref] = ItemResult(ref, True, remote_id=str(raw["id"]), created=bool(is_new))
        for err in body.get("errors", []):
            context = err.get("context") or {}
            trace = context.get("objectWriteTraceId") or []
            failed = [t for t in trace if t in refs] or self._error_refs(err, inputs, items)
            message = err.get("message") or err.get("category") or "failed"
            retriable = str(err.get("status", "")).startswith("5") or err.get("category") == "RATE_LIMITS"
            exists = action == "create" and err.get("category") == "CONFLICT"
            for ref in failed:
                if ref not in results:
                    results[ref] = ItemResult(ref, False, error=message, retriable=retriable, exists=exists)
        return results

    def _correlate(
        self, obj: str, action: str, raw: dict[str, Any], items: Sequence[Any], done: dict[str, ItemResult]
    ) -> str | None:
        """Match a result without a trace id back to its input by its key or id."""
        props = raw.get("properties") or {}
        for item in items:
            if item.ref in done:
                continue
            if getattr(item, "remote_id", None) and str(item.remote_id) == str(raw.get("id")):
                return str(item.ref)
            marker = getattr(item, "marker", None)
            if marker and props.get(MARKER) == marker:
                return str(item.ref)
            for prop in ("email", DEAL_KEY, COMPANY_KEY):
                if prop in item.properties and str(props.get(prop, "")).lower() == str(item.properties[prop]).lower():
                    return str(item.ref)
        return None

    def _error_refs(self, err: dict[str, Any], inputs: list[dict[str, Any]], items: Sequence[Any]) -> list[str]:
        context = err.get("context") or {}
        values = {str(v).lower() for vals in context.values() if isinstance(vals, list) for v in vals}
        refs = []
        for inp, item in zip(inputs, items, strict=False):
            keys = {str(inp.get("id", "")).lower(), *(str(v).lower() for v in (inp.get("properties") or {}).values())}
            if values & keys:
                refs.append(item.ref)
        return refs

    def _associate(self, obj: str, items: Sequence[Outgoing], results: dict[str, ItemResult]) -> None:
        """Queue contact->company, deal->contact/company links; ``flush`` sends them in bulk."""
        with self._lock:
            for item in items:
                rid = results[item.ref].remote_id
                for to, to_id in item.associations.items():
                    if rid and to_id:
                        self._pending_links.setdefault((obj, to), []).append((rid, to_id))

    def flush(self, obj: str) -> None:
        """Send the queued links of ``obj``: one v4 request per 2,000 pairs, not one per upsert batch."""
        with self._lock:
            queued = {key: pairs for key, pairs in self._pending_links.items() if key[0] == obj}
            for key in queued:
                del self._pending_links[key]
        for (_, to), links in queued.items():
            for chunk in chunks(links, 2000):
                self.http.post(
                    f"/crm/v4/associations/{obj}/{to}/batch/associate/default",
                    json={"inputs": [{"from": {"id": a}, "to": {"id": b}} for a, b in chunk]},
                    endpoint="/crm/v4/associations/{from}/{to}/batch/associate/default",
                    expect=(207,),
                )

    def create_activities(self, obj: str, items: Sequence[OutgoingActivity]) -> list[ItemResult]:
        self.prepare_objects([obj])
        inputs: list[dict[str, Any]] = []
        for item in items:
            inputs.append(
                {
                    "properties": {**item.properties, MARKER: item.marker},
                    "associations": _inline_associations(obj, item.associations),
                    "objectWriteTraceId": item.ref,
                }
            )
        # Not replayed: the engine tells a lost answer (ours, look it up) from a unique-value
        # conflict met first time (``exists``: logged before, by another store).
        results = self._batch(obj, "create", inputs, items, created=True, replay=False)
        return [
            results.get(i.ref) or ItemResult(i.ref, False, error="no result from HubSpot", retriable=True)
            for i in items
        ]

    def find_activities(
        self, obj: str, markers: Sequence[str], *, context: Sequence[OutgoingActivity] = ()
    ) -> dict[str, str]:
        if f"{obj}.{MARKER}" not in self._ensured and MARKER not in self._properties(obj):
            return {}
        found: dict[str, str] = {}
        for chunk in chunks(list(dict.fromkeys(markers)), BATCH):
            body = self.http.post(
                f"/crm/v3/objects/{obj}/batch/read",
                json={
                    "properties": [MARKER],
                    "propertiesWithHistory": [],
                    "idProperty": MARKER,
                    "inputs": [{"id": m} for m in chunk],
                },
                endpoint="/crm/v3/objects/{type}/batch/read",
                expect=(207, 404),
            ).json()
            for raw in body.get("results", []):
                marker = (raw.get("properties") or {}).get(MARKER)
                if marker:
                    found[marker] = str(raw["id"])
        return found
