"""The child side of a measurement: ``python -m benchmarks.worker OP 'JSON spec'``.

Each operation imports what it needs first, then times only the work itself (wall and this
process's CPU) and prints one JSON line. The parent reads the process's peak RSS with wait4.
crmsync runs find their connection, store and secret through the environment
(``CRMSYNC_HOME``, ``CRMSYNC_SECRET_<NAME>``), as the CLI would.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def _profiled(path: str | None) -> Iterator[None]:
    """pyinstrument around the timed work when asked (``--profile DIR``); a no-op otherwise."""
    if not path:
        yield
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.005, async_mode="disabled")
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        Path(path).write_text(profiler.output_text(unicode=False, color=False, show_all=False))


def _timed(spec: dict[str, Any], work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    cpu0, t0 = _cpu(), time.perf_counter()
    # CLOCK_MONOTONIC is system-wide on Linux: timelines line the worker up with the emulator's log.
    started = time.monotonic()
    with _profiled(spec.get("profile")):
        out = work()
    out.setdefault("seconds", time.perf_counter() - t0)
    out["started_monotonic"] = started
    launched = os.environ.get("CRMSYNC_BENCH_T0")
    if launched:  # the interpreter, imports and set-up before the work
        out["setup_seconds"] = started - float(launched)
    out["cpu_seconds"] = _cpu() - cpu0
    return out


# -- crmsync ---------------------------------------------------------------------------------------
def op_push(spec: dict[str, Any]) -> dict[str, Any]:
    """``push`` of a JSONL file, then re-delivery runs while anything is left queued (what cron would do)."""
    from crmsync.app import App
    from crmsync.sync.push import push

    app = App()

    def work() -> dict[str, Any]:
        runs = [push(app, source=spec["source"], connection=spec["connection"]).as_dict()]
        while (runs[-1]["pending"] or runs[-1]["failed"]) and len(runs) < spec.get("max_runs", 4):
            runs.append(push(app, source=None, connection=spec["connection"], retry_failed=True).as_dict())
        return {"runs": runs}

    try:
        return _timed(spec, work)
    finally:
        app.close()


def op_pull(spec: dict[str, Any]) -> dict[str, Any]:
    """``pull`` of some objects; re-run while a run ends in error (the cursor makes that resume)."""
    from crmsync.app import App
    from crmsync.sync.pull import pull

    app = App()

    def work() -> dict[str, Any]:
        runs = []
        while True:
            result = pull(app, connections=[spec["connection"]], objects=spec.get("objects"))[0]
            runs.append(result.as_dict())
            if result.outcome == "ok" or len(runs) >= spec.get("max_runs", 5):
                return {"runs": runs}

    try:
        return _timed(spec, work)
    finally:
        app.close()


def op_backfill(spec: dict[str, Any]) -> dict[str, Any]:
    """``backfill``; re-run while a run ends in error (it continues from its checkpoint)."""
    from crmsync.app import App
    from crmsync.sync.pull import backfill

    app = App()

    def work() -> dict[str, Any]:
        runs = []
        while True:
            result = backfill(app, connection=spec["connection"], objects=spec.get("objects"))
            runs.append(result.as_dict())
            if result.outcome == "ok" or len(runs) >= spec.get("max_runs", 8):
                return {"runs": runs}

    try:
        return _timed(spec, work)
    finally:
        app.close()


def op_ingest(spec: dict[str, Any]) -> dict[str, Any]:
    """Local ingest, no network: generated HubSpot-shaped pages -> ``ingest_pages`` (mapping + store).

    ``ingest_pages`` is the code ``pull`` and ``backfill`` run (its page fetching thread here just
    hands over ready pages). Only mapping + hashing + SQLite writes are timed; the pages are
    generated beforehand, 10,000 records at a time (the network layer would have produced them).
    """
    from benchmarks.data import hubspot_contact_page
    from crmsync.mapping import Mapping
    from crmsync.providers.base import Page
    from crmsync.store import Store
    from crmsync.sync.pull import ingest_pages

    store = Store.open(spec["db"])
    mapping = Mapping.load("hubspot")
    n, size = int(spec["records"]), int(spec.get("page", 100))
    run_id = store.runs.start("bench", "pull", mapping_hash=mapping.hash)

    def one_pass(updated: bool) -> tuple[float, float, dict[str, int]]:
        busy = cpu = 0.0
        counts = {"created": 0, "updated": 0, "unchanged": 0}
        for block in range(0, n, 10_000):
            pages = [
                Page(records=hubspot_contact_page(start, min(size, n - start), edited=updated), cursor={"after": start})
                for start in range(block, min(n, block + 10_000), size)
            ]
            c0, t0 = time.process_time(), time.perf_counter()
            for _page, got, _read in ingest_pages(store, "bench", mapping, "contacts", pages, run_id=run_id):
                counts["created"] += got.created
                counts["updated"] += got.updated
                counts["unchanged"] += got.unchanged
            busy += time.perf_counter() - t0
            cpu += time.process_time() - c0
        return busy, cpu, counts

    with _profiled(spec.get("profile")):
        first = one_pass(False)
        again = one_pass(False)  # the same records again: nothing may be written
        edited = one_pass(True)  # every record changed once
    store.close()
    return {
        "seconds": first[0],
        "cpu_seconds": first[1],
        "created": first[2],
        "unchanged_pass": {"seconds": again[0], "counts": again[2]},
        "update_pass": {"seconds": edited[0], "counts": edited[2]},
    }


def op_naive_ingest(spec: dict[str, Any]) -> dict[str, Any]:
    """What an ad-hoc script does locally: one INSERT OR REPLACE of the raw JSON and one commit per record."""
    import sqlite3

    from benchmarks.data import hubspot_contact_page

    db = sqlite3.connect(spec["db"])
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS contacts (id TEXT PRIMARY KEY, properties TEXT, updated_at TEXT)")
    n = int(spec["records"])
    busy = 0.0
    for start in range(0, n, 100):
        page = hubspot_contact_page(start, min(100, n - start), edited=False)
        t0 = time.perf_counter()
        for r in page:
            db.execute(
                "INSERT OR REPLACE INTO contacts VALUES (?, ?, ?)",
                (r.id, json.dumps(r.properties), r.updated_at.isoformat() if r.updated_at else None),
            )
            db.commit()
        busy += time.perf_counter() - t0
    db.close()
    return {"seconds": busy, "records": n}


def op_webhook(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import webhook_load

    return _timed(spec, lambda: {"result": webhook_load.run(events=int(spec["events"]), quick=bool(spec["quick"]))})


def op_naive_push(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import naive

    return _timed(spec, lambda: naive.PUSH[spec["provider"]](spec))


def op_naive_pull(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import naive

    return _timed(spec, lambda: naive.PULL[spec["provider"]](spec))


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "push": op_push,
    "pull": op_pull,
    "backfill": op_backfill,
    "ingest": op_ingest,
    "naive-ingest": op_naive_ingest,
    "webhook": op_webhook,
    "naive-push": op_naive_push,
    "naive-pull": op_naive_pull,
}


def main(argv: list[str]) -> int:
    from crmsync.http.tuning import tune_gc

    tune_gc()  # as the CLI does: the worker stands in for a `crmsync` process
    op, spec = argv[0], json.loads(argv[1])
    result = OPS[op](spec)
    sys.stdout.write("\n" + json.dumps(result, default=str) + "\n")
    return 0


if __name__ == "__main__":
    from crmsync.exiting import exit_now

    exit_now(main(sys.argv[1:]))  # as a `crmsync` process ends
