"""Dataverse webhooks: the key check and the ``RemoteExecutionContext`` body (``DynamicsWebhooks``).

A webhook is registered with the Plug-in Registration tool (a ``serviceendpoint`` with contract 8 and
a step per message and table), not through the Web API, and it carries no signature: the registrant
picks ``WebhookKey`` (sent as ``?code=<key>``), ``HttpHeader`` (headers of their choosing) or
``HttpQueryString``. So the receiver's only proof is a per-connection secret, compared in constant
time. The body is the JSON form of ``Microsoft.Xrm.Sdk.RemoteExecutionContext``: ``MessageName``,
``PrimaryEntityName``, ``PrimaryEntityId``, ``InputParameters`` (``Target``: the entity's
``Attributes`` as key/value pairs), ``OperationCreatedOn`` as ``/Date(ms)/``.

Set the key with ``crmsync webhook secret -c NAME`` (read from stdin) and register the endpoint as
``https://<public url>/hooks/dynamics/NAME`` with authentication ``WebhookKey`` and that key, or
``HttpHeader`` with the header ``x-crmsync-key``.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from crmsync.errors import UsageError
from crmsync.providers.capabilities import Event, MalformedEvent, VerificationFailed, WebhookRequest, WebhookSupport

KEY = "webhook_key"
#: The header a registrant using ``HttpHeader`` authentication sends the key in.
HEADER = "x-crmsync-key"
EVENT_TYPES = {"created": "creation", "updated": "update", "deleted": "deletion"}

#: Table -> crmsync object type, for the tables push and pull know.
OBJECT_OF = {
    "contact": "contacts",
    "account": "companies",
    "opportunity": "deals",
    "phonecall": "calls",
    "task": "tasks",
}
MESSAGES = {"Create": "created", "Update": "updated", "Delete": "deleted"}
DATE_RE = re.compile(r"^/Date\((-?\d+)(?:[+-]\d{4})?\)/$")
MAX_BODY = 256 * 1024  # Dataverse drops entity images above this; a larger body is not its


@dataclass
class Change:
    """One record change a webhook reported."""

    object: str
    id: str
    action: str  # created | updated | deleted
    attributes: dict[str, Any] = field(default_factory=dict)
    at: datetime | None = None
    depth: int = 1


def key_ok(expected: str, *, query: Mapping[str, str], headers: Mapping[str, str], header: str | None = None) -> bool:
    """True when the request carries the connection's key: ``?code=`` (WebhookKey) or the named header.

    Compared in constant time; an empty expected key never matches (a connection without one accepts nothing).
    """
    if not expected:
        return False
    given = query.get("code", "")
    if header:
        given = next((v for k, v in headers.items() if k.lower() == header.lower()), given)
    return hmac.compare_digest(given.encode(), expected.encode())


def parse_date(value: Any) -> datetime | None:
    """``/Date(1495572064000)/`` (WCF JSON) or ISO 8601, as UTC."""
    if not isinstance(value, str):
        return None
    m = DATE_RE.match(value)
    if m:
        return datetime.fromtimestamp(int(m.group(1)) / 1000, UTC)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _pairs(items: Any) -> dict[str, Any]:
    """WCF's ``[{"key": k, "value": v}]`` as a dict; an entity reference becomes its id."""
    out: dict[str, Any] = {}
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            continue
        value = item.get("value")
        if isinstance(value, dict) and str(value.get("__type", "")).startswith("EntityReference"):
            value = str(value.get("Id") or "").lower() or None
        elif isinstance(value, dict) and "Value" in value and len(value) <= 2:
            value = value["Value"]  # OptionSetValue, Money
        out[item["key"]] = value
    return out


def parse(body: bytes) -> Change | None:
    """The change a webhook body reports; None for a table or message crmsync does not follow.

    Raises:
        ValueError: the body is not a RemoteExecutionContext (one line, for the 400 answer).
    """
    if len(body) > MAX_BODY:
        raise ValueError("the body is larger than Dataverse sends")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not JSON") from None
    return parse_doc(doc)


def parse_doc(doc: Any) -> Change | None:
    """``parse`` for a body already read as JSON (the receiver bounds its nesting first)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("PrimaryEntityName"), str):
        raise ValueError("the body is not a RemoteExecutionContext (no PrimaryEntityName)")
    rid = str(doc.get("PrimaryEntityId") or "").lower()
    if not re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", rid):
        raise ValueError("PrimaryEntityId is not a GUID")
    obj = OBJECT_OF.get(doc["PrimaryEntityName"])
    action = MESSAGES.get(str(doc.get("MessageName") or ""))
    if obj is None or action is None:
        return None
    target = _pairs(doc.get("InputParameters")).get("Target")
    attributes = _pairs(target.get("Attributes")) if isinstance(target, dict) else {}
    depth = doc.get("Depth")
    return Change(
        object=obj,
        id=rid,
        action=action,
        attributes=attributes,
        at=parse_date(doc.get("OperationCreatedOn")),
        depth=depth if isinstance(depth, int) else 1,
    )


class DynamicsWebhooks(WebhookSupport):
    """Dataverse service endpoints: a per-connection key, checked before the body is read."""

    secret_keys: ClassVar[tuple[str, ...]] = (KEY,)
    hidden_keys: ClassVar[tuple[str, ...]] = (KEY,)
    secret_prompt: ClassVar[str | None] = "webhook key (the one registered on the service endpoint)"

    def check_before_body(self, secret: Mapping[str, str], request: WebhookRequest) -> None:
        query = {k: v[0] for k, v in request.query.items() if v}
        header = HEADER if HEADER in request.headers else None
        if not key_ok(secret.get(KEY, ""), query=query, headers=request.headers, header=header):
            raise VerificationFailed("webhook key missing or wrong (?code= or x-crmsync-key)")

    def verify(self, secret: Mapping[str, str], request: WebhookRequest, body: bytes) -> None:
        self.check_before_body(secret, request)

    def events(self, doc: Any) -> list[Event]:
        try:
            change = parse_doc(doc)
        except ValueError as exc:
            raise MalformedEvent(str(exc)) from None
        if change is None:
            return []
        # Dataverse retries a delivery with the same OperationId: it is the event's identity.
        operation = str(doc.get("OperationId") or doc.get("RequestId") or "")
        stamp = change.at.isoformat() if change.at else ""
        return [
            Event(
                dedupe_key=f"{operation or stamp}:{change.object}:{change.id}:{change.action}",
                object=change.object,
                remote_id=change.id,
                event_type=EVENT_TYPES[change.action],
                occurred_at=change.at,
                payload={"message": doc.get("MessageName"), "depth": change.depth},
            )
        ]

    def hook_query(self, secret: Mapping[str, str], *, reveal: bool) -> str:
        return ""  # the key is given to the service endpoint as its WebhookKey, not in our URL

    def accept_secret(self, value: str, existing: Mapping[str, Any], *, channel_id: str | None) -> dict[str, str]:
        if len(value) < 16:
            raise UsageError("the webhook key must have at least 16 characters (e.g. `openssl rand -hex 24`)")
        return {KEY: value}
