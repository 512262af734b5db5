"""Phone numbers to E.164 (the ``e164`` transform), with Google's libphonenumber rules.

phonenumbers is imported on first use, not with the mapping: a run imports it while its first
requests are in flight (``Mapping.warm``), and North American numbers written out in full take a
fast path that needs no phonenumbers at all.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import phonenumbers

_PN: list[Any] = []


def phonenumbers_module() -> Any:
    """phonenumbers, imported on first use so that loading a mapping does not pay for it."""
    if not _PN:
        import phonenumbers

        _PN.append(phonenumbers)
    return _PN[0]


def region_known(region: str) -> bool:
    """True for a two-letter region phonenumbers knows (US without importing it)."""
    # US, the default, is always known: loading a mapping does not need phonenumbers for it.
    return region == "US" or region in phonenumbers_module().SUPPORTED_REGIONS


# A number of the North American plan written out in full: +1 (or, in region US, nothing) and ten
# digits whose area code starts 2-9. No national prefix can be stripped from such digits and every
# region of +1 takes ten, so phonenumbers would give "+1" and the digits: the regular expression
# is much cheaper than a parse. tests/test_mapping.py checks every shape this takes against it.
_NANP = re.compile(
    r"(?P<intl>\+1[ .-]?)?(?:\((?P<area>[2-9][0-9]{2})\) ?|(?P<bare>[2-9][0-9]{2})[ .-]?)"
    r"(?P<exchange>[0-9]{3})[ .-]?(?P<line>[0-9]{4})"
)


def to_e164(value: Any, region: str) -> Any:
    """``value`` in E.164 (``+4930123456``); a value that is not a possible phone number is left as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return value
    if (nanp := _NANP.fullmatch(value)) is not None and (nanp["intl"] or region == "US"):
        return f"+1{nanp['area'] or nanp['bare']}{nanp['exchange']}{nanp['line']}"
    pn = phonenumbers_module()
    number = _parse(pn, value, region)
    if number is None:
        return value
    formatted = str(pn.format_number(number, pn.PhoneNumberFormat.E164))
    # Only return a form that normalises to itself, so push(push(x)) == push(x) always.
    if formatted == value or _reparses_unchanged(pn, number):
        return formatted
    again = _parse(pn, formatted, region)
    if again is None or pn.format_number(again, pn.PhoneNumberFormat.E164) != formatted:
        return value
    return formatted


def _parse(pn: Any, text: str, region: str) -> phonenumbers.PhoneNumber | None:
    try:
        number = pn.parse(text, region)
    except pn.NumberParseException:
        return None
    return number if pn.is_possible_number(number) else None


_METADATA: dict[int, Any] = {}  # country calling code -> phonenumbers metadata (looked up once)


def _reparses_unchanged(pn: Any, number: phonenumbers.PhoneNumber) -> bool:
    """True when parsing the E.164 form of ``number`` certainly gives ``number`` back.

    Parsing ``+<country code><national number>`` can only differ from ``number`` where the country's
    national-prefix rule strips leading digits of the national number. When that rule leaves the
    national number alone, the second full parse is skipped; otherwise the caller parses again.
    ``tests/test_mapping.py`` checks this against the full re-parse for every region's example
    numbers. If phonenumbers ever drops the helper, every number is re-parsed.
    """
    strip = getattr(pn.phonenumberutil, "_maybe_strip_national_prefix_carrier_code", None)
    cc = number.country_code
    if cc is None:
        return False
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
