"""Dataverse Web API (OData 4.0) details: headers, literals, key URLs, entity ids, errors, throttling.

Facts from shared/reference/dynamics.md §2, §5, §8, §9: every request carries the OData version
headers; ``Prefer`` preferences are comma-joined in one header; a created record's id comes back in
``OData-EntityId``; errors are ``{"error": {"code": "0x…", "message": …}}``; service protection limits
answer 429 with ``Retry-After`` in seconds, which must be waited out in full (retrying early prolongs
the throttling).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx

from crmsync.http import ResponsePolicy

API_PATH = "/api/data/v9.2"
#: Headers every Web API request carries.
HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
#: Largest page Dataverse serves (and the default).
MAX_PAGE = 5000
#: The namespace crmsync derives its record and activity ids from (``uuid5(NAMESPACE, name)``).
NAMESPACE = uuid.UUID("6f1b0c7e-2f4a-5d6b-9c3e-8a7d5e4f3b21")
GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
#: Characters that break an alternate-key URL (reference §3): such values are looked up by $filter.
KEY_UNSAFE = set("/<>*%&:\\?+#")
EXPIRED_DELTA = "version stamp associated with the client has expired"


def derived_id(*parts: str) -> str:
    """A record id crmsync chooses itself, the same for the same name in every store and run."""
    return str(uuid.uuid5(NAMESPACE, ":".join(parts)))


def prefer(*, maxpagesize: int | None = None, track_changes: bool = False, annotations: bool = False) -> str:
    """One ``Prefer`` header value with the preferences comma-joined, as Dataverse reads them."""
    parts = []
    if annotations:
        parts.append('odata.include-annotations="*"')
    if maxpagesize:
        parts.append(f"odata.maxpagesize={min(maxpagesize, MAX_PAGE)}")
    if track_changes:
        parts.append("odata.track-changes")
    return ",".join(parts)


def literal(value: Any) -> str:
    """An OData literal: strings single-quoted with quotes doubled, GUIDs and numbers bare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if GUID_RE.fullmatch(text):
        return text
    return "'" + text.replace("'", "''") + "'"


def any_of(column: str, values: list[str]) -> str:
    """``column eq v1 or column eq v2 …`` (the In function needs a newer parser than many proxies)."""
    return " or ".join(f"{column} eq {literal(v)}" for v in values)


def key_safe(value: str) -> bool:
    """True when a value may appear in an alternate-key URL."""
    return bool(value) and not (set(value) & KEY_UNSAFE) and len(value.encode()) <= 900


def key_path(entity_set: str, keys: dict[str, str]) -> str:
    """``contacts(emailaddress1='a@b.c')``: a record addressed by an alternate key."""
    inner = ",".join(f"{k}={literal(v)}" for k, v in keys.items())
    return f"{entity_set}({inner})"


def entity_id(response: httpx.Response) -> str | None:
    """The GUID of a created or upserted record, from ``OData-EntityId`` (or the body with representation)."""
    header = response.headers.get("OData-EntityId") or response.headers.get("Location") or ""
    found = GUID_RE.findall(header)
    return found[-1].lower() if found else None


def error_of(body: Any) -> tuple[str, str]:
    """(message, code) from a Web API error envelope."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)[:500], str(err.get("code") or "")
    return str(body)[:300], ""


class DynamicsPolicy(ResponsePolicy):
    """Dataverse's answers: 429 waited out exactly; the debug headers and the entitlement kept for status."""

    def __init__(self) -> None:
        self.burst_remaining: int | None = None
        self.time_remaining_ms: int | None = None
        self.entitlement_remaining: int | None = None
        self.throttled = 0

    def retry_after(self, response: httpx.Response) -> float | None:
        wait = super().retry_after(response)
        if wait is None and response.status_code == 429:
            return 5.0  # a 429 without Retry-After (a proxy's): a pause, not our jittered backoff
        return wait

    def observe(self, response: httpx.Response, client: Any, bucket: str) -> None:
        h = response.headers
        if response.status_code == 429:
            self.throttled += 1
        for name, attr in (
            ("x-ms-ratelimit-burst-remaining-xrm-requests", "burst_remaining"),
            ("x-ms-ratelimit-time-remaining-xrm-requests", "time_remaining_ms"),
        ):
            if name in h:
                try:
                    setattr(self, attr, int(float(h[name])))
                except ValueError:
                    pass

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        try:
            body = response.json()
        except ValueError:
            return response.text[:300], None
        message, code = error_of(body)
        return message, code or None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"throttled": self.throttled}
        if self.burst_remaining is not None:
            out["burst_remaining"] = self.burst_remaining
        if self.time_remaining_ms is not None:
            out["execution_ms_remaining"] = self.time_remaining_ms
        return out
