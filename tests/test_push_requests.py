"""What a HubSpot push asks of the CRM besides its writes, and the outbox's fast paths.

Every request a push sends that is not a write takes a turn of the rate window its writes need,
so these count them: one request per idempotency property, one for the default owner.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.app import App
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.errors import FatalProviderError
from crmsync.http import SlidingWindow
from crmsync.model import CallOutcome
from crmsync.store.outbox import Outbox, digest_and_payload
from crmsync.sync.inputs import read_outcomes
from crmsync.sync.push import PushSummary, enqueue, push
from crmsync.sync.push.lookahead import count_from_answers
from tests.e2e import hubspot_app
from tests.test_push import outcome as base_outcome
from tests.test_push import write


def outcome(i: int, **over: Any) -> dict[str, Any]:
    """``tests.test_push.outcome`` with a company on every second and a deal on every third."""
    o = base_outcome(i)
    if i % 2 == 0:
        o["company"] = {"name": f"Co {i}", "domain": f"co{i}.example.com"}
    if i % 3 == 0:
        o["deal"] = {"name": f"Deal {i}", "amount": 100 + i}
    o.update(over)
    return o


class Recorder:
    """The emulator's transport, recording each request (and answering some differently)."""

    def __init__(self, emu: HubSpotEmulator) -> None:
        self.inner = emu.transport()
        self.seen: list[tuple[str, str]] = []
        self.answer: dict[tuple[str, str], list[httpx.Response]] = {}

    def __call__(self, _name: str) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        key = (request.method, request.url.path)
        self.seen.append(key)
        if self.answer.get(key):
            return self.answer[key].pop(0)
        return self.inner.handle_request(request)

    def counts(self) -> Counter[str]:
        return Counter(f"{m} {p}" for m, p in self.seen)


BAD_GROUP = httpx.Response(400, json={"status": "error", "category": "VALIDATION_ERROR", "message": "no such group"})


@pytest.fixture
def emu() -> HubSpotEmulator:
    return HubSpotEmulator(seed=7)


@pytest.fixture
def rec(emu: HubSpotEmulator) -> Recorder:
    return Recorder(emu)


@pytest.fixture
def app(emu: HubSpotEmulator, rec: Recorder) -> Iterator[App]:
    a = hubspot_app("http://hubspot.test", emu.private_app_token, transport=rec)
    rec.seen.clear()  # what connect asked is not the push's
    yield a
    a.close()


def test_a_first_push_creates_each_marker_property_in_one_request_and_asks_one_for_the_owner(
    app: App, rec: Recorder, emu: HubSpotEmulator, tmp_path: Path
) -> None:
    summary = push(app, source=str(write(tmp_path, [outcome(i) for i in range(12)])), connection="hs")
    assert (summary.created, summary.failed) == (12, 0), summary
    counts = rec.counts()
    props = {k: v for k, v in counts.items() if "/crm/v3/properties/" in k}
    assert props == {
        "POST /crm/v3/properties/calls": 1,
        "POST /crm/v3/properties/companies": 1,
        "POST /crm/v3/properties/deals": 1,
    }
    # The user behind the token was kept at connect: the owners list alone names the default owner.
    assert counts["POST /oauth/v2/private-apps/get/access-token-info"] == 0
    assert counts["GET /crm/v3/owners/"] == 1
    assert {c["properties"].get("hubspot_owner_id") for c in emu.records("calls")} != {None}


def test_a_marker_property_in_a_group_the_portal_lacks_is_made_in_one_it_lists(
    app: App, rec: Recorder, emu: HubSpotEmulator, tmp_path: Path
) -> None:
    rec.answer[("POST", "/crm/v3/properties/calls")] = [BAD_GROUP]
    summary = push(app, source=str(write(tmp_path, [outcome(1)])), connection="hs")
    assert (summary.created, summary.failed) == (1, 0), summary
    calls = [k for k in rec.seen if k[1] == "/crm/v3/properties/calls"]
    assert calls == [
        ("POST", "/crm/v3/properties/calls"),
        ("GET", "/crm/v3/properties/calls"),
        ("POST", "/crm/v3/properties/calls"),
    ]
    assert emu.records("calls")[0]["properties"].get("crmsync_outcome_id") == "o-1"


def test_a_marker_property_that_exists_is_read_back_and_a_refusal_of_anything_else_stops_the_push(
    app: App, rec: Recorder, tmp_path: Path
) -> None:
    provider = app.provider(app.connection("hs"))
    provider.prepare_objects(["calls"])
    rec.seen.clear()
    app._providers.clear()  # a later run's provider: nothing cached
    again = app.provider(app.connection("hs"))
    again.prepare_objects(["calls"])
    assert rec.seen == [("POST", "/crm/v3/properties/calls"), ("GET", "/crm/v3/properties/calls")]
    rec.answer[("POST", "/crm/v3/properties/deals")] = [BAD_GROUP, BAD_GROUP]
    with pytest.raises(FatalProviderError, match=r"deals\.crmsync_deal_key \(400\)"):
        again.prepare_objects(["deals"])


def test_a_push_counts_its_rate_windows_from_the_answers_and_puts_them_back() -> None:
    class Http:
        buckets = {"default": SlidingWindow(100, 10.0), "search": SlidingWindow(5, 1.0, from_answers=False)}

    class Provider:
        http = Http()

    restore = count_from_answers(Provider())  # type: ignore[arg-type]
    assert all(b.from_answers for b in Http.buckets.values())
    restore()  # as a pull by the same provider afterwards needs them
    assert [b.from_answers for b in Http.buckets.values()] == [True, False]


def test_a_push_leaves_the_providers_windows_as_it_found_them(app: App, tmp_path: Path) -> None:
    provider = app.provider(app.connection("hs"))
    search = provider.http.buckets["search"]
    assert isinstance(search, SlidingWindow) and not search.from_answers
    push(app, source=str(write(tmp_path, [outcome(i) for i in range(3)])), connection="hs")
    assert not search.from_answers


def test_the_queued_payload_and_hash_are_the_outcomes_own() -> None:
    for raw in (outcome(2, notes="ü → “quoted”", custom={"b": 1, "a": 'x"y', "c": None}), outcome(3)):
        o = CallOutcome.model_validate(raw)
        dumped = o.model_dump(mode="json")
        digest, payload = digest_and_payload(dumped)
        assert digest == o.content_hash()
        assert json.loads(payload.text) == dumped and payload.value is dumped


def test_a_claim_reads_the_rows_as_queued_and_only_this_connections(app: App, tmp_path: Path) -> None:
    from datetime import timedelta

    outbox = Outbox(app.store)
    for name, n in (("hs", 5), ("other", 3)):
        summary = PushSummary(name, "hubspot")
        src = write(tmp_path, [outcome(i, id=f"{name}-{i}") for i in range(n)])
        enqueue(app, name, read_outcomes(str(src), "auto"), summary, update=False, rejects=None, sink=None)
    rows = outbox.claim("hs", 0, "me", limit=3, lease=timedelta(minutes=1))
    assert [r.outcome_id for r in rows] == ["hs-0", "hs-1", "hs-2"]
    assert all(r.steps == {} and r.in_flight == {} and r.claimed_by == "me" for r in rows)
    assert rows[0].payload is not None and rows[0].payload["id"] == "hs-0"
    full = outbox.rows("hs", ["hs-0"])["hs-0"]  # the ORM's reading of the same row
    assert (rows[0].updated_at, rows[0].claimed_at, rows[0].attempts) == (full.updated_at, full.claimed_at, 0)
    rows[0].steps["contacts"] = "1"  # a row's JSON is its own, not shared with the next
    assert rows[1].steps == {}
    rest = outbox.claim("hs", rows[-1].id, "me", limit=10, lease=timedelta(minutes=1))
    assert [r.outcome_id for r in rest] == ["hs-3", "hs-4"]
    assert outbox.state_counts("other") == {"pending": 3}
    assert outbox.claim("other", 0, "x", limit=10, lease=timedelta(minutes=1))[0].claimed_by == "x"


def test_a_lane_that_dies_before_its_close_leaves_its_calls_in_flight_and_the_rerun_logs_none_twice(
    app: App, emu: HubSpotEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last activity step's results are committed with the lane's close: until then the rows'
    in-flight marks (committed before the send) are what a re-run finds them by."""
    from crmsync.sync.push import lanes

    def dies(*_a: Any, **_k: Any) -> Any:
        # Each lane dies at its close once every lane's calls are logged: a lane that died first
        # would stop the others before their calls (which lane closes first is timing).
        deadline = time.monotonic() + 10.0
        while len(emu.records("calls")) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(lanes, "settle", dies)
    src = write(tmp_path, [outcome(i) for i in range(6)])
    first = push(app, source=str(src), connection="hs")
    assert first.interrupted and len(emu.records("calls")) == 6
    rows = Outbox(app.store).rows("hs", [f"o-{i}" for i in range(6)])
    assert all("calls" in r.in_flight and "calls" not in r.steps for r in rows.values())
    monkeypatch.undo()
    again = push(app, source=None, connection="hs")
    assert (again.failed, again.pending) == (0, 0), again
    assert len(emu.records("calls")) == 6
    assert {r.state for r in Outbox(app.store).rows("hs", [f"o-{i}" for i in range(6)]).values()} == {"done"}


def test_a_calls_batch_whose_answer_was_lost_is_confirmed_while_the_lanes_other_batches_are_out(
    app: App, rec: Recorder, emu: HubSpotEmulator, tmp_path: Path
) -> None:
    """Each batch is confirmed as soon as its own answer is in: one left unsure in one rate window
    is not confirmed only after the lane's last batch (at the end of the push, with a chain after it)."""
    import time

    create = ("POST", "/crm/v3/objects/calls/batch/create")
    done: list[tuple[str, str]] = []
    inner = rec.inner
    lost: list[str] = []

    class SlowOrLost:
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            key = (request.method, request.url.path)
            first = key == create and not lost
            if first:
                lost.append("the first calls batch")
            response = inner.handle_request(request)
            if first:
                raise httpx.RemoteProtocolError("the answer was lost")  # written, its answer lost
            if key == create:
                time.sleep(0.3)  # the lane's other batches answer later
            done.append(key)
            return response

    rec.inner = SlowOrLost()  # type: ignore[assignment]
    rows = [outcome(i) for i in range(1, 251)]
    for r in rows:  # one lane: no company or deal to wait for
        r.pop("company", None)
        r.pop("deal", None)
    summary = push(app, source=str(write(tmp_path, rows)), connection="hs")
    assert (summary.created, summary.failed) == (250, 0), summary
    assert len(emu.records("calls")) == 250
    read = done.index(("POST", "/crm/v3/objects/calls/batch/read"))
    assert read < max(i for i, k in enumerate(done) if k == create), done
