"""The Odoo emulator: both transports, version differences, domains and write_date semantics."""

from __future__ import annotations

import email.utils
import re
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from crmsync.emulators.base import Faults
from crmsync.emulators.odoo import OdooEmulator, build_odoo

BASE_URL = "http://odoo.test"
T0 = datetime(2024, 3, 1, 12, 0, 0)


class CallError(Exception):
    """An Odoo error as a client sees it: the exception name, its message, and where it came from."""

    def __init__(self, name: str, message: str, *, status: int, code: int | None = None) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.message, self.status, self.code = name, message, status, code


class JsonRpc:
    """execute_kw over /jsonrpc; record ids go first in args, everything else by name."""

    transport = "jsonrpc"

    def __init__(self, emu: OdooEmulator) -> None:
        self.emu = emu
        self.http = httpx.Client(transport=emu.transport(), base_url=BASE_URL)

    def rpc(self, service: str, method: str, *args: Any) -> dict[str, Any]:
        body = {
            "jsonrpc": "2.0",
            "method": "call",
            "id": 7,
            "params": {"service": service, "method": method, "args": list(args)},
        }
        response = self.http.post("/jsonrpc", json=body)
        assert response.status_code == 200
        payload: dict[str, Any] = response.json()
        assert payload["jsonrpc"] == "2.0" and payload["id"] == 7
        return payload

    def call(self, model: str, method: str, ids: Any = None, **kwargs: Any) -> Any:
        positional: list[Any] = []
        if method == "create":
            positional = [kwargs.pop("vals_list")]
        elif ids is not None:
            positional = [ids]
        payload = self.rpc(
            "object", "execute_kw", self.emu.db, self.emu.uid, self.emu.api_key, model, method, positional, kwargs
        )
        if "error" in payload:
            data = payload["error"]["data"]
            raise CallError(data["name"], data["message"], status=200, code=payload["error"]["code"])
        return payload.get("result")


class Json2:
    """POST /json/2/<model>/<method> with named arguments."""

    transport = "json2"

    def __init__(self, emu: OdooEmulator) -> None:
        self.emu = emu
        self.http = httpx.Client(transport=emu.transport(), base_url=BASE_URL)
        self.headers = {"Authorization": f"bearer {emu.api_key}", "X-Odoo-Database": emu.db}

    def post(self, model: str, method: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.http.post(f"/json/2/{model}/{method}", json=body, headers=headers or self.headers)

    def call(self, model: str, method: str, ids: Any = None, **kwargs: Any) -> Any:
        if ids is not None:
            kwargs["ids"] = ids
        response = self.post(model, method, kwargs)
        if response.status_code != 200:
            body = response.json()
            assert set(body) == {"name", "message", "arguments", "context", "debug"}
            raise CallError(body["name"], body["message"], status=response.status_code)
        return response.json()


@pytest.fixture
def emu() -> OdooEmulator:
    return OdooEmulator(version=19)


@pytest.fixture(params=["jsonrpc", "json2"])
def client(request: pytest.FixtureRequest, emu: OdooEmulator) -> JsonRpc | Json2:
    return JsonRpc(emu) if request.param == "jsonrpc" else Json2(emu)


def make(version: int = 19, **kwargs: Any) -> tuple[OdooEmulator, JsonRpc]:
    emu = OdooEmulator(version=version, **kwargs)
    return emu, JsonRpc(emu)


# -- envelopes, versions, authentication ---------------------------------------------------------------
@pytest.mark.parametrize("version", [16, 17, 18, 19])
def test_common_version_and_authenticate(version: int) -> None:
    emu, rpc = make(version)
    info = rpc.rpc("common", "version")["result"]
    assert info == {
        "server_version": f"{version}.0",
        "server_version_info": [version, 0, 0, "final", 0, ""],
        "server_serie": f"{version}.0",
        "protocol_version": 1,
    }
    assert rpc.rpc("common", "authenticate", "acme", "bot@example.com", emu.api_key, {})["result"] == emu.uid
    # bad credentials are a result, not an error
    assert rpc.rpc("common", "authenticate", "acme", "bot@example.com", "0" * 40, {})["result"] is False


@pytest.mark.parametrize(("version", "code"), [(16, 200), (17, 200), (18, 200), (19, 0)])
def test_jsonrpc_error_envelope_code_depends_on_version(version: int, code: int) -> None:
    emu, rpc = make(version)
    payload = rpc.rpc("object", "execute_kw", "acme", emu.uid, "wrong-key", "res.partner", "search", [[]], {})
    error = payload["error"]
    assert "result" not in payload
    assert error["code"] == code and error["message"] == "Odoo Server Error"
    assert error["data"]["name"] == "odoo.exceptions.AccessDenied"
    assert error["data"]["message"] == "Access Denied"
    assert set(error["data"]) == {"name", "message", "arguments", "context", "debug"}


def test_wrong_database_is_a_postgres_error() -> None:
    emu, rpc = make()
    payload = rpc.rpc("common", "authenticate", "nope", "bot@example.com", emu.api_key, {})
    assert payload["error"]["data"]["name"] == "psycopg2.OperationalError"
    assert 'database "nope" does not exist' in payload["error"]["data"]["message"]


def test_password_also_works_and_expired_key_fails_everywhere() -> None:
    emu, rpc = make(password="s3cret", key_expired=True)
    assert rpc.rpc("common", "authenticate", "acme", "bot@example.com", "s3cret", {})["result"] == emu.uid
    assert rpc.rpc("common", "authenticate", "acme", "bot@example.com", emu.api_key, {})["result"] is False
    with pytest.raises(CallError) as exc:
        rpc.call("res.partner", "search", domain=[])
    assert exc.value.name == "odoo.exceptions.AccessDenied"
    response = Json2(emu).post("res.partner", "search", {"domain": []})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["name"] == "werkzeug.exceptions.Unauthorized"
    assert response.json()["message"] == "Invalid apikey"


def test_json2_auth_database_and_routing_errors(emu: OdooEmulator) -> None:
    j2 = Json2(emu)
    missing = j2.post("res.partner", "search", {"domain": []}, headers={"X-Odoo-Database": "acme"})
    assert missing.status_code == 401 and "Bearer" in missing.json()["message"]
    wrong_db = j2.post("res.partner", "search", {"domain": []}, headers={**j2.headers, "X-Odoo-Database": "other"})
    assert wrong_db.status_code == 404 and wrong_db.headers["Content-Type"].startswith("text/html")
    no_db_header = j2.post(
        "res.partner", "search_count", {"domain": []}, headers={"Authorization": j2.headers["Authorization"]}
    )
    assert no_db_header.status_code == 200  # a mono-database server picks its only database
    get = j2.http.get("/json/2/res.partner/search", headers=j2.headers)
    assert get.status_code == 404 and get.json()["name"] == "werkzeug.exceptions.NotFound"
    bad_json = j2.http.post("/json/2/res.partner/search", content=b"{nope", headers=j2.headers)
    assert bad_json.status_code == 400 and bad_json.json()["name"] == "werkzeug.exceptions.BadRequest"
    assert j2.call("res.users", "context_get")["uid"] == emu.uid


def test_json2_argument_errors(emu: OdooEmulator) -> None:
    j2 = Json2(emu)
    cases = [
        ("res.partner", "search", {"domain": [], "nope": 1}, 422, "werkzeug.exceptions.UnprocessableEntity"),
        # search_read takes **read_kwargs: binding passes, read() then raises
        ("res.partner", "search_read", {"domain": [], "nope": 1}, 500, "builtins.TypeError"),
        ("res.partner", "search_read", {"ids": [1], "domain": []}, 422, "werkzeug.exceptions.UnprocessableEntity"),
        ("res.partner", "write", {"ids": [1]}, 422, "werkzeug.exceptions.UnprocessableEntity"),
        ("res.partner", "frobnicate", {}, 404, "werkzeug.exceptions.NotFound"),
        ("res.partnerx", "search", {"domain": []}, 404, "werkzeug.exceptions.NotFound"),
        ("ir.model.data", "_xmlid_to_res_id", {"xmlid": "base.main_partner"}, 403, "odoo.exceptions.AccessError"),
        ("crm.lead", "create", {"vals_list": [{"name": "x", "type": "deal"}]}, 500, "builtins.ValueError"),
    ]
    for model, method, body, status, name in cases:
        response = j2.post(model, method, body)
        assert (response.status_code, response.json()["name"]) == (status, name), (model, method)
    assert j2.post("ir.model.data", "_xmlid_to_res_id", {}).json()["message"] == (
        "Private methods (such as 'ir.model.data._xmlid_to_res_id') cannot be called remotely."
    )


@pytest.mark.parametrize("version", [16, 17, 18])
def test_json2_and_web_version_do_not_exist_before_19(version: int) -> None:
    emu, _ = make(version)
    http = httpx.Client(transport=emu.transport(), base_url=BASE_URL)
    response = http.post(
        "/json/2/res.partner/search", json={"domain": []}, headers={"Authorization": f"bearer {emu.api_key}"}
    )
    assert response.status_code == 404
    assert http.get("/web/version").status_code == 404


def test_web_version_on_19_has_the_web_shape_not_common_version(emu: OdooEmulator) -> None:
    http = httpx.Client(transport=emu.transport(), base_url=BASE_URL)
    for path in ("/web/version", "/json/version"):
        assert http.get(path).json() == {"version_info": [19, 0, 0, "final", 0, ""], "version": "19.0"}


def test_jsonrpc_quirks(emu: OdooEmulator) -> None:
    rpc = JsonRpc(emu)
    # call_kw looks at args[0] to tell a dict from a list: create vals must be positional
    payload = rpc.rpc(
        "object", "execute_kw", "acme", emu.uid, emu.api_key, "res.partner", "create", [], {"vals_list": {"name": "x"}}
    )
    assert payload["error"]["data"]["name"] == "builtins.IndexError"
    assert emu.records("res.partner")[-1]["name"] != "x"
    with pytest.raises(CallError, match=re.escape("Object crm.leadx doesn't exist")) as exc:
        rpc.call("crm.leadx", "search", domain=[])
    assert exc.value.name == "odoo.exceptions.UserError"
    with pytest.raises(CallError) as exc:
        rpc.call("res.partner", "frobnicate", [1])
    assert exc.value.name == "builtins.AttributeError"
    with pytest.raises(CallError) as exc:
        rpc.call("res.partner", "message_post", [1, 3], body="x")
    assert exc.value.message == "Expected singleton: res.partner(1, 3)"


def test_crm_not_installed_means_no_crm_models() -> None:
    emu, rpc = make(crm_installed=False)
    with pytest.raises(CallError, match=re.escape("Object crm.lead doesn't exist")):
        rpc.call("crm.lead", "search_count", domain=[])
    assert (
        Json2(emu).post("crm.lead", "search_count", {"domain": []}).json()["message"]
        == "the model 'crm.lead' does not exist"
    )
    assert rpc.call("ir.model", "search_count", domain=[("model", "=like", "crm.%")]) == 0


# -- CRUD over both transports --------------------------------------------------------------------------
def test_create_read_write_unlink(client: JsonRpc | Json2, emu: OdooEmulator) -> None:
    company = client.call("res.partner", "create", vals_list={"name": "Acme", "is_company": True, "vat": "BE0123"})
    if client.transport == "json2":
        company = company[0]  # JSON-2 always returns the ids of the created recordset
    assert isinstance(company, int)
    ids = client.call("res.partner", "create", vals_list=[{"name": "Ann", "parent_id": company}, {"name": "Bob"}])
    assert isinstance(ids, list) and len(ids) == 2
    rows = client.call(
        "res.partner",
        "read",
        ids=[ids[0], 999_999, ids[1]],
        fields=["name", "parent_id", "email", "vat", "commercial_partner_id"],
    )
    assert [r["id"] for r in rows] == ids  # the missing id is silently dropped
    assert rows[0]["parent_id"] == [company, "Acme"] and rows[0]["vat"] == "BE0123"
    assert rows[0]["commercial_partner_id"] == [company, "Acme"]
    assert rows[1]["parent_id"] is False and rows[1]["email"] is False
    assert client.call("res.partner", "read", ids=[ids[0]], fields=["display_name"])[0]["display_name"] == "Acme, Ann"
    assert client.call("res.partner", "write", ids=[ids[1]], vals={"email": "bob@example.com"}) is True
    assert emu.get("res.partner", ids[1])["email"] == "bob@example.com"  # type: ignore[index]
    assert client.call("res.partner", "unlink", ids=[ids[1]]) is True
    with pytest.raises(CallError) as exc:
        client.call("res.partner", "write", ids=[ids[1]], vals={"name": "ghost"})
    assert exc.value.name == "odoo.exceptions.MissingError"
    assert exc.value.status == (404 if client.transport == "json2" else 200)
    with pytest.raises(CallError) as exc:
        client.call("res.partner", "read", ids=[company], fields=["nope"])
    assert exc.value.name == "builtins.ValueError" and "Invalid field 'nope'" in exc.value.message


def test_one_create_call_shares_one_write_date(client: JsonRpc | Json2, emu: OdooEmulator) -> None:
    ids = client.call("res.partner", "create", vals_list=[{"name": f"P{i}"} for i in range(5)])
    stamps = {emu.get("res.partner", i)["write_date"] for i in ids}  # type: ignore[index]
    assert len(stamps) == 1
    (stamp,) = stamps
    rows = client.call("res.partner", "read", ids=ids, fields=["write_date", "create_date"])
    assert {r["write_date"] for r in rows} == {stamp.strftime("%Y-%m-%d %H:%M:%S")}  # truncated, no microseconds
    later = client.call("res.partner", "create", vals_list=[{"name": "later"}])
    assert emu.get("res.partner", later[0])["write_date"] > stamp  # type: ignore[index]


def test_fields_get_and_custom_fields(client: JsonRpc | Json2, emu: OdooEmulator) -> None:
    emu.add_field("res.partner", "x_call_score", "integer", string="Call score")
    desc = client.call(
        "res.partner", "fields_get", attributes=["type", "string", "required", "readonly", "relation", "selection"]
    )
    assert desc["parent_id"] == {
        "type": "many2one",
        "string": "Related Company",
        "required": False,
        "readonly": False,
        "relation": "res.partner",
    }
    assert desc["x_call_score"]["type"] == "integer"
    assert "mobile" not in desc  # removed in 19
    lead = client.call("crm.lead", "fields_get", allfields=["type", "won_status"], attributes=["selection", "readonly"])
    assert lead["type"]["selection"] == [["lead", "Lead"], ["opportunity", "Opportunity"]]
    assert lead["won_status"]["readonly"] is True
    pid = client.call("res.partner", "create", vals_list=[{"name": "Scored", "x_call_score": 7}])[0]
    assert client.call("res.partner", "search_read", domain=[("x_call_score", ">", 5)], fields=["x_call_score"]) == [
        {"id": pid, "x_call_score": 7}
    ]
    with pytest.raises(ValueError, match=re.escape("x_")):
        emu.add_field("res.partner", "call_score")


@pytest.mark.parametrize("version", [18, 19])
def test_mobile_exists_until_18(version: int) -> None:
    _emu, rpc = make(version)
    if version == 18:
        pid = rpc.call("res.partner", "create", vals_list={"name": "M", "mobile": "+32 470"})
        assert rpc.call("res.partner", "read", [pid], fields=["mobile"])[0]["mobile"] == "+32 470"
        return
    with pytest.raises(CallError, match=re.escape("Invalid field 'mobile' in 'res.partner'")):
        rpc.call("res.partner", "create", vals_list={"name": "M", "mobile": "+32 470"})
    with pytest.raises(CallError, match=re.escape("Invalid field 'mobile' on model 'res.partner'")):
        rpc.call("res.partner", "read", [3], fields=["mobile"])
    with pytest.raises(CallError, match=re.escape("Invalid field 'mobile' on model 'res.partner'")):
        rpc.call("res.partner", "write", [3], vals={"mobile": "x"})
    with pytest.raises(CallError, match=re.escape("Invalid field res.partner.mobile in condition")):
        rpc.call("res.partner", "search", domain=[("mobile", "=", "x")])


# -- domains, ordering, paging ---------------------------------------------------------------------------
@pytest.fixture
def people(emu: OdooEmulator) -> dict[str, int]:
    acme = emu.bulk_create("res.partner", 1, vals_fn=lambda i: {"name": "Acme", "is_company": True})[0]
    globex = emu.bulk_create("res.partner", 1, vals_fn=lambda i: {"name": "Globex", "is_company": True})[0]
    specs = [
        ("ann", {"name": "Ann Lee", "parent_id": acme, "email": "ann@acme.com", "city": "Paris"}),
        ("bob", {"name": "Bob Ray", "parent_id": acme, "email": "BOB@acme.com"}),
        ("cid", {"name": "Cid Moe", "parent_id": globex, "phone": "+1 555"}),
        ("dee", {"name": "Dee_Dee", "active": False}),
    ]
    ids = {"acme": acme, "globex": globex}
    for key, vals in specs:
        ids[key] = emu.bulk_create("res.partner", 1, vals_fn=lambda i, v=vals: v)[0]  # type: ignore[misc]
    return ids


def test_domains(client: JsonRpc | Json2, people: dict[str, int]) -> None:
    def ids(domain: list[Any], **kw: Any) -> set[int]:
        return set(client.call("res.partner", "search", domain=domain, **kw))

    p = people
    assert ids([("parent_id", "=", p["acme"])]) == {p["ann"], p["bob"]}
    assert ids([("parent_id", "in", [p["acme"], p["globex"]]), ("email", "ilike", "bob")]) == {p["bob"]}
    assert ids(["|", ("email", "like", "ann"), ("phone", "!=", False)]) == {p["ann"], p["cid"]}
    assert ids([("email", "like", "bob")]) == set()  # like is case-sensitive
    assert ids(["!", ("parent_id", "=", False), ("name", "not in", ["Ann Lee"])]) == {p["bob"], p["cid"]}
    assert ids([("name", "=like", "%Moe")]) == {p["cid"]}
    assert ids([("name", "=ilike", "ann%")]) == {p["ann"]}
    assert ids([("parent_id.name", "=", "Globex")]) == {p["cid"]}
    assert ids([("parent_id", "=", "Acme")]) == {p["ann"], p["bob"]}  # a name on a many2one compares display names
    # != keeps NULLs (Odoo adds "OR field IS NULL")
    assert p["bob"] in ids([("city", "!=", "Paris"), ("parent_id", "=", p["acme"])])
    # archived rows are hidden unless the domain or the context asks for them
    assert p["dee"] not in ids([("name", "ilike", "dee")])
    assert ids([("name", "ilike", "dee"), ("active", "in", [True, False])]) == {p["dee"]}
    assert ids([("name", "ilike", "dee")], context={"active_test": False}) == {p["dee"]}
    assert client.call("res.partner", "search_count", domain=[("is_company", "=", True)]) == 3  # + YourCompany
    with pytest.raises(CallError) as exc:
        client.call("res.partner", "search", domain=[("name", "~", "x")])
    assert exc.value.name == "builtins.ValueError"


def test_order_limit_offset(client: JsonRpc | Json2, people: dict[str, int]) -> None:
    rows = client.call(
        "res.partner",
        "search_read",
        domain=[("parent_id", "!=", False)],
        fields=["name"],
        order="name desc",
        limit=2,
        offset=1,
    )
    assert [r["name"] for r in rows] == ["Bob Ray", "Ann Lee"]
    by_parent = client.call(
        "res.partner", "search_read", domain=[("parent_id", "!=", False)], fields=["name"], order="parent_id desc, id"
    )
    assert [r["name"] for r in by_parent] == ["Cid Moe", "Ann Lee", "Bob Ray"]  # many2one sorts on the company name
    with pytest.raises(CallError, match=re.escape("Invalid field 'nope'")):
        client.call("res.partner", "search", domain=[], order="nope asc")


def test_order_by_write_date_uses_hidden_microseconds(client: JsonRpc | Json2, emu: OdooEmulator) -> None:
    first, second = emu.bulk_create("res.partner", 2)
    emu.edit("res.partner", first, {"city": "Late"}, at=T0.replace(microsecond=900_000))
    emu.edit("res.partner", second, {"city": "Early"}, at=T0.replace(microsecond=100_000))
    rows = client.call(
        "res.partner",
        "search_read",
        domain=[("id", "in", [first, second])],
        fields=["write_date"],
        order="write_date asc, id asc",
    )
    assert [r["write_date"] for r in rows] == ["2024-03-01 12:00:00"] * 2  # the client cannot tell them apart...
    assert [r["id"] for r in rows] == [second, first]  # ...but the database orders by microseconds


@pytest.mark.parametrize("version", [17, 18, 19])
def test_datetime_domain_rounding(version: int) -> None:
    emu, rpc = make(version)
    a, b, c = emu.bulk_create("res.partner", 3)
    for rid, micro_offset in ((a, 100_000), (b, 900_000), (c, 1_200_000)):
        emu.edit("res.partner", rid, {}, at=T0 + timedelta(microseconds=micro_offset))
    mine = [("id", "in", [a, b, c])]

    def found(op: str, value: str) -> set[int]:
        return set(rpc.call("res.partner", "search", domain=[*mine, ("write_date", op, value)]))

    t, t1 = "2024-03-01 12:00:00", "2024-03-01 12:00:01"
    if version >= 19:  # whole seconds: > T means >= T+1s, = T is the whole second, <= T means < T+1s
        assert found(">", t) == {c}
        assert found("=", t) == {a, b}
        assert found("<=", t) == {a, b}
        assert found("!=", t) == {c}
    else:  # raw comparison with T.000000
        assert found(">", t) == {a, b, c}
        assert found("=", t) == set()
        assert found("<=", t) == set()
    assert found("<", t1) == {a, b}
    assert found(">=", t1) == {c}
    assert found(">=", "2024-03-01") == {a, b, c}  # a bare date means midnight
    assert found(">", "2024-03-01") == set()  # > a date means from the next day


def test_long_transaction_rows_appear_in_the_past(client: JsonRpc | Json2, emu: OdooEmulator) -> None:
    tx = emu.long_transaction("res.partner", [{"name": "Slow 1"}, {"name": "Slow 2"}], duration_s=600)
    emu.clock_offset += 4
    fast = client.call("res.partner", "create", vals_list=[{"name": "Fast"}])[0]
    window = [("write_date", ">=", (tx.write_date - timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S"))]
    seen = client.call("res.partner", "search_read", domain=window, fields=["name"], order="id asc")
    assert [r["id"] for r in seen] == [fast]  # the slow rows are not visible yet
    assert client.call("res.partner", "read", ids=tx.ids, fields=["name"]) == []
    assert tx.ids[0] < fast  # ids were taken at the start of the slow transaction
    tx.commit()
    seen = client.call(
        "res.partner", "search_read", domain=window, fields=["name", "write_date"], order="write_date asc, id asc"
    )
    assert [r["name"] for r in seen] == ["Slow 1", "Slow 2", "Fast"]
    assert seen[0]["write_date"] < seen[2]["write_date"]  # committed later, stamped earlier


def test_long_transaction_edit_and_autocommit(emu: OdooEmulator) -> None:
    rpc = JsonRpc(emu)
    pid = rpc.call("res.partner", "create", vals_list={"name": "Old"})
    with emu.long_transaction("res.partner", [pid], vals={"name": "New"}, duration_s=2) as tx:
        assert rpc.call("res.partner", "read", [pid], fields=["name"])[0]["name"] == "Old"
        assert emu.get("res.partner", pid)["name"] == "Old"  # type: ignore[index]
    assert emu.get("res.partner", pid)["write_date"] == tx.write_date  # type: ignore[index]
    tx2 = emu.long_transaction("res.partner", {"name": "Auto"}, duration_s=30)
    assert rpc.call("res.partner", "search_count", domain=[("name", "=", "Auto")]) == 0
    emu.clock_offset += 31  # the emulator clock passes the end of the transaction
    assert rpc.call("res.partner", "search", domain=[("name", "=", "Auto")]) == tx2.ids


# -- mail: messages and activities -------------------------------------------------------------------------
@pytest.mark.parametrize("version", [17, 18, 19])
def test_message_post(version: int) -> None:
    emu, rpc = make(version)
    pid = emu.bulk_create("res.partner", 1, write_date=T0)[0]
    result = rpc.call(
        "res.partner",
        "message_post",
        [pid],
        body="Called <b>back</b>",
        message_type="comment",
        subtype_xmlid="mail.mt_note",
    )
    msg_id = result[0] if version >= 18 else result
    assert (isinstance(result, list)) == (version >= 18)  # @api.returns(int) up to 17, a recordset after
    assert emu.get("res.partner", pid)["write_date"] == T0  # type: ignore[index]  # posting does not touch the record
    msg = rpc.call("mail.message", "read", [msg_id], fields=["body", "model", "res_id", "message_type", "subtype_id"])[
        0
    ]
    assert msg["body"] == "Called &lt;b&gt;back&lt;/b&gt;"
    assert (msg["model"], msg["res_id"], msg["message_type"]) == ("res.partner", pid, "comment")
    assert msg["subtype_id"][1] == "Note"
    if version >= 18:
        html = rpc.call(
            "res.partner", "message_post", [pid], body="<p>ok</p>", body_is_html=True, message_type="comment"
        )
        assert rpc.call("mail.message", "read", html, fields=["body"])[0]["body"] == "<p>ok</p>"
    else:
        with pytest.raises(CallError, match=re.escape("body_is_html")):
            rpc.call("res.partner", "message_post", [pid], body="<p>ok</p>", body_is_html=True)


@pytest.mark.parametrize("version", [17, 18, 19])
def test_activity_batch_action_done(version: int) -> None:
    emu, rpc = make(version)
    a, b = emu.bulk_create("res.partner", 2)
    call_type = rpc.call(
        "ir.model.data",
        "search_read",
        domain=[("module", "=", "mail"), ("name", "=", "mail_activity_data_call")],
        fields=["res_id", "model"],
    )
    assert call_type[0]["model"] == "mail.activity.type"
    model_id = rpc.call("ir.model", "search", domain=[("model", "=", "res.partner")])[0]
    vals = [
        {
            "res_model_id": model_id,
            "res_id": rid,
            "activity_type_id": call_type[0]["res_id"],
            "summary": "Call",
            "note": f"<p>Outcome {rid}</p>",
            "date_deadline": "2024-03-01",
        }
        for rid in (a, b)
    ]
    acts = rpc.call("mail.activity", "create", vals_list=vals)
    first_msg = rpc.call("mail.activity", "action_done", acts)
    assert isinstance(first_msg, int)
    msgs = rpc.call(
        "mail.message",
        "search_read",
        domain=[("model", "=", "res.partner"), ("res_id", "in", [a, b])],
        fields=["body", "res_id", "mail_activity_type_id", "message_type"],
        order="id asc",
    )
    assert [m["res_id"] for m in msgs] == [a, b] and msgs[0]["id"] == first_msg
    assert f"<p>Outcome {a}</p>" in msgs[0]["body"] and msgs[0]["mail_activity_type_id"][1] == "Call"
    assert msgs[0]["message_type"] == "notification"
    assert rpc.call("mail.activity", "search", domain=[("id", "in", acts)]) == []
    if version >= 19:  # archived, kept with its done date
        done = rpc.call("mail.activity", "read", acts, fields=["active", "state", "date_done"])
        assert [(d["active"], d["state"]) for d in done] == [(False, "done")] * 2
        assert done[0]["date_done"]
        assert rpc.call("mail.activity", "action_done", acts) is False  # only active ones are done again
    else:  # deleted
        assert rpc.call("mail.activity", "read", acts, fields=["summary"]) == []


def test_activity_schedule_and_feedback(client: JsonRpc | Json2, emu: OdooEmulator) -> None:
    pid = emu.bulk_create("res.partner", 1)[0]
    acts = client.call(
        "res.partner",
        "activity_schedule",
        ids=[pid],
        act_type_xmlid="mail.mail_activity_data_call",
        summary="Follow up",
        note="<p>VM</p>",
        date_deadline="2030-01-01",
    )
    row = client.call(
        "mail.activity",
        "read",
        ids=acts,
        fields=["res_model", "res_id", "activity_type_id", "state", "user_id", "res_name"],
    )[0]
    assert (row["res_model"], row["res_id"], row["activity_type_id"][1], row["state"]) == (
        "res.partner",
        pid,
        "Call",
        "planned",
    )
    assert row["user_id"][0] == emu.uid
    msg_id = client.call("mail.activity", "action_feedback", ids=acts, feedback="Reached, will buy")
    body = client.call("mail.message", "read", ids=[msg_id], fields=["body"])[0]["body"]
    assert "Reached, will buy" in body and "Follow up" in body
    assert client.call("mail.activity", "read", ids=acts, fields=["feedback"])[0]["feedback"] == "Reached, will buy"


# -- crm ----------------------------------------------------------------------------------------------------
def test_lead_stages_won_and_lost(client: JsonRpc | Json2, emu: OdooEmulator) -> None:
    stages = client.call("crm.stage", "search_read", domain=[], fields=["name", "is_won"], order="sequence")
    assert [s["name"] for s in stages] == ["New", "Qualified", "Proposition", "Won"]
    lead = client.call("crm.lead", "create", vals_list=[{"name": "Deal", "expected_revenue": 5000}])[0]
    row = client.call("crm.lead", "read", ids=[lead], fields=["type", "stage_id", "won_status", "date_closed"])[0]
    assert (row["type"], row["stage_id"][1], row["won_status"], row["date_closed"]) == (
        "opportunity",
        "New",
        "pending",
        False,
    )
    client.call("crm.lead", "write", ids=[lead], vals={"stage_id": stages[-1]["id"]})
    row = client.call("crm.lead", "read", ids=[lead], fields=["probability", "won_status", "date_closed"])[0]
    assert (row["probability"], row["won_status"]) == (100.0, "won") and row["date_closed"]
    other = client.call("crm.lead", "create", vals_list=[{"name": "Lost one"}])[0]
    client.call("crm.lead", "action_set_lost", ids=[other], lost_reason_id=1)
    assert client.call("crm.lead", "search", domain=[("id", "=", other)]) == []
    lost = client.call("crm.lead", "read", ids=[other], fields=["active", "won_status", "lost_reason_id"])[0]
    assert (lost["active"], lost["won_status"], lost["lost_reason_id"][0]) == (False, "lost", 1)


def test_company_side_effects_bump_contact_write_date(emu: OdooEmulator) -> None:
    rpc = JsonRpc(emu)
    company = rpc.call("res.partner", "create", vals_list={"name": "Acme", "is_company": True})
    contact = rpc.call("res.partner", "create", vals_list={"name": "Ann", "parent_id": company})
    emu.edit("res.partner", contact, {}, at=T0)
    rpc.call("res.partner", "write", [company], vals={"vat": "BE0999"})
    child = emu.get("res.partner", contact)
    assert child is not None and child["vat"] == "BE0999" and child["write_date"] > T0
    assert child["write_date"] == emu.get("res.partner", company)["write_date"]  # type: ignore[index]  # same transaction


# -- helpers, faults and serving -----------------------------------------------------------------------------
def test_bulk_create_in_one_second_and_paging_by_id() -> None:
    emu, rpc = make()
    ids = emu.bulk_create("res.partner", 3000, write_date=T0.replace(microsecond=500))
    assert rpc.call("res.partner", "search_count", domain=[("write_date", "=", "2024-03-01 12:00:00")]) == 3000
    seen: list[int] = []
    last = 0
    while True:
        page = rpc.call(
            "res.partner",
            "search_read",
            domain=[
                ("write_date", ">=", "2024-03-01 12:00:00"),
                ("write_date", "<", "2024-03-01 12:00:01"),
                ("id", ">", last),
            ],
            fields=["id"],
            order="id asc",
            limit=1000,
        )
        if not page:
            break
        seen += [r["id"] for r in page]
        last = page[-1]["id"]
    assert seen == ids


def test_seed_is_deterministic_and_records_helper() -> None:
    one = OdooEmulator(seed=3, partners=20, companies=4, leads=5)
    two = OdooEmulator(seed=3, partners=20, companies=4, leads=5)
    assert [r["name"] for r in one.records("res.partner")] == [r["name"] for r in two.records("res.partner")]
    assert len(one.records("crm.lead")) == 5
    assert len(one.records("res.partner")) == 3 + 4 + 20  # fresh database: company, OdooBot, the bot user
    assert len(one.records("res.partner", active_test=True)) == 2 + 4 + 20  # OdooBot is archived
    assert one.get("res.partner", 999) is None


def test_date_header_follows_the_emulator_clock(emu: OdooEmulator) -> None:
    emu.clock_offset = -86_400 * 30
    response = JsonRpc(emu).http.post(
        "/jsonrpc",
        json={
            "jsonrpc": "2.0",
            "method": "call",
            "id": 1,
            "params": {"service": "common", "method": "version", "args": []},
        },
    )
    server = email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp()
    assert abs(server - emu.now()) < 5


def test_injected_faults_answer_like_a_proxy() -> None:
    _emu, rpc = make(faults=Faults(error_rate=1.0))
    response = rpc.http.post(
        "/jsonrpc",
        json={
            "jsonrpc": "2.0",
            "method": "call",
            "id": 1,
            "params": {"service": "common", "method": "version", "args": []},
        },
    )
    assert response.status_code in (500, 502, 503)
    assert response.headers["Content-Type"].startswith("text/html")
    emu2, rpc2 = make(faults=Faults(partial_rate=1.0))
    before = len(emu2.records("res.partner"))
    with pytest.raises(CallError) as exc:
        rpc2.call("res.partner", "create", vals_list=[{"name": "a"}, {"name": "b"}])
    assert exc.value.name == "odoo.exceptions.ValidationError"
    assert len(emu2.records("res.partner")) == before  # all or nothing


def test_stats_count_mutating_calls(emu: OdooEmulator) -> None:
    rpc = JsonRpc(emu)
    rpc.call("res.partner", "search", domain=[])
    pid = rpc.call("res.partner", "create", vals_list={"name": "x"})
    rpc.call("res.partner", "write", [pid], vals={"name": "y"})
    assert emu.stats.writes == 2
    assert emu.stats.by_route["odoo res.partner.search"] == 1


def test_serves_on_loopback() -> None:
    emu = build_odoo(version=19, partners=2)
    with emu.serve() as server, httpx.Client(base_url=server.url) as http:
        response = http.post(
            "/json/2/res.partner/search_count", json={"domain": []}, headers={"Authorization": f"bearer {emu.api_key}"}
        )
        assert response.status_code == 200 and response.json() == 4  # 2 seeded + YourCompany + the bot user
        emu.clock_offset = -86_400 * 400
        dates = http.get("/web/version").headers.get_list("Date")
        assert len(dates) == 1  # sent once, and it is the emulator clock
        assert abs(email.utils.parsedate_to_datetime(dates[0]).timestamp() - emu.now()) < 5


def test_an_or_of_likes_on_one_field_answers_as_each_leaf_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulator joins ``| | a b c`` of (i)likes on one text field into one regex: same records as leaf by leaf."""
    emu, rpc = make()
    values = [
        "Ann@Example.com",
        "ann@example.com ",
        "bo_b@x.org",
        "boXb@x.org",
        "100%@pct.io",
        "c\\d@e.f",
        "https://www.acme.example/about",
        "ACME.example",
        "other.example",
        "line\nbreak@x.org",
        "",
    ]
    for i, v in enumerate(values):
        rpc.call("res.partner", "create", vals_list=[{"name": f"P{i}", "email": v or False, "website": v or False}])
    rpc.call("res.partner", "create", vals_list=[{"name": "none"}])
    patterns = ["ann@example.com", "bo_b@x.org", "100%", "c\\\\d@e.f", "acme.example", "line%", "%.org", "nobody"]
    domains = []
    for field in ("email", "website", "name"):
        for op in ("=ilike", "ilike", "=like", "like"):
            domains.append(["|"] * (len(patterns) - 1) + [(field, op, p) for p in patterns])
    ann, acme = ("email", "=ilike", "ann@example.com"), ("email", "ilike", "acme")
    domains.append(["&", ("active", "=", True), "|", ann, acme])
    domains.append(["|", "|", ann, ("website", "ilike", "acme"), ("name", "=", "none")])
    real = type(emu)._or_of_likes
    taken = []
    monkeypatch.setattr(type(emu), "_or_of_likes", lambda *a: taken.append(r) or r if (r := real(*a)) else None)
    joined = [rpc.call("res.partner", "search", domain=d, order="id asc") for d in domains]
    assert len(taken) >= 12  # the joined path really answered
    monkeypatch.setattr(type(emu), "_or_of_likes", lambda *a, **k: None)
    leaf_by_leaf = [rpc.call("res.partner", "search", domain=d, order="id asc") for d in domains]
    assert joined == leaf_by_leaf
    assert any(joined)  # the domains do match something


def test_a_limited_search_ordered_by_id_answers_as_the_full_sort_does() -> None:
    """ORDER BY id with a LIMIT reads along the ids from the domain's id bounds and stops early;
    every combination must answer what sorting every match and slicing answers (archived rows,
    deleted ids, OR and NOT domains whose id terms are no bounds, offsets, both directions)."""
    import random

    emu = OdooEmulator(seed=5)
    rng = random.Random(5)
    ids = emu.bulk_create("res.partner", 300, vals_fn=lambda i: {"name": f"P{i}", "is_company": i % 4 == 0})
    emu.bulk_create("res.partner", 40, vals_fn=lambda i: {"name": f"A{i}", "active": False})
    gone = set(rng.sample(ids, 30))
    for rid in gone:
        emu.delete("res.partner", rid)
    client = JsonRpc(emu)
    alive = [rid for rid in ids if rid not in gone]
    lo, hi = alive[40], alive[250]  # bounds that are rows (>= and <= include them) ...
    domains: list[list[Any]] = [
        [],
        [("id", ">", lo)],
        [("id", ">=", lo), ("id", "<", hi)],
        [("id", ">", lo), ("id", "<=", hi)],
        [("id", ">", lo), ("id", "<=", hi), ("is_company", "=", True)],
        [("id", "<", hi), ("name", "ilike", "p1")],
        ["|", ("id", "<", lo), ("id", ">", hi)],
        ["!", ("id", ">", lo)],
        [("id", ">", lo), "|", ("is_company", "=", True), ("name", "=like", "P2%")],
        [("id", ">", hi * 10)],
        [("id", ">=", min(gone)), ("id", "<=", max(gone))],  # ... and bounds that are deleted ids
    ]
    for domain in domains:
        for context in ({}, {"active_test": False}):
            every = client.call("res.partner", "search", domain=domain, order="id", context=context)
            assert every == sorted(every)
            for order, expected in (("id", every), ("id asc", every), ("ID  DESC", every[::-1])):
                for offset, limit in ((0, 1), (0, 7), (3, 50), (0, 1000), (len(every), 5)):
                    got = client.call(
                        "res.partner", "search", domain=domain, order=order, offset=offset, limit=limit, context=context
                    )
                    assert got == expected[offset : offset + limit], (domain, context, order, offset, limit)


# -- what a real Odoo 19 showed (tests/recordings/odoo19) -------------------------------------------------
@pytest.mark.parametrize("version", [16, 17, 18, 19])
def test_activity_owner_is_optional_on_19_only_and_res_model_alone_is_ignored_there(version: int) -> None:
    emu, rpc = make(version)
    partner = rpc.call("res.partner", "create", vals_list={"name": "Ann"})
    model_id = rpc.call("ir.model", "search", domain=[("model", "=", "res.partner")])[0]
    vals = {"res_model_id": model_id, "res_id": partner, "activity_type_id": emu.xmlid("mail.mail_activity_data_call")}
    act = rpc.call("mail.activity", "create", vals_list=vals)
    [row] = rpc.call("mail.activity", "read", [act], fields=["user_id"])
    assert row["user_id"] == (False if version >= 19 else [emu.uid, "Bot"])
    described = rpc.call("mail.activity", "fields_get", allfields=["user_id", "res_model_id"], attributes=["required"])
    assert described == {"user_id": {"required": version < 19}, "res_model_id": {"required": version < 19}}
    only_res_model = {"res_model": "res.partner", "res_id": partner, "summary": "x"}
    if version >= 19:
        with pytest.raises(CallError, match="not null res_id") as refused:
            rpc.call("mail.activity", "create", vals_list=only_res_model)
        assert refused.value.name == "odoo.exceptions.ValidationError"
    else:
        assert rpc.call("mail.activity", "create", vals_list=only_res_model)


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("x & <b>y</b>", "<p>x &amp; <b>y</b></p>"),
        ("<p>already &amp; html</p>", "<p>already &amp; html</p>"),
        ("a < b &amp; c", "<p>a &lt; b &amp; c</p>"),
        ("<p>ok</p><script>alert(1)</script>", "<p>ok</p>"),
    ],
)
def test_html_fields_are_sanitised_like_odoo(client: JsonRpc | Json2, raw: str, stored: str) -> None:
    partner = client.call("res.partner", "create", vals_list=[{"name": "Ann", "comment": raw}])[0]
    assert client.call("res.partner", "read", [partner], fields=["comment"])[0]["comment"] == stored


def test_webclient_version_info_answers_odoorpcs_first_question(emu: OdooEmulator) -> None:
    http = httpx.Client(transport=emu.transport(), base_url=BASE_URL)
    body = http.post("/web/webclient/version_info", json={"jsonrpc": "2.0", "method": "call", "params": {}}).json()
    assert body == {"jsonrpc": "2.0", "id": None, "result": JsonRpc(emu).rpc("common", "version")["result"]}
