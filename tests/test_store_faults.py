"""Store faults as the user meets them: locked, read-only, full, corrupt, unreachable.

Each fault is injected for real where the machine allows it (another process's SQLite lock, a
size-limited or read-only tmpfs when we may mount one, bytes written into the file) and the CLI
runs as a subprocess: one line on stderr, the documented exit code, no traceback, and once the
fault is gone a re-run delivers every outcome exactly once (counted in the emulator).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.errors import StoreBusyError, StoreCorruptError, StoreFullError
from crmsync.store import Canonical, Store
from tests.e2e import CliResult, cli_env, hubspot_app, run_cli

N = 12


@pytest.fixture
def crm() -> Iterator[tuple[HubSpotEmulator, Any]]:
    emulator = HubSpotEmulator(seed=25)
    srv = emulator.serve()
    yield emulator, srv
    srv.stop()


def outcomes(n: int = N, prefix: str = "sf") -> str:
    return "".join(
        json.dumps(
            {
                "id": f"{prefix}-{i}",
                "occurred_at": "2026-11-20T10:00:00+01:00",
                "contact": {"email": f"{prefix}{i}@example.org"},
                "disposition": "connected",
                "notes": f"call {i}",
            }
        )
        + "\n"
        for i in range(n)
    )


def connected(crm: tuple[HubSpotEmulator, Any], db: Path) -> dict[str, str]:
    """A store at ``db`` with connection ``hs``; the environment a CLI subprocess needs."""
    emulator, srv = crm
    hubspot_app(srv.url, emulator.private_app_token, db=str(db)).close()
    return cli_env(Path(os.environ["CRMSYNC_HOME"]), "hs", emulator.private_app_token)


def cli(env: dict[str, str], db: Path, *args: str, stdin: str | None = None) -> CliResult:
    return run_cli(["--db", str(db), *args], env, stdin=stdin, timeout=120)


def one_line(result: CliResult, code: int, *words: str) -> str:
    """The run failed with ``code`` and one error line (no traceback) containing ``words``."""
    assert result.code == code, (result.code, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("crmsync: error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def calls(emulator: HubSpotEmulator) -> list[str]:
    return sorted(c["properties"]["crmsync_outcome_id"] for c in emulator.records("calls"))


def push_exactly_once(env: dict[str, str], db: Path, emulator: HubSpotEmulator, src: Path) -> None:
    result = cli(env, db, "push", str(src), "-c", "hs")
    assert result.code == 0, result.stderr
    assert calls(emulator) == sorted(f"sf-{i}" for i in range(N))


# -- locked ----------------------------------------------------------------------------------------
LOCKER = textwrap.dedent(
    """
    import sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    if sys.argv[2] == "whole-file":
        con.execute("PRAGMA locking_mode=EXCLUSIVE")
    con.execute("BEGIN EXCLUSIVE")
    con.execute("UPDATE crm_connection SET auth_state = auth_state")
    print("locked", flush=True)
    time.sleep(300)
    """
)


@pytest.mark.parametrize("mode", ["writer", "whole-file"])
@pytest.mark.slow
def test_a_locked_store_exits_75_store_busy_within_the_lock_timeout(
    crm: tuple[HubSpotEmulator, Any], tmp_path: Path, mode: str
) -> None:
    db = tmp_path / "s.db"
    env = connected(crm, db)
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes())
    started = time.monotonic()
    assert cli(env, db, "status").code == 0
    start_up = time.monotonic() - started  # a loaded machine starts a command slowly
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        started = time.monotonic()
        pulled = cli(env, db, "pull", "--lock-timeout", "1")
        elapsed = time.monotonic() - started
        one_line(pulled, 75, "store busy", str(db), "waited 1 s")
        assert elapsed < start_up * 1.5 + 3, (elapsed, start_up)  # the lock timeout, not SQLite's old 30 s
        one_line(cli(env, db, "push", str(src), "-c", "hs", "--lock-timeout", "1"), 75, "store busy")
        one_line(cli(env, db, "status"), 75, "store busy")  # what the next pull would meet
    finally:
        locker.kill()
        locker.wait()
    emulator = crm[0]
    assert calls(emulator) == []
    push_exactly_once(env, db, emulator, src)
    assert cli(env, db, "pull").code == 0


# -- read-only and full: a tmpfs we mount, where we may ------------------------------------------
def _mount(target: Path, *options: str) -> bool:
    if os.geteuid() != 0:
        return False
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs of our own (root only; skipped, saying so, elsewhere)."""
    where = tmp_path / "mnt"
    if not _mount(where, "size=4m", "mode=0755"):
        pytest.skip("cannot mount a tmpfs here (not root?): the SQLite-level tests below still run")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_a_read_only_store_exits_3_naming_the_path(
    crm: tuple[HubSpotEmulator, Any], tmpfs: Path, tmp_path: Path
) -> None:
    db = tmpfs / "s.db"
    env = connected(crm, db)
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes())
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        for args in (["pull"], ["push", str(src), "-c", "hs"], ["status"]):
            one_line(cli(env, db, *args), 3, "read-only", str(db))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    push_exactly_once(env, db, crm[0], src)


def test_a_read_only_directory_exits_3_naming_the_path(crm: tuple[HubSpotEmulator, Any], tmpfs: Path) -> None:
    db = tmpfs / "data" / "s.db"
    env = connected(crm, db)
    (tmpfs / "data").chmod(0o555)
    subprocess.run(["chattr", "+i", str(tmpfs / "data")], capture_output=True)  # root ignores mode bits
    if os.access(tmpfs / "data", os.W_OK):
        pytest.skip("this file system cannot make a directory read-only for root")
    try:
        one_line(cli(env, db, "status"), 3, "read-only", str(db))
    finally:
        subprocess.run(["chattr", "-i", str(tmpfs / "data")], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_exits_75_with_the_path_and_free_space(
    crm: tuple[HubSpotEmulator, Any], tmpfs: Path, tmp_path: Path
) -> None:
    db = tmpfs / "s.db"
    env = connected(crm, db)
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes())
    filler = tmpfs / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    line = one_line(cli(env, db, "push", str(src), "-c", "hs"), 75, "store full", str(db), "free")
    assert "bytes free" in line or "KB free" in line
    one_line(cli(env, db, "pull"), 75, str(db))
    one_line(cli(env, db, "status"), 75, str(db))
    filler.unlink()
    push_exactly_once(env, db, crm[0], src)


def test_a_full_store_at_the_sqlite_layer_is_store_full(tmp_path: Path) -> None:
    """Where no file system can be mounted: SQLite's page limit gives the same SQLITE_FULL."""
    store = Store.open(tmp_path / "s.db")

    @event.listens_for(store.engine, "connect")
    def _cap(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA max_page_count=1")  # below the file's size: no page can be added

    store.engine.dispose()
    with pytest.raises(StoreFullError, match=r"store full: cannot write .*s\.db .*free") as caught:
        for page in range(100):  # the file's free pages fill first
            records = [
                Canonical(remote_id=f"{page}-{i}", properties={"n": "x" * 500}, raw={}, remote_updated_at=None)
                for i in range(50)
            ]
            store.mirror.apply_page("c", "contacts", records, cursor={"page": page})
    assert caught.value.exit_code == 75
    store.close()


# -- corrupt ---------------------------------------------------------------------------------------
def queued(crm: tuple[HubSpotEmulator, Any], db: Path, src: Path) -> dict[str, str]:
    """A store whose outbox holds N queued outcomes nothing has delivered yet."""
    from crmsync.sync.inputs import read_outcomes
    from crmsync.sync.push import PushSummary, enqueue

    env = connected(crm, db)
    emulator, srv = crm
    app = hubspot_app(srv.url, emulator.private_app_token, db=str(db))
    summary = PushSummary("hs", "hubspot")
    enqueue(app, "hs", read_outcomes(str(src), "auto"), summary, update=False, rejects=None, sink=None)
    assert summary.queued == N
    app.close()
    return env


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.slow
def test_a_corrupt_store_exits_3_saving_the_queue_and_saying_how_to_rebuild(
    crm: tuple[HubSpotEmulator, Any], tmp_path: Path, damage: str
) -> None:
    db = tmp_path / "s.db"
    src = tmp_path / "o.jsonl"
    src.write_text(outcomes())
    env = queued(crm, db, src)
    size = db.stat().st_size
    assert not (tmp_path / "s.db-wal").exists() or (tmp_path / "s.db-wal").stat().st_size == 0
    with db.open("r+b") as f:
        if damage == "garbage":
            f.seek(size // 2 // 4096 * 4096)
            f.write(os.urandom(8192))
        else:
            f.truncate(size // 2)
    for args in (["pull"], ["push", str(src), "-c", "hs"], ["status"]):
        line = one_line(cli(env, db, *args), 3, "corrupt", str(db), "backfill")
    saved = tmp_path / "s.db.queued-hs.jsonl"
    emulator = crm[0]
    assert calls(emulator) == []
    if saved.exists():  # the outbox's pages survived the damage
        assert str(saved) in line and f"crmsync push {saved} -c hs" in line
        ids = sorted(json.loads(x)["id"] for x in saved.read_text().splitlines())
        assert ids == sorted(f"sf-{i}" for i in range(N))
    else:
        assert "no queued outcome could be read" in line
        saved = src
    # The recovery the message describes: a new store, connect, push what was saved.
    db.rename(tmp_path / "s.db.corrupt")
    env = connected(crm, db)
    result = cli(env, db, "push", str(saved), "-c", "hs")
    assert result.code == 0, result.stderr
    assert calls(emulator) == sorted(f"sf-{i}" for i in range(N))


def sqlite_error(kind: type[sqlite3.Error], message: str, code: int) -> Any:
    """A driver error as SQLAlchemy's handle_error hands it over."""
    err = kind(message)
    err.sqlite_errorcode = code  # type: ignore[attr-defined]
    return type("Context", (), {"original_exception": err})()


def test_a_clean_exit_is_recorded_so_the_next_open_skips_the_check_and_a_crash_is_not(
    crm: tuple[HubSpotEmulator, Any], tmp_path: Path
) -> None:
    from crmsync.store.integrity import OpenMarker

    db = tmp_path / "s.db"
    env = connected(crm, db)
    assert cli(env, db, "status").code == 0  # the CLI leaves closing the store to the process's end
    state = json.loads((tmp_path / "s.db-crmsync").read_text())
    assert state == {"open": False, "size": db.stat().st_size, "mtime_ns": db.stat().st_mtime_ns}
    marker = OpenMarker(db)
    assert marker.enter() is False  # nothing changed since: no quick_check
    marker.leave()
    crash = "import os, sys; from crmsync.store import Store; Store.open(sys.argv[1]); os.kill(os.getpid(), 9)"
    subprocess.run([sys.executable, "-c", crash, str(db)], check=False)
    assert json.loads((tmp_path / "s.db-crmsync").read_text())["open"] is True
    marker = OpenMarker(db)
    assert marker.enter() is True  # left open by a crash: checked before use
    marker.leave()


def test_damage_sqlite_reports_mid_run_is_a_corrupt_store(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    with pytest.raises(StoreCorruptError, match=r"s\.db is corrupt \(database disk image is malformed\)"):
        store._on_error(sqlite_error(sqlite3.DatabaseError, "database disk image is malformed", 11))
    store.close()


def test_a_busy_error_names_the_store_and_the_wait(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db", wait=2)
    with pytest.raises(StoreBusyError, match=r"store busy: .*s\.db .*waited 2 s"):
        store._on_error(sqlite_error(sqlite3.OperationalError, "database is locked", 5))
    store.close()


# -- PostgreSQL ------------------------------------------------------------------------------------
def test_an_unreachable_postgres_store_exits_75(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    env = cli_env(Path(os.environ["CRMSYNC_HOME"]))
    url = "postgresql+psycopg://crmsync:secret-pw@127.0.0.1:1/crmsync"
    result = run_cli(["--db", url, "status"], env, timeout=60)
    line = one_line(result, 75, "cannot reach the store", "127.0.0.1:1")
    assert "secret-pw" not in result.stderr and "***" in line


def test_a_postgres_store_refusing_the_password_exits_3(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    from tests.test_scaleout import PG_URL, _pg_problem

    if problem := _pg_problem():
        pytest.skip(problem)
    from sqlalchemy.engine.url import make_url

    wrong = make_url(PG_URL).set(password="not-the-password").render_as_string(hide_password=False)
    env = cli_env(Path(os.environ["CRMSYNC_HOME"]))
    result = run_cli(["--db", wrong, "status"], env, timeout=60)
    one_line(result, 3, "refused", "password authentication failed")
    assert "not-the-password" not in result.stderr


def test_a_store_filling_up_mid_pull_stops_the_pull_with_75_not_a_partial_1(
    crm: tuple[HubSpotEmulator, Any], tmp_path: Path
) -> None:
    from crmsync.sync.pull import pull

    emulator, srv = crm
    emulator.seed(contacts=1500)
    app = hubspot_app(srv.url, emulator.private_app_token, db=str(tmp_path / "s.db"))

    @event.listens_for(app.store.engine, "connect")
    def _cap(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA max_page_count=1")  # no page beyond those the file has

    app.store.engine.dispose()
    try:
        result = pull(app, objects=["contacts"])[0]
    except StoreFullError:
        pass  # the run log could not be closed either: the same fault, raised
    else:
        assert result.failure.exit_code == 75 and "store full" in (result.error or ""), result
    app.close()
