"""The root command: its global options (accepted before and after the subcommand), logging, and ``main``."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from crmsync.cli import connect, demo, mapcmd, sandbox, status, sync, webhook, worker
from crmsync.cli.exits import EXIT_CODES, done
from crmsync.cli.exits import run as run_and_exit
from crmsync.cli.state import STATE, Globals
from crmsync.version import __version__

# Options of the root group that may also follow the subcommand, as users of gh and kubectl type them.
GLOBAL_OPTIONS = ("--json", "--quiet", "-q", "--verbose", "-v", "--config", "--db", "--log-format")


def _option_arity(command: Any) -> dict[str, int]:
    """How many values each of a command's option names takes (0 for flags)."""
    arity: dict[str, int] = {}
    for param in command.params:
        if param.param_type_name != "option":
            continue
        takes = 0 if getattr(param, "is_flag", False) or getattr(param, "count", False) else max(param.nargs, 1)
        for name in (*param.opts, *(param.secondary_opts or ())):
            arity[name] = takes
    return arity


def hoist_global_options(root: Any, args: Sequence[str]) -> list[str]:
    """Move global options found after a subcommand in front of it, so Click's root group parses them.

    Values of the subcommand's own options (``--notes -q``) stay where they are, everything after
    ``--`` is left alone, and an option the subcommand defines itself under the same name wins.
    """
    args = list(args)
    globals_arity = {k: v for k, v in _option_arity(root).items() if k in GLOBAL_OPTIONS}
    command, arity = root, _option_arity(root)
    hoisted: list[str] = []
    insert_at: int | None = None
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        if token.startswith("-") and token != "-":
            name, has_value = token.split("=", 1)[0], "=" in token
            if name in arity:
                i += 1 if has_value else 1 + arity[name]
                continue
            if command is not root and name in globals_arity:
                width = 1 if has_value else 1 + globals_arity[name]
                hoisted.extend(args[i : i + width])
                del args[i : i + width]
                continue
            i += 1
            continue
        subcommands = getattr(command, "commands", None)
        if subcommands is not None:
            child = subcommands.get(token)
            if child is None:
                break  # Click reports the unknown command
            if insert_at is None:
                insert_at = i
            command, arity = child, _option_arity(child)
        i += 1
    if not hoisted or insert_at is None:
        return args
    return [*args[:insert_at], *hoisted, *args[insert_at:]]


class GlobalOptionsGroup(TyperGroup):
    """The root group: global options are accepted before and after the subcommand."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if ctx.parent is None:
            args = hoist_global_options(self, args)
        return super().parse_args(ctx, args)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


app = typer.Typer(
    name="crmsync",
    cls=GlobalOptionsGroup,
    help=(
        "Keep a sales team's call data and its CRM (HubSpot, Zoho CRM, Odoo, Pipedrive) in step, both ways."
        f"\n\n{EXIT_CODES}"
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _setup_logging(g: Globals) -> None:
    from crmsync.redact import RedactingFilter

    level = logging.DEBUG if g.verbose else logging.ERROR if g.quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if g.log_format == "json":

        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return json.dumps(
                    {
                        "ts": datetime.now(UTC).isoformat(),
                        "level": record.levelname.lower(),
                        "logger": record.name,
                        "message": record.getMessage(),
                    }
                )

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("crmsync: %(levelname)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger("crmsync")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@app.callback()
def _globals(
    json_out: Annotated[bool, typer.Option("--json", help="Machine output on stdout (logs stay on stderr).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors (for cron).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs on stderr.")] = False,
    config: Annotated[
        str | None, typer.Option("--config", help="Config file (env CRMSYNC_CONFIG).", show_default=False)
    ] = None,
    db: Annotated[
        str | None, typer.Option("--db", help="Store: a path or SQLAlchemy URL (env CRMSYNC_DB).", show_default=False)
    ] = None,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="text or json (structured logs on stderr).")
    ] = LogFormat.text,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)] = False,
) -> None:
    if version:
        typer.echo(__version__)
        done()
    STATE.json, STATE.quiet, STATE.verbose, STATE.config, STATE.db = json_out, quiet, verbose, config, db
    STATE.log_format = log_format.value
    _setup_logging(STATE)


def _mention_global_options(typer_app: typer.Typer) -> None:
    """Each command's --help says that the global options work after it too."""
    for command in typer_app.registered_commands:
        command.epilog = command.epilog or (
            "Global options work here too: --json, -q/--quiet, -v/--verbose, --db, --config, --log-format."
        )
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _mention_global_options(group.typer_instance)


# connect, pull, backfill and push first: `crmsync --help` lists commands in the order registered.
for _module in (connect, sync, demo, mapcmd, sandbox, status, webhook, worker):
    _module.register(app)
_mention_global_options(app)


def main() -> None:
    """Console-script entry point (errors become exit codes in cli.exits)."""
    from crmsync.http.tuning import tune_gc

    tune_gc()
    run_and_exit(app)
