"""HubSpot push lookups by domain: five IN filters per search, every page of the answer.

The emulator in process on loopback, no latency; it rejects more than 5 filter groups or 18 filters,
as HubSpot does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.providers.base import match_key
from crmsync.providers.hubspot.values import IN_MAX, SEARCH_GROUPS
from tests.e2e import hubspot_app, write_config

SHARED = 300  # domains that three companies each carry (a portal with duplicates)


@pytest.fixture
def provider(home: Any) -> Iterator[tuple[HubSpotEmulator, Any]]:
    emulator = HubSpotEmulator(seed=5)
    emulator.bulk_create(
        "companies", 3 * SHARED, properties_fn=lambda i: {"domain": f"d{i % SHARED}.example", "name": f"Co {i}"}
    )
    server = emulator.serve()
    write_config(home, "hs", rate_limit=100000, search_rate_limit=1000)
    app = hubspot_app(server.url, emulator.private_app_token)
    try:
        yield emulator, app.provider(app.connection("hs"))
    finally:
        app.close()
        server.stop()


def _searches(monkeypatch: pytest.MonkeyPatch, provider: Any) -> list[dict[str, Any]]:
    """The searches ``provider`` sends from now on: their filter groups and offset."""
    sent: list[dict[str, Any]] = []
    original = provider._search

    def search(obj: str, groups: list[Any], sort: str, fields: Any, after: int, **kw: Any) -> Any:
        sent.append({"groups": groups, "after": after})
        return original(obj, groups, sort, fields, after, **kw)

    monkeypatch.setattr(provider, "_search", search)
    return sent


def test_a_lookup_of_domains_asks_for_five_in_filters_at_once_and_reads_every_page(
    provider: tuple[HubSpotEmulator, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, hs = provider
    assert hs.lookup_batch("companies", "domain") == IN_MAX * SEARCH_GROUPS == 500
    assert hs.lookup_batch("contacts", "email") == 100  # a batch read by a unique property
    sent = _searches(monkeypatch, hs)
    wanted = [f"d{i}.example" for i in range(SHARED)] + [f"new{i}.example" for i in range(300)]
    found = hs.lookup("companies", [{"domain": d} for d in wanted], fields=["name", "domain"])
    assert set(found) == {match_key({"domain": f"d{i}.example"}) for i in range(SHARED)}
    # 600 domains: one search of 5 groups (900 matches: 5 pages of 200) and one of a single group.
    assert [len(s["groups"]) for s in sent] == [5, 5, 5, 5, 5, 1]
    assert [s["after"] for s in sent] == [0, 200, 400, 600, 800, 0]
    assert all(len(g[0]["values"]) <= IN_MAX for s in sent for g in s["groups"])


def test_a_lookup_of_new_domains_is_one_search_per_five_hundred(
    provider: tuple[HubSpotEmulator, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, hs = provider
    sent = _searches(monkeypatch, hs)
    found = hs.lookup("companies", [{"domain": f"new{i}.example"} for i in range(1000)], fields=["name"])
    assert found == {}
    assert [(len(s["groups"]), s["after"]) for s in sent] == [(5, 0), (5, 0)]
