"""The scenarios: set up an emulator (untimed), run crmsync and the naive baseline in children, report.

Each scenario function takes the provider kits, the options and a logger and returns one
``Result`` per provider (or one in all for the provider-independent ones). The per-provider
knowledge (emulator, limits, request formulas of the lower bound, naive client) is in
``benchmarks.kits``.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import Bound, Child, Result, Target, child_env, run_process, run_worker

Log = Callable[[str], None]


@dataclass
class Options:
    quick: bool = False
    latency: float = 0.150
    error_rate: float = 0.01
    baseline_cap: int | None = None
    profile_dir: Path | None = None
    single: bool = False
    toy: int | None = None  # --size (and the smoke test): every scenario at this size
    account_limits: bool = False  # --account-limits: backfill at the account's own limits, not raised ones
    kills: int = 3  # --kills: SIGKILLs of the 1,000,000-record backfill before the run that finishes
    lifted: bool = False  # --lifted: backfill with every limit lifted, emulator and crmsync alike
    baseline: bool = True  # --no-baseline: crmsync alone (quicker while iterating; no speed-up column)

    def size(self, full: int, quick: int) -> int:
        if self.toy:
            return self.toy
        return quick if self.quick else full

    def cap(self, quick: int, full: int) -> int | None:
        """How many outcomes/records the naive baseline really runs (None: all)."""
        if self.baseline_cap is not None:
            return self.baseline_cap or None
        if self.toy and self.toy < 100:
            return max(1, self.toy // 3)
        return quick if self.quick else full

    def profile(self, name: str) -> str | None:
        if self.profile_dir is None:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        return str(self.profile_dir / f"{name}.txt")


def pick_providers(value: str | None) -> list[Any]:
    """The kits asked for (default: all that can run here); unknown names are an error."""
    from benchmarks.kits import KITS as FIRST
    from benchmarks.kits_more import MORE_KITS

    KITS = {**FIRST, **MORE_KITS}
    names = [n.strip().lower() for n in value.split(",")] if value else list(KITS)
    unknown = [n for n in names if n not in KITS]
    if unknown:
        raise SystemExit(f"unknown provider {unknown[0]!r}; choose from {', '.join(KITS)}")
    return [KITS[n]() for n in names]


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _pending(scenario: str, kit: Any, size: int, unit: str) -> Result:
    return Result(scenario=scenario, provider=kit.name, size=size, unit=unit, note=f"pending: {kit.missing}")


def _client_counts(runs: list[dict[str, Any]]) -> dict[str, int]:
    return {k: sum(int(r.get(k) or 0) for r in runs) for k in ("requests", "retries", "rate_limited")}


def _fill_network(r: Result, child: Child, runs: list[dict[str, Any]], emu: Any, emu_cpu: float) -> None:
    counts = _client_counts(runs)
    r.wall = float(child.data["seconds"])
    r.wall_start = child.seconds
    r.requests, r.retries, r.client_429 = counts["requests"], counts["retries"], counts["rate_limited"]
    r.earned_429, r.injected_5xx = emu.stats.rate_limited, emu.stats.errors_injected
    r.peak_rss_mb, r.cpu_seconds = child.peak_rss_mb, float(child.data["cpu_seconds"])
    r.restarts = len(runs) - 1
    r.errors = [str(x["error"])[:300] for x in runs if x.get("error")]
    # pull/backfill keep an object's error on the object (the run ends "partial", exit 1)
    r.errors += [
        f"{name}: {str(o['error'])[:300]}"
        for x in runs
        for name, o in (x.get("objects") or {}).items()
        if isinstance(o, dict) and o.get("error")
    ]
    r.extra["emulator requests"] = emu.stats.requests
    r.extra["emulator CPU s"] = round(emu_cpu, 1)
    r.extra["child process s / CPU s"] = f"{child.seconds:.1f} / {child.cpu_seconds:.1f} (imports included)"
    if "setup_seconds" in child.data:
        setup = float(child.data["setup_seconds"])
        r.extra["child set-up / work / exit s"] = f"{setup:.2f} / {r.wall:.2f} / {child.seconds - setup - r.wall:.2f}"


def _bound(r: Result, b: Bound, pattern: Bound | None = None) -> None:
    """The honest bound, and beside it (labelled) the bound of crmsync's own access pattern."""
    r.bound, r.bound_requests, r.bound_formula = b.seconds, b.total, f"{b.formula} = {b.seconds:.2f} s"
    if pattern is not None:
        r.pattern, r.pattern_formula = pattern.seconds, f"{pattern.formula} = {pattern.seconds:.2f} s"


#: crmsync's settings for ``--lifted``: no limit of its own binds.
LIFTED_CONFIG = {"rate_limit": 10_000_000, "search_rate_limit": 1_000_000, "concurrency": 16}

#: Issue 31: at least this share of the honest bound, from process start.
HONEST_TARGET = 0.85


def _baseline(r: Result, child: Child, measured: int, note: str) -> None:
    seconds = float(child.data["seconds"])
    r.baseline_measured = measured
    r.baseline_wall = seconds * r.size / measured if measured else None
    r.baseline_requests = int(child.data.get("requests") or 0)
    extrapolated = (
        f", extrapolated x{r.size / measured:.1f} (a sequential client scales linearly)" if measured != r.size else ""
    )
    r.baseline_note = (
        f"{note}: {measured:,} {r.unit}s in {seconds:.1f} s, {r.baseline_requests:,} requests "
        f"({r.baseline_requests / max(1, measured):.2f}/{r.unit}), {child.data.get('retries', 0)} retries, "
        f"{child.data.get('failed', 0)} given up{extrapolated}"
    )


# -- push ------------------------------------------------------------------------------------------
def push(kits: list[Any], opts: Options, log: Log) -> list[Result]:
    """Push N new outcomes (every 2nd with a company, every 5th with a deal) through the outbox."""
    from benchmarks.data import write_outcomes

    results = []
    for kit in kits:
        n = opts.size(*kit.push_sizes)
        if kit.missing:
            results.append(_pending("push", kit, n, "outcome"))
            continue
        log(f"push/{kit.name}: {n:,} outcomes ...")
        r = Result(scenario="push", provider=kit.name, size=n, unit="outcome")
        with tempfile.TemporaryDirectory(prefix="crmsync-bench-") as tmp:
            home = Path(tmp)
            emu, server, env = kit.start(home)
            try:
                counts = write_outcomes(home / "outcomes.jsonl", n, deal_stage=kit.deal_stage)
                kit.arm(emu, opts)
                r.extra["load before"] = _load()
                cpu0 = time.process_time()
                child = run_worker(
                    "push",
                    {
                        "connection": kit.conn,
                        "source": str(home / "outcomes.jsonl"),
                        "profile": opts.profile(f"push-{kit.name}"),
                    },
                    env=child_env(env),
                )
                emu_cpu = time.process_time() - cpu0
                runs = child.data["runs"]
                _fill_network(r, child, runs, emu, emu_cpu)
                last = runs[-1]
                r.failed = int(last.get("failed") or 0) + int(last.get("pending") or 0)
                r.extra["created (first run)"] = runs[0].get("created")
                per_type = kit.requests_by_object(emu)
                r.extra["requests by object (emulator)"] = dict(per_type)
                # Requests per object of each type ("a+b": one endpoint serves both, as Odoo's res.partner).
                per_obj = {
                    k: v / sum(counts.get(o, 0) for o in k.split("+"))
                    for k, v in per_type.items()
                    if all(counts.get(o) for o in k.split("+"))
                }
                r.extra["requests per object, by type"] = {o: round(v, 4) for o, v in per_obj.items()}
                r.extra["objects"] = counts
                r.extra["calls in the CRM"] = kit.count(emu, "calls")
                _bound(r, kit.push_bound(counts, opts.latency))
            finally:
                server.stop()
            cap = opts.cap(25, 1_000)
            measured = min(n, cap) if cap else n
            if kit.naive and opts.baseline:
                log(f"push/{kit.name}: naive baseline, {measured:,} outcomes ...")
                emu, server, env = kit.start(home / "naive")
                try:
                    kit.arm(emu, opts)
                    naive = run_worker(
                        "naive-push",
                        {
                            "provider": kit.name,
                            "source": str(home / "outcomes.jsonl"),
                            "limit": measured,
                            **kit.naive_auth(emu, server),
                        },
                        env=child_env(env),
                    )
                finally:
                    server.stop()
                _baseline(r, naive, measured, "one create per object, sequential")
        r.extra["load after"] = _load()
        r.targets.append(Target("unrecovered failures", r.failed, 0))
        r.targets.append(Target("honest ratio", r.ratio, HONEST_TARGET, higher_is_better=True))
        r.targets.append(Target("429s", r.client_429, 0))
        if kit.name == "hubspot":
            worst = max(r.extra["requests per object, by type"].values())
            r.targets.append(Target("requests per object (worst type)", worst, 0.03))
        results.append(r)
    return results


# -- incremental pull ----------------------------------------------------------------------------
def pull(kits: list[Any], opts: Options, log: Log) -> list[Result]:
    """Incremental pull after N remote changes (edits and creations) across contacts, companies, deals."""
    n = opts.size(20_000, 2_000)
    results = []
    for kit in kits:
        if kit.missing:
            results.append(_pending("pull", kit, n, "record"))
            continue
        r = Result(scenario="pull", provider=kit.name, size=n, unit="record")
        with tempfile.TemporaryDirectory(prefix="crmsync-bench-") as tmp:
            home = Path(tmp)
            emu, server, env = kit.start(home)
            try:
                log(f"pull/{kit.name}: seeding and the initial sync (untimed) ...")
                initial = {o: int(n * share) for o, share in kit.pull_initial.items()}
                ids = {o: kit.create(emu, o, k, at=time.time() - 7200, start=0) for o, k in initial.items()}
                kit.initial_sync(home, list(initial))
                start = time.time() + 1.0
                span = max(1.0, n / 5_000)
                changes = kit.make_changes(emu, ids, n, start=start, span=span)
                # Every change must lie in the past (and settled) when the pull starts.
                time.sleep(max(0.0, start + span + kit.settle - time.time()))
                r.extra["changes"] = changes
                kit.totals = {o: k + (changes.get("_created", 0) if o == "contacts" else 0) for o, k in initial.items()}
                kit.write_config(home, {})
                kit.arm(emu, opts)
                log(f"pull/{kit.name}: {n:,} changes ...")
                r.extra["load before"] = _load()
                cpu0 = time.process_time()
                child = run_worker(
                    "pull",
                    {"connection": kit.conn, "objects": list(initial), "profile": opts.profile(f"pull-{kit.name}")},
                    env=child_env(env),
                )
                emu_cpu = time.process_time() - cpu0
                runs = child.data["runs"]
                _fill_network(r, child, runs, emu, emu_cpu)
                r.failed = 0 if runs[-1]["outcome"] == "ok" else 1
                read = {o: v["read"] for o, v in runs[-1]["objects"].items()}
                r.extra["read (last run)"] = read
                r.extra["requests by object (emulator)"] = dict(kit.requests_by_object(emu))
                _bound(r, kit.pull_bound(changes, opts.latency), kit.pull_pattern(changes, opts.latency))
                if kit.naive and opts.baseline:
                    _naive_pull(r, kit, emu, server, env, home, list(initial), opts, log)
            finally:
                server.stop()
        r.extra["load after"] = _load()
        r.targets.append(Target("unrecovered failures", r.failed, 0))
        r.targets.append(Target("honest ratio", r.ratio, HONEST_TARGET, higher_is_better=True))
        r.targets.append(Target("429s", r.client_429, 0))
        results.append(r)
    return results


def _naive_pull(
    r: Result,
    kit: Any,
    emu: Any,
    server: Any,
    env: dict[str, str],
    home: Path,
    objects: list[str],
    opts: Options,
    log: Log,
) -> None:
    """The SDK-style getAll of every record, sequential, into SQLite row by row (same data, fresh windows)."""
    log(f"pull/{kit.name}: naive baseline (getAll of every record) ...")
    kit.arm(emu, opts)
    naive = run_worker(
        "naive-pull",
        {"provider": kit.name, "objects": objects, "sqlite": str(home / "naive.db"), **kit.naive_auth(emu, server)},
        env=child_env(env),
    )
    r.baseline_measured = r.size
    r.baseline_wall = float(naive.data["seconds"])
    r.baseline_requests = int(naive.data["requests"])
    r.baseline_note = (
        f"SDK getAll of every record ({naive.data['records']:,}; no cursor, so it re-reads all), "
        f"sequential, row-by-row SQLite: {r.baseline_wall:.1f} s, {r.baseline_requests:,} requests, "
        f"{naive.data['retries']} retries, {naive.data['failed']} given up"
    )


def _naive_backfill(
    r: Result,
    kit: Any,
    emu: Any,
    server: Any,
    env: dict[str, str],
    home: Path,
    n: int,
    raised: bool,
    opts: Options,
    log: Log,
) -> None:
    """The SDK-style page walk of the contacts, row by row into SQLite (same data, fresh windows)."""
    cap = opts.cap(1_000, 0) or n
    measured = min(n, cap)
    log(f"backfill/{kit.name}: naive baseline, {measured:,} records ...")
    kit.arm(emu, opts, raised=raised)  # the same data, counters and rate windows afresh
    naive = run_worker(
        "naive-pull",
        {
            "provider": kit.name,
            "objects": ["contacts"],
            "limit": measured,
            "sqlite": str(home / "naive.db"),
            **kit.naive_auth(emu, server),
        },
        env=child_env(env),
    )
    _baseline(r, naive, int(naive.data["records"]), "SDK getAll page walk, row-by-row SQLite")


# -- backfill ------------------------------------------------------------------------------------
def backfill(kits: list[Any], opts: Options, log: Log) -> list[Result]:
    """Backfill N contacts with the emulator's rate limit raised (the config says so too)."""
    n = opts.size(100_000, 10_000)
    results = []
    for kit in kits:
        if kit.missing:
            results.append(_pending("backfill", kit, n, "record"))
            continue
        r = Result(scenario="backfill", provider=kit.name, size=n, unit="record")
        with tempfile.TemporaryDirectory(prefix="crmsync-bench-") as tmp:
            home = Path(tmp)
            emu, server, env = kit.start(home)
            try:
                log(f"backfill/{kit.name}: seeding {n:,} contacts (untimed) ...")
                kit.create(emu, "contacts", n, at=time.time() - 86_400, start=0, spread=0)
                raised = not opts.account_limits
                kit.write_config(home, LIFTED_CONFIG if opts.lifted else kit.raised_config if raised else {})
                kit.arm(emu, opts, raised=raised, lifted=opts.lifted)
                log(f"backfill/{kit.name}: {n:,} records ...")
                r.extra["load before"] = _load()
                cpu0 = time.process_time()
                child = run_worker(
                    "backfill",
                    {"connection": kit.conn, "objects": ["contacts"], "profile": opts.profile(f"backfill-{kit.name}")},
                    env=child_env(env),
                )
                emu_cpu = time.process_time() - cpu0
                runs = child.data["runs"]
                _fill_network(r, child, runs, emu, emu_cpu)
                r.failed = 0 if runs[-1]["outcome"] == "ok" else 1
                r.extra["read (all runs)"] = sum(v["read"] for x in runs for v in x["objects"].values())
                r.extra["emulator limits"] = "lifted" if opts.lifted else kit.limits_text(raised=raised)
                if opts.lifted:
                    r.note = "every limit lifted: no CRM limit binds, so no bound; where the client's CPU goes"
                else:
                    _bound(
                        r,
                        kit.backfill_bound(n, opts.latency, raised=raised),
                        kit.backfill_pattern(n, opts.latency, raised=raised),
                    )
                if kit.naive and opts.baseline:
                    _naive_backfill(r, kit, emu, server, env, home, n, raised, opts, log)
            finally:
                server.stop()
        r.extra["load after"] = _load()
        r.targets.append(Target("unrecovered failures", r.failed, 0))
        r.targets.append(Target("honest ratio", r.ratio, HONEST_TARGET, higher_is_better=True))
        r.targets.append(Target("429s", r.client_429, 0))
        r.targets.append(Target("peak RSS MB", r.peak_rss_mb, 200))
        results.append(r)
    return results


def backfill_1m(kits: list[Any], opts: Options, log: Log) -> list[Result]:
    """Peak RSS of a 1,000,000-record partitioned backfill (no latency, limits raised), SIGKILLed
    ``opts.kills`` times part-way and resumed, then checked: every record stored exactly once. Full runs only."""
    if opts.quick and not opts.single:
        return []
    n = opts.toy or (100_000 if opts.quick else 1_000_000)
    kit = next((k for k in kits if k.name == "hubspot" and not k.missing), None)
    if kit is None:
        return []
    r = Result(scenario="backfill-1m", provider=kit.name, size=n, unit="record")
    with tempfile.TemporaryDirectory(prefix="crmsync-bench-") as tmp:
        home = Path(tmp)
        emu, server, env = kit.start(home)
        try:
            log(f"backfill-1m/{kit.name}: seeding {n:,} contacts (untimed) ...")
            kit.create(emu, "contacts", n, at=time.time() - 86_400, start=0, spread=0)
            kit.write_config(home, kit.raised_config)
            no_latency = Options(quick=opts.quick, latency=0.0, error_rate=0.0)
            kit.arm(emu, no_latency, raised=True)
            r.extra["load before"] = _load()
            spec = {"connection": kit.conn, "objects": ["contacts"]}
            killed = []
            rng = random.Random(31)
            for k in range(opts.kills):
                after = rng.uniform(4.0, 12.0)
                log(f"backfill-1m/{kit.name}: run {k + 1}, SIGKILL after {after:.1f} s ...")
                cut = run_worker("backfill", spec, env=child_env(env), kill_after=after)
                killed.append({"stored": _mirror_rows(home, kit.conn)[0], "peak RSS MB": round(cut.peak_rss_mb)})
            log(f"backfill-1m/{kit.name}: {n:,} records, the run to the end ...")
            cpu0 = time.process_time()
            child = run_worker("backfill", spec, env=child_env(env))
            emu_cpu = time.process_time() - cpu0
            runs = child.data["runs"]
            _fill_network(r, child, runs, emu, emu_cpu)
            rows, distinct = _mirror_rows(home, kit.conn)
            r.failed = 0 if runs[-1]["outcome"] == "ok" and rows == distinct == n else 1
            r.peak_rss_mb = max([r.peak_rss_mb or 0.0, *(x["peak RSS MB"] for x in killed)])
            r.extra["SIGKILLed runs (rows stored when killed)"] = killed
            r.extra["read by the last run"] = sum(v["read"] for x in runs for v in x["objects"].values())
            r.extra["rows / distinct ids stored"] = f"{rows:,} / {distinct:,}"
            r.extra["store size MB"] = round(sum(p.stat().st_size for p in home.glob("crmsync.db*")) / 1e6, 1)
        finally:
            server.stop()
    r.note = "latency 0 and no injected errors: a memory and resume measurement, so no bound or baseline"
    r.extra["load after"] = _load()
    r.targets.append(Target("peak RSS MB (every run)", r.peak_rss_mb, 200))
    r.targets.append(Target("records not stored exactly once", r.failed, 0))
    return [r]


def _mirror_rows(home: Path, connection: str) -> tuple[int, int]:
    """(rows, distinct remote ids) of the connection's contacts in the store, read beside crmsync."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{home / 'crmsync.db'}?mode=ro", uri=True, timeout=30)) as db:
        query = (
            "select count(*), count(distinct remote_id) from crm_record where connection = ? and object = 'contacts'"
        )
        rows, distinct = db.execute(query, (connection,)).fetchone()
    return int(rows), int(distinct)


# -- webhook ingest -----------------------------------------------------------------------------
def webhook(kits: list[Any], opts: Options, log: Log) -> list[Result]:
    """The webhook receiver under load (benchmarks.webhook_load, owned by the webhook issue)."""
    n = opts.size(10_000, 1_000)
    r = Result(scenario="webhook", provider="hubspot", size=n, unit="event")
    try:
        import benchmarks.webhook_load  # noqa: F401
    except ImportError:
        r.note = "pending: benchmarks/webhook_load.py is not there yet"
        return [r]
    log(f"webhook: {n:,} signed events ...")
    r.extra["load before"] = _load()
    try:
        child = run_worker("webhook", {"events": n, "quick": opts.quick})
    except RuntimeError as exc:
        r.note = f"failed: {str(exc)[-400:]}"
        return [r]
    data = child.data["result"]
    r.wall = float(data.get("seconds") or child.data["seconds"])
    r.requests = int(data.get("requests") or n)
    r.peak_rss_mb, r.cpu_seconds = child.peak_rss_mb, child.cpu_seconds
    r.extra.update(
        {
            k: data[k]
            for k in (
                "verified_events_per_second",
                "p50_ms",
                "p99_ms",
                "max_ms",
                "lost",
                "unexpected",
                "statuses",
                "clients",
            )
            if k in data
        }
    )
    r.note = (
        "no rate limit applies (the receiver is ours), so no bound; no naive baseline. RSS and CPU are "
        "the load generator's and the receiver's together (wait4 of the tree)"
    )
    r.extra["load after"] = _load()
    if "verified_events_per_second" in data:
        r.targets.append(Target("verified events/s", data["verified_events_per_second"], 1000, higher_is_better=True))
    if "p99_ms" in data:
        r.targets.append(Target("p99 answer ms", data["p99_ms"], 200))
    return [r]


# -- local ingest --------------------------------------------------------------------------------
def ingest(kits: list[Any], opts: Options, log: Log) -> list[Result]:
    """Mapping + hashing + SQLite writes with no network: HubSpot-shaped contact pages of 100."""
    n = opts.size(100_000, 10_000)
    r = Result(scenario="ingest", provider="local", size=n, unit="record")
    with tempfile.TemporaryDirectory(prefix="crmsync-bench-") as tmp:
        log(f"ingest: {n:,} records through to_canonical + Mirror.apply_page ...")
        r.extra["load before"] = _load()
        child = run_worker(
            "ingest", {"db": str(Path(tmp) / "ingest.db"), "records": n, "profile": opts.profile("ingest")}
        )
        measured = min(n, 1_000 if opts.quick else 10_000)
        naive = run_worker("naive-ingest", {"db": str(Path(tmp) / "naive.db"), "records": measured})
    r.wall = float(child.data["seconds"])
    r.wall_start = child.seconds
    r.cpu_seconds = float(child.data["cpu_seconds"])
    r.peak_rss_mb = child.peak_rss_mb
    again, edited = child.data["unchanged_pass"], child.data["update_pass"]
    r.extra["records/s (new records)"] = round(n / r.wall)
    r.extra["records/s (same records again: unchanged, nothing written)"] = round(n / again["seconds"])
    r.extra["records/s (every record edited)"] = round(n / edited["seconds"])
    r.extra["CPU share of wall"] = f"{r.cpu_seconds / r.wall:.0%}"
    _baseline(r, naive, measured, "sqlite3 INSERT OR REPLACE of the raw JSON, one commit per record, no mapping")
    r.note = "no network, so no bound or requests"
    r.extra["load after"] = _load()
    r.targets.append(Target("records/s", r.records_per_second, 20_000, higher_is_better=True))
    return [r]


# -- start-up -------------------------------------------------------------------------------------
def startup(kits: list[Any], opts: Options, log: Log) -> list[Result]:
    """Wall time of ``crmsync --version``, ``--help`` and ``status`` (median of N fresh processes)."""
    exe = Path(sys.executable).parent / "crmsync"
    cmd0 = [str(exe)] if exe.exists() else [sys.executable, "-m", "crmsync"]
    runs = opts.size(11, 5)
    results = []
    with tempfile.TemporaryDirectory(prefix="crmsync-bench-") as tmp:
        home = Path(tmp)
        env = child_env({"CRMSYNC_HOME": str(home)})
        hub = next((k for k in kits if k.name == "hubspot" and not k.missing), None)
        if hub is not None:
            _emu, server, extra = hub.start(home)
            server.stop()
            env.update(extra)
        for label, args, limit in (
            ("--version", ["--version"], 0.25),
            ("--help", ["--help"], 0.5),
            ("status", ["status"], None),
        ):
            log(f"startup: crmsync {label} x{runs} ...")
            run_process(cmd0 + args, env=env)  # warm the page cache and .pyc files
            samples = [run_process(cmd0 + args, env=env) for _ in range(runs)]
            if any(s.code != 0 for s in samples):
                bad = next(s for s in samples if s.code != 0)
                log(f"startup: crmsync {label} exited {bad.code}: {bad.stderr[-300:]}")
            wall = statistics.median(s.seconds for s in samples)
            r = Result(scenario=f"startup {label}", provider="cli", size=1, unit="run")
            r.wall = wall
            r.peak_rss_mb = max(s.peak_rss_mb for s in samples)
            r.cpu_seconds = statistics.median(s.cpu_seconds for s in samples)
            r.extra["min / max s"] = f"{min(s.seconds for s in samples):.3f} / {max(s.seconds for s in samples):.3f}"
            r.extra["command"] = " ".join([Path(cmd0[0]).name, *cmd0[1:], *args])
            r.note = f"median of {runs} runs after one warm-up; no network, so no bound or baseline"
            if limit is not None:
                r.targets.append(Target("wall s", wall, limit))
            results.append(r)
    return results


#: Scenarios run once per provider (the others run once in all).
PER_PROVIDER = frozenset({"push", "pull", "backfill"})

SCENARIOS: dict[str, Callable[[list[Any], Options, Log], list[Result]]] = {
    "push": push,
    "pull": pull,
    "backfill": backfill,
    "webhook": webhook,
    "ingest": ingest,
    "startup": startup,
    "backfill-1m": backfill_1m,
}
