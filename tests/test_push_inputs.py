"""push: validation of bad inputs, --strict, rejects, dry-run plans, receipts, conflicts, --update."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from crmsync.cli.exits import for_push
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.errors import InputError
from crmsync.sync.inputs import read_outcomes
from crmsync.sync.push import push, receipt
from tests.e2e import hubspot_app

GOOD = {
    "id": "g1",
    "occurred_at": "2026-11-20T10:00:00+01:00",
    "contact": {"email": "a@example.com"},
    "disposition": "connected",
}


def line(**over: object) -> str:
    return json.dumps({**GOOD, **over})


@pytest.fixture
def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    emulator = HubSpotEmulator(seed=1)
    app = hubspot_app("http://hubspot.test", emulator.private_app_token, transport=lambda name: emulator.transport())
    app.emulator = emulator  # type: ignore[attr-defined]
    yield app
    app.close()


BAD_CASES = [
    ("invalid json", '{"id": "x", ', "invalid JSON"),
    ("missing contact", json.dumps({k: v for k, v in GOOD.items() if k != "contact"}), "contact: required"),
    ("bad email", line(contact={"email": "not-an-email"}), "contact.email: not an email address"),
    ("no email or phone", line(contact={"first_name": "A"}), "contact: a contact needs an email or a phone"),
    ("unknown disposition", line(disposition="maybe"), "disposition: unknown value 'maybe'"),
    ("wrong type", line(duration_seconds="long"), "duration_seconds:"),
    ("naive time", line(occurred_at="2026-11-20T10:00:00"), "occurred_at: needs a UTC offset"),
    ("unknown field", line(colour="red"), "colour: unknown field"),
    ("huge notes", line(notes="x" * 10_000_000), "notes: too long"),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_each_bad_record_names_file_line_and_field(tmp_path: Path, name: str, text: str, expected: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(line(id="ok1") + "\n" + text + "\n")
    parsed = list(read_outcomes(str(src)))
    assert parsed[0].outcome is not None
    err = parsed[1].error
    assert err is not None
    assert str(err).startswith(f"{src}:2: ")
    assert expected in str(err)


def test_bom_crlf_and_truncated_last_line(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(codecs.BOM_UTF8 + (line(id="a") + "\r\n" + line(id="b") + "\r\n" + line(id="c")[:30]).encode())
    parsed = list(read_outcomes(str(src)))
    assert [p.outcome.id for p in parsed[:2] if p.outcome] == ["a", "b"]
    assert parsed[2].error is not None and ":3: invalid JSON" in str(parsed[2].error)


def test_non_utf8_bytes_are_an_error_on_their_line(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(line(id="a").encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    parsed = list(read_outcomes(str(src)))
    assert parsed[0].outcome is not None
    assert "not UTF-8" in str(parsed[1].error) and ":2:" in str(parsed[1].error)


def test_csv_and_json_array_inputs(tmp_path: Path) -> None:
    csv_path = Path(__file__).parents[1] / "examples" / "outcomes.csv"
    parsed = list(read_outcomes(str(csv_path)))
    assert [p.error for p in parsed] == [None, None, None]
    assert parsed[1].outcome.contact.phone == "+44 20 7946 0958"  # type: ignore[union-attr]
    arr = tmp_path / "in.json"
    arr.write_text("[\n" + line(id="a") + ",\n" + line(id="b", contact={"email": "bad"}) + "\n]")
    got = list(read_outcomes(str(arr)))
    assert got[0].outcome is not None and "contact.email" in str(got[1].error) and ":3:" in str(got[1].error)


def test_default_mode_sends_valid_lines_and_writes_rejects(app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join([line(id="a"), line(id="b", contact={"email": "nope"}), line(id="c", contact={"email": "c@x.io"})])
        + "\n"
    )
    rejects = tmp_path / "rejects.jsonl"
    summary = push(app, source=str(src), connection="hs", rejects=rejects)
    assert (summary.created, summary.rejected, for_push(summary)) == (2, 1, 1)
    rej = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert rej[0]["line"] == 2 and "contact.email" in rej[0]["error"] and '"id": "b"' in rej[0]["record"]


def test_strict_aborts_before_anything_is_queued_or_sent(app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.jsonl"
    src.write_text(line(id="a") + "\n" + line(id="b", disposition="nope") + "\n")
    requests_before = app.emulator.stats.requests
    with pytest.raises(InputError) as exc:
        push(app, source=str(src), connection="hs", strict=True)
    assert exc.value.exit_code == 2 and ":2: disposition" in str(exc.value)
    assert app.emulator.stats.requests == requests_before
    with pytest.raises(Exception, match="was ever queued"):
        receipt(app, "hs", "a")


def test_empty_input_is_a_usage_error(app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    with pytest.raises(InputError, match="no outcomes"):
        push(app, source=str(src), connection="hs")


def test_same_file_twice_sends_no_write(app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(line(id=f"r{i}", contact={"email": f"r{i}@example.com"}) for i in range(30)) + "\n")
    push(app, source=str(src), connection="hs")
    writes, requests = app.emulator.stats.writes, app.emulator.stats.requests
    second = push(app, source=str(src), connection="hs")
    assert second.already == 30 and second.created == 0
    assert app.emulator.stats.writes == writes and app.emulator.stats.requests == requests


def test_changed_content_is_a_conflict_unless_update(app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.jsonl"
    src.write_text(line(id="u1", notes="first") + "\n")
    push(app, source=str(src), connection="hs")
    call_id = receipt(app, "hs", "u1").remote_ids["calls"]
    src.write_text(line(id="u1", notes="second") + "\n")
    conflict = push(app, source=str(src), connection="hs")
    assert conflict.conflicts == 1 and for_push(conflict) == 1
    assert app.emulator.get("calls", call_id)["properties"]["hs_call_body"] == "first"
    updated = push(app, source=str(src), connection="hs", update=True)
    assert updated.updated == 1
    assert app.emulator.get("calls", call_id)["properties"]["hs_call_body"] == "second"
    assert len(app.emulator.records("calls")) == 1


def test_dry_run_plans_from_the_mirror_with_zero_requests(app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from crmsync.sync.pull import pull

    app.emulator.bulk_create(
        "contacts", 10, properties_fn=lambda i: {"email": f"known{i}@example.com", "firstname": ""}
    )
    pull(app, objects=["contacts"])
    src = tmp_path / "in.jsonl"
    rows = [line(id=f"k{i}", contact={"email": f"known{i}@example.com", "first_name": "K"}) for i in range(10)]
    rows += [line(id=f"n{i}", contact={"email": f"new{i}@example.com"}) for i in range(10)]
    src.write_text("\n".join(rows) + "\n")
    before = app.emulator.stats.requests
    receipts: list = []
    summary = push(app, source=str(src), connection="hs", dry_run=True, sink=receipts.append)
    assert app.emulator.stats.requests == before
    assert summary.plan_counts["contacts"] == {"update": 10, "create": 10}
    assert summary.plan_counts["calls"] == {"create": 20}
    assert receipts[0].plan == {"contacts": "update", "calls": "create"}
    from crmsync.store import CrmOutbox

    with app.store.session() as s:
        from sqlmodel import select

        assert list(s.exec(select(CrmOutbox))) == []


def test_receipts_per_outcome_and_status_lookup(app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.jsonl"
    src.write_text(line(id="r1") + "\n" + line(id="r2", contact={"email": "bad"}) + "\n")
    got: list = []
    push(app, source=str(src), connection="hs", sink=got.append)
    statuses = {(r.id, r.status) for r in got}
    assert ("r1", "created") in statuses and (None, "rejected") in statuses
    r = receipt(app, "hs", "r1")
    assert r.status == "created" and set(r.remote_ids) == {"contacts", "calls"}


def test_failed_items_stay_and_retry_failed_resends_them(app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.jsonl"
    # A recording URL the CRM rejects would be a per-item failure; emulate one with partial faults.
    app.emulator.faults.partial_rate = 1.0
    src.write_text(line(id="f1") + "\n")
    first = push(app, source=str(src), connection="hs")
    assert first.failed == 1 and for_push(first) == 1
    assert receipt(app, "hs", "f1").status == "failed"
    app.emulator.faults.partial_rate = 0.0
    again = push(app, source=None, connection="hs", retry_failed=True)
    assert again.created == 1
    assert len(app.emulator.records("calls")) == 1


def test_items_left_queued_after_temporary_errors_exit_75_and_go_out_next_run(app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from crmsync.providers.base import ItemResult
    from crmsync.providers.hubspot import HubSpotProvider

    src = tmp_path / "in.jsonl"
    src.write_text(line(id="t1") + "\n")
    original = HubSpotProvider.create_activities

    def flaky(self, obj, items):  # type: ignore[no-untyped-def]
        return [ItemResult(i.ref, False, error="HTTP 503 for this item", retriable=True) for i in items]

    HubSpotProvider.create_activities = flaky  # type: ignore[method-assign]
    try:
        first = push(app, source=str(src), connection="hs")
    finally:
        HubSpotProvider.create_activities = original  # type: ignore[method-assign]
    assert (for_push(first), first.requeued, first.created) == (75, 1, 0)
    assert receipt(app, "hs", "t1").status == "queued"
    second = push(app, source=None, connection="hs", retry_failed=True)
    assert second.created == 1 and for_push(second) == 0
    assert len(app.emulator.records("calls")) == 1


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"contact": {"email": "Mixed.Case@Example.COM ", "phone": "030 1234567", "first_name": "Å", "title": "CTO"}},
        {"contact": {"phone": "+1 (555) 010-0199"}, "company": {"domain": "HTTPS://WWW.Acme.example/x"}},
        {"company": {"name": "Acme GmbH"}, "deal": {"name": "D", "amount": 12.5, "currency": "EUR"}},
        {"deal": {"name": "D2", "stage": "won", "close_date": "2026-12-01"}, "duration_seconds": 86_400},
        {"next_step": {"type": "meeting", "due_at": "2026-12-01T09:00:00-05:00", "notes": "bring\nslides"}},
        {"occurred_at": "2026-11-20T23:59:59.123456+14:00", "direction": "inbound", "notes": "ü " * 50},
        {"custom": {"score": 3, "vip": True, "ratio": 0.25, "none": None}, "owner_email": "Owner@Example.com"},
        {"recording_url": "https://rec.example/1", "disposition": "voicemail"},
    ],
)
def test_the_first_round_reuses_what_enqueue_parsed_only_because_a_reparse_is_identical(over: dict) -> None:
    """Delivery's first round takes the outcomes enqueue just parsed instead of parsing the rows again;
    that is sound only if parsing the stored payload gives the same outcome and canonical records."""
    from crmsync.model import CallOutcome, canonical

    outcome = CallOutcome.model_validate_json(line(**over))
    again = CallOutcome.model_validate(outcome.model_dump(mode="json"))
    assert again == outcome
    assert canonical(again) == canonical(outcome)


def test_delivery_takes_enqueued_outcomes_parsed(app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from crmsync.model import canonical
    from crmsync.sync.push import intake, items

    src = tmp_path / "o.jsonl"
    src.write_text("\n".join(line(id=f"p{i}", contact={"email": f"p{i}@example.com"}) for i in range(30)) + "\n")
    made = []
    real = canonical
    for module in (intake, items):  # where outcomes are parsed: on the way in, and from a row's payload
        monkeypatch.setattr(module, "canonical", lambda o, *dumped: made.append(o.id) or real(o, *dumped))
    summary = push(app, source=str(src), connection="hs")
    assert summary.created == 30
    assert sorted(made) == sorted(f"p{i}" for i in range(30))  # once each, in enqueue: no row parsed again
    assert len(app.emulator.records("calls")) == 30
