"""status, status --check, metrics and the audit log; and no secret anywhere after a full run."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crmsync.app import App
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.model import utcnow
from crmsync.store import CrmConnection, CrmOutbox, CrmSyncLog, CrmWebhookEvent
from crmsync.sync.status import check, gather
from tests.e2e import cli_env, hubspot_app, run_cli
from tests.test_hubspot_e2e import outcome_lines


def prepared_store(app: App) -> None:
    """A store in a known state: one connection, records, runs, outbox rows, events."""
    from crmsync.store import Canonical

    FIXED_NOW = utcnow().replace(microsecond=0)

    app.store.connections.save(
        CrmConnection(
            name="prod",
            provider="hubspot",
            account_id="42",
            base_url="http://x",
            scopes=["crm.objects.contacts.read"],
            settings={},
            last_ok_at=FIXED_NOW,
        )
    )
    app.store.mirror.apply_page(
        "prod",
        "contacts",
        [
            Canonical(
                remote_id=str(i), properties={"email": f"{i}@x.io"}, raw={}, remote_updated_at=None, archived=i == 0
            )
            for i in range(3)
        ],
        cursor={"mode": "search", "ts": 1764000000000},
    )
    with app.store.session() as s:
        s.add(
            CrmSyncLog(
                connection="prod",
                command="pull",
                started_at=FIXED_NOW - timedelta(minutes=3),
                finished_at=FIXED_NOW - timedelta(minutes=2),
                status="ok",
                counts={"contacts": {"read": 3, "created": 3}},
                requests=7,
                retries=1,
                rate_limited=1,
            )
        )
        for i, state in enumerate(["done", "done", "failed", "pending"]):
            s.add(
                CrmOutbox(
                    connection="prod",
                    outcome_id=f"o{i}",
                    content_hash="h",
                    payload={},
                    state=state,
                    last_error="contacts: Property values were not valid" if state == "failed" else None,
                    delivered_at=FIXED_NOW if state == "done" else None,
                )
            )
        s.add(
            CrmWebhookEvent(
                connection="prod",
                provider="hubspot",
                dedupe_key="k1",
                object="contacts",
                remote_id="1",
                event_type="update",
                received_at=FIXED_NOW - timedelta(minutes=30),
            )
        )


def test_status_json_snapshot() -> None:
    app = App()
    prepared_store(app)
    doc = gather(app)
    c = doc["connections"][0]
    c["auth"]["last_ok_at"] = c["auth"]["last_checked_at"] = "<time>"
    for o in c["objects"].values():
        o["last_pull_at"], o["last_pull_age_seconds"] = "<time>", "<age>"
    c["outbox"]["oldest_failed_at"] = "<time>"
    c["webhook"]["oldest_pending_age_seconds"] = round(c["webhook"]["oldest_pending_age_seconds"] / 60)
    c["last_run"]["started_at"] = c["last_run"]["finished_at"] = c["rate_limit"]["finished_at"] = "<time>"
    assert c == {
        "name": "prod",
        "provider": "hubspot",
        "account": "42",
        "base_url": "http://x",
        "auth": {
            "state": "ok",
            "token_expires_at": None,
            "secret": {"storage": "none", "where": None},
            "last_ok_at": "<time>",
            "last_checked_at": "<time>",
        },
        "objects": {
            "contacts": {
                "stored": 3,
                "archived": 1,
                "last_pull_at": "<time>",
                "last_pull_age_seconds": "<age>",
                "cursor": {"mode": "search", "ts": 1764000000000},
                "last_reconcile_at": None,
                "last_reconcile_age_seconds": None,
            }
        },
        "outbox": {
            "pending": 1,
            "failed": 1,
            "done": 2,
            "conflict": 0,
            "delivered_today": 2,
            "top_error": "Property values were not valid",
            "oldest_failed_at": "<time>",
        },
        "webhook": {"pending": 1, "oldest_pending_age_seconds": 30},
        "conflicts_open": 0,
        "last_run": {"command": "pull", "status": "ok", "started_at": "<time>", "finished_at": "<time>", "error": None},
        "rate_limit": {"command": "pull", "requests": 7, "retries": 1, "rate_limited": 1, "finished_at": "<time>"},
        "api_usage": None,
    }


def test_status_plain_snapshot(home: Path) -> None:
    app = App()
    prepared_store(app)
    result = run_cli(["status"], cli_env(home))
    assert result.code == 0, result.stderr
    lines = [line.rstrip() for line in result.stdout.splitlines()]
    assert lines[0] == "prod  hubspot  account 42  auth ok"
    assert lines[1].split() == ["object", "stored", "archived", "last", "pull", "cursor"]
    assert lines[2].split()[:4] == ["contacts", "3", "1", "2m"]
    assert "ts=2025-11-24 16:00:00" in lines[2]
    assert lines[3] == "outbox: 1 pending, 1 failed, 2 delivered today"
    assert lines[4] == "  most common error: Property values were not valid"
    assert lines[5] == "webhook events pending: 1 (oldest 30m)   conflicts open: 0"
    assert lines[6] == "last pull: 7 requests, 1 retries, 1 rate-limited"
    assert lines[7] == "reconciled by ids: never (crmsync pull --reconcile)"
    assert lines[8] == "secret: none"
    # The store's path is the one line that may be longer: it stays whole, to be pasted.
    assert lines[-1] == f"store: {home / 'crmsync.db'}"
    assert all(len(line) <= 80 for line in lines[:-1])


def _check(app: App, **kw: object) -> list[str]:
    return [p.kind for p in check(app, gather(app), max_age=kw.pop("max_age", timedelta(minutes=15)), **kw)]  # type: ignore[arg-type]


def test_check_stale_pull() -> None:
    app = App()
    prepared_store(app)
    assert "stale" not in _check(app)
    assert "stale" in _check(app, max_age=timedelta(seconds=30))


def test_check_failed_outbox() -> None:
    app = App()
    prepared_store(app)
    assert "failed_outbox" in _check(app)


def test_check_webhook_backlog() -> None:
    app = App()
    prepared_store(app)
    assert "webhook_backlog" in _check(app)  # 30 minutes old, the limit is 15


def test_check_invalid_credentials_exit_3(home: Path) -> None:
    app = App()
    prepared_store(app)
    app.store.connections.touch("prod", ok=False, auth_state="invalid")
    assert "auth" in _check(app)
    result = run_cli(["status", "--check"], cli_env(home))
    assert result.code == 3 and "credentials invalid" in result.stdout


@pytest.mark.slow
def test_check_healthy_exits_0_and_live_calls_the_provider(home: Path) -> None:
    emulator = HubSpotEmulator(seed=2, contacts=5)
    server = emulator.serve()
    try:
        app = hubspot_app(server.url, emulator.private_app_token)
        from crmsync.sync.pull import pull

        pull(app)
        env = cli_env(home, "hs", emulator.private_app_token)
        ok = run_cli(["status", "--check", "--max-age", "15m", "--live"], env)
        assert ok.code == 0, ok.stdout + ok.stderr
        bad = cli_env(home, "hs", "pat-na1-00000000-dead-4000-8000-000000000000")
        broken = run_cli(["status", "--check", "--live"], bad)
        assert broken.code == 3 and "hs:" in broken.stdout
    finally:
        server.stop()


def test_check_unreachable_exits_1(home: Path) -> None:
    app = App()
    prepared_store(app)
    with app.store.session() as s:
        for row in s.exec(__import__("sqlmodel").select(CrmOutbox)):
            s.delete(row)
    result = run_cli(["status", "--check", "--max-age", "1h"], cli_env(home))
    assert result.code == 1 and "webhook event(s) pending" in result.stdout


TOKEN = "pat-na1-7a7a7a7a-1b1b-4c2c-8d3d-9e9e9e9e9e9e"


@pytest.mark.slow
def test_metrics_file_after_pull_and_push_and_no_secret_anywhere(home: Path, tmp_path: Path) -> None:
    emulator = HubSpotEmulator(seed=4, contacts=40, companies=10, deals=5, private_app_token=TOKEN)
    server = emulator.serve()
    try:
        app = hubspot_app(server.url, TOKEN)
        app.close()
        env = cli_env(home, "hs", TOKEN)
        metrics = tmp_path / "crmsync.prom"
        src = tmp_path / "o.jsonl"
        src.write_text(outcome_lines(20))
        outputs = []
        for args in (
            ["pull", "--metrics-file", str(metrics)],
            ["--json", "pull"],
            ["-v", "push", str(src), "-c", "hs", "--metrics-file", str(metrics)],
            ["--json", "status"],
            ["status"],
            ["--json", "log"],
            ["metrics"],
            ["--log-format", "json", "-v", "status", "--check", "--live"],
        ):
            r = run_cli(args, env)
            assert r.code in (0, 1), (args, r.stderr)
            outputs.append(r.stdout + r.stderr)
        families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
        for name in (
            "crm_requests",
            "crm_errors",
            "crm_sync_duration_seconds",
            "crm_records",
            "crm_outbox_items",
            "crm_last_success_timestamp_seconds",
        ):
            assert name in families, name
        outbox = {s.labels["state"]: s.value for s in families["crm_outbox_items"].samples}
        assert outbox["done"] == 20.0
        calls = [
            s
            for s in families["crm_records"].samples
            if s.labels["object"] == "calls" and s.labels["action"] == "created"
        ]
        assert calls and calls[0].value == 20.0
        reqs = [s for s in families["crm_requests"].samples if s.name == "crm_requests_total"]
        assert sum(s.value for s in reqs) > 0
        # The push run's file also carries the pull's last success (from the store), so a textfile that
        # pull and push both write never loses one of them.
        assert {s.labels["command"] for s in families["crm_last_success_timestamp_seconds"].samples} == {
            "pull",
            "push",
        }
        store_families = {f.name: f for f in text_string_to_metric_families(run_cli(["metrics"], env).stdout)}
        assert set(store_families) == set(families)
        assert "crm_requests" in store_families and "crm_records_stored" in families
        store_outbox = {s.labels["state"]: s.value for s in store_families["crm_outbox_items"].samples}
        assert store_outbox == outbox

        # The scan: the token appears in no output, log, metrics file or database row.
        haystack = "\n".join(outputs) + metrics.read_text()
        db = home / "crmsync.db"
        con = sqlite3.connect(db)
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            for row in con.execute(f"SELECT * FROM {table}"):
                haystack += json.dumps(row, default=str)
        for path in home.rglob("*"):
            if path.is_file() and path.suffix not in (".db",):
                haystack += path.read_text(errors="replace")
        haystack += db.read_bytes().decode("latin-1")
        assert TOKEN not in haystack
        assert TOKEN[10:30] not in haystack
    finally:
        server.stop()


@pytest.mark.slow
def test_log_lists_runs_and_record_changes(home: Path) -> None:
    emulator = HubSpotEmulator(seed=6, contacts=5)
    server = emulator.serve()
    try:
        app = hubspot_app(server.url, emulator.private_app_token)
        from crmsync.sync.pull import pull

        pull(app, objects=["contacts"])
        rid = emulator.records("contacts")[0]["id"]
        emulator.edit("contacts", rid, {"firstname": "Renamed"})
        pull(app, objects=["contacts"])
        env = cli_env(home, "hs", emulator.private_app_token)
        runs = run_cli(["--json", "log", "-c", "hs"], env).json()["runs"]
        assert [r["command"] for r in runs][:2] == ["pull", "pull"] and runs[0]["mapping"]
        changes = run_cli(["--json", "log", "--object", "contact", "--record", rid], env).json()["changes"]
        assert changes[0]["action"] == "updated" and changes[0]["changes"]["first_name"][1] == "Renamed"
        assert changes[0]["command"] == "pull"
    finally:
        server.stop()


@pytest.mark.parametrize("days", [1])
def test_retention_prunes_old_audit_rows(days: int) -> None:
    app = App()
    prepared_store(app)
    from crmsync.store import CrmRecordChange

    with app.store.session() as s:
        s.add(
            CrmRecordChange(
                connection="prod",
                object="contacts",
                remote_id="1",
                action="updated",
                at=utcnow() - timedelta(days=days + 1),
            )
        )
    before = len(app.store.mirror.changes(connection="prod"))
    app.store.prune(older_than_days=days)
    assert len(app.store.mirror.changes(connection="prod")) == before - 1
