"""The push engine, one module at a time, against the HubSpot emulator plugged in through ``transport()``.

Knobs (round, lane and chunk sizes, confirmation rounds, attempts, lease) are passed as
``PushSettings``, never patched into the modules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.app import App
from crmsync.cli.exits import for_push
from crmsync.emulators.base import Faults
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.errors import UsageError
from crmsync.store.outbox import Outbox, OutboxRow
from crmsync.sync.inputs import read_outcomes
from crmsync.sync.push import PushSettings, PushSummary, Receipt, dry_run, enqueue, push, receipt
from crmsync.sync.push.intake import Hooks, verdict
from crmsync.sync.push.items import Item, entity_key, parse_row
from crmsync.sync.push.lanes import LaneLookups, settle, split_lanes
from crmsync.sync.push.owners import Owners
from crmsync.sync.push.receipts import Tally, readable
from tests.e2e import hubspot_app


def outcome(i: int, **over: Any) -> dict[str, Any]:
    o: dict[str, Any] = {
        "id": f"o-{i}",
        "occurred_at": "2026-11-20T10:00:00Z",
        "contact": {"email": f"p{i}@example.org", "last_name": f"N{i}"},
        "disposition": "connected",
    }
    o.update(over)
    return o


def write(tmp_path: Path, rows: list[dict[str, Any]], name: str = "o.jsonl") -> Path:
    src = tmp_path / name
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


@pytest.fixture
def emu() -> HubSpotEmulator:
    return HubSpotEmulator(seed=7)


@pytest.fixture
def app(emu: HubSpotEmulator) -> Iterator[App]:
    a = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    yield a
    a.close()


def queue(app: App, src: Path, **kw: Any) -> PushSummary:
    summary = PushSummary("hs", "hubspot")
    enqueue(app, "hs", read_outcomes(str(src), "auto"), summary, update=False, rejects=None, sink=None, **kw)
    return summary


def row(n: int, steps: dict[str, Any] | None = None) -> OutboxRow:
    return OutboxRow(n, f"o-{n}", "pending", steps or {}, {}, 0, None, False, datetime.now(UTC), None, None, None)


# -- store/outbox.py ------------------------------------------------------------------------------
def test_outbox_claims_in_id_order_hands_back_and_counts(app: App, tmp_path: Path) -> None:
    queue(app, write(tmp_path, [outcome(i) for i in range(5)]))
    outbox = Outbox(app.store)
    assert outbox.count_pending("hs") == 5 and outbox.state_counts("hs") == {"pending": 5}
    first = outbox.claim("hs", 0, "me", limit=2, lease=timedelta(minutes=1))
    assert [r.outcome_id for r in first] == ["o-0", "o-1"] and all(r.payload for r in first)
    assert [r.outcome_id for r in outbox.peek("hs", first[-1].id, 10)] == ["o-2", "o-3", "o-4"]
    skipped = outbox.claim("hs", first[-1].id, "me", limit=10, lease=timedelta(minutes=1), have={"o-2"})
    assert [r.payload is None for r in skipped] == [True, False, False]  # o-2's payload is not read
    outbox.release([r.id for r in first], "someone else")  # not theirs to hand back
    assert outbox.rows("hs", ["o-0"])["o-0"].claimed_by == "me"
    outbox.release([r.id for r in first], "me")
    assert outbox.rows("hs", ["o-0"])["o-0"].claimed_by is None
    first[0].state, first[0].last_error = "failed", "no"
    outbox.save(first[:1])
    assert outbox.state_counts("hs") == {"pending": 4, "failed": 1}
    assert outbox.queued_ids("hs", ["failed"]) == {"o-0"}
    outbox.reset_failed("hs")
    assert outbox.count_pending("hs") == 5 and outbox.row("hs", "o-0").state == "pending"  # type: ignore[union-attr]


def test_shared_outbox_claims_skip_live_leases_and_take_dead_or_stale_ones(app: App, tmp_path: Path) -> None:
    """The PostgreSQL rule, judged with an injected liveness check: a live run's fresh claim is
    skipped, a dead run's or a stale one is taken over."""
    queue(app, write(tmp_path, [outcome(i) for i in range(3)]))
    outbox = Outbox(app.store)
    lease = timedelta(minutes=10)
    outbox.claim("hs", 0, "alive", limit=1, lease=lease)
    outbox.claim("hs", 1, "dead", limit=1, lease=lease)
    asked: list[list[str]] = []

    def dead_owners(_s: Any, owners: Any) -> list[str]:
        asked.append(sorted(owners))
        return ["dead"]

    got = outbox.claim("hs", 0, "me", limit=10, lease=lease, dead_owners=dead_owners)
    assert [r.outcome_id for r in got] == ["o-1", "o-2"] and asked == [["alive", "dead"]]
    stale = outbox.claim("hs", 0, "me", limit=10, lease=timedelta(seconds=-1), dead_owners=lambda _s, _o: [])
    assert [r.outcome_id for r in stale] == ["o-0", "o-1", "o-2"]  # every lease older than a negative one


# -- intake.py --------------------------------------------------------------------------------------
def test_verdict_new_unchanged_conflict_update_and_failed_before() -> None:
    class Prior:
        def __init__(self, digest: str, state: str) -> None:
            self.content_hash, self.state = digest, state

    seen: dict[str, str] = {}
    assert verdict("a", "h1", None, seen, update=False, retry_failed=False) == "new"
    assert verdict("a", "h1", None, seen, update=False, retry_failed=False) == "unchanged"  # twice in one input
    assert verdict("a", "h2", None, seen, update=True, retry_failed=False) == "conflict"  # the input's own first
    assert verdict("b", "h2", Prior("h1", "done"), {}, update=False, retry_failed=False) == "conflict"
    assert verdict("b", "h2", Prior("h1", "done"), {}, update=True, retry_failed=False) == "update"
    assert verdict("c", "h1", Prior("h1", "failed"), {}, update=False, retry_failed=False) == "failed"
    assert verdict("c", "h1", Prior("h1", "failed"), {}, update=False, retry_failed=True) == "retry"


def test_enqueue_tells_its_hooks_each_part_and_keeps_one_round_parsed(app: App, tmp_path: Path) -> None:
    rows = [outcome(i, company={"name": f"Co {i}", "domain": f"co{i}.example"} if i >= 4 else None) for i in range(7)]
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows] + [{"id": "bad"}]
    ids: list[list[str]] = []
    objects: list[set[str]] = []
    parts: list[int] = []
    parsed: dict[str, Any] = {}
    hooks = Hooks(parsed, objects.append, lambda kept: parts.append(len(kept)), ids.append)
    summary = queue(app, write(tmp_path, rows), hooks=hooks, settings=PushSettings(enqueue_chunk=3, round_size=5))
    assert (summary.read, summary.valid, summary.rejected, summary.queued) == (8, 7, 1, 7)
    assert ids == [["o-0", "o-1", "o-2"], ["o-3", "o-4", "o-5"], ["o-6"]]
    assert sorted(parsed) == [f"o-{i}" for i in range(5)]  # one round's worth, not the whole input
    assert parts == [3, 2]  # the outcomes kept parsed, per part
    assert objects == [{"contacts", "calls"}, {"contacts", "calls", "companies"}]  # told when the set grew
    again = queue(app, write(tmp_path, rows[:2]))
    assert (again.queued, again.already) == (0, 2)


def test_enqueue_of_a_changed_outcome_is_a_conflict_and_with_update_queued_again(app: App, tmp_path: Path) -> None:
    push(app, source=str(write(tmp_path, [outcome(1)])), connection="hs")
    changed = write(tmp_path, [outcome(1, notes="changed")], "c.jsonl")
    got: list[Receipt] = []
    conflict = push(app, source=str(changed), connection="hs", sink=got.append)
    assert (conflict.conflicts, for_push(conflict)) == (1, 1) and got[0].status == "conflict"
    updated = push(app, source=str(changed), connection="hs", update=True)
    assert (updated.updated, for_push(updated)) == (1, 0)
    assert receipt(app, "hs", "o-1").status == "updated"


# -- dry_run.py -------------------------------------------------------------------------------------
def test_dry_run_plans_from_the_mirror_without_a_request_or_a_queued_row(
    app: App, emu: HubSpotEmulator, tmp_path: Path
) -> None:
    push(app, source=str(write(tmp_path, [outcome(1)])), connection="hs")
    writes = emu.stats.writes
    src = write(tmp_path, [outcome(1), outcome(2), {"id": "bad"}], "d.jsonl")
    summary = PushSummary("hs", "hubspot", dry_run=True)
    got: list[Receipt] = []
    conn = app.connection("hs")
    dry_run(app, conn, app.mapping(conn), read_outcomes(str(src), "auto"), summary, sink=got.append, rejects=None)
    assert [(r.id, r.status) for r in got] == [(None, "rejected"), ("o-1", "planned"), ("o-2", "planned")]
    assert got[1].plan == {"contacts": "skip", "calls": "skip"}  # unchanged: nothing to send
    assert got[2].plan == {"contacts": "create", "calls": "create"}
    assert summary.plan_counts == {"contacts": {"skip": 1, "create": 1}, "calls": {"skip": 1, "create": 1}}
    assert emu.stats.writes == writes and Outbox(app.store).row("hs", "o-2") is None


# -- lanes.py ---------------------------------------------------------------------------------------
def test_lanes_keep_outcomes_sharing_a_record_together_and_respect_the_lane_size() -> None:
    def item(n: int, email: str, domain: str | None = None) -> Item:
        canon: dict[str, dict[str, Any]] = {"contacts": {"email": email}, "calls": {}}
        if domain:
            canon["companies"] = {"domain": domain}
        return Item(row(n), datetime.now(UTC), canon)

    items = [item(0, "a@x.io"), item(1, "b@x.io", "b.example"), item(2, "a@x.io"), item(3, "c@x.io", "b.example")]
    items += [item(n, f"{n}@x.io") for n in range(4, 8)]
    lanes = split_lanes(items, lane_size=3)
    assert [[it.row.id for it in lane] for lane in lanes] == [[0, 2, 4], [5, 6, 7], [1, 3]]
    assert split_lanes(items, split=False) == [items]
    assert len(split_lanes(items, lane_size=100)) == 2  # a company first, or not


def test_lane_lookups_take_the_look_up_they_are_given_and_share_a_call_among_small_lanes() -> None:
    calls: list[tuple[str, list[int]]] = []

    def look_up(app: Any, conn: Any, provider: Any, mapping: Any, part: list[Item], obj: str, ahead: Any) -> dict:
        calls.append((obj, [it.row.id for it in part]))
        return {}

    limits = type("Limits", (), {"lookup_batch": lambda self, obj, kind: 2})()
    lanes = [[Item(row(n), datetime.now(UTC), {"contacts": {"email": f"{n}@x.io"}})] for n in range(3)]
    lookups = LaneLookups(None, None, limits, None, threads=False, look_up=look_up)  # type: ignore[arg-type]
    started = lookups.start(lanes)
    assert [ids for obj, ids in calls if obj == "contacts"] == [[0, 1], [2]]  # two keys a call
    assert started[0][1]["contacts"] is started[1][1]["contacts"]


# -- steps.py ---------------------------------------------------------------------------------------
def test_an_entity_the_crm_holds_is_matched_and_its_kept_field_recorded_as_a_conflict(
    app: App, emu: HubSpotEmulator, tmp_path: Path
) -> None:
    emu.bulk_create("contacts", 1, properties_fn=lambda i: {"email": "p1@example.org", "lastname": "Old"})
    summary = push(app, source=str(write(tmp_path, [outcome(1)])), connection="hs")
    assert (summary.created, summary.field_conflicts) == (1, 1), summary
    contacts = emu.records("contacts")
    assert len(contacts) == 1 and contacts[0]["properties"]["lastname"] == "Old"  # fill-empty: the CRM's stays
    assert len(emu.records("calls")) == 1


def test_companies_and_deals_shared_by_outcomes_are_written_once_and_linked(
    app: App, emu: HubSpotEmulator, tmp_path: Path
) -> None:
    shared = {"contact": {"email": "p0@example.org"}, "company": {"name": "Acme", "domain": "acme.example"}}
    rows = [outcome(i, **shared, deal={"name": "Big", "amount": 10}) for i in range(4)]
    summary = push(app, source=str(write(tmp_path, rows)), connection="hs", settings=PushSettings(lane_size=1))
    assert (summary.created, summary.failed) == (4, 0), summary
    assert [len(emu.records(o)) for o in ("contacts", "companies", "deals", "calls")] == [1, 1, 1, 4]
    ids = receipt(app, "hs", "o-3").remote_ids
    assert ids["companies"] == emu.records("companies")[0]["id"] and ids["deals"] == emu.records("deals")[0]["id"]


# -- confirm.py -------------------------------------------------------------------------------------
def lost_first(path_end: str) -> Faults:
    lost: list[str] = []

    def lose(request: httpx.Request) -> bool:
        if request.method == "POST" and request.url.path.endswith(path_end) and not lost:
            lost.append(request.url.path)
            return True
        return False

    return Faults(lose_reply=lose)


@pytest.mark.parametrize(("rounds", "created"), [(4, 3), (1, 3), (0, 0)])
def test_a_call_whose_answer_was_lost_is_looked_up_not_sent_twice(tmp_path: Path, rounds: int, created: int) -> None:
    """With a confirmation round the lost write is found by marker (ours: created); with none,
    nothing is sent and the outcomes stay queued for the next run."""
    emu = HubSpotEmulator(seed=7, faults=lost_first("/calls/batch/create"))
    app = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    try:
        src = write(tmp_path, [outcome(i) for i in range(3)])
        summary = push(app, source=str(src), connection="hs", settings=PushSettings(confirm_rounds=rounds))
        assert summary.created == created, summary
        assert len(emu.records("calls")) == (3 if rounds else 0)
        again = push(app, source=None, connection="hs")
        assert summary.created + again.created == 3 and len(emu.records("calls")) == 3  # never twice
    finally:
        app.close()


def test_a_call_logged_from_another_store_is_already_there(tmp_path: Path, emu: HubSpotEmulator) -> None:
    src = write(tmp_path, [outcome(1)])
    first = hubspot_app("http://hubspot.test", emu.private_app_token, transport=lambda _n: emu.transport())
    assert push(first, source=str(src), connection="hs").created == 1
    first.close()
    other = hubspot_app(
        "http://hubspot.test",
        emu.private_app_token,
        db=str(tmp_path / "other.db"),
        transport=lambda _n: emu.transport(),
    )
    try:
        again = push(other, source=str(src), connection="hs")
        assert (again.already, again.created, len(emu.records("calls"))) == (1, 0, 1)
        assert receipt(other, "hs", "o-1").status == "already"
    finally:
        other.close()


# -- owners.py --------------------------------------------------------------------------------------
def test_owner_email_of_a_rep_is_resolved_and_an_unknown_one_defaulted_or_failed(
    app: App, emu: HubSpotEmulator, tmp_path: Path
) -> None:
    rows = [outcome(1, owner_email="Ada.Rep@example.com"), outcome(2, owner_email="nobody@example.com")]
    src = write(tmp_path, rows)
    summary = push(app, source=str(src), connection="hs")
    assert (summary.created, summary.owners_defaulted) == (2, 1), summary
    strict_rows = [outcome(3, owner_email="nobody@example.com")]
    strict = push(app, source=str(write(tmp_path, strict_rows, "s.jsonl")), connection="hs", strict_owners=True)
    assert (strict.failed, strict.created) == (1, 0)
    assert "nobody@example.com" in (receipt(app, "hs", "o-3").error or "")


def test_owners_leave_records_alone_when_the_provider_maps_owners_itself() -> None:
    class NoOwners:
        http = None

        def resolve_owners(self, emails: list[str]) -> dict[str, str]:
            raise NotImplementedError

        def default_owner(self) -> str | None:
            return "me"

    canon = {"calls": {"owner_email": "rep@x.io"}}
    item = Item(row(1), datetime.now(UTC), canon)
    summary = PushSummary("c", "none")
    Owners(NoOwners(), strict=True).apply([item], summary)  # type: ignore[arg-type]
    assert canon["calls"]["owner_email"] == "rep@x.io" and not item.failed


# -- receipts.py ------------------------------------------------------------------------------------
def test_receipt_of_an_id_never_queued_is_a_usage_error(app: App) -> None:
    with pytest.raises(UsageError, match="no outcome 'x'"):
        receipt(app, "hs", "x")


def test_tally_keeps_a_few_reasons_and_counts_the_backlog_apart() -> None:
    summary = PushSummary("c", "p")
    got: list[Receipt] = []
    tally = Tally(summary, got.append, backlog={"old", "mine"})
    tally.in_input(["mine"])
    for n in range(7):
        tally(Receipt(None, "rejected", error=f"bad {n}"))
    tally(Receipt("old", "created"))
    tally(Receipt("mine", "created"))
    summary.created = 2
    tally.split_backlog()
    assert len(summary.reject_reasons) == 5 and len(got) == 9
    assert (summary.backlog, summary.created) == ({"created": 1}, 1)
    message = 'Property values were not valid: [{"message": "a"}, {"message": "b"}]'
    assert readable(message) == "Property values were not valid: a; b"
    assert readable("plain [not json") == "plain [not json"


# -- rounds.py and command.py -----------------------------------------------------------------------
def test_small_rounds_deliver_everything_with_progress_per_round(
    app: App, emu: HubSpotEmulator, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []
    src = write(tmp_path, [outcome(i) for i in range(7)])
    summary = push(
        app,
        source=str(src),
        connection="hs",
        progress=lambda d, t: seen.append((d, t)),
        settings=PushSettings(round_size=3),
    )
    assert (summary.created, summary.pending, for_push(summary)) == (7, 0, 0)
    assert seen == [(3, 7), (6, 7), (7, 7)]
    assert len(emu.records("calls")) == 7
    run = app.store.runs.last("hs", "push")
    assert run is not None and run.status == "ok"


@pytest.mark.parametrize(("max_attempts", "status"), [(5, "queued"), (1, "failed")])
def test_an_outcome_failing_temporarily_is_queued_until_its_attempts_run_out(
    app: App, tmp_path: Path, max_attempts: int, status: str
) -> None:
    queue(app, write(tmp_path, [outcome(1)]))
    outbox = Outbox(app.store)
    (claimed,) = outbox.claim("hs", 0, "me", limit=1, lease=timedelta(minutes=1))
    item = parse_row(claimed)
    item.failed, claimed.attempts, claimed.last_error = True, 1, "calls: HTTP 503"
    summary = PushSummary("hs", "hubspot")
    (closed,) = settle(app, [item], summary, max_attempts=max_attempts)
    assert (closed.status, closed.error) == (status, "calls: HTTP 503")
    assert (summary.requeued, summary.failed) == ((1, 0) if status == "queued" else (0, 1))
    stored = outbox.row("hs", "o-1")
    assert (
        stored is not None
        and stored.claimed_by is None
        and stored.state == ("pending" if status == "queued" else "failed")
    )
    assert receipt(app, "hs", "o-1").status == status


def test_push_settings_are_frozen_with_the_commands_defaults() -> None:
    settings = PushSettings()
    assert (settings.round_size, settings.lane_size, settings.confirm_rounds) == (10_000, 1000, 4)
    with pytest.raises(AttributeError):
        settings.lane_size = 1  # type: ignore[misc]


def test_entity_key_of_each_object() -> None:
    canon = {"contacts": {"email": "A@X.io"}, "companies": {"domain": "x.io"}, "deals": {"key": "d-1"}}
    assert entity_key("contacts", canon) == "email:a@x.io"
    assert entity_key("companies", canon) == "domain:x.io"
    assert entity_key("deals", canon) == "key:d-1"
    assert entity_key("deals", {"deals": {"name": "no key"}}) is None


# -- the order of a push's requests ----------------------------------------------------------------
def test_every_call_is_sent_only_after_the_contact_and_deal_it_links_to_were_written(tmp_path: Path) -> None:
    """Lanes run side by side and calls go whenever a turn is free, but never ahead of the records
    they reference: each call's contact (and deal) id came back in an answer before the call left."""
    import threading
    import time

    emu = HubSpotEmulator(seed=7)
    inner = emu.transport()
    lock = threading.Lock()
    written: dict[str, float] = {}  # remote id -> when the answer that holds it came back
    early: list[str] = []
    checked: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        path, sent = request.url.path, time.monotonic()
        if path.endswith(("/calls/batch/create", "/deals/batch/create", "/deals/batch/upsert")):
            for item in json.loads(request.content).get("inputs", []):
                for assoc in item.get("associations", []):
                    target = str(assoc["to"]["id"])
                    with lock:
                        checked.append(path)
                        if written.get(target, sent + 1) > sent:
                            early.append(f"{path} -> {target}")
        response = inner.handle_request(request)
        if request.method == "POST" and "/batch/" in path and not path.endswith(("/search", "/read")):
            response.read()
            with lock:
                for r in response.json().get("results", []):
                    written.setdefault(str(r["id"]), time.monotonic())
        return response

    app = hubspot_app(
        "http://hubspot.test",
        emu.private_app_token,
        db=str(tmp_path / "crmsync.db"),  # a file: lanes run on threads of their own
        transport=lambda _n: httpx.MockTransport(handle),
    )
    try:
        rows = [
            outcome(
                i,
                contact={"email": f"p{i}@example.org"},
                **({"company": {"name": f"Co {i}", "domain": f"co{i}.example"}} if i % 2 else {}),
                **({"deal": {"name": f"Deal {i}", "amount": i}} if i % 3 == 0 else {}),
            )
            for i in range(60)
        ]
        summary = push(app, source=str(write(tmp_path, rows)), connection="hs", settings=PushSettings(lane_size=7))
        general = app.provider(app.connection("hs")).http.buckets["default"]
        assert getattr(general, "reserved", None) == 0  # every lane gave back the turns it kept for its next step
    finally:
        app.close()
    assert (summary.created, summary.failed) == (60, 0), summary
    assert len(emu.records("calls")) == 60
    assert early == []
    assert sum(p.endswith("/calls/batch/create") for p in checked) >= 60  # every call links its contact
