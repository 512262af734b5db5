"""The HubSpot emulator behaves like HubSpot, and every exchange honours the official OpenAPI specs."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crmsync.emulators.base import Faults
from crmsync.emulators.hubspot import DEFAULT_DISPOSITIONS, HubSpotEmulator, build_hubspot

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openapi_check import CheckedTransport, SpecCheck

BASE = "http://hubspot.test"
CHECK = SpecCheck.hubspot()


class Hub:
    """An emulator, a spec-checked transport over it and a client authenticated as the private app."""

    def __init__(self, emu: HubSpotEmulator) -> None:
        self.emu = emu
        self.transport: CheckedTransport = CHECK.wrap(emu)
        self.client = httpx.Client(
            transport=self.transport, base_url=BASE, headers={"Authorization": f"Bearer {emu.private_app_token}"}
        )

    def as_token(self, token: str) -> httpx.Client:
        return httpx.Client(transport=self.transport, base_url=BASE, headers={"Authorization": f"Bearer {token}"})

    # Request bodies carry every field the spec marks required, so the checker sees spec-valid requests.
    def create(self, obj: str, props: dict[str, str], associations: list[Any] | None = None) -> httpx.Response:
        return self.client.post(
            f"/crm/v3/objects/{obj}", json={"properties": props, "associations": associations or []}
        )

    def search(
        self,
        obj: str,
        *,
        groups: list[Any] | None = None,
        sorts: list[str] | None = None,
        limit: int = 10,
        after: int = 0,
        properties: list[str] | None = None,
        **extra: Any,
    ) -> httpx.Response:
        body = {
            "filterGroups": groups or [],
            "sorts": sorts or [],
            "limit": limit,
            "after": str(after),
            "properties": properties or [],
            **extra,
        }
        return self.client.post(f"/crm/v3/objects/{obj}/search", json=body)


def flt(name: str, op: str, value: Any = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"propertyName": name, "operator": op, **extra}
    if value is not None:
        out["value"] = str(value)
    return out


def ids(response: httpx.Response) -> list[str]:
    return [r["id"] for r in response.json()["results"]]


@pytest.fixture
def make_hub() -> Iterator[Any]:
    """Build Hub objects; after the test, every exchange any of them made must have passed the spec check."""
    made: list[Hub] = []

    def make(**kwargs: Any) -> Hub:
        hub = Hub(HubSpotEmulator(**kwargs))
        made.append(hub)
        return hub

    yield make
    problems = [p for hub in made for p in hub.transport.problems]
    assert problems == [], "\n".join(problems)


@pytest.fixture
def hub(make_hub: Any) -> Hub:
    return make_hub()


# -- objects: CRUD --------------------------------------------------------------------------------
def test_create_read_update_archive_roundtrip(hub: Hub) -> None:
    created = hub.create("contacts", {"email": "Ada@Example.com", "firstname": "Ada", "lastname": "Lovelace"})
    assert created.status_code == 201
    body = created.json()
    cid = body["id"]
    assert body["archived"] is False
    assert body["properties"]["email"] == "ada@example.com"  # HubSpot lowercases emails
    assert body["properties"]["hs_object_id"] == cid
    assert body["createdAt"].endswith("Z") and "." in body["createdAt"]
    assert all(isinstance(v, str) for v in body["properties"].values())

    got = hub.client.get(f"/crm/v3/objects/contacts/{cid}", params={"properties": "firstname,nosuchprop"})
    assert got.status_code == 200
    assert set(got.json()["properties"]) == {"firstname", "createdate", "lastmodifieddate", "hs_object_id"}
    by_email = hub.client.get("/crm/v3/objects/contacts/ADA@example.com", params={"idProperty": "email"})
    assert by_email.json()["id"] == cid

    hub.emu.clock_offset += 5
    patched = hub.client.patch(f"/crm/v3/objects/contacts/{cid}", json={"properties": {"lastname": "", "phone": "1"}})
    assert patched.status_code == 200
    assert "lastname" not in patched.json()["properties"]  # "" clears the value
    assert patched.json()["properties"]["phone"] == "1"
    assert patched.json()["updatedAt"] > body["updatedAt"]
    assert patched.json()["properties"]["lastmodifieddate"] == patched.json()["updatedAt"]

    assert hub.client.delete(f"/crm/v3/objects/contacts/{cid}").status_code == 204
    missing = hub.client.get(f"/crm/v3/objects/contacts/{cid}")
    assert missing.status_code == 404
    assert missing.json()["category"] == "OBJECT_NOT_FOUND"
    archived = hub.client.get(f"/crm/v3/objects/contacts/{cid}", params={"archived": "true"})
    assert archived.json()["archived"] is True and "archivedAt" in archived.json()
    listing = hub.client.get("/crm/v3/objects/contacts", params={"archived": "true"})
    assert ids(listing) == [cid]
    assert ids(hub.client.get("/crm/v3/objects/contacts")) == []


def test_object_type_ids_are_aliases(hub: Hub) -> None:
    deal = hub.create("0-3", {"dealname": "Big one", "amount": "1200", "dealstage": "qualifiedtobuy"})
    assert deal.status_code == 201
    assert ids(hub.client.get("/crm/v3/objects/deals")) == [deal.json()["id"]]
    call = hub.create("0-48", {"hs_timestamp": "1700000000000", "hs_call_direction": "OUTBOUND"})
    assert call.json()["properties"]["hs_timestamp"] == "2023-11-14T22:13:20.000Z"
    task = hub.create("tasks", {"hs_timestamp": "2024-01-01T00:00:00Z", "hs_task_subject": "Follow up"})
    assert hub.client.get(f"/crm/v3/objects/0-27/{task.json()['id']}").status_code == 200


def test_invalid_properties_are_validation_errors(hub: Hub) -> None:
    bad = hub.create(
        "deals",
        {"dealname": "x", "nosuch": "1", "hs_object_id": "5", "dealstage": "Closed Won", "amount": "lots"},
    )
    assert bad.status_code == 400
    assert bad.json()["category"] == "VALIDATION_ERROR"
    codes = {e["context"]["propertyName"][0]: e["code"] for e in bad.json()["errors"]}
    assert codes == {
        "nosuch": "PROPERTY_DOESNT_EXIST",
        "hs_object_id": "READ_ONLY_VALUE",
        "dealstage": "INVALID_OPTION",  # labels are not values
        "amount": "INVALID_FLOAT",
    }
    assert hub.create("calls", {"hs_call_title": "no timestamp"}).status_code == 400  # hs_timestamp is required
    assert hub.emu.records("deals") == []


def test_unique_email_conflicts(hub: Hub) -> None:
    first = hub.create("contacts", {"email": "dup@example.com"})
    again = hub.create("contacts", {"email": "DUP@example.com"})
    assert again.status_code == 409
    assert again.json()["category"] == "CONFLICT"
    assert again.json()["message"] == f"Contact already exists. Existing ID: {first.json()['id']}"
    other = hub.create("contacts", {"email": "other@example.com"})
    url = f"/crm/v3/objects/contacts/{other.json()['id']}"
    clash = hub.client.patch(url, json={"properties": {"email": "dup@example.com"}})
    assert clash.status_code == 409


# -- batch ----------------------------------------------------------------------------------------
def test_batch_limit_is_100_inputs(hub: Hub) -> None:
    inputs = [{"properties": {"firstname": str(i)}, "associations": []} for i in range(101)]
    over = hub.client.post("/crm/v3/objects/contacts/batch/create", json={"inputs": inputs})
    assert over.status_code == 400
    assert over.json()["category"] == "VALIDATION_ERROR"
    ok = hub.client.post("/crm/v3/objects/contacts/batch/create", json={"inputs": inputs[:100]})
    assert ok.status_code == 201
    assert ok.json()["status"] == "COMPLETE" and len(ok.json()["results"]) == 100


def test_batch_create_reports_failed_inputs_in_207(hub: Hub) -> None:
    hub.create("contacts", {"email": "taken@example.com"})
    inputs = [
        {"properties": {"email": "new@example.com"}, "associations": [], "objectWriteTraceId": "ok-1"},
        {"properties": {"email": "taken@example.com"}, "associations": [], "objectWriteTraceId": "dup-1"},
        {"properties": {"lifecyclestage": "nope"}, "associations": [], "objectWriteTraceId": "bad-1"},
    ]
    response = hub.client.post("/crm/v3/objects/contacts/batch/create", json={"inputs": inputs})
    assert response.status_code == 207
    body = response.json()
    assert body["numErrors"] == 2
    assert [r["objectWriteTraceId"] for r in body["results"]] == ["ok-1"]
    by_trace = {e["context"]["objectWriteTraceId"][0]: e for e in body["errors"]}
    assert by_trace["dup-1"]["category"] == "CONFLICT"
    assert by_trace["bad-1"]["category"] == "VALIDATION_ERROR"
    assert all(e["status"] == "error" and e["errors"] for e in body["errors"])


def test_batch_read_update_archive(hub: Hub) -> None:
    a = hub.create("companies", {"name": "A", "domain": "a.example"}).json()["id"]
    b = hub.create("companies", {"name": "B", "domain": "b.example"}).json()["id"]
    read = hub.client.post(
        "/crm/v3/objects/companies/batch/read",
        json={"inputs": [{"id": a}, {"id": "999999"}], "properties": ["domain"], "propertiesWithHistory": []},
    )
    assert read.status_code == 207
    assert [r["properties"]["domain"] for r in read.json()["results"]] == ["a.example"]
    assert read.json()["errors"][0]["category"] == "OBJECT_NOT_FOUND"
    assert read.json()["errors"][0]["context"]["ids"] == ["999999"]

    update = hub.client.post(
        "/crm/v3/objects/companies/batch/update",
        json={"inputs": [{"id": a, "properties": {"city": "Oslo"}}, {"id": "424242", "properties": {"city": "X"}}]},
    )
    assert update.status_code == 207
    assert update.json()["errors"][0]["context"]["ids"] == ["424242"]
    assert hub.emu.get("companies", a)["properties"]["city"] == "Oslo"

    dupes = hub.client.post(
        "/crm/v3/objects/companies/batch/update",
        json={"inputs": [{"id": a, "properties": {}}, {"id": a, "properties": {}}]},
    )
    assert dupes.status_code == 400

    archive = hub.client.post("/crm/v3/objects/companies/batch/archive", json={"inputs": [{"id": b}]})
    assert archive.status_code == 204
    assert [r["id"] for r in hub.emu.records("companies")] == [a]


def test_upsert_reports_new_and_needs_a_unique_property(hub: Hub) -> None:
    existing = hub.create("contacts", {"email": "known@example.com", "firstname": "Old"}).json()["id"]
    upsert = hub.client.post(
        "/crm/v3/objects/contacts/batch/upsert",
        json={
            "inputs": [
                {"idProperty": "email", "id": "known@example.com", "properties": {"firstname": "New"}},
                {"idProperty": "email", "id": "fresh@example.com", "properties": {"firstname": "Fresh"}},
            ]
        },
    )
    assert upsert.status_code == 200
    results = {r["properties"]["email"]: r for r in upsert.json()["results"]}
    assert results["known@example.com"]["new"] is False
    assert results["known@example.com"]["id"] == existing
    assert results["known@example.com"]["properties"]["firstname"] == "New"
    assert results["fresh@example.com"]["new"] is True

    not_unique = hub.client.post(
        "/crm/v3/objects/contacts/batch/upsert",
        json={"inputs": [{"idProperty": "firstname", "id": "New", "properties": {}}]},
    )
    assert not_unique.status_code == 400
    assert not_unique.json()["category"] == "VALIDATION_ERROR"


def test_custom_unique_property(hub: Hub) -> None:
    definition = {
        "name": "crmsync_outcome_id",
        "label": "crmsync outcome id",
        "type": "string",
        "fieldType": "text",
        "groupName": "call",
        "hasUniqueValue": True,
    }
    created = hub.client.post("/crm/v3/properties/calls", json=definition)
    assert created.status_code == 201
    assert created.json()["hasUniqueValue"] is True
    assert hub.client.post("/crm/v3/properties/calls", json=definition).status_code == 409

    props = {"hs_timestamp": "1700000000000", "crmsync_outcome_id": "o-1"}
    first = hub.create("calls", props)
    assert first.status_code == 201
    assert hub.create("calls", props).status_code == 409
    upsert = hub.client.post(
        "/crm/v3/objects/calls/batch/upsert",
        json={
            "inputs": [
                {"idProperty": "crmsync_outcome_id", "id": "o-1", "properties": {"hs_call_title": "again"}},
                {"idProperty": "crmsync_outcome_id", "id": "o-2", "properties": {"hs_timestamp": "1700000000000"}},
            ]
        },
    )
    assert [r["new"] for r in upsert.json()["results"]] == [False, True]
    by_marker = hub.client.get("/crm/v3/objects/calls/o-1", params={"idProperty": "crmsync_outcome_id"})
    assert by_marker.json()["id"] == first.json()["id"]


def test_partial_rate_fault_fails_some_inputs(make_hub: Any) -> None:
    hub = make_hub(faults=Faults(partial_rate=0.5, seed=3))
    inputs = [
        {"properties": {"firstname": str(i)}, "associations": [], "objectWriteTraceId": f"t{i}"} for i in range(40)
    ]
    response = hub.client.post("/crm/v3/objects/contacts/batch/create", json={"inputs": inputs})
    assert response.status_code == 207
    body = response.json()
    assert 0 < body["numErrors"] < 40
    assert body["numErrors"] + len(body["results"]) == 40
    failed = {e["context"]["objectWriteTraceId"][0] for e in body["errors"]}
    assert failed.isdisjoint(r["objectWriteTraceId"] for r in body["results"])


# -- list paging ----------------------------------------------------------------------------------
def test_list_pages_with_after_until_the_last_page(make_hub: Any) -> None:
    hub = make_hub(seed=7, companies=3, contacts=25)
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 10, "properties": "email"}
    pages = 0
    while True:
        response = hub.client.get("/crm/v3/objects/contacts", params=params)
        pages += 1
        seen += ids(response)
        nxt = response.json().get("paging", {}).get("next")
        if not nxt:
            break
        assert nxt["link"].startswith(BASE) and f"after={nxt['after']}" in nxt["link"]
        params["after"] = nxt["after"]
    assert pages == 3
    assert len(seen) == len(set(seen)) == 25
    assert seen == sorted(seen, key=int)
    assert hub.client.get("/crm/v3/objects/contacts", params={"limit": 101}).status_code == 400
    default = hub.client.get("/crm/v3/objects/contacts")
    assert len(default.json()["results"]) == 10  # the default limit


# -- search ---------------------------------------------------------------------------------------
@pytest.fixture
def people(hub: Hub) -> dict[str, str]:
    hub.client.post(
        "/crm/v3/properties/contacts",
        json={
            "name": "score",
            "label": "Score",
            "type": "number",
            "fieldType": "number",
            "groupName": "contactinformation",
        },
    )
    rows = {
        "ann": {"email": "ann@alpha.example", "firstname": "Ann", "score": "10", "lifecyclestage": "lead"},
        "bob": {"email": "bob@beta.example", "firstname": "Bob", "score": "25", "lifecyclestage": "customer"},
        "cy": {"email": "cy@alpha.example", "firstname": "Cy", "score": "7"},
        "dee": {"email": "dee@gamma.example", "firstname": "dee", "lifecyclestage": "lead"},
    }
    return {key: hub.create("contacts", props).json()["id"] for key, props in rows.items()}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([flt("firstname", "EQ", "ANN")], ["ann"]),  # string EQ is case-insensitive
        ([flt("firstname", "NEQ", "ann")], ["bob", "cy", "dee"]),
        ([flt("score", "GT", 9)], ["ann", "bob"]),  # numeric, not lexicographic
        ([flt("score", "LTE", 10)], ["ann", "cy"]),
        ([flt("score", "LT", 10)], ["cy"]),
        ([flt("score", "GTE", 25)], ["bob"]),
        ([flt("score", "BETWEEN", 7, highValue="10")], ["ann", "cy"]),
        ([flt("lifecyclestage", "IN", values=["lead"])], ["ann", "dee"]),
        ([flt("lifecyclestage", "NOT_IN", values=["lead"])], ["bob", "cy"]),
        ([flt("score", "HAS_PROPERTY")], ["ann", "bob", "cy"]),
        ([flt("score", "NOT_HAS_PROPERTY")], ["dee"]),
        ([flt("email", "CONTAINS_TOKEN", "*@alpha.example")], ["ann", "cy"]),
        ([flt("score", "GT", 5), flt("lifecyclestage", "EQ", "lead")], ["ann"]),  # AND within a group
    ],
)
def test_search_operators(hub: Hub, people: dict[str, str], filters: list[Any], expected: list[str]) -> None:
    response = hub.search("contacts", groups=[{"filters": filters}])
    assert response.status_code == 200
    assert ids(response) == [people[k] for k in expected]
    assert response.json()["total"] == len(expected)


def test_search_groups_are_ored_and_sorts_are_strings(hub: Hub, people: dict[str, str]) -> None:
    either = hub.search(
        "contacts", groups=[{"filters": [flt("firstname", "EQ", "bob")]}, {"filters": [flt("score", "LT", 8)]}]
    )
    assert ids(either) == [people["bob"], people["cy"]]
    desc = hub.search("contacts", sorts=["-score"], properties=["score"])
    assert ids(desc) == [people["bob"], people["ann"], people["cy"], people["dee"]]  # missing values last
    asc = hub.search("contacts", sorts=["score"])
    assert ids(asc) == [people["cy"], people["ann"], people["bob"], people["dee"]]
    assert ids(hub.search("contacts")) == sorted(people.values(), key=int)  # default order: id ascending
    text = hub.search("contacts", query="alpha")
    assert ids(text) == [people["ann"], people["cy"]]
    assert hub.search("contacts", groups=[{"filters": [flt("nosuch", "EQ", "x")]}]).status_code == 400


def test_search_datetimes_compare_as_epoch_ms(hub: Hub, people: dict[str, str]) -> None:
    hub.emu.edit("contacts", people["bob"], {"firstname": "Robert"}, at=2_000_000_000.0)
    for value in ("2000000000000", "2033-05-18T03:33:20.000Z", "2033-05-18T03:33:20Z"):
        response = hub.search("contacts", groups=[{"filters": [flt("lastmodifieddate", "GTE", value)]}])
        assert ids(response) == [people["bob"]], value
    before = hub.search("contacts", groups=[{"filters": [flt("lastmodifieddate", "LT", "2000000000000")]}])
    assert people["bob"] not in ids(before)


def test_search_pages_by_offset_and_caps_at_10000(hub: Hub) -> None:
    hub.emu.bulk_create("companies", 25)
    first = hub.search("companies", limit=10)
    assert first.json()["total"] == 25
    assert first.json()["paging"]["next"]["after"] == "10"
    last = hub.search("companies", limit=10, after=20)
    assert len(ids(last)) == 5 and "paging" not in last.json()
    assert hub.search("companies", limit=200, after=9800).status_code == 200
    over = hub.search("companies", limit=200, after=9900)
    assert over.status_code == 400
    assert over.json()["category"] == "VALIDATION_ERROR"
    assert hub.search("companies", limit=201).status_code == 400


def test_search_never_returns_archived_records(hub: Hub) -> None:
    keep, gone = hub.emu.bulk_create("deals", 2)
    hub.emu.archive("deals", gone)
    assert ids(hub.search("deals")) == [keep]


# -- associations ---------------------------------------------------------------------------------
def test_inline_associations_and_v3_association_shape(hub: Hub) -> None:
    company = hub.create("companies", {"name": "Acme", "domain": "acme.example"}).json()["id"]
    contact = hub.create(
        "contacts",
        {"email": "c@acme.example"},
        [{"to": {"id": company}, "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 1}]}],
    ).json()["id"]
    got = hub.client.get(f"/crm/v3/objects/contacts/{contact}", params={"associations": "companies,deals"})
    assoc = got.json()["associations"]
    assert set(assoc) == {"companies"}  # types without links are left out
    assert {(r["id"], r["type"]) for r in assoc["companies"]["results"]} == {
        (company, "contact_to_company"),
        (company, "contact_to_company_unlabeled"),
    }
    spec = {"associationCategory": "HUBSPOT_DEFINED"}
    call = hub.create(
        "calls",
        {"hs_timestamp": "1700000000000", "hs_call_disposition": "f240bbac-87c9-4f6e-bf70-924b57d47db7"},
        [
            {"to": {"id": contact}, "types": [{**spec, "associationTypeId": 194}]},
            {"to": {"id": company}, "types": [{**spec, "associationTypeId": 182}]},
        ],
    )
    assert call.status_code == 201
    call_id = call.json()["id"]
    assert hub.emu.associations("calls", call_id, "contacts") == [contact]
    assert hub.emu.associations("contacts", contact, "calls") == [call_id]
    to_nobody = [{"to": {"id": "999999"}, "types": [{**spec, "associationTypeId": 194}]}]
    missing_target = hub.create("calls", {"hs_timestamp": "1"}, to_nobody)
    assert missing_target.status_code == 400
    contact_to_company_type = [{"to": {"id": contact}, "types": [{**spec, "associationTypeId": 279}]}]
    wrong_type = hub.create("calls", {"hs_timestamp": "1"}, contact_to_company_type)
    assert wrong_type.status_code == 400
    assert len(hub.emu.records("calls")) == 1


def test_v4_associations(hub: Hub) -> None:
    contact = hub.create("contacts", {"email": "v4@example.com"}).json()
    company = hub.create("companies", {"name": "V4"}).json()["id"]
    deal = hub.create("deals", {"dealname": "V4 deal"}).json()["id"]
    before = hub.emu.get("contacts", contact["id"])["updatedAt"]
    hub.emu.clock_offset += 5

    put = hub.client.put(f"/crm/v4/objects/contacts/{contact['id']}/associations/default/companies/{company}")
    assert put.status_code == 200
    specs = {(r["from"]["id"], r["associationSpec"]["associationTypeId"]) for r in put.json()["results"]}
    assert specs == {(contact["id"], 279), (company, 280)}
    listed = hub.client.get(f"/crm/v4/objects/contacts/{contact['id']}/associations/companies")
    assert listed.json()["results"] == [
        {"toObjectId": company, "associationTypes": [{"category": "HUBSPOT_DEFINED", "typeId": 279}]}
    ]
    assert hub.emu.get("contacts", contact["id"])["updatedAt"] == before  # linking is not an edit

    created = hub.client.post(
        "/crm/v4/associations/deals/companies/batch/create",
        json={
            "inputs": [
                {
                    "from": {"id": deal},
                    "to": {"id": company},
                    "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 5}],
                }
            ]
        },
    )
    assert created.status_code == 201
    assert created.json()["results"][0]["labels"] == ["Primary"]
    default = hub.client.post(
        "/crm/v4/associations/deals/contacts/batch/associate/default",
        json={"inputs": [{"from": {"id": deal}, "to": {"id": contact["id"]}}]},
    )
    assert default.status_code == 200
    read = hub.client.post(
        "/crm/v4/associations/companies/deals/batch/read", json={"inputs": [{"id": company}, {"id": "999999"}]}
    )
    assert read.status_code == 207
    types = read.json()["results"][0]["to"][0]["associationTypes"]
    assert {t["typeId"] for t in types} == {6, 342}
    assert {t.get("label") for t in types} == {"Primary", None}

    too_many = [{"id": str(i)} for i in range(1001)]
    assert (
        hub.client.post("/crm/v4/associations/companies/deals/batch/read", json={"inputs": too_many}).status_code == 400
    )

    archived = hub.client.post(
        "/crm/v4/associations/deals/companies/batch/archive",
        json={"inputs": [{"from": {"id": deal}, "to": [{"id": company}]}]},
    )
    assert archived.status_code == 204
    assert hub.emu.associations("deals", deal, "companies") == []
    assert hub.emu.associations("companies", company, "deals") == []
    pair = f"/crm/v4/objects/contacts/{contact['id']}/associations/companies/{company}"
    assert hub.client.delete(pair).status_code == 204
    assert hub.emu.associations("contacts", contact["id"], "companies") == []


# -- properties, dispositions, account --------------------------------------------------------------
def test_properties_api(hub: Hub) -> None:
    listed = hub.client.get("/crm/v3/properties/calls")
    assert listed.status_code == 200
    by_name = {p["name"]: p for p in listed.json()["results"]}
    assert {o["value"] for o in by_name["hs_call_direction"]["options"]} == {"INBOUND", "OUTBOUND"}
    assert "NO_ANSWER" in {o["value"] for o in by_name["hs_call_status"]["options"]}
    assert by_name["hs_object_id"]["modificationMetadata"]["readOnlyValue"] is True
    assert by_name["hs_lastmodifieddate"]["modificationMetadata"]["readOnlyValue"] is True
    tasks = {p["name"]: p for p in hub.client.get("/crm/v3/properties/tasks").json()["results"]}
    assert "COMPLETED" in {o["value"] for o in tasks["hs_task_status"]["options"]}
    deals = hub.client.get("/crm/v3/properties/0-3/dealstage")
    assert "closedwon" in {o["value"] for o in deals.json()["options"]}
    contacts = {p["name"]: p for p in hub.client.get("/crm/v3/properties/contacts").json()["results"]}
    assert contacts["lastmodifieddate"]["modificationMetadata"]["readOnlyValue"] is True
    assert hub.client.get("/crm/v3/properties/contacts/nosuch").status_code == 404


def test_dispositions_and_account_info(hub: Hub) -> None:
    custom = hub.emu.add_disposition("Booked a demo")
    dispositions = hub.client.get("/calling/v1/dispositions").json()
    assert {d["id"]: d["label"] for d in dispositions} == {**DEFAULT_DISPOSITIONS, custom: "Booked a demo"}
    details = hub.client.get("/account-info/v3/details").json()
    assert details["portalId"] == hub.emu.portal_id
    assert {"accountType", "timeZone", "companyCurrency", "uiDomain", "dataHostingLocation"} <= set(details)
    usage = hub.client.get("/account-info/v3/api-usage/daily/private-apps").json()["results"][0]
    assert usage["name"] == "private-apps-api-calls-daily"
    assert usage["currentUsage"] >= 2 and usage["usageLimit"] > usage["currentUsage"]
    assert sorted(hub.transport.unchecked) == [
        "GET /account-info/v3/api-usage/daily/private-apps",
        "GET /account-info/v3/details",
        "GET /calling/v1/dispositions",
    ]


# -- auth -----------------------------------------------------------------------------------------
def _authorize(hub: Hub, redirect: str = "http://127.0.0.1:8765/callback") -> str:
    response = hub.client.get(
        "/oauth/authorize",
        params={
            "client_id": hub.emu.client_id,
            "redirect_uri": redirect,
            "state": "xyz",
            "scope": "oauth crm.objects.contacts.read crm.objects.contacts.write",
        },
    )
    assert response.status_code == 302
    location = httpx.URL(response.headers["Location"])
    assert str(location).startswith(redirect) and location.params["state"] == "xyz"
    return location.params["code"]


def test_oauth_code_refresh_and_expiry(make_hub: Any) -> None:
    hub = make_hub(faults=Faults(token_ttl=60))
    redirect = "http://127.0.0.1:8765/callback"
    form = {"client_id": hub.emu.client_id, "client_secret": hub.emu.client_secret}
    code = _authorize(hub, redirect)
    token = hub.client.post(
        "/oauth/v1/token", data={**form, "grant_type": "authorization_code", "code": code, "redirect_uri": redirect}
    )
    assert token.status_code == 200
    grant = token.json()
    assert grant["token_type"] == "bearer" and grant["expires_in"] == 60
    reused = hub.client.post(
        "/oauth/v1/token", data={**form, "grant_type": "authorization_code", "code": code, "redirect_uri": redirect}
    )
    assert reused.status_code == 400 and reused.json()["status"] == "BAD_AUTH_CODE"

    oauth = hub.as_token(grant["access_token"])
    assert oauth.get("/crm/v3/objects/contacts").status_code == 200
    info = hub.client.get(f"/oauth/v1/access-tokens/{grant['access_token']}").json()
    assert info["hub_id"] == hub.emu.portal_id and "crm.objects.contacts.read" in info["scopes"]

    hub.emu.clock_offset += 61
    expired = oauth.get("/crm/v3/objects/contacts")
    assert expired.status_code == 401
    assert expired.json()["category"] == "EXPIRED_AUTHENTICATION"
    assert expired.json()["message"] == "The OAuth token used to make this call expired 1 second(s) ago."

    refreshed = hub.client.post(
        "/oauth/v3/token", data={**form, "grant_type": "refresh_token", "refresh_token": grant["refresh_token"]}
    )
    assert refreshed.status_code == 200
    assert refreshed.json()["refresh_token"] == grant["refresh_token"]  # HubSpot refresh tokens are reusable
    assert hub.as_token(refreshed.json()["access_token"]).get("/crm/v3/objects/contacts").status_code == 200
    again = hub.client.post(
        "/oauth/v1/token", data={**form, "grant_type": "refresh_token", "refresh_token": grant["refresh_token"]}
    )
    assert again.status_code == 200

    introspect = hub.client.post(
        "/oauth/v3/token/introspect",
        data={**form, "token": refreshed.json()["access_token"], "token_type_hint": "access_token"},
    )
    assert introspect.json()["active"] is True

    bad_refresh = hub.client.post(
        "/oauth/v1/token", data={**form, "grant_type": "refresh_token", "refresh_token": "nope"}
    )
    assert bad_refresh.status_code == 400 and bad_refresh.json()["status"] == "BAD_REFRESH_TOKEN"
    bad_secret = hub.client.post(
        "/oauth/v1/token",
        data={**form, "client_secret": "wrong", "grant_type": "refresh_token", "refresh_token": grant["refresh_token"]},
    )
    assert bad_secret.status_code == 400 and bad_secret.json()["status"] == "BAD_CLIENT_ID"
    assert {dev.status for _, dev in hub.transport.deviations} == {400}


def test_expire_tokens_helper_and_expiry_wording(hub: Hub) -> None:
    access, _refresh = hub.emu.issue_token(ttl=10)
    hub.emu.expire_tokens()
    hub.emu.clock_offset += 7200
    response = hub.as_token(access).get("/crm/v3/objects/deals")
    assert response.json()["message"] == "The OAuth token used to make this call expired 2 hour(s) ago."


def test_missing_or_unknown_credentials_are_401(hub: Hub) -> None:
    anonymous = httpx.Client(transport=hub.transport, base_url=BASE)
    for client in (anonymous, hub.as_token("pat-na1-not-a-token")):
        response = client.get("/crm/v3/objects/contacts")
        assert response.status_code == 401
        body = response.json()
        assert body["category"] == "INVALID_AUTHENTICATION"
        assert body["message"].startswith("Authentication credentials not found")
        assert body["status"] == "error" and body["correlationId"]


def test_scopes_are_enforced_per_object(hub: Hub) -> None:
    access, _ = hub.emu.issue_token(["oauth", "crm.objects.contacts.read"])
    client = hub.as_token(access)
    assert client.get("/crm/v3/objects/contacts").status_code == 200
    assert client.get("/crm/v3/objects/calls").status_code == 200  # calls are guarded by the contacts scopes
    denied = client.post("/crm/v3/objects/contacts", json={"properties": {}, "associations": []})
    assert denied.status_code == 403
    body = denied.json()
    assert body["category"] == "MISSING_SCOPES"
    assert body["errors"][0]["context"]["requiredGranularScopes"] == ["crm.objects.contacts.write"]
    assert client.get("/crm/v3/objects/deals").status_code == 403


def test_private_app_scopes_can_be_narrowed(make_hub: Any) -> None:
    hub = make_hub(scopes=["crm.objects.companies.read"])
    assert hub.client.get("/crm/v3/objects/companies").status_code == 200
    assert hub.client.get("/crm/v3/objects/contacts").status_code == 403


# -- rate limits ------------------------------------------------------------------------------------
def test_rate_limit_bodies_and_headers(make_hub: Any) -> None:
    hub = make_hub(faults=Faults(rate_limits={"default": (100, 10.0), "search": (5, 1.0)}))
    remaining = []
    for _ in range(100):
        response = hub.client.get("/crm/v3/objects/contacts")
        assert response.status_code == 200
        assert response.headers["X-HubSpot-RateLimit-Max"] == "100"
        assert response.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
        assert "X-HubSpot-RateLimit-Daily-Remaining" in response.headers  # private-app calls
        remaining.append(int(response.headers["X-HubSpot-RateLimit-Remaining"]))
    assert remaining == list(range(99, -1, -1))
    limited = hub.client.get("/crm/v3/objects/contacts")
    assert limited.status_code == 429
    assert "Retry-After" not in limited.headers  # HubSpot documents X-HubSpot-RateLimit-*, not Retry-After
    body = limited.json()
    assert body["message"] == "You have reached your ten_secondly_rolling limit."
    assert (body["status"], body["errorType"], body["policyName"]) == ("error", "RATE_LIMIT", "TEN_SECONDLY_ROLLING")
    assert body["correlationId"] and body["groupName"]

    for _ in range(5):  # search has its own bucket
        response = hub.search("contacts")
        assert response.status_code == 200
        assert not any(h.lower().startswith("x-hubspot-ratelimit") for h in response.headers)
    slow_down = hub.search("contacts")
    assert slow_down.status_code == 429
    assert slow_down.json()["message"] == "You have reached your secondly limit."
    assert slow_down.json()["policyName"] == "SECONDLY"
    assert {dev.status for _, dev in hub.transport.deviations} == {429}


def test_oauth_calls_carry_no_daily_headers(hub: Hub) -> None:
    access, _ = hub.emu.issue_token()
    response = hub.as_token(access).get("/crm/v3/objects/companies")
    assert response.headers["X-HubSpot-RateLimit-Max"] == "190"
    assert "X-HubSpot-RateLimit-Daily" not in response.headers


def test_daily_limit_answers_429_daily(hub: Hub) -> None:
    hub.emu.daily_limit = 2
    assert [hub.client.get("/crm/v3/objects/deals").status_code for _ in range(3)] == [200, 200, 429]
    assert hub.client.get("/crm/v3/objects/deals").json()["policyName"] == "DAILY"


# -- seed data, bulk, loopback ------------------------------------------------------------------------
def test_seeding_is_deterministic_and_realistic() -> None:
    one = HubSpotEmulator(seed=42, companies=8, contacts=60, deals=10)
    two = build_hubspot(seed=42, companies=8, contacts=60, deals=10)
    other = HubSpotEmulator(seed=43, companies=8, contacts=60, deals=10)
    for obj in ("companies", "contacts", "deals"):
        assert one.records(obj) == two.records(obj)
    assert one.records("contacts") != other.records("contacts")

    companies = one.records("companies")
    contacts = one.records("contacts")
    assert len({c["properties"]["domain"] for c in companies}) == 8
    assert len({c["properties"]["email"] for c in contacts}) == 60
    assert len({c["properties"]["phone"] for c in contacts}) == 60
    names = {(c["properties"]["firstname"], c["properties"]["lastname"]) for c in contacts}
    assert len(names) == 60
    company_ids = {c["id"] for c in companies}
    for contact in contacts:
        linked = one.associations("contacts", contact["id"], "companies")
        assert len(linked) == 1 and linked[0] in company_ids
        assert contact["properties"]["email"].endswith("@" + one.get("companies", linked[0])["properties"]["domain"])
    for deal in one.records("deals"):
        assert len(one.associations("deals", deal["id"], "contacts")) == 1
        assert len(one.associations("deals", deal["id"], "companies")) == 1


@pytest.mark.slow
def test_bulk_create_25000_then_walk_them_with_search(hub: Hub) -> None:
    stamp = 1_750_000_000.0
    started = time.perf_counter()
    created = hub.emu.bulk_create("contacts", 25_000, modified_at=stamp)
    # Generous bound: the benchmarks depend on seeding being fast, not on this exact number.
    assert time.perf_counter() - started < 3.0
    assert len(set(created)) == 25_000

    # More than 10,000 records share one timestamp, so walk the slice by id (reference §3 step 3).
    ts = str(int(stamp * 1000))
    seen: list[str] = []
    last = "0"
    while True:
        after = 0
        while True:
            response = hub.search(
                "contacts",
                groups=[{"filters": [flt("lastmodifieddate", "EQ", ts), flt("hs_object_id", "GT", last)]}],
                sorts=["hs_object_id"],
                limit=200,
                after=after,
                properties=["email"],
            )
            assert response.status_code == 200, response.text
            page = ids(response)
            seen += page
            nxt = response.json().get("paging", {}).get("next")
            if not nxt or after + 400 > 10_000:
                break
            after = int(nxt["after"])
        if not page:
            break
        last = seen[-1]
        if not nxt:
            break
    assert seen == created


def test_loopback_server_speaks_the_same_api() -> None:
    emu = HubSpotEmulator(seed=1, companies=2, contacts=5)
    with emu.serve() as server:
        client = httpx.Client(
            base_url=server.url,
            headers={"Authorization": f"Bearer {emu.private_app_token}"},
            event_hooks={"response": [CHECK.hook]},
        )
        listed = client.get("/crm/v3/objects/contacts", params={"limit": 2})
        assert listed.status_code == 200
        assert listed.json()["paging"]["next"]["link"].startswith(server.url)
        created = client.post(
            "/crm/v3/objects/contacts", json={"properties": {"email": "loop@example.com"}, "associations": []}
        )
        assert created.status_code == 201
        found = client.post(
            "/crm/v3/objects/contacts/search",
            json={
                "filterGroups": [{"filters": [flt("email", "EQ", "loop@example.com")]}],
                "sorts": [],
                "limit": 1,
                "after": "0",
                "properties": ["email"],
            },
        )
        assert ids(found) == [created.json()["id"]]
        redirect = client.get(
            "/oauth/authorize",
            params={"client_id": emu.client_id, "redirect_uri": "http://127.0.0.1:9/cb", "scope": "oauth"},
        )
        assert redirect.status_code == 302 and "code=" in redirect.headers["Location"]


def test_spec_check_catches_a_non_conforming_exchange() -> None:
    """The checker is not vacuous: a wrong request and a wrong response are both reported."""
    request = httpx.Request("POST", f"{BASE}/crm/v3/objects/contacts/search", json={"sorts": [{"propertyName": "x"}]})
    response = httpx.Response(200, json={"results": [{"id": 1, "properties": {"n": 5}}]})
    problems = CHECK.check(request, response)
    assert any("request" in p and "sorts" in p for p in problems)
    assert any("response" in p and "total" in p for p in problems)
    assert CHECK.check(httpx.Request("GET", f"{BASE}/calling/v1/dispositions"), httpx.Response(200, json=[])) == []
    assert CHECK.spec_for("/calling/v1/dispositions") is None


# -- owners, schemas, legacy property lists, seeding at scale ----------------------------------------
def test_owners_list_in_pages_filter_by_email_and_get_by_id(hub: Hub) -> None:
    for n in range(7):
        hub.emu.add_owner(f"rep{n}@example.com", first_name="Rep", last_name=str(n))
    hub.emu.add_owner("left@example.com", archived=True)
    seen: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 4, **({"after": after} if after else {})}
        body = hub.client.get("/crm/v3/owners/", params=params).raise_for_status().json()
        seen.extend(body["results"])
        after = body.get("paging", {}).get("next", {}).get("after")
        if not after:
            break
    emails = [o["email"] for o in seen]
    assert len(emails) == len(set(emails)) == 10 and "left@example.com" not in emails  # 3 built in + 7
    owner = next(o for o in seen if o["email"] == "rep3@example.com")
    assert owner["type"] == "PERSON" and owner["archived"] is False and owner["teams"] == []
    assert {"id", "userId", "firstName", "lastName", "createdAt", "updatedAt"} <= set(owner)
    by_email = hub.client.get("/crm/v3/owners", params={"email": "REP3@example.com"}).json()["results"]
    assert [o["id"] for o in by_email] == [owner["id"]]
    assert hub.client.get(f"/crm/v3/owners/{owner['id']}").json() == owner
    by_user = hub.client.get(f"/crm/v3/owners/{owner['userId']}", params={"idProperty": "userId"})
    assert by_user.json()["id"] == owner["id"]
    assert hub.client.get("/crm/v3/owners/1").status_code == 404
    archived = hub.client.get("/crm/v3/owners/", params={"archived": "true"}).json()["results"]
    assert [o["email"] for o in archived] == ["left@example.com"]
    assert hub.client.get("/crm/v3/owners/", params={"limit": 501}).status_code == 400


def test_owners_need_the_owners_scope(make_hub: Any) -> None:
    scopes = [s for s in HubSpotEmulator().private_app_scopes if s != "crm.objects.owners.read"]
    hub = make_hub(scopes=scopes)
    r = hub.client.get("/crm/v3/owners/")
    assert r.status_code == 403 and r.json()["category"] == "MISSING_SCOPES"


def test_a_portal_without_custom_objects_lists_no_schemas(hub: Hub) -> None:
    for path in ("/crm/v3/schemas", "/crm-object-schemas/v3/schemas"):
        r = hub.client.get(path)
        assert r.status_code == 200 and r.json() == {"results": []}


def test_legacy_property_lists_that_singer_tap_hubspot_reads(hub: Hub) -> None:
    legacy = ("/properties/v1/deals/properties", "/properties/v2/contact/properties", "/companies/v2/properties")
    for path in legacy:
        body = hub.client.get(path).raise_for_status().json()
        assert isinstance(body, list) and body, path
        assert all({"name", "label", "type", "fieldType", "groupName", "options"} <= set(p) for p in body), path
    deals = {p["name"]: p for p in hub.client.get("/properties/v1/deals/properties").json()}
    assert deals["dealstage"]["type"] == "enumeration" and deals["dealstage"]["options"][0]["readOnly"] is False
    assert hub.client.get("/properties/v1/widgets/properties").status_code == 404


def test_standard_objects_the_app_has_no_scope_for_answer_403(hub: Hub) -> None:
    r = hub.client.get("/crm/v3/properties/tickets")
    assert r.status_code == 403 and r.json()["errors"][0]["context"]["requiredGranularScopes"] == ["tickets"]
    assert hub.client.get("/crm/v3/properties/widgets").status_code == 400  # not a HubSpot object at all


def test_seed_phones_stay_unique_past_a_hundred_thousand() -> None:
    """The seeder once drew phones from 100,000 numbers and looped for ever past them."""
    import random

    from crmsync.emulators.hubspot import _Seeder

    seeder = _Seeder(HubSpotEmulator(), random.Random(1))
    phones: list[str] = []
    drawing = threading.Thread(target=lambda: phones.extend(seeder._phone() for _ in range(160_000)), daemon=True)
    drawing.start()
    drawing.join(timeout=120)
    assert not drawing.is_alive(), "the seeder ran out of phone numbers"
    assert len(set(phones)) == 160_000
    assert all(len(p.replace(" ", "")) == 13 and p.startswith("+1 ") for p in phones[::997])


@pytest.mark.slow
def test_sandbox_serves_more_contacts_than_the_old_phone_pool(tmp_path: Path) -> None:
    """`sandbox serve hubspot --contacts 100500` once never printed its URL (the seeder looped for ever)."""
    import os
    import subprocess

    env = {**os.environ, "CRMSYNC_HOME": str(tmp_path), "NO_COLOR": "1"}
    args = ["serve", "hubspot", "--contacts", "100500", "--companies", "10", "--deals", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "crmsync", "sandbox", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        stdout = proc.stdout
        reader = threading.Thread(target=lambda: lines.extend([stdout.readline(), stdout.readline()]), daemon=True)
        reader.start()
        reader.join(timeout=180)
        assert len(lines) == 2, "no URL: the seeding did not finish"
        url, token = lines[0].strip(), lines[1].strip().partition("=")[2]
        assert url.startswith("http://127.0.0.1:")
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        body = {"filterGroups": [], "sorts": [], "limit": 1, "after": "0", "properties": ["phone"]}
        assert client.post("/crm/v3/objects/contacts/search", json=body).json()["total"] == 100_500
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "seeding 100,500 contacts" in (proc.stderr.read() if proc.stderr else "")


def test_sandbox_refuses_a_negative_size(tmp_path: Path) -> None:
    import os
    import subprocess

    env = {**os.environ, "CRMSYNC_HOME": str(tmp_path), "NO_COLOR": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "crmsync", "sandbox", "serve", "hubspot", "--contacts", "-5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_a_record_owner_must_be_one_of_the_portals_owners(hub: Hub) -> None:
    ada = hub.emu.owner_id("ada.rep@example.com")
    made = hub.create("contacts", {"email": "owned@example.org", "hubspot_owner_id": str(ada)})
    assert made.status_code == 201 and made.json()["properties"]["hubspot_owner_id"] == ada
    bad = hub.create("contacts", {"email": "bad@example.org", "hubspot_owner_id": "ada.rep@example.com"})
    assert bad.status_code == 400 and "INVALID_OPTION" in bad.text
    gone = hub.emu.add_owner("left@example.com", archived=True)
    assert hub.create("contacts", {"email": "gone@example.org", "hubspot_owner_id": gone}).status_code == 400
