"""What ``crmsync map`` does: locate, write, edit, check and preview a connection's mapping file.

Every write goes to a temporary file in the target's folder and is renamed over it, and only
after the new text parsed and validated, so a crash or a bad edit never leaves a broken or
half-written mapping behind. Nothing here names a CRM field: the rules come from the mapping and
the field lists from ``Provider.fields``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crmsync.errors import AuthError, ConfigError, CrmsyncError, MappingError, RetriableError, UsageError
from crmsync.mapping import (
    DIRECTIONS,
    Mapping,
    Problem,
    RuleRow,
    TransformError,
    check_rules,
    default_text,
    dump_rules,
    set_rule,
    unset_rule,
)
from crmsync.model import canonical as canonical_records
from crmsync.providers.base import OBJECTS, SECTION
from crmsync.sync.inputs import read_outcomes
from crmsync.sync.push import ENTITY_STEPS

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.providers.base import FieldInfo
    from crmsync.store import CrmConnection

_OBJECT_OF = {section: obj for obj, section in SECTION.items()}


def normalise_object(name: str) -> str:
    """``contact`` or ``contacts`` -> ``contacts``; anything else is a usage error naming the valid ones."""
    key = name.strip().lower()
    if key in OBJECTS:
        return key
    if key in _OBJECT_OF:
        return _OBJECT_OF[key]
    raise UsageError(f"unknown object {name!r}; use one of {', '.join(SECTION.values())}")


def section(obj: str) -> str:
    """The mapping-file section of an object type (``contacts`` -> ``contact``)."""
    return SECTION.get(obj, obj)


# -- where the file is ------------------------------------------------------------------------------
@dataclass
class MappingInfo:
    """A connection's mapping file: where it is and whether it exists yet."""

    connection: str
    provider: str
    path: Path
    exists: bool

    def as_dict(self) -> dict[str, Any]:
        return {"connection": self.connection, "provider": self.provider, "path": str(self.path), "exists": self.exists}


def mapping_info(app: App, connection: str | None) -> MappingInfo:
    """Where the connection's mapping file lives (``map path``)."""
    return _located(app, connection)[1]


def _located(app: App, connection: str | None) -> tuple[CrmConnection, MappingInfo]:
    conn = app.connection(connection)
    path = app.mapping_path(conn)
    return conn, MappingInfo(conn.name, conn.provider, path, path.is_file())


def _region(app: App, conn: CrmConnection) -> str:
    # Same precedence as App.mapping: the connection's region, then the global one.
    return app.config.connection(conn.name).default_region or app.config.default_region


def _current(app: App, conn: CrmConnection) -> Mapping:
    """The connection's mapping; without a file, the built-in default as if it were that file."""
    path = app.mapping_path(conn)
    if path.is_file():
        return Mapping.load(conn.provider, path, default_region=_region(app, conn))
    return Mapping.from_text(
        conn.provider,
        default_text(conn.provider),
        source=str(path),
        path=path,
        default_region=_region(app, conn),
    )


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    # A symlinked mapping (dotfiles) keeps its link: the rename happens next to the real file.
    target = Path(os.path.realpath(path))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
        raise


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise MappingError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise MappingError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# -- init / show / set / unset ----------------------------------------------------------------------
def init_mapping(app: App, connection: str | None, *, force: bool = False) -> MappingInfo:
    """Write the provider's default mapping to the connection's mapping path (``map init``)."""
    info = mapping_info(app, connection)
    if info.exists and not force:
        raise UsageError(
            f"{info.path} already exists; not overwritten", hint="pass --force to replace it with the default"
        )
    text = default_text(info.provider)
    write_atomic(info.path, text)
    info.exists = True
    return info


@dataclass
class ShowResult:
    """The rules in force for a connection (``map show``)."""

    info: MappingInfo
    source: str  # "file" or "default"
    hash: str
    rows: list[RuleRow]

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.info.as_dict(),
            "source": self.source,
            "hash": self.hash,
            "rules": [r._asdict() for r in self.rows],
        }


def show_mapping(app: App, connection: str | None, *, objects: list[str] | None = None) -> ShowResult:
    """The rules of the mapping in force, optionally for some object types only."""
    conn, info = _located(app, connection)
    mapping = app.mapping(conn)
    wanted = [normalise_object(o) for o in objects] if objects else None
    return ShowResult(info, "file" if info.exists else "default", mapping.hash, dump_rules(mapping, wanted))


@dataclass
class ChangeResult:
    """What ``map set`` / ``map unset`` did."""

    info: MappingInfo
    object: str
    canonical: str
    action: str  # set | unset
    rule: RuleRow | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.info.as_dict(),
            "action": self.action,
            "object": self.object,
            "canonical": self.canonical,
            "rule": self.rule._asdict() if self.rule else None,
        }


def parse_key(key: str) -> tuple[str, str]:
    """``contact.phone`` / ``call.custom.region`` -> (``contacts``, ``phone`` / ``custom.region``)."""
    obj, dot, canonical = key.strip().partition(".")
    if not dot or not canonical:
        raise UsageError(f"{key!r}: expected OBJECT.FIELD, e.g. contact.phone or call.custom.region")
    return normalise_object(obj), canonical


def set_mapping_rule(
    app: App,
    connection: str | None,
    assignment: str,
    *,
    transform: list[str] | None = None,
    clear_transform: bool = False,
    direction: str | None = None,
) -> ChangeResult:
    """Map ``object.canonical=crm_field`` (``map set``); the file is written only if it validates."""
    key, eq, target = assignment.partition("=")
    if not eq or not target.strip():
        raise UsageError(f"{assignment!r}: expected OBJECT.FIELD=CRM_FIELD, e.g. contact.phone=mobilephone")
    if transform and clear_transform:
        raise UsageError("--transform and --no-transform contradict each other")
    if direction is not None and direction not in DIRECTIONS:
        raise UsageError(f"--direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    obj, canonical = parse_key(key)
    conn, info = _located(app, connection)
    mapping = _current(app, conn)
    spec: Any = [] if clear_transform else (transform or None)
    text = set_rule(mapping, obj, canonical, target.strip(), transform=spec, direction=direction)
    write_atomic(info.path, text)
    info.exists = True
    new = Mapping.from_text(
        conn.provider, text, source=str(info.path), path=info.path, default_region=_region(app, conn)
    )
    row = next((r for r in dump_rules(new, [obj]) if r.canonical == canonical), None)
    return ChangeResult(info, obj, canonical, "set", row)


def unset_mapping_rule(app: App, connection: str | None, key: str) -> ChangeResult:
    """Remove the rule for ``object.canonical`` (``map unset``)."""
    obj, canonical = parse_key(key)
    conn, info = _located(app, connection)
    text = unset_rule(_current(app, conn), obj, canonical)
    write_atomic(info.path, text)
    info.exists = True
    return ChangeResult(info, obj, canonical, "unset")


# -- edit ---------------------------------------------------------------------------------------------
@dataclass
class EditResult:
    """What ``map edit`` did: saved the new text, or found nothing changed."""

    info: MappingInfo
    changed: bool

    def as_dict(self) -> dict[str, Any]:
        return {**self.info.as_dict(), "changed": self.changed}


def editor_command(env: dict[str, str]) -> list[str]:
    """``$VISUAL``, else ``$EDITOR``, else ``vi``, split like a shell would (``code --wait``)."""
    value = env.get("VISUAL") or env.get("EDITOR") or "vi"
    try:
        parts = shlex.split(value)
    except ValueError as exc:
        raise UsageError(f"cannot parse the editor command {value!r}: {exc}") from None
    return parts or ["vi"]


def edit_mapping(app: App, connection: str | None) -> EditResult:
    """Open the mapping in ``$EDITOR`` on a temporary copy; save it only if it validates (``map edit``).

    An invalid edit leaves the mapping file untouched and the edited copy in place, named in the error,
    so the work is not lost.
    """
    conn, info = _located(app, connection)
    before = _read(info.path) if info.exists else default_text(conn.provider)
    # The .yaml suffix gives editors their syntax highlighting.
    fd, tmp_name = tempfile.mkstemp(prefix=f"crmsync-map-{info.connection}-", suffix=".yaml")
    tmp = Path(tmp_name)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
        out.write(before)
    keep = False
    try:
        command = [*editor_command(app.env), str(tmp)]
        try:
            done = subprocess.run(command, check=False)
        except OSError as exc:
            raise UsageError(
                f"cannot run the editor {command[0]!r}: {exc.strerror}", hint="set $EDITOR or $VISUAL"
            ) from None
        if done.returncode != 0:
            raise UsageError(f"the editor exited with status {done.returncode}; {info.path} was not changed")
        after = tmp.read_text(encoding="utf-8-sig")
        if after == before:
            return EditResult(info, changed=False)
        try:
            Mapping.from_text(conn.provider, after, source=str(tmp), path=info.path, default_region=_region(app, conn))
        except MappingError as exc:
            keep = True
            raise MappingError(
                f"{info.path} was not changed: the edited mapping is invalid (your edit is kept in {tmp}):\n{exc}"
            ) from None
        write_atomic(info.path, after)
        info.exists = True
        return EditResult(info, changed=True)
    finally:
        if not keep:
            with contextlib.suppress(OSError):
                tmp.unlink()


# -- check --------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    """Every problem of a mapping against the CRM's live field lists (``map check``)."""

    info: MappingInfo
    source: str
    objects: list[str]
    problems: list[Problem] = field(default_factory=list)
    #: Findings that are not problems: fields crmsync creates on the first push, required fields the
    #: provider fills itself.
    notes: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.info.as_dict(),
            "mapping": self.source,
            "objects": self.objects,
            "ok": self.ok,
            "problems": [_problem_dict(p) for p in self.problems],
            "notes": [_problem_dict(p) for p in self.notes],
        }


def _problem_dict(p: Problem) -> dict[str, Any]:
    d = asdict(p)
    d["object"] = d.pop("obj")
    d["section"] = section(p.obj)
    return d


def _created_on_push(name: str, managed: set[str]) -> bool:
    # crmsync's own idempotency fields are recognised by name too (every provider's contain
    # "crmsync"): a CRM that has not seen a push yet lacks them.
    return name in managed or "crmsync" in name.lower()


# Errors that mean "cannot list this object's fields"; auth and temporary failures abort the check
# instead, since every other object would fail the same way.
_FIELD_LIST_ERRORS: tuple[type[BaseException], ...] = (CrmsyncError, NotImplementedError, LookupError, ValueError)


def check_mapping(app: App, connection: str | None) -> CheckResult:
    """Compare the mapping with ``Provider.fields`` of every object it maps or the CRM supports."""
    conn, info = _located(app, connection)
    mapping = app.mapping(conn)
    provider = app.provider(conn)
    result = CheckResult(info, str(mapping.path) if mapping.path else mapping.source, [])
    for obj in OBJECTS:
        has_rules = bool(mapping.rules(obj))
        supported = obj in provider.objects
        fields: list[FieldInfo]
        try:
            fields = provider.fields(obj)
        except (AuthError, ConfigError, RetriableError):
            raise
        except _FIELD_LIST_ERRORS as exc:
            if has_rules or supported:
                result.problems.append(
                    Problem(
                        obj, None, None, "unsupported_object", f"cannot list {conn.provider} {obj} fields: {exc}", 0
                    )
                )
            continue
        result.objects.append(obj)
        managed = set(provider.managed_fields(obj))
        for problem in check_rules(mapping, obj, fields):
            if problem.kind == "unknown_field" and problem.field and _created_on_push(problem.field, managed):
                note = f"{problem.field} does not exist yet; crmsync creates it on the first push"
                result.notes.append(replace(problem, kind="created_on_push", message=note))
            elif problem.kind == "required_unmapped" and problem.field in managed:
                note = f"{problem.field} is required; {conn.provider} sets it itself"
                result.notes.append(replace(problem, kind="set_by_provider", message=note))
            else:
                result.problems.append(problem)
    return result


# -- preview ------------------------------------------------------------------------------------------
@dataclass
class PreviewItem:
    """One input record: the provider payload per object, or why it cannot be sent."""

    line: int
    id: str | None = None
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # object -> transform error
    error: str | None = None  # the record itself is invalid

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.line, "id": self.id}
        if self.error is not None:
            out["error"] = self.error
        else:
            out["payloads"] = self.payloads
            if self.errors:
                out["errors"] = self.errors
        return out


def preview_outcomes(
    app: App, connection: str | None, source: str, *, fmt: str = "auto", limit: int | None = 5
) -> Iterator[PreviewItem]:
    """The properties push would send per object for the first ``limit`` records of ``source``.

    Contacts, companies and deals are shown as they are sent when the CRM has no such record yet
    (an update sends only the changed fields); the provider adds associations and its idempotency
    marker on top.
    """
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    mapping = app.mapping(app.connection(connection))
    for n, parsed in enumerate(read_outcomes(source, fmt)):
        if limit is not None and n >= limit:
            return
        if parsed.error is not None or parsed.outcome is None:
            yield PreviewItem(parsed.line, error=str(parsed.error))
            continue
        item = PreviewItem(parsed.line, id=str(parsed.outcome.id) if parsed.outcome.id is not None else None)
        for obj, values in canonical_records(parsed.outcome).items():
            if obj in ENTITY_STEPS:
                # push merges entity values without empties before mapping them
                values = {k: v for k, v in values.items() if v not in (None, "")}
            try:
                item.payloads[obj] = mapping.to_provider(obj, values)
            except TransformError as exc:
                item.errors[obj] = str(exc)
        yield item


@dataclass
class PulledRow:
    """One line of ``map preview --pulled``: a canonical field next to the CRM field it came from."""

    canonical: str | None
    value: Any
    field: str | None
    raw: Any
    current: Any = None  # what the mapping in force reads from the raw value now

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PulledPreview:
    """A stored record's canonical view next to its raw CRM properties."""

    connection: str
    object: str
    id: str
    canonical: dict[str, Any]
    raw: dict[str, Any]
    current: dict[str, Any]
    rows: list[PulledRow]
    current_error: str | None = None

    @property
    def stale(self) -> bool:
        """True when the mapping in force would read the raw record differently than it was stored."""
        return self.current != self.canonical

    def as_dict(self) -> dict[str, Any]:
        return {
            "connection": self.connection,
            "object": self.object,
            "id": self.id,
            "canonical": self.canonical,
            "raw": self.raw,
            "current": self.current,
            "stale": self.stale,
            "current_error": self.current_error,
            "rows": [r.as_dict() for r in self.rows],
        }


def preview_pulled(app: App, connection: str | None, ref: str) -> PulledPreview:
    """``contact:ID`` -> the stored canonical record next to its raw CRM properties."""
    obj_name, colon, remote_id = ref.partition(":")
    if not colon or not remote_id.strip():
        raise UsageError(f"--pulled {ref!r}: expected OBJECT:ID, e.g. contact:12345")
    obj, remote_id = normalise_object(obj_name), remote_id.strip()
    conn = app.connection(connection)
    record = app.store.mirror.record(conn.name, obj, remote_id)
    if record is None:
        raise UsageError(
            f"no stored {obj} record {remote_id!r} for connection {conn.name!r}",
            hint="run `crmsync pull` first, or check the id",
        )
    stored, raw = dict(record.properties or {}), dict(record.raw or {})
    mapping = app.mapping(conn)
    current_error = None
    try:
        current = mapping.to_canonical(obj, raw)
    except TransformError as exc:
        current, current_error = {}, str(exc)
    rows: list[PulledRow] = []
    used_fields: set[str] = set()
    shown: set[str] = set()
    for rule in mapping.rules(obj):
        if not rule.pulls:
            continue
        used_fields.add(rule.field)
        shown.add(rule.canonical)
        rows.append(
            PulledRow(
                rule.canonical, stored.get(rule.canonical), rule.field, raw.get(rule.field), current.get(rule.canonical)
            )
        )
    for name in stored:
        if name not in shown:  # written by an older mapping, or by push
            rows.append(PulledRow(name, stored[name], None, None, current.get(name)))
    for name in raw:
        if name not in used_fields:
            rows.append(PulledRow(None, None, name, raw[name], None))
    return PulledPreview(conn.name, obj, remote_id, stored, raw, current, rows, current_error)
