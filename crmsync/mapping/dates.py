"""The date and time transforms: ``datetime`` (ISO, epoch or strftime, a zone) and ``date`` (ISO or strftime)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, tzinfo
from typing import Any

from crmsync.mapping.step import Transform
from crmsync.mapping.values import (
    DIGITS,
    NOARG,
    BadValue,
    as_date,
    as_datetime,
    canonical_datetime,
    datetime_to_epoch,
    epoch_to_datetime,
    zone_named,
)

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
