"""The transform library: each step a rule may apply to a value on its way to the CRM and back.

A ``Transform`` turns a canonical value into the CRM's form on push and undoes that on pull; a rule
chains them left to right on push, right to left on pull. ``TRANSFORMS`` names them as mapping files
do. The base class is in ``step.py``, the date and time transforms in ``dates.py``. The user-facing
reference of every transform is docs/mapping.md.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from crmsync.errors import CrmsyncError
from crmsync.mapping.dates import Date, DateTime
from crmsync.mapping.fields import CANONICAL_FIELDS, ENUMS, suggest
from crmsync.mapping.phone import region_known, to_e164
from crmsync.mapping.step import Transform
from crmsync.mapping.values import (
    MISSING,
    NOARG,
    SCALAR,
    BadValue,
    as_bool,
    as_fraction,
    as_text,
    domain_of,
    from_fraction,
    is_empty,
    parse_number,
)
from crmsync.providers import get_provider, provider_names


class Lower(Transform):
    name = "lower"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return value.lower() if isinstance(value, str) else value


class Upper(Transform):
    name = "upper"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return value.upper() if isinstance(value, str) else value


class Strip(Transform):
    name = "strip"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return value.strip() if isinstance(value, str) else value


class E164(Transform):
    name = "e164"
    takes = "optional"

    def setup(self, arg: Any) -> None:
        self.region = self.ctx.default_region
        if arg is NOARG:
            return
        if not isinstance(arg, dict) or set(arg) - {"region"}:
            raise BadValue("e164 takes {region: XX} or nothing")
        region = arg.get("region")
        if not isinstance(region, str) or not region_known(region.upper()):
            raise BadValue(f"unknown region {region!r} (two-letter country code such as US or DE)")
        self.region = region.upper()

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return to_e164(value, self.region)

    def pull(self, value: Any) -> Any:
        return to_e164(value, self.region)


class ValueMap(Transform):
    name = "value_map"
    takes = "required"

    def setup(self, arg: Any) -> None:
        if not isinstance(arg, dict) or not arg:
            raise BadValue("value_map takes a mapping {canonical: crm_value, ...}")
        self.pull_default: Any = MISSING
        self.push_default: Any = MISSING
        table = arg
        if "map" in arg and isinstance(arg["map"], dict) and set(arg) <= {"map", "default", "push_default"}:
            table = arg["map"]
            if "default" in arg:
                self.pull_default = arg["default"]
            if "push_default" in arg:
                self.push_default = arg["push_default"]
            if not table:
                raise BadValue("value_map: map is empty")
        for key, val in table.items():
            if not isinstance(key, SCALAR) or not isinstance(val, SCALAR):
                raise BadValue(f"value_map entries must be plain values, not {key!r}: {val!r}")
        allowed = ENUMS.get((self.ctx.obj, self.ctx.canonical))
        if allowed:
            wrong = [str(k) for k in table if str(k) not in allowed]
            if wrong:
                one_of = ", ".join(allowed)
                raise BadValue(f"value_map: {', '.join(wrong)} not a {self.ctx.canonical} (one of {one_of})")
            if self.pull_default is not MISSING and str(self.pull_default) not in allowed:
                raise BadValue(f"value_map: default {self.pull_default!r} is not a {self.ctx.canonical}")
        self.table: dict[Any, Any] = dict(table)
        self.by_text = {str(k): v for k, v in table.items()}
        self.reverse: dict[Any, Any] = {}
        self.duplicates: list[str] = []
        for key, val in table.items():
            if val in self.reverse and self.reverse[val] != key:
                self.duplicates.append(f"{self.reverse[val]} and {key} both map to {val!r}")
            self.reverse.setdefault(val, key)
        self.reverse_text = {as_text(v): k for v, k in self.reverse.items()}

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        if isinstance(value, SCALAR):
            if value in self.table and type(value) is not bool:
                return self.table[value]
            if str(value) in self.by_text:
                return self.by_text[str(value)]
        return self.push_default

    def pull(self, value: Any) -> Any:
        if isinstance(value, SCALAR):
            if value in self.reverse and type(value) is not bool:
                return self.reverse[value]
            if as_text(value) in self.reverse_text:
                return self.reverse_text[as_text(value)]
        return value if self.pull_default is MISSING else self.pull_default

    def outputs(self) -> list[Any]:
        out = list(self.table.values())
        if self.push_default is not MISSING:
            out.append(self.push_default)
        return out

    def out_kind(self, kind: str) -> str:
        return _kind_of_values(self.outputs())


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class Template(Transform):
    name = "template"
    takes = "required"
    invertible = False

    def setup(self, arg: Any) -> None:
        if not isinstance(arg, str) or not arg:
            raise BadValue('template takes a string such as "{first_name} {last_name}"')
        fields = CANONICAL_FIELDS[self.ctx.obj]
        self.names = _PLACEHOLDER.findall(arg)
        if not self.names:
            raise BadValue("template has no {field} placeholder (use constant for a fixed value)")
        for name in self.names:
            if name not in fields and not (name.startswith("custom.") and len(name) > 7):
                raise BadValue(f"template: unknown field {{{name}}}{suggest(name, fields)}")

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        def fill(match: re.Match[str]) -> str:
            got = record.get(match.group(1))
            return "" if is_empty(got) else as_text(got)

        text = re.sub(r"[ \t]+", " ", _PLACEHOLDER.sub(fill, self.arg)).strip()
        return text if text else MISSING

    def out_kind(self, kind: str) -> str:
        return "string"


class Default(Transform):
    name = "default"
    takes = "required"

    def setup(self, arg: Any) -> None:
        if arg is None:
            raise BadValue("default needs a value")

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        return copy.deepcopy(self.arg) if is_empty(value) else value

    def out_kind(self, kind: str) -> str:
        return _kind_of_values([self.arg]) if kind == "any" else kind


class Constant(Transform):
    name = "constant"
    takes = "required"
    invertible = False

    def setup(self, arg: Any) -> None:
        if arg is None:
            raise BadValue("constant needs a value")

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        return copy.deepcopy(self.arg)

    def out_kind(self, kind: str) -> str:
        return _kind_of_values([self.arg])


class Join(Transform):
    """list -> delimited string on push."""

    name = "join"
    takes = "optional"

    def setup(self, arg: Any) -> None:
        self.sep = ";" if arg is NOARG else arg
        if not isinstance(self.sep, str) or not self.sep:
            raise BadValue(f"{self.name} takes a non-empty delimiter such as ';'")

    def _join(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return self.sep.join(as_text(v) for v in value)
        return value

    def _split(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.split(self.sep) if value else []
        return value

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return self._join(value)

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        return value if value is MISSING or value is None else self.push_value(value, record)

    def pull(self, value: Any) -> Any:
        return self._split(value)

    def out_kind(self, kind: str) -> str:
        return "string"


class Split(Join):
    """delimited string -> list on push (the inverse of join)."""

    name = "split"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return self._split(value)

    def pull(self, value: Any) -> Any:
        return self._join(value)

    def out_kind(self, kind: str) -> str:
        return "list"


class Scale(Transform):
    name = "scale"
    takes = "required"

    def setup(self, arg: Any) -> None:
        if isinstance(arg, bool) or not isinstance(arg, (int, float)) or arg == 0 or not math.isfinite(arg):
            raise BadValue(f"scale takes a non-zero number, not {arg!r}")
        self.factor = as_fraction(arg)

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return from_fraction(as_fraction(value) * self.factor)

    def pull(self, value: Any) -> Any:
        return from_fraction(as_fraction(value) / self.factor)

    def out_kind(self, kind: str) -> str:
        return "number"


class MmSs(Transform):
    name = "mmss"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        seconds = parse_number(value)
        if seconds < 0:
            raise BadValue(f"{value!r}: a duration cannot be negative")
        whole = int(seconds)
        return f"{whole // 60:02d}:{whole % 60:02d}"

    def pull(self, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        if not isinstance(value, str):
            raise BadValue(f"{value!r} is not a duration")
        parts = value.strip().split(":")
        if not 1 <= len(parts) <= 3 or not all(p.strip().isdigit() for p in parts):
            raise BadValue(f"{value!r} is not a duration (mm:ss)")
        total = 0
        for part in parts:
            total = total * 60 + int(part)
        return total

    def out_kind(self, kind: str) -> str:
        return "string"


class Number(Transform):
    name = "number"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return parse_number(value)

    def pull(self, value: Any) -> Any:
        return parse_number(value)

    def out_kind(self, kind: str) -> str:
        return "number"


class String(Transform):
    name = "string"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return as_text(value)

    def pull(self, value: Any) -> Any:
        return as_text(value)


class Bool(Transform):
    name = "bool"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return as_bool(value)

    def pull(self, value: Any) -> Any:
        return as_bool(value)

    def out_kind(self, kind: str) -> str:
        return "bool"


#: How a CRM writes a link to another record (``ref_id``): ``{"id": "42"}`` or the integer id.
REFERENCE_SHAPES = ("object", "int")


def _provider_reference_shape(name: Any) -> str | None:
    """The link shape of the provider called ``name``, or None for no such provider or shape."""
    if not isinstance(name, str) or name.lower() not in provider_names():
        return None
    try:
        return get_provider(name).reference_shape
    except CrmsyncError:  # registered but not importable in this build
        return None


class RefId(Transform):
    """A link to another record: ``{ref: object}`` sends ``{"id": "42"}``, ``{ref: int}`` sends 42.

    A provider name stands for the shape that CRM writes links in (``Provider.reference_shape``).
    """

    name = "ref_id"
    takes = "required"

    def setup(self, arg: Any) -> None:
        style = arg.get("ref") if isinstance(arg, dict) and set(arg) == {"ref"} else arg
        if style not in REFERENCE_SHAPES:
            style = _provider_reference_shape(style)
        if style not in REFERENCE_SHAPES:
            raise BadValue("ref_id takes {ref: object}, {ref: int} or {ref: PROVIDER} of a CRM with a reference_shape")
        self.style = style

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        if isinstance(value, dict) and "id" in value:
            value = value["id"]
        if self.style == "object":
            return {"id": str(value)}
        try:
            return int(value)
        except (TypeError, ValueError):
            raise BadValue(f"{value!r} is not an integer record id") from None

    def pull(self, value: Any) -> Any:
        if value is False:
            return MISSING
        if isinstance(value, dict):
            ref = value.get("id")
            return MISSING if ref in (None, "", False) else str(ref)
        if isinstance(value, (list, tuple)):
            return str(value[0]) if value and value[0] not in (None, False) else MISSING
        return str(value)

    def out_kind(self, kind: str) -> str:
        return "ref"


class FalsyNone(Transform):
    name = "falsy_none"

    def pull(self, value: Any) -> Any:
        return MISSING if value is False else value


class Domain(Transform):
    name = "domain"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return domain_of(value)

    def pull(self, value: Any) -> Any:
        out = domain_of(value)
        return MISSING if out == "" else out

    def out_kind(self, kind: str) -> str:
        return "string"


class FullName(Transform):
    name = "fullname"
    takes = "required"
    shares_field = True

    def setup(self, arg: Any) -> None:
        part = arg.get("part") if isinstance(arg, dict) and set(arg) == {"part"} else arg
        if part not in ("first", "last"):
            raise BadValue("fullname takes first or last")
        if self.ctx.obj not in ("contacts",) and not self.ctx.canonical.startswith("custom."):
            raise BadValue("fullname joins a contact's first_name and last_name")
        self.part = part

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        parts = [str(record[k]).strip() for k in ("first_name", "last_name") if not is_empty(record.get(k))]
        text = " ".join(p for p in parts if p)
        return text if text else MISSING

    def pull(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = " ".join(value.split())
        first, _, last = text.rpartition(" ")
        out = first if self.part == "first" else last
        return out if out else MISSING

    def out_kind(self, kind: str) -> str:
        return "string"


#: Every transform by the name used in mapping files.
TRANSFORMS: dict[str, type[Transform]] = {
    t.name: t
    for t in (
        Lower,
        Upper,
        Strip,
        E164,
        DateTime,
        Date,
        ValueMap,
        Template,
        Default,
        Constant,
        Join,
        Split,
        Scale,
        MmSs,
        Number,
        String,
        Bool,
        RefId,
        FalsyNone,
        Domain,
        FullName,
    )
}


def _kind_of_values(values: list[Any]) -> str:
    kinds = set()
    for v in values:
        if isinstance(v, bool):
            kinds.add("bool")
        elif isinstance(v, (int, float)):
            kinds.add("number")
        elif isinstance(v, list):
            kinds.add("list")
        elif isinstance(v, dict):
            kinds.add("any")
        else:
            kinds.add("string")
    return kinds.pop() if len(kinds) == 1 else "any"
