"""What the scenarios need to know per CRM: emulator, limits, data, lower-bound formulas, naive client.

A kit connects crmsync to its emulator the way a user would (``crmsync.sync.connect``), in a
fresh ``CRMSYNC_HOME``, and hands the children the secret through ``CRMSYNC_SECRET_<NAME>``.
"""

from __future__ import annotations

import importlib
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import yaml

from benchmarks.bounds import HS_ASSOC_TARGETS, hubspot_pull_bound, partitioned_bound
from benchmarks.harness import Bound, lower_bound

_KEYRING_READY = False


def _memory_keyring() -> None:
    """The parent keeps secrets in memory: a benchmark must never touch the user's keyring."""
    global _KEYRING_READY
    if not _KEYRING_READY:
        import keyring

        from crmsync.credentials import MemoryKeyring

        keyring.set_keyring(MemoryKeyring())
        _KEYRING_READY = True


class _IO:
    """ConnectIO answering the secret prompt; no browser, no questions."""

    interactive = False

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def secret(self, prompt: str) -> str:
        return self._secret

    def ask(self, prompt: str) -> str:
        return ""

    def info(self, message: str) -> None:
        pass

    def open_url(self, url: str) -> bool:
        return False


class Kit:
    """The provider-independent half of a kit."""

    name: ClassVar[str] = ""
    conn: ClassVar[str] = ""
    modules: ClassVar[tuple[str, ...]] = ()
    limits: ClassVar[dict[str, tuple[int, float]]] = {}
    raised_limits: ClassVar[dict[str, tuple[int, float]]] = {}
    raised_config: ClassVar[dict[str, Any]] = {}
    server_concurrency: ClassVar[int | None] = None
    base_config: ClassVar[dict[str, Any]] = {}  # settings every run of this kit gets (the emulated account's limits)
    raised_concurrency: ClassVar[int | None] = None
    #: Seconds after its last change before a pull sees everything (whole-second clocks, settle margins).
    settle: ClassVar[float] = 1.0
    deal_stage: ClassVar[str | None] = None
    #: Initial records per object for the pull scenario, as a share of its number of changes.
    pull_initial: ClassVar[dict[str, float]] = {"contacts": 1.0, "companies": 0.25, "deals": 0.25}
    #: False: the scenarios run no naive baseline for this CRM (none is written for it).
    naive: ClassVar[bool] = True
    #: Outcomes pushed in a full and a quick run.
    push_sizes: ClassVar[tuple[int, int]] = (10_000, 1_000)

    def __init__(self) -> None:
        #: Records per object in the CRM when the pull starts (set by the pull scenario).
        self.totals: dict[str, int] = {}

    # -- bounds: the honest one (the best any client could do under the CRM's documented limits,
    # from process start) is required; the pattern one (crmsync's own way of reading) is optional.
    def push_bound(self, counts: dict[str, int], latency: float) -> Bound:
        raise NotImplementedError

    def pull_bound(self, changes: dict[str, int], latency: float) -> Bound:
        raise NotImplementedError

    def backfill_bound(self, n: int, latency: float, *, raised: bool = True) -> Bound:
        raise NotImplementedError

    def pull_pattern(self, changes: dict[str, int], latency: float) -> Bound | None:
        return None

    def backfill_pattern(self, n: int, latency: float, *, raised: bool = True) -> Bound | None:
        return None

    @property
    def missing(self) -> str | None:
        """Why this provider cannot be benchmarked yet (None when it can)."""
        if type(self).emulator is Kit.emulator:
            return "its benchmark kit is not written yet"
        for module in self.modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                return f"{module} is not available yet ({exc})"
        return None

    # -- connection ------------------------------------------------------------------------------
    def emulator(self) -> Any:
        raise NotImplementedError

    def connect(self, app: Any, emu: Any, url: str) -> None:
        raise NotImplementedError

    def start(self, home: Path) -> tuple[Any, Any, dict[str, str]]:
        """A fresh emulator on loopback and a connected CRMSYNC_HOME; returns the children's env."""
        from crmsync.app import App
        from crmsync.credentials import env_name

        _memory_keyring()
        home.mkdir(parents=True, exist_ok=True)
        emu = self.emulator()
        server = emu.serve()
        app = App(env={"CRMSYNC_HOME": str(home)})
        try:
            self.connect(app, emu, server.url)
            secret = app.secrets.get(self.conn)
        finally:
            app.close()
        self.secret = secret or {}
        self.write_config(home, {})  # the emulated account's limits (scenarios may write more)
        return emu, server, {"CRMSYNC_HOME": str(home), env_name(self.conn): json.dumps(secret)}

    def write_config(self, home: Path, settings: dict[str, Any]) -> None:
        """Per-connection settings in config.yaml (``base_config`` and ``settings`` over the provider's defaults)."""
        settings = {**self.base_config, **settings}
        doc = {"connections": {self.conn: settings}} if settings else {}
        (home / "config.yaml").write_text(yaml.safe_dump(doc))

    def arm(self, emu: Any, opts: Any, *, raised: bool = False, lifted: bool = False) -> None:
        """Switch on the realistic faults (``raised``: the higher limits), fresh counters, empty rate windows.

        ``lifted``: every limit so high it never binds, and stated so (a CRM that reports a limit in
        its headers while not enforcing it would make crmsync hold back for nothing).
        """
        from crmsync.emulators.base import Faults, Stats

        limits = dict(self.raised_limits if raised else self.limits)
        if lifted:
            limits = {bucket: (1_000_000_000, window) for bucket, (_n, window) in {**self.limits, **limits}.items()}
        emu.faults = Faults(
            latency_ms=opts.latency * 1000.0,
            rate_limits=limits,
            error_rate=opts.error_rate,
            max_concurrent=0 if lifted else (self.raised_concurrency if raised else self.server_concurrency) or 0,
            seed=7,
        )
        emu.rng = random.Random(7)
        emu.stats = Stats()
        emu.keep_log = True
        # As after a quiet minute: no earlier hits count against the next run.
        emu._windows.clear()

    def limits_text(self, raised: bool) -> str:
        limits = self.raised_limits if raised else self.limits
        conc = self.raised_concurrency if raised else self.server_concurrency
        parts = [f"{b} {n}/{w:g} s" for b, (n, w) in limits.items()]
        if conc:
            parts.append(f"{conc} concurrent")
        return ", ".join(parts) or "none"

    def initial_sync(self, home: Path, objects: list[str]) -> None:
        """The untimed first pull, with crmsync's limits raised (the emulator has none yet)."""
        from crmsync.app import App
        from crmsync.sync.pull import pull

        self.write_config(home, {"rate_limit": 100_000, "search_rate_limit": 10_000, "concurrency": 8})
        app = App(env={"CRMSYNC_HOME": str(home)})
        try:
            result = pull(app, connections=[self.conn], objects=objects)[0]
            if result.outcome != "ok":  # partial or failed
                raise RuntimeError(f"initial sync failed: {result.error}")
        finally:
            app.close()

    def requests_by_object(self, emu: Any) -> Counter[str]:
        return Counter(self.object_of(path) for _method, path, _status in emu.stats.log)

    def object_of(self, path: str) -> str:
        raise NotImplementedError

    def naive_auth(self, emu: Any, server: Any) -> dict[str, Any]:
        raise NotImplementedError


def changes_made(plan: dict[str, int], created: int) -> dict[str, int]:
    """What ``make_changes`` reports: changed records per object (new contacts among them) and ``_created``."""
    return {**plan, "contacts": plan["contacts"] + created, "_created": created}


def change_plan(n: int) -> tuple[dict[str, int], int]:
    """``n`` changes: half contact edits, a fifth each company and deal edits, the rest new contacts."""
    plan = {"contacts": int(n * 0.5), "companies": int(n * 0.2), "deals": int(n * 0.2)}
    return plan, n - sum(plan.values())


# -- HubSpot -----------------------------------------------------------------------------------------


class HubSpotKit(Kit):
    name = "hubspot"
    conn = "hs"
    modules = ("crmsync.providers.hubspot", "crmsync.emulators.hubspot")
    limits = {"default": (100, 10.0), "search": (5, 1.0)}
    # The emulated portal allows 5 searches/s (the setting); crmsync's default budget is the
    # reference's 4, so the benchmark tells it the portal's limit, as a user whose portal allows 5 would.
    base_config: ClassVar[dict[str, Any]] = {"search_rate_limit": 5}
    raised_limits = {"default": (1000, 10.0), "search": (50, 1.0)}
    raised_config = {"rate_limit": 1000, "search_rate_limit": 50}
    deal_stage = "appointmentscheduled"

    def emulator(self) -> Any:
        from crmsync.emulators.hubspot import HubSpotEmulator

        return HubSpotEmulator(seed=11)

    def connect(self, app: Any, emu: Any, url: str) -> None:
        from crmsync.sync.connect import connect

        connect(app, provider="hubspot", name=self.conn, base_url=url, options={}, io=_IO(emu.private_app_token))

    def naive_auth(self, emu: Any, server: Any) -> dict[str, Any]:
        return {"base_url": server.url, "token": emu.private_app_token}

    def object_of(self, path: str) -> str:
        parts = path.strip("/").split("/")
        if len(parts) >= 4 and parts[0] == "crm" and parts[2] in ("objects", "properties", "associations"):
            return parts[3]
        return "other"

    @staticmethod
    def _props(obj: str, i: int) -> dict[str, str]:
        if obj == "contacts":
            return {
                "email": f"person{i}@bench.example.org",
                "firstname": f"Ann{i % 89}",
                "lastname": f"Person{i}",
                "phone": f"+1 617 555 {i % 10_000:04d}",
                "jobtitle": ("CEO", "Buyer", "Engineer")[i % 3],
                "lifecyclestage": "lead",
            }
        if obj == "companies":
            return {"name": f"Bench Company {i}", "domain": f"bench-company{i}.example.com", "city": "Boston"}
        return {
            "dealname": f"Bench deal {i}",
            "dealstage": "appointmentscheduled",
            "pipeline": "default",
            "amount": str(1000 + i),
        }

    def create(self, emu: Any, obj: str, n: int, *, at: float, start: int, spread: float = 10.0) -> list[str]:
        """``n`` records, the newest modified at ``at`` and each ``spread`` seconds older than the next.

        Spread out as a real portal's history is, so a first sync's cursor (and look-back) falls
        on one record, not on a whole import. ``spread=0``: one timestamp for all (fast).
        """
        if not spread:
            ids: list[str] = []
            for c in range(0, n, 10_000):
                ids += emu.bulk_create(
                    obj,
                    min(10_000, n - c),
                    modified_at=at,
                    properties_fn=lambda i, c=c: self._props(obj, start + c + i),
                )
            return ids
        return [
            emu.bulk_create(
                obj, 1, modified_at=at - spread * (n - 1 - i), properties_fn=lambda _i, i=i: self._props(obj, start + i)
            )[0]
            for i in range(n)
        ]

    def make_changes(self, emu: Any, ids: dict[str, list[str]], n: int, *, start: float, span: float) -> dict[str, int]:
        """Edits and creations worth ``n`` changes, stamped evenly over ``[start, start + span)``."""
        plan, created = change_plan(n)
        stamps = iter(start + span * j / n for j in range(n))
        for obj, count in plan.items():
            for j, rid in enumerate(ids[obj][:count]):
                change = (
                    {"firstname": f"Edited{j}", "jobtitle": "CFO"}
                    if obj == "contacts"
                    else {"name": f"Edited Company {j}"}
                    if obj == "companies"
                    else {"amount": str(5000 + j)}
                )
                emu.edit(obj, rid, change, at=next(stamps))
        first = len(ids["contacts"])
        for j in range(created):
            emu.bulk_create(
                "contacts",
                1,
                modified_at=next(stamps),
                properties_fn=lambda _i, j=j: self._props("contacts", first + j),
            )
        return changes_made(plan, created)

    def count(self, emu: Any, obj: str) -> int:
        return len(emu.records(obj))

    # -- lower bounds ------------------------------------------------------------------------------
    def push_bound(self, counts: dict[str, int], latency: float) -> Bound:
        """Creates of 100 with associations inline, a domain search per 500 companies (5 ORed IN filters of
        100 values, HubSpot's most), 3 idempotency properties."""
        writes = {o: math.ceil(counts[o] / 100) for o in ("companies", "contacts", "deals", "calls")}
        default = sum(writes.values()) + 3
        search = math.ceil(counts["companies"] / 500)
        text = (
            f"default bucket {' + '.join(f'{v} {o}' for o, v in writes.items())} batch creates of 100 "
            f"(associations inline) + 3 idempotency properties = {default} at 100/10 s; search bucket {search} "
            f"company-domain lookups (5 IN filters of 100 values) at 5/s; bound = max(10 s x floor(({default}-1)/100), "
            f"1 s x floor(({search}-1)/5), 3 x latency) + latency"
        )
        return lower_bound(
            {"default": default, "search": search}, limits=self.limits, latency=latency, chain=4, formula=text
        )

    def pull_bound(self, changes: dict[str, int], latency: float) -> Bound:
        """Honest: changes split between search pages of 200 (search bucket) and list pages of 100 over
        the densest objects (the general bucket; a list reads unchanged records too), from an empty window."""
        return hubspot_pull_bound(changes, self.totals or changes, limits=self.limits, latency=latency)

    def pull_pattern(self, changes: dict[str, int], latency: float) -> Bound | None:
        """Search pages of 200 (offset paging, so parallel up to 5/s), association reads of 1,000, one archived list."""
        objs = {o: n for o, n in changes.items() if not o.startswith("_")}
        search = sum(max(1, math.ceil(n / 200)) for n in objs.values())
        assoc = sum(math.ceil(n / 1000) * HS_ASSOC_TARGETS.get(o, 0) for o, n in objs.items())
        default = assoc + len(objs)
        text = (
            f"search bucket sum(ceil(changes/200)) = {search} pages at 5/s; default bucket {assoc} association "
            f"batch reads (1,000 ids, contacts->companies, deals->contacts+companies) + {len(objs)} archived "
            f"lists = {default} at 100/10 s; bound = max(1 s x floor(({search}-1)/5), 10 s x "
            f"floor(({default}-1)/100), 2 x latency) + latency"
        )
        return lower_bound(
            {"default": default, "search": search}, limits=self.limits, latency=latency, chain=2, formula=text
        )

    def backfill_bound(self, n: int, latency: float, *, raised: bool = True) -> Bound:
        """The best split of N between list pages of 100 (general) and search pages of 200 (search bucket,
        plus one association batch read of 1,000 ids on the general bucket), from an empty window."""
        limits = self.raised_limits if raised else self.limits
        best: Bound | None = None
        for search in range(math.ceil(n / 200) + 1):
            rest = max(0, n - 200 * search)
            pages = math.ceil(rest / 100)
            general = pages + math.ceil(min(n, 200 * search) / 1000)
            b = lower_bound({"default": general, "search": search}, limits=limits, latency=latency, chain=max(1, pages))
            if best is None or b.seconds < best.seconds:
                best = b
        assert best is not None
        g, s = best.requests["default"], best.requests["search"]
        text = (
            f"honest: N split between list pages of 100 (a chain: each `after` from the previous reply) and "
            f"search pages of 200 (+1 association read per 1,000 searched ids) to finish together: {g} general at "
            f"{limits['default'][0]}/10 s from an empty window, {s} search at {limits['search'][0]}/s, "
            f"max(list chain x latency, windows + latency)"
        )
        return Bound(requests=best.requests, seconds=best.seconds, formula=text)

    def backfill_pattern(self, n: int, latency: float, *, raised: bool = True) -> Bound | None:
        """The list endpoint's pages of 100 form a chain: each ``after`` comes from the previous reply."""
        pages = math.ceil(n / 100)
        text = (
            f"ceil(N/100) = {pages} list pages, each `after` from the previous reply: {pages} x latency "
            f"(the raised limit, {self.raised_limits['default'][0]}/10 s, does not bind)"
        )
        return lower_bound({"default": pages}, limits=self.raised_limits, latency=latency, chain=pages, formula=text)


# -- Zoho CRM ----------------------------------------------------------------------------------------
ZOHO_MODULES = {"contacts": "Contacts", "companies": "Accounts", "deals": "Deals", "calls": "Calls"}


class ZohoKit(Kit):
    name = "zoho"
    conn = "zoho"
    modules = ("crmsync.providers.zoho", "crmsync.emulators.zoho")
    server_concurrency = 5  # Free edition; Standard 10, Professional 15 (reference section 4)
    raised_concurrency = 10
    raised_config = {"concurrency": 10}
    settle = 2.0  # Modified_Time has whole seconds

    def emulator(self) -> Any:
        from crmsync.emulators.zoho import ZohoEmulator

        return ZohoEmulator(seed=11)

    def connect(self, app: Any, emu: Any, url: str) -> None:
        from crmsync.sync.connect import connect

        options = {"client_id": emu.client_id, "grant_code": emu.grant_code()}
        connect(app, provider="zoho", name=self.conn, base_url=url, options=options, io=_IO(emu.client_secret))

    def naive_auth(self, emu: Any, server: Any) -> dict[str, Any]:
        return {"base_url": f"{server.url}/crm/v8", "token": self.secret["access_token"]}

    def object_of(self, path: str) -> str:
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[0] == "crm":
            module = parts[2]
            return {v: k for k, v in ZOHO_MODULES.items()}.get(module, module)
        return "other"

    @staticmethod
    def _fields(obj: str, i: int) -> dict[str, Any]:
        if obj == "contacts":
            return {
                "First_Name": f"Ann{i % 89}",
                "Last_Name": f"Person{i}",
                "Email": f"person{i}@bench.example.org",
                "Phone": f"+1 617 555 {i % 10_000:04d}",
                "Title": ("CEO", "Buyer", "Engineer")[i % 3],
            }
        if obj == "companies":
            return {"Account_Name": f"Bench Company {i}", "Website": f"https://bench-company{i}.example.com"}
        return {"Deal_Name": f"Bench deal {i}", "Stage": "Qualification", "Amount": 1000 + i}

    def create(self, emu: Any, obj: str, n: int, *, at: float, start: int, spread: float = 10.0) -> list[str]:
        module = ZOHO_MODULES[obj]
        if not spread:
            return list(emu.bulk_create(module, n, modified_time=int(at)))
        return [
            emu.bulk_create(
                module, 1, modified_time=int(at - spread * (n - 1 - i)), fields=self._fields(obj, start + i)
            )[0]
            for i in range(n)
        ]

    def make_changes(self, emu: Any, ids: dict[str, list[str]], n: int, *, start: float, span: float) -> dict[str, int]:
        plan, created = change_plan(n)
        stamps = iter(start + span * j / n for j in range(n))
        for obj, count in plan.items():
            for j, rid in enumerate(ids[obj][:count]):
                change = (
                    {"First_Name": f"Edited{j}", "Title": "CFO"}
                    if obj == "contacts"
                    else {"Account_Name": f"Edited Company {j}"}
                    if obj == "companies"
                    else {"Amount": 5000 + j}
                )
                emu.edit(ZOHO_MODULES[obj], rid, change, at=int(next(stamps)), notify=False)
        first = len(ids["contacts"])
        for j in range(created):
            emu.bulk_create("Contacts", 1, modified_time=int(next(stamps)), fields=self._fields("contacts", first + j))
        return changes_made(plan, created)

    def count(self, emu: Any, obj: str) -> int:
        return len(emu.records(ZOHO_MODULES[obj]))

    def push_bound(self, counts: dict[str, int], latency: float) -> Bound:
        """Upserts/inserts of 100 with lookups inline, COQL lookups of companies, contacts and deals, 5 in flight.

        Zoho enforces no unique email or deal key, so a client that never duplicates and applies the
        conflict rules (fill-empty, crm-wins need the CRM's values) reads contacts and deals before
        writing them, as it reads companies: 1,250 exact keys per COQL (25 IN groups of 50).
        """
        writes = {o: math.ceil(counts[o] / 100) for o in ("companies", "contacts", "deals", "calls")}
        coql = math.ceil(counts["companies"] / 25)
        exact = math.ceil(counts["contacts"] / 1250) + math.ceil(counts["deals"] / 1250)
        total = sum(writes.values()) + coql + exact + 2
        text = (
            f"{' + '.join(f'{v} {o}' for o, v in writes.items())} upserts/inserts of 100 (lookup fields inline) + "
            f"{coql} COQL company-domain lookups (Website like, 25 per query) + {exact} COQL contact-email and "
            f"deal-key lookups (1,250 per query; Zoho keeps neither unique) + 2 field-metadata reads = {total} "
            f"requests, at most {self.server_concurrency} in flight: ceil({total}/{self.server_concurrency}) x latency"
        )
        return lower_bound(
            {"default": total}, limits={}, latency=latency, concurrency=self.server_concurrency, chain=4, formula=text
        )

    def pull_bound(self, changes: dict[str, int], latency: float) -> Bound:
        """Honest: every object's COQL pages of 2,000 in id ranges side by side, one /deleted each."""
        objs = {o: n for o, n in changes.items() if not o.startswith("_")}
        pages = {o: max(1, math.ceil(n / 2000)) for o, n in objs.items()}
        return partitioned_bound(
            pages, len(objs), concurrency=self.server_concurrency or 1, latency=latency, what="COQL pages of 2,000"
        )

    def pull_pattern(self, changes: dict[str, int], latency: float) -> Bound | None:
        """COQL keyset pages of 2,000 (a walk per object from both ends, objects in parallel), one /deleted each."""
        objs = {o: n for o, n in changes.items() if not o.startswith("_")}
        pages = {o: max(1, math.ceil(n / 2000)) for o, n in objs.items()}
        total = sum(pages.values()) + len(objs)
        chain = max(map(walk_chain, pages.values()))
        text = (
            f"COQL pages of 2,000 {pages} + {len(objs)} /deleted alongside = {total} requests, at most "
            f"{self.server_concurrency} in flight; longest walk {chain} x latency (the first page, then "
            "both ends a round: 1 + ceil((pages - 1) / 2))"
        )
        return lower_bound(
            {"default": total},
            limits={},
            latency=latency,
            concurrency=self.server_concurrency,
            chain=chain,
            formula=text,
        )

    def backfill_bound(self, n: int, latency: float, *, raised: bool = True) -> Bound:
        """Honest: COQL pages of 2,000 in id ranges side by side, one /deleted alongside."""
        conc = (self.raised_concurrency if raised else self.server_concurrency) or 1
        pages = {"contacts": math.ceil(n / 2000)}
        return partitioned_bound(pages, 1, concurrency=conc, latency=latency, what="COQL pages of 2,000")

    def backfill_pattern(self, n: int, latency: float, *, raised: bool = True) -> Bound | None:
        pages = math.ceil(n / 2000)
        chain = walk_chain(pages)
        text = (
            f"ceil(N/2000) = {pages} COQL keyset pages + 1 /deleted alongside, read from both ends: "
            f"1 + ceil(({pages} - 1) / 2) = {chain} x latency"
        )
        return lower_bound(
            {"default": pages + 1},
            limits={},
            latency=latency,
            concurrency=(self.raised_concurrency if raised else self.server_concurrency),
            chain=chain,
            formula=text,
        )


def walk_chain(pages: int) -> int:
    """Round trips a keyset walk of ``pages`` needs when nothing is known of the records in advance.

    The first page shows whether more follow (a small backlog, one page, must not cost two
    queries); from then on a walk reads from both ends at once, so each round trip reads two pages.
    Splitting further needs a guess of where the records lie: a perfect client guesses nothing.
    """
    return 1 if pages <= 1 else 1 + math.ceil((pages - 1) / 2)


# -- Odoo ----------------------------------------------------------------------------------------------
ODOO_MODELS = {"contacts": "res.partner", "companies": "res.partner", "deals": "crm.lead"}
#: Odoo has no rate limit; its workers are the limit. The bound assumes a 2-core server run with the
#: deployment docs' rule of thumb, (2 x CPUs) + 1 = 5 workers (the emulator does not enforce it).
ODOO_WORKERS = 5
#: Odoo caps no page size; one huge read holds a worker for its whole length, so the bound (like
#: crmsync) reads pages of 200 and lets the workers' number bound the parallelism.
_ODOO_PAGES = "search_read pages of 200 by id (Odoo caps no page size; a huge page holds one worker throughout)"


class OdooKit(Kit):
    name = "odoo"
    conn = "odoo"
    modules = ("crmsync.providers.odoo", "crmsync.emulators.odoo")
    # Every scenario runs as a user with a dedicated server configures crmsync (README): `concurrency`
    # raised to the server's workers, which the honest bounds assume; crmsync's default of 2 leaves the
    # other workers of a shared server to its users.
    base_config: ClassVar[dict[str, Any]] = {"concurrency": ODOO_WORKERS}
    raised_config = {"concurrency": ODOO_WORKERS}
    settle = 7.0  # pull reads up to the server clock minus 5 s (write_date is a transaction start)

    def emulator(self) -> Any:
        from crmsync.emulators.odoo import OdooEmulator

        return OdooEmulator(seed=11)

    def connect(self, app: Any, emu: Any, url: str) -> None:
        from crmsync.sync.connect import connect

        options = {"db": emu.db, "user": emu.login}
        connect(app, provider="odoo", name=self.conn, base_url=url, options=options, io=_IO(emu.api_key))

    def naive_auth(self, emu: Any, server: Any) -> dict[str, Any]:
        return {"base_url": server.url, "token": emu.api_key, "db": emu.db}

    def object_of(self, path: str) -> str:
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["json", "2"]:
            return {"res.partner": "contacts+companies", "crm.lead": "deals", "mail.activity": "calls"}.get(
                parts[2], parts[2]
            )
        return "other"

    @staticmethod
    def _vals(obj: str, i: int) -> dict[str, Any]:
        if obj == "contacts":
            return {
                "name": f"Ann{i % 89} Person{i}",
                "email": f"person{i}@bench.example.org",
                "phone": f"+1 617 555 {i % 10_000:04d}",
                "function": ("CEO", "Buyer", "Engineer")[i % 3],
            }
        if obj == "companies":
            return {
                "name": f"Bench Company {i}",
                "is_company": True,
                "website": f"https://bench-company{i}.example.com",
            }
        return {"name": f"Bench deal {i}", "type": "opportunity", "expected_revenue": float(1000 + i)}

    @staticmethod
    def _at(ts: float) -> Any:
        from datetime import UTC, datetime

        return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)

    def create(self, emu: Any, obj: str, n: int, *, at: float, start: int, spread: float = 10.0) -> list[str]:
        model = ODOO_MODELS[obj]
        if not spread:
            return [
                str(i)
                for i in emu.bulk_create(
                    model, n, write_date=self._at(at), vals_fn=lambda i: self._vals(obj, start + i)
                )
            ]
        return [
            str(
                emu.bulk_create(
                    model,
                    1,
                    write_date=self._at(at - spread * (n - 1 - i)),
                    vals_fn=lambda _i, i=i: self._vals(obj, start + i),
                )[0]
            )
            for i in range(n)
        ]

    def make_changes(self, emu: Any, ids: dict[str, list[str]], n: int, *, start: float, span: float) -> dict[str, int]:
        plan, created = change_plan(n)
        stamps = iter(start + span * j / n for j in range(n))
        for obj, count in plan.items():
            for j, rid in enumerate(ids[obj][:count]):
                change = (
                    {"name": f"Edited{j} Person", "function": "CFO"}
                    if obj == "contacts"
                    else {"name": f"Edited Company {j}"}
                    if obj == "companies"
                    else {"expected_revenue": float(5000 + j)}
                )
                emu.edit(ODOO_MODELS[obj], int(rid), change, at=self._at(next(stamps)))
        first = len(ids["contacts"])
        for j in range(created):
            emu.bulk_create(
                "res.partner",
                1,
                write_date=self._at(next(stamps)),
                vals_fn=lambda _i, j=j: self._vals("contacts", first + j),
            )
        return changes_made(plan, created)

    def count(self, emu: Any, obj: str) -> int:
        return len(emu.records("mail.activity")) if obj == "calls" else -1

    def push_bound(self, counts: dict[str, int], latency: float) -> Bound:
        """Lookups and creates of 200, calls created then marked done, at most ODOO_WORKERS in flight."""
        per = {o: math.ceil(counts[o] / 200) for o in ("companies", "contacts", "deals", "calls")}
        lookups = per["companies"] + per["contacts"] + per["deals"]
        total = lookups + sum(per.values()) + per["calls"] + 3
        text = (
            f"{lookups} lookups (email / website / deal key, 200 per search_read; Odoo enforces no unique key) + "
            f"{sum(per.values())} creates of 200 + {per['calls']} action_done + 3 set-up reads = {total} requests; "
            f"Odoo has no rate limit, so at most {ODOO_WORKERS} in flight (assumed workers): "
            f"ceil({total}/{ODOO_WORKERS}) x latency"
        )
        return lower_bound(
            {"default": total}, limits={}, latency=latency, concurrency=ODOO_WORKERS, chain=6, formula=text
        )

    def pull_bound(self, changes: dict[str, int], latency: float) -> Bound:
        """Honest (pages of 200 assumed, see ODOO_WORKERS): id ranges side by side on every worker."""
        objs = {o: n for o, n in changes.items() if not o.startswith("_")}
        pages = {o: math.ceil((n + 1) / 200) for o, n in objs.items()}
        b = partitioned_bound(pages, 2 * len(objs), concurrency=ODOO_WORKERS, latency=latency, what=_ODOO_PAGES)
        return Bound(b.requests, b.seconds + latency, b.formula + " + the clock read first")

    def pull_pattern(self, changes: dict[str, int], latency: float) -> Bound | None:
        objs = {o: n for o, n in changes.items() if not o.startswith("_")}
        pages = {o: math.ceil((n + 1) / 200) for o, n in objs.items()}
        total = sum(pages.values()) + 2 * len(objs)
        chain = 1 + max(map(walk_chain, pages.values()))
        text = (
            f"search_read pages of 200 by id {pages} + a count and a clock read per object = {total} requests, "
            f"at most {ODOO_WORKERS} in flight; the clock read, then the longest walk from both ends: "
            f"{chain} x latency"
        )
        return lower_bound(
            {"default": total}, limits={}, latency=latency, concurrency=ODOO_WORKERS, chain=chain, formula=text
        )

    def backfill_bound(self, n: int, latency: float, *, raised: bool = True) -> Bound:
        """Honest (pages of 200 assumed): id ranges side by side on every worker, a count alongside."""
        pages = {"contacts": math.ceil((n + 1) / 200)}
        b = partitioned_bound(pages, 1, concurrency=ODOO_WORKERS, latency=latency, what=_ODOO_PAGES)
        return Bound(b.requests, b.seconds + latency, b.formula + " + the clock read first")

    def backfill_pattern(self, n: int, latency: float, *, raised: bool = True) -> Bound | None:
        """crmsync's walk: a clock read, the field list, the ids beside the first page, then K ranges."""
        pages = math.ceil((n + 1) / 200)
        k = int(self.raised_config["concurrency"])  # base_config: the workers, raised or not
        chain = 3 + math.ceil((pages - 1) / k)
        text = (
            f"a clock read, the field list, the first page with the window's ids beside it, then {pages - 1} "
            f"search_read pages of 200 in {2 * k} id ranges side by side ({k} in flight): "
            f"3 + ceil(({pages} - 1) / {k}) = {chain} x latency"
        )
        return lower_bound({"default": pages + 3}, limits={}, latency=latency, chain=chain, formula=text)


KITS: dict[str, type[Kit]] = {"hubspot": HubSpotKit, "zoho": ZohoKit, "odoo": OdooKit}
