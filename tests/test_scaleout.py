"""Scale-out (issue 12): PostgreSQL store, advisory locks, Redis-shared rate limits, Dramatiq workers.

These run against real servers: ``.ci/services.sh`` starts PostgreSQL and Redis on loopback, and
the tests find them at ``CRMSYNC_TEST_PG_URL`` / ``CRMSYNC_TEST_REDIS_URL`` (defaults below). When
they are unreachable the tests skip, saying so. Each test starts from an empty schema and Redis db.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlmodel import select

from crmsync.app import App
from crmsync.cli.worker import cron_expression
from crmsync.emulators.base import Faults
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.errors import LockHeldError, UsageError
from crmsync.store import SCHEMA_HEAD, Canonical, CrmOutbox, CrmSyncLog, Store
from tests.e2e import cli_env, hubspot_app, run_cli, write_config

PG_URL = os.environ.get("CRMSYNC_TEST_PG_URL", "postgresql+psycopg://crmsync:crmsync@127.0.0.1:5432/crmsync_test")
REDIS_URL = os.environ.get("CRMSYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ROOT = Path(__file__).resolve().parents[1]


def _pg_problem() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'crmsync[worker]')"
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL is not reachable at CRMSYNC_TEST_PG_URL ({type(exc).__name__}); run .ci/services.sh"
    return None


def _redis_problem() -> str | None:
    try:
        import redis
    except ImportError:
        return "redis is not installed (pip install 'crmsync[worker]')"
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        return f"Redis is not reachable at CRMSYNC_TEST_REDIS_URL ({type(exc).__name__}); run .ci/services.sh"
    return None


@pytest.fixture(scope="module")
def servers() -> None:
    problem = _pg_problem() or _redis_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture
def pg(servers: None, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty PostgreSQL schema, named by CRMSYNC_DB for this test and its subprocesses."""
    engine = create_engine(PG_URL)
    with engine.begin() as c:
        # Sessions a previous test leaked would block DROP SCHEMA: end them first.
        c.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        c.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    monkeypatch.setenv("CRMSYNC_DB", PG_URL)
    return PG_URL


@pytest.fixture
def redis_url(servers: None, monkeypatch: pytest.MonkeyPatch) -> str:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    monkeypatch.setenv("CRMSYNC_REDIS_URL", REDIS_URL)
    return REDIS_URL


@pytest.fixture
def server() -> Iterator[tuple[HubSpotEmulator, Any]]:
    emulator = HubSpotEmulator(seed=12, faults=Faults(rate_limits={"default": (100, 10.0)}))
    srv = emulator.serve()
    yield emulator, srv
    srv.stop()


def worker_env(home: Path, token: str) -> dict[str, str]:
    env = cli_env(home, "hs", token)
    env.update({"CRMSYNC_DB": PG_URL, "CRMSYNC_REDIS_URL": REDIS_URL, "PYTHONPATH": str(ROOT)})
    return env


def outcomes(n: int) -> str:
    """Outcomes with shared companies (seven, so concurrent workers race for them) and some deals."""
    lines = []
    for i in range(n):
        o: dict[str, Any] = {
            "id": f"so-{i}",
            "occurred_at": "2026-11-20T10:00:00+01:00",
            "contact": {"email": f"scale{i}@example.org", "first_name": "S", "last_name": f"N{i}"},
            "disposition": "connected",
            "duration_seconds": 30 + i % 50,
            "notes": f"scale-out call {i}",
        }
        if i % 2 == 0:
            o["company"] = {"name": f"Scale Co {i % 7}", "domain": f"scale{i % 7}.example"}
        if i % 4 == 0:
            o["deal"] = {"name": f"Deal {i}", "amount": 100 + i, "currency": "EUR", "stage": "appointmentscheduled"}
        lines.append(json.dumps(o))
    return "\n".join(lines) + "\n"


def runs(url: str, command: str) -> list[CrmSyncLog]:
    store = Store.open(url)
    try:
        return [r for r in reversed(store.runs.recent("hs", limit=100)) if r.command == command]
    finally:
        store.close()


# -- no servers needed ---------------------------------------------------------------------------
def test_schedule_is_a_crontab_line_not_a_daemon() -> None:
    assert cron_expression("5m") == "*/5 * * * *"
    assert cron_expression("1m") == "* * * * *"
    assert cron_expression("2h") == "0 */2 * * *"
    assert cron_expression("1d") == "0 0 * * *"
    for bad in ("7m", "30s", "5h", "soon"):
        with pytest.raises(UsageError):
            cron_expression(bad)


def test_schedule_cli_prints_cron_lines(home: Path) -> None:
    env = {k: v for k, v in cli_env(home).items() if k not in ("CRMSYNC_DB", "CRMSYNC_REDIS_URL")}
    result = run_cli(["--json", "schedule", "--every", "15m", "-c", "hs"], env)
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["schedule"] == "*/15 * * * *"
    assert [line.split(" enqueue ")[1] for line in doc["cron"]] == ["pull -c hs", "push -c hs"]
    assert set(doc["config_missing"]) == {"db", "redis_url"}
    assert run_cli(["schedule", "--every", "7m"], env).code == 2


def test_a_store_fault_fails_a_job_for_good_or_for_a_retry_by_its_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("dramatiq")
    from crmsync.worker import JobFailed, JobRejected, crm_push_outcomes_job

    garbage = tmp_path / "s.db"
    garbage.write_bytes(b"not a database " * 1000)
    monkeypatch.setenv("CRMSYNC_DB", str(garbage))
    with pytest.raises(JobRejected, match="corrupt"):  # a person must act: never retried
        crm_push_outcomes_job.fn("hs")
    monkeypatch.setenv("CRMSYNC_DB", "postgresql+psycopg://crmsync:x@127.0.0.1:1/crmsync")
    with pytest.raises(JobFailed, match="cannot reach the store"):  # may pass later: retried
        crm_push_outcomes_job.fn("hs")


# -- PostgreSQL ------------------------------------------------------------------------------------
@pytest.mark.scaleout
def test_store_migrates_on_postgres_once_even_when_workers_start_together(pg: str) -> None:
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            Store.open(pg).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = Store.open(pg)
    with store.engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_HEAD
    rec = Canonical(
        remote_id="1",
        properties={"email": "a@example.com", "tags": ["x", "ü"]},
        raw={"n": 1},
        remote_updated_at=None,
        match_key="email:a@example.com",
    )
    store.mirror.apply_page("hs", "contacts", [rec], cursor={"mode": "search", "ts": 5})
    assert store.mirror.cursor("hs", "contacts") == {"mode": "search", "ts": 5}
    assert store.mirror.record("hs", "contacts", "1").properties["tags"] == ["x", "ü"]  # type: ignore[union-attr]
    assert store.mirror.find_by_keys("hs", "contacts", ["email:a@example.com"])["email:a@example.com"].remote_id == "1"
    store.close()


@pytest.mark.scaleout
def test_a_pooled_connection_the_server_dropped_is_replaced_not_reported(pg: str) -> None:
    store = Store.open(pg)
    assert store.is_postgresql
    assert store.connections.all() == []
    admin = create_engine(PG_URL)
    with admin.begin() as c:  # a server restart, or an idle-session timeout
        c.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND usename = current_user"
            )
        )
    admin.dispose()
    assert store.connections.all() == []  # the pre-ping saw the dead session and opened another
    store.close()


@pytest.mark.scaleout
def test_advisory_lock_excludes_other_processes_and_dies_with_its_holder(pg: str, home: Path) -> None:
    from crmsync.app import App
    from crmsync.store.locks import advisory_lock

    store = Store.open(pg)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from crmsync.store.locks import advisory_lock
            from crmsync.store import Store
            with advisory_lock(Store.open({pg!r}), "hs", 0):
                print("held", flush=True)
                time.sleep(120)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeldError, match=rf"pid {holder.pid}"), advisory_lock(store, "hs", 0):
            pass
        with advisory_lock(store, "other", 0):  # per connection: another one is free
            pass
        app = App()  # CRMSYNC_DB names PostgreSQL, so the run lock is the advisory lock
        with pytest.raises(LockHeldError), app.run_lock("hs", timeout=0.3):
            pass
        holder.kill()  # no unlock: the server frees the lock when the session ends
        holder.wait()
        with advisory_lock(store, "hs", 10):
            pass
        app.close()
    finally:
        holder.kill()
        holder.wait()
        store.close()


@pytest.mark.scaleout
def test_oauth_refresh_is_serialised_across_workers(pg: str, isolated: Any) -> None:
    """Two workers whose token expired at once: one refreshes, the other uses its result."""
    from crmsync.credentials import OAuthSession
    from crmsync.scaleout import SharedSecretStore

    store = Store.open(pg)
    secrets = [SharedSecretStore(store.engine, lock_dir=None, env={}) for _ in range(2)]
    secrets[0].set("hs", {"access_token": "old", "refresh_token": "r1", "expires_at": 0})
    calls: list[str] = []
    started = threading.Event()

    def refresher(current: dict[str, Any]) -> dict[str, Any]:
        calls.append(current["refresh_token"])
        started.set()
        time.sleep(0.5)  # the other worker arrives while this refresh is in progress
        return {"access_token": f"new{len(calls)}", "expires_in": 3600}

    sessions = [
        OAuthSession(store=s, connection="hs", refresher=refresher, header=lambda t: {"Authorization": t})
        for s in secrets
    ]
    got: list[dict[str, str]] = []
    first = threading.Thread(target=lambda: got.append(sessions[0].headers()))
    first.start()
    started.wait(5)
    got.append(sessions[1].headers())
    first.join()
    assert calls == ["r1"]
    assert got == [{"Authorization": "new1"}, {"Authorization": "new1"}]
    store.close()


@pytest.mark.scaleout
def test_refreshed_token_goes_back_to_a_writable_secret_file_without_keyring(pg: str, tmp_path: Path) -> None:
    import keyring
    from keyring.backends import fail

    from crmsync.credentials import OAuthSession, env_name
    from crmsync.errors import ConfigError
    from crmsync.scaleout import SharedSecretStore

    keyring.set_keyring(fail.Keyring())  # a server: no keyring at all (conftest restores its own)
    path = tmp_path / "secret.json"
    path.write_text(json.dumps({"access_token": "old", "refresh_token": "r1", "expires_at": 0}))
    path.chmod(0o600)
    store = Store.open(pg)
    secrets = SharedSecretStore(store.engine, lock_dir=None, env={env_name("hs", file=True): str(path)})
    session = OAuthSession(
        store=secrets,
        connection="hs",
        refresher=lambda current: {"access_token": "fresh", "expires_in": 3600},
        header=lambda t: {"Authorization": t},
    )
    assert session.headers() == {"Authorization": "fresh"}
    saved = json.loads(path.read_text())
    assert saved["access_token"] == "fresh" and saved["refresh_token"] == "r1"
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="no usable OS keyring"):
        secrets.set("hs", {"token": "x"})  # outside a refresh (connect) a keyring is still required
    store.close()


@pytest.mark.scaleout
def test_two_writers_inserting_one_record_both_succeed(pg: str) -> None:
    """The loser of a unique-key race runs its transaction again and updates the winner's row."""
    store = Store.open(pg)
    release = threading.Event()

    def rec(name: str) -> Canonical:
        return Canonical(remote_id="7", properties={"first_name": name}, raw={}, remote_updated_at=None)

    def hold(s: Any) -> None:
        s.flush()  # the INSERT is sent; its commit waits until the other writer is blocked on it
        release.wait(10)

    errors: list[BaseException] = []

    def write(name: str, hook: Any = None) -> None:
        try:
            store.mirror.apply_page("hs", "contacts", [rec(name)], cursor=None, before_commit=hook)
        except BaseException as exc:  # reported below
            errors.append(exc)

    first = threading.Thread(target=write, args=("first", hold))
    first.start()
    second = threading.Thread(target=write, args=("second",))
    deadline = time.monotonic() + 10
    # Autocommit: within one transaction pg_stat_activity shows the same snapshot every time.
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        while (
            time.monotonic() < deadline
            and not c.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'")
            ).scalar()
        ):
            time.sleep(0.05)
        second.start()
        while (
            time.monotonic() < deadline
            and not c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")).scalar()
        ):
            time.sleep(0.05)
    release.set()
    first.join()
    second.join()
    assert errors == []
    assert [r.properties["first_name"] for r in store.mirror.records("hs", "contacts")] == ["second"]
    store.close()


# -- Redis -----------------------------------------------------------------------------------------
@pytest.mark.scaleout
def test_redis_bucket_is_one_bucket_for_every_process(redis_url: str) -> None:
    from crmsync.scaleout import RedisTokenBucket, redis_client

    client = redis_client(redis_url)
    a = RedisTokenBucket(client, "crmsync:ratelimit:test:1:default", rate=0.001, capacity=3)
    b = RedisTokenBucket(client, "crmsync:ratelimit:test:1:default", rate=0.001, capacity=3)
    other = RedisTokenBucket(client, "crmsync:ratelimit:test:2:default", rate=0.001, capacity=3)
    assert [a._call("take"), b._call("take"), a._call("take")] == [0, 0, 0]
    assert b._call("take") > 100  # the shared burst is spent: b must wait for a's refill
    assert other._call("take") == 0  # another CRM account has its own bucket
    fresh = RedisTokenBucket(client, "crmsync:ratelimit:test:3:default", rate=100, capacity=5)
    fresh.pause(30)  # a 429 seen by one worker holds every worker back
    assert 25 < RedisTokenBucket(client, fresh.key, rate=100, capacity=5)._call("take") <= 30


@pytest.mark.scaleout
@pytest.mark.slow
def test_three_processes_share_one_portal_limit(
    pg: str, redis_url: str, server: tuple[HubSpotEmulator, Any], home: Path, tmp_path: Path
) -> None:
    """Each process alone may send 100 requests / 10 s; together they still get 100, not 300."""
    emulator, srv = server
    hubspot_app(srv.url, emulator.private_app_token, db=pg).close()
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import pathlib, time
        from crmsync.app import App
        app = App()
        http = app.provider(app.connection("hs")).http
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.01)
        for _ in range(70):
            http.get("/crm/v3/objects/contacts", params={{"limit": 1}})
        print(http.stats.requests, http.stats.rate_limited)
    """)
    env = worker_env(home, emulator.private_app_token)
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    time.sleep(2)  # every process ready before the start line
    before = emulator.stats.requests
    go.touch()
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        assert out.split() == ["70", "0"]
    assert emulator.stats.requests - before == 210
    assert emulator.stats.rate_limited == 0


# -- workers end to end ----------------------------------------------------------------------------
@pytest.mark.scaleout
@pytest.mark.slow
def test_two_dramatiq_workers_push_2000_outcomes_exactly_once_within_the_rate_limit(
    pg: str, redis_url: str, server: tuple[HubSpotEmulator, Any], home: Path, tmp_path: Path
) -> None:
    pytest.importorskip("dramatiq")
    from crmsync.sync.inputs import read_outcomes
    from crmsync.sync.push import PushSummary, enqueue

    emulator, srv = server
    token = emulator.private_app_token
    app = hubspot_app(srv.url, token, db=pg)
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcomes(2000))
    queued = PushSummary(connection="hs", provider="hubspot")
    enqueue(app, "hs", read_outcomes(str(src), "auto"), queued, update=False, rejects=None, sink=None)
    assert queued.queued == 2000
    app.close()

    env = worker_env(home, token)
    env["dramatiq_queue_prefetch"] = "1"  # each process takes one job at a time
    log = (tmp_path / "worker.log").open("w")
    workers = subprocess.Popen(
        [sys.executable, "-m", "crmsync", "worker", "--processes", "2", "--threads", "1"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for _ in range(2):
            result = run_cli(["--json", "enqueue", "push", "-c", "hs"], env)
            assert result.code == 0, result.stderr
            assert result.json()["queued"][0]["job"] == "push"
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            done = [r for r in runs(pg, "push") if r.finished_at is not None]
            if len(done) >= 2 and sum(r.counts.get("created", 0) for r in done) >= 2000:
                break
            assert workers.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("the workers did not deliver in time:\n" + (tmp_path / "worker.log").read_text()[-3000:])
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        try:
            workers.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(workers.pid, signal.SIGKILL)
            workers.wait()
        log.close()

    pushes = [r for r in runs(pg, "push") if r.finished_at is not None]
    busy = {r.pid for r in pushes if r.counts.get("created")}
    assert len(busy) >= 2, [(r.pid, r.counts) for r in pushes]  # both processes delivered a share
    assert all(r.status == "ok" for r in pushes), [(r.status, r.error) for r in pushes]
    assert sum(r.counts["created"] for r in pushes) == 2000
    assert emulator.stats.rate_limited == 0  # together they kept the portal's 100 requests / 10 s
    calls = emulator.records("calls")
    markers = [c["properties"]["crmsync_outcome_id"] for c in calls]
    assert len(markers) == len(set(markers)) == 2000  # each outcome delivered exactly once
    assert len(emulator.records("contacts")) == 2000
    assert len(emulator.records("companies")) == 7
    store = Store.open(pg)
    with store.session() as s:
        rows = list(s.exec(select(CrmOutbox)))
    store.close()
    assert {r.state for r in rows} == {"done"} and len(rows) == 2000
    assert all(r.claimed_by is None for r in rows)

    plain = pg.replace("postgresql+psycopg://", "postgresql://")  # as an operator would type it
    status = run_cli(["--db", plain, "--json", "status"], env)
    assert status.code == 0, status.stderr
    conn = status.json()["connections"][0]
    assert conn["outbox"]["pending"] == 0 and conn["rate_limit"]["command"] == "push"
    logged = run_cli(["--db", plain, "--json", "log", "-c", "hs"], env)
    assert logged.code == 0, logged.stderr
    assert busy <= {r["pid"] for r in logged.json()["runs"] if r["command"] == "push"}
    human = run_cli(["--db", plain, "status"], env)
    assert human.code == 0 and "last push" in human.stdout


def _slow_push_queued(
    server: tuple[HubSpotEmulator, Any], pg: str, tmp_path: Path, n: int
) -> tuple[HubSpotEmulator, str, App]:
    """``n`` outcomes queued on a PostgreSQL store for a HubSpot emulator that answers in 30 ms (so a
    kill lands mid-delivery): the emulator, its token and the connected app."""
    from crmsync.sync.inputs import read_outcomes
    from crmsync.sync.push import PushSummary, enqueue

    emulator, srv = server
    emulator.faults.latency_ms = 30
    token = emulator.private_app_token
    app = hubspot_app(srv.url, token, db=pg)
    src = tmp_path / "outcomes.jsonl"
    src.write_text(outcomes(n))
    enqueue(
        app, "hs", read_outcomes(str(src), "auto"), PushSummary("hs", "hubspot"), update=False, rejects=None, sink=None
    )
    return emulator, token, app


@pytest.mark.scaleout
@pytest.mark.slow
def test_a_killed_push_worker_hands_its_claims_over_at_once(
    pg: str, redis_url: str, server: tuple[HubSpotEmulator, Any], home: Path, tmp_path: Path
) -> None:
    pytest.importorskip("dramatiq")
    from crmsync.worker import push_outcomes

    emulator, token, app = _slow_push_queued(server, pg, tmp_path, 1500)
    job = "from crmsync.worker import crm_push_outcomes_job; crm_push_outcomes_job('hs')"
    victim = subprocess.Popen([sys.executable, "-c", job], env=worker_env(home, token), cwd=ROOT)
    deadline = time.monotonic() + 60
    batches = ("POST crm.objects.batch.upsert", "POST crm.objects.batch.create")
    while sum(emulator.stats.by_route[b] for b in batches) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.kill()
    victim.wait()
    with app.store.session() as s:
        claimed = [r for r in s.exec(select(CrmOutbox)) if r.claimed_by]
    assert claimed, "the worker was killed before it claimed anything"

    emulator.faults.latency_ms = 0
    summary = push_outcomes("hs", app=app)  # no 10-minute wait: the dead worker's lock is gone
    assert summary is not None and summary.pending == 0 and summary.failed == 0
    with app.store.session() as s:
        rows = list(s.exec(select(CrmOutbox)))
    assert {r.state for r in rows} == {"done"} and all(r.claimed_by is None for r in rows)
    markers = [c["properties"]["crmsync_outcome_id"] for c in emulator.records("calls")]
    assert len(markers) == len(set(markers)) == 1500
    assert len(emulator.records("contacts")) == 1500
    app.close()


@pytest.mark.scaleout
@pytest.mark.slow
def test_two_pull_workers_on_one_connection_take_turns(
    pg: str, redis_url: str, server: tuple[HubSpotEmulator, Any], home: Path
) -> None:
    pytest.importorskip("dramatiq")
    emulator, srv = server
    emulator.faults.latency_ms = 20  # long enough pulls that unlocked workers would overlap
    emulator.seed(contacts=1200, companies=200)
    token = emulator.private_app_token
    hubspot_app(srv.url, token, db=pg).close()
    write_config(home, "hs", rate_limit=100)
    cfg = home / "config.yaml"
    cfg.write_text(cfg.read_text() + "lock_timeout: 120\n")  # the second worker waits its turn

    job = "from crmsync.worker import crm_pull_delta_job; crm_pull_delta_job('hs')"
    env = worker_env(home, token)
    procs = [
        subprocess.Popen([sys.executable, "-c", job], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err[-2000:]

    pulls = runs(pg, "pull")
    assert len(pulls) == 2 and {r.status for r in pulls} == {"ok"}
    assert len({r.pid for r in pulls}) == 2
    first, second = sorted(pulls, key=lambda r: r.started_at)
    assert first.finished_at is not None and first.finished_at <= second.started_at  # never interleaved
    assert first.counts["contacts"]["created"] == 1200
    assert second.counts["contacts"]["created"] == 0  # it resumed from the first worker's cursor
    store = Store.open(pg)
    assert store.mirror.count_records("hs")["contacts"]["stored"] == 1200
    assert store.mirror.cursor("hs", "contacts") is not None
    store.close()
    assert emulator.stats.rate_limited == 0


@pytest.mark.scaleout
def test_apply_page_creates_updates_and_archives_on_postgresql(pg: str) -> None:
    """apply_page writes through the driver on SQLite; PostgreSQL takes the Core statements instead."""
    from datetime import UTC, datetime

    from crmsync.store import Canonical, Store

    store = Store.open(pg)
    day = datetime(2026, 1, 1, tzinfo=UTC)

    def page(n: int, at: datetime) -> list[Canonical]:
        return [
            Canonical(
                remote_id=str(i),
                properties={"email": f"p{i}@x.example", "n": i + n},
                raw={"i": i},
                remote_updated_at=at,
            )
            for i in range(5)
        ]

    first = store.mirror.apply_page("pgc", "contacts", page(0, day), cursor={"p": 1})
    second = store.mirror.apply_page("pgc", "contacts", page(100, day.replace(day=2)), cursor={"p": 2}, deleted=["3"])
    assert (first.created, second.updated, second.archived) == (5, 5, 1)
    records = {r.remote_id: r for r in store.mirror.records("pgc", "contacts")}
    assert records["4"].properties == {"email": "p4@x.example", "n": 104} and records["3"].archived
    assert store.mirror.cursor("pgc", "contacts") == {"p": 2}
    store.close()


@pytest.mark.scaleout
@pytest.mark.slow
def test_a_job_whose_worker_is_killed_completes_on_the_other_worker_within_a_minute(
    pg: str, redis_url: str, server: tuple[HubSpotEmulator, Any], home: Path, tmp_path: Path
) -> None:
    """SIGKILL the worker process delivering a push: no new enqueue, the job runs again elsewhere."""
    pytest.importorskip("dramatiq")

    emulator, token, app = _slow_push_queued(server, pg, tmp_path, 1000)
    app.close()
    env = worker_env(home, token)
    env["dramatiq_queue_prefetch"] = "1"
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    fleet = [  # two hosts' worth: killing one's process stops that host's workers, not the other's
        subprocess.Popen(
            [sys.executable, "-m", "crmsync", "worker", "--processes", "1", "--threads", "1"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for log in logs
    ]

    def tail() -> str:
        return "\n".join((tmp_path / f"worker{i}.log").read_text()[-2000:] for i in range(2))

    try:
        assert run_cli(["enqueue", "push", "-c", "hs"], env).code == 0
        deadline = time.monotonic() + 120
        batches = ("POST crm.objects.batch.upsert", "POST crm.objects.batch.create")
        victim = None
        while time.monotonic() < deadline:
            running = [r for r in runs(pg, "push") if r.status == "running"]
            if running and sum(emulator.stats.by_route[b] for b in batches) >= 2:
                victim = running[0]
                break
            time.sleep(0.05)
        assert victim is not None, "no worker started the push:\n" + tail()
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        store = Store.open(pg)
        try:
            while time.monotonic() - killed_at < 60:
                with store.session() as s:
                    states = [r.state for r in s.exec(select(CrmOutbox))]
                if set(states) == {"done"}:
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"the job did not complete within 60 s of the kill: {states.count('done')} done\n" + tail())
        finally:
            store.close()
    finally:
        for proc in fleet:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in fleet:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()

    markers = [c["properties"]["crmsync_outcome_id"] for c in emulator.records("calls")]
    assert len(markers) == len(set(markers)) == 1000  # exactly once
    assert len(emulator.records("contacts")) == 1000
    pushes = {r.id: r for r in runs(pg, "push")}
    assert pushes[victim.id].status == "abandoned", pushes[victim.id]
    assert str(victim.pid) in (pushes[victim.id].error or "")
    finished = [r for r in pushes.values() if r.id != victim.id and r.status == "ok"]
    assert finished and all(r.pid != victim.pid for r in finished)
