"""Secret redaction for every log line, exception text and stored error.

Two nets: patterns (Authorization headers, bearer tokens, token-like query parameters and
JSON keys), and the exact secret strings crmsync has handled in this process, registered by
``credentials.py`` as it reads them. The second net catches secrets no pattern knows.
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"
_lock = threading.Lock()
_known: set[str] = set()

_SECRET_NAMES = (
    r"access_token|refresh_token|client_secret|api_key|apikey|hapikey|token|password|secret|code|key|"
    r"authorization|x-api-key"
)
_PATTERNS = [
    # Authorization: Bearer x / Zoho-oauthtoken x / Basic x  (header dumps, repr of dicts)
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(bearer|zoho-oauthtoken|basic)?\s*[^\s'\",}]+"),
    re.compile(r"(?i)\b(bearer|zoho-oauthtoken)\s+[A-Za-z0-9._~+/=-]{6,}"),
    # ?access_token=… &client_secret=… in URLs and form bodies
    re.compile(rf"(?i)([?&](?:{_SECRET_NAMES})=)[^&\s'\"]+"),
    # "access_token": "…" in JSON bodies
    re.compile(rf"(?i)(['\"](?:{_SECRET_NAMES})['\"]\s*:\s*['\"])[^'\"]+"),
    # HubSpot private-app tokens and Zoho tokens have recognisable shapes
    re.compile(r"\bpat-[a-z]{2,4}\d?-[0-9a-f-]{20,}\b"),
    re.compile(r"\b1000\.[0-9a-f]{32}\.[0-9a-f]{32}\b"),
]


def register_secret(value: str | None) -> None:
    """Remember a secret so it is masked wherever it appears later."""
    if value and len(value) >= 6:
        with _lock:
            _known.add(value)


def redact(text: str) -> str:
    """Mask secrets in ``text``."""
    if not text:
        return text
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: (m.group(1) or "") + MASK, text)
        else:
            text = pattern.sub(lambda m: MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the fully formatted message of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            # Formatting the traceback later would print the raw exception text.
            exc = record.exc_info[1]
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = (type(exc), exc, None)
        return True
