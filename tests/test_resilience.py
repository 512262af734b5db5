"""Kill tests: a push or backfill killed at random instants and re-run ends exactly as an uninterrupted run.

These run the real CLI in a subprocess against the HubSpot emulator on loopback and SIGKILL it.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from crmsync.app import App
from crmsync.emulators.base import Faults
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.store import CrmOutbox
from tests.e2e import cli_env, hubspot_app, run_cli, write_config
from tests.test_hubspot_e2e import outcome_lines

pytestmark = pytest.mark.slow


def _run_and_kill(
    args: list[str], env: dict[str, str], emulator: HubSpotEmulator, *, after_requests: int, then: float
) -> int | None:
    """Start the CLI and SIGKILL it ``then`` seconds after the emulator has seen ``after_requests`` more
    requests; None if it was killed, else its exit code. Timed by progress, not by the clock, so a slow or
    loaded machine still kills mid-work rather than before the first request."""
    start = emulator.stats.requests
    return _run_and_kill_when(args, env, lambda: emulator.stats.requests - start >= after_requests, then=then)


def _run_and_kill_when(
    args: list[str], env: dict[str, str], progressed: Callable[[], bool], *, then: float
) -> int | None:
    """Start the CLI and SIGKILL it ``then`` seconds after ``progressed()`` turns true; None if it was
    killed, else its exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "crmsync", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not progressed() and time.monotonic() < deadline:
            if proc.poll() is not None:
                return proc.returncode
            time.sleep(0.005)
        return proc.wait(timeout=then)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _kills_mid_walk(
    kill: Callable[[Any], int | None],
    points: Iterable[Any],
    home: Path,
    connection: str,
    walking: Callable[[dict[str, Any]], bool],
    obj: str = "contacts",
) -> int:
    """``kill(point)`` (a CLI run SIGKILLed at that point, see ``_run_and_kill``) for each point; how many
    were SIGKILLed while the stored backfill checkpoint was one ``walking`` recognises (the walk under
    test, not before or after it)."""
    killed = 0
    for point in points:
        code = kill(point)
        app = App(env={"CRMSYNC_HOME": str(home)})
        checkpoint = app.store.mirror.cursor(connection, obj, "backfill")
        app.close()
        if code is None and checkpoint and walking(checkpoint):
            killed += 1
    return killed


def _resumed_backfill_stores_each_once(
    env: dict[str, str], home: Path, connection: str, n: int, obj: str = "contacts"
) -> None:
    """The backfill run to its end after the kills: it went on from its checkpoint (read less than all),
    the store holds each of the ``n`` records once, and the checkpoint is gone."""
    last = run_cli(["--json", "backfill", "-c", connection, "--object", obj], env)
    assert last.code == 0, last.stderr
    assert last.json()["objects"][obj]["read"] < n
    app = App(env={"CRMSYNC_HOME": str(home)})
    rows = app.store.mirror.records(connection, obj)
    assert len(rows) == len({r.remote_id for r in rows}) == n
    assert app.store.mirror.cursor(connection, obj, "backfill") is None
    app.close()


def _stored(db: Path, connection: str, obj: str) -> int:
    """Mirror rows committed so far, read from a second connection while the CLI writes."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            query = "select count(*) from crm_record where connection = ? and object = ?"
            return int(conn.execute(query, (connection, obj)).fetchone()[0])
    except sqlite3.OperationalError:  # busy for a moment, or not created yet
        return 0


@contextlib.contextmanager
def _slow_crm(
    home: Path, tmp_path: Path, *, seed: int, latency_ms: float, outcomes: int
) -> Iterator[tuple[HubSpotEmulator, Path, dict[str, str]]]:
    """A HubSpot emulator on loopback answering in ``latency_ms``, connected as "hs"; ``outcomes`` to push
    (every 3rd with one of 7 companies, every 4th with a deal); the CLI's environment."""
    emulator = HubSpotEmulator(seed=seed, faults=Faults(latency_ms=latency_ms, seed=seed))
    server = emulator.serve()
    try:
        hubspot_app(server.url, emulator.private_app_token).close()
        src = tmp_path / "outcomes.jsonl"
        src.write_text(outcome_lines(outcomes, company_every=3, deal_every=4))
        yield emulator, src, cli_env(home, "hs", emulator.private_app_token)
    finally:
        server.stop()


def _assert_each_outcome_delivered_once(emulator: HubSpotEmulator, n: int) -> None:
    """Every call once, on its own contact; one record per contact, company and deal; every row done."""
    calls = emulator.records("calls")
    markers = [c["properties"]["crmsync_outcome_id"] for c in calls]
    assert len(markers) == len(set(markers)) == n
    assert len(emulator.records("companies")) == 7
    assert len(emulator.records("deals")) == len(range(0, n, 4))
    contacts = {r["properties"]["email"]: r["id"] for r in emulator.records("contacts")}
    assert len(contacts) == len(emulator.records("contacts")) == n
    for call in calls:
        i = int(call["properties"]["crmsync_outcome_id"].split("-")[1])
        assert emulator.associations("calls", call["id"], "contacts") == [contacts[f"person{i}@example.org"]]
    with App().store.session() as s:
        rows = list(s.exec(select(CrmOutbox)))
    assert len(rows) == n and all(r.state == "done" for r in rows)


def test_push_killed_30_times_delivers_each_call_exactly_once(home: Path, tmp_path: Path) -> None:
    # Latency widens every window in which a kill can land (mid-request, between steps, mid-commit).
    # A slow CRM (400 ms a request): 500 outcomes take many kill windows to get through, however fast
    # the client gets.
    with _slow_crm(home, tmp_path, seed=11, latency_ms=400, outcomes=500) as (emulator, src, env):
        rng = random.Random(2026)
        kills = 0
        for _ in range(30):
            code = _run_and_kill(
                ["--quiet", "push", str(src), "-c", "hs"],
                env,
                emulator,
                after_requests=rng.randint(1, 8),
                then=rng.uniform(0.0, 0.5),
            )
            kills += code is None
        final = run_cli(["--json", "push", str(src), "-c", "hs"], env)
        assert final.code == 0, final.stderr
        assert kills >= 10  # the kills really interrupted runs
        _assert_each_outcome_delivered_once(emulator, 500)


def test_ctrl_c_mid_push_exits_130_soon_and_a_rerun_finishes_exactly_once(home: Path, tmp_path: Path) -> None:
    """Lanes run in threads: Ctrl-C stops them at their next step, releases the claims, exits 130."""
    with _slow_crm(home, tmp_path, seed=13, latency_ms=300, outcomes=600) as (emulator, src, env):
        proc = subprocess.Popen(
            [sys.executable, "-m", "crmsync", "--quiet", "push", str(src), "-c", "hs"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not emulator.records("contacts") and time.monotonic() < deadline:
            time.sleep(0.05)  # interrupt once writes are under way
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code = proc.wait(timeout=30)
        assert code == 130, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() - sent < 10  # a step or two, not the rest of the round
        with App().store.session() as s:
            rows = list(s.exec(select(CrmOutbox)))
        assert len(rows) == 600 and not any(r.claimed_by for r in rows if r.state == "pending")
        assert any(r.state == "pending" for r in rows)  # it really stopped part-way

        final = run_cli(["--json", "push", str(src), "-c", "hs"], env)
        assert final.code == 0, final.stderr
        _assert_each_outcome_delivered_once(emulator, 600)


def test_backfill_killed_10_times_ends_like_an_uninterrupted_run(home: Path, tmp_path: Path) -> None:
    emulator = HubSpotEmulator(seed=12, faults=Faults(latency_ms=3, seed=12))
    emulator.bulk_create(
        "contacts",
        20_000,
        modified_at=time.time() - 3600,
        properties_fn=lambda i: {"email": f"c{i}@example.com", "firstname": f"F{i}"},
    )
    server = emulator.serve()
    try:
        write_config(home, "hs", rate_limit=100000, search_rate_limit=1000)
        reference_db = str(tmp_path / "reference.db")
        ref = hubspot_app(server.url, emulator.private_app_token, db=reference_db)
        from crmsync.sync.pull import backfill

        done = backfill(ref, connection="hs", objects=["contacts"])
        assert done.outcome == "ok" and done.objects[0].read == 20_000
        reference_cursor = ref.store.mirror.cursor("hs", "contacts")
        ref.close()

        app = hubspot_app(server.url, emulator.private_app_token)
        app.close()
        env = cli_env(home, "hs", emulator.private_app_token)
        rng = random.Random(7)
        kills = 0
        db = home / "crmsync.db"
        while kills < 10 and _stored(db, "hs", "contacts") < 12_000:
            # Killed once this run has committed 1-10 more pages (read from the store), so every kill
            # lands after real work however slow the machine, then at a random instant within 0.05 s;
            # no kill starts past 12,000 stored, so the walk is still under way when the last run begins.
            target = _stored(db, "hs", "contacts") + rng.randint(1, 10) * 100
            code = _run_and_kill_when(
                ["--quiet", "backfill", "-c", "hs", "--object", "contacts"],
                env,
                lambda: _stored(db, "hs", "contacts") >= target,  # noqa: B023 - called within this iteration
                then=rng.uniform(0.0, 0.05),
            )
            assert code is None, f"the backfill ended (exit {code}) before it was killed"
            kills += 1
        assert kills >= 5
        checkpoint = App().store.mirror.cursor("hs", "contacts", "backfill")
        assert checkpoint is not None and checkpoint["mode"] == "partitioned"
        stored = _stored(db, "hs", "contacts")
        last = run_cli(["--json", "backfill", "-c", "hs", "--object", "contacts"], env)
        assert last.code == 0, last.stderr
        # Each partition continued after its last stored page: nothing stored was read again.
        assert last.json()["objects"]["contacts"]["read"] == 20_000 - stored
        store = App().store
        rows = store.mirror.records("hs", "contacts")
        assert len(rows) == len({r.remote_id for r in rows}) == 20_000
        assert store.mirror.cursor("hs", "contacts") == reference_cursor
        assert store.mirror.cursor("hs", "contacts", "backfill") is None
        # and the next pull starts where backfill ended: nothing new, nothing re-created
        nxt = run_cli(["--json", "pull", "-c", "hs", "--object", "contacts"], env)
        assert nxt.code == 0, nxt.stderr
        assert json.loads(nxt.stdout)["results"][0]["objects"]["contacts"]["created"] == 0
    finally:
        server.stop()
