"""Reading records with COQL: the keyset walk and deletions (``changes``), ``fetch``, ``list_ids``, ``lookup``."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from crmsync.http import deferring
from crmsync.providers import partitions
from crmsync.providers.base import (
    Page,
    ProviderContext,
    RemoteRecord,
    chunks,
    match_key,
    run_ahead,
    walk_both_ends,
)
from crmsync.providers.zoho.partitioned import ZohoPartitioned, band
from crmsync.providers.zoho.values import (
    BATCH,
    COQL_COLUMNS,
    COQL_CRITERIA,
    COQL_IN,
    COQL_ROWS,
    DEAL_KEY,
    LINK_TARGETS,
    LINKS,
    MARKER,
    MODULES,
    PARTITION_MIN,
    SE_MODULE_OBJECT,
    _in_groups,
    _json,
    _nest,
    _phone_key,
    domain_of,
    parse_ts,
    quote,
    zoho_time,
)

_Key = tuple[datetime, int]  # where a record sits in a walk: (Modified_Time, id)
_Low = tuple[datetime, int | str | None]  # a walk's lower end: a key, or a time with no id yet
PHONE_SEARCHES = 20  # search calls per lookup batch for phones COQL could not match exactly


class ZohoReads(ZohoPartitioned):
    """Pull's reads and push's look-ups by key: every query for records of a module lives here."""

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        self.lookback = timedelta(seconds=float(ctx.options.get("lookback_seconds") or 30.0))

    # -- pull ------------------------------------------------------------------------------------
    def _columns(self, obj: str, fields: Sequence[str]) -> list[str]:
        """What to select: the mapping's fields, Modified_Time and the lookups behind associations."""
        wanted = [f for f in fields if f not in ("id", "$se_module")]
        return list(dict.fromkeys(["Modified_Time", *(f for f, _ in LINKS.get(obj, [])), *wanted]))

    def _record(self, obj: str, row: dict[str, Any]) -> RemoteRecord:
        if isinstance(row.get("Owner"), dict):
            row = {**row, "Owner": row["Owner"].get("id")}  # the user id, as push writes it
        assoc: dict[str, list[str]] = {t: [] for t in LINK_TARGETS.get(obj, [])}
        for field, target in LINKS.get(obj, []):
            value = row.get(field)
            rid = value.get("id") if isinstance(value, dict) else value
            if not rid:
                continue
            target = target or SE_MODULE_OBJECT.get(str(row.get("$se_module") or ""))
            if target:
                assoc.setdefault(target, []).append(str(rid))
        return RemoteRecord(
            id=str(row["id"]),
            properties=row,
            updated_at=parse_ts(row.get("Modified_Time")),
            associations={k: sorted(set(v)) for k, v in assoc.items()},
        )

    def _select(
        self, obj: str, columns: list[str], where: str, order: str, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """A COQL select of any width: the first 50 columns here, the rest joined by id."""
        module = MODULES[obj]
        head, tail = columns[:COQL_COLUMNS], columns[COQL_COLUMNS:]
        rows, more = self._coql(
            f"select {', '.join(head)} from {module} where {where} order by {order} limit {limit}", limit
        )
        for extra in chunks(tail, COQL_COLUMNS):
            by_id = {str(r["id"]): r for r in rows}
            per_query = COQL_IN * COQL_CRITERIA
            for ids in chunks(list(by_id), per_query):
                cond = _nest("or", [f"id in ({', '.join(g)})" for g in chunks(ids, COQL_IN)])
                part, _ = self._coql(
                    f"select {', '.join(extra)} from {module} where {cond} limit {COQL_ROWS}", COQL_ROWS
                )
                for r in part:
                    by_id.get(str(r["id"]), {}).update({k: v for k, v in r.items() if k != "id"})
        return rows, more

    def changes(
        self,
        obj: str,
        cursor: dict[str, Any] | None,
        *,
        fields: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Page]:
        if obj in ("calls", "tasks") and not self._has_field(obj, MARKER):
            return  # crmsync never logged one here: nothing of ours to pull
        columns = self._columns(obj, fields)
        if (cursor or {}).get("mode") == "partitioned":
            assert cursor is not None
            plan = self._stored_plan(cursor)
            if plan is not None:
                yield from self._partitioned(obj, plan, columns, cursor)
                return
            # Not a plan of ours (another version, a damaged row): walk again from where it began;
            # what was stored meanwhile is read again and found unchanged.
            base = cursor.get("base")
            cursor = dict(base) if isinstance(base, dict) and parse_ts(base.get("ts")) else None
        upper = (until or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        state = dict(cursor or {})
        if not state:
            start = since.astimezone(UTC) if since else datetime(1970, 1, 1, tzinfo=UTC)
            # A first run reads every live record; deletions matter from the moment it starts.
            state = {"ts": zoho_time(start), "id": None, "deleted_ts": zoho_time(since or upper)}
            ts, last_id = start, None
        else:
            ts = parse_ts(state.get("ts")) or datetime(1970, 1, 1, tzinfo=UTC)
            last_id = state.get("id")
            # The cursor is exact, except near the last run's upper bound ("hi"): a write that
            # committed after that query can carry an earlier Modified_Time (whole seconds, a
            # write in flight, another clock). Re-read that short window; far behind it, thousands
            # of records sharing the cursor's second are not read again.
            hi = parse_ts(state.get("hi")) or ts
            if ts >= hi - self.lookback:
                ts, last_id = min(ts, hi - self.lookback), None
        state["hi"] = zoho_time(upper)
        deleted_ts = state.get("deleted_ts")

        planning = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plan-{obj}")
        edges: list[Future[tuple[int, int] | None]] = []
        seen: list[int] = []  # rows each query answered (both ends)

        def select(low: _Low, high: _Key | None, desc: bool) -> tuple[list[dict[str, Any]], bool]:
            """One page of the keys above ``low`` and below ``high`` (or up to ``upper``), from either end."""
            order = "Modified_Time desc, id desc" if desc else "Modified_Time asc, id asc"
            where = _nest("and", [*band(low, high, upper), *self._scope(obj)])
            rows, more = self._select(obj, columns, where, order, COQL_ROWS)
            seen.append(len(rows))
            if more and rows and not desc and not edges and self.coql_slots > 1:
                if sum(seen) + 2 * COQL_ROWS >= PARTITION_MIN:
                    # The next round may reach the threshold: the ids of what is left are asked for
                    # beside it, so a walk that turns out large splits without waiting for them.
                    edges.append(planning.submit(self._id_edges, obj, key(rows[-1]), None, upper))
            return rows, more

        def key(row: dict[str, Any]) -> _Key:
            return (parse_ts(row.get("Modified_Time")) or ts, int(row["id"]))

        def answers() -> Iterator[tuple[Any, Any]]:
            """Pages of the walk, the deletions (asked for alongside it) once they are known, and,
            once the ends have read PARTITION_MIN rows without meeting, the band left between them."""
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"coql-{obj}") as pool:
                # Asked for once two rounds are in (a page, then one from each end): the rounds where
                # every object's walk starts and widens take the slots first.
                gone: Future[tuple[list[str], str]] | None = None
                told = False
                low: _Low = (ts, last_id)
                high: _Key | None = None
                top: _Key | None = None
                read = 0
                walk = walk_both_ends(select, key, low, pool)
                try:
                    for n, page in enumerate(walk, 1):
                        rows, mark = page
                        read += len(rows)
                        if mark is not None:
                            low = mark
                        elif rows:  # a page from the top, in descending order
                            top, high = top or key(rows[0]), key(rows[-1])
                        yield page
                        if mark is None and read >= PARTITION_MIN and low[1] is not None and edges:
                            # A round's edge and the ends have not met: the band between them is
                            # read as id ranges; nothing more is asked for here.
                            if gone is not None and not told:
                                told = True
                                yield None, gone.result()
                            yield "band", (low, high, top or low, told)
                            return
                        if gone is None:
                            if n >= 3:
                                gone = pool.submit(self._deletions, obj, deleted_ts, upper)
                        elif not told and gone.done():
                            told = True
                            yield None, gone.result()
                finally:
                    close = getattr(walk, "close", None)
                    if close is not None:  # no round is asked for after the switch
                        close()
                if not told:
                    yield None, (gone or pool.submit(self._deletions, obj, deleted_ts, upper)).result()

        # Each page's query needs the last row of the one before. A thread of the walk's own asks
        # for the next page as soon as that row is known; building this page's records and a busy
        # consumer happen elsewhere, so the chain of requests waits on nothing but the CRM.
        try:
            for rows, mark in run_ahead(answers(), 2, name=f"coql-{obj}"):
                if rows is None:
                    ids, newest = mark
                    state = {**state, "deleted_ts": newest}
                    yield Page(records=[], cursor=dict(state), deleted=ids)
                    continue
                if isinstance(rows, str):  # the band between the ends: read as id ranges side by side
                    yield from self._split(obj, state, columns, mark, upper, edges[0].result())
                    return
                if mark is not None:
                    state = {**state, "ts": zoho_time(mark[0]), "id": str(mark[1])}
                yield Page(records=[self._record(obj, r) for r in rows], cursor=dict(state) if mark else None)
        finally:
            planning.shutdown(wait=False, cancel_futures=True)

    def _split(
        self,
        obj: str,
        state: dict[str, Any],
        columns: list[str],
        ends: tuple[_Key, _Key | None, _Key, bool],
        upper: datetime,
        edges: tuple[int, int] | None,
    ) -> Iterator[Page]:
        """The band between a walk's ends read as id ranges; the plan is stored before any range is."""
        low, high, newest, told = ends
        plan = self._plan_partitions(obj, state, low, high, newest, upper, told, edges)
        if plan is not None:
            yield Page(records=[], cursor=partitions.compose({}, **plan))
            yield from self._partitioned(obj, plan, columns)
            return
        # Nothing was left between the ends when their ids were asked for: the walk is over.
        final = {**state, "ts": zoho_time(newest[0]), "id": str(newest[1])}
        if told:
            yield Page(records=[], cursor=final)
            return
        ids, gone_ts = self._deletions(obj, state.get("deleted_ts"), upper)
        yield Page(records=[], cursor={**final, "deleted_ts": gone_ts}, deleted=ids)

    def _deletions(self, obj: str, deleted_ts: str | None, upper: datetime) -> tuple[list[str], str]:
        """Records deleted since the last run (recycle bin and beyond): their ids and the new mark.

        Asked for alongside the walk, as a request that takes a slot only when no page waits for
        one. A page and the deletions are applied in the order they were answered, so a record
        restored or deleted while both were read ends as the later answer says (and a deletion
        answered a moment early is read again next run: the mark keeps a look-back).
        """
        known = parse_ts(deleted_ts) or upper
        since = known - self.lookback
        newest = known
        ids: list[str] = []
        page = 1
        with deferring():
            while True:
                self._spend(1)
                r = self.http.get(
                    f"/{MODULES[obj]}/deleted",
                    params={"type": "all", "page": page, "per_page": 200},
                    headers={"If-Modified-Since": zoho_time(since)},
                    endpoint="/{module}/deleted",
                    expect=(304,),
                )
                body = _json(r)
                for d in body.get("data") or []:
                    ids.append(str(d["id"]))
                    newest = max(newest, parse_ts(d.get("deleted_time")) or newest)
                if not (body.get("info") or {}).get("more_records"):
                    break
                page += 1
        return ids, zoho_time(min(newest, upper))

    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        columns = self._columns(obj, fields)
        out: dict[str, dict[str, Any]] = {}
        for chunk in chunks(list(dict.fromkeys(str(i) for i in ids)), BATCH):
            for cols in chunks(columns, COQL_COLUMNS):
                r = self._get(
                    f"/{MODULES[obj]}",
                    params={"ids": ",".join(chunk), "fields": ",".join(cols), "per_page": BATCH},
                    endpoint="/{module}",
                )
                for row in _json(r).get("data") or []:
                    out.setdefault(str(row["id"]), {}).update(row)
        return [self._record(obj, row) for row in out.values()]

    def list_ids(self, obj: str) -> Iterator[list[str]]:
        last: str | None = None
        while True:
            cond = [f"id > {int(last)}" if last else "id is not null", *self._scope(obj)]
            rows, more = self._coql(
                f"select id from {MODULES[obj]} where {_nest('and', cond)} order by id asc limit {COQL_ROWS}", COQL_ROWS
            )
            ids = [str(r["id"]) for r in rows]
            if ids:
                yield ids
            if not more or not ids:
                return
            last = ids[-1]

    # -- push ------------------------------------------------------------------------------------
    #: Canonical match kind -> the field it is looked up by, per object type.
    MATCH_FIELDS: dict[str, dict[str, str]] = {
        "contacts": {"email": "Email", "phone": "Phone"},
        "companies": {"name": "Account_Name", "domain": "Website"},
        "deals": {"key": DEAL_KEY},
    }

    @staticmethod
    def _normalise(kind: str, value: Any) -> str:
        if kind == "phone":
            return _phone_key(value)
        if kind == "domain":
            return domain_of(value)
        return str(value or "").strip().lower()

    def lookup_batch(self, obj: str, kind: str) -> int:
        # Exact keys go in 25 IN groups of 50 values: one COQL per 1,250 keys, not per 100 (a
        # 10,000-outcome push: 8 queries for its contacts, was 100). Domains need a LIKE each, and
        # phones may need a search call each: those stay at one write batch.
        return COQL_IN * COQL_CRITERIA if kind in ("email", "key") else self.batch_size

    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        found: dict[str, RemoteRecord] = {}
        by_kind: dict[str, list[str]] = {}
        for k in keys:
            kind, value = next(iter(k.items()))
            by_kind.setdefault(kind, []).append(value)
        for kind, values in by_kind.items():
            field = self.MATCH_FIELDS.get(obj, {}).get(kind)
            if field is None or (field == DEAL_KEY and not self._has_field(obj, DEAL_KEY)):
                continue
            wanted = set(values)
            columns = list(dict.fromkeys([*self._columns(obj, fields), field]))
            if kind == "domain":
                # Website holds a URL: match by substring, then compare the bare domains here.
                conds = [f"{field} like {quote('%' + v + '%')}" for v in dict.fromkeys(values)]
                queries: list[tuple[str, list[str]]] = [(_nest("or", c), []) for c in chunks(conds, COQL_CRITERIA)]
            else:
                per_query = COQL_IN * COQL_CRITERIA
                queries = [(_in_groups(field, c), c) for c in chunks(list(dict.fromkeys(values)), per_query)]
            while queries:
                where, asked = queries.pop()
                # Ordered by id, each key's oldest record comes first.
                rows, more = self._select(obj, columns, where, "id asc", COQL_ROWS)
                for row in rows:
                    value = self._normalise(kind, row.get(field))
                    if value in wanted:
                        found.setdefault(match_key({kind: value}), self._record(obj, row))
                missing = [v for v in asked if match_key({kind: v}) not in found]
                if more and missing:
                    # 2,000 rows and more (duplicates in the CRM): keys past the cut were not seen.
                    # Ask again for those: fewer each time (the rows seen matched some), so it ends.
                    queries.append((_in_groups(field, missing), missing))
            if kind == "phone":
                self._lookup_phones(obj, [v for v in dict.fromkeys(values) if f"phone:{v}" not in found], found)
        return found

    def _lookup_phones(self, obj: str, phones: Sequence[str], found: dict[str, RemoteRecord]) -> None:
        """Phones typed in Zoho's UI carry spaces and dashes, which COQL's ``in`` cannot see past:
        the search API's ``phone`` parameter matches across formats (one call per number, so capped)."""
        for phone in list(phones)[:PHONE_SEARCHES]:
            digits = re.sub(r"\D", "", phone)
            if len(digits) < 3:
                continue
            r = self._get(
                f"/{MODULES[obj]}/search", params={"phone": digits, "per_page": 10}, endpoint="/{module}/search"
            )
            for row in _json(r).get("data") or []:
                if any(re.sub(r"\D", "", str(row.get(f) or "")) == digits for f in ("Phone", "Mobile", "Home_Phone")):
                    found.setdefault(match_key({"phone": phone}), self._record(obj, row))
                    break
