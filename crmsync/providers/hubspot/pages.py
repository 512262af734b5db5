"""One page of records: list and search requests, records from raw bodies, their associations."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from crmsync.providers.base import RemoteRecord, chunks
from crmsync.providers.hubspot.schema import HubSpotSchema
from crmsync.providers.hubspot.values import (
    LIST_PAGE,
    MARKER,
    PULL_ASSOCIATIONS,
    SEARCH_AHEAD,
    SEARCH_CAP,
    SEARCH_PAGE,
    _plural,
    modified_prop,
    parse_ts,
)


class HubSpotPages(HubSpotSchema):
    """Single list and search requests, and the associations of the records they return."""

    # -- pull ------------------------------------------------------------------------------------
    def _record(self, obj: str, raw: dict[str, Any]) -> RemoteRecord:
        assoc: dict[str, list[str]] = {}
        for to, block in (raw.get("associations") or {}).items():
            ids = sorted({str(a["id"]) for a in block.get("results", [])})
            assoc[_plural(to)] = ids
        props = raw.get("properties") or {}
        return RemoteRecord(
            id=str(raw["id"]),
            properties=props,
            updated_at=parse_ts(raw.get("updatedAt")) or parse_ts(props.get(modified_prop(obj))),
            archived=bool(raw.get("archived")),
            associations=assoc,
        )

    def read_associations(self, obj: str, ids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        """Linked ids per record, one v4 batch read per target type and 1,000 ids."""
        out: dict[str, dict[str, list[str]]] = {i: {} for i in ids}
        for to in PULL_ASSOCIATIONS.get(obj, []):
            for chunk in chunks(list(ids), 1000):
                body = self.http.post(
                    f"/crm/v4/associations/{obj}/{to}/batch/read",
                    json={"inputs": [{"id": i} for i in chunk]},
                    endpoint="/crm/v4/associations/{from}/{to}/batch/read",
                    expect=(207,),
                ).json()
                for i in chunk:
                    out[i][to] = []
                for result in body.get("results", []):
                    rid = str(result.get("from", {}).get("id"))
                    if rid in out:
                        out[rid][to] = sorted({str(t["toObjectId"]) for t in result.get("to", [])})
        return out

    def _with_associations(self, obj: str, records: list[RemoteRecord]) -> list[RemoteRecord]:
        """Search results carry no associations: read them in one v4 batch per target type."""
        if not records or not PULL_ASSOCIATIONS.get(obj):
            return records
        links = self.read_associations(obj, [r.id for r in records])
        for r in records:
            r.associations.update(links.get(r.id, {}))
        return records

    def _list(self, obj: str, fields: Sequence[str], *, after: str | None, archived: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": LIST_PAGE, "properties": ",".join(fields), "archived": str(archived).lower()}
        if PULL_ASSOCIATIONS.get(obj) and not archived:
            params["associations"] = ",".join(PULL_ASSOCIATIONS[obj])
        if after:
            params["after"] = after
        return self.http.get(f"/crm/v3/objects/{obj}", params=params, endpoint="/crm/v3/objects/{type}").json()

    def _search(
        self,
        obj: str,
        groups: list[list[dict[str, Any]]],
        sort: str,
        fields: Sequence[str],
        after: int,
        *,
        limit: int = SEARCH_PAGE,
    ) -> dict[str, Any]:
        """One search page; ``groups`` are filter groups (ANDed filters, the groups ORed)."""
        body = {
            "filterGroups": [{"filters": filters} for filters in groups],
            "sorts": [sort],
            "properties": list(fields),
            "limit": limit,
            "after": str(after),
        }
        return self.http.post(
            f"/crm/v3/objects/{obj}/search", json=body, bucket="search", endpoint="/crm/v3/objects/{type}/search"
        ).json()

    def _marker_filter(self, obj: str) -> list[dict[str, Any]]:
        # Only the calls crmsync logged are pulled (a portal's own call log is not ours to mirror).
        if obj == "calls":
            return [{"propertyName": MARKER, "operator": "HAS_PROPERTY"}]
        return []

    def _search_pages(
        self,
        obj: str,
        groups: list[list[dict[str, Any]]],
        sort: str,
        fields: Sequence[str],
        *,
        expect: int = 0,
        first: dict[str, Any] | None = None,
    ) -> Iterator[tuple[dict[str, Any], list[RemoteRecord]]]:
        """A search's pages in order, with their associations, the next SEARCH_AHEAD asked for at once.

        A search's ``after`` is an offset, so once a page tells the total, the pages after it can
        be asked for side by side (the search limit still paces them): one object's walk no longer
        waits two round trips (search, then associations) per page and leaves the search budget
        idle. Pages past the 10,000 cap are never asked for; the caller re-anchors there.
        ``expect``: the total when the caller knows it, so the first pages go at once too.
        ``first``: the answer for offset 0 when the caller already asked for it.
        """
        given = [first] if first is not None else []

        def fetch(offset: int) -> tuple[dict[str, Any], list[RemoteRecord]]:
            body = given.pop() if offset == 0 and given else self._search(obj, groups, sort, fields, offset)
            return body, self._with_associations(obj, [self._record(obj, r) for r in body.get("results", [])])

        ahead: deque[tuple[int, Future[tuple[dict[str, Any], list[RemoteRecord]]]]] = deque()
        pool: ThreadPoolExecutor | None = None
        expected, total, planned = 0, min(expect, SEARCH_CAP), 0

        def fill() -> None:
            nonlocal pool, planned
            while len(ahead) < SEARCH_AHEAD and planned < total and planned + SEARCH_PAGE <= SEARCH_CAP:
                pool = pool or ThreadPoolExecutor(max_workers=SEARCH_AHEAD, thread_name_prefix=f"search-{obj}")
                ahead.append((planned, pool.submit(fetch, planned)))
                planned += SEARCH_PAGE

        try:
            if total > SEARCH_PAGE:
                fill()
            while True:
                if ahead and ahead[0][0] == expected:
                    body, records = ahead.popleft()[1].result()
                else:
                    for _, f in ahead:
                        f.cancel()
                    ahead.clear()
                    body, records = fetch(expected)
                    planned = expected + SEARCH_PAGE
                yield body, records
                nxt = ((body.get("paging") or {}).get("next") or {}).get("after")
                if not nxt or not records:
                    return
                expected = int(nxt)
                total = min(int(body.get("total") or 0), SEARCH_CAP)  # the answer, not a caller's estimate
                planned = max(planned, expected)
                fill()
        finally:
            for _, f in ahead:
                f.cancel()
            if pool is not None:
                pool.shutdown(wait=False)
