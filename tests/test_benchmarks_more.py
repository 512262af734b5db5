"""The Pipedrive, Salesforce and Dynamics benchmark kits: honest bounds that grow with the input and
name the limits they rest on, and seeding that leaves the records a pull is meant to find."""

from __future__ import annotations

import time
from typing import Any

import pytest

from benchmarks.harness import Bound
from benchmarks.kits_more import MORE_KITS, DynamicsKit, PipedriveKit, SalesforceKit

LATENCY = 0.15
#: Limits each kit's formulas must name (page and batch sizes, rate windows, concurrency).
NAMED = {
    "pipedrive": {"push": ["40/2 s", "180,000"], "pull": ["500", "40/2 s"], "backfill": ["500", "120/2 s"]},
    "salesforce": {"push": ["200", "Composite", "100,000"], "pull": ["2,000", "getUpdated"], "backfill": ["Bulk"]},
    "dynamics": {"push": ["$batch", "1,000", "6,000 / 300 s", "52"], "pull": ["5,000"], "backfill": ["5,000", "52"]},
}


def _counts(n: int) -> dict[str, int]:
    return {"contacts": n, "companies": n // 2, "deals": n // 5, "calls": n}


def _changes(n: int) -> dict[str, int]:
    return {"contacts": int(n * 0.6), "companies": int(n * 0.2), "deals": int(n * 0.2), "_created": n // 10}


def _bounds(kit: Any, n: int) -> dict[str, Bound]:
    return {
        "push": kit.push_bound(_counts(n), LATENCY),
        "pull": kit.pull_bound(_changes(n), LATENCY),
        "backfill": kit.backfill_bound(n, LATENCY),
    }


@pytest.mark.parametrize("name", sorted(MORE_KITS))
def test_bounds_are_positive_monotone_and_name_their_limits(name: str) -> None:
    kit: Any = MORE_KITS[name]()
    assert kit.missing is None and kit.naive is False
    sizes = [10, 200, 2_000, 20_000, 200_000]
    series = [_bounds(kit, n) for n in sizes]
    for scenario in ("push", "pull", "backfill"):
        seconds = [b[scenario].seconds for b in series]
        requests = [b[scenario].total for b in series]
        assert all(s >= LATENCY for s in seconds), (scenario, seconds)
        assert seconds == sorted(seconds) and requests == sorted(requests), (scenario, seconds, requests)
        assert requests[-1] > requests[0], (scenario, requests)  # more records never cost nothing more
        formula = series[-1][scenario].formula
        for limit in NAMED[name][scenario]:
            assert limit in formula, (scenario, limit, formula)


def test_each_bound_is_the_binding_term_of_its_crm() -> None:
    pd, sf, dy = PipedriveKit(), SalesforceKit(), DynamicsKit()
    # Pipedrive: 2N + companies + deals + 3 creates and lists at 40 per rolling 2 s from an empty window.
    push = pd.push_bound(_counts(1_000), LATENCY)
    assert push.total == 1_000 + 500 + 200 + 1_000 + 3 and push.seconds == pytest.approx(2.0 * (2_702 // 40) + LATENCY)
    # Salesforce: no rate limit binds; lookups then writes, two round trips whatever the size.
    assert sf.push_bound(_counts(10_000), LATENCY).seconds == pytest.approx(2 * LATENCY)
    assert sf.backfill_bound(1_500, LATENCY).seconds == pytest.approx(LATENCY)  # one query page
    # Dynamics: a change-tracking pull is a nextLink chain of pages of 5,000.
    assert dy.pull_bound({"contacts": 12_000}, LATENCY).seconds == pytest.approx(3 * LATENCY)
    # Dynamics: 60,000 batches cannot beat 6,000 per 300 s.
    assert dy.push_bound(_counts(15_000_000), LATENCY).seconds > 300.0


@pytest.mark.parametrize("name", sorted(MORE_KITS))
def test_seeded_records_and_changes_are_where_a_pull_looks(name: str) -> None:
    kit: Any = MORE_KITS[name]()
    emu = kit.emulator()
    at = time.time() - 7200
    ids = {o: kit.create(emu, o, k, at=at, start=0) for o, k in {"contacts": 20, "companies": 5, "deals": 5}.items()}
    bulk = kit.create(emu, "contacts", 30, at=at, start=100, spread=0)
    assert len(set(ids["contacts"] + bulk)) == 50 and kit.count(emu, "contacts") == 50
    changes = kit.make_changes(emu, ids, 20, start=time.time(), span=1.0)
    assert changes == {"contacts": 12, "companies": 4, "deals": 4, "_created": 2}
    assert kit.count(emu, "contacts") == 52 and kit.count(emu, "companies") == 5
    assert {kit.object_of(p) for p in _paths(name)} == {"contacts", "companies", "deals", "calls"}


def _paths(name: str) -> list[str]:
    return {
        "pipedrive": ["/api/v2/persons", "/api/v2/organizations/7", "/api/v2/deals", "/api/v2/activities"],
        "salesforce": [
            "/services/data/v62.0/composite/sobjects/Contact/crmsync_key__c",
            "/services/data/v62.0/sobjects/Account/describe",
            "/services/data/v62.0/sobjects/Opportunity/updated/",
            "/services/data/v62.0/composite/sobjects/Task/crmsync_outcome_id__c",
        ],
        "dynamics": [
            "/api/data/v9.2/contacts",
            "/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)",
            "/api/data/v9.2/opportunities",
            "/api/data/v9.2/phonecalls",
        ],
    }[name]


def test_hubspot_pull_bound_counts_list_walks_as_chains_after_the_first_window() -> None:
    """The pull scenario needs more than one window of general requests; after the first window only as
    many sends as a window earlier fit, and each list walk sends one page per round trip (issue 31)."""
    from benchmarks.kits import HubSpotKit

    kit = HubSpotKit()
    kit.totals = {"contacts": 22_000, "companies": 5_000, "deals": 5_000}
    bound = kit.pull_bound({"contacts": 12_000, "companies": 4_000, "deals": 4_000, "_created": 2_000}, 0.15)
    # A fluid window (100 more at once at 10 s) gave 10.15 s; the chains and the rolling window allow 11.15 s.
    assert bound.seconds == 11.15
    assert bound.requests["default"] > 100 and bound.requests["search"] == 60
    small = kit.pull_bound({"contacts": 4_000, "companies": 1_000, "deals": 1_000}, 0.15)
    assert small.seconds < 10 and small.requests["default"] <= 100  # one window: no chain limit after it
