"""Reading records: write_date windows paged by id (``changes``), ``fetch``, ``list_ids`` and push's ``lookup``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from crmsync.errors import ConfigError, UsageError
from crmsync.providers.base import (
    Page,
    ProviderContext,
    RemoteRecord,
    chunks,
    match_key,
    walk_both_ends,
)
from crmsync.providers.odoo import partitioned
from crmsync.providers.odoo.schema import OdooSchema
from crmsync.providers.odoo.values import (
    BATCH,
    CALL_XMLID,
    DEAL_KEY_FIELD,
    IDS_PLAN_MAX,
    MARKER_FIELD,
    MARKER_HTML_RE,
    MARKER_RE,
    PARTITION_MIN,
    TASK_SUFFIX,
    done_note,
    done_summary,
    format_dt,
    html_text,
    m2o_id,
    or_domain,
    parse_dt,
    phone_digits,
    url_host,
)

PAGE = 200
LIST_PAGE = 5000
OVERLAP_SECONDS = 600.0
SETTLE_SECONDS = 5.0
ACTIVE_TOO = {"active_test": False}  # archived rows are read too: pull mirrors archiving

log = logging.getLogger("crmsync.odoo")


class OdooReads(OdooSchema):
    """Pull's reads and push's look-ups by key: every search for records of an object lives here."""

    def __init__(self, ctx: ProviderContext) -> None:
        super().__init__(ctx)
        settings = ctx.settings
        options = ctx.options or {}
        self.overlap = float(options.get("overlap_seconds") or settings.get("overlap_seconds") or OVERLAP_SECONDS)
        self.settle = float(settings.get("settle_seconds", SETTLE_SECONDS))
        self.page_size = int(settings.get("page_size") or PAGE)
        self.partition_min = int(settings.get("partition_min") or PARTITION_MIN)
        self._turns: partitioned.Turns | None = None

    def _calls_from_messages(self) -> bool:
        # Up to 18 a done activity is deleted: only its chatter message is left to read.
        return self._major() < 19 and not self.ctx.settings.get("calls_from_activities")

    def _source(self, obj: str) -> tuple[str, list[Any]]:
        """(model, domain) that selects ``obj``'s records."""
        if obj == "contacts":
            return "res.partner", [("is_company", "=", False)]
        if obj == "companies":
            return "res.partner", [("is_company", "=", True)]
        if obj == "deals":
            if not self._has_model("crm.lead"):
                raise ConfigError(f"the CRM app is not installed on database {self.db!r}: no deals to pull")
            return "crm.lead", [("type", "=", "opportunity")]
        if obj in ("calls", "tasks"):
            call_type = self._activity_types().get(CALL_XMLID)
            type_leaf = ("activity_type_id", "=", call_type or 0)
            if obj == "calls" and self._calls_from_messages():
                # Only the calls crmsync logged: a database's own chatter is not ours to mirror.
                return "mail.message", [
                    ("model", "in", ["res.partner", "crm.lead"]),
                    ("mail_activity_type_id", "=", call_type or 0),
                    ("body", "ilike", "[crmsync:"),
                    ("body", "not ilike", f"{TASK_SUFFIX}]"),
                ]
            if MARKER_FIELD in self._model_fields("mail.activity"):
                marker = [(MARKER_FIELD, "!=", False), (MARKER_FIELD, "not ilike", TASK_SUFFIX)]
            else:
                marker = [("note", "ilike", "[crmsync:"), ("note", "not ilike", f"{TASK_SUFFIX}]")]
            if obj == "tasks":
                return "mail.activity", [("note", "ilike", f"{TASK_SUFFIX}]")]
            # Follow-up tasks carry markers too (``<outcome>:task``): they are not logged calls.
            return "mail.activity", [type_leaf, *marker]
        raise UsageError(f"Odoo cannot pull {obj}")

    def _read_fields(self, obj: str, model: str, fields: Sequence[str]) -> list[str]:
        """The mapping's fields as Odoo names (pseudo-fields translated), plus what pull itself needs."""
        wanted: list[str] = []
        for name in fields:
            if name == "stage_name":
                wanted.append("stage_id")
            elif name == "activity_type_xmlid":
                wanted.append("mail_activity_type_id" if model == "mail.message" else "activity_type_id")
            elif name == "crmsync_marker":
                text_field = "body" if model == "mail.message" else "note"
                wanted.append(MARKER_FIELD if MARKER_FIELD in self._model_fields(model) else text_field)
            elif model == "mail.message":
                wanted.append({"note": "body", "date_deadline": "date"}.get(name, name))
            else:
                wanted.append(name)
        extra = {
            "res.partner": ["write_date", "active", "parent_id", "is_company"],
            "crm.lead": ["write_date", "active", "partner_id", "stage_id"],
            "mail.activity": ["write_date", "res_model", "res_id", "note", "activity_type_id"],
            "mail.message": ["write_date", "model", "res_id", "body", "date", "mail_activity_type_id"],
        }[model]
        names = list(dict.fromkeys([*wanted, *extra]))
        if model == "mail.message":
            names = [n for n in names if n not in ("summary",)]
        return self._available(model, names)

    def _records(self, obj: str, model: str, rows: list[dict[str, Any]]) -> list[RemoteRecord]:
        partners: dict[int, dict[str, Any]] = {}
        if model == "crm.lead":
            ids = sorted({pid for r in rows if (pid := m2o_id(r.get("partner_id")))})
            if ids:
                for p in self._call(
                    "res.partner",
                    "read",
                    ids,
                    fields=["is_company", "parent_id"],
                    context={"active_test": False},
                ):
                    partners[int(p["id"])] = p
        return [self._record(obj, model, row, partners) for row in rows]

    def _record(
        self, obj: str, model: str, row: dict[str, Any], partners: Mapping[int, dict[str, Any]] | None = None
    ) -> RemoteRecord:
        props = {k: v for k, v in row.items() if k != "id"}
        assoc: dict[str, list[str]] = {}
        archived = False
        if model == "res.partner":
            archived = row.get("active") is False
            if obj == "contacts":
                parent = m2o_id(row.get("parent_id"))
                assoc["companies"] = [str(parent)] if parent else []
        elif model == "crm.lead":
            archived = row.get("active") is False
            if "stage_id" in row:
                props["stage_name"] = row["stage_id"][1] if row["stage_id"] else False
            pid = m2o_id(row.get("partner_id"))
            partner = (partners or {}).get(pid or 0)
            assoc = {"contacts": [], "companies": []}
            if pid and partner is not None:
                if partner.get("is_company"):
                    assoc["companies"] = [str(pid)]
                else:
                    assoc["contacts"] = [str(pid)]
                    parent = m2o_id(partner.get("parent_id"))
                    if parent:
                        assoc["companies"] = [str(parent)]
        else:
            html_field = "body" if model == "mail.message" else "note"
            text = row.get(html_field) or ""
            marker = row.get(MARKER_FIELD) or (m.group(1) if (m := MARKER_RE.search(str(text))) else False)
            props["crmsync_marker"] = marker
            if isinstance(text, str):
                note = done_note(text) if model == "mail.message" else text
                props["note"] = html_text(MARKER_HTML_RE.sub("", note)) or False
            type_id = m2o_id(row.get("mail_activity_type_id" if model == "mail.message" else "activity_type_id"))
            if type_id:
                self._activity_types()
                props["activity_type_xmlid"] = self._type_xmlids.get(type_id, False)
            if model == "mail.message":
                props["date_deadline"] = str(row["date"])[:10] if row.get("date") else False
                props["summary"] = done_summary(str(text)) or False
            res_model = row.get("model") if model == "mail.message" else row.get("res_model")
            res_id = row.get("res_id")
            if res_id:
                assoc = {"contacts": [str(res_id)]} if res_model == "res.partner" else {"deals": [str(res_id)]}
        return RemoteRecord(
            id=str(row["id"]),
            properties=props,
            updated_at=parse_dt(row.get("write_date")),
            archived=archived,
            associations=assoc,
        )

    def changes(
        self,
        obj: str,
        cursor: dict[str, Any] | None,
        *,
        fields: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Page]:
        clock = self._server_clock()  # beside the fields and activity types the walk needs first
        model, base = self._source(obj)
        read = self._read_fields(obj, model, fields)
        server_now = clock.result()
        limit_hi = server_now - timedelta(seconds=self.settle)
        if until is not None:
            limit_hi = min(limit_hi, until if until.tzinfo else until.replace(tzinfo=UTC))
        limit_hi = limit_hi.replace(microsecond=0)
        cur = dict(cursor or {})
        if cur.get("mode") == partitioned.MODE:
            plan = partitioned.restore(cur)
            if plan is not None:
                yield from self._walk_ranges(obj, model, base, read, plan, cur)
                return
            # A partitioned cursor crmsync could not have written: its window again from the start
            # (re-reading is harmless, the store drops unchanged records), or a first walk.
            log.warning("odoo %s: the stored cursor is not one crmsync wrote; reading its window again", obj)
            hi_text = cur.get("window_hi")
            lo_text = cur.get("window_lo")
            cur = (
                {"window_lo": lo_text if parse_dt(lo_text) else None, "window_hi": hi_text, "last_id": 0}
                if isinstance(hi_text, str) and parse_dt(hi_text)
                else {}
            )
        if "window_hi" in cur:
            # Resuming inside a window after a crash: same bounds, after the last stored id.
            lo, hi, last_id = cur.get("window_lo"), str(cur["window_hi"]), int(cur.get("last_id") or 0)
        else:
            prev = parse_dt(cur.get("hi"))
            if prev is not None and prev >= limit_hi:
                return  # nothing can have settled since the last window ended
            if prev is not None:
                lo = format_dt(prev - timedelta(seconds=self.overlap))
            elif since is not None:
                lo = format_dt(since.replace(microsecond=0))
            else:
                lo = None
            hi, last_id = format_dt(limit_hi), 0
        domain = self._window(base, lo, hi)

        def page(low: int, high: int | None, desc: bool) -> tuple[list[dict[str, Any]], bool]:
            rows = self._call(
                model,
                "search_read",
                domain=[*domain, ("id", ">", low), *([("id", "<", high)] if high is not None else [])],
                fields=read,
                order="id desc" if desc else "id asc",
                limit=self.page_size,
                context=ACTIVE_TOO,
            )
            return rows, len(rows) == self.page_size

        def as_page(rows: list[dict[str, Any]], mark: int | None, *, last: bool, total: int | None) -> Page:
            # Only a complete window moves the cursor to its end; before that, to the lower end's id.
            if last:
                cursor: dict[str, Any] | None = {"hi": hi}
            else:
                cursor = None if mark is None else {"window_lo": lo, "window_hi": hi, "last_id": mark}
            return Page(records=self._records(obj, model, rows), cursor=cursor, total=total)

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"odoo-{obj}") as pool:
            # A new window's ids (its size for progress, whether and where to split it) are asked
            # alongside its first page, not before it (a resumed window's size was told when it began).
            listed = None if last_id else pool.submit(self._window_ids, model, domain)
            rows0, more0 = page(last_id, None, False)
            first: tuple[list[dict[str, Any]], bool] | None = (rows0, more0)
            ids = listed.result() if listed is not None else None
            listed = None  # up to IDS_PLAN_MAX ids: not kept for the walk
            total = len(ids) if ids is not None and len(ids) <= IDS_PLAN_MAX else None
            if ids is not None and more0 and len(ids) > self.partition_min:
                # A large new window: the rest of it in id ranges read side by side.
                above = int(rows0[-1]["id"])
                ranges, total = self._split(model, domain, above, ids)
                ids = None
                plan = partitioned.plan(lo, hi, ranges, total)
                start = partitioned.first_cursor(plan)
                yield Page(records=self._records(obj, model, rows0), cursor=start, total=total)
                yield from self._walk_ranges(obj, model, base, read, plan, start)
                return
            ids = None

            def once(low: int, high: int | None, desc: bool) -> tuple[list[dict[str, Any]], bool]:
                nonlocal first
                if first is not None and (low, high, desc) == (last_id, None, False):
                    taken, first = first, None
                    return taken
                return page(low, high, desc)

            held: tuple[list[dict[str, Any]], int | None] | None = None
            for rows, mark in walk_both_ends(once, lambda row: int(row["id"]), last_id, pool):
                if held is not None:  # one page held back: the last one carries the window's end
                    yield as_page(*held, last=False, total=total)
                held = (rows, mark)
            yield as_page(*(held or ([], None)), last=True, total=total)

    @staticmethod
    def _window(base: list[Any], lo: str | None, hi: str) -> list[Any]:
        """The domain of the write_date window ``[lo, hi)`` (no lower end on a first walk)."""
        return [*base, *([("write_date", ">=", lo)] if lo else []), ("write_date", "<", hi)]

    def _window_ids(self, model: str, domain: list[Any]) -> list[int]:
        """The window's ids in order, up to one more than IDS_PLAN_MAX (then: a huge window)."""
        ids = self._call(model, "search", domain=domain, order="id asc", limit=IDS_PLAN_MAX + 1, context=ACTIVE_TOO)
        return [int(i) for i in ids]

    def _split(self, model: str, domain: list[Any], above: int, ids: list[int]) -> tuple[list[list[int]], int]:
        """The window's ids above ``above`` cut into as many ranges as requests may be in flight, and its size.

        Up to IDS_PLAN_MAX records, the window's ids (already read) give each range an equal share
        of its records, however they lie (a pull's edits of old records and new ones at the top
        leave a gap between); a huge window's count and highest id, read side by side, cut its
        span into equal widths.
        """
        k = max(1, int(self.http.concurrency))
        if len(ids) <= IDS_PLAN_MAX:
            rest = [i for i in ids if i > above]
            # Twice the ranges of requests in flight: the objects walked beside this one share those
            # requests, and shorter chains leave a shorter tail when this window is the last to end.
            return partitioned.by_pages(above, rest, 2 * k, self.page_size), len(ids)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="odoo-count") as pool:
            counted = pool.submit(self._call, model, "search_count", domain=domain, context=ACTIVE_TOO)
            top = self._call(
                model, "search_read", domain=domain, fields=["id"], order="id desc", limit=1, context=ACTIVE_TOO
            )
            count = int(counted.result())
        return partitioned.split(above + 1, int(top[0]["id"]) if top else above, k), count

    def _walk_ranges(
        self,
        obj: str,
        model: str,
        base: list[Any],
        read: list[str],
        plan: dict[str, Any],
        cursor: dict[str, Any],
    ) -> Iterator[Page]:
        """The window's id ranges side by side from ``cursor`` (``partitioned.walk``)."""
        domain = self._window(base, plan["window_lo"], plan["window_hi"])

        def rows(low: int, high: int) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = self._call(
                model,
                "search_read",
                domain=[*domain, ("id", ">", low), ("id", "<=", high)],
                fields=read,
                order="id asc",
                limit=self.page_size,
                context=ACTIVE_TOO,
            )
            return found

        yield from partitioned.walk(
            plan,
            cursor,
            read=rows,
            convert=lambda found: self._records(obj, model, found),
            page_size=self.page_size,
            name=f"odoo-{obj}",
            turns=self._range_turns(),
        )

    def _range_turns(self) -> partitioned.Turns:
        """One ``Turns`` for every walk of this provider: the objects pulled side by side share the workers."""
        with self._lock:
            if self._turns is None:
                # One more than the requests in flight: a turn is held while its answer is parsed too.
                self._turns = partitioned.Turns(int(self.http.concurrency) + 1)
            return self._turns

    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        model, _ = self._source(obj)
        read = self._read_fields(obj, model, fields)
        out: list[RemoteRecord] = []
        for chunk in chunks([int(i) for i in dict.fromkeys(ids)], BATCH):
            rows = self._call(model, "read", chunk, fields=read, context={"active_test": False})
            out.extend(self._records(obj, model, rows))
        return out

    def list_ids(self, obj: str) -> Iterator[list[str]]:
        model, base = self._source(obj)
        last = 0
        while True:
            ids = self._call(
                model,
                "search",
                domain=[*base, ("id", ">", last)],
                order="id asc",
                limit=LIST_PAGE,
                context={"active_test": False},
            )
            if ids:
                yield [str(i) for i in ids]
            if len(ids) < LIST_PAGE:
                return
            last = int(ids[-1])

    def _matches(self, obj: str, kind: str, values: list[str], read: list[str]) -> dict[str, dict[str, Any]]:
        """Records of ``obj`` whose ``kind`` (email, phone, domain, name, key) equals one of ``values``."""
        model, base = self._source(obj)
        found: dict[str, dict[str, Any]] = {}
        leaves: list[tuple[str, str, Any]]
        norm: Callable[[Any], str]
        for chunk in chunks(values, BATCH):
            if kind == "email" and obj == "contacts":
                leaves, field, norm = (
                    [("email", "=ilike", v) for v in chunk],
                    "email",
                    lambda x: str(x or "").strip().lower(),
                )
            elif kind == "phone" and obj == "contacts":
                leaves, field, norm = [("phone", "in", chunk)], "phone", phone_digits
            elif kind == "domain" and obj == "companies":
                leaves, field, norm = [("website", "ilike", v) for v in chunk], "website", url_host
            elif kind == "name" and obj in ("companies", "contacts"):
                leaves, field = [("name", "=ilike", v) for v in chunk], "name"
                norm = lambda x: str(x or "").strip().lower()  # noqa: E731
            elif kind == "key" and obj == "deals" and DEAL_KEY_FIELD in self._model_fields("crm.lead"):
                leaves, field, norm = [(DEAL_KEY_FIELD, "in", chunk)], DEAL_KEY_FIELD, lambda x: str(x or "").lower()
            else:
                return found
            rows = self._call(
                model,
                "search_read",
                domain=[*base, *or_domain(leaves)],
                fields=list(dict.fromkeys([*read, field])),
                order="id asc",
            )
            wanted = set(chunk)
            for row in rows:
                value = norm(row.get(field))
                if value in wanted:
                    found.setdefault(value, row)  # the oldest record wins when several match
        return found

    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        if obj not in ("contacts", "companies", "deals"):
            return {}
        model, _ = self._source(obj)
        read = self._read_fields(obj, model, fields)
        by_kind: dict[str, list[str]] = {}
        for k in keys:
            name, value = next(iter(k.items()))
            by_kind.setdefault(name, []).append(str(value).lower() if name != "phone" else phone_digits(value))
        out: dict[str, RemoteRecord] = {}
        for kind, values in by_kind.items():
            rows = self._matches(obj, kind, list(dict.fromkeys(values)), read)
            # One call for all rows: a deal's linked partners are read in one batch, not per deal.
            for value, rec in zip(rows, self._records(obj, model, list(rows.values())), strict=True):
                out[match_key({kind: value})] = rec
        return out
