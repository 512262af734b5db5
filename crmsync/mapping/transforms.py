"""The transform library: each step a rule may apply to a value on its way to the CRM and back.

A ``Transform`` turns a canonical value into the CRM's form on push and undoes that on pull; a rule
chains them left to right on push, right to left on pull. ``TRANSFORMS`` names them as mapping files
do. The user-facing reference of every transform is docs/mapping.md.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from typing import Any, ClassVar

from crmsync.errors import CrmsyncError, MappingError
from crmsync.mapping.fields import CANONICAL_FIELDS, ENUMS, suggest
from crmsync.mapping.phone import region_known, to_e164
from crmsync.mapping.values import (
    DIGITS,
    MISSING,
    NOARG,
    SCALAR,
    BadValue,
    as_bool,
    as_date,
    as_datetime,
    as_fraction,
    as_text,
    canonical_datetime,
    datetime_to_epoch,
    domain_of,
    epoch_to_datetime,
    from_fraction,
    is_empty,
    parse_number,
    zone_named,
)
from crmsync.providers import get_provider, provider_names


class TransformError(MappingError):
    """A value could not be converted by a rule (push or pull); names the rule and the value."""

    def __init__(self, message: str, *, obj: str = "", canonical: str = "", field: str = "") -> None:
        super().__init__(message)
        self.obj, self.canonical, self.field = obj, canonical, field


@dataclass
class TransformContext:
    """What a transform may need to know about the rule it sits in."""

    obj: str
    canonical: str
    default_region: str


class Transform:
    """One step of a rule. ``push`` goes canonical -> CRM, ``pull`` undoes it."""

    name: ClassVar[str] = ""
    #: no | optional | required
    takes: ClassVar[str] = "no"
    #: False for push-only transforms (template, constant): a pulled field may not use them.
    invertible: ClassVar[bool] = True
    #: True when two rules may write the same CRM field through this transform (fullname).
    shares_field: ClassVar[bool] = False

    def __init__(self, arg: Any, ctx: TransformContext) -> None:
        self.arg = arg
        self.ctx = ctx
        self.setup(arg)

    def setup(self, arg: Any) -> None:
        """Validate the argument (raise BadValue)."""

    @property
    def spec(self) -> Any:
        """The transform as written in YAML."""
        return self.name if self.arg is NOARG else {self.name: self.arg}

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        """Canonical value -> CRM value. Missing and ``""`` pass through unless overridden."""
        if is_empty(value):
            return value
        return self.push_value(value, record)

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return value

    def pull(self, value: Any) -> Any:
        """CRM value -> canonical value (never called with MISSING)."""
        return value

    def out_kind(self, kind: str) -> str:
        """The kind of value this step produces from a ``kind`` input (for ``map check``)."""
        return kind


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


_TIME_DIRECTIVES = re.compile(r"%[-#]?[HIMSfpTXcrRsz]")


class DateTime(Transform):
    name = "datetime"
    takes = "optional"

    def setup(self, arg: Any) -> None:
        opts: dict[str, Any] = {} if arg is NOARG or arg is None else arg
        if isinstance(opts, str):
            opts = {"format": opts}
        if not isinstance(opts, dict):
            raise BadValue("datetime takes {format: iso|epoch_ms|epoch_s|'<strftime>', tz: <zone>, naive: bool}")
        unknown = set(opts) - {"format", "tz", "naive", "precision"}
        if unknown:
            raise BadValue(f"unknown datetime option(s): {', '.join(sorted(map(str, unknown)))}")
        self.format = opts.get("format", "iso")
        if not isinstance(self.format, str) or not self.format:
            raise BadValue("format must be iso, epoch_ms, epoch_s or a strftime pattern")
        if self.format not in ("iso", "epoch_ms", "epoch_s") and "%" not in self.format:
            raise BadValue(f"unknown format {self.format!r} (iso, epoch_ms, epoch_s or a strftime pattern)")
        self.tz: tzinfo | None = zone_named(opts["tz"]) if opts.get("tz") is not None else None
        self.naive = opts.get("naive", False)
        if not isinstance(self.naive, bool):
            raise BadValue("naive must be true or false")
        self.precision = opts.get("precision", "us")
        if self.precision not in ("s", "ms", "us"):
            raise BadValue("precision must be s, ms or us")
        if "%" in self.format:
            sample = datetime(2001, 2, 3, 4, 5, 6, 7008, tzinfo=UTC)
            try:
                datetime.strptime(sample.strftime(self.format), self.format)
            except ValueError:
                raise BadValue(f"format {self.format!r} cannot be read back") from None

    @property
    def _zone(self) -> tzinfo:
        return self.tz or UTC

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        dt = as_datetime(value)
        if self.format == "epoch_ms":
            return datetime_to_epoch(dt, "ms")
        if self.format == "epoch_s":
            return datetime_to_epoch(dt, "s")
        if self.format == "iso":
            local = dt.astimezone(self.tz) if self.tz else dt
            if self.naive:
                local = local.replace(tzinfo=None)
            return local.isoformat(timespec={"s": "seconds", "ms": "milliseconds", "us": "auto"}[self.precision])
        return dt.astimezone(self._zone).strftime(self.format)

    def pull(self, value: Any) -> Any:
        dt: datetime
        if isinstance(value, datetime):
            dt = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            dt = epoch_to_datetime(value, "s" if self.format == "epoch_s" else "ms")
        elif isinstance(value, str):
            text = value.strip()
            if DIGITS.match(text):
                dt = epoch_to_datetime(text, "s" if self.format == "epoch_s" else "ms")
            elif "%" in self.format:
                try:
                    dt = datetime.strptime(text, self.format)
                except ValueError:
                    dt = self._iso(text, value)
            else:
                dt = self._iso(text, value)
        else:
            raise BadValue(f"{value!r} is not a datetime")
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=self._zone)
        if self.tz is not None:
            dt = dt.astimezone(self.tz)
        return canonical_datetime(dt)

    @staticmethod
    def _iso(text: str, value: Any) -> datetime:
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            raise BadValue(f"{value!r} is not a datetime") from None

    def out_kind(self, kind: str) -> str:
        if self.format in ("epoch_ms", "epoch_s"):
            return "number"
        if "%" in self.format and not _TIME_DIRECTIVES.search(self.format):
            return "date"
        return "datetime"


class Date(Transform):
    name = "date"
    takes = "optional"

    def setup(self, arg: Any) -> None:
        opts: Any = {} if arg is NOARG or arg is None else arg
        if isinstance(opts, str):
            opts = {"format": opts}
        if not isinstance(opts, dict) or set(opts) - {"format"}:
            raise BadValue("date takes {format: iso|'<strftime>'}")
        self.format = opts.get("format", "iso")
        if not isinstance(self.format, str) or (self.format != "iso" and "%" not in self.format):
            raise BadValue(f"unknown date format {self.format!r} (iso or a strftime pattern such as '%d/%m/%Y')")
        if self.format != "iso":
            sample = date(2001, 2, 3)
            try:
                back = datetime.strptime(sample.strftime(self.format), self.format).date()
            except ValueError:
                raise BadValue(f"format {self.format!r} cannot be read back") from None
            if back != sample:
                raise BadValue(f"format {self.format!r} loses part of the date")

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        d = as_date(value)
        return d.isoformat() if self.format == "iso" else d.strftime(self.format)

    def pull(self, value: Any) -> Any:
        if isinstance(value, datetime):
            return (value.astimezone(UTC) if value.tzinfo else value).date().isoformat()
        if isinstance(value, date):
            return value.isoformat()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return epoch_to_datetime(value, "ms").date().isoformat()
        if not isinstance(value, str):
            raise BadValue(f"{value!r} is not a date")
        text = value.strip()
        if self.format != "iso":
            try:
                return datetime.strptime(text, self.format).date().isoformat()
            except ValueError:
                pass
        if DIGITS.match(text):
            return epoch_to_datetime(text, "ms").date().isoformat()
        try:
            return date.fromisoformat(text).isoformat()
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise BadValue(f"{value!r} is not a date") from None
        # Date-only CRM fields come back as midnight UTC: the UTC date is the stored one.
        return (dt.astimezone(UTC) if dt.tzinfo else dt).date().isoformat()

    def out_kind(self, kind: str) -> str:
        return "date"


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
