"""What an operator sees of a Pipedrive connection through the CLI: the token budget spent (status
text and JSON, metrics), when the last reconcile by ids ran, and that a reconcile marks deletions
that no delta shows."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from crmsync.emulators.pipedrive import PipedriveEmulator
from crmsync.metrics import Metrics
from crmsync.providers.usage import ApiUsage, describe, latest, recorded
from tests.e2e import cli_env, run_cli, write_config
from tests.test_pipedrive import _outcomes


def _gauge(text: str, name: str, connection: str) -> float:
    m = re.search(rf'^{name}\{{connection="{connection}"[^}}]*\}} (\S+)$', text, re.M)
    assert m, f"{name} missing from:\n{text}"
    return float(m.group(1))


@pytest.mark.slow
def test_status_and_metrics_show_the_budget_spent_and_the_last_reconcile(home: Path, tmp_path: Path) -> None:
    write_config(home, "pd", lookback_seconds=0, rate_limit=40, plan="growth", seats=3)
    emulator = PipedriveEmulator(plan="growth", seats=3)
    emulator.clock_offset = -600  # written ten minutes ago: past the pull's settling minute
    people = [emulator.create("persons", {"name": f"P{i}", "emails": [{"value": f"p{i}@x.org"}]}) for i in range(5)]
    emulator.clock_offset = 0
    server = emulator.serve()
    try:
        env = cli_env(home)
        base = ["--base-url", server.url, "--token-stdin", "--insecure-storage"]
        made = run_cli(["connect", "pipedrive", "-n", "pd", *base], env, stdin=emulator.api_token + "\n", timeout=60)
        assert made.code == 0, made.stderr
        before = emulator.tokens_used
        pushed = run_cli(["push", str(_outcomes(tmp_path / "o.jsonl", 8)), "-c", "pd"], env, timeout=120)
        assert pushed.code == 0, pushed.stderr
        spent_by_push = emulator.tokens_used - before

        pulled = run_cli(["pull", "-c", "pd", "--object", "contacts"], env, timeout=60)
        assert pulled.code == 0, pulled.stderr
        doc = run_cli(["--json", "status", "-c", "pd"], env, timeout=60).json()["connections"][0]
        assert doc["objects"]["contacts"]["last_reconcile_at"] is None
        usage = doc["api_usage"]
        assert usage["unit"] == "tokens" and usage["window"] == "day" and usage["scope"] == "run"
        assert usage["limit"] == 30_000 * 2 * 3 == emulator.daily_budget
        # crmsync's own count of today's spending: every token the emulator charged since connect.
        assert usage["used_today"] == emulator.tokens_used - before > spent_by_push
        assert usage["remaining_today"] == usage["limit"] - usage["used_today"]
        assert usage["command"] == "pull" and usage["detail"]["burst_limit"] == 40

        emulator.delete("persons", people[2]["id"])  # Pipedrive's lists leave it out: no delta shows it
        plain = run_cli(["--json", "pull", "-c", "pd", "--object", "contacts"], env, timeout=60)
        assert plain.code == 0 and plain.json()["results"][0]["objects"]["contacts"]["archived"] == 0
        reconciled = run_cli(["--json", "pull", "-c", "pd", "--object", "contacts", "--reconcile"], env, timeout=60)
        assert reconciled.code == 0, reconciled.stderr
        assert reconciled.json()["results"][0]["reconciled"] == 1
        doc = run_cli(["--json", "status", "-c", "pd"], env, timeout=60).json()["connections"][0]
        when = doc["objects"]["contacts"]["last_reconcile_at"]
        assert when and abs((datetime.now(UTC) - datetime.fromisoformat(when)).total_seconds()) < 60
        assert doc["objects"]["contacts"]["archived"] == 1

        text = run_cli(["status", "-c", "pd"], env, timeout=60).stdout
        assert (
            re.search(r"^reconciled by ids: contacts \d+s$", text, re.M) and "spent today (counted by crmsync)" in text
        ), text
        assert f"of {emulator.daily_budget:,} tokens/day" in text
        assert all(len(line) <= 80 for line in text.splitlines()[:-1])

        prom = run_cli(["metrics"], env, timeout=60).stdout
        assert _gauge(prom, "crm_api_usage_limit", "pd") == emulator.daily_budget
        assert _gauge(prom, "crm_api_usage_used", "pd") == emulator.tokens_used - before
    finally:
        server.stop()


def _run(command: str, finished: datetime, usage: dict[str, object] | None) -> SimpleNamespace:
    return SimpleNamespace(command=command, finished_at=finished, counts={"_api_usage": usage} if usage else {})


def test_latest_adds_up_todays_run_counts_and_keeps_a_stated_figure_as_it_is() -> None:
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    day = ApiUsage(unit="tokens", window="day", used=100, limit=1000, scope="run").as_dict()
    runs = [
        _run("push", datetime(2026, 12, 7, 11, tzinfo=UTC), day),
        _run("pull", datetime(2026, 12, 7, 10, tzinfo=UTC), None),
        _run("pull", datetime(2026, 12, 7, 1, tzinfo=UTC), {**day, "used": 50}),
        _run("pull", datetime(2026, 12, 6, 23, tzinfo=UTC), {**day, "used": 999}),  # yesterday
    ]
    doc = latest(runs, now)
    assert doc is not None and doc["used_today"] == 150 and doc["remaining_today"] == 850 and doc["command"] == "push"
    assert describe(doc) == "api usage: 150 of 1,000 tokens/day spent today (counted by crmsync)"
    stated = ApiUsage(unit="requests", window="24h", used=18, limit=5000, source="Sforce-Limit-Info").as_dict()
    doc = latest([_run("pull", now, stated)], now)
    assert doc is not None and "used_today" not in doc and doc["remaining"] == 4982
    assert describe(doc).startswith("api usage: 18 of 5,000 requests/24h")
    only_left = ApiUsage(unit="requests", window="5m", remaining=5990).as_dict()
    assert "5,990 requests left this 5m" in describe(only_left)
    assert latest([_run("pull", now, None)], now) is None


def test_a_provider_whose_usage_fails_still_records_its_run_and_metrics_skip_unknown_figures() -> None:
    class Broken:
        def api_usage(self) -> ApiUsage | None:
            raise KeyError("x-ratelimit")

    assert recorded(Broken()) == {} and recorded(None) == {}
    metrics = Metrics()
    usage = ApiUsage(unit="requests", window="5m", remaining=7).as_dict()
    metrics.set_store_state({"connections": [_conn("dyn", usage)]}, {})
    text = metrics.text()
    assert _gauge(text, "crm_api_usage_remaining", "dyn") == 7
    assert 'crm_api_usage_used{connection="dyn"' not in text and 'crm_api_usage_limit{connection="dyn"' not in text


def _conn(name: str, usage: dict[str, object]) -> dict[str, object]:
    return {
        "name": name,
        "outbox": {"pending": 0, "done": 0, "failed": 0, "conflict": 0},
        "objects": {},
        "webhook": {"pending": 0},
        "conflicts_open": 0,
        "api_usage": usage,
    }
