"""The store: migrations, file mode, cursor-with-data atomicity, the run lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from crmsync.app import App
from crmsync.errors import ConfigError, LockHeldError
from crmsync.store import DEFAULT_STORE_WAIT, SCHEMA_HEAD, Canonical, Store


def rec(i: int, name: str = "x") -> Canonical:
    return Canonical(
        remote_id=str(i),
        properties={"email": f"u{i}@example.com", "first_name": name},
        raw={},
        remote_updated_at=datetime(2026, 1, 1, tzinfo=UTC),
        match_key=f"email:u{i}@example.com",
    )


def test_store_file_is_private_and_wal(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    assert stat.S_IMODE(os.stat(tmp_path / "s.db").st_mode) == 0o600
    with store.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == DEFAULT_STORE_WAIT * 1000
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_HEAD
    with store.waiting(1.5), store.engine.connect() as c:  # a run's lock timeout is the store's wait too
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == 1500
    with store.engine.connect() as c:
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == DEFAULT_STORE_WAIT * 1000


def test_store_from_a_newer_crmsync_is_refused(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    with store.engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    store.close()
    with pytest.raises(ConfigError, match="newer crmsync"):
        Store.open(tmp_path / "s.db")


def test_page_and_cursor_commit_together(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    store.mirror.apply_page("c", "contacts", [rec(1)], cursor={"ts": 1})

    def boom(session: object) -> None:
        raise RuntimeError("killed between page write and commit")

    with pytest.raises(RuntimeError):
        store.mirror.apply_page("c", "contacts", [rec(2), rec(3)], cursor={"ts": 2}, before_commit=boom)
    assert store.mirror.cursor("c", "contacts") == {"ts": 1}
    assert {r.remote_id for r in store.mirror.records("c", "contacts")} == {"1"}


def test_unchanged_page_writes_nothing_and_older_data_never_rolls_back(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    first = store.mirror.apply_page("c", "contacts", [rec(1, "a")], cursor=None)
    again = store.mirror.apply_page("c", "contacts", [rec(1, "a")], cursor=None)
    assert (first.created, again.unchanged, again.updated) == (1, 1, 0)
    newer = rec(1, "b")
    newer.remote_updated_at = datetime(2026, 2, 1, tzinfo=UTC)
    assert store.mirror.apply_page("c", "contacts", [newer], cursor=None).updated == 1
    older = rec(1, "stale")
    assert store.mirror.apply_page("c", "contacts", [older], cursor=None).unchanged == 1
    assert store.mirror.record("c", "contacts", "1").properties["first_name"] == "b"  # type: ignore[union-attr]


@pytest.mark.parametrize("json1", [True, False], ids=["json1", "row-by-row"])
def test_pages_store_the_same_whether_sqlite_has_json_functions_or_not(tmp_path: Path, json1: bool) -> None:
    """Stored rows are read as one JSON array where SQLite can make one, row by row otherwise."""
    store = Store.open(tmp_path / "s.db")
    store.mirror.sqlite_json = json1
    day = datetime(2026, 1, 1, tzinfo=UTC)
    first = [rec(i) for i in range(1, 5)]
    first[0].associations = {"companies": ["7"]}
    store.mirror.apply_page("c", "contacts", first, cursor={"p": 1}, run_id=1)
    edited, moved, older, same = rec(1, "é"), rec(2), rec(3, "stale"), rec(4)
    edited.remote_updated_at = moved.remote_updated_at = datetime(2026, 2, 1, tzinfo=UTC)
    moved.associations = {"companies": ["8"]}
    older.remote_updated_at = day.replace(year=2025)
    counts = store.mirror.apply_page(
        "c", "contacts", [edited, moved, older, same, rec(9)], cursor={"p": 2}, deleted=["4", "404"], run_id=2
    )
    assert (counts.created, counts.updated, counts.unchanged, counts.archived) == (1, 2, 2, 1)
    rows = {r.remote_id: r for r in store.mirror.records("c", "contacts")}
    assert rows["1"].properties["first_name"] == "é" and rows["1"].associations == {"companies": ["7"]}
    assert rows["2"].associations == {"companies": ["8"]} and rows["3"].properties["first_name"] == "x"
    assert rows["4"].archived and not rows["9"].archived
    assert rows["1"].remote_updated_at == datetime(2026, 2, 1, tzinfo=UTC)
    changes = {(c.remote_id, c.action): c.changes for c in store.mirror.changes(connection="c") if c.run_id == 2}
    assert changes == {
        ("1", "updated"): {"first_name": ["x", "é"]},
        ("4", "archived"): {},
        ("9", "created"): {},
    }
    # Match keys: a changed one is written, an unchanged one left alone (its index untouched), and a
    # record twice in one page ends with the last one's, whatever the first changed.
    later = datetime(2026, 3, 1, tzinfo=UTC)
    renamed, twice, again, kept = rec(1, "é"), rec(2, "y"), rec(2, "z"), rec(3, "w")
    renamed.properties["email"], renamed.match_key, renamed.alt_key = "new@example.com", "email:new@example.com", "p:1"
    twice.match_key = again.match_key = "email:two@example.com"
    for r in (renamed, twice, again, kept):
        r.remote_updated_at = later
    again.remote_updated_at = later.replace(day=2)
    assert store.mirror.apply_page("c", "contacts", [renamed, twice, again, kept], cursor={"p": 3}).updated == 4
    rows = {r.remote_id: r for r in store.mirror.records("c", "contacts")}
    assert (rows["1"].match_key, rows["1"].alt_key) == ("email:new@example.com", "p:1")
    assert (rows["2"].match_key, rows["2"].properties["first_name"]) == ("email:two@example.com", "z")
    assert (rows["3"].match_key, rows["3"].alt_key) == ("email:u3@example.com", None)
    assert rows["3"].properties["first_name"] == "w"


def test_run_lock_exits_tempfail_naming_the_holder(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from crmsync.app import App
            app = App(db={db!r})
            with app.run_lock("prod", timeout=0):
                print("locked", flush=True)
                time.sleep(30)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        app = App(db=db)
        with pytest.raises(LockHeldError, match=f"pid {holder.pid}") as exc, app.run_lock("prod", timeout=0.3):
            pass
        assert exc.value.exit_code == 75
        with app.run_lock("other", timeout=0):  # another connection is not blocked
            pass
    finally:
        holder.kill()
        holder.wait()
    with App(db=db).run_lock("prod", timeout=1):  # freed when the holder died
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "email": st.sampled_from(["", "A@Example.org", "b@x.io"]),
            "phone": st.sampled_from(["", "+1 (617) 555-0101", "n/a", "0049 30 1234"]) | st.text(max_size=8),
        },
    )
)
def test_record_keys_of_contacts_are_contact_key_spelled_out(props: dict[str, str]) -> None:
    """records.record_keys inlines contact_key()/match_key() for speed; the keys must not drift."""
    from crmsync.model import contact_key
    from crmsync.providers.base import match_key
    from crmsync.sync.records import record_keys

    primary = contact_key(props)
    phone = contact_key({"phone": props["phone"]}) if props.get("phone") else None
    expected = (match_key(primary) if primary else None, match_key(phone) if phone and primary != phone else None)
    assert record_keys("contacts", props) == expected


def test_pages_are_fetched_up_to_three_ahead_of_the_one_being_stored() -> None:
    """A keyset walk's next request needs only the previous page, not the store: it must not wait for it."""
    import threading

    from crmsync.providers.base import Page
    from crmsync.sync.pull import _prefetched

    requested: list[int] = []
    changed = threading.Condition()

    def pages() -> Iterator[Page]:
        for i in range(6):
            with changed:
                requested.append(i)
                changed.notify_all()
            yield Page(records=[], cursor={"page": i})

    walk = _prefetched(pages())
    first = next(walk)  # page 0 is being stored from here on
    with changed:
        assert changed.wait_for(lambda: 3 in requested, timeout=5)
    time.sleep(0.05)  # give an unbounded producer time to run on
    assert first.cursor == {"page": 0} and requested == [0, 1, 2, 3]  # and no further: memory stays flat
    assert [p.cursor["page"] for p in walk] == [1, 2, 3, 4, 5]


def test_a_walk_stopped_early_closes_the_walks_it_runs_ahead_of() -> None:
    """run_ahead inside run_ahead (a provider's keyset chain under pull's prefetch): stopping the
    consumer stops both producer threads and runs the inner generator's clean-up."""
    import threading

    from crmsync.providers.base import run_ahead

    closed: list[str] = []

    def chain() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.append("chain")

    def pages() -> Iterator[int]:
        try:
            yield from run_ahead(chain(), 2, name="test-chain")
        finally:
            closed.append("pages")

    walk = run_ahead(pages(), 2, name="test-pages")
    assert [next(walk) for _ in range(3)] == [0, 1, 2]
    walk.close()
    assert closed == ["chain", "pages"]
    assert not [t for t in threading.enumerate() if t.name in ("test-chain", "test-pages")]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.datetimes(timezones=st.none() | st.just(UTC))
    | st.decimals(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.booleans() | st.none(), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_stored_json_text_is_what_json_dumps_gives(value: object) -> None:
    """The encoders built once give json.dumps' own text, sorted or not, and its errors (mixed key types)."""
    import json

    from crmsync.store import bulk

    def outcome(encode: Any, *args: Any, **kwargs: Any) -> str:
        try:
            return str(encode(*args, **kwargs))
        except TypeError as exc:  # keys of mixed types cannot be sorted
            return f"TypeError: {exc}"

    compact = {"default": str, "separators": (",", ":")}
    assert outcome(bulk.compact_json, value) == outcome(json.dumps, value, **compact)
    assert outcome(bulk.sorted_json, value) == outcome(json.dumps, value, sort_keys=True, **compact)


KILLED_RUN = (
    "import os, sys; from crmsync.store import Store; "
    "s = Store.open(sys.argv[1]); print(s.runs.start(sys.argv[2], 'pull'), flush=True); os.kill(os.getpid(), 9)"
)


def test_runs_whose_process_died_are_marked_abandoned_by_the_next_run_and_by_status(tmp_path: Path) -> None:
    from crmsync.store import CrmSyncLog

    db = tmp_path / "s.db"
    Store.open(db).close()

    def killed_run(connection: str) -> int:
        done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(db), connection], capture_output=True, text=True)
        assert done.returncode == -9, done.stderr
        return int(done.stdout)

    dead_c, dead_d = killed_run("c"), killed_run("d")
    store = Store.open(db)
    with store.session() as s:  # a run on another host cannot be judged from here: left alone
        other = CrmSyncLog(connection="c", command="pull", host="elsewhere.example", pid=1)
        s.add(other)
        s.flush()
        other_id = other.id
    mine = store.runs.start("c", "push")  # the next run of connection c marks its dead runs
    status = {r.id: r for r in store.runs.recent(limit=10)}
    assert status[dead_c].status == "abandoned" and f"pid {status[dead_c].pid} " in (status[dead_c].error or "")
    assert status[dead_d].status == "running"  # another connection's: status marks those
    assert status[mine].status == "running" and status[other_id].status == "running"
    assert store.runs.abandon_dead() == 1  # what `status` does
    status = {r.id: r for r in store.runs.recent(limit=10)}
    assert status[dead_d].status == "abandoned" and status[dead_d].finished_at is not None
    assert status[mine].status == "running" and status[other_id].status == "running"
    store.close()


def test_a_pid_taken_by_a_newer_process_does_not_keep_a_dead_run_alive() -> None:
    from crmsync.store import process_gone

    assert not process_gone(os.getpid(), datetime.now(UTC))
    if Path("/proc/self/stat").exists():  # Linux tells when a process began
        assert process_gone(os.getpid(), datetime(2000, 1, 1, tzinfo=UTC))  # it began after that run
    assert process_gone(2**22 + 12345, None)  # above Linux's pid limit: no such process


@pytest.mark.parametrize(
    ("where", "postgresql"),
    [
        ("postgres://u:p@db/crm", True),
        ("postgresql://u@db/crm", True),
        ("postgresql+psycopg://u@db/crm", True),
        ("sqlite:///tmp/postgresql.db", False),
        ("/srv/postgresql/crmsync.db", False),
        ("mysql+pymysql://u@db/crm", False),
        ("not a url://", False),
    ],
)
def test_a_store_is_postgresql_by_its_dialect_not_by_a_prefix_of_its_name(where: str, postgresql: bool) -> None:
    from crmsync.store import is_postgresql_url

    assert is_postgresql_url(where) is postgresql


def test_an_opened_sqlite_store_says_it_is_not_postgresql(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "postgresql.db")
    assert store.is_postgresql is False
    store.close()
