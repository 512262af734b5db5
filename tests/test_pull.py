"""The pull engine (sync/pull.py through sync/run.py), driving the HubSpot emulator in-process via ``transport()``.

Each test checks what a run ends in (its ``Outcome`` and the error that stopped it), what the run
log and the metrics say, and what the store holds; the CLI's exit codes for those outcomes are
tested in test_cli.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crmsync.app import App
from crmsync.cli.exits import for_result
from crmsync.emulators.base import Faults
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.errors import AuthError, FatalProviderError, LockHeldError, RetriableError
from crmsync.sync.pull import backfill, pull
from crmsync.sync.run import Outcome
from tests.e2e import hubspot_app, pull_stopped_before_page, write_config

URL = "http://hubspot.test"


def connected(emulator: HubSpotEmulator, *, name: str = "hs") -> App:
    """An App connected to ``emulator`` as ``name``, its requests answered in-process."""
    return hubspot_app(URL, emulator.private_app_token, name=name, transport=lambda _name: emulator.transport())


@pytest.fixture
def emulator() -> HubSpotEmulator:
    emu = HubSpotEmulator(seed=11)
    emu.seed(contacts=40, companies=8, deals=6)
    return emu


@pytest.fixture
def app(emulator: HubSpotEmulator) -> Iterator[App]:
    a = connected(emulator)
    yield a
    a.close()


def _runs(app: App) -> list[tuple[str, str, str | None]]:
    """(command, status, error) of each run of "hs", oldest first."""
    return [(r.command, r.status, r.error) for r in reversed(app.store.runs.recent("hs"))]


def _metric(app: App, name: str, **labels: str) -> float | None:
    return app.metrics.registry.get_sample_value(name, labels)


def test_a_pull_stores_every_record_and_the_next_one_only_what_changed(emulator: HubSpotEmulator, app: App) -> None:
    first = pull(app)[0]
    assert (first.outcome, first.failure, first.error) == (Outcome.OK, None, None)
    read = {o.object: (o.read, o.created) for o in first.objects}
    assert read["contacts"] == (40, 40) and read["companies"] == (8, 8) and read["deals"] == (6, 6)
    assert first.requests > 0 and first.duration > 0
    contact = emulator.records("contacts")[0]["id"]
    emulator.edit("contacts", contact, {"firstname": "Renamed"}, at=time.time() - 2)

    second = pull(app, objects=["contacts"])[0]
    assert second.outcome is Outcome.OK
    (contacts,) = second.objects
    assert (contacts.updated, contacts.created) == (1, 0)
    assert app.store.mirror.record("hs", "contacts", contact).properties["first_name"] == "Renamed"  # type: ignore[union-attr]
    assert [r[:2] for r in _runs(app)] == [("pull", "ok"), ("pull", "ok")]
    run = app.store.runs.recent("hs")[0]
    assert run.counts["contacts"]["updated"] == 1 and "_quota" in run.counts and run.requests == second.requests
    assert _metric(app, "crm_records_total", connection="hs", object="contacts", action="created") == 40
    assert (_metric(app, "crm_last_success_timestamp_seconds", connection="hs", command="pull") or 0) > 0
    assert app.store.connections.get("hs").auth_state == "ok"  # type: ignore[union-attr]


def test_an_object_that_fails_makes_the_run_partial_and_the_others_are_stored(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = app.provider

    def provider_refusing_deals(conn: Any) -> Any:
        provider = build(conn)
        changes = provider.changes

        def refuse(obj: str, *args: Any, **kwargs: Any) -> Any:
            if obj == "deals":
                raise FatalProviderError("deals: 403 this portal may not read deals", status=403)
            return changes(obj, *args, **kwargs)

        monkeypatch.setattr(provider, "changes", refuse)
        return provider

    monkeypatch.setattr(app, "provider", provider_refusing_deals)
    result = pull(app)[0]
    assert result.outcome is Outcome.PARTIAL and result.failure is None and for_result(result) == 1
    by_obj = {o.object: o for o in result.objects}
    assert by_obj["deals"].error == "deals: 403 this portal may not read deals"
    assert by_obj["contacts"].read == 40 and by_obj["companies"].read == 8
    assert app.store.mirror.cursor("hs", "deals") is None and app.store.mirror.cursor("hs", "contacts") is not None
    assert [r[:2] for r in _runs(app)] == [("pull", "partial")]
    assert _metric(app, "crm_last_success_timestamp_seconds", connection="hs", command="pull") is None


def test_a_refused_token_fails_the_run_and_marks_the_connection_invalid(emulator: HubSpotEmulator, app: App) -> None:
    app.secrets.set("hs", {"kind": "private_app", "token": "pat-na1-00000000-0000-0000-0000-000000000000"})
    result = pull(app)[0]
    assert result.outcome is Outcome.FAILED and isinstance(result.failure, AuthError)
    assert result.error == str(result.failure) and for_result(result) == 3
    assert _runs(app) == [("pull", "failed", result.error)]
    assert app.store.connections.get("hs").auth_state == "invalid"  # type: ignore[union-attr]


def test_a_crm_down_past_the_deadline_fails_the_run_for_a_retry(
    emulator: HubSpotEmulator, app: App, home: Path
) -> None:
    app.close()
    write_config(home, "hs", deadline_seconds=0.3)
    emulator.faults = Faults(error_rate=1.0)
    again = App(transport=lambda _name: emulator.transport())
    try:
        result = pull(again, objects=["contacts"])[0]
        assert result.outcome is Outcome.FAILED and isinstance(result.failure, RetriableError)
        assert for_result(result) == 75 and result.retries > 0
        assert [r[:2] for r in _runs(again)] == [("pull", "failed")]
    finally:
        again.close()


def test_a_busy_connection_is_skipped_and_the_others_pulled(emulator: HubSpotEmulator, app: App) -> None:
    connected(emulator, name="other").close()
    with app.run_lock("other"):
        results = {r.connection: r for r in pull(app, objects=["contacts"])}
        with pytest.raises(LockHeldError):
            pull(app, connections=["other"], objects=["contacts"])  # the only one asked for is busy
    assert results["hs"].outcome is Outcome.OK and results["hs"].objects[0].read == 40
    busy = results["other"]
    assert busy.outcome is Outcome.BUSY and busy.busy and busy.objects == [] and for_result(busy) == 75
    assert isinstance(busy.failure, LockHeldError) and "busy" in (busy.error or "")
    assert app.store.runs.recent("other") == []  # a busy connection's run never started


def test_an_interrupted_pull_or_backfill_is_logged_as_interrupted_and_resumes(
    emulator: HubSpotEmulator, app: App
) -> None:
    emulator.seed(contacts=210)  # more than one page
    assert pull_stopped_before_page(app, 1, ["contacts"])
    apply = app.store.mirror.apply_page

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    app.store.mirror.apply_page = interrupt  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        backfill(app, objects=["contacts"])
    app.store.mirror.apply_page = apply  # type: ignore[method-assign]
    assert [r[:2] for r in _runs(app)] == [("pull", "interrupted"), ("backfill", "interrupted")]
    resumed = pull(app, objects=["contacts"])[0]
    assert resumed.outcome is Outcome.OK
    assert app.store.mirror.count_records("hs")["contacts"]["stored"] == 250


def test_a_backfill_seeds_the_incremental_cursor_and_drops_its_checkpoint(app: App) -> None:
    result = backfill(app, objects=["contacts", "companies"])
    assert result.outcome is Outcome.OK and result.command == "backfill"
    assert [o.read for o in result.objects] == [40, 8]
    for obj in ("contacts", "companies"):
        assert app.store.mirror.cursor("hs", obj) is not None
        assert app.store.mirror.cursor("hs", obj, "backfill") is None
    assert app.store.mirror.cursor("hs", "deals") is None  # not asked for
    assert [r[:2] for r in _runs(app)] == [("backfill", "ok")]


def test_an_unknown_object_fails_the_run_as_a_usage_error(app: App) -> None:
    result = pull(app, objects=["invoices"])[0]
    assert result.outcome is Outcome.FAILED and for_result(result) == 2
    assert result.error == "HubSpot cannot pull invoices; choose from contacts, companies, deals, calls"


def test_json_of_a_result_names_its_outcome() -> None:
    from crmsync.sync.pull import ConnectionResult

    doc = ConnectionResult("hs", "hubspot", "pull", outcome=Outcome.BUSY).as_dict()
    assert doc["outcome"] == "busy" and doc["busy"] is True and "exit_code" not in doc  # the CLI adds it


# -- the run lifecycle itself (sync/run.py), with the knobs push uses -------------------------------
def test_a_run_with_its_own_lock_and_a_late_provider_records_what_settle_judged(app: App) -> None:
    import contextlib

    from crmsync.sync.run import run

    conn = app.connection("hs")
    locks: list[str] = []

    @contextlib.contextmanager
    def lock() -> Iterator[None]:
        locks.append("held")
        yield

    def body(r: Any) -> None:
        assert r.provider is None  # provider=False: the body builds it when it needs it
        provider = r.use(app.provider(conn))
        provider.check()

    def settle(r: Any) -> None:
        r.mark(Outcome.RETRY_LATER)
        r.mark(Outcome.PARTIAL)  # the first mark stands
        r.counts, r.records = {"calls": {"queued": 2}}, {"calls": {"failed": 2}}

    r = run(app, conn, "push", body, lock=lock(), provider=False, settle=settle)
    assert locks == ["held"] and r.outcome is Outcome.RETRY_LATER and r.stats["requests"] >= 1
    assert [x[:2] for x in _runs(app)] == [("push", "ok")]  # the run log knows no retry_later: its work is done
    assert app.store.runs.recent("hs")[0].counts == {"calls": {"queued": 2}}
    assert _metric(app, "crm_records_total", connection="hs", object="calls", action="failed") == 2


def test_a_run_returns_only_the_errors_it_stops_on_and_records_ctrl_c_when_asked(app: App) -> None:
    from crmsync.errors import InputError
    from crmsync.sync.run import run

    conn = app.connection("hs")

    def fail(exc: BaseException) -> Any:
        def body(r: Any) -> None:
            raise exc

        return body

    stopped = run(app, conn, "push", fail(RetriableError("down")), stops=(RetriableError, AuthError))
    assert stopped.outcome is Outcome.FAILED and isinstance(stopped.failure, RetriableError)
    with pytest.raises(InputError):
        run(app, conn, "push", fail(InputError("bad row")), stops=(RetriableError, AuthError))
    interrupted = run(app, conn, "push", fail(KeyboardInterrupt()), record_interrupt=True)
    assert interrupted.outcome is Outcome.INTERRUPTED and interrupted.failure is None
    assert [x[:2] for x in _runs(app)] == [("push", "failed"), ("push", "failed"), ("push", "interrupted")]
