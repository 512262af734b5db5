"""The emulators driven by the CRMs' official Python SDKs, on loopback, for what a real integrator does.

A client exception or a model that fails to deserialise fails the test: the SDKs validate every
response against their generated models (required keys, enum values, types), which catches shapes
the emulators' authors believed in but the vendors do not send.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hubspot
import pytest
from hubspot.crm.associations.v4 import BatchInputPublicDefaultAssociationMultiPost, PublicDefaultAssociationMultiPost
from hubspot.crm.contacts import (
    BatchInputSimplePublicObjectBatchInputUpsert,
    Filter,
    FilterGroup,
    PublicObjectSearchRequest,
    SimplePublicObjectBatchInputUpsert,
    SimplePublicObjectInput,
    SimplePublicObjectInputForCreate,
)
from hubspot.crm.objects.calls import SimplePublicObjectInputForCreate as CallInput
from hubspot.crm.properties import PropertyCreate
from zohocrmsdk.src.com.zoho.api.authenticator.oauth_token import OAuthToken
from zohocrmsdk.src.com.zoho.api.authenticator.store.file_store import FileStore
from zohocrmsdk.src.com.zoho.api.logger import Logger
from zohocrmsdk.src.com.zoho.crm.api import ParameterMap
from zohocrmsdk.src.com.zoho.crm.api import coql as zcoql
from zohocrmsdk.src.com.zoho.crm.api import notes as znotes
from zohocrmsdk.src.com.zoho.crm.api import record as zrecord
from zohocrmsdk.src.com.zoho.crm.api import users as zusers
from zohocrmsdk.src.com.zoho.crm.api.dc.data_center import DataCenter
from zohocrmsdk.src.com.zoho.crm.api.initializer import Initializer
from zohocrmsdk.src.com.zoho.crm.api.modules import MinifiedModule
from zohocrmsdk.src.com.zoho.crm.api.sdk_config import SDKConfig

from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.emulators.zoho import ZohoEmulator

# -- HubSpot: hubspot-api-client ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hs() -> Iterator[tuple[HubSpotEmulator, Any]]:
    emu = HubSpotEmulator(seed=21, contacts=60, companies=10, deals=5)
    server = emu.serve()
    client = hubspot.HubSpot(access_token=emu.private_app_token, host=server.url)
    try:
        yield emu, client
    finally:
        server.stop()


def test_hubspot_contacts_create_get_update_archive(hs: tuple[HubSpotEmulator, Any]) -> None:
    emu, client = hs
    api = client.crm.contacts.basic_api
    created = api.create(
        SimplePublicObjectInputForCreate(
            properties={"email": "sdk.one@example.org", "firstname": "Sdk", "lastname": "One"}, associations=[]
        )
    )
    assert created.id and created.properties["email"] == "sdk.one@example.org" and created.created_at
    got = api.get_by_id(created.id, properties=["email", "firstname"])
    assert got.properties["firstname"] == "Sdk"
    updated = api.update(created.id, SimplePublicObjectInput(properties={"firstname": "Updated"}))
    assert updated.properties["firstname"] == "Updated"
    api.archive(created.id)
    assert emu.get("contacts", created.id)["archived"] is True  # type: ignore[index]
    page = api.get_page(limit=25, properties=["email"])
    assert len(page.results) == 25 and page.paging.next.after


def test_hubspot_batch_upsert_by_email(hs: tuple[HubSpotEmulator, Any]) -> None:
    _, client = hs
    inputs = [
        SimplePublicObjectBatchInputUpsert(
            id=f"batch{i}@example.org", id_property="email", properties={"lastname": f"B{i}"}
        )
        for i in range(5)
    ]
    first = client.crm.contacts.batch_api.upsert(BatchInputSimplePublicObjectBatchInputUpsert(inputs=inputs))
    assert first.status == "COMPLETE" and len(first.results) == 5 and all(r.new for r in first.results)
    again = client.crm.contacts.batch_api.upsert(BatchInputSimplePublicObjectBatchInputUpsert(inputs=inputs))
    assert {r.id for r in again.results} == {r.id for r in first.results} and not any(r.new for r in again.results)


def test_hubspot_search_pages_through_every_match(hs: tuple[HubSpotEmulator, Any]) -> None:
    emu, client = hs
    expected = {r["id"] for r in emu.records("contacts") if r["properties"].get("email")}
    seen: list[str] = []
    after: str | None = None
    while True:
        request = PublicObjectSearchRequest(
            filter_groups=[FilterGroup(filters=[Filter(property_name="email", operator="HAS_PROPERTY")])],
            sorts=["hs_object_id"],
            properties=["email"],
            limit=20,
            after=after,
        )
        page = client.crm.contacts.search_api.do_search(public_object_search_request=request)
        seen.extend(r.id for r in page.results)
        if page.paging is None:
            break
        after = page.paging.next.after
    assert len(seen) == len(set(seen)) and set(seen) == expected


def test_hubspot_calls_with_associations(hs: tuple[HubSpotEmulator, Any]) -> None:
    emu, client = hs
    contact = emu.records("contacts")[0]["id"]
    company = emu.records("companies")[0]["id"]
    call = client.crm.objects.calls.basic_api.create(
        CallInput(
            properties={"hs_timestamp": "2026-11-20T10:00:00Z", "hs_call_title": "SDK call", "hs_call_body": "Hi"},
            associations=[
                {"to": {"id": contact}, "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 194}]}
            ],
        )
    )
    assert call.properties["hs_call_title"] == "SDK call"
    v4 = client.crm.associations.v4
    v4.basic_api.create_default("calls", call.id, "companies", company)
    targets = v4.basic_api.get_page("calls", call.id, "contacts")
    assert [str(r.to_object_id) for r in targets.results] == [contact]
    deal = emu.records("deals")[0]["id"]
    result = v4.batch_api.create_default(
        "deals",
        "contacts",
        BatchInputPublicDefaultAssociationMultiPost(
            inputs=[PublicDefaultAssociationMultiPost(_from={"id": deal}, to={"id": contact})]
        ),
    )
    assert result.status == "COMPLETE"
    assert contact in {str(r.to_object_id) for r in v4.basic_api.get_page("deals", deal, "contacts").results}


def test_hubspot_properties_owners_and_schemas(hs: tuple[HubSpotEmulator, Any]) -> None:
    emu, client = hs
    props = client.crm.properties.core_api.get_all("contacts")
    assert {"email", "hubspot_owner_id"} <= {p.name for p in props.results}
    made = client.crm.properties.core_api.create(
        "contacts",
        PropertyCreate(
            name="sdk_score", label="SDK score", type="number", field_type="number", group_name="contactinformation"
        ),
    )
    assert made.name == "sdk_score"
    owners = client.crm.owners.owners_api.get_page(limit=2)
    assert len(owners.results) == 2 and owners.paging.next.after
    rest = client.crm.owners.owners_api.get_page(limit=2, after=owners.paging.next.after)
    emails = {o.email for o in owners.results + rest.results}
    assert {emu.user, "ada.rep@example.com", "ben.rep@example.com"} <= emails
    one = client.crm.owners.owners_api.get_by_id(int(owners.results[0].id))
    assert one.email == owners.results[0].email and one.type == "PERSON"
    by_email = client.crm.owners.owners_api.get_page(email="ada.rep@example.com")
    assert [o.id for o in by_email.results] == [emu.owner_id("ada.rep@example.com")]
    assert client.crm.schemas.core_api.get_all().results == []


# -- Zoho: zohocrmsdk8-0 ------------------------------------------------------------------------------
# The SDK takes any DataCenter.Environment: API, accounts and file URLs all point at the loopback server.
# It keeps its configuration in process-wide state (Initializer), so one module fixture serves every test.


@pytest.fixture(scope="module")
def zoho(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZohoEmulator]:
    emu = ZohoEmulator(seed=22, contacts=45, accounts=6, deals=5)
    for n in range(3):
        emu.add_user(f"sdkrep{n:03d}@zylkr.com", first_name="Sdk", last_name=f"Rep{n}")
    server = emu.serve()
    work: Path = tmp_path_factory.mktemp("zoho-sdk")
    Initializer.initialize(
        environment=DataCenter.Environment(server.url, f"{server.url}/oauth/v2/token", server.url),
        token=OAuthToken(access_token=emu.issue_token()["access_token"]),
        store=FileStore(str(work / "tokens.txt")),
        sdk_config=SDKConfig(auto_refresh_fields=False, pick_list_validation=True),
        resource_path=str(work),
        logger=Logger.get_instance(Logger.Levels.WARNING, str(work / "sdk.log")),
    )
    logging.getLogger("SDKLogger").propagate = False
    try:
        yield emu
    finally:
        server.stop()


def ok(response: Any, wrapper: type) -> Any:
    """The response's body object, which must be ``wrapper`` (an APIException or a parse failure fails)."""
    assert response is not None
    body = response.get_object()
    if not isinstance(body, wrapper):
        detail = (body.get_code().get_value(), body.get_message().get_value()) if hasattr(body, "get_code") else body
        pytest.fail(f"{response.get_status_code()}: expected {wrapper.__name__}, got {detail}")
    return body


def successes(action: Any) -> list[Any]:
    """Every item of an action answer, each a SuccessResponse (an item's APIException fails)."""
    items = action.get_data()
    bad = [
        (i.get_code().get_value(), i.get_details())
        for i in items
        if not hasattr(i, "get_details") or i.get_status().get_value() != "success"
    ]
    assert not bad, bad
    return items


def test_zoho_records_create_get_update_upsert_delete(zoho: ZohoEmulator) -> None:
    ops = zrecord.RecordOperations("Contacts")
    rec = zrecord.Record()
    rec.add_key_value("Last_Name", "Sdk")
    rec.add_key_value("Email", "sdk.contact@example.org")
    body = zrecord.BodyWrapper()
    body.set_data([rec])
    created = successes(ok(ops.create_records(body), zrecord.ActionWrapper))
    rid = created[0].get_details()["id"]
    got = ok(ops.get_record(int(rid)), zrecord.ResponseWrapper).get_data()[0]
    assert got.get_key_value("Email") == "sdk.contact@example.org"
    assert got.get_key_value("Owner").get_id() == int(zoho.current_user["id"])

    change = zrecord.Record()
    change.add_key_value("Title", "Buyer")
    body = zrecord.BodyWrapper()
    body.set_data([change])
    successes(ok(ops.update_record(int(rid), body), zrecord.ActionWrapper))

    again = zrecord.Record()
    again.add_key_value("Last_Name", "Sdk")
    again.add_key_value("Email", "sdk.contact@example.org")
    again.add_key_value("Department", "Ops")
    body = zrecord.BodyWrapper()
    body.set_data([again])
    body.set_duplicate_check_fields(["Email"])
    upserted = successes(ok(ops.upsert_records(body), zrecord.ActionWrapper))
    assert upserted[0].get_details()["id"] == rid and upserted[0].get_action().get_value() == "update"
    record = zoho.records("Contacts")
    assert next(r for r in record if r["id"] == rid)["Department"] == "Ops"

    params = ParameterMap()
    params.add(zrecord.GetRecordsParam.fields, "Last_Name,Email,Owner,Account_Name")
    params.add(zrecord.GetRecordsParam.per_page, 20)
    page = ok(ops.get_records(params), zrecord.ResponseWrapper)
    assert len(page.get_data()) == 20 and page.get_info().get_more_records()

    successes(ok(ops.delete_record(int(rid)), zrecord.ActionWrapper))
    assert rid not in {r["id"] for r in zoho.records("Contacts")}


def test_zoho_coql_pages_through_a_module(zoho: ZohoEmulator) -> None:
    ids: list[str] = []
    offset = 0
    while True:
        body = zcoql.BodyWrapper()
        body.set_select_query(
            f"select Last_Name, Email from Contacts where Last_Name is not null order by id limit {offset}, 20"
        )
        response = zcoql.CoqlOperations().get_records(body)
        if response.get_status_code() == 204:
            break
        page = ok(response, zcoql.ResponseWrapper)
        ids.extend(str(r.get_id()) for r in page.get_data())
        if not page.get_info().get_more_records():
            break
        offset += 20
    assert len(ids) == len(set(ids)) and set(ids) == {r["id"] for r in zoho.records("Contacts")}


def test_zoho_notes_on_a_contact(zoho: ZohoEmulator) -> None:
    contact = zoho.records("Contacts")[0]["id"]
    note = znotes.Note()
    note.set_note_title("Call recap")
    note.set_note_content("Wants a demo next week")
    parent = znotes.ParentId()
    module = MinifiedModule()
    module.set_api_name("Contacts")
    parent.set_module(module)
    parent.set_id(int(contact))
    note.set_parent_id(parent)
    body = znotes.BodyWrapper()
    body.set_data([note])
    created = successes(ok(znotes.NotesOperations().create_notes(body), znotes.ActionWrapper))
    nid = created[0].get_details()["id"]
    params = ParameterMap()
    params.add(znotes.GetNotesParam.fields, "Note_Title,Note_Content,Parent_Id,Owner")
    listed = ok(znotes.NotesOperations().get_notes(params), znotes.ResponseWrapper).get_data()
    mine = next(n for n in listed if str(n.get_id()) == nid)
    assert mine.get_note_title() == "Call recap" and mine.get_note_content() == "Wants a demo next week"
    assert str(mine.get_parent_id().get_id()) == contact
    assert mine.get_parent_id().get_module().get_api_name() == "Contacts"


def test_zoho_users_paged_and_one_by_id(zoho: ZohoEmulator) -> None:
    emails: list[str] = []
    page = 1
    while True:
        params = ParameterMap()
        params.add(zusers.GetUsersParam.type, "ActiveUsers")
        params.add(zusers.GetUsersParam.page, page)
        params.add(zusers.GetUsersParam.per_page, 2)
        body = ok(zusers.UsersOperations().get_users(params), zusers.ResponseWrapper)
        emails.extend(u.get_email() for u in body.get_users())
        if not body.get_info().get_more_records():
            break
        page += 1
    assert emails == [u["email"] for u in zoho.users] and page == 3
    one = ok(zusers.UsersOperations().get_user(int(zoho.users[2]["id"])), zusers.ResponseWrapper).get_users()[0]
    assert one.get_email() == zoho.users[2]["email"]
