"""Markdown tables for BENCHMARKS.md from a saved run: ``python -m benchmarks.report RESULTS.json``.

``python -m benchmarks --save RESULTS.json`` writes the input; the output is one table per
scenario (a row per provider) with the lower-bound formulas and baseline notes under it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: Extras the console shows but the markdown leaves out (the JSON keeps them all).
QUIET = frozenset({"emulator requests", "objects", "changes", "created (first run)", "emulator limits"})


def _n(value: Any, fmt: str = ".2f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and fmt == "d":
        return f"{value:,}"
    return format(value, fmt)


def _targets(r: dict[str, Any]) -> str:
    out = []
    for t in r["targets"]:
        op = ">=" if t["higher_is_better"] else "<="
        mark = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        out.append(f"{t['name']} {value} ({op} {t['limit']:g}) {mark}")
    return "; ".join(out) or "-"


def markdown(payload: dict[str, Any]) -> str:
    """The run's header and a table per scenario."""
    run = payload["run"]
    m = run["machine"]
    lines = [
        f"Run: `{run['command']}` on {m['date']}, {'quick' if run['quick'] else 'full'} sizes, "
        f"latency {run['latency_ms']:g} ms, {run['error_rate']:.0%} injected 5xx, "
        f"{run['seconds'] / 60:.0f} min in all.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Python {m['python']}, {m['os']}; "
        f"code: {m.get('commit') or 'unknown'}.",
        "",
    ]
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for r in payload["results"]:
        by_scenario.setdefault(r["scenario"], []).append(r)
    for scenario, rows in by_scenario.items():
        lines += [f"#### {scenario}", ""]
        lines.append(
            "| provider | size | wall s | bound s | ratio | requests | req/record | 429s | retries | 5xx injected "
            "| peak RSS MB | CPU s | naive s | speed-up | targets |"
        )
        lines.append("|" + "---|" * 15)
        for r in rows:
            if r["wall"] is None:
                lines.append(f"| {r['provider']} | {r['size']:,} | {r['note']} |" + " |" * 12)
                continue
            lines.append(
                f"| {r['provider']} | {r['size']:,} | {_n(r['wall'])} | {_n(r['bound'])} | {_n(r['ratio'])} "
                f"| {_n(r['requests'], 'd')} | {_n(r['requests_per_record'], '.4f')} | {_n(r['client_429'], 'd')} "
                f"| {_n(r['retries'], 'd')} | {_n(r['injected_5xx'], 'd')} | {_n(r['peak_rss_mb'], '.0f')} "
                f"| {_n(r['cpu_seconds'], '.1f')} | {_n(r['baseline_wall'], '.1f')} | {_n(r['speedup'], '.1f')} "
                f"| {_targets(r)} |"
            )
        lines.append("")
        for r in rows:
            notes = []
            if r["bound_formula"]:
                notes.append(f"bound: {r['bound_formula']}")
            if r["baseline_note"]:
                notes.append(f"naive: {r['baseline_note']}")
            if r["restarts"] or r["errors"]:
                notes.append(f"restarts {r['restarts']}: {'; '.join(r['errors'][:2])}")
            for key, value in r["extra"].items():
                if key not in QUIET:
                    notes.append(f"{key}: {value}")
            if r["note"]:
                notes.append(r["note"])
            if notes:
                lines.append(f"- **{r['provider']}**")
                lines.extend(f"  - {n}" for n in notes)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """One saved run, or several (a long run finished in parts): their results are concatenated."""
    payloads = [json.loads(Path(a).read_text()) for a in argv]
    payload = payloads[0]
    for extra in payloads[1:]:
        payload["results"] += extra["results"]
        payload["run"]["seconds"] += extra["run"]["seconds"]
        payload["run"]["command"] += f"`, then `{extra['run']['command']}"
    sys.stdout.write(markdown(payload) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
