"""Pipedrive push cost against its emulator (Growth plan, in process): requests, tokens, time, 429s.

    python -m benchmarks.pipedrive                 # 1,000 outcomes, new persons, empty company
    python -m benchmarks.pipedrive --n 300 --company 40000   # a company too big to read: searches

Each outcome names a new person (no company or deal), as BENCHMARKS.md's Pipedrive rows state.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.data import outcome
from benchmarks.kits import _IO, _memory_keyring


def run(n: int, company: int, rate_limit: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="crmsync-pd-bench-"))
    os.environ["CRMSYNC_HOME"] = str(home)
    _memory_keyring()
    from crmsync.app import App
    from crmsync.cli.exits import for_push
    from crmsync.emulators.pipedrive import PipedriveEmulator
    from crmsync.providers.pipedrive.records import marker_of
    from crmsync.sync.connect import connect
    from crmsync.sync.push import push

    (home / "config.yaml").write_text(
        json.dumps({"connections": {"pd": {"rate_limit": rate_limit, "plan": "growth", "seats": 3}}})
    )
    emu = PipedriveEmulator(plan="growth", seats=3)
    if company:
        emu.bulk_create(
            "persons",
            company,
            lambda i: {"name": f"Known {i}", "emails": [{"value": f"known{i}@example.net", "primary": True}]},
        )
    app = App(env={"CRMSYNC_HOME": str(home)}, transport=lambda name: emu.transport())
    connect(app, provider="pipedrive", name="pd", base_url="http://pd.test", options={}, io=_IO(emu.api_token))
    src = home / "outcomes.jsonl"
    lines = []
    for i in range(n):
        o = outcome(i, prefix="pd")
        o.pop("company", None)
        o.pop("deal", None)
        lines.append(json.dumps(o))
    src.write_text("\n".join(lines) + "\n")
    emu.stats.by_route.clear()
    emu.stats.rate_limited = 0
    tokens_before, requests_before = emu.tokens_used, emu.stats.requests
    started = time.monotonic()
    summary = push(app, source=str(src), connection="pd")
    seconds = time.monotonic() - started
    persons = {p["id"]: p for p in emu.records("persons")}
    calls = [a for a in emu.records("activities") if a["type"] == "call" and a["done"]]
    markers = Counter(marker_of(a["note"]) for a in calls)
    with_person = sum(1 for a in calls if a["participants"] and a["participants"][0]["person_id"] in persons)
    return {
        "outcomes": n,
        "company_persons": company,
        "exit_code": int(for_push(summary)),
        "requests": emu.stats.requests - requests_before,
        "tokens": emu.tokens_used - tokens_before,
        "seconds": round(seconds, 1),
        "rate_limited_429": emu.stats.rate_limited,
        "call_activities": len(calls),
        "calls_logged_twice": sum(1 for c in markers.values() if c > 1),
        "calls_with_their_person": with_person,
        "by_route": dict(emu.stats.by_route.most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="outcomes (each a new person)")
    parser.add_argument("--company", type=int, default=0, help="persons the company holds before the push")
    parser.add_argument("--rate-limit", type=int, default=40, help="burst per 2 s (Growth: 40)")
    args = parser.parse_args()
    print(json.dumps(run(args.n, args.company, args.rate_limit), indent=2))


if __name__ == "__main__":
    main()
