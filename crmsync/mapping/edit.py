"""Edits of a mapping file's text for ``map set`` and ``map unset``, keeping everything else.

One rule line is replaced, inserted or removed in place, so the user's comments, order and layout
survive. The edit is checked by parsing the result: when it does not give exactly the intended data
(a flow-style section, an odd layout), the file is written out afresh from the data instead. Either
way the new text is validated as a mapping before it is returned, so a bad edit never reaches a file.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

from crmsync.errors import MappingError
from crmsync.mapping.fields import object_type
from crmsync.mapping.rules import Mapping, flow
from crmsync.providers.base import SECTION
from crmsync.yamlio import load_data, parse_yaml


def set_rule(
    mapping: Mapping,
    obj: str,
    canonical: str,
    field: str,
    *,
    transform: Any = None,
    direction: str | None = None,
) -> str:
    """New file text with ``obj.canonical`` mapped to ``field`` (validated; other content kept).

    ``transform`` is YAML text (``e164``, ``"{scale: 1000}"``), a list of those, or parsed values;
    None keeps the existing rule's transform (and direction), ``[]`` drops the transform.
    """
    name = object_type(obj)
    section = SECTION[name]
    old = (mapping.data.get(section) or {}).get(canonical)
    old_spec = old if isinstance(old, dict) else {}
    if transform is None:
        new_transform = old_spec.get("transform")
    elif isinstance(transform, str):
        new_transform = _parse_transform_text(transform)
    elif isinstance(transform, (list, tuple)):
        parsed = [_parse_transform_text(t) if isinstance(t, str) else t for t in transform]
        new_transform = parsed[0] if len(parsed) == 1 else (parsed or None)
    else:
        new_transform = transform
    if direction is None:
        direction = old_spec.get("direction")
    rule: Any
    if new_transform is None and direction in (None, "both"):
        rule = field
    else:
        rule = {"field": field}
        if new_transform is not None:
            rule["transform"] = new_transform
        if direction not in (None, "both"):
            rule["direction"] = direction
    expected = copy.deepcopy(mapping.data)
    if not isinstance(expected.get(section), dict):
        expected[section] = {}
    expected[section][canonical] = rule
    text = _edit_text(mapping.text, mapping.source, section, canonical, f"{flow(canonical)}: {flow(rule)}")
    return _finish(mapping, text, expected)


def unset_rule(mapping: Mapping, obj: str, canonical: str) -> str:
    """New file text without the rule for ``obj.canonical`` (validated; other content kept)."""
    name = object_type(obj)
    section = SECTION[name]
    if canonical not in (mapping.data.get(section) or {}):
        raise MappingError(f"{mapping.source}: no rule for {section}.{canonical}")
    expected = copy.deepcopy(mapping.data)
    del expected[section][canonical]
    text = _edit_text(mapping.text, mapping.source, section, canonical, None)
    return _finish(mapping, text, expected)


def _finish(mapping: Mapping, text: str | None, expected: dict[str, Any]) -> str:
    if text is not None:
        try:
            parsed = load_data(text, mapping.source, MappingError)
        except MappingError:
            parsed = None
        if _same_data(parsed, expected):
            Mapping.from_text(mapping.provider, text, source=mapping.source, default_region=mapping.default_region)
            return text
    # The file's layout defeated the line edit (flow-style sections …): write it out afresh.
    fresh = "# crmsync field mapping (rewritten by `crmsync map`; comments were not kept)\n" + yaml.safe_dump(
        expected, sort_keys=False, allow_unicode=True, default_flow_style=None, width=1 << 20
    )
    Mapping.from_text(mapping.provider, fresh, source=mapping.source, default_region=mapping.default_region)
    return fresh


def _same_data(a: Any, b: Any) -> bool:
    def norm(x: Any) -> str:
        return json.dumps(x, sort_keys=True, default=str)

    return norm(a if a is not None else {}) == norm(b)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _parse_transform_text(text: str) -> Any:
    try:
        return load_data(text, "--transform", MappingError)
    except MappingError as exc:
        raise MappingError(f"--transform {text!r}: not valid YAML ({exc})") from None


def _edit_text(text: str, source: str, section: str, key: str, new_line: str | None) -> str | None:
    """Replace (or insert, or with None remove) one rule line in ``text``; None when the layout is odd."""
    try:
        doc = parse_yaml(text, source, MappingError)
    except MappingError:
        return None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    tops = sorted(ln for kp, ln in doc.lines.items() if len(kp) == 1)

    def block_end(start: int, siblings: list[int]) -> int:
        """Last line (1-based) of the block starting at ``start``, without trailing blanks/comments."""
        following = [ln for ln in siblings if ln > start]
        end = (min(following) - 1) if following else len(lines)
        while end > start and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        return end

    sec_line = doc.lines.get((section,))
    if sec_line is None:
        if new_line is None:
            return None
        body = "".join(lines)
        if body and not body.endswith("\n\n"):
            body += "\n"
        return f"{body}{section}:\n  {new_line}\n"
    children = sorted(ln for kp, ln in doc.lines.items() if len(kp) == 2 and kp[0] == section)
    if any(ln == sec_line for ln in children):
        return None  # a flow-style section: fall back
    siblings = sorted(set(children) | set(tops))
    key_line = doc.lines.get((section, key))
    if key_line is not None:
        end = block_end(key_line, siblings)
        indent = _indent(lines[key_line - 1])
        replacement = [] if new_line is None else [f"{indent}{new_line}\n"]
        return "".join(lines[: key_line - 1] + replacement + lines[end:])
    if new_line is None:
        return None
    if isinstance(doc.data.get(section), dict) and not children:
        return None  # `section: {}` on one line
    if children:
        indent = _indent(lines[children[0] - 1])
        end = block_end(children[-1], siblings)
    else:
        indent = "  "
        end = sec_line
    return "".join([*lines[:end], f"{indent}{new_line}\n", *lines[end:]])
