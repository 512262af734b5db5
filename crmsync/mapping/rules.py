"""Rules and the ``Mapping``: a mapping file parsed, validated and ready to convert records.

``Mapping.from_text`` builds one ``FieldRule`` per key of the file and reports every problem of the
file at once (``file:line: section.key: reason``); ``to_provider`` and ``to_canonical`` apply the
rules to one record. The file format is described in docs/mapping.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from crmsync.errors import MappingError
from crmsync.mapping.defaults import default_text
from crmsync.mapping.fields import CANONICAL_FIELDS, OBJECT_OF, object_type, suggest
from crmsync.mapping.phone import phonenumbers_module, region_known
from crmsync.mapping.step import Transform, TransformContext, TransformError
from crmsync.mapping.transforms import E164, TRANSFORMS, Constant, Default, Template, ValueMap
from crmsync.mapping.values import MISSING, NOARG, BadValue
from crmsync.providers.base import OBJECTS, SECTION
from crmsync.yamlio import KeyPath, YamlDoc, parse_yaml

#: The mapping-file format this crmsync reads (``version: 1``).
VERSION = 1
#: A rule's ``direction``: both ways (the default), local -> CRM only, CRM -> local only.
DIRECTIONS = ("both", "push", "pull")


def flow(value: Any) -> str:
    """A value as one line of YAML flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False, allow_unicode=True)
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")].strip()
    elif text.endswith("..."):
        text = text[: -len("...")].strip()
    return text


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


class RuleRow(NamedTuple):
    """One row of ``map show``."""

    object: str
    canonical: str
    field: str
    transform: str
    direction: str


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
        if any(isinstance(t, E164) for rules in self._rules.values() for r in rules for t in r.transforms):
            phonenumbers_module()

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
        if not isinstance(default_region, str) or not region_known(default_region.upper()):
            raise MappingError(f"unknown default region {default_region!r} (two-letter country code such as US)")
        doc = parse_yaml(text, source, MappingError)
        return cls(provider, doc, text, path, default_region.upper())

    @classmethod
    def default_text(cls, provider: str) -> str:
        """The built-in mapping file of ``provider`` (what ``map init`` writes)."""
        return default_text(provider)

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
                hint = suggest(str(key), OBJECT_OF)
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

    def _rule(
        self, doc: YamlDoc, obj: str, section: str, canonical: str, spec: Any, err: Callable[[KeyPath, str], None]
    ) -> FieldRule | None:
        kp: KeyPath = (section, canonical)
        fields = CANONICAL_FIELDS[obj]
        ok = True
        is_const = canonical.startswith("const.")
        if canonical.startswith(("custom.", "const.")):
            if not canonical.split(".", 1)[1]:
                err(kp, f"{canonical} needs a name after the dot")
                ok = False
        elif canonical not in fields:
            err(kp, f"unknown canonical field{suggest(canonical, fields)}; {section} has {', '.join(fields)}")
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
        ctx = TransformContext(obj=obj, canonical=canonical, default_region=self.default_region)
        for i, item in enumerate(items):
            tkp: KeyPath = (*kp, "transform", i) if isinstance(raw, list) else (*kp, "transform")
            if isinstance(item, str):
                name, arg = item, NOARG
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
                err(tkp, f"unknown transform {name!r}{suggest(name, TRANSFORMS)}")
                ok = False
                continue
            if cls.takes == "no" and arg is not NOARG and arg is not None:
                err(tkp, f"{name} takes no argument")
                ok = False
                continue
            if cls.takes == "required" and (arg is NOARG or arg is None):
                err(tkp, f"{name} needs an argument, e.g. {{{name}: ...}}")
                ok = False
                continue
            try:
                t = cls(NOARG if arg is None else arg, ctx)
            except BadValue as exc:
                err(tkp, str(exc))
                ok = False
                continue
            if direction in ("both", "pull") and not t.invertible:
                err(tkp, f"{name} cannot be undone on pull: add `direction: push` or drop it")
                ok = False
            if direction in ("both", "pull") and isinstance(t, ValueMap) and t.duplicates:
                err(tkp, f"value_map is not reversible for pull ({'; '.join(t.duplicates)}); add `direction: push`")
                ok = False
            transforms.append(t)
        if ok and is_const and not any(isinstance(t, (Constant, Default, Template)) for t in transforms):
            err(kp, "a const.* rule needs a constant, default or template transform")
            ok = False
        if not ok:
            return None
        assert isinstance(target, str)
        return FieldRule(canonical, target.strip(), tuple(transforms), str(direction), doc.line(kp), raw)

    # -- queries ---------------------------------------------------------------------------------
    def rules(self, obj: str) -> list[FieldRule]:
        """The rules of one object type (``contacts`` …; the singular section name works too)."""
        return list(self._rules[object_type(obj)])

    def provider_fields(self, obj: str) -> list[str]:
        """CRM fields to request when pulling ``obj`` (fields of pull rules, in file order)."""
        return list(dict.fromkeys(r.field for r in self._rules[object_type(obj)] if r.pulls))

    def field_for(self, obj: str, canonical: str) -> str | None:
        """The CRM field a canonical field maps to (push rules first), or None."""
        rules = self._rules[object_type(obj)]
        for rule in sorted(rules, key=lambda r: not r.pushes):
            if rule.canonical == canonical:
                return rule.field
        return None

    # -- conversion ------------------------------------------------------------------------------
    def to_provider(self, obj: str, canonical: dict[str, Any]) -> dict[str, Any]:
        """Canonical record -> CRM fields (push rules); missing values are left out."""
        name = object_type(obj)
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
                except (BadValue, ValueError, OverflowError) as exc:
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
        name = object_type(obj)
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
                except (BadValue, ValueError, OverflowError) as exc:
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


def dump_rules(mapping: Mapping, objects: list[str] | None = None) -> list[RuleRow]:
    """Rows for ``map show``: object, canonical field, CRM field, transform text, direction."""
    rows: list[RuleRow] = []
    for obj in objects or list(OBJECTS):
        name = object_type(obj)
        for rule in mapping.rules(name):
            shown = "" if rule.spec is None else flow(rule.spec)
            rows.append(RuleRow(name, rule.canonical, rule.field, shown, rule.direction))
    return rows
