"""A Pipedrive client no one here wrote drives the emulator: ``pipedrive-python-lib`` (requests-based).

That library speaks v1 only, so it covers what the emulator serves of v1 and of OAuth: the code
exchange and the refresh (client credentials in Basic), ``api_domain`` as its base, ``users/me``,
``users``, and webhook list/delete (its create sends no ``name``, which the current spec requires, and is
refused as documented); its ``?api_token=`` query string is refused, as crmsync
refuses to send it. Every exchange is also checked against the official specs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pipedrive.client as pipedrive  # pipedrive-python-lib, in the test extra
import pytest

from crmsync.emulators.pipedrive import PipedriveEmulator
from tests.openapi_check import SpecCheck


class CheckedEmulator(PipedriveEmulator):
    """The emulator with every exchange checked against the official v1/v2 specs."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.spec = SpecCheck.pipedrive()
        self.problems: list[str] = []
        self.checked = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        response = super().__call__(request)
        response.read()
        result = self.spec.evaluate(request, response)
        self.checked += int(result.covered)
        self.problems += result.problems
        return response


@pytest.fixture
def served() -> Iterator[tuple[CheckedEmulator, str]]:
    emulator = CheckedEmulator(limits=True)
    server = emulator.serve()
    try:
        yield emulator, server.url
    finally:
        server.stop()


def test_the_library_connects_by_oauth_and_reads_the_user_and_webhooks(served: tuple[CheckedEmulator, str]) -> None:
    emulator, url = served
    client = pipedrive.Client(client_id=emulator.client_id, client_secret=emulator.client_secret)
    client.OAUTH_BASE_URL = f"{url}/oauth/"
    redirect = "http://127.0.0.1:8719/callback"
    consent = httpx.get(client.authorization_url(redirect, state="s1"), follow_redirects=False)
    assert consent.status_code == 302
    query = dict(httpx.URL(consent.headers["location"]).params)
    assert query["state"] == "s1"
    tokens = client.exchange_code(redirect, query["code"])
    assert tokens["token_type"] == "Bearer" and tokens["api_domain"] == url
    with pytest.raises(pipedrive.exceptions.BadRequestError):
        client.exchange_code(redirect, query["code"])  # a code is good once

    api = pipedrive.Client(domain=tokens["api_domain"])
    api.set_access_token(tokens["access_token"])
    me = api.users.get_me()
    assert me["data"]["company_id"] == emulator.company_id and me["data"]["email"] == "admin@example.com"
    assert {u["email"] for u in api.users.get_all_users()["data"]} >= {"rep1@example.com", "rep2@example.com"}

    # The library sends no ``name``, which the current v1 spec requires: refused, as documented.
    with pytest.raises(pipedrive.exceptions.BadRequestError):
        api.webhooks.create_hook_subscription("https://hooks.example.com/pd", "*", "person")
    made = httpx.post(
        f"{url}/v1/webhooks",
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        json={"subscription_url": "https://hooks.example.com/pd", "event_action": "*", "event_object": "person"}
        | {"name": "made elsewhere"},
    ).json()["data"]
    listed = api.webhooks.get_hooks_subscription()["data"]
    assert [(h["id"], h["event_object"]) for h in listed] == [(made["id"], "person")]
    api.webhooks.delete_hook_subscription(made["id"])
    assert api.webhooks.get_hooks_subscription()["data"] == []

    renewed = client.refresh_token(tokens["refresh_token"])
    assert renewed["access_token"] != tokens["access_token"]
    api.set_access_token(renewed["access_token"])
    assert api.users.get_me()["data"]["id"] == 1
    # The only problem is the library's own request: a webhook without the name the spec requires.
    assert all("'name' is a required property" in p for p in emulator.problems), emulator.problems[:5]
    assert len(emulator.problems) == 1
    assert emulator.checked >= 8  # the v1 routes the specs cover (users, webhooks)


def test_the_library_s_token_in_the_query_string_and_a_wrong_secret_are_refused(
    served: tuple[CheckedEmulator, str],
) -> None:
    emulator, url = served
    api = pipedrive.Client(domain=url)
    api.set_api_token(emulator.api_token)  # the library sends it as ?api_token=, which lands in logs
    with pytest.raises(pipedrive.exceptions.UnauthorizedError):
        api.users.get_me()
    wrong = pipedrive.Client(client_id=emulator.client_id, client_secret="not-it")
    wrong.OAUTH_BASE_URL = f"{url}/oauth/"
    with pytest.raises(pipedrive.exceptions.UnauthorizedError):
        wrong.refresh_token("anything")
