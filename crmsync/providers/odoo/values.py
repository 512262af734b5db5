"""Odoo values: datetimes, many2one ids, domains, notes as HTML, the "activity done" message, versions."""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

MARKER_FIELD = "x_crmsync_outcome_id"
DEAL_KEY_FIELD = "x_crmsync_deal_key"
MARKER_RE = re.compile(r"\[crmsync:([^\]\s<]+)\]")
MARKER_HTML_RE = re.compile(r"\s*(?:<p>)?\[crmsync:[^\]\s<]+\](?:</p>)?")
DT_FORMAT = "%Y-%m-%d %H:%M:%S"
CALL_XMLID = "mail.mail_activity_data_call"
TASK_SUFFIX = ":task"  # the engine marks a follow-up task as "<outcome id>:task"
TODO_XMLID = "mail.mail_activity_data_todo"
BATCH = 200  # records per create, read or search call
#: Records in a new write_date window above which it is read in id ranges side by side: below,
#: the walk from both ends takes a handful of round trips and splitting would add one of its own.
PARTITION_MIN = 2_000
#: Records in a window up to which its ranges are cut from its ids (one ``search``, a few bytes per
#: id), so each holds an equal share; above, from the highest id alone, in equal widths.
IDS_PLAN_MAX = 200_000

#: The Odoo model behind each object type.
MODELS = {
    "contacts": "res.partner",
    "companies": "res.partner",
    "deals": "crm.lead",
    "calls": "mail.activity",
    "tasks": "mail.activity",
}
#: Pseudo-fields of the default mapping: not Odoo fields, translated here.
PSEUDO = frozenset({"stage_name", "activity_type_xmlid", "crmsync_marker"})


def format_dt(value: datetime) -> str:
    return value.astimezone(UTC).strftime(DT_FORMAT) if value.tzinfo else value.strftime(DT_FORMAT)


def parse_dt(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    return _parse_second(value[:19])


@functools.lru_cache(maxsize=4096)
def _parse_second(text: str) -> datetime | None:
    # Cached: a page's rows share a handful of write_date seconds, and strptime is slow.
    try:
        return datetime.strptime(text, DT_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def m2o_id(value: Any) -> int | None:
    if isinstance(value, list) and value:
        return int(value[0])
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def or_domain(leaves: list[tuple[str, str, Any]]) -> list[Any]:
    """Polish-notation OR of leaves."""
    return [*(["|"] * (len(leaves) - 1)), *leaves] if leaves else []


def url_host(url: Any) -> str:
    text = str(url or "").strip().lower()
    text = re.sub(r"^[a-z]+://", "", text)
    text = text.split("/")[0].split("?")[0]
    return text[4:] if text.startswith("www.") else text


def phone_digits(phone: Any) -> str:
    return re.sub(r"[^\d+]", "", str(phone or ""))


#: "Original note:" as its title in mail.message_activity_done: ``<strong>`` up to 18, ``fw-bold`` on 19.
_NOTE_TITLE_RE = re.compile(r"Original note:\s*(?:</strong>\s*)?</div>\s*<div[^>]*>(.*)", re.DOTALL)
#: Where the feedback block starts (it follows the note): its own ``<div>`` wrapper on 19.
_FEEDBACK_RE = re.compile(r'(?:<div>\s*)?<div class="[^"]*">\s*(?:<strong>\s*)?Feedback:', re.DOTALL)
#: The summary after "<type> done" (and "(originally assigned to ...)"): ``: <span>`` or ``<span>: </span><span>``.
_SUMMARY_RE = re.compile(
    r"</span>\s*done\b(?:\s*\([^)]*\))?\s*(?:<span>\s*:\s*</span>|:)\s*<span[^>]*>(.*?)</span>", re.DOTALL
)


def done_note(body: str) -> str:
    """The original note inside an "activity done" message (mail.message_activity_done, 16 to 19)."""
    found = _NOTE_TITLE_RE.search(body)
    if not found:
        return ""
    rest = found.group(1)
    feedback = _FEEDBACK_RE.search(rest)
    if feedback:
        # The note's own <div> closes before the feedback block; the message wrapper after it.
        return re.sub(r"\s*</div>\s*$", "", rest[: feedback.start()])
    return re.sub(r"\s*</div>\s*</div>\s*$", "", rest)


def done_summary(body: str) -> str | None:
    found = _SUMMARY_RE.search(body)
    return html.unescape(found.group(1)).strip() if found else None


def note_html(text: str) -> str:
    """A plain-text note as the HTML Odoo keeps (it would sanitise raw text into ``<p>`` itself)."""
    if not text:
        return ""
    lines = [html.escape(line, quote=False) for line in text.split("\n")]
    return f"<p>{'<br>'.join(lines)}</p>"


def html_text(value: str) -> str:
    """An Odoo html value back as plain text: paragraphs and ``<br>`` become line breaks."""
    text = re.sub(r"<br\s*/?>", "\n", value, flags=re.IGNORECASE)
    text = re.sub(r"</(?:p|div|li|h[1-6])>\s*<(?:p|div|ul|ol|li|h[1-6])[^>]*>", "\n", text, flags=re.IGNORECASE)
    text = re.sub(r"<[^>]+>", "", text)
    return html.unescape(text).strip()


def server_version(info: Mapping[str, Any]) -> tuple[int, str]:
    """(major, label) from either shape Odoo answers with.

    ``GET /web/version`` gives ``{version_info, version}``; ``common.version`` gives
    ``{server_version_info, server_version, ...}``. A SaaS major reads ``"saas~18"``.
    """
    parts = info.get("version_info") or info.get("server_version_info") or []
    label = str(info.get("version") or info.get("server_version") or "")
    head = str(parts[0]) if isinstance(parts, list) and parts else label
    found = re.search(r"\d+", head)
    return (int(found.group()) if found else 0), label
