"""How Salesforce's answers are sorted: its error envelope, its limits, what a retry can fix, per-record results."""

from __future__ import annotations

from typing import Any

import httpx

from crmsync.http import ResponsePolicy
from crmsync.providers.base import ItemResult
from crmsync.providers.salesforce.limits import ApiUsage

#: Error codes a later attempt may get past (lock contention, a busy org, a query that timed out).
RETRIABLE_CODES = frozenset({"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE", "QUERY_TIMEOUT"})


def errors_of(body: Any) -> list[dict[str, Any]]:
    """The ``[{message, errorCode, fields}]`` envelope (or an OAuth ``{error, error_description}``)."""
    if isinstance(body, list):
        return [e for e in body if isinstance(e, dict)]
    if isinstance(body, dict) and ("error" in body or "errorCode" in body):
        return [
            {
                "message": body.get("error_description") or body.get("message") or body.get("error"),
                "errorCode": body.get("errorCode") or body.get("error"),
            }
        ]
    return []


class SalesforcePolicy(ResponsePolicy):
    """403 ``REQUEST_LIMIT_EXCEEDED`` is the daily allocation (no 429, no Retry-After): stop, resume later."""

    def __init__(self) -> None:
        self.usage = ApiUsage()

    def _errors(self, response: httpx.Response) -> list[dict[str, Any]]:
        try:
            return errors_of(response.json())
        except ValueError:
            return []

    def _code(self, response: httpx.Response) -> str:
        errors = self._errors(response)
        return str(errors[0].get("errorCode") or "") if errors else ""

    def is_retriable(self, response: httpx.Response) -> bool:
        if response.status_code in (400, 403, 500, 503) and self._code(response) in (
            RETRIABLE_CODES | {"REQUEST_LIMIT_EXCEEDED"}
        ):
            return True
        return super().is_retriable(response)

    def give_up(self, response: httpx.Response) -> bool:
        # The concurrent-request limit frees up within seconds; the daily allocation does not.
        if self._code(response) != "REQUEST_LIMIT_EXCEEDED":
            return False
        message = " ".join(str(e.get("message") or "") for e in self._errors(response))
        return "concurrent" not in message.lower()

    def observe(self, response: httpx.Response, client: Any, bucket: str) -> None:
        self.usage.observe(response.headers.get("sforce-limit-info"))

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        errors = self._errors(response)
        if not errors:
            return response.text[:300], None
        message = "; ".join(
            f"{e.get('errorCode') or e.get('statusCode')}: {e.get('message')}"
            + (f" ({', '.join(map(str, e['fields']))})" if e.get("fields") else "")
            for e in errors[:3]
        )
        return message[:500], str(errors[0].get("errorCode") or "") or None


def item_result(ref: str, answer: Any, created_default: bool) -> ItemResult:
    """One Collections answer (``{id, success, errors, created}``) as an ItemResult."""
    if not isinstance(answer, dict):
        return ItemResult(ref, False, error="malformed answer", retriable=True)
    if answer.get("success"):
        created = answer.get("created")
        return ItemResult(
            ref, True, remote_id=str(answer.get("id")), created=created_default if created is None else bool(created)
        )
    errors = [e for e in answer.get("errors") or [] if isinstance(e, dict)]
    codes = {str(e.get("statusCode") or e.get("errorCode")) for e in errors}
    message = "; ".join(f"{e.get('statusCode')}: {e.get('message')}" for e in errors) or "refused"
    if "DUPLICATE_VALUE" in codes:
        # A unique External ID already held: "... duplicates value on record with id: 00T..."
        text = " ".join(str(e.get("message") or "") for e in errors)
        rid = text.rsplit("id:", 1)[1].strip().split()[0] if "id:" in text else None
        return ItemResult(ref, False, remote_id=rid, exists=True, error=message)
    if "DUPLICATES_DETECTED" in codes:
        matches = [
            str(r.get("record", {}).get("Id") if isinstance(r.get("record"), dict) else r)
            for e in errors
            for m in (e.get("duplicateResult") or {}).get("matchResults") or []
            for r in m.get("matchRecords") or []
        ]
        rule = next(
            ((e.get("duplicateResult") or {}).get("duplicateRule") for e in errors if e.get("duplicateResult")), None
        )
        detail = f" (rule {rule}; matches {', '.join(matches)})" if rule or matches else ""
        return ItemResult(
            ref, False, error=f"Salesforce's duplicate rules blocked this record{detail}", retriable=False
        )
    return ItemResult(ref, False, error=message, retriable=bool(codes & RETRIABLE_CODES))
