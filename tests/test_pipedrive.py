"""Pipedrive end to end against its emulator: connect, push exactly once without any upsert, pull deltas."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.app import App
from crmsync.cli.exits import for_push
from crmsync.emulators.base import Faults
from crmsync.emulators.pipedrive import PipedriveEmulator
from crmsync.errors import RetriableError
from crmsync.providers.pipedrive.records import duration_seconds, duration_text, marker_of
from crmsync.sync.connect import connect
from crmsync.sync.pull import pull
from crmsync.sync.push import push
from tests.e2e import ScriptIO, write_config
from tests.test_hubspot_e2e import outcome_lines


class Recorder:
    """An in-process transport that remembers every URL it was asked for."""

    def __init__(self, emulator: PipedriveEmulator) -> None:
        self.inner = emulator.transport()
        self.urls: list[httpx.URL] = []

    def __call__(self, name: str) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.urls.append(request.url)
            return self.inner.handle_request(request)

        return httpx.MockTransport(handle)


def _app(emulator: PipedriveEmulator, *, db: str | None = None, recorder: Recorder | None = None) -> App:
    rec = recorder or Recorder(emulator)
    app = App(db=db, transport=rec)
    connect(
        app, provider="pipedrive", name="pd", base_url="http://pd.test", options={}, io=ScriptIO(emulator.api_token)
    )
    return app


def _calls(emulator: PipedriveEmulator) -> Counter[str | None]:
    return Counter(marker_of(a["note"]) for a in emulator.records("activities") if a["type"] == "call" and a["done"])


def _tasks(emulator: PipedriveEmulator) -> list[dict[str, Any]]:
    return [a for a in emulator.records("activities") if not a["done"]]


def _outcomes(path: Path, n: int, **kw: Any) -> Path:
    lines = []
    for i, line in enumerate(outcome_lines(n, **kw).splitlines()):
        o = json.loads(line)
        o["deal"] = {k: v for k, v in o.get("deal", {}).items() if k != "stage"} or None
        if o["deal"] is None:
            del o["deal"]
        if i % 5 == 0:
            o["next_step"] = {"type": "call", "due_at": "2026-12-09T09:00:00+00:00", "notes": "call back"}
        lines.append(json.dumps(o))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_durations_round_trip_as_minutes() -> None:
    assert duration_text(20) == "00:01" and duration_text(3600) == "01:00" and duration_text(3661) == "01:02"
    assert duration_seconds("01:20") == 4800 and duration_seconds("01:00:00") == 3600 and duration_seconds("x") is None


@pytest.mark.slow
def test_push_logs_each_call_once_with_its_person_and_a_re_push_writes_nothing(home: Path, tmp_path: Path) -> None:
    write_config(home, "pd", rate_limit=40)  # the Growth plan's burst, as a user on it configures
    emulator = PipedriveEmulator(plan="growth")
    recorder = Recorder(emulator)
    app = _app(emulator, recorder=recorder)
    src = _outcomes(tmp_path / "o.jsonl", 60, company_every=3, deal_every=4)
    summary = push(app, source=str(src), connection="pd")
    assert for_push(summary) == 0 and summary.created == 60, summary.as_dict()

    calls = _calls(emulator)
    assert len(calls) == 60 and set(calls.values()) == {1}
    persons = {p["emails"][0]["value"]: p["id"] for p in emulator.records("persons")}
    assert len(persons) == 60
    for act in emulator.records("activities"):
        if act["type"] == "call" and act["done"]:
            i = int(marker_of(act["note"]).split("-")[1])  # type: ignore[union-attr]
            assert act["done"] is True and act["participants"] == [
                {"person_id": persons[f"person{i}@example.org"], "primary": True}
            ]
            assert act["duration"] == duration_text(60 + i % 100)
    assert len(_tasks(emulator)) == 12 and all(not t["done"] for t in _tasks(emulator))
    assert len(emulator.records("organizations")) == 7 and len(emulator.records("deals")) == 15
    # The token travels in a header only: a query string lands in logs.
    assert not any("api_token" in str(url) for url in recorder.urls)
    assert emulator.stats.rate_limited == 0

    writes = emulator.stats.writes
    again = push(app, source=str(src), connection="pd")
    assert for_push(again) == 0 and again.created == 0
    assert emulator.stats.writes == writes


def test_an_entitys_fields_are_read_once_however_many_threads_ask_at_once(home: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    emulator = PipedriveEmulator(limits=False, faults=Faults(latency_ms=30, seed=3))
    app = _app(emulator)
    provider = app.provider(app.store.connections.get("pd"))
    before = emulator.stats.by_route["GET organizationFields"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(lambda _i: provider._custom_codes("organization"), range(8)))
    assert emulator.stats.by_route["GET organizationFields"] - before == 1
    assert all(codes == found[0] for codes in found)
    app.close()


@pytest.mark.slow
def test_a_new_store_finds_the_calls_already_logged_and_logs_none_again(home: Path, tmp_path: Path) -> None:
    write_config(home, "pd", rate_limit=40)
    emulator = PipedriveEmulator(plan="growth")
    src = _outcomes(tmp_path / "o.jsonl", 40, company_every=3, deal_every=4)
    first = push(_app(emulator, db=str(tmp_path / "first.db")), source=str(src), connection="pd")
    assert for_push(first) == 0
    counts = {obj: len(emulator.records(obj)) for obj in ("persons", "organizations", "deals", "activities")}

    second = push(_app(emulator, db=str(tmp_path / "second.db")), source=str(src), connection="pd")
    assert for_push(second) == 0, second.as_dict()
    assert {obj: len(emulator.records(obj)) for obj in counts} == counts
    assert set(_calls(emulator).values()) == {1}


def test_lost_replies_never_duplicate_a_record_or_a_call(home: Path, tmp_path: Path) -> None:
    write_config(home, "pd", rate_limit=100000, search_rate_limit=100000)
    emulator = PipedriveEmulator(limits=False, faults=Faults(lost_ack_rate=0.15, seed=3))
    app = None
    for _ in range(20):  # connect's own requests may lose their replies too
        try:
            app = _app(emulator)
            break
        except Exception:
            continue
    assert app is not None
    src = _outcomes(tmp_path / "o.jsonl", 120, company_every=3, deal_every=4)
    for _ in range(8):
        summary = push(app, source=str(src), connection="pd")
        if summary.pending == 0 and summary.failed == 0:
            break
    assert for_push(summary) == 0, summary.as_dict()
    assert emulator.stats.dropped > 20  # replies really were lost
    calls = _calls(emulator)
    assert len(calls) == 120 and set(calls.values()) == {1}
    emails = Counter(p["emails"][0]["value"] for p in emulator.records("persons"))
    assert len(emails) == 120 and set(emails.values()) == {1}
    assert len(emulator.records("organizations")) == 7 and len(emulator.records("deals")) == 30


@pytest.mark.slow
def test_pull_stores_edits_creates_and_deletions_once_over_two_runs(home: Path) -> None:
    write_config(home, "pd", lookback_seconds=0)
    emulator = PipedriveEmulator(plan="growth")
    emulator.clock_offset = -600  # written ten minutes ago: past the pull's settling minute
    people = [emulator.create("persons", {"name": f"P{i}", "emails": [{"value": f"p{i}@x.org"}]}) for i in range(30)]
    org = emulator.create("organizations", {"name": "Acme"})
    deal = emulator.create("deals", {"title": "Big", "org_id": org["id"], "person_id": people[0]["id"]})
    app = _app(emulator)
    first = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert first.outcome == "ok"
    assert {o.object: o.created for o in first.objects} == {"contacts": 30, "companies": 1, "deals": 1}

    emulator.clock_offset = 0
    emulator.update("persons", people[1]["id"], {"first_name": "Renamed"})
    emulator.create("persons", {"name": "New", "emails": [{"value": "new@x.org"}]})
    emulator.delete("deals", deal["id"])
    time.sleep(1.1)  # whole seconds: the edits' second must be over before a window can end after it
    second = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert second.outcome == "ok"
    by = {o.object: o for o in second.objects}
    assert by["contacts"].created == 1 and by["contacts"].updated == 1
    assert by["deals"].archived == 1
    stored = {r.remote_id: r for r in app.store.mirror.records("pd", "contacts")}
    assert len(stored) == 31
    time.sleep(1.1)
    third = pull(app, objects=["contacts", "companies", "deals"])[0]
    assert all(o.created == o.updated == o.archived == 0 for o in third.objects)


def test_a_spent_daily_budget_stops_the_push_with_exit_75(home: Path, tmp_path: Path) -> None:
    emulator = PipedriveEmulator(plan="lite", seats=1)
    app = _app(emulator)
    emulator.tokens_used = emulator.daily_budget - 30
    summary = push(app, source=str(_outcomes(tmp_path / "o.jsonl", 10)), connection="pd")
    assert for_push(summary) == 75 and "budget" in (summary.error or "").lower()


@pytest.mark.parametrize("query", [{"api_token": "x"}, {}])
def test_the_emulator_refuses_a_token_in_the_query_string(query: dict[str, str]) -> None:
    emulator = PipedriveEmulator()
    client = httpx.Client(transport=emulator.transport(), base_url="http://pd.test")
    params = {**query}
    if query:
        params["api_token"] = emulator.api_token
    assert client.get("/v1/users/me", params=params).status_code == 401


@pytest.mark.slow
def test_every_request_and_answer_of_a_push_and_pull_fits_the_official_specs(home: Path, tmp_path: Path) -> None:
    from tests.openapi_check import SpecCheck

    emulator = PipedriveEmulator(plan="ultimate")
    checked = SpecCheck.pipedrive().wrap(emulator)
    app = App(transport=lambda name: checked)
    connect(
        app, provider="pipedrive", name="pd", base_url="http://pd.test", options={}, io=ScriptIO(emulator.api_token)
    )
    assert (
        push(
            app, source=str(_outcomes(tmp_path / "o.jsonl", 12, company_every=3, deal_every=4)), connection="pd"
        ).outcome
        == "ok"
    )
    assert (
        push(
            app, source=str(_outcomes(tmp_path / "o2.jsonl", 12, prefix="p", company_every=2)), connection="pd"
        ).outcome
        == "ok"
    )
    assert pull(app, objects=["contacts", "companies", "deals", "calls"])[0].outcome == "ok"
    assert checked.problems == [], "\n".join(checked.problems[:10])
    assert checked.unchecked == []
    assert checked.checked > 40


@pytest.mark.slow
def test_push_killed_30_times_logs_each_call_exactly_once(home: Path, tmp_path: Path) -> None:
    import random

    from tests.e2e import cli_env, run_cli
    from tests.test_resilience import _run_and_kill

    write_config(home, "pd", rate_limit=100000, search_rate_limit=100000, plan="ultimate", seats=50)
    emulator = PipedriveEmulator(limits=False, faults=Faults(latency_ms=5, seed=5))
    server = emulator.serve()
    try:
        env = cli_env(home, "pd", emulator.api_token)
        app = App()
        connect(app, provider="pipedrive", name="pd", base_url=server.url, options={}, io=ScriptIO(emulator.api_token))
        app.close()
        src = _outcomes(tmp_path / "o.jsonl", 500, company_every=3, deal_every=4)
        rng = random.Random(28)
        kills = 0
        for _ in range(30):
            code = _run_and_kill(
                ["--quiet", "push", str(src), "-c", "pd"],
                env,
                emulator,  # type: ignore[arg-type]  # only its request count is read
                after_requests=rng.randint(5, 120),
                then=rng.uniform(0, 0.1),
            )
            kills += code is None
        final = run_cli(["--json", "push", str(src), "-c", "pd"], env)
        assert final.code == 0, final.stderr
        assert kills >= 10
        calls = _calls(emulator)
        assert len(calls) == 500 and set(calls.values()) == {1}
        emails = Counter(p["emails"][0]["value"] for p in emulator.records("persons"))
        assert len(emails) == 500 and set(emails.values()) == {1}
        assert len(emulator.records("organizations")) == 7 and len(emulator.records("deals")) == 125
        assert len(_tasks(emulator)) == 100
    finally:
        server.stop()


def test_a_push_that_cannot_fit_the_budget_stops_before_its_first_write(home: Path, tmp_path: Path) -> None:
    write_config(home, "pd", plan="lite", seats=1, budget_share=0.01)  # 300 tokens
    emulator = PipedriveEmulator(plan="lite", seats=1)
    app = _app(emulator)
    writes = emulator.stats.writes
    summary = push(app, source=str(_outcomes(tmp_path / "o.jsonl", 10)), connection="pd")
    assert for_push(summary) == 75
    assert "may need up to" in (summary.error or "") and "may use 300" in (summary.error or "")
    assert emulator.stats.writes == writes  # nothing was sent


@pytest.mark.slow
def test_the_budget_left_today_is_the_plans_less_what_crmsyncs_runs_spent(home: Path, tmp_path: Path) -> None:
    """A push that fits the plan's share but not what is left after today's runs stops before writing."""
    write_config(home, "pd", plan="lite", seats=1, budget_share=0.5)  # 15,000 tokens may be used
    emulator = PipedriveEmulator(plan="lite", seats=1)
    app = _app(emulator)
    first = push(app, source=str(_outcomes(tmp_path / "a.jsonl", 10)), connection="pd")
    assert for_push(first) == 0
    spent = app.store.runs.recent("pd", limit=1)[0].counts["_api_usage"]["used"]
    assert spent > 0
    provider = app.provider(app.connection("pd"))
    provider.check_budget({"calls": 10}, spent_today=0)  # fits the whole day's share
    with pytest.raises(RetriableError, match=r"left today .* crmsync spent 29,990 today"):
        provider.check_budget({"calls": 10}, spent_today=29_990)
    writes = emulator.stats.writes
    app.store.runs.finish(
        app.store.runs.start("pd", "push", mapping_hash=None),
        status="ok",
        counts={"_api_usage": {"unit": "tokens", "window": "day", "scope": "run", "used": 29_900}},
        stats={},
        error=None,
    )
    summary = push(app, source=str(_outcomes(tmp_path / "b.jsonl", 10, prefix="b")), connection="pd")
    assert for_push(summary) == 75 and "left today" in (summary.error or "")
    assert emulator.stats.writes == writes  # nothing was sent


def test_calls_and_follow_ups_are_owned_by_the_rep_or_the_connection_user(home: Path, tmp_path: Path) -> None:
    emulator = PipedriveEmulator(plan="ultimate")
    app = _app(emulator)
    lines = []
    for i, owner in enumerate(["rep1@example.com", "REP2@example.com", "nobody@example.com", None]):
        o: dict[str, Any] = {
            "id": f"own-{i}",
            "occurred_at": "2026-12-01T10:00:00+00:00",
            "contact": {"email": f"c{i}@example.org"},
            "disposition": "connected",
            "next_step": {"type": "call", "due_at": "2026-12-09T09:00:00+00:00"},
        }
        if owner:
            o["owner_email"] = owner
        lines.append(json.dumps(o))
    src = tmp_path / "o.jsonl"
    src.write_text("\n".join(lines) + "\n")
    summary = push(app, source=str(src), connection="pd")
    assert for_push(summary) == 0, summary.as_dict()
    owners = {marker_of(a["note"]): a["owner_id"] for a in emulator.records("activities")}
    assert owners == {
        "own-0": 2,
        "own-0:task": 2,
        "own-1": 3,
        "own-1:task": 3,
        "own-2": 1,
        "own-2:task": 1,
        "own-3": 1,
        "own-3:task": 1,
    }
    assert summary.owners_defaulted == 1
