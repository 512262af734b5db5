"""Benchmark kits for Pipedrive, Salesforce and Dynamics 365, with honest bounds (issue #31).

Each kit connects crmsync to its emulator served on loopback the way a user connects (an API
token, a JWT signing key, a client secret), seeds records fast and states the best time any
client could reach under the CRM's documented limits (``shared/reference/<crm>.md``) from
process start: the fewest requests the API allows for the input, the rate window from an empty
window, the concurrency cap, and every dependency chain at one round trip a link. A perfect
client guesses nothing about where records lie (as in ``benchmarks.kits.walk_chain``) and uses
no undocumented trick (an opaque cursor is not forged).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.harness import Bound, lower_bound
from benchmarks.kits import _IO, Kit, change_plan, changes_made, walk_chain


def _lim(limits: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float] | None]:
    """``lower_bound``'s type for a kit's limits."""
    return {bucket: limit for bucket, limit in limits.items()}


def _objs(changes: dict[str, int]) -> dict[str, int]:
    return {o: n for o, n in changes.items() if not o.startswith("_")}


def _people(i: int) -> tuple[str, str, str, str]:
    """First name, last name, email and phone of seeded person ``i``."""
    return f"Ann{i % 89}", f"Person{i}", f"person{i}@bench.example.org", f"+1 617 555 {i % 10_000:04d}"


# -- Pipedrive -----------------------------------------------------------------------------------
PD_OBJECTS = {"contacts": "persons", "companies": "organizations", "deals": "deals", "calls": "activities"}
PD_PAGE = 500  # v2 list ``limit`` maximum
PD_BURST_WINDOW = 2.0
#: The API token's burst per rolling 2 s: Growth 40, Ultimate 120 (reference section 9); search 10 on every plan.
PD_GROWTH, PD_ULTIMATE, PD_SEARCH = 40, 120, 10
#: A pull reads up to a minute before now (crmsync's ``lookback_seconds``): changes are stamped this much
#: earlier than the scenario's clock, so the timed pull sees them without an untimed minute of waiting.
PD_LAG = 62.0


class PipedriveKit(Kit):
    """Pipedrive on the Growth plan with 3 seats, connected with an API token (OAuth apps get 4x the burst)."""

    name = "pipedrive"
    conn = "pd"
    modules = ("crmsync.providers.pipedrive", "crmsync.emulators.pipedrive")
    limits = {"default": (PD_GROWTH, PD_BURST_WINDOW), "search": (PD_SEARCH, PD_BURST_WINDOW)}
    raised_limits = {"default": (PD_ULTIMATE, PD_BURST_WINDOW), "search": (PD_SEARCH, PD_BURST_WINDOW)}
    base_config: ClassVar[dict[str, Any]] = {"rate_limit": PD_GROWTH, "plan": "growth", "seats": 3}
    raised_config = {"rate_limit": PD_ULTIMATE, "plan": "ultimate"}
    naive: ClassVar[bool] = False
    # No batch writes: 10,000 outcomes would take 23 minutes at the Growth plan's burst alone.
    push_sizes: ClassVar[tuple[int, int]] = (1_000, 200)
    settle = 1.0

    def emulator(self) -> Any:
        from crmsync.emulators.pipedrive import PipedriveEmulator

        # Limits off until ``arm``: seeding and the untimed first sync are not the measurement.
        return PipedriveEmulator(seed=11, plan="growth", seats=3, limits=False)

    def connect(self, app: Any, emu: Any, url: str) -> None:
        from crmsync.sync.connect import connect

        connect(app, provider="pipedrive", name=self.conn, base_url=url, options={}, io=_IO(emu.api_token))

    def arm(self, emu: Any, opts: Any, *, raised: bool = False, lifted: bool = False) -> None:
        """Pipedrive meters each token itself (per-token burst windows, token costs): its plan is the limit."""
        super().arm(emu, opts, raised=raised, lifted=lifted)
        emu.faults.rate_limits = {}  # the emulator's own per-token windows enforce the plan's burst
        emu.plan, emu.limits = ("ultimate" if raised else "growth"), not lifted
        emu._burst.clear()
        emu.tokens_used = emu.writes_today = 0  # a fresh day's budget

    def object_of(self, path: str) -> str:
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["api", "v2"]:
            return {v: k for k, v in PD_OBJECTS.items()}.get(parts[2], parts[2])
        return "other"

    @staticmethod
    def _body(obj: str, i: int) -> dict[str, Any]:
        if obj == "contacts":
            first, last, email, phone = _people(i)
            return {
                "first_name": first,
                "last_name": last,
                "emails": [{"value": email, "primary": True}],
                "phones": [{"value": phone, "primary": True}],
            }
        if obj == "companies":
            return {"name": f"Bench Company {i}"}
        return {"title": f"Bench deal {i}", "value": 1000 + i}

    def create(self, emu: Any, obj: str, n: int, *, at: float, start: int, spread: float = 10.0) -> list[str]:
        pobj = PD_OBJECTS[obj]
        if not spread:
            return [str(i) for i in emu.bulk_create(pobj, n, lambda i: self._body(obj, start + i), at=at)]
        return [
            str(emu.bulk_create(pobj, 1, lambda _i, i=i: self._body(obj, start + i), at=at - spread * (n - 1 - i))[0])
            for i in range(n)
        ]

    def make_changes(self, emu: Any, ids: dict[str, list[str]], n: int, *, start: float, span: float) -> dict[str, int]:
        from crmsync.emulators.pipedrive import iso

        plan, created = change_plan(n)
        stamps = iter(start - PD_LAG + span * j / n for j in range(n))
        with emu.lock:
            for obj, count in plan.items():
                pobj = PD_OBJECTS[obj]
                for j, rid in enumerate(ids[obj][:count]):
                    change = (
                        {"first_name": f"Edited{j}"}
                        if obj == "contacts"
                        else {"name": f"Edited Company {j}"}
                        if obj == "companies"
                        else {"value": 5000 + j}
                    )
                    rec = emu.data[pobj][int(rid)]
                    emu._apply(pobj, rec, change)
                    rec["update_time"] = iso(next(stamps))
        first = len(ids["contacts"])
        for j in range(created):
            emu.bulk_create("persons", 1, lambda _i, j=j: self._body("contacts", first + j), at=next(stamps))
        return changes_made(plan, created)

    def count(self, emu: Any, obj: str) -> int:
        if obj == "calls":
            return sum(1 for a in emu.records("activities") if a["type"] == "call")
        return len(emu.records(PD_OBJECTS[obj]))

    # -- honest bounds -----------------------------------------------------------------------------
    def push_bound(self, counts: dict[str, int], latency: float) -> Bound:
        """One create per object (Pipedrive has no batch writes), after one list read per object type."""
        writes = {o: counts[o] for o in ("companies", "contacts", "deals", "calls")}
        lists = 3
        total = lists + sum(writes.values())
        tokens = 10 * lists + 5 * sum(writes.values())
        burst = self.limits["default"][0]
        text = (
            f"no batch or upsert endpoint: one create per object ({' + '.join(f'{v} {o}' for o, v in writes.items())}) "
            f"+ {lists} list reads (persons, organizations, deals: an empty company answers each in one page of "
            f"{PD_PAGE}, 10 tokens, cheaper than a 20-token search per key in the search bucket's {PD_SEARCH}/2 s) = "
            f"{total} requests, {tokens:,} tokens (daily budget 30,000 x 2 (Growth) x 3 seats = 180,000); API-token "
            f"burst {burst}/2 s (Growth) from an empty window: 2 s x floor(({total}-1)/{burst}) + latency; chain: "
            "the lists, then organization -> person -> deal -> call activity = 5 x latency"
        )
        return lower_bound({"default": total}, limits=_lim(self.limits), latency=latency, chain=5, formula=text)

    def pull_bound(self, changes: dict[str, int], latency: float) -> Bound:
        """``updated_since`` lists of 500, walked from both ends (sort_direction asc and desc), objects at once."""
        pages = {o: max(1, math.ceil(n / PD_PAGE)) for o, n in _objs(changes).items()}
        total = sum(pages.values()) + 1
        chain = max(map(walk_chain, pages.values()))
        burst = self.limits["default"][0]
        text = (
            f"v2 lists by update_time, {PD_PAGE} a page {pages} + 1 archived-deals list alongside = {total} requests "
            f"at {burst}/2 s (Growth API token) from an empty window; each list walked from both ends (cursor "
            f"chains, the cursor is opaque): longest walk 1 + ceil((pages - 1) / 2) = {chain} x latency; persons' "
            "and organizations' deletions have no list (webhooks only), deals' come with status=deleted"
        )
        return lower_bound({"default": total}, limits=_lim(self.limits), latency=latency, chain=chain, formula=text)

    def backfill_bound(self, n: int, latency: float, *, raised: bool = True) -> Bound:
        """Person list pages of 500 by id, read from both ends; the plan's burst from an empty window."""
        limits = self.raised_limits if raised else self.limits
        pages = max(1, math.ceil(n / PD_PAGE))
        chain = walk_chain(pages)
        burst = limits["default"][0]
        text = (
            f"ceil(N/{PD_PAGE}) = {pages} person list pages by id (10 tokens each), each `cursor` from the previous "
            f"reply (opaque), read from both ends (asc and desc): 1 + ceil(({pages} - 1) / 2) = {chain} x latency; "
            f"at {burst}/2 s ({'Ultimate' if raised else 'Growth'} API token): "
            f"2 s x floor(({pages}-1)/{burst}) + latency"
        )
        return lower_bound({"default": pages}, limits=_lim(limits), latency=latency, chain=chain, formula=text)


# -- Salesforce ----------------------------------------------------------------------------------
SF_OBJECTS = {"contacts": "Contact", "companies": "Account", "deals": "Opportunity", "calls": "Task"}
SF_USER = "admin@example.com.sandbox"
#: The org-wide allocation per rolling 24 h (Enterprise: 100,000 + 1,000 per licence; the emulator's).
SF_DAILY = (100_000, 86_400.0)
SF_PAGE = 2_000  # REST query rows per page (``batchSize`` default and maximum)
SF_COLLECTION = 200  # sObject Collections records per request
SF_COMPOSITE_HEAVY = 5  # Collections or query subrequests per Composite request
SF_RETRIEVE = 2_000  # ids per Collections retrieve (POST body)
SF_GETUPDATED = 600_000  # ids getUpdated answers before EXCEEDED_ID_LIMIT
SF_IN_KEYS = 400  # keys per SOQL IN lookup within the 16,384-character URI
#: A pull reads up to two minutes before now (crmsync's ``lookback_seconds``); see PD_LAG.
SF_LAG = 122.0


class SalesforceKit(Kit):
    """An Enterprise org connected by the JWT bearer flow; its only enforced limit is the daily allocation."""

    name = "salesforce"
    conn = "sf"
    modules = ("crmsync.providers.salesforce", "crmsync.emulators.salesforce")
    # No request rate or short-call concurrency limit exists; the emulator counts the daily allocation itself.
    limits: ClassVar[dict[str, tuple[int, float]]] = {}
    raised_limits: ClassVar[dict[str, tuple[int, float]]] = {}
    naive: ClassVar[bool] = False
    deal_stage = "Prospecting"
    settle = 2.0  # SystemModstamp has whole seconds

    def emulator(self) -> Any:
        from crmsync.emulators.salesforce import SalesforceEmulator

        return SalesforceEmulator(seed=11)

    def connect(self, app: Any, emu: Any, url: str) -> None:
        import os

        from crmsync.sync.connect import connect

        key = Path(app.env["CRMSYNC_HOME"]) / "sf-key.pem"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(emu.generate_certificate())
        options = {"client_id": emu.client_id, "jwt_key": str(key), "user": SF_USER}
        connect(app, provider="salesforce", name=self.conn, base_url=url, options=options, io=_IO(""))

    def arm(self, emu: Any, opts: Any, *, raised: bool = False, lifted: bool = False) -> None:
        super().arm(emu, opts, raised=raised, lifted=lifted)
        emu.api_used = 0  # a fresh 24 hours of allocation
        emu.daily_limit = SF_DAILY[0]

    def limits_text(self, raised: bool) -> str:
        return f"{SF_DAILY[0]:,} requests / 24 h (org allocation); no rate or short-call concurrency limit"

    def object_of(self, path: str) -> str:
        parts = path.strip("/").split("/")
        names = {v: k for k, v in SF_OBJECTS.items()}
        for part in parts[3:]:
            if part in names:
                return names[part]
        if len(parts) >= 4 and parts[:2] == ["services", "data"]:
            return {"composite": "collections", "query": "query", "queryAll": "query", "jobs": "bulk"}.get(
                parts[3], parts[3]
            )
        return "other"

    @staticmethod
    def _body(obj: str, i: int) -> dict[str, Any]:
        if obj == "contacts":
            first, last, email, phone = _people(i)
            return {"FirstName": first, "LastName": last, "Email": email, "Phone": phone, "Title": "Buyer"}
        if obj == "companies":
            return {"Name": f"Bench Company {i}", "Website": f"bench-company{i}.example.com"}
        return {"Name": f"Bench deal {i}", "Amount": 1000 + i, "StageName": "Prospecting", "CloseDate": "2027-01-31"}

    def create(self, emu: Any, obj: str, n: int, *, at: float, start: int, spread: float = 10.0) -> list[str]:
        sobject = SF_OBJECTS[obj]
        if not spread:
            return list(emu.bulk_create(sobject, n, lambda i: self._body(obj, start + i), when=at))
        return [
            emu.bulk_create(sobject, 1, lambda _i, i=i: self._body(obj, start + i), when=at - spread * (n - 1 - i))[0]
            for i in range(n)
        ]

    def make_changes(self, emu: Any, ids: dict[str, list[str]], n: int, *, start: float, span: float) -> dict[str, int]:
        plan, created = change_plan(n)
        stamps = iter(start - SF_LAG + span * j / n for j in range(n))
        with emu.lock:
            for obj, count in plan.items():
                table = emu.data[SF_OBJECTS[obj]]
                for j, rid in enumerate(ids[obj][:count]):
                    change = (
                        {"FirstName": f"Edited{j}", "Title": "CFO"}
                        if obj == "contacts"
                        else {"Name": f"Edited Company {j}"}
                        if obj == "companies"
                        else {"Amount": 5000 + j}
                    )
                    rec = table[rid]
                    rec.update(change)
                    rec["SystemModstamp"] = rec["LastModifiedDate"] = int(next(stamps))
        first = len(ids["contacts"])
        for j in range(created):
            emu.bulk_create("Contact", 1, lambda _i, j=j: self._body("contacts", first + j), when=next(stamps))
        return changes_made(plan, created)

    def count(self, emu: Any, obj: str) -> int:
        if obj == "calls":
            return sum(1 for t in emu.records("Task") if t.get("TaskSubtype") == "Call")
        return len(emu.records(SF_OBJECTS[obj]))

    # -- honest bounds -----------------------------------------------------------------------------
    def push_bound(self, counts: dict[str, int], latency: float) -> Bound:
        """Lookups by key, then Collections upserts by External ID, both packed into Composite requests."""
        keys = {o: counts[o] for o in ("contacts", "companies", "deals")}
        lookups = sum(math.ceil(k / SF_IN_KEYS) for k in keys.values())
        writes = {o: math.ceil(counts[o] / SF_COLLECTION) for o in ("companies", "contacts", "deals", "calls")}
        heavy = lookups + sum(writes.values())
        requests = math.ceil(lookups / SF_COMPOSITE_HEAVY) + math.ceil(sum(writes.values()) / SF_COMPOSITE_HEAVY)
        text = (
            f"{lookups} SOQL IN lookups (Email / Website / deal key, {SF_IN_KEYS} keys within the 16,384-character "
            f"URI: no duplicate of a record made elsewhere) + {' + '.join(f'{v} {o}' for o, v in writes.items())} "
            f"Collections upserts of {SF_COLLECTION} by External ID = {heavy} subrequests, {SF_COMPOSITE_HEAVY} "
            f"Collections/query subrequests per Composite = {requests} requests, all at once (no rate limit; the "
            f"concurrency limit counts only calls over 20 s; {SF_DAILY[0]:,} / 24 h allocation does not bind); a "
            "Composite runs its subrequests in order and later records name earlier ones by External ID, so the "
            "chain is the lookups, then the writes: 2 x latency"
        )
        return lower_bound(
            {"default": requests}, limits=_lim({"default": SF_DAILY}), latency=latency, chain=2, formula=text
        )

    @staticmethod
    def _read_chain(n: int, *, recent: bool) -> tuple[int, int, str]:
        """(round trips, requests, how) of reading ``n`` rows of one object the fastest documented way."""
        pages = max(1, math.ceil(n / SF_PAGE))
        if pages == 1:
            return 1, 1, "one query page"
        ways = [(walk_chain(pages), pages, "SOQL keyset pages from both ends"), (3, 3, "Bulk API 2.0")]
        if recent and n <= SF_GETUPDATED:
            ways.append((2, 1 + math.ceil(n / SF_RETRIEVE), "getUpdated + Collections retrieves"))
        return min(ways)

    def pull_bound(self, changes: dict[str, int], latency: float) -> Bound:
        """Per object the fastest of: SOQL pages of 2,000 from both ends, getUpdated + retrieves, Bulk API 2.0."""
        reads = {o: self._read_chain(n, recent=True) for o, n in _objs(changes).items()}
        chain = max(r[0] for r in reads.values())
        total = sum(r[1] for r in reads.values()) + len(reads)
        text = (
            f"per object the fewest round trips of: SOQL pages of {SF_PAGE:,} (query locators chain; keyset from both "
            f"ends: 1 + ceil((pages - 1) / 2)), getUpdated (<= {SF_GETUPDATED:,} ids, minute precision) then "
            f"Collections retrieves of {SF_RETRIEVE:,} ids at once (2), Bulk API 2.0 (create, poll, one result page: "
            f"3) = { ({o: f'{r[2]}: {r[0]}' for o, r in reads.items()}) }; + {len(reads)} getDeleted alongside = "
            f"{total} requests, objects at once (no rate limit; {SF_DAILY[0]:,} / 24 h does not bind): "
            f"{chain} x latency"
        )
        return lower_bound(
            {"default": total}, limits=_lim({"default": SF_DAILY}), latency=latency, chain=chain, formula=text
        )

    def backfill_bound(self, n: int, latency: float, *, raised: bool = True) -> Bound:
        """All N contacts: getUpdated over 30 days with a SOQL for older rows alongside, or Bulk API 2.0."""
        chain, requests, how = self._read_chain(n, recent=True)
        pages = max(1, math.ceil(n / SF_PAGE))
        text = (
            f"fewest round trips of: {pages} SOQL pages of {SF_PAGE:,} from both ends ({walk_chain(pages)}), Bulk API "
            "2.0 query (create, poll once, one result page when maxRecords >= N, for which no maximum is documented: "
            f"3), getUpdated over the last 30 days (<= {SF_GETUPDATED:,} ids) with a SOQL for older rows alongside, "
            f"then Collections retrieves of {SF_RETRIEVE:,} ids at once (2) -> {how}, {requests} requests: "
            f"{chain} x latency (no rate limit; {SF_DAILY[0]:,} / 24 h does not bind)"
        )
        return lower_bound(
            {"default": requests}, limits=_lim({"default": SF_DAILY}), latency=latency, chain=chain, formula=text
        )


# -- Dynamics 365 ----------------------------------------------------------------------------------
DY_SETS = {"contacts": "contacts", "companies": "accounts", "deals": "opportunities", "calls": "phonecalls"}
#: Service protection per user (reference section 8): 6,000 requests per sliding 300 s, 52 at once.
DY_WINDOW = (6_000, 300.0)
DY_CONCURRENT = 52
DY_PAGE = 5_000  # odata.maxpagesize maximum
DY_BATCH = 1_000  # requests per $batch
DY_IN_KEYS = 1_000  # keys per In() lookup (a URL inside $batch may reach 64 KB; pages of 5,000)


class DynamicsKit(Kit):
    """A Dataverse environment with an application user (client credentials), change tracking on."""

    name = "dynamics"
    conn = "dy"
    modules = ("crmsync.providers.dynamics", "crmsync.emulators.dynamics")
    limits = {"default": DY_WINDOW}
    raised_limits = {"default": DY_WINDOW}  # service protection cannot be raised
    server_concurrency = DY_CONCURRENT
    raised_concurrency = DY_CONCURRENT
    naive: ClassVar[bool] = False
    settle = 1.0  # change tracking reads by version, not by time

    def emulator(self) -> Any:
        from crmsync.emulators.dynamics import DynamicsEmulator

        return DynamicsEmulator(seed=11)

    def connect(self, app: Any, emu: Any, url: str) -> None:
        from crmsync.sync.connect import connect

        options = {"tenant": f"{url}/{emu.tenant}", "client_id": emu.client_id}
        connect(app, provider="dynamics", name=self.conn, base_url=url, options=options, io=_IO(emu.client_secret))

    def arm(self, emu: Any, opts: Any, *, raised: bool = False, lifted: bool = False) -> None:
        """Dataverse counts per user: the emulator's own windows enforce it, not the per-process Faults."""
        super().arm(emu, opts, raised=raised, lifted=lifted)
        emu.faults.rate_limits, emu.faults.max_concurrent = {}, 0
        if not lifted:
            emu.limits, emu.concurrent = DY_WINDOW, DY_CONCURRENT
        emu._user_windows.clear()

    def object_of(self, path: str) -> str:
        parts = path.strip("/").split("/")
        if len(parts) >= 4 and parts[:3] == ["api", "data", "v9.2"]:
            head = parts[3].split("(")[0]
            return {v: k for k, v in DY_SETS.items()}.get(head, "batch" if head == "$batch" else head)
        return "other"

    @staticmethod
    def _body(obj: str, i: int) -> dict[str, Any]:
        if obj == "contacts":
            first, last, email, phone = _people(i)
            return {"firstname": first, "lastname": last, "emailaddress1": email, "telephone1": phone}
        if obj == "companies":
            return {"name": f"Bench Company {i}", "websiteurl": f"bench-company{i}.example.com"}
        return {"name": f"Bench deal {i}", "estimatedvalue": 1000 + i}

    def create(self, emu: Any, obj: str, n: int, *, at: float, start: int, spread: float = 10.0) -> list[str]:
        es = DY_SETS[obj]
        if not spread:
            return list(emu.bulk_create(es, n, lambda i: self._body(obj, start + i), at=at))
        return [
            emu.bulk_create(es, 1, lambda _i, i=i: self._body(obj, start + i), at=at - spread * (n - 1 - i))[0]
            for i in range(n)
        ]

    def make_changes(self, emu: Any, ids: dict[str, list[str]], n: int, *, start: float, span: float) -> dict[str, int]:
        plan, created = change_plan(n)
        for obj, count in plan.items():
            for j, rid in enumerate(ids[obj][:count]):
                change = (
                    {"firstname": f"Edited{j}", "jobtitle": "CFO"}
                    if obj == "contacts"
                    else {"name": f"Edited Company {j}"}
                    if obj == "companies"
                    else {"estimatedvalue": 5000 + j}
                )
                emu.update(DY_SETS[obj], rid, change)
        first = len(ids["contacts"])
        emu.bulk_create("contacts", created, lambda j: self._body("contacts", first + j))
        return changes_made(plan, created)

    def count(self, emu: Any, obj: str) -> int:
        return len(emu.records(DY_SETS[obj]))

    # -- honest bounds -----------------------------------------------------------------------------
    def push_bound(self, counts: dict[str, int], latency: float) -> Bound:
        """Lookups in one round of $batch, then writes in $batch of 1,000 under client-chosen ids, in order."""
        keys = {o: counts[o] for o in ("contacts", "companies", "deals")}
        lookups = sum(math.ceil(k / DY_IN_KEYS) for k in keys.values())
        ops = counts["companies"] + counts["contacts"] + counts["deals"] + 2 * counts["calls"]
        batches = math.ceil(lookups / DY_BATCH) + math.ceil(ops / DY_BATCH)
        text = (
            f"{lookups} In() lookups (email / website / deal name, {DY_IN_KEYS:,} keys each: no alternate keys by "
            f"default, and no duplicate of a row made elsewhere) in {math.ceil(lookups / DY_BATCH)} $batch; then "
            f"{ops:,} operations (a create per company, contact and deal, a create and a close per call: statecode "
            f"is not valid on create) under client-chosen GUIDs, each outcome's rows in order inside one batch, "
            f"{DY_BATCH:,} per $batch = {math.ceil(ops / DY_BATCH)}; {batches} requests (a $batch counts once) at "
            f"{DY_WINDOW[0]:,} / {DY_WINDOW[1]:g} s per user, {DY_CONCURRENT} at once; chain lookups -> writes: "
            "2 x latency (CreateMultiple would need fewer requests, not fewer round trips)"
        )
        return lower_bound(
            {"default": batches},
            limits=_lim(self.limits),
            latency=latency,
            concurrency=DY_CONCURRENT,
            chain=2,
            formula=text,
        )

    def pull_bound(self, changes: dict[str, int], latency: float) -> Bound:
        """Change tracking: each table's delta in pages of 5,000, a nextLink chain; tables at once."""
        pages = {o: max(1, math.ceil(n / DY_PAGE)) for o, n in _objs(changes).items()}
        total = sum(pages.values())
        chain = max(pages.values())
        text = (
            f"delta pages of {DY_PAGE:,} (odata.maxpagesize) per table {pages} = {total} requests; the deltaLink "
            "(and deletions) come only at the end of the nextLink chain, and $filter/$orderby are refused with "
            f"change tracking, so no walk from both ends: longest chain {chain} x latency; tables at once "
            f"({DY_CONCURRENT} concurrent, {DY_WINDOW[0]:,} / {DY_WINDOW[1]:g} s do not bind)"
        )
        return lower_bound(
            {"default": total},
            limits=_lim(self.limits),
            latency=latency,
            concurrency=DY_CONCURRENT,
            chain=chain,
            formula=text,
        )

    def backfill_bound(self, n: int, latency: float, *, raised: bool = True) -> Bound:
        """All N contacts in pages of 5,000, keyset by contactid from both ends (a delta baseline is a longer chain)."""
        pages = max(1, math.ceil(n / DY_PAGE))
        chain = walk_chain(pages)
        text = (
            f"ceil(N/{DY_PAGE:,}) = {pages} pages (odata.maxpagesize), keyset by contactid ($filter/$orderby, no "
            f"$skip) from both ends: 1 + ceil(({pages} - 1) / 2) = {chain} x latency (a change-tracking baseline, "
            f"whose deltaLink ends a nextLink chain, takes {pages}); {DY_CONCURRENT} concurrent and "
            f"{DY_WINDOW[0]:,} / {DY_WINDOW[1]:g} s per user do not bind"
        )
        return lower_bound(
            {"default": pages},
            limits=_lim(self.limits),
            latency=latency,
            concurrency=DY_CONCURRENT,
            chain=chain,
            formula=text,
        )


MORE_KITS: dict[str, type[Kit]] = {"pipedrive": PipedriveKit, "salesforce": SalesforceKit, "dynamics": DynamicsKit}
