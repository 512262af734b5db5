"""Mappings: default files round-trip, errors name file:line:key, transforms invert exactly."""

from __future__ import annotations

import functools
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmsync.errors import MappingError
from crmsync.mapping import (
    CANONICAL_FIELDS,
    ENUMS,
    TRANSFORMS,
    Mapping,
    TransformError,
    check_rules,
    dump_rules,
    set_rule,
    unset_rule,
)
from crmsync.providers import get_provider, provider_names
from crmsync.providers.base import OBJECTS, FieldInfo

PROVIDERS = ("hubspot", "zoho", "odoo")
HS_GUIDS = {
    "busy": "9d9162e7-6cf3-4944-bf63-4dff82258764",
    "connected": "f240bbac-87c9-4f6e-bf70-924b57d47db7",
    "voicemail": "b2cf5968-551e-4856-9783-52b3da59a7d0",
    "no_answer": "73a0d17f-1163-4015-bdd5-ec830791da20",
    "wrong_number": "17b47fee-58de-441e-a44c-c6300d46f273",
}

props = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def custom(transform_yaml: str, direction: str = "both", obj: str = "contact") -> Mapping:
    """A one-rule mapping ``custom.x -> x`` with the given transform (cached: hypothesis calls it a lot)."""
    text = f"version: 1\n{obj}:\n  custom.x: {{field: x, transform: {transform_yaml}, direction: {direction}}}\n"
    return Mapping.from_text("hubspot", text, source="t.yaml")


def push(m: Mapping, value: Any, obj: str = "contacts") -> Any:
    return m.to_provider(obj, {"custom.x": value}).get("x", "<omitted>")


def pull(m: Mapping, value: Any, obj: str = "contacts") -> Any:
    return m.to_canonical(obj, {"x": value}).get("custom.x", "<absent>")


def instant(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


# -- the default mappings round-trip ---------------------------------------------------------------

BASE: dict[str, dict[str, Any]] = {
    "contacts": {
        "email": "jane.doe@example.com",
        "phone": "+14155550132",
        "first_name": "Jane",
        "last_name": "Doe",
        "title": "VP Sales",
        "owner_email": "rep@example.com",
    },
    "companies": {"name": "Acme GmbH", "domain": "acme.com"},
    "deals": {
        "name": "Acme renewal",
        "stage": "qualified",
        "amount": 1500.5,
        "currency": "EUR",
        "close_date": "2026-03-31",
        "key": "d-0123456789abcdef",
    },
    "calls": {
        "outcome_id": "o-42",
        "occurred_at": "2026-01-31T09:15:30.123000+01:00",
        "disposition": "connected",
        "direction": "inbound",
        "duration_seconds": 754,
        "notes": "Talked about <b>budget</b>",
        "recording_url": "https://rec.example.com/42.mp3",
        "title": "Call with Jane Doe: connected",
    },
    "tasks": {
        "outcome_id": "o-42",
        "type": "call",
        "due_at": "2026-02-03T10:00:00.250000+01:00",
        "notes": "Send the proposal",
        "title": "Follow up with Jane Doe",
    },
}

#: Values a CRM stores at a coarser precision than crmsync (documented in each default file).
PRECISION: dict[str, dict[str, dict[str, Any]]] = {
    "hubspot": {},
    "zoho": {
        "calls": {"occurred_at": "2026-01-31T09:15:30+01:00", "disposition": "interested"},
        "tasks": {"due_at": "2026-02-03T00:00:00+00:00"},
    },
    "odoo": {
        "calls": {"occurred_at": "2026-01-31T00:00:00+00:00"},
        "tasks": {"due_at": "2026-02-03T00:00:00+00:00"},
    },
}


def sample(provider: str, obj: str) -> dict[str, Any]:
    return {**BASE[obj], **PRECISION[provider].get(obj, {})}


def hubspot_store(obj: str, props: dict[str, Any]) -> dict[str, Any]:
    """What HubSpot reads back: strings only, dates as midnight UTC, datetimes as ...Z."""
    out: dict[str, Any] = {}
    for name, value in props.items():
        assert isinstance(value, str), f"HubSpot property {name} must be sent as a string, got {value!r}"
        if name == "closedate":
            value = f"{value}T00:00:00Z"
        elif name == "hs_timestamp":
            value = datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        out[name] = value
    out["hs_object_id"] = "101"  # unmapped properties are ignored
    return out


def zoho_store(obj: str, props: dict[str, Any]) -> dict[str, Any]:
    """Zoho answers datetimes in the user's time zone and adds lookups the mapping doesn't read."""
    out = dict(props)
    if "Call_Start_Time" in out:
        kolkata = timedelta(hours=5, minutes=30)
        local = datetime.fromisoformat(out["Call_Start_Time"]).astimezone(UTC) + kolkata
        out["Call_Start_Time"] = local.replace(tzinfo=None).isoformat() + "+05:30"
    out["Modified_By"] = {"id": "4150868000000225013", "name": "Rep"}
    return out


def odoo_store(obj: str, props: dict[str, Any]) -> dict[str, Any]:
    """Odoo adds http:// to websites and reads every unset field as false."""
    out = dict(props)
    if out.get("website"):
        out["website"] = "http://" + out["website"]
    for unset in ("mobile", "street", "partner_id", "user_id"):
        out[unset] = False
    return out


STORES = {"hubspot": hubspot_store, "zoho": zoho_store, "odoo": odoo_store}


def same(canonical: str, a: Any, b: Any) -> bool:
    if canonical in ("occurred_at", "due_at"):
        return instant(a) == instant(b)
    return bool(a == b)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("obj", OBJECTS)
def test_default_mapping_round_trips(provider: str, obj: str) -> None:
    m = Mapping.load(provider)
    record = sample(provider, obj)
    sent = m.to_provider(obj, record)
    back = m.to_canonical(obj, STORES[provider](obj, sent))
    invertible = {r.canonical for r in m.rules(obj) if r.direction == "both" and r.canonical in record}
    assert invertible, f"{provider} maps nothing of {obj}"
    assert set(back) == invertible
    for name in invertible:
        assert same(name, back[name], record[name]), (name, back[name], record[name])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_default_mappings_cover_the_essentials(provider: str) -> None:
    m = Mapping.load(provider)
    for obj, needed in {
        "contacts": {"email", "phone", "first_name", "last_name", "title"},
        "companies": {"name", "domain"},
        "deals": {"name", "stage", "amount", "close_date", "key"},
        "calls": {"outcome_id", "occurred_at", "title", "notes"},
        "tasks": {"outcome_id", "due_at", "title", "notes"},
    }.items():
        assert needed <= {r.canonical for r in m.rules(obj)}, (provider, obj)


@pytest.mark.parametrize("provider", provider_names())
def test_every_registered_provider_ships_a_default_mapping(provider: str) -> None:
    """A new CRM in the registry needs crmsync/mappings/<name>.yaml mapping what push matches and marks by."""
    m = Mapping.load(provider)
    assert m.is_default and m.source == f"builtin:{provider}.yaml"
    keys = {"contacts": {"email", "phone"}, "companies": {"name"}, "deals": {"name"}, "calls": {"outcome_id"}}
    keys["tasks"] = {"outcome_id"}
    for obj in get_provider(provider).objects:
        assert keys[obj] <= {r.canonical for r in m.rules(obj)}, (provider, obj)


def test_hubspot_dispositions_use_the_default_guids() -> None:
    m = Mapping.load("hubspot")
    for disposition, guid in HS_GUIDS.items():
        call = {**BASE["calls"], "disposition": disposition}
        sent = m.to_provider("calls", call)
        assert sent["hs_call_disposition"] == guid
        assert m.to_canonical("calls", hubspot_store("calls", sent))["disposition"] == disposition
    # No HubSpot default outcome: logged without one rather than mislabelled.
    for disposition in set(ENUMS[("calls", "disposition")]) - set(HS_GUIDS):
        assert "hs_call_disposition" not in m.to_provider("calls", {**BASE["calls"], "disposition": disposition})
    # An outcome the portal added comes back as its GUID (visible, so it can be mapped).
    assert m.to_canonical("calls", {"hs_call_disposition": "custom-guid"})["disposition"] == "custom-guid"


def test_hubspot_call_payload_shape() -> None:
    sent = Mapping.load("hubspot").to_provider("calls", BASE["calls"])
    assert sent["hs_timestamp"] == "2026-01-31T08:15:30.123+00:00"
    assert sent["hs_call_duration"] == "754000"
    assert sent["hs_call_direction"] == "INBOUND"
    assert sent["hs_call_status"] == "COMPLETED"
    assert sent["crmsync_outcome_id"] == "o-42"


def test_zoho_call_payload_shape() -> None:
    m = Mapping.load("zoho")
    sent = m.to_provider("calls", sample("zoho", "calls"))
    assert sent["Call_Start_Time"] == "2026-01-31T09:15:30+01:00"
    assert sent["Call_Duration"] == "12:34"
    assert sent["Call_Type"] == "Inbound"
    assert sent["Call_Result"] == "Interested"
    assert m.to_provider("tasks", sample("zoho", "tasks"))["Due_Date"] == "2026-02-03"


def test_odoo_shapes() -> None:
    m = Mapping.load("odoo")
    contact = m.to_provider("contacts", BASE["contacts"])
    assert contact["name"] == "Jane Doe"
    assert contact["is_company"] is False
    assert m.to_provider("companies", BASE["companies"])["is_company"] is True
    deal = m.to_provider("deals", BASE["deals"])
    assert deal["type"] == "opportunity" and deal["stage_name"] == "qualified"
    # false means "no value" on pull, for every mapped field
    assert m.to_canonical("contacts", {"name": "Cher", "email": False, "phone": False, "function": False}) == {
        "last_name": "Cher"
    }
    assert m.to_canonical("contacts", {"name": "Mary Ann Smith"}) == {"first_name": "Mary Ann", "last_name": "Smith"}
    assert m.to_canonical("deals", {"date_deadline": False, "expected_revenue": 0.0}) == {"amount": 0.0}


def test_load_falls_back_to_the_default(tmp_path: Path) -> None:
    default = Mapping.load("zoho")
    assert default.path is None and default.is_default
    assert Mapping.load("zoho", tmp_path / "missing.yaml").hash == default.hash
    own = tmp_path / "zoho.yaml"
    own.write_text("# mine\n" + Mapping.default_text("zoho"), encoding="utf-8")
    mine = Mapping.load("zoho", own)
    assert mine.path == own and not mine.is_default
    assert mine.hash == default.hash  # comments do not change the normalized content
    own.write_text(Mapping.default_text("zoho").replace("Title", "Designation"), encoding="utf-8")
    assert Mapping.load("zoho", own).hash != default.hash
    with pytest.raises(MappingError, match="no built-in mapping"):
        Mapping.default_text("nosuchcrm")


def test_queries() -> None:
    m = Mapping.load("hubspot")
    assert m.field_for("contacts", "email") == "email"
    assert m.field_for("contact", "phone") == "phone"
    assert m.field_for("contacts", "owner_email") == "hubspot_owner_id"
    assert Mapping.load("odoo").field_for("deals", "currency") is None
    fields = m.provider_fields("calls")
    assert "hs_timestamp" in fields and "hs_call_status" not in fields  # push-only rules are not read
    assert len(fields) == len(set(fields))
    with pytest.raises(MappingError, match="unknown object type"):
        m.rules("leads")
    rows = dump_rules(m, ["calls"])
    assert ("calls", "duration_seconds", "hs_call_duration", "[{scale: 1000}, string]", "both") in rows
    assert all(r.object == "calls" for r in rows)


# -- push and pull semantics -----------------------------------------------------------------------


def test_missing_values_are_omitted_unless_defaulted() -> None:
    m = Mapping.from_text(
        "hubspot",
        """version: 1
contact:
  email: email
  title: {field: jobtitle, transform: {default: Unknown}}
  const.source: {field: hs_lead_source, transform: {constant: crmsync}}
  const.label: {field: label, transform: {template: "{first_name} {last_name}"}}
  custom.flag: {field: flag, transform: bool}
""",
    )
    assert m.to_provider("contacts", {"email": None}) == {"jobtitle": "Unknown", "hs_lead_source": "crmsync"}
    assert m.to_provider("contacts", {"email": "a@b.co", "title": "", "last_name": "Doe"}) == {
        "email": "a@b.co",
        "jobtitle": "Unknown",
        "hs_lead_source": "crmsync",
        "label": "Doe",
    }
    assert m.to_canonical("contacts", {"email": "", "jobtitle": None, "flag": "false"}) == {"custom.flag": False}
    assert m.to_canonical("contacts", {}) == {}


def test_bad_values_raise_transform_error() -> None:
    m = Mapping.load("hubspot")
    with pytest.raises(TransformError, match=r"call\.occurred_at -> hs_timestamp: 'yesterday'") as info:
        m.to_provider("calls", {**BASE["calls"], "occurred_at": "yesterday"})
    assert info.value.canonical == "occurred_at" and info.value.field == "hs_timestamp"
    with pytest.raises(TransformError, match="no UTC offset"):
        m.to_provider("calls", {"occurred_at": "2026-01-31T09:00:00"})
    with pytest.raises(TransformError, match="amount <- amount"):
        m.to_canonical("deals", {"amount": "lots"})


def test_ref_id_falsy_none_domain_fullname() -> None:
    zoho = custom("{ref_id: {ref: zoho}}")
    assert push(zoho, "4150868000000225013") == {"id": "4150868000000225013"}
    assert pull(zoho, {"id": "4150868000000225013", "name": "Acme"}) == "4150868000000225013"
    odoo = custom("[{ref_id: {ref: odoo}}, falsy_none]")
    assert push(odoo, "7") == 7
    assert pull(odoo, [7, "Acme"]) == "7"
    assert pull(odoo, False) == "<absent>"
    assert push(custom("{ref_id: {ref: object}}"), 42) == {"id": "42"}
    assert push(custom("{ref_id: {ref: int}}"), {"id": "42", "name": "Acme"}) == 42
    assert pull(custom("{ref_id: int}"), [42, "Acme"]) == "42"
    dom = custom("domain")
    assert push(dom, "https://www.Acme.com/about?x=1") == "acme.com"
    assert pull(dom, "http://acme.com:8080/") == "acme.com"
    assert pull(custom("falsy_none"), False) == "<absent>"
    assert pull(custom("falsy_none"), 0) == 0
    assert pull(custom("[strip, lower, upper]"), "  MiXed ") == "  MiXed "  # normalisers pass through on pull
    assert push(custom("[strip, lower]"), "  MiXed ") == "mixed"


@pytest.mark.parametrize("ref", ["hubspot", "nosuchcrm", "3", "{id: 1}"])
def test_ref_id_names_a_shape_or_a_provider_that_has_one(ref: str) -> None:
    """A provider without a reference_shape (HubSpot links by association) is as wrong as an unknown name."""
    with pytest.raises(MappingError, match=r"ref_id takes \{ref: object\}, \{ref: int\} or \{ref: PROVIDER\}"):
        custom(f"{{ref_id: {{ref: {ref}}}}}")


def test_ref_id_by_provider_name_follows_the_providers_reference_shape() -> None:
    for name in provider_names():
        shape = get_provider(name).reference_shape
        if shape is None:
            continue
        expected = {"id": "7"} if shape == "object" else 7
        assert push(custom(f"{{ref_id: {{ref: {name}}}}}"), "7") == expected, name


def test_mapping_code_names_no_provider() -> None:
    """Provider names come from the registry and the providers: none is spelled in mapping code."""
    root = Path(__file__).parents[1] / "crmsync"
    files = [*sorted((root / "mapping").glob("*.py")), root / "sync" / "mapping_ops.py", root / "cli" / "mapcmd.py"]
    names = "|".join(provider_names())
    literal = re.compile(rf"""(["'])(?:{names})\1""", re.IGNORECASE)
    found = [
        f"{f.name}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1) if literal.search(line)
    ]
    assert not found


# -- errors name file:line:key, all at once ---------------------------------------------------------

BROKEN = """\
version: 1
contact:
  email: {field: email, transform: lowr}
  phne: phone
  title: {field: jobtitle, transform: {template: "{first_name}"}}
deal:
  amount: {field: amount, transform: {scale: zero}}
  close_date: {field: closedate, transform: {datetime: {tz: Mars/Olympus}}}
call:
  disposition: {field: hs_call_disposition, transform: {value_map: {connected: A, busy: A}}}
  direction: {field: hs_call_direction, direction: sideways}
  custom.x: {field: x, transform: {upper: yes}}
contacts:
  email: email
"""


def test_broken_file_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN, encoding="utf-8")
    with pytest.raises(MappingError) as info:
        Mapping.load("hubspot", path)
    lines = str(info.value).splitlines()
    expected = [
        (3, "contact.email.transform", "unknown transform 'lowr' (did you mean lower?)"),
        (4, "contact.phne", "unknown canonical field (did you mean phone?)"),
        (5, "contact.title.transform", "template cannot be undone on pull"),
        (7, "deal.amount.transform", "scale takes a non-zero number"),
        (8, "deal.close_date.transform", "unknown time zone 'Mars/Olympus'"),
        (10, "call.disposition.transform", "connected and busy both map to 'A'"),
        (11, "call.direction.direction", "direction must be both, push or pull"),
        (12, "call.custom.x.transform", "upper takes no argument"),
        (13, "contacts", "sections are singular: contact"),
    ]
    assert len(lines) == len(expected), lines
    for (line, key, reason), got in zip(expected, lines, strict=True):
        assert got.startswith(f"{path}:{line}: {key}: "), got
        assert reason in got, got


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("contact:\n  email: email\n", "t.yaml:1: version: missing"),
        ("version: 2\ncontact:\n  email: email\n", "t.yaml:1: version: unsupported version 2"),
        ("version: 1\nlead:\n  email: email\n", "t.yaml:2: lead: unknown section"),
        ("version: 1\ncontact:\n  email: email\n  email: work_email\n", "t.yaml:4: contact.email: duplicate key"),
        ("version: 1\ncontact:\n  email: {transform: lower}\n", "t.yaml:3: contact.email: needs `field:`"),
        ("version: 1\ncontact:\n  email: {field: email, tranform: lower}\n", "unknown key(s) tranform"),
        ("version: 1\ncontact:\n  email: email\n  first_name: email\n", "email is already written by contact.email"),
        ("version: 1\ncontact:\n  const.x: {field: x}\n", "needs a constant, default or template"),
        ("version: 1\ncontact:\n  const.x: {field: x, transform: {constant: 1}, direction: both}\n", "only push"),
        ("version: 1\ncall:\n  disposition: {field: d, transform: {value_map: {conected: C}}}\n", "conected not a"),
        ("version: 1\ncontact:\n  custom.x: {field: x, transform: [{a: 1, b: 2}]}\n", "one-key mapping"),
        ("version: 1\ncontact:\n  custom.x: {field: x, transform: value_map}\n", "value_map needs an argument"),
        ("version: 1\ncontact:\n  custom.x: {field: x, transform: {e164: {region: XX}}}\n", "unknown region"),
        ("version: 1\ncontact:\n  custom.x: {field: x, transform: {datetime: {format: '%Q'}}}\n", "cannot be read"),
        ("version: 1\ncontact:\n  custom.x: {field: x, transform: {template: '{nope}'}}\n", "unknown field {nope}"),
        ("version: 1\ncontact: [email]\n", "t.yaml:2: contact: a section is a mapping"),
        ("version: 1\ncontact:\n  email: {field: email\n", "t.yaml:4: invalid YAML"),
    ],
)
def test_invalid_files(text: str, message: str) -> None:
    with pytest.raises(MappingError) as info:
        Mapping.from_text("hubspot", text, source="t.yaml")
    assert message in str(info.value)


def test_push_only_rules_may_use_one_way_transforms() -> None:
    m = Mapping.from_text(
        "hubspot",
        "version: 1\ncall:\n  disposition: {field: d, transform: {value_map: {connected: C, busy: C}},"
        " direction: push}\n  title: {field: t, transform: {template: '{disposition}!'}, direction: push}\n",
    )
    assert m.to_provider("calls", {"disposition": "busy"}) == {"d": "C", "t": "busy!"}
    assert m.provider_fields("calls") == []


def test_every_transform_is_documented() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "mapping.md").read_text(encoding="utf-8")
    for name in TRANSFORMS:
        assert f"`{name}" in doc, name


# -- transform properties (hypothesis) -------------------------------------------------------------

phone_chars = st.sampled_from(list("0123456789      -().")) | st.just("")


@st.composite
def phone_like(draw: st.DrawFn) -> str:
    prefix = draw(st.sampled_from(["", "+", "+1 ", "+44 ", "+49 ", "+33 ", "+91 ", "+39 0", "00", "0"]))
    digits = draw(st.text(alphabet="0123456789", min_size=4, max_size=14))
    seps = draw(st.lists(st.sampled_from([" ", "-", ".", "(", ")", ""]), min_size=len(digits), max_size=len(digits)))
    return prefix + "".join(d + s for d, s in zip(digits, seps, strict=True))


@props
@given(phone_like() | st.text(max_size=20))
def test_e164_is_stable(raw: str) -> None:
    m = custom("e164")
    once = push(m, raw)
    if raw == "":
        assert once == ""
        return
    assert push(m, once) == once
    assert pull(m, once) == once


def _e164_by_full_reparse(text: str, region: str) -> str:
    """The e164 rule as first written: parse, format, and keep the result only if it re-parses to itself."""
    import phonenumbers

    def fmt(t: str) -> str | None:
        try:
            n = phonenumbers.parse(t, region)
        except phonenumbers.NumberParseException:
            return None
        return phonenumbers.format_number(n, 0) if phonenumbers.is_possible_number(n) else None

    once = fmt(text)
    return text if once is None or fmt(once) != once else once


def test_e164_shortcut_equals_full_reparse_in_every_region() -> None:
    """The skipped second parse (_reparses_unchanged) never changes a result, for any region's numbers."""
    import phonenumbers
    from phonenumbers import PhoneNumberFormat as F

    checked = 0
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        m = Mapping.from_text(
            "zoho", "version: 1\ncontact:\n  phone: {field: Phone, transform: e164}\n", default_region=region
        )
        meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
        prefix = (meta.national_prefix or "") if meta else ""
        for kind in phonenumbers.PhoneNumberType.values():
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            nsn = phonenumbers.national_significant_number(example)
            texts = {
                phonenumbers.format_number(example, fmt) for fmt in (F.E164, F.INTERNATIONAL, F.NATIONAL, F.RFC3966)
            }
            # National numbers typed with the national prefix twice or in front of the country code.
            texts |= {nsn, prefix + nsn, prefix + prefix + nsn, f"+{example.country_code}{prefix}{nsn}"}
            for text in texts:
                assert m.to_provider("contacts", {"phone": text}).get("Phone") == _e164_by_full_reparse(text, region), (
                    region,
                    text,
                )
                checked += 1
    assert checked > 3000


@st.composite
def nanp_written(draw: st.DrawFn) -> str:
    """North American numbers as people write them, in and around the shapes the e164 fast path takes."""
    digits = draw(st.text(alphabet="0123456789", min_size=9, max_size=11))
    area, exchange, line = digits[:3], digits[3:6], digits[6:]
    intl = draw(st.sampled_from(["", "+1", "+1 ", "+1-", "+1.", "1 ", "+ 1 ", "+11"]))
    if draw(st.booleans()):
        area = draw(st.sampled_from(["({})", "({}) ", "({})-", "(({}))", "{})"])).format(area)
    else:
        area += draw(st.sampled_from(["", " ", "-", ".", "  ", "/"]))
    return intl + area + exchange + draw(st.sampled_from(["", " ", "-", ".", "--"])) + line


@props
@given(nanp_written(), st.sampled_from(["US", "CA", "JM", "GB", "DE"]))
def test_e164_of_north_american_numbers_equals_full_reparse(text: str, region: str) -> None:
    rule = "version: 1\ncontact:\n  phone: {field: Phone, transform: e164}\n"
    m = Mapping.from_text("zoho", rule, default_region=region)
    assert m.to_provider("contacts", {"phone": text}).get("Phone") == _e164_by_full_reparse(text, region), text


def test_e164_fast_path_equals_full_reparse_for_every_shape_it_takes() -> None:
    """Every shape of the fast path's grammar, area codes on both sides of its 2-9 rule, +1 regions and others."""
    from crmsync.mapping import phone

    rule = "version: 1\ncontact:\n  phone: {field: Phone, transform: e164}\n"
    fast = 0
    for region in ("US", "CA", "JM", "PR", "GB", "DE", "FR", "IN"):
        m = Mapping.from_text("zoho", rule, default_region=region)
        for intl in ("", "+1", "+1 ", "+1-", "+1.", "1 ", "+11 "):
            for area in ("({})", "({}) ", "{}", "{} ", "{}-", "{}."):
                for sep in ("", " ", "-", "."):
                    for digits in ("6175550134", "2005550000", "9990001234", "0115550134", "1005550134"):
                        text = intl + area.format(digits[:3]) + digits[3:6] + sep + digits[6:]
                        got = m.to_provider("contacts", {"phone": text}).get("Phone")
                        assert got == _e164_by_full_reparse(text, region), (region, text)
                        fast += bool(phone._NANP.fullmatch(text))
    assert fast > 1000


def test_e164_fast_path_takes_the_usual_shapes() -> None:
    from crmsync.mapping import phone

    us = custom("e164")
    shapes = ["+1 617 555 0134", "+1-617-555-0134", "+1 (617) 555-0134", "+16175550134", "(617) 555-0134",
              "617.555.0134", "6175550134", "+1.617.555.0134"]  # fmt: skip
    assert {push(us, s) for s in shapes} == {"+16175550134"}
    assert all(phone._NANP.fullmatch(s) for s in shapes)
    for text in shapes:
        assert _e164_by_full_reparse(text, "US") == "+16175550134"


def test_e164_examples() -> None:
    us = custom("e164")
    assert push(us, "(415) 555-0132") == "+14155550132"
    assert push(us, "+49 30 1234567") == "+49301234567"
    assert push(us, "call me") == "call me"
    assert pull(us, "n/a") == "n/a"  # unparseable: left as is, no error
    de = Mapping.from_text(
        "zoho", "version: 1\ncontact:\n  phone: {field: Phone, transform: e164}\n", default_region="DE"
    )
    assert de.to_provider("contacts", {"phone": "030 1234567"}) == {"Phone": "+49301234567"}
    assert push(custom("{e164: {region: GB}}"), "020 7946 0018") == "+442079460018"


aware = st.datetimes(
    min_value=datetime(1900, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.timezones(),
    allow_imaginary=False,
)
DT_FORMATS = [
    ("{datetime: {format: iso}}", "us"),
    ("{datetime: {format: iso, tz: UTC}}", "us"),
    ("{datetime: {format: iso, tz: Asia/Kolkata, precision: ms}}", "ms"),
    ("{datetime: {format: iso, tz: America/New_York, precision: s}}", "s"),
    ("{datetime: {format: iso, tz: UTC, naive: true}}", "us"),
    ("{datetime: {format: epoch_ms}}", "ms"),
    ("{datetime: {format: epoch_s}}", "s"),
    ("{datetime: {format: '%Y-%m-%d %H:%M:%S', tz: UTC}}", "s"),
    ("{datetime: {format: '%d.%m.%Y %H:%M:%S.%f %z', tz: Europe/Berlin}}", "us"),
    ("{datetime: {format: '%Y-%m-%d', tz: Australia/Lord_Howe}}", "day"),
]


def truncate(dt: datetime, precision: str, fmt: str) -> datetime:
    utc = dt.astimezone(UTC)
    if precision == "ms":
        return utc.replace(microsecond=utc.microsecond // 1000 * 1000)
    if precision == "s":
        return utc.replace(microsecond=0)
    if precision == "day":
        from zoneinfo import ZoneInfo

        zone = ZoneInfo("Australia/Lord_Howe")
        local = dt.astimezone(zone)
        return datetime(local.year, local.month, local.day, tzinfo=zone).astimezone(UTC)
    return utc


@props
@given(aware, st.sampled_from(DT_FORMATS))
def test_datetime_round_trips_at_the_formats_precision(dt: datetime, fmt: tuple[str, str]) -> None:
    transform, precision = fmt
    m = custom(transform)
    sent = push(m, dt.isoformat())
    back = pull(m, sent)
    assert instant(back) == truncate(dt, precision, transform)
    assert datetime.fromisoformat(back).utcoffset() is not None  # canonical side always has an offset
    if transform == "{datetime: {format: iso}}":
        assert back == dt.isoformat()  # no zone given: the value's own offset is kept exactly
    # CRMs answer in a different form than they accept: epoch numbers (ms; s for epoch_s) are read too
    unit = timedelta(seconds=1) if "epoch_s" in transform else timedelta(milliseconds=1)
    epoch = str((dt - datetime(1970, 1, 1, tzinfo=UTC)) // unit)
    assert instant(pull(m, epoch)) == truncate(dt, "s" if "epoch_s" in transform else "ms", "")


def test_datetime_examples() -> None:
    hs = custom("{datetime: {format: iso, tz: UTC, precision: ms}}")
    assert push(hs, "2026-01-31T09:00:00.123456+01:00") == "2026-01-31T08:00:00.123+00:00"
    assert pull(hs, "2026-01-31T08:00:00Z") == "2026-01-31T08:00:00+00:00"
    assert pull(hs, "1769846400000") == "2026-01-31T08:00:00+00:00"
    odoo = custom("{datetime: {format: '%Y-%m-%d %H:%M:%S', tz: UTC}}")
    assert push(odoo, "2026-01-31T09:00:00+01:00") == "2026-01-31 08:00:00"
    berlin = custom("{datetime: {format: iso, tz: Europe/Berlin, naive: true}}")
    assert push(berlin, "2026-07-01T10:00:00+00:00") == "2026-07-01T12:00:00"
    assert pull(berlin, "2026-07-01T12:00:00") == "2026-07-01T12:00:00+02:00"
    assert push(custom("{datetime: {format: epoch_ms}}"), "1969-12-31T23:59:59.9995+00:00") == -1


@props
@given(
    st.dates(min_value=date(1900, 1, 1), max_value=date(2200, 12, 31)),
    st.sampled_from(["iso", "'%d/%m/%Y'", "'%Y%m%d'"]),
)
def test_date_round_trips(d: date, fmt: str) -> None:
    m = custom(f"{{date: {{format: {fmt}}}}}")
    sent = push(m, d.isoformat())
    assert pull(m, sent) == d.isoformat()
    # HubSpot-style answers: midnight UTC as an ISO datetime, or epoch ms
    midnight = datetime(d.year, d.month, d.day, tzinfo=UTC)
    assert pull(m, midnight.isoformat().replace("+00:00", "Z")) == d.isoformat()
    assert (
        pull(m, str(int((midnight - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)))) == d.isoformat()
    )


def test_date_examples() -> None:
    m = custom("{date: {format: '%d/%m/%Y'}}")
    assert push(m, "2026-03-31") == "31/03/2026"
    assert pull(m, "31/03/2026") == "2026-03-31"
    assert push(m, "2026-03-31T23:30:00-05:00") == "31/03/2026"  # a datetime's own local date
    assert pull(custom("date"), "2026-03-31T00:00:00.000Z") == "2026-03-31"


words = st.text(
    alphabet=st.characters(categories=["L", "N", "P", "Zs"], exclude_characters=";"), min_size=1, max_size=12
)


@props
@given(st.dictionaries(words, words, min_size=1, max_size=8).filter(lambda d: len(set(d.values())) == len(d)))
def test_value_map_inverts(table: dict[str, str]) -> None:
    transform = yaml.safe_dump({"value_map": table}, default_flow_style=True, width=1 << 20).strip()
    m = custom(transform)
    for key, value in table.items():
        assert push(m, key) == value
        assert pull(m, value) == key
    unknown = "\x00unknown"
    assert push(m, unknown) == "<omitted>"
    assert pull(m, unknown) == unknown  # passes through without a default


def test_value_map_long_form_and_numbers() -> None:
    m = custom("{value_map: {map: {a: A, b: B}, default: other, push_default: Z}}")
    assert push(m, "a") == "A" and push(m, "c") == "Z"
    assert pull(m, "B") == "b" and pull(m, "Q") == "other" and pull(m, "Z") == "other"
    hs_bool = custom("{value_map: {yes_: 'true', no_: 'false'}}")
    assert pull(hs_bool, True) == "yes_"  # HubSpot-style text matches typed values
    nums = custom("{value_map: {low: 1, high: 2}}")
    assert pull(nums, "2") == "high"


@props
@given(st.lists(words, min_size=1, max_size=6))
def test_join_and_split_invert(items: list[str]) -> None:
    join = custom("{join: ';'}")
    assert push(join, items) == ";".join(items)
    assert pull(join, ";".join(items)) == items
    split = custom("{split: ';'}")
    assert push(split, ";".join(items)) == items
    assert pull(split, items) == ";".join(items)


@props
@given(
    st.integers(min_value=-(10**12), max_value=10**12)
    | st.decimals(min_value=-(10**8), max_value=10**8, places=2, allow_nan=False, allow_infinity=False).map(float),
    st.sampled_from([1000, 60, 100, 2.5, 0.001, -3]),
)
def test_scale_inverts(value: int | float, factor: float) -> None:
    m = custom(f"{{scale: {factor}}}")
    sent = push(m, value)
    back = pull(m, sent)
    assert back == value
    if isinstance(value, int):
        assert isinstance(back, int)
    assert pull(m, str(sent)) == value  # HubSpot answers with strings


@props
@given(st.integers(min_value=0, max_value=10**7))
def test_mmss_inverts(seconds: int) -> None:
    m = custom("mmss")
    sent = push(m, seconds)
    minutes, secs = sent.split(":")
    assert len(secs) == 2 and len(minutes) >= 2
    assert pull(m, sent) == seconds


def test_mmss_and_coercions() -> None:
    m = custom("mmss")
    assert push(m, 630) == "10:30"
    assert pull(m, "1:02:03") == 3723
    assert pull(m, 42) == 42
    assert pull(custom("number"), "1500") == 1500 and pull(custom("number"), "1500.5") == 1500.5
    assert push(custom("[number, string]"), 1500.0) == "1500"
    assert push(custom("string"), True) == "true"
    assert pull(custom("bool"), "false") is False and push(custom("bool"), "yes") is True
    with pytest.raises(TransformError, match="not a number"):
        push(custom("number"), "twelve")


# -- map check -------------------------------------------------------------------------------------


def test_check_reports_each_kind_of_problem() -> None:
    m = Mapping.load("hubspot")
    contacts = [
        FieldInfo("email", type="email", unique=True),
        FieldInfo("firstname"),
        FieldInfo("lastname"),
        FieldInfo("phone", type="phone"),
        FieldInfo("jobtitle", read_only=True),
        FieldInfo("hubspot_owner_id", type="enumeration"),
        FieldInfo("hs_persona", required=True),
        FieldInfo("hs_object_id", required=True, read_only=True),
    ]
    problems = {(p.canonical, p.field, p.kind) for p in check_rules(m, "contacts", contacts)}
    assert problems == {("title", "jobtitle", "read_only"), (None, "hs_persona", "required_unmapped")}

    calls = [
        FieldInfo("hs_timestamp", type="datetime", required=True),
        FieldInfo("hs_call_title"),
        FieldInfo("hs_call_body", type="text"),
        FieldInfo("hs_call_direction", type="enumeration", options=["INBOUND", "OUTBOUND"]),
        FieldInfo("hs_call_duration", type="number"),
        FieldInfo("hs_call_disposition", type="enumeration", options=list(HS_GUIDS.values())[:4]),
        FieldInfo("hs_call_status", type="enumeration", options=["BUSY", "QUEUED"]),
        FieldInfo("hs_call_recording_url"),
        FieldInfo("hubspot_owner_id", type="enumeration"),
    ]
    found = {p.kind: p for p in check_rules(m, "calls", calls)}
    assert found["unknown_field"].field == "crmsync_outcome_id"
    not_options = {p.field: p for p in check_rules(m, "calls", calls) if p.kind == "not_an_option"}
    assert set(not_options) == {"hs_call_disposition", "hs_call_status"}
    assert HS_GUIDS["wrong_number"] in not_options["hs_call_disposition"].message
    assert "COMPLETED" in not_options["hs_call_status"].message
    assert not_options["hs_call_status"].line > 0

    deals = [
        FieldInfo("dealname"),
        FieldInfo("dealstage", type="enumeration"),
        FieldInfo("amount", type="bool"),
        FieldInfo("deal_currency_code", type="enumeration"),
        FieldInfo("closedate", type="datetime"),
        FieldInfo("crmsync_deal_key", unique=True),
        FieldInfo("hubspot_owner_id", type="enumeration"),
    ]
    mismatch = [p for p in check_rules(m, "deals", deals) if p.kind == "type_mismatch"]
    assert [(p.canonical, p.field) for p in mismatch] == [("amount", "amount")]
    assert "number" in mismatch[0].message and "bool" in mismatch[0].message

    assert check_rules(m, "deals", [*deals[:2], FieldInfo("amount", type="number"), *deals[3:]]) == []


def test_check_suggests_close_names() -> None:
    m = Mapping.from_text("zoho", "version: 1\ncontact:\n  email: Emial\n")
    (problem,) = check_rules(m, "contacts", [FieldInfo("Email", type="email")])
    assert problem.kind == "unknown_field" and "did you mean Email" in problem.message and problem.line == 3


# -- map set / map unset ---------------------------------------------------------------------------


def test_set_rule_keeps_comments_and_other_rules() -> None:
    m = Mapping.load("hubspot")
    text = set_rule(m, "contacts", "phone", "mobilephone", transform="e164")
    assert "# crmsync field mapping for HubSpot" in text
    assert "# pipeline stage ids" in text
    new = Mapping.from_text("hubspot", text)
    (phone,) = [r for r in new.rules("contacts") if r.canonical == "phone"]
    assert (phone.field, phone.spec, phone.direction) == ("mobilephone", "e164", "both")
    assert len(new.rules("calls")) == len(m.rules("calls"))
    assert text.count("\n") == m.text.count("\n")


def test_set_rule_variants() -> None:
    m = Mapping.load("hubspot")
    # no transform given: the existing one stays
    kept = Mapping.from_text("hubspot", set_rule(m, "contact", "email", "work_email"))
    assert kept.rules("contacts")[0].spec == ["strip", "lower"] and kept.field_for("contacts", "email") == "work_email"
    # a multi-line rule is replaced whole
    text = set_rule(m, "calls", "disposition", "hs_call_disposition", transform="{value_map: {connected: X}}")
    assert "9d9162e7" not in text
    assert (
        Mapping.from_text("hubspot", text).to_provider("calls", {"disposition": "connected"})["hs_call_disposition"]
        == "X"
    )
    # a new rule goes at the end of its section, with a list of transforms and a direction
    text = set_rule(
        m, "contacts", "custom.lead_source", "hs_lead_source", transform=["strip", "upper"], direction="push"
    )
    new = Mapping.from_text("hubspot", text)
    rule = new.rules("contacts")[-1]
    assert (rule.canonical, rule.field, rule.direction) == ("custom.lead_source", "hs_lead_source", "push")
    assert "hs_lead_source" not in new.provider_fields("contacts")
    # [] drops the transform
    plain = Mapping.from_text("hubspot", set_rule(m, "contacts", "phone", "phone", transform=[]))
    assert plain.to_provider("contacts", {"phone": "(415) 555-0132"}) == {"phone": "(415) 555-0132"}


def test_set_rule_rejects_what_would_break_the_file() -> None:
    m = Mapping.load("hubspot")
    with pytest.raises(MappingError, match="unknown transform 'e165'"):
        set_rule(m, "contacts", "phone", "phone", transform="e164x".replace("4x", "5"))
    with pytest.raises(MappingError, match="unknown canonical field"):
        set_rule(m, "contacts", "fone", "phone")
    with pytest.raises(MappingError, match="cannot be undone on pull"):
        set_rule(m, "contacts", "title", "jobtitle", transform="{constant: X}")


def test_unset_rule_and_new_sections() -> None:
    m = Mapping.load("zoho")
    text = unset_rule(m, "contacts", "phone")
    new = Mapping.from_text("zoho", text)
    assert new.field_for("contacts", "phone") is None
    assert [r.canonical for r in new.rules("contacts")] == ["email", "first_name", "last_name", "title", "owner_email"]
    assert "Zoho requires Last_Name" in text
    with pytest.raises(MappingError, match=r"no rule for contact\.phone"):
        unset_rule(new, "contacts", "phone")
    # remove a whole section's rules, then add to a section that does not exist
    for rule in new.rules("tasks"):
        new = Mapping.from_text("zoho", unset_rule(new, "tasks", rule.canonical))
    assert new.rules("tasks") == []
    small = Mapping.from_text("zoho", "version: 1\ncontact:\n  email: Email\n")
    added = Mapping.from_text("zoho", set_rule(small, "companies", "name", "Account_Name"))
    assert added.field_for("companies", "name") == "Account_Name"


def test_set_rule_on_flow_style_files() -> None:
    m = Mapping.from_text("hubspot", "version: 1\ncontact: {email: email, phone: phone}\ncompany: {}\n")
    text = set_rule(m, "contacts", "phone", "mobilephone", transform="e164")
    assert Mapping.from_text("hubspot", text).field_for("contacts", "phone") == "mobilephone"
    text = set_rule(m, "companies", "name", "name")
    assert Mapping.from_text("hubspot", text).field_for("companies", "name") == "name"
    text = unset_rule(m, "contacts", "email")
    assert Mapping.from_text("hubspot", text).field_for("contacts", "email") is None


def test_canonical_fields_match_the_model() -> None:
    from crmsync.model import CallOutcome, canonical

    outcome = CallOutcome.model_validate(
        {
            "occurred_at": "2026-01-31T09:00:00+01:00",
            "contact": {"email": "a@b.co", "phone": "+14155550132", "first_name": "A", "last_name": "B", "title": "T"},
            "company": {"name": "Acme", "domain": "acme.com"},
            "deal": {"name": "D", "stage": "s", "amount": 1, "currency": "EUR", "close_date": "2026-02-01"},
            "disposition": "connected",
            "duration_seconds": 5,
            "notes": "n",
            "recording_url": "https://x.example/r",
            "owner_email": "o@b.co",
            "next_step": {"due_at": "2026-02-01T09:00:00+01:00", "notes": "x"},
            "custom": {"score": 3},
        }
    )
    for obj, record in canonical(outcome).items():
        unknown = {k for k in record if not k.startswith("custom.")} - set(CANONICAL_FIELDS[obj])
        assert not unknown, (obj, unknown)


def test_phonenumbers_is_imported_by_warm_or_the_first_phone_not_by_loading() -> None:
    """Loading a mapping leaves phonenumbers for later: a pull imports it while its first requests fly."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from crmsync.mapping import Mapping\n"
        "m = Mapping.load('zoho')\n"
        "assert 'phonenumbers' not in sys.modules\n"
        "assert m.to_canonical('contacts', {'Phone': '(415) 555-0132'})['phone'] == '+14155550132'\n"
        "assert 'phonenumbers' not in sys.modules\n"  # a North American number needs none
        "assert m.to_canonical('contacts', {'Phone': '+49 30 1234567'})['phone'] == '+49301234567'\n"
        "assert 'phonenumbers' in sys.modules\n"
        "m2 = Mapping.from_text('zoho', 'version: 1\\ncontact:\\n  phone: {field: Phone, transform: e164}\\n')\n"
        "m2.warm()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    fresh = "import sys\nfrom crmsync.mapping import Mapping\nMapping.load('hubspot').warm()\n"
    fresh += "assert 'phonenumbers' in sys.modules\n"
    subprocess.run([sys.executable, "-c", fresh], check=True, timeout=60)
