"""Values as the transforms read and write them: missing values, numbers, text, dates and instants.

Every parser here raises ``BadValue`` for a value it cannot read; the rule that called it adds the
file, line and key to the message.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta, tzinfo
from fractions import Fraction
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


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
#: A transform written without an argument (``e164``), distinct from ``{e164: null}``.
NOARG: Any = object()


class BadValue(Exception):
    """A transform's argument or value is wrong; the caller adds file, line and key."""


def is_empty(value: Any) -> bool:
    """Missing, None or ``""``: what push leaves out and a ``default`` fills."""
    return value is MISSING or value is None or (isinstance(value, str) and value == "")


def parse_number(value: Any) -> int | float:
    """Parse a number (int when whole-looking, else float); strings allowed, bools not."""
    if isinstance(value, bool):
        raise BadValue(f"{value!r} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadValue(f"{value!r} is not a finite number")
        return value
    if isinstance(value, str):
        text = value.strip()
        if "_" in text:  # int() and float() accept 1_000; no CRM means that
            raise BadValue(f"{value!r} is not a number")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            result = float(text)
        except ValueError:
            raise BadValue(f"{value!r} is not a number") from None
        if not math.isfinite(result):
            raise BadValue(f"{value!r} is not a finite number")
        return result
    raise BadValue(f"{value!r} is not a number")


def as_fraction(value: Any) -> Fraction:
    """A number as an exact fraction (decimal arithmetic for ``scale`` and epochs)."""
    number = parse_number(value)
    # repr() of a float is its shortest round-tripping decimal, so 0.1 scales to exactly 100.
    return Fraction(number) if isinstance(number, int) else Fraction(repr(number))


def from_fraction(value: Fraction) -> int | float:
    """An int when whole, else a float."""
    return int(value) if value.denominator == 1 else float(value)


def as_text(value: Any) -> str:
    """The text form CRMs expect: ``true``/``false``, whole floats without ``.0``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def zone_named(name: Any) -> tzinfo:
    """The time zone of an IANA name (``UTC``, ``Europe/Berlin``)."""
    if not isinstance(name, str) or not name:
        raise BadValue(f"tz must be a time zone name such as UTC or Europe/Berlin, not {name!r}")
    if name.upper() in ("UTC", "Z"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadValue(f"unknown time zone {name!r}") from None


def as_datetime(value: Any) -> datetime:
    """A canonical datetime (ISO string with offset, or an aware datetime)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise BadValue(f"{value!r} is not an ISO 8601 datetime") from None
    else:
        raise BadValue(f"{value!r} is not a datetime")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise BadValue(f"{value!r} has no UTC offset")
    return dt


def as_date(value: Any) -> date:
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
            raise BadValue(f"{value!r} is not an ISO date (YYYY-MM-DD)") from None
    raise BadValue(f"{value!r} is not a date")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: A number written as text: CRMs send epoch timestamps as strings too.
DIGITS = re.compile(r"^-?\d+(\.\d+)?$")


def epoch_to_datetime(value: Any, unit: str) -> datetime:
    """An epoch timestamp in ``unit`` (``s`` or ``ms``) as an aware UTC datetime."""
    amount = as_fraction(value)
    if unit == "ms":
        amount /= 1000
    whole = math.floor(amount)
    micro = math.floor((amount - whole) * 1_000_000)
    try:
        return _EPOCH + timedelta(seconds=whole, microseconds=micro)
    except OverflowError:
        raise BadValue(f"{value!r} is out of range for an epoch timestamp ({unit})") from None


def datetime_to_epoch(dt: datetime, unit: str) -> int:
    """An aware datetime as a whole epoch timestamp in ``unit`` (``s`` or ``ms``), rounded down."""
    step = timedelta(milliseconds=1) if unit == "ms" else timedelta(seconds=1)
    return (dt - _EPOCH) // step


def canonical_datetime(dt: datetime) -> str:
    """The canonical text of an instant: ISO 8601 with its offset."""
    return dt.isoformat()


#: Plain values (picklist entries, constants) as opposed to lists and mappings.
SCALAR = (str, int, float, bool)

_TRUE = {"true", "yes", "1", "on", "y", "t"}
_FALSE = {"false", "no", "0", "off", "n", "f"}


def as_bool(value: Any) -> bool:
    """``true/false/yes/no/1/0`` (any case) as a bool."""
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
    raise BadValue(f"{value!r} is not a boolean")


_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def domain_of(value: Any) -> Any:
    """``https://www.Acme.com/about`` -> ``acme.com``; non-strings pass through."""
    if not isinstance(value, str):
        return value
    text = _SCHEME.sub("", value.strip().lower())
    text = re.split(r"[/?#]", text, maxsplit=1)[0]
    text = text.rsplit("@", 1)[-1].split(":", 1)[0].rstrip(".")
    return text.removeprefix("www.")
