"""Microsoft's own clients drive the Dynamics emulator: msal for the tokens, the PowerPlatform-Dataverse-Client
SDK for the Web API, doing what an integrator does (create, read, update, query by pages, upsert by an
alternate key, a ``$batch`` with a change set, delete). If the emulator drifts from what they expect, these fail."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import msal
import pytest
import requests
from azure.core.credentials import AccessToken
from PowerPlatform.Dataverse import client as dataverse
from requests.adapters import BaseAdapter

from crmsync.emulators.dynamics import DynamicsEmulator

ORG = "https://sdk.crm4.dynamics.com"


class EmulatorAdapter(BaseAdapter):
    """A requests transport answering in-process from the emulator (the SDK speaks requests, not httpx)."""

    def __init__(self, emulator: DynamicsEmulator) -> None:
        super().__init__()
        self.emulator = emulator

    def send(self, request: Any, **kwargs: Any) -> Any:
        body = request.body.encode() if isinstance(request.body, str) else (request.body or b"")
        answer = self.emulator(httpx.Request(request.method, request.url, headers=dict(request.headers), content=body))
        response = requests.Response()
        response.status_code = answer.status_code
        response.headers.update(answer.headers)
        response._content = answer.content
        response.url, response.request = request.url, request
        response.encoding = "utf-8"
        return response

    def close(self) -> None:
        return None


class MsalCredential:
    """An azure-core TokenCredential over msal's client-credentials flow, talking to the emulator's Entra endpoints."""

    def __init__(self, emulator: DynamicsEmulator) -> None:
        http = httpx.Client(transport=emulator.transport())
        self.app = msal.ConfidentialClientApplication(
            emulator.client_id,
            client_credential=emulator.client_secret,
            authority=f"https://login.microsoftonline.com/{emulator.tenant}",
            http_client=_Http(http),
        )
        self.calls = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls += 1
        result = self.app.acquire_token_for_client(scopes=list(scopes))
        assert "access_token" in result, result
        return AccessToken(result["access_token"], int(time.time()) + int(result["expires_in"]))


class _Http:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def get(self, url: str, params: Any = None, headers: Any = None, **_: Any) -> httpx.Response:
        return self.client.get(url, params=params, headers=headers)

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None, **_: Any) -> httpx.Response:
        return self.client.post(url, params=params, data=data, headers=headers)


@pytest.fixture
def emulator() -> DynamicsEmulator:
    return DynamicsEmulator(keys={"contact": ["emailaddress1"]})


@pytest.fixture
def client(emulator: DynamicsEmulator) -> Iterator[Any]:
    sdk = dataverse.DataverseClient(ORG, MsalCredential(emulator))
    with sdk:
        # The SDK's session (made by `with`) carries requests to the emulator instead of the network.
        sdk._session.mount(f"{ORG}/", EmulatorAdapter(emulator))
        yield sdk


def test_msal_gets_a_token_from_the_emulators_entra_endpoints(emulator: DynamicsEmulator) -> None:
    credential = MsalCredential(emulator)
    token = credential.get_token(f"{ORG}/.default")
    assert token.token in emulator.tokens and emulator.audiences[token.token] == "sdk.crm4.dynamics.com"
    wrong = msal.ConfidentialClientApplication(
        emulator.client_id,
        client_credential="not-the-secret",
        authority=f"https://login.microsoftonline.com/{emulator.tenant}",
        http_client=_Http(httpx.Client(transport=emulator.transport())),
    ).acquire_token_for_client(scopes=[f"{ORG}/.default"])
    assert wrong["error"] == "invalid_client" and 7000215 in wrong["error_codes"]


def test_the_sdk_creates_reads_updates_and_deletes_a_contact(client: Any, emulator: DynamicsEmulator) -> None:
    rid = client.records.create("contact", {"firstname": "Ada", "lastname": "Lovelace", "emailaddress1": "ada@x.org"})
    assert emulator.records("contacts")[0]["contactid"] == rid.lower()
    row = client.records.get("contact", rid, select=["fullname", "emailaddress1"])
    assert row["fullname"] == "Ada Lovelace"
    client.records.update("contact", rid, {"jobtitle": "Analyst"})
    assert emulator.records("contacts")[0]["jobtitle"] == "Analyst"
    client.records.delete("contact", rid)
    assert emulator.records("contacts") == []


def test_the_sdk_pages_a_filtered_query_by_next_link(client: Any, emulator: DynamicsEmulator) -> None:
    for i in range(25):
        emulator.create("contacts", {"lastname": f"N{i:02d}", "jobtitle": "buyer" if i % 2 else "seller"})
    pages = list(client.records.get("contact", filter="jobtitle eq 'buyer'", select=["lastname"], page_size=5))
    assert [len(p) for p in pages] == [5, 5, 2]
    names = sorted(str(r["lastname"]) for p in pages for r in p)
    assert names == [f"N{i:02d}" for i in range(25) if i % 2]


def test_the_sdk_upserts_by_an_alternate_key(client: Any, emulator: DynamicsEmulator) -> None:
    from PowerPlatform.Dataverse.models.upsert import UpsertItem

    item = UpsertItem(alternate_key={"emailaddress1": "k@x.org"}, record={"lastname": "First"})
    client.records.upsert("contact", [item])
    client.records.upsert(
        "contact", [UpsertItem(alternate_key={"emailaddress1": "k@x.org"}, record={"lastname": "Second"})]
    )
    rows = emulator.records("contacts")
    assert len(rows) == 1 and rows[0]["lastname"] == "Second" and rows[0]["emailaddress1"] == "k@x.org"


def test_the_sdk_sends_a_batch_with_a_change_set(client: Any, emulator: DynamicsEmulator) -> None:
    batch = client.batch.new()
    with batch.changeset() as cs:
        cs.records.create("account", {"name": "Acme"})
        cs.records.create("account", {"name": "Globex"})
    batch.records.create("contact", {"lastname": "Solo"})
    result = batch.execute(continue_on_error=True)
    assert [r.status_code for r in result.responses] == [204, 204, 204]
    assert sorted(a["name"] for a in emulator.records("accounts")) == ["Acme", "Globex"]
    assert emulator.stats.by_route["POST batch"] == 1
