"""Field mappings: canonical fields <-> a CRM's fields, read from a small YAML file.

The engine reads and writes CRM data only through a ``Mapping``: no CRM field name appears
anywhere else in ``crmsync/sync``. Each provider ships a default (``crmsync/mappings/<provider>.yaml``,
printed by ``crmsync map init``); a connection may point at its own copy.

File format
-----------
::

    version: 1
    contact:                                   # sections: contact, company, deal, call, task
      email: {field: email, transform: [strip, lower]}
      first_name: firstname                    # shorthand: just the CRM field
      phone: {field: phone, transform: e164}
    call:
      duration_seconds: {field: hs_call_duration, transform: {scale: 1000}}
      notes: {field: hs_call_body, direction: push}
      const.status: {field: hs_call_status, transform: {constant: COMPLETED}}

A rule's key is a canonical field of that object, ``custom.<name>`` (passed through as-is) or
``const.<name>`` (push-only: the value comes from a ``constant``, ``default`` or ``template``).
``direction`` is ``both`` (default), ``push`` (local -> CRM only) or ``pull`` (CRM -> local only);
``const.*`` rules default to ``push``. ``transform`` is a name, a one-key mapping ``{name: argument}``
or a list of them, applied left to right on push and undone right to left on pull.

Canonical fields (object types are plural in the API, singular in the file):

- contact: email, phone, first_name, last_name, title, owner_email
- company: name, domain
- deal: name, stage, amount (number), currency, close_date (``YYYY-MM-DD``), key, owner_email
- call: outcome_id, occurred_at (ISO 8601 with offset), disposition, direction (inbound|outbound),
  duration_seconds (int), notes, recording_url, owner_email, title
- task: outcome_id, type (call|email|meeting|todo), due_at (ISO 8601 with offset), notes, title, owner_email

``owner_email`` reaches the mapping as the CRM user id push resolved it to (``Provider.resolve_owners``).

Missing values: a canonical value that is absent or ``None`` is not sent (unless a ``default``,
``constant`` or ``template`` supplies one); ``""`` is sent as ``""`` (most CRMs read that as "clear").
On pull, a CRM value that is absent, ``None`` or ``""`` leaves the canonical key absent.

Transforms
----------
``lower`` / ``upper`` / ``strip``
    Push-only normalisers of strings; on pull they pass the value through unchanged.
``e164``
    Phone numbers to E.164 (``+4930123456``) with Google's libphonenumber rules, on push and pull.
    Numbers without a country code use the default region (``Mapping.load(default_region="US")``,
    or ``{e164: {region: DE}}``). A value that is not a possible phone number is left as it is.
``datetime: {format, tz, naive, precision}``
    Canonical side: ISO 8601 with an offset. CRM side: ``format`` is ``iso`` (default),
    ``epoch_ms``, ``epoch_s`` or a ``strftime`` pattern. ``tz`` (an IANA zone such as ``UTC`` or
    ``Europe/Berlin``) is the zone the CRM side is written in; without it ``iso`` keeps the value's
    own offset and patterns use UTC. ``naive: true`` drops the offset from ``iso`` output (the CRM
    side is local time in ``tz``). ``precision`` (``s`` | ``ms`` | ``us``, default ``us``) truncates
    ``iso`` output. Pull reads the format back exactly (at its precision; a pattern without a time
    reads back as midnight in ``tz``) and also accepts ISO strings and epoch-millisecond numbers,
    since CRMs answer in a different form than they accept. Naive CRM values are in ``tz`` (UTC by
    default). Caveat: a naive local time inside a DST fold is read as the first of the two instants.
``date: {format}``
    Canonical ``YYYY-MM-DD``; CRM side ``iso`` (default) or a ``strftime`` pattern such as
    ``"%d/%m/%Y"``. Pull also accepts ISO datetimes (HubSpot reads dates back as midnight UTC:
    the UTC date is kept) and epoch milliseconds.
``value_map: {canonical: crm, ...}``
    Picklist translation. Long form: ``value_map: {map: {...}, default: X, push_default: Y}``.
    Push: a value not in the map is not sent (or ``push_default`` is sent). Pull: the map is
    inverted; an unknown CRM value becomes ``default`` if given, else passes through unchanged.
    A map that sends two canonical values to one CRM value is an error on a pulled field.
    Quote keys and values YAML would read as booleans (``'yes'``, ``'no'``, ``'on'``, ``'off'``).
``template: "{first_name} {last_name}"``
    Push only: renders other canonical fields of the same record; missing fields render empty,
    runs of spaces collapse; an all-empty result is not sent.
``default: X``
    Push: ``X`` when the value is missing or empty. Pull: pass-through.
``constant: X``
    Push only: always ``X``.
``join: ";"`` / ``split: ";"``
    ``join`` turns a canonical list into a delimited string on push and splits it back on pull
    (HubSpot multi-selects); ``split`` is the reverse. An empty string is an empty list.
``scale: 1000``
    Push multiplies a number by the factor, pull divides (exact decimal arithmetic; whole results are
    ints). Numeric strings are accepted (HubSpot answers with strings).
``mmss``
    Seconds <-> ``"mm:ss"`` (Zoho ``Call_Duration``; minutes may exceed 59). Pull also reads
    ``h:mm:ss`` and plain numbers.
``number`` / ``string`` / ``bool``
    Coercions. ``number`` parses numeric strings (ints stay ints); ``bool`` reads
    ``true/false/yes/no/1/0``; ``string`` writes the text form (``true``, ``1500`` for ``1500.0``) and
    keeps the value's meaning, so ``[number, string]`` sends a number as text and reads it back as a number.
``ref_id: {ref: zoho | odoo}``
    Linked records. Pull: a Zoho lookup ``{"id": .., "name": ..}`` or an Odoo many2one
    ``[id, "name"]`` becomes the id string. Push: ``{"id": id}`` (zoho) or an int id (odoo).
``falsy_none``
    Pull: Odoo's ``false`` for "empty" means missing. Push: pass-through. Put it last in the list.
``domain``
    ``https://www.Acme.com/about`` -> ``acme.com`` on push and pull (websites stored as URLs).
``fullname: first | last``
    One CRM name field for two canonical fields (Odoo ``res.partner.name``): map both
    ``first_name`` and ``last_name`` to it. Push writes ``"first last"``; pull splits on the last
    space, so a one-word name is a last name and a multi-word last name does not round-trip.

Errors: a typo'd transform, a bad argument, a push-only transform on a pulled field, an unknown
section or canonical field, or a missing/unsupported ``version`` is a ``MappingError`` that lists every
problem of the file, one per line, as ``file:line: section.key: reason``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from crmsync.errors import MappingError
from crmsync.providers.base import OBJECTS, SECTION, FieldInfo
from crmsync.yamlio import KeyPath, YamlDoc, load_data, parse_yaml

if TYPE_CHECKING:
    import phonenumbers  # imported on first use at run time: _phonenumbers()

__all__ = [
    "CANONICAL_FIELDS",
    "ENUMS",
    "TRANSFORMS",
    "FieldRule",
    "Mapping",
    "Problem",
    "RuleRow",
    "TransformError",
    "dump_rules",
]

VERSION = 1
DIRECTIONS = ("both", "push", "pull")
PROVIDERS = ("hubspot", "zoho", "odoo", "pipedrive")
OBJECT_OF = {section: obj for obj, section in SECTION.items()}

#: Canonical fields per object type and their kind (string|number|date|datetime).
CANONICAL_FIELDS: dict[str, dict[str, str]] = {
    "contacts": {
        "email": "string",
        "phone": "string",
        "first_name": "string",
        "last_name": "string",
        "title": "string",
        "owner_email": "string",
    },
    "companies": {"name": "string", "domain": "string"},
    "deals": {
        "name": "string",
        "stage": "string",
        "amount": "number",
        "currency": "string",
        "close_date": "date",
        "key": "string",
        "owner_email": "string",
    },
    "calls": {
        "outcome_id": "string",
        "occurred_at": "datetime",
        "disposition": "string",
        "direction": "string",
        "duration_seconds": "number",
        "notes": "string",
        "recording_url": "string",
        "owner_email": "string",
        "title": "string",
    },
    "tasks": {
        "outcome_id": "string",
        "type": "string",
        "due_at": "datetime",
        "notes": "string",
        "title": "string",
        "owner_email": "string",
    },
}

#: Canonical fields with a closed set of values (value_map keys are checked against these).
ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("calls", "disposition"): (
        "connected",
        "no_answer",
        "busy",
        "voicemail",
        "wrong_number",
        "not_interested",
        "interested",
        "meeting_booked",
        "callback_requested",
        "do_not_call",
    ),
    ("calls", "direction"): ("inbound", "outbound"),
    ("tasks", "type"): ("call", "email", "meeting", "todo"),
}


class _Missing:
    """The absence of a value (distinct from None, which some CRMs send for empty)."""

    _instance: ClassVar[_Missing | None] = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()
_NOARG: Any = object()


class TransformError(MappingError):
    """A value could not be converted by a rule (push or pull); names the rule and the value."""

    def __init__(self, message: str, *, obj: str = "", canonical: str = "", field: str = "") -> None:
        super().__init__(message)
        self.obj, self.canonical, self.field = obj, canonical, field


class _Bad(Exception):
    """A transform's argument or value is wrong; the caller adds file, line and key."""


# -- helpers -------------------------------------------------------------------------------------


def _is_empty(value: Any) -> bool:
    return value is MISSING or value is None or (isinstance(value, str) and value == "")


def _num(value: Any) -> int | float:
    """Parse a number (int when whole-looking, else float); strings allowed, bools not."""
    if isinstance(value, bool):
        raise _Bad(f"{value!r} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Bad(f"{value!r} is not a finite number")
        return value
    if isinstance(value, str):
        text = value.strip()
        if "_" in text:  # int() and float() accept 1_000; no CRM means that
            raise _Bad(f"{value!r} is not a number")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            result = float(text)
        except ValueError:
            raise _Bad(f"{value!r} is not a number") from None
        if not math.isfinite(result):
            raise _Bad(f"{value!r} is not a finite number")
        return result
    raise _Bad(f"{value!r} is not a number")


def _fraction(value: Any) -> Fraction:
    number = _num(value)
    # repr() of a float is its shortest round-tripping decimal, so 0.1 scales to exactly 100.
    return Fraction(number) if isinstance(number, int) else Fraction(repr(number))


def _from_fraction(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def _text(value: Any) -> str:
    """The text form CRMs expect: ``true``/``false``, whole floats without ``.0``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def _flow(value: Any) -> str:
    """A value as one line of YAML flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False, allow_unicode=True)
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")].strip()
    elif text.endswith("..."):
        text = text[: -len("...")].strip()
    return text


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _zone(name: Any) -> tzinfo:
    if not isinstance(name, str) or not name:
        raise _Bad(f"tz must be a time zone name such as UTC or Europe/Berlin, not {name!r}")
    if name.upper() in ("UTC", "Z"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Bad(f"unknown time zone {name!r}") from None


def _as_datetime(value: Any) -> datetime:
    """A canonical datetime (ISO string with offset, or an aware datetime)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise _Bad(f"{value!r} is not an ISO 8601 datetime") from None
    else:
        raise _Bad(f"{value!r} is not a datetime")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise _Bad(f"{value!r} has no UTC offset")
    return dt


def _as_date(value: Any) -> date:
    """A canonical date (``YYYY-MM-DD``, a date, or a datetime whose local date is taken)."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(text).date()
        except ValueError:
            raise _Bad(f"{value!r} is not an ISO date (YYYY-MM-DD)") from None
    raise _Bad(f"{value!r} is not a date")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DIGITS = re.compile(r"^-?\d+(\.\d+)?$")
_TIME_DIRECTIVES = re.compile(r"%[-#]?[HIMSfpTXcrRsz]")


def _epoch_to_dt(value: Any, unit: str) -> datetime:
    amount = _fraction(value)
    if unit == "ms":
        amount /= 1000
    whole = math.floor(amount)
    micro = math.floor((amount - whole) * 1_000_000)
    try:
        return _EPOCH + timedelta(seconds=whole, microseconds=micro)
    except OverflowError:
        raise _Bad(f"{value!r} is out of range for an epoch timestamp ({unit})") from None


def _dt_to_epoch(dt: datetime, unit: str) -> int:
    step = timedelta(milliseconds=1) if unit == "ms" else timedelta(seconds=1)
    return (dt - _EPOCH) // step


def _canonical_dt(dt: datetime) -> str:
    return dt.isoformat()


# -- transforms ----------------------------------------------------------------------------------


@dataclass
class _Ctx:
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

    def __init__(self, arg: Any, ctx: _Ctx) -> None:
        self.arg = arg
        self.ctx = ctx
        self.setup(arg)

    def setup(self, arg: Any) -> None:
        """Validate the argument (raise _Bad)."""

    @property
    def spec(self) -> Any:
        """The transform as written in YAML."""
        return self.name if self.arg is _NOARG else {self.name: self.arg}

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        """Canonical value -> CRM value. Missing and ``""`` pass through unless overridden."""
        if _is_empty(value):
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


class _Lower(Transform):
    name = "lower"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return value.lower() if isinstance(value, str) else value


class _Upper(Transform):
    name = "upper"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return value.upper() if isinstance(value, str) else value


class _Strip(Transform):
    name = "strip"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return value.strip() if isinstance(value, str) else value


_PN: list[Any] = []


def _phonenumbers() -> Any:
    """phonenumbers, imported on first use: 15 ms of start-up that a run can spend while its first
    requests are in flight instead (see ``Mapping.warm``)."""
    if not _PN:
        import phonenumbers

        _PN.append(phonenumbers)
    return _PN[0]


def _region_known(region: str) -> bool:
    # US, the default, is always known: loading a mapping does not need phonenumbers for it.
    return region == "US" or region in _phonenumbers().SUPPORTED_REGIONS


# A number of the North American plan written out in full: +1 (or, in region US, nothing) and ten
# digits whose area code starts 2-9. No national prefix can be stripped from such digits and every
# region of +1 takes ten, so phonenumbers gives "+1" and the digits: here 1 microsecond instead of 12
# (over half of mapping a pull's contacts). tests/test_mapping.py checks every shape this takes against it.
_NANP = re.compile(
    r"(?P<intl>\+1[ .-]?)?(?:\((?P<area>[2-9][0-9]{2})\) ?|(?P<bare>[2-9][0-9]{2})[ .-]?)"
    r"(?P<exchange>[0-9]{3})[ .-]?(?P<line>[0-9]{4})"
)


class _E164(Transform):
    name = "e164"
    takes = "optional"

    def setup(self, arg: Any) -> None:
        self.region = self.ctx.default_region
        if arg is _NOARG:
            return
        if not isinstance(arg, dict) or set(arg) - {"region"}:
            raise _Bad("e164 takes {region: XX} or nothing")
        region = arg.get("region")
        if not isinstance(region, str) or not _region_known(region.upper()):
            raise _Bad(f"unknown region {region!r} (two-letter country code such as US or DE)")
        self.region = region.upper()

    def normalise(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            return value
        if (nanp := _NANP.fullmatch(value)) is not None and (nanp["intl"] or self.region == "US"):
            return f"+1{nanp['area'] or nanp['bare']}{nanp['exchange']}{nanp['line']}"
        pn = _phonenumbers()
        number = self._parse(pn, value)
        if number is None:
            return value
        formatted = str(pn.format_number(number, pn.PhoneNumberFormat.E164))
        # Only return a form that normalises to itself, so push(push(x)) == push(x) always.
        if formatted == value or _reparses_unchanged(pn, number):
            return formatted
        again = self._parse(pn, formatted)
        if again is None or pn.format_number(again, pn.PhoneNumberFormat.E164) != formatted:
            return value
        return formatted

    def _parse(self, pn: Any, text: str) -> phonenumbers.PhoneNumber | None:
        try:
            number = pn.parse(text, self.region)
        except pn.NumberParseException:
            return None
        return number if pn.is_possible_number(number) else None

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return self.normalise(value)

    def pull(self, value: Any) -> Any:
        return self.normalise(value)


_METADATA: dict[int, Any] = {}  # country calling code -> phonenumbers metadata (looked up once)


def _reparses_unchanged(pn: Any, number: phonenumbers.PhoneNumber) -> bool:
    """True when parsing the E.164 form of ``number`` certainly gives ``number`` back.

    Parsing ``+<country code><national number>`` can only differ from ``number`` where the country's
    national-prefix rule strips leading digits of the national number. When that rule leaves the
    national number alone, the second full parse (a third of mapping's cost) is skipped; otherwise
    the caller parses again. ``tests/test_mapping.py`` checks this against the full re-parse for
    every region's example numbers. If phonenumbers ever drops the helper, every number is re-parsed.
    """
    strip = getattr(pn.phonenumberutil, "_maybe_strip_national_prefix_carrier_code", None)
    cc = number.country_code
    metadata = _METADATA.get(cc)
    if metadata is None:
        region = pn.region_code_for_country_code(cc)
        metadata = _METADATA[cc] = pn.PhoneMetadata.metadata_for_region_or_calling_code(cc, region)
    if strip is None or metadata is None or number.extension:
        return False
    if not metadata.national_prefix_for_parsing:
        return True
    national = pn.national_significant_number(number)
    try:
        _carrier, stripped, _ = strip(national, metadata)
    except Exception:  # an internal helper: any surprise means "not sure", never an error
        return False
    return bool(stripped == national)


class _DateTime(Transform):
    name = "datetime"
    takes = "optional"

    def setup(self, arg: Any) -> None:
        opts: dict[str, Any] = {} if arg is _NOARG or arg is None else arg
        if isinstance(opts, str):
            opts = {"format": opts}
        if not isinstance(opts, dict):
            raise _Bad("datetime takes {format: iso|epoch_ms|epoch_s|'<strftime>', tz: <zone>, naive: bool}")
        unknown = set(opts) - {"format", "tz", "naive", "precision"}
        if unknown:
            raise _Bad(f"unknown datetime option(s): {', '.join(sorted(map(str, unknown)))}")
        self.format = opts.get("format", "iso")
        if not isinstance(self.format, str) or not self.format:
            raise _Bad("format must be iso, epoch_ms, epoch_s or a strftime pattern")
        if self.format not in ("iso", "epoch_ms", "epoch_s") and "%" not in self.format:
            raise _Bad(f"unknown format {self.format!r} (iso, epoch_ms, epoch_s or a strftime pattern)")
        self.tz: tzinfo | None = _zone(opts["tz"]) if opts.get("tz") is not None else None
        self.naive = opts.get("naive", False)
        if not isinstance(self.naive, bool):
            raise _Bad("naive must be true or false")
        self.precision = opts.get("precision", "us")
        if self.precision not in ("s", "ms", "us"):
            raise _Bad("precision must be s, ms or us")
        if "%" in self.format:
            sample = datetime(2001, 2, 3, 4, 5, 6, 7008, tzinfo=UTC)
            try:
                datetime.strptime(sample.strftime(self.format), self.format)
            except ValueError:
                raise _Bad(f"format {self.format!r} cannot be read back") from None

    @property
    def _zone(self) -> tzinfo:
        return self.tz or UTC

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        dt = _as_datetime(value)
        if self.format == "epoch_ms":
            return _dt_to_epoch(dt, "ms")
        if self.format == "epoch_s":
            return _dt_to_epoch(dt, "s")
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
            dt = _epoch_to_dt(value, "s" if self.format == "epoch_s" else "ms")
        elif isinstance(value, str):
            text = value.strip()
            if _DIGITS.match(text):
                dt = _epoch_to_dt(text, "s" if self.format == "epoch_s" else "ms")
            elif "%" in self.format:
                try:
                    dt = datetime.strptime(text, self.format)
                except ValueError:
                    dt = self._iso(text, value)
            else:
                dt = self._iso(text, value)
        else:
            raise _Bad(f"{value!r} is not a datetime")
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=self._zone)
        if self.tz is not None:
            dt = dt.astimezone(self.tz)
        return _canonical_dt(dt)

    @staticmethod
    def _iso(text: str, value: Any) -> datetime:
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            raise _Bad(f"{value!r} is not a datetime") from None

    def out_kind(self, kind: str) -> str:
        if self.format in ("epoch_ms", "epoch_s"):
            return "number"
        if "%" in self.format and not _TIME_DIRECTIVES.search(self.format):
            return "date"
        return "datetime"


class _Date(Transform):
    name = "date"
    takes = "optional"

    def setup(self, arg: Any) -> None:
        opts: Any = {} if arg is _NOARG or arg is None else arg
        if isinstance(opts, str):
            opts = {"format": opts}
        if not isinstance(opts, dict) or set(opts) - {"format"}:
            raise _Bad("date takes {format: iso|'<strftime>'}")
        self.format = opts.get("format", "iso")
        if not isinstance(self.format, str) or (self.format != "iso" and "%" not in self.format):
            raise _Bad(f"unknown date format {self.format!r} (iso or a strftime pattern such as '%d/%m/%Y')")
        if self.format != "iso":
            sample = date(2001, 2, 3)
            try:
                back = datetime.strptime(sample.strftime(self.format), self.format).date()
            except ValueError:
                raise _Bad(f"format {self.format!r} cannot be read back") from None
            if back != sample:
                raise _Bad(f"format {self.format!r} loses part of the date")

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        d = _as_date(value)
        return d.isoformat() if self.format == "iso" else d.strftime(self.format)

    def pull(self, value: Any) -> Any:
        if isinstance(value, datetime):
            return (value.astimezone(UTC) if value.tzinfo else value).date().isoformat()
        if isinstance(value, date):
            return value.isoformat()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _epoch_to_dt(value, "ms").date().isoformat()
        if not isinstance(value, str):
            raise _Bad(f"{value!r} is not a date")
        text = value.strip()
        if self.format != "iso":
            try:
                return datetime.strptime(text, self.format).date().isoformat()
            except ValueError:
                pass
        if _DIGITS.match(text):
            return _epoch_to_dt(text, "ms").date().isoformat()
        try:
            return date.fromisoformat(text).isoformat()
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise _Bad(f"{value!r} is not a date") from None
        # Date-only CRM fields come back as midnight UTC: the UTC date is the stored one.
        return (dt.astimezone(UTC) if dt.tzinfo else dt).date().isoformat()

    def out_kind(self, kind: str) -> str:
        return "date"


_SCALAR = (str, int, float, bool)


class _ValueMap(Transform):
    name = "value_map"
    takes = "required"

    def setup(self, arg: Any) -> None:
        if not isinstance(arg, dict) or not arg:
            raise _Bad("value_map takes a mapping {canonical: crm_value, ...}")
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
                raise _Bad("value_map: map is empty")
        for key, val in table.items():
            if not isinstance(key, _SCALAR) or not isinstance(val, _SCALAR):
                raise _Bad(f"value_map entries must be plain values, not {key!r}: {val!r}")
        allowed = ENUMS.get((self.ctx.obj, self.ctx.canonical))
        if allowed:
            wrong = [str(k) for k in table if str(k) not in allowed]
            if wrong:
                raise _Bad(f"value_map: {', '.join(wrong)} not a {self.ctx.canonical} (one of {', '.join(allowed)})")
            if self.pull_default is not MISSING and str(self.pull_default) not in allowed:
                raise _Bad(f"value_map: default {self.pull_default!r} is not a {self.ctx.canonical}")
        self.table: dict[Any, Any] = dict(table)
        self.by_text = {str(k): v for k, v in table.items()}
        self.reverse: dict[Any, Any] = {}
        self.duplicates: list[str] = []
        for key, val in table.items():
            if val in self.reverse and self.reverse[val] != key:
                self.duplicates.append(f"{self.reverse[val]} and {key} both map to {val!r}")
            self.reverse.setdefault(val, key)
        self.reverse_text = {_text(v): k for v, k in self.reverse.items()}

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        if isinstance(value, _SCALAR):
            if value in self.table and type(value) is not bool:
                return self.table[value]
            if str(value) in self.by_text:
                return self.by_text[str(value)]
        return self.push_default

    def pull(self, value: Any) -> Any:
        if isinstance(value, _SCALAR):
            if value in self.reverse and type(value) is not bool:
                return self.reverse[value]
            if _text(value) in self.reverse_text:
                return self.reverse_text[_text(value)]
        return value if self.pull_default is MISSING else self.pull_default

    def outputs(self) -> list[Any]:
        out = list(self.table.values())
        if self.push_default is not MISSING:
            out.append(self.push_default)
        return out

    def out_kind(self, kind: str) -> str:
        return _kind_of_values(self.outputs())


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class _Template(Transform):
    name = "template"
    takes = "required"
    invertible = False

    def setup(self, arg: Any) -> None:
        if not isinstance(arg, str) or not arg:
            raise _Bad('template takes a string such as "{first_name} {last_name}"')
        fields = CANONICAL_FIELDS[self.ctx.obj]
        self.names = _PLACEHOLDER.findall(arg)
        if not self.names:
            raise _Bad("template has no {field} placeholder (use constant for a fixed value)")
        for name in self.names:
            if name not in fields and not (name.startswith("custom.") and len(name) > 7):
                raise _Bad(f"template: unknown field {{{name}}}{_suggest(name, fields)}")

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        def fill(match: re.Match[str]) -> str:
            got = record.get(match.group(1))
            return "" if _is_empty(got) else _text(got)

        text = re.sub(r"[ \t]+", " ", _PLACEHOLDER.sub(fill, self.arg)).strip()
        return text if text else MISSING

    def out_kind(self, kind: str) -> str:
        return "string"


class _Default(Transform):
    name = "default"
    takes = "required"

    def setup(self, arg: Any) -> None:
        if arg is None:
            raise _Bad("default needs a value")

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        return copy.deepcopy(self.arg) if _is_empty(value) else value

    def out_kind(self, kind: str) -> str:
        return _kind_of_values([self.arg]) if kind == "any" else kind


class _Constant(Transform):
    name = "constant"
    takes = "required"
    invertible = False

    def setup(self, arg: Any) -> None:
        if arg is None:
            raise _Bad("constant needs a value")

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        return copy.deepcopy(self.arg)

    def out_kind(self, kind: str) -> str:
        return _kind_of_values([self.arg])


class _Join(Transform):
    """list -> delimited string on push."""

    name = "join"
    takes = "optional"

    def setup(self, arg: Any) -> None:
        self.sep = ";" if arg is _NOARG else arg
        if not isinstance(self.sep, str) or not self.sep:
            raise _Bad(f"{self.name} takes a non-empty delimiter such as ';'")

    def _join(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return self.sep.join(_text(v) for v in value)
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


class _Split(_Join):
    """delimited string -> list on push (the inverse of join)."""

    name = "split"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return self._split(value)

    def pull(self, value: Any) -> Any:
        return self._join(value)

    def out_kind(self, kind: str) -> str:
        return "list"


class _Scale(Transform):
    name = "scale"
    takes = "required"

    def setup(self, arg: Any) -> None:
        if isinstance(arg, bool) or not isinstance(arg, (int, float)) or arg == 0 or not math.isfinite(arg):
            raise _Bad(f"scale takes a non-zero number, not {arg!r}")
        self.factor = _fraction(arg)

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return _from_fraction(_fraction(value) * self.factor)

    def pull(self, value: Any) -> Any:
        return _from_fraction(_fraction(value) / self.factor)

    def out_kind(self, kind: str) -> str:
        return "number"


class _MmSs(Transform):
    name = "mmss"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        seconds = _num(value)
        if seconds < 0:
            raise _Bad(f"{value!r}: a duration cannot be negative")
        whole = int(seconds)
        return f"{whole // 60:02d}:{whole % 60:02d}"

    def pull(self, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        if not isinstance(value, str):
            raise _Bad(f"{value!r} is not a duration")
        parts = value.strip().split(":")
        if not 1 <= len(parts) <= 3 or not all(p.strip().isdigit() for p in parts):
            raise _Bad(f"{value!r} is not a duration (mm:ss)")
        total = 0
        for part in parts:
            total = total * 60 + int(part)
        return total

    def out_kind(self, kind: str) -> str:
        return "string"


class _Number(Transform):
    name = "number"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return _num(value)

    def pull(self, value: Any) -> Any:
        return _num(value)

    def out_kind(self, kind: str) -> str:
        return "number"


class _String(Transform):
    name = "string"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return _text(value)

    def pull(self, value: Any) -> Any:
        return _text(value)


_TRUE = {"true", "yes", "1", "on", "y", "t"}
_FALSE = {"false", "no", "0", "off", "n", "f"}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _Bad(f"{value!r} is not a boolean")


class _Bool(Transform):
    name = "bool"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return _bool(value)

    def pull(self, value: Any) -> Any:
        return _bool(value)

    def out_kind(self, kind: str) -> str:
        return "bool"


class _RefId(Transform):
    name = "ref_id"
    takes = "required"

    def setup(self, arg: Any) -> None:
        style = arg.get("ref") if isinstance(arg, dict) and set(arg) == {"ref"} else arg
        if style not in ("zoho", "odoo"):
            raise _Bad("ref_id takes {ref: zoho} or {ref: odoo}")
        self.style = style

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        if isinstance(value, dict) and "id" in value:
            value = value["id"]
        if self.style == "zoho":
            return {"id": str(value)}
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _Bad(f"{value!r} is not an Odoo record id") from None

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


class _FalsyNone(Transform):
    name = "falsy_none"

    def pull(self, value: Any) -> Any:
        return MISSING if value is False else value


_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def _domain(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = _SCHEME.sub("", value.strip().lower())
    text = re.split(r"[/?#]", text, maxsplit=1)[0]
    text = text.rsplit("@", 1)[-1].split(":", 1)[0].rstrip(".")
    return text.removeprefix("www.")


class _Domain(Transform):
    name = "domain"

    def push_value(self, value: Any, record: dict[str, Any]) -> Any:
        return _domain(value)

    def pull(self, value: Any) -> Any:
        out = _domain(value)
        return MISSING if out == "" else out

    def out_kind(self, kind: str) -> str:
        return "string"


class _FullName(Transform):
    name = "fullname"
    takes = "required"
    shares_field = True

    def setup(self, arg: Any) -> None:
        part = arg.get("part") if isinstance(arg, dict) and set(arg) == {"part"} else arg
        if part not in ("first", "last"):
            raise _Bad("fullname takes first or last")
        if self.ctx.obj not in ("contacts",) and not self.ctx.canonical.startswith("custom."):
            raise _Bad("fullname joins a contact's first_name and last_name")
        self.part = part

    def push(self, value: Any, record: dict[str, Any]) -> Any:
        parts = [str(record[k]).strip() for k in ("first_name", "last_name") if not _is_empty(record.get(k))]
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
        _Lower,
        _Upper,
        _Strip,
        _E164,
        _DateTime,
        _Date,
        _ValueMap,
        _Template,
        _Default,
        _Constant,
        _Join,
        _Split,
        _Scale,
        _MmSs,
        _Number,
        _String,
        _Bool,
        _RefId,
        _FalsyNone,
        _Domain,
        _FullName,
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


# -- rules and mappings --------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldRule:
    """One canonical field <-> one CRM field, with its transforms and direction."""

    canonical: str
    field: str
    transforms: tuple[Transform, ...]
    direction: str
    line: int
    #: The transform as written in the file (name, mapping or list), for ``map show``.
    spec: Any = None

    @property
    def pushes(self) -> bool:
        return self.direction in ("both", "push")

    @property
    def pulls(self) -> bool:
        return self.direction in ("both", "pull")


@dataclass(frozen=True)
class Problem:
    """One finding of ``Mapping.check`` (kinds: unknown_field, read_only, type_mismatch,
    not_an_option, required_unmapped)."""

    obj: str
    canonical: str | None
    field: str | None
    kind: str
    message: str
    line: int = 0


class RuleRow(NamedTuple):
    """One row of ``map show``."""

    object: str
    canonical: str
    field: str
    transform: str
    direction: str


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


def _norm_obj(obj: str) -> str:
    if obj in CANONICAL_FIELDS:
        return obj
    if obj in OBJECT_OF:
        return OBJECT_OF[obj]
    raise MappingError(f"unknown object type {obj!r} (one of {', '.join(OBJECTS)})")


def _default_resource(provider: str) -> Any:
    return resources.files("crmsync").joinpath("mappings").joinpath(f"{provider}.yaml")


class Mapping:
    """A validated mapping file for one provider: the only place CRM field names live."""

    provider: str
    path: Path | None
    hash: str

    def __init__(self, provider: str, doc: YamlDoc, text: str, path: Path | None, default_region: str) -> None:
        self.provider = provider
        self.path = path
        self.text = text
        self.default_region = default_region
        self.data: dict[str, Any] = doc.data
        self.source = doc.path
        self._rules: dict[str, list[FieldRule]] = {obj: [] for obj in OBJECTS}
        self._pull_plans: dict[str, list[tuple[str, str, tuple[Transform, ...]]]] = {}
        self._build(doc)
        normal = json.dumps(self.data, sort_keys=True, separators=(",", ":"), default=str)
        self.hash = hashlib.sha256(normal.encode()).hexdigest()

    def warm(self) -> None:
        """Import what the rules' transforms use on first call (phonenumbers for ``e164``).

        A pull calls it once its first requests are out, so the import runs while they are in
        flight rather than in a page's mapping, where it held the GIL just as answers arrived.
        """
        if any(isinstance(t, _E164) for rules in self._rules.values() for r in rules for t in r.transforms):
            _phonenumbers()

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, provider: str, path: Path | None = None, *, default_region: str = "US") -> Mapping:
        """Load ``path``, or the provider's built-in mapping when ``path`` is None or does not exist."""
        if path is not None and Path(path).is_file():
            try:
                text = Path(path).read_text(encoding="utf-8-sig")
            except OSError as exc:
                raise MappingError(f"{path}: cannot read: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise MappingError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            return cls.from_text(provider, text, source=str(path), path=Path(path), default_region=default_region)
        return cls.from_text(
            provider, cls.default_text(provider), source=f"builtin:{provider}.yaml", default_region=default_region
        )

    @classmethod
    def from_text(
        cls,
        provider: str,
        text: str,
        *,
        source: str = "<mapping>",
        path: Path | None = None,
        default_region: str = "US",
    ) -> Mapping:
        """Parse and validate mapping YAML (every problem reported at once)."""
        if not isinstance(default_region, str) or not _region_known(default_region.upper()):
            raise MappingError(f"unknown default region {default_region!r} (two-letter country code such as US)")
        doc = parse_yaml(text, source, MappingError)
        return cls(provider, doc, text, path, default_region.upper())

    @classmethod
    def default_text(cls, provider: str) -> str:
        """The built-in mapping file of ``provider`` (what ``map init`` writes)."""
        resource = _default_resource(provider)
        if not resource.is_file():
            raise MappingError(f"no built-in mapping for provider {provider!r} (one of {', '.join(PROVIDERS)})")
        return str(resource.read_text(encoding="utf-8"))

    @property
    def is_default(self) -> bool:
        """True when this is the built-in mapping (no file of the user's)."""
        return self.path is None

    def _build(self, doc: YamlDoc) -> None:
        errors: list[str] = []

        def err(keypath: KeyPath, reason: str) -> None:
            errors.append(f"{doc.where(keypath)}: {reason}")

        data = doc.data
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise MappingError(f"{doc.path}:{doc.line(())}: a mapping file is a YAML mapping (version, contact, ...)")
        self.data = data
        errors.extend(_duplicate_keys(doc))
        if "version" not in data:
            errors.append(f"{doc.path}:1: version: missing (the first line should be `version: {VERSION}`)")
        elif data["version"] != VERSION:
            err(("version",), f"unsupported version {data['version']!r} (this crmsync reads version {VERSION})")
        for key in data:
            if key == "version":
                continue
            if key not in OBJECT_OF:
                hint = _suggest(str(key), OBJECT_OF)
                if key in SECTION:
                    hint = f" (sections are singular: {SECTION[key]})"
                err((key,), f"unknown section{hint}; sections are {', '.join(OBJECT_OF)}")
                continue
            section = data[key]
            if section is None:
                continue
            if not isinstance(section, dict):
                err((key,), "a section is a mapping of canonical field -> rule")
                continue
            obj = OBJECT_OF[key]
            for canonical, spec in section.items():
                rule = self._rule(doc, obj, key, str(canonical), spec, err)
                if rule is not None:
                    self._rules[obj].append(rule)
            writers: dict[str, FieldRule] = {}
            for rule in self._rules[obj]:
                if not rule.pushes:
                    continue
                other = writers.get(rule.field)
                sharing = any(t.shares_field for t in rule.transforms)
                if other is not None and not (sharing and any(t.shares_field for t in other.transforms)):
                    err(
                        (key, rule.canonical),
                        f"{rule.field} is already written by {key}.{other.canonical} (line {other.line});"
                        " give one of them `direction: pull`",
                    )
                writers.setdefault(rule.field, rule)
        if errors:
            raise MappingError("\n".join(errors))

    def _rule(self, doc: YamlDoc, obj: str, section: str, canonical: str, spec: Any, err: Any) -> FieldRule | None:
        kp: KeyPath = (section, canonical)
        fields = CANONICAL_FIELDS[obj]
        ok = True
        is_const = canonical.startswith("const.")
        if canonical.startswith(("custom.", "const.")):
            if not canonical.split(".", 1)[1]:
                err(kp, f"{canonical} needs a name after the dot")
                ok = False
        elif canonical not in fields:
            err(kp, f"unknown canonical field{_suggest(canonical, fields)}; {section} has {', '.join(fields)}")
            ok = False
        if isinstance(spec, str):
            spec = {"field": spec}
        if not isinstance(spec, dict):
            err(kp, "a rule is a CRM field name or {field: ..., transform: ..., direction: ...}")
            return None
        unknown = [str(k) for k in spec if k not in ("field", "transform", "direction")]
        if unknown:
            err(kp, f"unknown key(s) {', '.join(unknown)} (field, transform, direction)")
            ok = False
        target = spec.get("field")
        if not isinstance(target, str) or not target.strip():
            err((*kp, "field") if "field" in spec else kp, "needs `field:` (the CRM field name)")
            ok = False
        direction = spec.get("direction", "push" if is_const else "both")
        if direction not in DIRECTIONS:
            err((*kp, "direction"), f"direction must be both, push or pull, not {direction!r}")
            ok = False
        elif is_const and direction != "push":
            err((*kp, "direction"), "const.* rules only push (there is no canonical field to pull into)")
            ok = False
        raw = spec.get("transform")
        items = [] if raw is None else (raw if isinstance(raw, list) else [raw])
        transforms: list[Transform] = []
        ctx = _Ctx(obj=obj, canonical=canonical, default_region=self.default_region)
        for i, item in enumerate(items):
            tkp: KeyPath = (*kp, "transform", i) if isinstance(raw, list) else (*kp, "transform")
            if isinstance(item, str):
                name, arg = item, _NOARG
            elif isinstance(item, dict) and len(item) == 1:
                name, arg = next(iter(item.items()))
                name = str(name)
            else:
                shown = ", ".join(map(str, item)) if isinstance(item, dict) else repr(item)
                err(tkp, f"a transform is a name or a one-key mapping {{name: argument}}, not {shown}")
                ok = False
                continue
            cls = TRANSFORMS.get(name)
            if cls is None:
                err(tkp, f"unknown transform {name!r}{_suggest(name, TRANSFORMS)}")
                ok = False
                continue
            if cls.takes == "no" and arg is not _NOARG and arg is not None:
                err(tkp, f"{name} takes no argument")
                ok = False
                continue
            if cls.takes == "required" and (arg is _NOARG or arg is None):
                err(tkp, f"{name} needs an argument, e.g. {{{name}: ...}}")
                ok = False
                continue
            try:
                t = cls(_NOARG if arg is None else arg, ctx)
            except _Bad as exc:
                err(tkp, str(exc))
                ok = False
                continue
            if direction in ("both", "pull") and not t.invertible:
                err(tkp, f"{name} cannot be undone on pull: add `direction: push` or drop it")
                ok = False
            if direction in ("both", "pull") and isinstance(t, _ValueMap) and t.duplicates:
                err(tkp, f"value_map is not reversible for pull ({'; '.join(t.duplicates)}); add `direction: push`")
                ok = False
            transforms.append(t)
        if ok and is_const and not any(isinstance(t, (_Constant, _Default, _Template)) for t in transforms):
            err(kp, "a const.* rule needs a constant, default or template transform")
            ok = False
        if not ok:
            return None
        assert isinstance(target, str)
        return FieldRule(canonical, target.strip(), tuple(transforms), str(direction), doc.line(kp), raw)

    # -- queries ---------------------------------------------------------------------------------
    def rules(self, obj: str) -> list[FieldRule]:
        """The rules of one object type (``contacts`` …; the singular section name works too)."""
        return list(self._rules[_norm_obj(obj)])

    def provider_fields(self, obj: str) -> list[str]:
        """CRM fields to request when pulling ``obj`` (fields of pull rules, in file order)."""
        return list(dict.fromkeys(r.field for r in self._rules[_norm_obj(obj)] if r.pulls))

    def field_for(self, obj: str, canonical: str) -> str | None:
        """The CRM field a canonical field maps to (push rules first), or None."""
        rules = self._rules[_norm_obj(obj)]
        for rule in sorted(rules, key=lambda r: not r.pushes):
            if rule.canonical == canonical:
                return rule.field
        return None

    # -- conversion ------------------------------------------------------------------------------
    def to_provider(self, obj: str, canonical: dict[str, Any]) -> dict[str, Any]:
        """Canonical record -> CRM fields (push rules); missing values are left out."""
        name = _norm_obj(obj)
        out: dict[str, Any] = {}
        for rule in self._rules[name]:
            if not rule.pushes:
                continue
            value = canonical.get(rule.canonical, MISSING)
            if value is None:
                value = MISSING
            for t in rule.transforms:
                try:
                    value = t.push(value, canonical)
                except (_Bad, ValueError, OverflowError) as exc:
                    raise TransformError(
                        f"{SECTION[name]}.{rule.canonical} -> {rule.field}: {exc}",
                        obj=name,
                        canonical=rule.canonical,
                        field=rule.field,
                    ) from None
            if value is MISSING or value is None:
                continue
            out[rule.field] = value
        return out

    def to_canonical(self, obj: str, raw: dict[str, Any]) -> dict[str, Any]:
        """CRM fields -> canonical record (pull rules); missing or empty CRM values stay absent."""
        name = _norm_obj(obj)
        plan = self._pull_plans.get(name)
        if plan is None:  # built once per object: this runs for every pulled record
            plan = [(r.field, r.canonical, tuple(reversed(r.transforms))) for r in self._rules[name] if r.pulls]
            self._pull_plans[name] = plan
        out: dict[str, Any] = {}
        for field, canonical, transforms in plan:
            value = raw.get(field)
            if value is None or value == "":
                continue
            for t in transforms:
                try:
                    value = t.pull(value)
                except (_Bad, ValueError, OverflowError) as exc:
                    raise TransformError(
                        f"{SECTION[name]}.{canonical} <- {field}: {exc}",
                        obj=name,
                        canonical=canonical,
                        field=field,
                    ) from None
                if value is MISSING:
                    break
            if value is MISSING or value is None or (isinstance(value, str) and value == ""):
                continue
            out[canonical] = value
        return out

    # -- map check -------------------------------------------------------------------------------
    def check(self, obj: str, fields: list[FieldInfo]) -> list[Problem]:
        """Compare the rules of ``obj`` with the CRM's field list (``map check``)."""
        name = _norm_obj(obj)
        by_name = {f.name: f for f in fields}
        problems: list[Problem] = []
        written: set[str] = set()
        for rule in self._rules[name]:
            info = by_name.get(rule.field)
            if rule.pushes:
                written.add(rule.field)
            if info is None:
                labels = {f.label: f.name for f in fields if f.label}
                hint = _suggest(rule.field, by_name)
                if not hint and rule.field in labels:
                    hint = f" (that is the label of {labels[rule.field]})"
                problems.append(
                    Problem(
                        name,
                        rule.canonical,
                        rule.field,
                        "unknown_field",
                        f"{self.provider} {name} has no field {rule.field!r}{hint}",
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
                        f"{rule.field} is read-only in {self.provider}: use `direction: pull`",
                        rule.line,
                    )
                )
            kind = self._kind(name, rule)
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
                outputs = self._fixed_outputs(rule)
                bad = [str(v) for v in outputs if _text(v) not in {_text(o) for o in info.options}]
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
                        f"{info.name} is required by {self.provider} but no rule pushes to it",
                        0,
                    )
                )
        return problems

    def _kind(self, obj: str, rule: FieldRule) -> str:
        free = rule.canonical.startswith(("custom.", "const."))
        kind = "any" if free else CANONICAL_FIELDS[obj][rule.canonical]
        for t in rule.transforms:
            kind = t.out_kind(kind)
        return kind

    @staticmethod
    def _fixed_outputs(rule: FieldRule) -> list[Any]:
        """Values the last value-producing step can send, when that set is known (value_map, constant)."""
        for t in reversed(rule.transforms):
            if isinstance(t, (_FalsyNone, _Strip)):
                continue
            if isinstance(t, _ValueMap):
                return t.outputs()
            if isinstance(t, _Constant) and isinstance(t.arg, _SCALAR):
                return [t.arg]
            if isinstance(t, _String):
                continue
            return []
        return []

    # -- editing (map set / map unset) ------------------------------------------------------------
    def set_rule(
        self,
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
        name = _norm_obj(obj)
        section = SECTION[name]
        old = (self.data.get(section) or {}).get(canonical)
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
        expected = copy.deepcopy(self.data)
        if not isinstance(expected.get(section), dict):
            expected[section] = {}
        expected[section][canonical] = rule
        text = _edit_text(self.text, self.source, section, canonical, f"{_flow(canonical)}: {_flow(rule)}")
        return self._finish(text, expected)

    def unset_rule(self, obj: str, canonical: str) -> str:
        """New file text without the rule for ``obj.canonical`` (validated; other content kept)."""
        name = _norm_obj(obj)
        section = SECTION[name]
        if canonical not in (self.data.get(section) or {}):
            raise MappingError(f"{self.source}: no rule for {section}.{canonical}")
        expected = copy.deepcopy(self.data)
        del expected[section][canonical]
        text = _edit_text(self.text, self.source, section, canonical, None)
        return self._finish(text, expected)

    def _finish(self, text: str | None, expected: dict[str, Any]) -> str:
        if text is not None:
            try:
                parsed = load_data(text, self.source, MappingError)
            except MappingError:
                parsed = None
            if _same_data(parsed, expected):
                Mapping.from_text(self.provider, text, source=self.source, default_region=self.default_region)
                return text
        # The file's layout defeated the line edit (flow-style sections …): write it out afresh.
        fresh = "# crmsync field mapping (rewritten by `crmsync map`; comments were not kept)\n" + yaml.safe_dump(
            expected, sort_keys=False, allow_unicode=True, default_flow_style=None, width=1 << 20
        )
        Mapping.from_text(self.provider, fresh, source=self.source, default_region=self.default_region)
        return fresh


def _same_data(a: Any, b: Any) -> bool:
    norm = lambda x: json.dumps(x, sort_keys=True, default=str)  # noqa: E731
    return norm(a if a is not None else {}) == norm(b)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _parse_transform_text(text: str) -> Any:
    try:
        return load_data(text, "--transform", MappingError)
    except MappingError as exc:
        raise MappingError(f"--transform {text!r}: not valid YAML ({exc})") from None


def _duplicate_keys(doc: YamlDoc) -> list[str]:
    """PyYAML keeps the last of two equal keys silently; a mapping file must not."""
    out: list[str] = []

    def walk(node: Any, prefix: str, depth: int) -> None:
        if not isinstance(node, yaml.MappingNode) or depth > 2:
            return
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                out.append(f"{doc.path}:{line}: {prefix}{key}: duplicate key (first on line {seen[key]})")
            seen.setdefault(key, line)
            walk(value_node, f"{prefix}{key}.", depth + 1)

    walk(doc.root, "", 1)
    return out


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


def dump_rules(mapping: Mapping, objects: list[str] | None = None) -> list[RuleRow]:
    """Rows for ``map show``: object, canonical field, CRM field, transform text, direction."""
    rows: list[RuleRow] = []
    for obj in objects or list(OBJECTS):
        name = _norm_obj(obj)
        for rule in mapping.rules(name):
            shown = "" if rule.spec is None else _flow(rule.spec)
            rows.append(RuleRow(name, rule.canonical, rule.field, shown, rule.direction))
    return rows
