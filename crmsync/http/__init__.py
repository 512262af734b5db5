"""HTTP to the CRMs: the client (``client``), the response policy (``policy``), rate limits (``limits``)
and the process-wide tweaks (``tuning``). Provider code imports the public names from here.

The names are loaded on first use, so that ``crmsync.http.tuning`` (which the CLI imports first)
does not import httpx before a command needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crmsync.http.client import (
        Auth,
        HttpClient,
        NoAuth,
        RequestObserver,
        RequestStats,
        UnconfirmedWrite,
        prepare_tls,
        tls_context,
        tls_verify,
    )
    from crmsync.http.limits import DEFER_POLL, Bucket, RateLimit, SlidingWindow, Slots, TokenBucket, deferring
    from crmsync.http.policy import RETRIABLE_STATUS, ResponsePolicy, parse_retry_after
    from crmsync.http.tuning import READ_BYTES

__all__ = [
    "DEFER_POLL",
    "READ_BYTES",
    "RETRIABLE_STATUS",
    "Auth",
    "Bucket",
    "HttpClient",
    "NoAuth",
    "RateLimit",
    "RequestObserver",
    "RequestStats",
    "ResponsePolicy",
    "SlidingWindow",
    "Slots",
    "TokenBucket",
    "UnconfirmedWrite",
    "deferring",
    "parse_retry_after",
    "prepare_tls",
    "tls_context",
    "tls_verify",
]

_HOMES = {
    **dict.fromkeys(
        (
            "Auth",
            "HttpClient",
            "NoAuth",
            "RequestObserver",
            "RequestStats",
            "UnconfirmedWrite",
            "prepare_tls",
            "tls_context",
            "tls_verify",
        ),
        "client",
    ),
    **dict.fromkeys(
        ("DEFER_POLL", "Bucket", "RateLimit", "SlidingWindow", "Slots", "TokenBucket", "deferring"), "limits"
    ),
    **dict.fromkeys(("RETRIABLE_STATUS", "ResponsePolicy", "parse_retry_after"), "policy"),
    "READ_BYTES": "tuning",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
