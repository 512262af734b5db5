"""JSON nesting checked before parsing, so hostile input is an error and never a RecursionError.

The standard library's decoder recurses once per ``[`` or ``{``: a few thousand of them raise
RecursionError, which no caller expects from a parser. A push line and a webhook body are
therefore scanned first, in one linear pass over the brackets and quotes only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

#: Far deeper than any call outcome or CRM notification, far shallower than the recursion limit.
MAX_DEPTH = 64

_SPECIAL = re.compile(r'[\[\]{}"\\]')


class TooDeep(ValueError):
    """The JSON text nests deeper than the limit; ``column`` is 1-based, where it first does."""

    def __init__(self, limit: int, column: int) -> None:
        super().__init__(f"nested deeper than {limit} levels (at column {column})")
        self.limit, self.column = limit, column


def _depths(text: str, start: int) -> Iterator[tuple[int, int]]:
    """(offset, depth after it) for every bracket outside strings, from ``start`` on."""
    depth, in_string, escaped_at = 0, False, -1
    for m in _SPECIAL.finditer(text, start):
        pos = m.start()
        if pos == escaped_at:
            continue
        char = text[pos]
        if in_string:
            if char == "\\":
                escaped_at = pos + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            yield pos, depth
        elif char in "]}":
            depth -= 1
            yield pos, depth


def first_too_deep(text: str, limit: int = MAX_DEPTH) -> int | None:
    """Offset of the first bracket nested deeper than ``limit``, or None (text need not be valid JSON)."""
    if text.count("[") + text.count("{") <= limit:
        return None  # the common case costs two C-speed counts
    for pos, depth in _depths(text, 0):
        if depth > limit:
            return pos
    return None


def value_end(text: str, start: int, limit: int = MAX_DEPTH) -> tuple[int | None, bool]:
    """For the array or object starting at ``start``: (offset after its closing bracket or None, too deep)."""
    deep = False
    for pos, depth in _depths(text, start):
        deep = deep or depth > limit
        if depth <= 0:
            return pos + 1, deep
    return None, deep


def loads(text: str | bytes, limit: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises ``TooDeep`` (a ValueError) instead of recursing past ``limit``.

    Raises:
        TooDeep: nesting beyond ``limit``.
        ValueError: not JSON, or bytes that are not UTF-8.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8-sig")
    pos = first_too_deep(text, limit)
    if pos is not None:
        raise TooDeep(limit, pos + 1)
    return json.loads(text)
