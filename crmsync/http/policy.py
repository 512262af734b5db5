"""How a response is sorted: ok, retry (and after how long), refresh the credentials, or fail.

The retry decision is made once, here (STYLE habit 4): providers subclass ``ResponsePolicy`` to
read their own headers and error bodies, and never sleep themselves.
"""

from __future__ import annotations

import email.utils
import time
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from crmsync.http.client import HttpClient

RETRIABLE_STATUS = frozenset({429, 502, 503, 504})


class ResponsePolicy:
    """Sorts responses. Providers subclass it to read their own headers and error bodies."""

    #: The client's buckets whose answers state how many requests the CRM counted in its window
    #: (``observe`` tells the window, ``SlidingWindow.learn``); only these start with a probe.
    counts_stated: frozenset[str] = frozenset()

    def is_auth_expired(self, response: httpx.Response) -> bool:
        """True when a refresh and one retry may fix the response."""
        return response.status_code == 401

    def is_retriable(self, response: httpx.Response) -> bool:
        # A 500 passes on the next try as often as a 502 does (the CRMs' own SDKs retry every 5xx);
        # a write that must not be sent twice never gets here (``may_have_written`` comes first).
        # Providers whose 500 is a deterministic error (Odoo's JSON exceptions) override this.
        return response.status_code in RETRIABLE_STATUS or response.status_code == 500

    def retry_after(self, response: httpx.Response) -> float | None:
        """Seconds the server asked us to wait, or None to use our own backoff."""
        return parse_retry_after(response.headers.get("Retry-After"))

    def give_up(self, response: httpx.Response) -> bool:
        """True for a retriable status that no wait within the deadline can fix (daily quota)."""
        return False

    def may_have_written(self, response: httpx.Response) -> bool:
        """True when a write answered so may still have been done (a 5xx from a proxy or the CRM)."""
        return response.status_code >= 500

    def observe(self, response: httpx.Response, client: HttpClient, bucket: str) -> None:
        """Look at every response (e.g. rate-limit headers) and slow the bucket down if needed."""

    def error_message(self, response: httpx.Response) -> tuple[str, str | None]:
        """(message, code) from an error body, for exceptions."""
        try:
            body = response.json()
        except ValueError:
            return response.text[:300], None
        if isinstance(body, dict):
            return str(body.get("message") or body.get("error") or body)[:500], body.get("code") or body.get("category")
        return str(body)[:300], None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
