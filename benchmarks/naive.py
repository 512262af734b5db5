"""The naive baseline: what a user's ad-hoc script with the CRM's SDK does.

Sequential, one plain REST call per object (push: create company, create contact with its
association, create deal, create call with its associations; pull: the SDK's ``getAll`` page
walk over every record, written to SQLite record by record). Retries follow the official
HubSpot Node SDK's schedule once its retries are switched on (they are off by default): a
ten-secondly 429 waits 10 s x attempt, a secondly 429 1 s x attempt, a 5xx 200 ms x attempt.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.data import read_outcomes

MAX_ATTEMPTS = 6


class Counter:
    def __init__(self) -> None:
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0
        self.failed = 0


def _send(client: httpx.Client, counter: Counter, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
    """One request with the SDK's retry schedule; None when it still fails (the script logs and moves on)."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        counter.requests += 1
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code < 400:
            return response
        if response is not None and response.status_code == 429:
            counter.rate_limited += 1
            try:
                policy = response.json().get("policyName", "")
            except ValueError:
                policy = ""
            if policy == "DAILY":
                break
            wait = 1.0 * attempt if policy == "SECONDLY" else 10.0 * attempt
        elif response is None or response.status_code >= 500:
            wait = 0.2 * attempt
        else:
            break  # 4xx: the script prints the error and carries on
        counter.retries += 1
        time.sleep(wait)
    counter.failed += 1
    return None


# -- HubSpot -------------------------------------------------------------------------------------
HS_CALL_OUTCOMES = {
    "busy": "9d9162e7-6cf3-4944-bf63-4dff82258764",
    "connected": "f240bbac-87c9-4f6e-bf70-924b57d47db7",
    "voicemail": "b2cf5968-551e-4856-9783-52b3da59a7d0",
    "no_answer": "73a0d17f-1163-4015-bdd5-ec830791da20",
}


def _hs_assoc(to_id: str, type_id: int) -> dict[str, Any]:
    return {"to": {"id": to_id}, "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": type_id}]}


def hubspot_push(spec: dict[str, Any]) -> dict[str, Any]:
    """Per outcome: POST company?, POST contact (+company link), POST deal? (+links), POST call (+links)."""
    counter = Counter()
    headers = {"Authorization": f"Bearer {spec['token']}"}
    outcomes = read_outcomes(Path(spec["source"]), spec.get("limit"))
    with httpx.Client(base_url=spec["base_url"], headers=headers, timeout=30) as c:
        for o in outcomes:
            company_id = deal_id = None
            if o.get("company"):
                r = _send(
                    c,
                    counter,
                    "POST",
                    "/crm/v3/objects/companies",
                    json={"properties": {"name": o["company"]["name"], "domain": o["company"]["domain"]}},
                )
                company_id = r.json()["id"] if r is not None else None
            ct = o["contact"]
            r = _send(
                c,
                counter,
                "POST",
                "/crm/v3/objects/contacts",
                json={
                    "properties": {
                        "email": ct["email"],
                        "firstname": ct.get("first_name", ""),
                        "lastname": ct.get("last_name", ""),
                        "phone": ct.get("phone", ""),
                    },
                    "associations": [_hs_assoc(company_id, 279)] if company_id else [],
                },
            )
            if r is None:
                continue
            contact_id = r.json()["id"]
            if o.get("deal"):
                d = o["deal"]
                links = [_hs_assoc(contact_id, 3)] + ([_hs_assoc(company_id, 341)] if company_id else [])
                r = _send(
                    c,
                    counter,
                    "POST",
                    "/crm/v3/objects/deals",
                    json={
                        "properties": {
                            "dealname": d["name"],
                            "amount": str(d.get("amount", "")),
                            "pipeline": "default",
                            "dealstage": d.get("stage") or "appointmentscheduled",
                            "closedate": d.get("close_date", ""),
                        },
                        "associations": links,
                    },
                )
                deal_id = r.json()["id"] if r is not None else None
            links = [_hs_assoc(contact_id, 194)]
            links += [_hs_assoc(company_id, 182)] if company_id else []
            links += [_hs_assoc(deal_id, 206)] if deal_id else []
            props = {
                "hs_timestamp": o["occurred_at"],
                "hs_call_title": f"Call with {ct.get('first_name', '')} {ct.get('last_name', '')}",
                "hs_call_body": o.get("notes", ""),
                "hs_call_direction": o.get("direction", "outbound").upper(),
                "hs_call_duration": str(1000 * int(o.get("duration_seconds", 0))),
                "hs_call_status": "COMPLETED",
            }
            if o["disposition"] in HS_CALL_OUTCOMES:
                props["hs_call_disposition"] = HS_CALL_OUTCOMES[o["disposition"]]
            _send(c, counter, "POST", "/crm/v3/objects/calls", json={"properties": props, "associations": links})
    return {"outcomes": len(outcomes), **counter.__dict__}


HS_PROPERTIES = {
    "contacts": "email,firstname,lastname,phone,jobtitle,lastmodifieddate",
    "companies": "name,domain,hs_lastmodifieddate",
    "deals": "dealname,dealstage,amount,deal_currency_code,closedate,hs_lastmodifieddate",
}
HS_ASSOCIATIONS = {"contacts": "companies", "deals": "contacts,companies"}


def _sqlite(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS records (object TEXT, id TEXT, properties TEXT, PRIMARY KEY (object, id))")
    return db


def hubspot_pull(spec: dict[str, Any]) -> dict[str, Any]:
    """The SDK's getAll: every page of every object (no cursor), each record upserted into SQLite."""
    counter = Counter()
    headers = {"Authorization": f"Bearer {spec['token']}"}
    db = _sqlite(spec["sqlite"])
    read = 0
    limit = spec.get("limit")
    with httpx.Client(base_url=spec["base_url"], headers=headers, timeout=30) as c:
        for obj in spec["objects"]:
            after = None
            while True:
                params: dict[str, Any] = {"limit": 100, "properties": HS_PROPERTIES[obj]}
                if obj in HS_ASSOCIATIONS:
                    params["associations"] = HS_ASSOCIATIONS[obj]
                if after:
                    params["after"] = after
                r = _send(c, counter, "GET", f"/crm/v3/objects/{obj}", params=params)
                if r is None:
                    break
                body = r.json()
                for rec in body.get("results", []):
                    db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (obj, rec["id"], json.dumps(rec)))
                    read += 1
                db.commit()
                after = ((body.get("paging") or {}).get("next") or {}).get("after")
                if not after or (limit and read >= limit):
                    break
    db.close()
    return {"records": read, **counter.__dict__}


# -- Zoho CRM --------------------------------------------------------------------------------------
def _zoho_id(r: httpx.Response | None) -> str | None:
    if r is None:
        return None
    data = (r.json().get("data") or [{}])[0]
    return (data.get("details") or {}).get("id")


def zoho_push(spec: dict[str, Any]) -> dict[str, Any]:
    """Per outcome: insert Account?, Contact (+Account), Deal? (+links), Call (Who_Id / What_Id)."""
    counter = Counter()
    headers = {"Authorization": f"Zoho-oauthtoken {spec['token']}"}
    outcomes = read_outcomes(Path(spec["source"]), spec.get("limit"))
    with httpx.Client(base_url=spec["base_url"], headers=headers, timeout=30) as c:
        for o in outcomes:
            account_id = deal_id = None
            if o.get("company"):
                account_id = _zoho_id(
                    _send(
                        c,
                        counter,
                        "POST",
                        "/Accounts",
                        json={"data": [{"Account_Name": o["company"]["name"], "Website": o["company"]["domain"]}]},
                    )
                )
            ct = o["contact"]
            contact = {
                "First_Name": ct.get("first_name", ""),
                "Last_Name": ct.get("last_name") or ct["email"],
                "Email": ct["email"],
                "Phone": ct.get("phone", ""),
            }
            if account_id:
                contact["Account_Name"] = {"id": account_id}
            contact_id = _zoho_id(_send(c, counter, "POST", "/Contacts", json={"data": [contact]}))
            if contact_id is None:
                continue
            if o.get("deal"):
                d = o["deal"]
                deal = {
                    "Deal_Name": d["name"],
                    "Stage": d.get("stage") or "Qualification",
                    "Amount": d.get("amount"),
                    "Closing_Date": d.get("close_date"),
                    "Contact_Name": {"id": contact_id},
                }
                if account_id:
                    deal["Account_Name"] = {"id": account_id}
                deal_id = _zoho_id(_send(c, counter, "POST", "/Deals", json={"data": [deal]}))
            seconds = int(o.get("duration_seconds", 0))
            call = {
                "Subject": f"Call with {ct.get('first_name', '')} {ct.get('last_name', '')}",
                "Call_Type": o.get("direction", "outbound").title(),
                "Call_Start_Time": o["occurred_at"],
                "Call_Duration": f"{seconds // 60:02d}:{seconds % 60:02d}",
                "Description": o.get("notes", ""),
                "Who_Id": {"id": contact_id},
            }
            if deal_id:
                call.update({"What_Id": {"id": deal_id}, "$se_module": "Deals"})
            elif account_id:
                call.update({"What_Id": {"id": account_id}, "$se_module": "Accounts"})
            _send(c, counter, "POST", "/Calls", json={"data": [call]})
    return {"outcomes": len(outcomes), **counter.__dict__}


ZOHO_FIELDS = {
    "contacts": ("Contacts", "First_Name,Last_Name,Email,Phone,Title,Account_Name,Modified_Time"),
    "companies": ("Accounts", "Account_Name,Website,Modified_Time"),
    "deals": ("Deals", "Deal_Name,Stage,Amount,Closing_Date,Account_Name,Contact_Name,Modified_Time"),
}


def zoho_pull(spec: dict[str, Any]) -> dict[str, Any]:
    """The SDK's record walk: pages of 200 (``page`` up to 2,000 records, then ``page_token``)."""
    counter = Counter()
    headers = {"Authorization": f"Zoho-oauthtoken {spec['token']}"}
    db = _sqlite(spec["sqlite"])
    read = 0
    limit = spec.get("limit")
    with httpx.Client(base_url=spec["base_url"], headers=headers, timeout=30) as c:
        for obj in spec["objects"]:
            module, fields = ZOHO_FIELDS[obj]
            page, token = 1, None
            while True:
                params: dict[str, Any] = {"fields": fields, "per_page": 200}
                params.update({"page_token": token} if token else {"page": page})
                r = _send(c, counter, "GET", f"/{module}", params=params)
                if r is None or r.status_code == 204:
                    break
                body = r.json()
                for rec in body.get("data") or []:
                    db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (obj, rec["id"], json.dumps(rec)))
                    read += 1
                db.commit()
                info = body.get("info") or {}
                if not info.get("more_records") or (limit and read >= limit):
                    break
                token = info.get("next_page_token") if page * 200 >= 2000 or token else None
                page += 1
    db.close()
    return {"records": read, **counter.__dict__}


# -- Odoo ---------------------------------------------------------------------------------------------
def odoo_push(spec: dict[str, Any]) -> dict[str, Any]:
    """Per outcome over JSON-2: create company?, contact, lead?, call activity, then mark it done."""
    counter = Counter()
    headers = {"Authorization": f"bearer {spec['token']}", "X-Odoo-Database": spec["db"]}
    outcomes = read_outcomes(Path(spec["source"]), spec.get("limit"))
    with httpx.Client(base_url=spec["base_url"], headers=headers, timeout=30) as c:

        def call(model: str, method: str, **kwargs: Any) -> Any:
            r = _send(c, counter, "POST", f"/json/2/{model}/{method}", json=kwargs)
            return r.json() if r is not None else None

        partner_model = (call("ir.model", "search", domain=[("model", "=", "res.partner")]) or [0])[0]
        call_type = (call("mail.activity.type", "search", domain=[("category", "=", "phonecall")]) or [False])[0]
        for o in outcomes:
            company_id = None
            if o.get("company"):
                ids = call(
                    "res.partner",
                    "create",
                    vals_list=[{"name": o["company"]["name"], "website": o["company"]["domain"], "is_company": True}],
                )
                company_id = ids[0] if ids else None
            ct = o["contact"]
            vals = {
                "name": f"{ct.get('first_name', '')} {ct.get('last_name', '')}".strip() or ct["email"],
                "email": ct["email"],
                "phone": ct.get("phone", ""),
            }
            if company_id:
                vals["parent_id"] = company_id
            ids = call("res.partner", "create", vals_list=[vals])
            if not ids:
                continue
            contact_id = ids[0]
            if o.get("deal"):
                d = o["deal"]
                call(
                    "crm.lead",
                    "create",
                    vals_list=[
                        {
                            "name": d["name"],
                            "type": "opportunity",
                            "expected_revenue": float(d.get("amount") or 0),
                            "partner_id": contact_id,
                        }
                    ],
                )
            activity = call(
                "mail.activity",
                "create",
                vals_list=[
                    {
                        "res_model_id": partner_model,
                        "res_id": contact_id,
                        "activity_type_id": call_type,
                        "summary": f"Call: {o['disposition']}",
                        "note": o.get("notes", ""),
                        "date_deadline": o["occurred_at"][:10],
                    }
                ],
            )
            if activity:
                call("mail.activity", "action_done", ids=activity)
    return {"outcomes": len(outcomes), **counter.__dict__}


ODOO_SOURCES = {
    "contacts": (
        "res.partner",
        [("is_company", "=", False)],
        ["name", "email", "phone", "function", "parent_id", "write_date"],
    ),
    "companies": ("res.partner", [("is_company", "=", True)], ["name", "website", "write_date"]),
    "deals": (
        "crm.lead",
        [("type", "=", "opportunity")],
        ["name", "stage_id", "expected_revenue", "partner_id", "write_date"],
    ),
}


def odoo_pull(spec: dict[str, Any]) -> dict[str, Any]:
    """``search_read`` with offset paging (200 a page) over every record, as scripts do."""
    counter = Counter()
    headers = {"Authorization": f"bearer {spec['token']}", "X-Odoo-Database": spec["db"]}
    db = _sqlite(spec["sqlite"])
    read = 0
    limit = spec.get("limit")
    with httpx.Client(base_url=spec["base_url"], headers=headers, timeout=30) as c:
        for obj in spec["objects"]:
            model, domain, fields = ODOO_SOURCES[obj]
            offset = 0
            while True:
                r = _send(
                    c,
                    counter,
                    "POST",
                    f"/json/2/{model}/search_read",
                    json={"domain": domain, "fields": fields, "offset": offset, "limit": 200, "order": "id asc"},
                )
                rows = r.json() if r is not None else []
                for rec in rows:
                    db.execute(
                        "INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (obj, str(rec["id"]), json.dumps(rec))
                    )
                    read += 1
                db.commit()
                offset += len(rows)
                if len(rows) < 200 or (limit and read >= limit):
                    break
    db.close()
    return {"records": read, **counter.__dict__}


PUSH = {"hubspot": hubspot_push, "zoho": zoho_push, "odoo": odoo_push}
PULL = {"hubspot": hubspot_pull, "zoho": zoho_pull, "odoo": odoo_pull}
