"""``map check``: a mapping's rules against the CRM's live field list.

Finds unknown fields, read-only targets, type mismatches, picklist values the CRM does not accept
and required CRM fields no rule writes; the caller (``sync/mapping_ops.py``) gets the field list
from ``Provider.fields``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crmsync.mapping.fields import CANONICAL_FIELDS, object_type, suggest
from crmsync.mapping.rules import FieldRule, Mapping
from crmsync.mapping.transforms import Constant, FalsyNone, String, Strip, ValueMap
from crmsync.mapping.values import SCALAR, as_text
from crmsync.providers.base import FieldInfo


@dataclass(frozen=True)
class Problem:
    """One finding of ``check_rules`` (kinds: unknown_field, read_only, type_mismatch,
    not_an_option, required_unmapped)."""

    obj: str
    canonical: str | None
    field: str | None
    kind: str
    message: str
    line: int = 0


#: CRM field type -> value kinds a rule may write into it.
_ACCEPTS: dict[str, set[str]] = {
    "string": {"string", "number", "date", "datetime", "bool"},
    "text": {"string", "number", "date", "datetime", "bool"},
    "email": {"string"},
    "phone": {"string", "number"},
    "enumeration": {"string", "number", "bool", "list"},
    "number": {"number"},
    "bool": {"bool"},
    "date": {"date"},
    "datetime": {"datetime", "date", "number"},
    "reference": {"ref", "string", "number"},
}


def check_rules(mapping: Mapping, obj: str, fields: list[FieldInfo]) -> list[Problem]:
    """Compare the rules of ``obj`` with the CRM's field list (``map check``)."""
    name = object_type(obj)
    by_name = {f.name: f for f in fields}
    problems: list[Problem] = []
    written: set[str] = set()
    for rule in mapping.rules(name):
        info = by_name.get(rule.field)
        if rule.pushes:
            written.add(rule.field)
        if info is None:
            labels = {f.label: f.name for f in fields if f.label}
            hint = suggest(rule.field, by_name)
            if not hint and rule.field in labels:
                hint = f" (that is the label of {labels[rule.field]})"
            problems.append(
                Problem(
                    name,
                    rule.canonical,
                    rule.field,
                    "unknown_field",
                    f"{mapping.provider} {name} has no field {rule.field!r}{hint}",
                    rule.line,
                )
            )
            continue
        if rule.pushes and info.read_only:
            problems.append(
                Problem(
                    name,
                    rule.canonical,
                    rule.field,
                    "read_only",
                    f"{rule.field} is read-only in {mapping.provider}: use `direction: pull`",
                    rule.line,
                )
            )
        kind = _kind(name, rule)
        accepted = _ACCEPTS.get(info.type)
        if kind != "any" and accepted is not None and kind not in accepted:
            problems.append(
                Problem(
                    name,
                    rule.canonical,
                    rule.field,
                    "type_mismatch",
                    f"{rule.canonical} gives a {kind} but {rule.field} is a {info.type} field",
                    rule.line,
                )
            )
        if info.options and rule.pushes:
            outputs = _fixed_outputs(rule)
            bad = [str(v) for v in outputs if as_text(v) not in {as_text(o) for o in info.options}]
            if bad:
                problems.append(
                    Problem(
                        name,
                        rule.canonical,
                        rule.field,
                        "not_an_option",
                        f"{', '.join(bad)} not among the options of {rule.field}",
                        rule.line,
                    )
                )
    for info in fields:
        if info.required and not info.read_only and info.name not in written:
            problems.append(
                Problem(
                    name,
                    None,
                    info.name,
                    "required_unmapped",
                    f"{info.name} is required by {mapping.provider} but no rule pushes to it",
                    0,
                )
            )
    return problems


def _kind(obj: str, rule: FieldRule) -> str:
    free = rule.canonical.startswith(("custom.", "const."))
    kind = "any" if free else CANONICAL_FIELDS[obj][rule.canonical]
    for t in rule.transforms:
        kind = t.out_kind(kind)
    return kind


def _fixed_outputs(rule: FieldRule) -> list[Any]:
    """Values the last value-producing step can send, when that set is known (value_map, constant)."""
    for t in reversed(rule.transforms):
        if isinstance(t, (FalsyNone, Strip)):
            continue
        if isinstance(t, ValueMap):
            return t.outputs()
        if isinstance(t, Constant) and isinstance(t.arg, SCALAR):
            return [t.arg]
        if isinstance(t, String):
            continue
        return []
    return []
