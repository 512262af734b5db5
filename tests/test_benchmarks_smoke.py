"""The benchmark harness still runs: its push scenario at toy size produces every report figure.

Timings are not checked (a test never judges speed); only that the harness, its child processes,
the naive baseline and the report keep working as the code under them changes.
"""

from __future__ import annotations

import pytest

from benchmarks import scenarios
from benchmarks.harness import render


@pytest.mark.slow
def test_push_scenario_at_toy_size_reports_every_figure() -> None:
    opts = scenarios.Options(quick=True, latency=0.0, error_rate=0.0, toy=12)
    [result] = scenarios.push(scenarios.pick_providers("hubspot"), opts, lambda _message: None)

    report = result.as_dict()
    for key in (
        "wall",
        "wall_start",
        "bound",
        "ratio",
        "requests",
        "requests_per_record",
        "client_429",
        "retries",
        "peak_rss_mb",
        "cpu_seconds",
        "baseline_wall",
        "speedup",
    ):
        assert report[key] is not None, key
    assert report["size"] == 12 and report["failed"] == 0
    assert report["extra"]["calls in the CRM"] == 12
    assert {t["name"] for t in report["targets"]} >= {"honest ratio", "429s", "unrecovered failures"}
    lines: list[str] = []
    render([result], out=lines.append)
    assert lines[0].split()[:3] == ["scenario", "provider", "size"]
    assert report["wall_start"] >= report["wall"]  # from process start: imports included
