"""What a run says, as the user meets it: why records were rejected or failed, what an earlier run
left queued, what Ctrl-C left behind, busy connections in a cron pull, and the health check."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import crmsync
from crmsync.app import App
from crmsync.cli.exits import for_push
from crmsync.emulators.base import Faults
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.sync.pull import pull
from crmsync.sync.push import push
from tests.e2e import cli_env, hubspot_app, run_cli, write_config
from tests.test_hubspot_e2e import outcome_lines

CSV_HEADER = "id,occurred_at,contact.email,contact.first_name,disposition,duration_seconds\n"


def csv_row(i: int, *, email: str | None = None, disposition: str = "connected", duration: str = "60") -> str:
    return f"c{i},2026-11-20T10:00:00+01:00,{email or f'p{i}@example.org'},P{i},{disposition},{duration}\n"


@pytest.fixture
def hubspot(home: Path) -> Iterator[tuple[HubSpotEmulator, dict[str, str]]]:
    """A HubSpot emulator on loopback, connected as "hs"; the CLI's environment."""
    emulator = HubSpotEmulator(seed=5)
    server = emulator.serve()
    try:
        hubspot_app(server.url, emulator.private_app_token).close()
        yield emulator, user_env(home, "hs", emulator.private_app_token)
    finally:
        server.stop()


def user_env(home: Path, connection: str, secret: str) -> dict[str, str]:
    """The CLI's environment as a cron job has it: an empty HOME, no keyring, the secret in the environment."""
    empty = home.parent / "empty-home"
    empty.mkdir(exist_ok=True)
    return {**cli_env(home, connection, secret), "HOME": str(empty)}


def _down(emulator: HubSpotEmulator, home: Path) -> None:
    """The CRM answers every request with a 5xx; crmsync gives up on each after a second, not its
    default five minutes of retries (these tests are about what it says, not how long it tries)."""
    write_config(home, "hs", deadline_seconds=1)
    emulator.faults.error_rate = 1.0


def _runs(home: Path) -> list[tuple[str, str, str | None]]:
    """(command, status, error) of every run in the store, oldest first, read as another process would."""
    with contextlib.closing(sqlite3.connect(home / "crmsync.db")) as db:
        return list(db.execute("select command, status, error from crm_sync_log order by id"))


# -- say why ------------------------------------------------------------------------------------
def test_a_push_with_three_bad_csv_rows_says_why_on_stderr(hubspot: Any, tmp_path: Path) -> None:
    emulator, env = hubspot
    src = tmp_path / "calls.csv"
    src.write_text(
        CSV_HEADER
        + csv_row(1)
        + csv_row(2, email="not-an-email")
        + csv_row(3)
        + csv_row(4, disposition="maybe")
        + csv_row(5, duration="long")
    )
    result = run_cli(["push", str(src), "-c", "hs"], env)
    assert result.code == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("crmsync: ")]
    assert len(errors) == 3, result.stderr
    assert errors[0] == f"crmsync: {src}:3: contact.email: not an email address"
    assert errors[1].startswith(f"crmsync: {src}:5: disposition: unknown value 'maybe'; expected one of")
    assert errors[2].startswith(f"crmsync: {src}:6: duration_seconds: ") and "integer" in errors[2]
    assert "rejected 3" in result.stdout and "created 2" in result.stdout
    assert len(emulator.records("calls")) == 2


@pytest.mark.slow
def test_past_the_first_five_rejects_the_rest_are_counted_and_rejects_file_named(hubspot: Any, tmp_path: Path) -> None:
    _, env = hubspot
    src = tmp_path / "calls.csv"
    src.write_text(CSV_HEADER + "".join(csv_row(i, email=f"bad{i}") for i in range(8)) + csv_row(9))
    result = run_cli(["--quiet", "push", str(src), "-c", "hs"], env)
    lines = result.stderr.splitlines()
    assert result.code == 1 and len([x for x in lines if "not an email address" in x]) == 5
    assert "crmsync: 3 more invalid; `--rejects FILE` keeps them all" in lines
    kept = tmp_path / "rejects.jsonl"
    again = run_cli(["--quiet", "push", str(src), "-c", "hs", "--rejects", str(kept)], env)
    assert f"crmsync: 3 more invalid; all of them are in {kept}" in again.stderr.splitlines()
    assert len(kept.read_text().splitlines()) == 8


@pytest.mark.slow
def test_failed_deliveries_print_the_crms_reason_and_conflicts_point_at_update(
    hubspot: Any, home: Path, tmp_path: Path
) -> None:
    emulator, env = hubspot
    app = App()
    mapping = app.mapping_path(app.connection("hs"))
    app.close()
    mapping.parent.mkdir(parents=True, exist_ok=True)
    default = (Path(crmsync.__file__).parent / "mappings" / "hubspot.yaml").read_text()
    mapping.write_text(default.replace("first_name: firstname", "first_name: first_nme"))
    src = tmp_path / "calls.csv"
    src.write_text(CSV_HEADER + "".join(csv_row(i) for i in range(7)))
    failed = run_cli(["push", str(src), "-c", "hs"], env)
    assert failed.code == 1
    assert 'crmsync: failed (7): contacts: Property "first_nme" does not exist' in failed.stderr.splitlines()
    assert "crmsync: after fixing the cause: crmsync push --retry-failed" in failed.stderr.splitlines()
    assert emulator.records("calls") == []

    mapping.write_text(default)
    fixed = run_cli(["push", str(src), "-c", "hs", "--retry-failed"], env)
    assert fixed.code == 0, fixed.stderr
    assert len(emulator.records("calls")) == 7
    src.write_text(CSV_HEADER + csv_row(0, duration="61") + csv_row(1, duration="62"))
    changed = run_cli(["push", str(src), "-c", "hs"], env)
    assert changed.code == 1
    assert (
        "crmsync: 2 outcome id(s) were queued before with other content (c0, c1); --update sends it"
        in changed.stderr.splitlines()
    )


@pytest.mark.slow
def test_a_backlog_from_an_earlier_run_is_reported_apart_from_this_inputs_counts(
    hubspot: Any, home: Path, tmp_path: Path
) -> None:
    emulator, env = hubspot
    first = tmp_path / "monday.jsonl"
    first.write_text(outcome_lines(4, prefix="mon"))
    # Queued but not delivered: the CRM is down for the whole of Monday's run.
    _down(emulator, home)
    down = run_cli(["--json", "push", str(first), "-c", "hs"], env)
    assert down.code != 0 and run_cli(["push", "--status", "mon-0", "-c", "hs"], env).stdout.startswith("mon-0: queued")
    emulator.faults.error_rate = 0.0
    second = tmp_path / "tuesday.jsonl"
    second.write_text(outcome_lines(3, prefix="tue"))
    result = run_cli(["--json", "push", str(second), "-c", "hs"], env)
    assert result.code == 0, result.stderr
    summary = result.json_lines()[-1]["summary"]
    assert (summary["read"], summary["queued"], summary["created"]) == (3, 3, 3)
    assert summary["backlog"] == {"created": 4}
    text = run_cli(["push", str(second), "-c", "hs"], env)
    assert "hs: read 3, queued 0, created 0, updated 0, failed 0, rejected 0, conflicts 0, seen before 3" in text.stdout
    assert "earlier run" not in text.stdout
    assert len(emulator.records("calls")) == 7


@pytest.mark.slow
def test_the_backlog_line_in_the_default_output(hubspot: Any, home: Path, tmp_path: Path) -> None:
    emulator, env = hubspot
    first = tmp_path / "a.jsonl"
    first.write_text(outcome_lines(2, prefix="a"))
    _down(emulator, home)
    assert run_cli(["--quiet", "push", str(first), "-c", "hs"], env).code != 0
    emulator.faults.error_rate = 0.0
    second = tmp_path / "b.jsonl"
    second.write_text(outcome_lines(1, prefix="b"))
    result = run_cli(["push", str(second), "-c", "hs"], env)
    assert result.code == 0, result.stderr
    assert "hs: read 1, queued 1, created 1," in result.stdout
    assert "hs: queued by an earlier run: created 2\n" in result.stdout


# -- dry run --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_shows_a_conflict_where_the_push_reports_one(hubspot: Any, tmp_path: Path) -> None:
    emulator, env = hubspot
    emulator.bulk_create("contacts", 1, properties_fn=lambda i: {"email": "ada@example.org", "firstname": "Augusta"})
    assert run_cli(["--quiet", "pull", "-c", "hs", "--object", "contacts"], env).code == 0
    outcome = {
        "id": "d1",
        "occurred_at": "2026-11-20T10:00:00+01:00",
        "contact": {"email": "ada@example.org", "first_name": "Ada"},
        "disposition": "connected",
    }
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(outcome) + "\n")
    plan = run_cli(["--json", "push", str(src), "-c", "hs", "--dry-run"], env)
    receipt, summary = plan.json_lines()[0], plan.json_lines()[-1]["summary"]
    assert receipt["plan"] == {"contacts": "conflict", "calls": "create"}
    assert "contacts.first_name: the CRM has 'Augusta', the outcome 'Ada'" in receipt["error"]
    real = run_cli(["--json", "push", str(src), "-c", "hs"], env)
    assert real.code == 0, real.stderr
    assert summary["field_conflicts"] == real.json_lines()[-1]["summary"]["field_conflicts"] == 1

    # The same id with other content: the push reports a conflict, and so does the plan.
    src.write_text(json.dumps({**outcome, "notes": "changed"}) + "\n")
    plan = run_cli(["--json", "push", str(src), "-c", "hs", "--dry-run"], env)
    assert plan.json_lines()[0]["status"] == "conflict"
    assert plan.json_lines()[0]["plan"] == {"contacts": "conflict", "calls": "conflict"}
    assert plan.json_lines()[-1]["summary"]["conflicts"] == 1
    text = run_cli(["push", str(src), "-c", "hs", "--dry-run"], env)
    assert "--update sends it" in text.stderr
    updating = run_cli(["--json", "push", str(src), "-c", "hs", "--dry-run", "--update"], env)
    assert updating.json_lines()[0]["plan"]["calls"] == "update"
    real = run_cli(["--json", "push", str(src), "-c", "hs"], env)
    assert real.json_lines()[0]["status"] == "conflict"


# -- Ctrl-C -----------------------------------------------------------------------------------------
def _calls_in_the_crm(base_url: str, token: str) -> list[str]:
    """The idempotency markers of every call in the CRM, read page by page through its API."""
    markers: list[str] = []
    params = {"limit": "100", "properties": "crmsync_outcome_id"}
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}) as client:
        while True:
            body = client.get("/crm/v3/objects/calls", params=params).raise_for_status().json()
            markers += [r["properties"]["crmsync_outcome_id"] for r in body["results"]]
            after = body.get("paging", {}).get("next", {}).get("after")
            if not after:
                return markers
            params["after"] = after


def _delivered(db: Path) -> int:
    """Outcomes done in the outbox, read as another process would."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return int(conn.execute("select count(*) from crm_outbox where state = 'done'").fetchone()[0])
    except sqlite3.OperationalError:  # busy for a moment
        return 0


@pytest.mark.slow
def test_ctrl_c_mid_push_says_what_is_left_logs_interrupted_and_a_rerun_ends_exactly_once(
    home: Path, tmp_path: Path
) -> None:
    n = 5000
    emulator = HubSpotEmulator(seed=17, faults=Faults(latency_ms=100, seed=17))
    server = emulator.serve()
    proc: subprocess.Popen[str] | None = None
    try:
        write_config(home, "hs", rate_limit=100_000, search_rate_limit=1000)
        hubspot_app(server.url, emulator.private_app_token).close()
        env = user_env(home, "hs", emulator.private_app_token)
        src = tmp_path / "outcomes.jsonl"
        src.write_text(outcome_lines(n, company_every=3, deal_every=4))
        proc = subprocess.Popen(
            [sys.executable, "-m", "crmsync", "push", str(src), "-c", "hs"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        done = 0
        while proc.poll() is None and time.monotonic() < deadline:
            done = _delivered(home / "crmsync.db")
            if done:
                break  # the first lane has closed its outcomes; the others are still at work
            time.sleep(0.02)
        assert done < n, "the push ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("crmsync: interrupted: ") and last.endswith(" still queued; re-run to resume"), stderr
        delivered, queued = (int(x) for x in re.findall(r"\d+", last.split(": ", 2)[2])[:2])
        assert 0 < delivered < n and delivered + queued == n
        assert f"hs: {queued} still queued" in stdout
        assert "Traceback" not in stderr
        assert _runs(home)[-1][:2] == ("push", "interrupted")
        # Some still queued may have their call logged already (the lane stopped before closing them):
        # the re-run closes those without sending them again.
        assert delivered <= len(_calls_in_the_crm(server.url, emulator.private_app_token))

        again = run_cli(["push", str(src), "-c", "hs"], env)
        assert again.code == 0, again.stderr
        # The re-run's outcomes are this input's (queued by the interrupted run of the same file):
        # they are its counts, not a backlog from an earlier run.
        assert f"hs: read {n}, queued 0, " in again.stdout and "earlier run" not in again.stdout
        assert _runs(home)[-1][:2] == ("push", "ok")
        markers = _calls_in_the_crm(server.url, emulator.private_app_token)
        assert len(markers) == len(set(markers)) == n
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        server.stop()


# -- cron: busy connections, failed runs ----------------------------------------------------------
HOLD_LOCK = """
import sys, time
from crmsync.app import App
with App().run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def two_portals(home: Path) -> Iterator[tuple[HubSpotEmulator, HubSpotEmulator, dict[str, str]]]:
    """Connections "a" and "b", each to a HubSpot emulator of its own with a few contacts."""
    portals = [HubSpotEmulator(seed=21), HubSpotEmulator(seed=22)]
    servers = [p.serve() for p in portals]
    try:
        env: dict[str, str] = {}
        for name, portal, server in zip("ab", portals, servers, strict=True):
            portal.seed(contacts=3)
            hubspot_app(server.url, portal.private_app_token, name=name).close()
            env.update(user_env(home, name, portal.private_app_token))
        yield portals[0], portals[1], env
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def _locked_by_another_process(connection: str, env: dict[str, str]) -> Iterator[None]:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, connection], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_pull_pulls_every_free_connection_and_reports_the_busy_one(two_portals: Any, home: Path) -> None:
    _, _, env = two_portals
    with _locked_by_another_process("b", env):
        result = run_cli(["--json", "pull", "--object", "contacts"], env)
        text = run_cli(["pull", "--object", "contacts"], env)
        only_b = run_cli(["pull", "-c", "b", "--object", "contacts"], env)
    assert result.code == 75, result.stderr
    by_name = {r["connection"]: r for r in result.json()["results"]}
    assert by_name["a"]["objects"]["contacts"]["read"] == 3 and not by_name["a"]["busy"]
    assert by_name["b"]["busy"] and by_name["b"]["objects"] == {}
    assert (by_name["a"]["exit_code"], by_name["b"]["exit_code"]) == (0, 75)  # --json keeps each one's exit code
    assert list(by_name["b"])[list(by_name["b"]).index("error") + 1] == "exit_code"  # where it always was
    assert text.code == 75 and "crmsync: b: connection 'b' is busy" in text.stderr
    assert only_b.code == 75 and only_b.stderr.startswith("crmsync: error: connection 'b' is busy")
    assert [r[:2] for r in _runs(home)] == [("pull", "ok"), ("pull", "ok")]  # a, twice; b never started


@pytest.mark.slow
def test_a_real_failure_elsewhere_wins_over_the_busy_connections_75(two_portals: Any, home: Path) -> None:
    _, _, env = two_portals
    env = {**env, "CRMSYNC_SECRET_A": "pat-na1-00000000-0000-0000-0000-000000000000"}  # a token the CRM refuses
    with _locked_by_another_process("b", env):
        result = run_cli(["pull", "--object", "contacts"], env)
        both = run_cli(["pull", "--object", "contacts", "-c", "b", "-c", "b"], env)
    assert result.code == 3, result.stderr
    assert "crmsync: b: connection 'b' is busy" in result.stderr
    assert both.code == 75 and both.stderr.startswith("crmsync: error: every connection is busy")


@pytest.mark.slow
def test_status_check_is_unhealthy_after_a_failed_push(hubspot: Any, home: Path, tmp_path: Path) -> None:
    emulator, env = hubspot
    emulator.seed(contacts=2)
    assert run_cli(["--quiet", "pull"], env).code == 0
    healthy = run_cli(["status", "--check"], env)
    assert (healthy.code, healthy.stdout) == (0, "healthy\n")
    src = tmp_path / "o.jsonl"
    src.write_text(outcome_lines(2))
    _down(emulator, home)
    assert run_cli(["--quiet", "push", str(src), "-c", "hs"], env).code != 0
    emulator.faults.error_rate = 0.0
    assert _runs(home)[-1][:2] == ("push", "failed")
    check = run_cli(["status", "--check"], env)
    assert check.code == 1
    assert check.stdout.startswith("hs: the last push (") and "failed: " in check.stdout
    assert run_cli(["--quiet", "push", str(src), "-c", "hs"], env).code == 0
    assert run_cli(["status", "--check"], env).code == 0


@pytest.mark.slow
def test_status_check_is_unhealthy_after_a_failed_pull(hubspot: Any, home: Path) -> None:
    emulator, env = hubspot
    assert run_cli(["--quiet", "pull"], env).code == 0
    _down(emulator, home)
    assert run_cli(["--quiet", "pull"], env).code != 0
    check = run_cli(["--json", "status", "--check"], env)
    assert check.code == 1
    assert [p["kind"] for p in check.json()["problems"]] == ["failed_run"]
    assert "the last pull" in check.json()["problems"][0]["message"]


def test_a_dry_run_conflict_the_outcome_wins_is_an_update_with_the_disagreement_named(home: Path) -> None:
    (home / "config.yaml").write_text("conflicts:\n  contact.first_name: outcome-wins\n")
    emulator = HubSpotEmulator(seed=4)
    emulator.bulk_create("contacts", 1, properties_fn=lambda i: {"email": "ada@example.org", "firstname": "Augusta"})
    app = hubspot_app("http://hubspot.test", emulator.private_app_token, transport=lambda name: emulator.transport())
    try:
        pull(app, objects=["contacts"])
        src = home / "d.jsonl"
        src.write_text(
            json.dumps(
                {
                    "id": "w1",
                    "occurred_at": "2026-11-20T10:00:00+01:00",
                    "contact": {"email": "ada@example.org", "first_name": "Ada"},
                    "disposition": "connected",
                }
            )
            + "\n"
        )
        receipts: list[Any] = []
        summary = push(app, source=str(src), connection="hs", dry_run=True, sink=receipts.append)
        assert receipts[0].plan == {"contacts": "update", "calls": "create"}
        assert receipts[0].error.endswith("(outcome-wins: the outcome's is sent)")
        assert summary.field_conflicts == 1 and summary.disagreements == [f"w1: {receipts[0].error}"]
    finally:
        app.close()


def test_ctrl_c_while_the_input_is_read_queues_nothing_and_says_so(home: Path) -> None:
    emulator = HubSpotEmulator(seed=6)
    app = hubspot_app("http://hubspot.test", emulator.private_app_token, transport=lambda name: emulator.transport())
    try:
        src = home / "o.jsonl"
        src.write_text(outcome_lines(3) + "not json\n" + outcome_lines(3, prefix="late"))

        def ctrl_c_at_the_bad_line(receipt: Any) -> None:
            if receipt.status == "rejected":
                raise KeyboardInterrupt

        summary = push(app, source=str(src), connection="hs", sink=ctrl_c_at_the_bad_line)
        assert (for_push(summary), summary.interrupted, summary.queued) == (130, True, 0)
        assert summary.error == "interrupted while reading the input: nothing was queued or sent; run the push again"
        assert [(r.command, r.status) for r in app.store.runs.recent("hs")] == [("push", "interrupted")]
        assert emulator.records("calls") == [] and _runs(home) == [("push", "interrupted", "interrupted")]
        again = push(app, source=str(src), connection="hs")
        assert (again.created, again.rejected, again.backlog) == (6, 1, {})
    finally:
        app.close()
