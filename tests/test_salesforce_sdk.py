"""simple-salesforce, the most used Python client, drives the Salesforce emulator over loopback.

It speaks only https:// to ``<domain>.salesforce.com`` and the instance; a transport adapter sends
every such request to the emulator's loopback address instead, so the client runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceMalformedRequest, SalesforceMoreThanOneRecord

from crmsync.emulators.salesforce import SalesforceEmulator

USER = "admin@example.com.sandbox"


class Loopback(requests.adapters.HTTPAdapter):
    """Sends https://anything/path to the emulator on loopback."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        parts = urlsplit(request.url or "")
        request.url = self.base + parts.path + (f"?{parts.query}" if parts.query else "")
        return super().send(request, **kwargs)


@pytest.fixture
def org() -> Iterator[tuple[SalesforceEmulator, Any]]:
    emulator = SalesforceEmulator()
    pem = emulator.generate_certificate()
    server = emulator.serve()
    session = requests.Session()
    session.mount("https://", Loopback(server.url))
    try:
        sf = Salesforce(username=USER, consumer_key=emulator.client_id, privatekey=pem, session=session, version="62.0")
        yield emulator, sf
    finally:
        server.stop()


def test_jwt_login_create_read_update_delete(org: tuple[SalesforceEmulator, Any]) -> None:
    emulator, sf = org
    made = sf.Contact.create({"LastName": "Lovelace", "Email": "ada@example.org"})
    assert made["success"] is True and made["id"].startswith("003")
    assert sf.Contact.get(made["id"])["Email"] == "ada@example.org"
    assert sf.Contact.update(made["id"], {"FirstName": "Ada"}) == 204
    assert emulator.records("Contact")[0]["FirstName"] == "Ada"
    assert sf.Contact.delete(made["id"]) == 204
    assert emulator.records("Contact") == []
    sf.query("SELECT Id FROM Contact")
    assert sf.api_usage["api-usage"].used == emulator.api_used  # parsed from Sforce-Limit-Info


def test_upsert_by_external_id_creates_then_updates_and_several_matches_are_300(
    org: tuple[SalesforceEmulator, Any],
) -> None:
    emulator, sf = org
    assert sf.Contact.upsert("crmsync_key__c/ada@example.org", {"LastName": "Lovelace"}) == 201
    assert sf.Contact.upsert("crmsync_key__c/ada@example.org", {"FirstName": "Ada"}) in (200, 204)
    assert len(emulator.records("Contact")) == 1
    assert sf.Contact.get_by_custom_id("crmsync_key__c", "ada@example.org")["FirstName"] == "Ada"
    emulator.bulk_create("Contact", 2, lambda i: {"LastName": f"Twin {i}", "crmsync_key__c": "twin"})
    with pytest.raises(SalesforceMoreThanOneRecord):
        sf.Contact.upsert("crmsync_key__c/twin", {"FirstName": "X"})


def test_query_all_pages_through_next_records_url_and_bad_soql_is_refused(
    org: tuple[SalesforceEmulator, Any],
) -> None:
    emulator, sf = org
    emulator.bulk_create("Contact", 4_500, lambda i: {"LastName": f"P{i}", "Email": f"p{i}@x.org"})
    rows = list(sf.query_all_iter("SELECT Id, Email FROM Contact ORDER BY Id"))
    assert len(rows) == 4_500 and emulator.stats.by_route["GET query more read"] == 2
    assert sf.query("SELECT COUNT() FROM Contact WHERE Email LIKE 'p1%'")["totalSize"] == 1_111
    with pytest.raises(SalesforceMalformedRequest):
        sf.query("SELECT Nope FROM Contact")


def test_describe_deleted_updated_and_limits(org: tuple[SalesforceEmulator, Any]) -> None:
    emulator, sf = org
    emulator.clock_offset = -600
    rid = sf.Contact.create({"LastName": "Gone"})["id"]
    sf.Contact.delete(rid)
    emulator.clock_offset = 0
    fields = {f["name"]: f for f in sf.Task.describe()["fields"]}
    assert fields["crmsync_outcome_id__c"]["externalId"] is True
    assert [p["value"] for p in fields["TaskSubtype"]["picklistValues"]] == ["Task", "Email", "Call"]
    now = datetime.now(UTC)
    deleted = sf.Contact.deleted(now - timedelta(hours=1), now)
    assert [d["id"] for d in deleted["deletedRecords"]] == [rid]
    assert "ids" in sf.Contact.updated(now - timedelta(hours=1), now)
    assert sf.limits()["DailyApiRequests"]["Max"] == 100_000


@pytest.mark.slow
def test_bulk2_query_and_composite_with_references(org: tuple[SalesforceEmulator, Any]) -> None:
    emulator, sf = org
    emulator.bulk_create("Account", 1_200, lambda i: {"Name": f"Co {i}"})
    pages = list(sf.bulk2.Account.query("SELECT Id, Name FROM Account", max_records=500))
    assert sum(len(p.strip().splitlines()) - 1 for p in pages) == 1_200 and len(pages) == 3
    body = {
        "allOrNone": True,
        "compositeRequest": [
            {
                "method": "POST",
                "url": "/services/data/v62.0/sobjects/Account",
                "referenceId": "acc",
                "body": {"Name": "Acme"},
            },
            {
                "method": "POST",
                "url": "/services/data/v62.0/sobjects/Contact",
                "referenceId": "con",
                "body": {"LastName": "Doe", "AccountId": "@{acc.id}"},
            },
        ],
    }
    answer = sf.restful("composite", method="POST", json=body)
    statuses = [r["httpStatusCode"] for r in answer["compositeResponse"]]
    assert statuses == [201, 201]
    contact = next(c for c in emulator.records("Contact") if c["LastName"] == "Doe")
    assert contact["AccountId"] == answer["compositeResponse"][0]["body"]["id"]
