"""A Salesforce emulator: OAuth (web server + PKCE, refresh, JWT bearer), sObject REST, Collections,
Composite, SOQL, getUpdated/getDeleted, Bulk API 2.0 query jobs, describe and the daily allocation.

Built from the reference (``shared/reference/salesforce.md``), Salesforce's Postman collection
(``shared/specs/salesforce``) and simple-salesforce's expectations of the answers:

* the token answer names ``instance_url`` (here: the origin the request came to) and an ``id`` URL
  ``…/id/<org>/<user>``; JWT assertions are verified against the connected app's registered
  certificate (RS256, ``iss`` the consumer key, ``sub`` a user, ``aud`` a login host, ``exp`` soon);
* upsert by External ID answers 201 (created), 200 ``created:false`` (one match; 204 with
  ``upsert_204``) or 300 (several matches, nothing written); a unique External ID refuses a second
  record with ``DUPLICATE_VALUE … duplicates value on record with id: <id>``;
* Collections answer 200 with one ``{id, success, errors, created}`` per record in input order;
  errors are ``[{message, errorCode, fields}]`` (collections: ``{statusCode, message, fields}``);
* every answer carries ``Sforce-Limit-Info: api-usage=used/limit``; past the daily limit, 403
  ``REQUEST_LIMIT_EXCEEDED``; an expired session is 401 ``INVALID_SESSION_ID``;
* SystemModstamp has one-second resolution; deletes are soft (recycle bin: ``queryAll``,
  ``getDeleted`` reaching 15 days back).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import secrets
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode

import httpx

from crmsync.emulators.base import Emulator, Faults, json_response
from crmsync.emulators.salesforce_routes import register
from crmsync.emulators.salesforce_wire import Refused, err
from crmsync.emulators.sandbox import Sandbox, SandboxOptions

PREFIX = {
    "Account": "001",
    "Contact": "003",
    "Opportunity": "006",
    "Task": "00T",
    "User": "005",
    "Lead": "00Q",
    "OpportunityContactRole": "00K",
}
V = r"/services/data/v(?P<ver>\d+\.\d)"
DAILY_LIMIT = 100_000
BATCH = 2_000
DELETED_REACH = 15 * 86400
# (name, type, required-on-create, updateable, extra) per sObject; the External ID fields are added when enabled.
_F = tuple[str, str, bool, bool, dict[str, Any]]
SCHEMA: dict[str, list[_F]] = {
    "Account": [
        ("Name", "string", True, True, {}),
        ("Website", "url", False, True, {}),
        ("Phone", "phone", False, True, {}),
        ("OwnerId", "reference", False, True, {}),
    ],
    "Contact": [
        ("FirstName", "string", False, True, {}),
        ("LastName", "string", True, True, {}),
        ("Email", "email", False, True, {}),
        ("Phone", "phone", False, True, {}),
        ("Title", "string", False, True, {}),
        ("AccountId", "reference", False, True, {}),
        ("OwnerId", "reference", False, True, {}),
    ],
    "Opportunity": [
        ("Name", "string", True, True, {}),
        ("Amount", "currency", False, True, {}),
        ("CloseDate", "date", True, True, {}),
        ("AccountId", "reference", False, True, {}),
        ("OwnerId", "reference", False, True, {}),
        (
            "StageName",
            "picklist",
            True,
            True,
            {
                "values": [
                    "Prospecting",
                    "Qualification",
                    "Needs Analysis",
                    "Proposal/Price Quote",
                    "Negotiation/Review",
                    "Closed Won",
                    "Closed Lost",
                ]
            },
        ),
    ],
    "Task": [
        ("Subject", "combobox", False, True, {}),
        ("Description", "textarea", False, True, {}),
        ("ActivityDate", "date", False, True, {}),
        ("WhoId", "reference", False, True, {}),
        ("WhatId", "reference", False, True, {}),
        ("OwnerId", "reference", False, True, {}),
        ("CallDurationInSeconds", "int", False, True, {}),
        ("CallDisposition", "string", False, True, {}),
        ("CallObject", "string", False, True, {}),
        ("CallType", "picklist", False, True, {"values": ["Internal", "Inbound", "Outbound"]}),
        ("Status", "picklist", False, True, {"values": ["Not Started", "In Progress", "Completed"]}),
        ("Priority", "picklist", False, True, {"values": ["High", "Normal", "Low"]}),
        ("TaskSubtype", "picklist", False, False, {"values": ["Task", "Email", "Call"]}),
        ("IsClosed", "boolean", False, False, {"readonly": True}),
    ],
    "User": [
        ("Username", "string", True, True, {}),
        ("Email", "email", True, True, {}),
        ("IsActive", "boolean", False, True, {}),
        ("Name", "string", False, False, {}),
    ],
    "Lead": [
        ("FirstName", "string", False, True, {}),
        ("LastName", "string", True, True, {}),
        ("Company", "string", True, True, {}),
        ("Email", "email", False, True, {}),
        ("Phone", "phone", False, True, {}),
        ("Title", "string", False, True, {}),
        ("OwnerId", "reference", False, True, {}),
        ("IsConverted", "boolean", False, False, {"readonly": True}),
        ("ConvertedContactId", "reference", False, False, {"readonly": True}),
    ],
    "OpportunityContactRole": [
        ("OpportunityId", "reference", True, False, {}),
        ("ContactId", "reference", True, True, {}),
        ("Role", "string", False, True, {}),
    ],
}
SYSTEM = ("Id", "SystemModstamp", "CreatedDate", "LastModifiedDate", "IsDeleted")
EXTERNAL = {
    "Account": "crmsync_key__c",
    "Contact": "crmsync_key__c",
    "Opportunity": "crmsync_key__c",
    "Task": "crmsync_outcome_id__c",
    "Lead": "crmsync_key__c",
}
CLOSED = {"Completed"}


class SalesforceEmulator(Emulator):
    """One org with a connected app, an admin and two reps."""

    provider: ClassVar[str] = "salesforce"

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        seed: int = 0,
        daily_limit: int = DAILY_LIMIT,
        external_ids: bool = True,
        upsert_204: bool = False,
        bulk_polls: int = 1,
    ) -> None:
        super().__init__(faults=faults)
        self.seed, self.daily_limit, self.upsert_204, self.bulk_polls = seed, daily_limit, upsert_204, bulk_polls
        self.api_used = 0
        self.org_id = "00D000000000001EAA"
        self.client_id = "3MVG9crmsync.sandbox"
        self.client_secret = secrets.token_hex(16)
        self.certificate: str | None = None  # the connected app's public key (PEM) for JWT assertions
        self.tokens: dict[str, tuple[str, float | None]] = {}  # access token -> (user id, expiry)
        self.refresh_tokens: dict[str, str] = {}
        self.codes: dict[str, dict[str, str]] = {}
        self.data: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SCHEMA}
        self.deleted_log: list[tuple[str, str, float]] = []  # (sobject, id, when)
        self.duplicate_emails: set[str] = set()  # a duplicate rule blocks new Contacts with these emails
        self.purged_before = 0.0  # the delete log holds nothing older (tests move it to force a resync)
        self.schema = {s: list(fs) for s, fs in SCHEMA.items()}
        if external_ids:
            for sobject, name in EXTERNAL.items():
                self.schema[sobject].append((name, "string", False, True, {"external": True}))
        self._ids = itertools.count(1)
        #: (sObject, External ID field) -> lower-cased value -> ids that held it: a unique index's lookup instead
        #: of a scan of every record per write (candidates are re-checked, so stale entries do no harm).
        self._ext: dict[tuple[str, str], dict[str, set[str]]] = {}
        self.cursors: dict[str, list[str]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.users = [
            self._insert("User", {"Username": u, "Email": e, "IsActive": True, "Name": n})["Id"]
            for u, e, n in (
                ("admin@example.com.sandbox", "admin@example.com", "Admin"),
                ("rep1@example.com.sandbox", "rep1@example.com", "Rep One"),
                ("rep2@example.com.sandbox", "rep2@example.com", "Rep Two"),
            )
        ]
        self.usernames = {self.data["User"][u]["Username"]: u for u in self.users}
        self._register()

    # -- records -------------------------------------------------------------------------------
    def new_id(self, sobject: str) -> str:
        return f"{PREFIX[sobject]}5g{next(self._ids):010d}AAC"

    def fields_of(self, sobject: str) -> dict[str, _F]:
        return {f[0].lower(): f for f in self.schema[sobject]}

    def _insert(self, sobject: str, body: dict[str, Any], *, when: float | None = None) -> dict[str, Any]:
        now = int(self.now() if when is None else when)
        record = {
            "Id": self.new_id(sobject),
            "CreatedDate": now,
            "SystemModstamp": now,
            "LastModifiedDate": now,
            "IsDeleted": False,
            **body,
        }
        if sobject == "Lead":
            record.setdefault("IsConverted", False)
        if sobject == "Task":
            record.setdefault("Status", "Not Started")
            record.setdefault("TaskSubtype", "Task")
            record.setdefault("Priority", "Normal")
            record["IsClosed"] = record["Status"] in CLOSED
        self.data[sobject][record["Id"]] = record
        self._index(sobject, record)
        return record

    def _index(self, sobject: str, record: dict[str, Any]) -> None:
        for name, _, _, _, extra in self.schema.get(sobject, ()):
            value = record.get(name)
            if extra.get("external") and value not in (None, ""):
                self._ext.setdefault((sobject, name), {}).setdefault(str(value).lower(), set()).add(record["Id"])

    def holders(self, sobject: str, name: str, value: Any) -> list[dict[str, Any]]:
        """Records (deleted ones too) whose External ID field ``name`` equals ``value`` ignoring case, oldest first."""
        wanted = str(value).lower()
        table = self.data[sobject]
        found = (table.get(i) for i in sorted(self._ext.get((sobject, name), {}).get(wanted, ())))
        return [r for r in found if r is not None and str(r.get(name) or "").lower() == wanted]

    def records(self, sobject: str, *, deleted: bool = False) -> list[dict[str, Any]]:
        return [dict(r) for r in self.data[sobject].values() if deleted or not r["IsDeleted"]]

    def _check(self, sobject: str, body: dict[str, Any], *, create: bool, current: str | None = None) -> dict[str, Any]:
        """The body with API names as the schema spells them; Refused for Salesforce's validation errors."""
        known = self.fields_of(sobject)
        out: dict[str, Any] = {}
        for key, value in body.items():
            if key == "attributes":
                continue
            spec = known.get(key.lower())
            if spec is None:
                raise Refused(400, f"No such column '{key}' on sobject of type {sobject}", "INVALID_FIELD", [key])
            name, kind, _, updateable, extra = spec
            if extra.get("readonly") or (not create and not updateable):
                code = "INVALID_FIELD_FOR_INSERT_UPDATE"
                raise Refused(400, f"Unable to create/update fields: {name}.", code, [name])
            if kind == "picklist" and value is not None and name in ("TaskSubtype", "StageName"):
                if value not in extra.get("values", []):
                    raise Refused(
                        400,
                        f"bad value for restricted picklist field: {value}",
                        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                        [name],
                    )
            if kind == "int" and value is not None and not isinstance(value, int):
                raise Refused(
                    400, f"{name}: value not of required type: {value}", "INVALID_TYPE_ON_FIELD_IN_RECORD", [name]
                )
            if extra.get("external") and value not in (None, ""):
                for other in self.holders(sobject, name, value):
                    if other["Id"] != current and not other["IsDeleted"] and other.get(name) == value:
                        raise Refused(
                            400,
                            f"duplicate value found: {name} duplicates value on record with id: {other['Id']}",
                            "DUPLICATE_VALUE",
                            [name],
                        )
            out[name] = value
        if sobject == "Task" and str(out.get("WhoId") or "").startswith("00Q") and out.get("WhatId"):
            raise Refused(
                400,
                "Related To ID: id value of incorrect type: a Task on a Lead has no WhatId",
                "FIELD_INTEGRITY_EXCEPTION",
                ["WhatId"],
            )
        if create and sobject == "Contact" and str(out.get("Email") or "").lower() in self.duplicate_emails:
            # An active duplicate rule blocking the save ("Use one of these records?").
            match = next(
                (
                    r["Id"]
                    for r in self.data["Contact"].values()
                    if str(r.get("Email") or "").lower() == str(out["Email"]).lower()
                ),
                None,
            )
            result = {
                "allowSave": False,
                "duplicateRule": "Standard_Contact_Duplicate_Rule",
                "duplicateRuleEntityType": "Contact",
                "errorMessage": "Use one of these records?",
                "matchResults": [
                    {
                        "entityType": "Contact",
                        "matchEngine": "ExactMatchEngine",
                        "matchRecords": [{"record": {"Id": match}}] if match else [],
                        "size": 1,
                        "success": True,
                    }
                ],
            }
            raise Refused(400, "Use one of these records?", "DUPLICATES_DETECTED", duplicateResult=result)
        if create:
            missing = [f[0] for f in self.schema[sobject] if f[2] and out.get(f[0]) in (None, "")]
            if missing:
                raise Refused(
                    400, f"Required fields are missing: [{', '.join(missing)}]", "REQUIRED_FIELD_MISSING", missing
                )
        return out

    def create(self, sobject: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create as the API does (validated), for tests and seeding."""
        with self.lock:
            return self._insert(sobject, self._check(sobject, body, create=True))

    def update(self, sobject: str, rid: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            record = self._live(sobject, rid)
            record.update(self._check(sobject, body, create=False, current=rid))
            self._index(sobject, record)
            now = int(self.now())
            record["SystemModstamp"] = record["LastModifiedDate"] = now
            if sobject == "Task":
                record["IsClosed"] = record.get("Status") in CLOSED
            return record

    def delete(self, sobject: str, rid: str) -> None:
        with self.lock:
            record = self._live(sobject, rid)
            now = int(self.now())
            record["IsDeleted"], record["SystemModstamp"] = True, now
            self.deleted_log.append((sobject, rid, now))

    def _live(self, sobject: str, rid: str) -> dict[str, Any]:
        record = self.data.get(sobject, {}).get(rid)
        if record is None or record["IsDeleted"]:
            raise Refused(404, "The requested resource does not exist", "NOT_FOUND")
        return record

    def bulk_create(
        self, sobject: str, n: int, body_fn: Callable[[int], dict[str, Any]], *, when: float | None = None
    ) -> list[str]:
        """Seed ``n`` records fast (no validation); ``when``: their created and modified time (default now)."""
        with self.lock:
            return [self._insert(sobject, body_fn(i), when=when)["Id"] for i in range(n)]

    def sobject_of(self, rid: str) -> str | None:
        for sobject, prefix in PREFIX.items():
            if rid.startswith(prefix):
                return sobject
        return None

    def _upsert(self, sobject: str, ext: str, value: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(201 | 200 | 300, record or matches) for an upsert by External ID ``ext`` (or ``Id``)."""
        if ext.lower() == "id":
            matches = [r for r in [self.data[sobject].get(value)] if r and not r["IsDeleted"]]
        else:
            spec = self.fields_of(sobject).get(ext.lower())
            if spec is None or not spec[4].get("external"):
                raise Refused(
                    404, f"Provided external ID field does not exist or is not accessible: {ext}", "NOT_FOUND"
                )
            matches = [r for r in self.holders(sobject, spec[0], value) if not r["IsDeleted"]]
            ext = spec[0]
        if len(matches) > 1:
            return 300, {"matches": [m["Id"] for m in matches]}
        if matches:
            return 200, self.update(sobject, matches[0]["Id"], body)
        return 201, self._insert(sobject, self._check(sobject, {**body, ext: value}, create=True))

    # -- auth ----------------------------------------------------------------------------------
    def generate_certificate(self) -> str:
        """A fresh RSA key pair: the public half registered on the app, the private PEM returned."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.certificate = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    def issue(self, user: str, *, refresh: bool = True) -> dict[str, str]:
        token = f"00D!{secrets.token_urlsafe(24)}"
        ttl = self.faults.token_ttl
        self.tokens[token] = (user, self.now() + ttl if ttl is not None else None)
        out = {
            "access_token": token,
            "token_type": "Bearer",
            "scope": "api refresh_token",
            "issued_at": str(int(self.now() * 1000)),
            "signature": secrets.token_urlsafe(16),
        }
        if refresh:
            rt = f"5Aep{secrets.token_urlsafe(24)}"
            self.refresh_tokens[rt] = user
            out["refresh_token"] = rt
        return out

    def expire_tokens(self) -> None:
        """Every session ends now (the next call answers 401 INVALID_SESSION_ID)."""
        with self.lock:
            self.tokens = {t: (u, 0.0) for t, (u, _) in self.tokens.items()}

    def authenticate(self, request: httpx.Request, route_name: str) -> httpx.Response | None:
        if route_name.startswith("oauth") or route_name == "versions":
            return None
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        entry = self.tokens.get(token)
        if entry is None or (entry[1] is not None and entry[1] <= self.now()):
            return self.error_response(401, "Session expired or invalid", code="INVALID_SESSION_ID")
        if self.api_used >= self.daily_limit:
            return self.error_response(403, "TotalRequests Limit exceeded.", code="REQUEST_LIMIT_EXCEEDED")
        self.api_used += 1
        return None

    def error_response(self, status: int, message: str, **extra: Any) -> httpx.Response:
        code = str(extra.get("code") or {401: "INVALID_SESSION_ID", 404: "NOT_FOUND"}.get(status, "UNKNOWN_EXCEPTION"))
        return self.answer([err(message, code, extra.get("fields"))], status)

    def rate_limited_response(self, bucket: str, retry_after: float) -> httpx.Response:
        return self.error_response(
            403, "ConcurrentRequests (Concurrent API Requests) Limit exceeded.", code="REQUEST_LIMIT_EXCEEDED"
        )

    def answer(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
        limit = {"Sforce-Limit-Info": f"api-usage={self.api_used}/{self.daily_limit}"}
        if status == 204:
            return httpx.Response(204, headers={**limit, **(headers or {})})
        return json_response(body, status, {**limit, **(headers or {})})

    def _origin(self, request: httpx.Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc.decode()}"

    def _oauth_error(self, error: str, description: str, status: int = 400) -> httpx.Response:
        return json_response({"error": error, "error_description": description}, status)

    def _authorize(self, request: httpx.Request) -> httpx.Response:
        q = dict(request.url.params)
        if q.get("client_id") != self.client_id:
            return self._oauth_error("invalid_client_id", "client identifier invalid")
        if q.get("response_type") != "code" or not q.get("redirect_uri"):
            return self._oauth_error("unsupported_response_type", "response type not supported")
        code = f"aPrx{secrets.token_urlsafe(20)}"
        self.codes[code] = {
            "redirect_uri": q["redirect_uri"],
            "challenge": q.get("code_challenge", ""),
            "user": self.users[0],
        }
        target = (
            q["redirect_uri"]
            + ("&" if "?" in q["redirect_uri"] else "?")
            + urlencode({"code": code, **({"state": q["state"]} if "state" in q else {})})
        )
        return httpx.Response(302, headers={"Location": target})

    def _token(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        grant = form.get("grant_type")
        if grant == "authorization_code":
            entry = self.codes.pop(form.get("code", ""), None)
            if entry is None:
                return self._oauth_error("invalid_grant", "invalid authorization code")
            if (
                form.get("client_id") != self.client_id
                or form.get("client_secret", self.client_secret) != self.client_secret
            ):
                return self._oauth_error("invalid_client", "invalid client credentials")
            if form.get("redirect_uri") != entry["redirect_uri"]:
                return self._oauth_error("redirect_uri_mismatch", "redirect_uri must match configuration")
            if entry["challenge"]:
                verifier = form.get("code_verifier")
                if not verifier:
                    return self._oauth_error("invalid_grant", "invalid code verifier")
                digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
                if digest != entry["challenge"]:
                    return self._oauth_error("invalid_request", "invalid code verifier")
            user, tokens = entry["user"], self.issue(entry["user"])
        elif grant == "refresh_token":
            user = self.refresh_tokens.get(form.get("refresh_token", ""), "")
            if not user or form.get("client_id") != self.client_id:
                return self._oauth_error("invalid_grant", "expired access/refresh token")
            tokens = self.issue(user, refresh=False)
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            user_or_error = self._verify_assertion(form.get("assertion", ""), self._origin(request))
            if isinstance(user_or_error, httpx.Response):
                return user_or_error
            user, tokens = user_or_error, self.issue(user_or_error, refresh=False)
        else:
            return self._oauth_error("unsupported_grant_type", "grant type not supported")
        origin = self._origin(request)
        body = {**tokens, "instance_url": origin, "id": f"{origin}/id/{self.org_id}/{user}"}
        return json_response(body)

    def _verify_assertion(self, assertion: str, origin: str) -> str | httpx.Response:
        import jwt

        if not self.certificate:
            return self._oauth_error("invalid_client", "no certificate registered for the connected app")
        audiences = [origin, "https://login.salesforce.com", "https://test.salesforce.com"]
        try:
            claims = jwt.decode(
                assertion,
                self.certificate,
                algorithms=["RS256"],
                audience=audiences,
                options={"require": ["iss", "sub", "aud", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            return self._oauth_error("invalid_grant", "expired authorization code")
        except jwt.PyJWTError:
            return self._oauth_error("invalid_grant", "invalid assertion")
        if claims.get("iss") != self.client_id:
            return self._oauth_error("invalid_client_id", "client identifier invalid")
        if float(claims["exp"]) > self.now() + 600:
            return self._oauth_error("invalid_grant", "invalid assertion: exp too far in the future")
        user = self.usernames.get(str(claims.get("sub")))
        if user is None:
            return self._oauth_error("invalid_grant", "user hasn't approved this consumer")
        return user

    # -- routes --------------------------------------------------------------------------------
    def _register(self) -> None:
        register(self)


def build_salesforce(
    *,
    seed: int = 0,
    contacts: int = 100,
    companies: int = 25,
    deals: int = 10,
    faults: Faults | None = None,
    **options: Any,
) -> SalesforceEmulator:
    """An org seeded with Accounts, Contacts and Opportunities, an hour old (sandbox, benchmarks)."""
    emu = SalesforceEmulator(faults=faults, seed=seed, **options)
    emu.clock_offset = -3600  # an hour ago: a pull's window, which ends minutes before now, holds them
    accounts = emu.bulk_create(
        "Account", companies, lambda i: {"Name": f"Company {seed}-{i}", "Website": f"co{i}.example"}
    )
    people = emu.bulk_create(
        "Contact",
        contacts,
        lambda i: {
            "FirstName": "Person",
            "LastName": str(i),
            "Email": f"person{i}@example.com",
            "Phone": f"+1202555{i:07d}",
            "AccountId": accounts[i % companies] if companies else None,
        },
    )
    emu.bulk_create(
        "Opportunity",
        deals,
        lambda i: {
            "Name": f"Deal {i}",
            "Amount": 1000 + i,
            "StageName": "Prospecting",
            "CloseDate": "2027-01-31",
            "AccountId": accounts[i % companies] if companies else None,
        },
    )
    del people
    emu.clock_offset = 0.0
    return emu


def sandbox(options: SandboxOptions) -> Sandbox:
    """A seeded org for `crmsync sandbox serve`: crmsync connects by the JWT bearer flow, so no secret
    is piped; the signing key is written to a fresh 0600 file whose path the connect line names."""
    import os
    import tempfile
    from pathlib import Path

    emu = build_salesforce(
        seed=options.seed,
        contacts=options.contacts,
        companies=options.companies,
        deals=options.deals,
        faults=options.faults,
    )
    key = Path(tempfile.mkdtemp(prefix="crmsync-sf-sandbox-")) / "salesforce-sandbox.pem"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(emu.generate_certificate())
    login = {"client_id": emu.client_id, "user": "admin@example.com.sandbox", "jwt_key": str(key)}
    return Sandbox(emu, secret=None, credentials=dict(login), options=login)
