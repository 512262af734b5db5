"""`crmsync map`: see, write, edit, check and preview a connection's field mapping."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from crmsync.cli.exits import problems_found
from crmsync.cli.options import split_objects
from crmsync.cli.output import add_row, console, emit_json, table
from crmsync.cli.state import STATE
from crmsync.errors import UsageError

if TYPE_CHECKING:
    from crmsync.sync import mapping_ops as ops
    from crmsync.sync.mapping_ops import CheckResult, PreviewItem, PulledPreview
else:

    class _LazyOps:
        """crmsync.sync.mapping_ops on first use: it pulls in the mapping engine and the store,
        which `crmsync --help` should not pay for."""

        def __getattr__(self, name: str) -> Any:
            from crmsync.sync import mapping_ops

            return getattr(mapping_ops, name)

    ops = _LazyOps()

# cli.ConnOpt's twin: typer evaluates these annotations in this module's globals.
ConnOpt = Annotated[
    str | None, typer.Option("--connection", "-c", help="Connection name (optional when only one exists).")
]


def _value(value: Any) -> str:
    """A value as JSON, so "1500" and 1500 (which a CRM may treat differently) look different."""
    return json.dumps(value, ensure_ascii=False, default=str)


def render_check(result: CheckResult) -> None:
    """One line per problem, ``file:line: section.field -> crm_field: message [kind]``, like a compiler."""
    out = sys.stdout
    for note, problems in (("", result.problems), ("note: ", result.notes)):
        for p in problems:
            where = f"{result.source}:{p.line}" if p.line else result.source
            key = f"{ops.section(p.obj)}.{p.canonical}" if p.canonical else ops.section(p.obj)
            target = f" -> {p.field}" if p.field and p.canonical else ""
            out.write(f"{where}: {key}{target}: {note}{p.message} [{p.kind}]\n")
    checked = ", ".join(result.objects) or "no objects"
    if result.problems:
        out.write(
            f"{len(result.problems)} problem{'s' if len(result.problems) != 1 else ''} "
            f"({result.info.connection}, {result.info.provider}; checked {checked})\n"
        )
    else:
        out.write(f"mapping OK ({result.info.connection}, {result.info.provider}; checked {checked})\n")


def _cell(value: Any) -> str:
    return "" if value is None else _value(value)


def _say(message: str) -> None:
    """A plain line on stdout (rich would wrap long paths mid-word); nothing with --quiet/--json."""
    if not STATE.quiet and not STATE.json:
        sys.stdout.write(message + "\n")


def render_preview(item: PreviewItem) -> None:
    """One outcome's payload per object, or why it cannot be sent."""
    out = console()
    if item.error is not None:
        # the error already starts with file:line
        sys.stdout.write(f"invalid: {item.error}\n")
        return
    out.print(f"line {item.line}: outcome {item.id}", markup=False)
    rows = table("object", "field", "value")
    rows.show_header = False
    for obj, payload in item.payloads.items():
        if not payload:
            add_row(rows, f"  {obj}", "(nothing mapped)", "")
        for i, (name, value) in enumerate(payload.items()):
            add_row(rows, f"  {obj}" if i == 0 else "", name, _value(value))
    for obj, error in item.errors.items():
        add_row(rows, f"  {obj}", "error", error)
    out.print(rows)


def render_pulled(p: PulledPreview) -> None:
    """A stored record's canonical fields next to the raw CRM fields they came from."""
    out = console()
    out.print(f"{p.connection} {p.object} {p.id}", markup=False)
    cols = ["canonical field", "stored", "CRM field", "raw CRM value"]
    if p.stale:
        cols.append("mapped now")
    rows = table(*cols)
    for r in p.rows:
        cells = [r.canonical or "-", _cell(r.value), r.field or "-", _cell(r.raw)]
        if p.stale:
            cells.append(_cell(r.current))
        add_row(rows, *cells)
    out.print(rows)
    if p.current_error:
        sys.stdout.write(f"the mapping in force cannot read this record: {p.current_error}\n")
    elif p.stale:
        sys.stdout.write(
            "'mapped now' (the mapping in force) differs from 'stored': the mapping changed since this record "
            "was pulled, or a push updated it\n"
        )


def register(app: typer.Typer) -> None:
    """Add the `map` command group to ``app``."""
    map_app = typer.Typer(
        help="Field mappings: how canonical fields (contact.email, call.disposition …) become a CRM's fields.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )

    @map_app.command("path")
    def path_cmd(connection: ConnOpt = None) -> None:
        """Print where the connection's mapping file lives (it may not exist yet).

        Example: $EDITOR "$(crmsync map path -c prod)"
        """
        where = ops.mapping_info(STATE.app(), connection)
        if STATE.json:
            emit_json(where.as_dict())
            return
        sys.stdout.write(f"{where.path}\n")
        if not where.exists and not STATE.quiet:
            sys.stderr.write(
                f"crmsync: {where.path} does not exist yet: the built-in {where.provider} mapping is in "
                f"force (crmsync map init -c {where.connection} writes it there)\n"
            )

    @map_app.command("init")
    def init_cmd(
        connection: ConnOpt = None,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing mapping file.")] = False,
    ) -> None:
        """Write the provider's default mapping to the connection's mapping file, for editing.

        Example: crmsync map init -c prod && crmsync map edit -c prod
        """
        where = ops.init_mapping(STATE.app(), connection, force=force)
        if STATE.json:
            emit_json(where.as_dict())
        else:
            _say(f"wrote the default {where.provider} mapping to {where.path}")

    @map_app.command("show")
    def show_cmd(
        connection: ConnOpt = None,
        obj: Annotated[str | None, typer.Option("--object", help="Only these objects (contact,deal …).")] = None,
    ) -> None:
        """Show the mapping in force: object, canonical field, CRM field, transform, direction.

        Example: crmsync map show -c prod --object contact
        """
        shown = ops.show_mapping(STATE.app(), connection, objects=split_objects(obj))
        if STATE.json:
            emit_json(shown.as_dict())
            return
        origin = str(shown.info.path) if shown.source == "file" else f"built-in {shown.info.provider} default"
        _say(f"{shown.info.connection} ({shown.info.provider}): {origin}")
        rules = table("object", "canonical field", "CRM field", "transform", "direction")
        for r in shown.rows:
            add_row(rules, r.object, r.canonical, r.field, r.transform or "-", r.direction)
        console().print(rules)

    @map_app.command("set")
    def set_cmd(
        assignment: Annotated[str, typer.Argument(help="OBJECT.FIELD=CRM_FIELD, e.g. contact.phone=mobilephone.")],
        connection: ConnOpt = None,
        transform: Annotated[
            list[str] | None,
            typer.Option(
                "--transform", "-t", help="A transform as YAML (e164, '{scale: 1000}'); repeat to chain. Default: keep."
            ),
        ] = None,
        no_transform: Annotated[bool, typer.Option("--no-transform", help="Drop the rule's transform.")] = False,
        direction: Annotated[str | None, typer.Option("--direction", help="both, push or pull. Default: keep.")] = None,
    ) -> None:
        """Map a canonical field to a CRM field; the file is saved only if the result is valid.

        Example: crmsync map set contact.phone=mobilephone --transform e164 -c prod
        """
        done = ops.set_mapping_rule(
            STATE.app(), connection, assignment, transform=transform, clear_transform=no_transform, direction=direction
        )
        if STATE.json:
            emit_json(done.as_dict())
        elif done.rule:
            r = done.rule
            extra = f" ({r.transform}, {r.direction})" if r.transform else f" ({r.direction})"
            _say(f"{ops.section(r.object)}.{r.canonical} -> {r.field}{extra}; saved {done.info.path}")

    @map_app.command("unset")
    def unset_cmd(
        key: Annotated[str, typer.Argument(help="OBJECT.FIELD, e.g. contact.phone.")],
        connection: ConnOpt = None,
    ) -> None:
        """Remove the rule of a canonical field (it is then neither pushed nor pulled).

        Example: crmsync map unset contact.phone -c prod
        """
        done = ops.unset_mapping_rule(STATE.app(), connection, key)
        if STATE.json:
            emit_json(done.as_dict())
        else:
            _say(f"removed {ops.section(done.object)}.{done.canonical}; saved {done.info.path}")

    @map_app.command("edit")
    def edit_cmd(connection: ConnOpt = None) -> None:
        """Edit the mapping in $VISUAL / $EDITOR (default vi); an invalid edit is not saved (exit 2).

        Example: EDITOR=nano crmsync map edit -c prod
        """
        done = ops.edit_mapping(STATE.app(), connection)
        if STATE.json:
            emit_json(done.as_dict())
        else:
            _say(f"saved {done.info.path}" if done.changed else f"no changes; {done.info.path} left as it was")

    @map_app.command("check")
    def check_cmd(connection: ConnOpt = None) -> None:
        """Check the mapping against the CRM's live fields; print every problem, exit 1 if any.

        Finds unknown fields, read-only targets, type mismatches, picklist values the CRM does not
        accept and required CRM fields no rule writes.

        Example: crmsync --json map check -c prod | jq '.problems[].message'
        """
        result = ops.check_mapping(STATE.app(), connection)
        if STATE.json:
            emit_json(result.as_dict())
        elif not (STATE.quiet and result.ok):
            render_check(result)
        if not result.ok:
            problems_found()

    @map_app.command("preview")
    def preview_cmd(
        source: Annotated[
            str | None, typer.Argument(help="Outcomes file (JSONL, CSV, JSON array) or - for stdin.")
        ] = None,
        connection: ConnOpt = None,
        pulled: Annotated[
            str | None, typer.Option("--pulled", help="A stored record, OBJECT:ID (e.g. contact:12345).")
        ] = None,
        limit: Annotated[int, typer.Option("--limit", help="Preview at most this many records.")] = 5,
        fmt: Annotated[str, typer.Option("--format", help="auto (by extension), jsonl, csv or json.")] = "auto",
    ) -> None:
        """Show the exact CRM properties a push would send per outcome, or a pulled record both ways.

        Exits 1 when a record is invalid or a rule cannot convert one of its values.

        Example: crmsync map preview outcomes.jsonl -c prod --limit 3
        """
        a = STATE.app()
        if (source is None) == (pulled is None):
            raise UsageError("map preview needs an outcomes file or --pulled OBJECT:ID (one of them)")
        if pulled is not None:
            view = ops.preview_pulled(a, connection, pulled)
            if STATE.json:
                emit_json(view.as_dict())
            else:
                render_pulled(view)
            return
        assert source is not None
        invalid = 0
        for item in ops.preview_outcomes(a, connection, source, fmt=fmt, limit=limit):
            invalid += item.error is not None or bool(item.errors)
            if STATE.json:
                emit_json(item.as_dict())
            else:
                render_preview(item)
        if invalid:
            problems_found()

    app.add_typer(map_app, name="map")
