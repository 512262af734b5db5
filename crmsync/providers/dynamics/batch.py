"""The Web API's ``$batch``: many operations in one multipart request (one request against the limits).

Shape (reference §7): ``multipart/mixed; boundary=batch_<id>``; each part is ``application/http`` with
``Content-Transfer-Encoding: binary`` and a whole HTTP request inside; a change set is a nested
``multipart/mixed; boundary=changeset_<id>`` whose operations succeed or roll back together. The
answer has the same nesting (``batchresponse_``/``changesetresponse_``), one ``HTTP/1.1 <status>``
part per operation; a change set that failed answers one error part for the whole set. With
``Prefer: odata.continue-on-error`` the parts after a failed one still run.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

#: Operations one ``$batch`` may hold.
MAX_OPERATIONS = 1000


@dataclass
class Op:
    """One operation: ``url`` relative to the service root (``phonecalls(<id>)``)."""

    method: str
    url: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Answer:
    """One operation's answer (or a failed change set's single answer)."""

    status: int
    headers: dict[str, str]
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


#: A group is one operation on its own, or a change set (a list of operations, all or none).
Group = Op | list[Op]


def _part(op: Op, root: str, content_id: int | None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"{op.method} {root}/{op.url} HTTP/1.1"]
    headers = dict(op.headers)
    if op.body is not None:
        headers.setdefault("Content-Type", "application/json; type=entry")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append("")
    lines.append(json.dumps(op.body, separators=(",", ":")) if op.body is not None else "")
    return "\r\n".join(lines)


def build(groups: list[Group], root: str) -> tuple[str, bytes]:
    """(Content-Type, body) of a ``$batch`` request; ``root`` is the service root URL."""
    boundary = f"batch_{uuid.uuid4()}"
    out = []
    for group in groups:
        if isinstance(group, Op):
            out.append(f"--{boundary}\r\n{_part(group, root, None)}")
            continue
        cs = f"changeset_{uuid.uuid4()}"
        inner = "".join(f"--{cs}\r\n{_part(op, root, n)}\r\n" for n, op in enumerate(group, start=1))
        out.append(f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n{inner}--{cs}--")
    body = "\r\n".join(out) + f"\r\n--{boundary}--\r\n"
    return f"multipart/mixed; boundary={boundary}", body.encode("utf-8")


def boundary_of(content_type: str) -> str | None:
    for piece in content_type.split(";"):
        name, _, value = piece.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip().strip('"')
    return None


def split(body: str, boundary: str) -> list[str]:
    """The parts of a multipart body (without their delimiters)."""
    parts = []
    for chunk in body.split(f"--{boundary}")[1:]:
        if chunk.startswith("--"):
            break
        parts.append(chunk.lstrip("\r\n") if chunk.startswith(("\r\n", "\n")) else chunk)
    return parts


def headers_and_rest(text: str) -> tuple[dict[str, str], str]:
    """A block of ``Name: value`` lines up to a blank line, and what follows it."""
    text = text.replace("\r\n", "\n")
    head, _, rest = text.partition("\n\n")
    headers: dict[str, str] = {}
    for line in head.split("\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, rest


def _answer(part: str) -> Answer:
    _, http = headers_and_rest(part)  # the part's own headers (application/http)
    status_line, _, rest = http.lstrip("\n").partition("\n")
    bits = status_line.split(" ", 2)
    status = int(bits[1]) if len(bits) > 1 and bits[1].isdigit() else 0
    headers, text = headers_and_rest(rest)
    text = text.strip()
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = text
    return Answer(status, headers, body)


def parse(response: httpx.Response) -> list[list[Answer]]:
    """The answers of a ``$batch``, one list per top-level part (a change set's in order)."""
    boundary = boundary_of(response.headers.get("content-type", ""))
    if boundary is None:
        raise ValueError("the $batch answer is not multipart")
    out: list[list[Answer]] = []
    for part in split(response.text, boundary):
        headers, rest = headers_and_rest(part)
        inner = boundary_of(headers.get("content-type", "")) if "multipart" in headers.get("content-type", "") else None
        if inner:
            out.append([_answer(p) for p in split(rest, inner)])
        else:
            out.append([_answer(part)])
    return out
