"""The command line: parse, call one library function, render (a rich table or --json).

Exit codes are decided at one boundary (``main``): every ``CrmsyncError`` becomes one line on
stderr and its exit code; a traceback always means a bug.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from crmsync import __version__
from crmsync.errors import CrmsyncError, ExitCode, UsageError

EXIT_CODES = """Exit codes: 0 success · 1 partial failure (some records failed, the rest done) ·
2 usage or bad input · 3 authentication/configuration, or a store that is read-only, unopenable or corrupt ·
75 temporary failure (CRM unavailable or rate-limited past the deadline, lock held, store busy or full:
try again later) · 130 interrupted."""

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


@dataclass
class Globals:
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    config: str | None = None
    db: str | None = None
    log_format: str = "text"
    _app: Any = None

    def app(self) -> Any:
        """The library's App, built on first use."""
        if self._app is None:
            from crmsync.app import App

            self._app = App(config=self.config, db=self.db)
        return self._app


STATE = Globals()


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
        raise typer.Exit()
    STATE.json, STATE.quiet, STATE.verbose, STATE.config, STATE.db = json_out, quiet, verbose, config, db
    STATE.log_format = log_format.value
    _setup_logging(STATE)


# -- rendering helpers ------------------------------------------------------------------------
def console(stderr: bool = False) -> Any:
    from rich.console import Console

    no_color = bool(os.environ.get("NO_COLOR"))
    # Off a terminal, lay out for 80 columns (or $COLUMNS): logs and mails stay readable.
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS") or 80)
    return Console(stderr=stderr, no_color=no_color, highlight=False, soft_wrap=False, width=width)


def table(*columns: str, right: Sequence[str] = ()) -> Any:
    """A borderless rich table whose cells wrap (long words fold) instead of being cut."""
    from rich.table import Table

    out = Table(box=None, pad_edge=False)
    for name in columns:
        out.add_column(name, justify="right" if name in right else "left", overflow="fold")
    return out


def add_row(to: Any, *cells: Any) -> None:
    """Add a row of plain text: brackets in data (``[strip, lower]``) are shown, never read as markup."""
    from rich.text import Text

    to.add_row(*(Text("" if cell is None else str(cell)) for cell in cells))


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str, sort_keys=False) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    if not STATE.quiet and not STATE.json:
        console().print(message)


def tty() -> bool:
    return sys.stderr.isatty() and not STATE.quiet and not STATE.json


def parse_when(value: str | None, *, name: str) -> datetime | None:
    """ISO 8601 (a date or a datetime; naive means UTC) or a relative age like 15m, 2h, 1d."""
    if not value:
        return None
    from crmsync.timeutil import parse_age

    age = parse_age(value)
    if age is not None:
        return datetime.now(UTC) - age
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{name}: {value!r} is neither an ISO 8601 date/time nor an age like 15m, 2h, 1d") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def split_objects(value: str | None) -> list[str] | None:
    if not value:
        return None
    aliases = {
        "contact": "contacts",
        "company": "companies",
        "deal": "deals",
        "call": "calls",
        "task": "tasks",
        "accounts": "companies",
        "partners": "contacts",
        "leads": "deals",
        "opportunities": "deals",
    }
    out = []
    for part in value.split(","):
        part = part.strip().lower()
        if part:
            out.append(aliases.get(part, part))
    return out


ConnOpt = Annotated[
    str | None, typer.Option("--connection", "-c", help="Connection name (optional when only one exists).")
]
ConnsOpt = Annotated[
    list[str] | None, typer.Option("--connection", "-c", help="Connection name (repeatable; default: all).")
]
LockOpt = Annotated[
    float | None, typer.Option("--lock-timeout", help="Seconds to wait for another run on the connection (default 0).")
]
MetricsOpt = Annotated[
    Path | None, typer.Option("--metrics-file", help="Write Prometheus metrics here (textfile collector).")
]


def finish(code: int) -> None:
    if code:
        raise typer.Exit(code)


def _write_metrics(app_: Any, path: Path | None) -> None:
    """The run's counters plus the store's gauges: the same families `crmsync metrics` prints."""
    target = path or app_.config.metrics_file
    if not target:
        return
    from crmsync.sync.status import store_metrics

    # This also runs after a failed run, whose own error is the one to report: the file is still written.
    try:
        store_metrics(app_, app_.metrics)
    except CrmsyncError:
        pass
    except Exception as exc:
        logging.getLogger("crmsync.metrics").warning("metrics: the store's values are left out: %s", exc)
    app_.metrics.write(Path(target))


def _prune(app_: Any) -> None:
    app_.store.prune(older_than_days=app_.config.log_retention_days)


# -- connect ----------------------------------------------------------------------------------
@app.command()
def connect(
    provider: Annotated[str, typer.Argument(help="hubspot, zoho or odoo.")],
    name: Annotated[str, typer.Option("--name", "-n", help="A name for this connection, e.g. prod.")],
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="API base URL (an emulator, proxy or regional host).")
    ] = None,
    token_stdin: Annotated[
        bool, typer.Option("--token-stdin", help="Read the token/secret from stdin, not a prompt.")
    ] = False,
    oauth: Annotated[bool, typer.Option("--oauth", help="HubSpot: OAuth 2.0 instead of a private-app token.")] = False,
    client_id: Annotated[str | None, typer.Option("--client-id", help="OAuth client id.")] = None,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Print the authorisation URL instead of opening a browser.")
    ] = False,
    dc: Annotated[str | None, typer.Option("--dc", help="Zoho data centre: us, eu, in, au, jp, ca, sa, cn.")] = None,
    grant_code: Annotated[
        str | None, typer.Option("--grant-code", help="Zoho: a Self Client grant code (headless).")
    ] = None,
    database: Annotated[str | None, typer.Option("--db-name", "--database", help="Odoo: database name.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Odoo: login.")] = None,
    transport: Annotated[
        str | None, typer.Option("--transport", help="Odoo: jsonrpc or json2 (default: by version).")
    ] = None,
    scopes: Annotated[
        str | None, typer.Option("--scopes", help="OAuth scopes to request (space/comma separated).")
    ] = None,
    password: Annotated[
        bool, typer.Option("--password", help="Odoo: the secret is a password, not an API key (not advised).")
    ] = False,
    insecure_storage: Annotated[
        bool,
        typer.Option(
            "--insecure-storage",
            help="Keep the secret in a file readable only by you (data directory, mode 0600), not the OS keyring.",
        ),
    ] = False,
) -> None:
    """Create or renew a connection; the secret goes to the OS keyring (or see --insecure-storage).

    With CRMSYNC_SECRET_<NAME> set, the secret is taken from there and stored nowhere.

    Example: crmsync connect hubspot --name prod   (prompts for the private-app token)
    """
    from crmsync.sync.connect import connect as do_connect

    options = {
        "token_stdin": token_stdin,
        "oauth": oauth,
        "client_id": client_id,
        "no_browser": no_browser,
        "dc": dc,
        "grant_code": grant_code,
        "db": database,
        "user": user,
        "transport": transport,
        "scopes": scopes,
        "password": password,
    }
    conn = do_connect(
        STATE.app(),
        provider=provider,
        name=name,
        base_url=base_url,
        options={k: v for k, v in options.items() if v not in (None, False)},
        io=CliIO(token_stdin),
        insecure_storage=insecure_storage,
    )
    if STATE.json:
        emit_json(
            {
                "connection": conn.name,
                "provider": conn.provider,
                "account": conn.account_id,
                "base_url": conn.base_url,
                "scopes": conn.scopes,
            }
        )
    else:
        info(f"connected [bold]{conn.name}[/bold] ({conn.provider}, account {conn.account_id})")


class CliIO:
    """ConnectIO for a terminal (hidden prompts) or a script (--token-stdin)."""

    def __init__(self, from_stdin: bool) -> None:
        self.from_stdin = from_stdin
        self.interactive = sys.stdin.isatty() and not from_stdin

    def secret(self, prompt: str) -> str:
        if self.from_stdin:
            line = sys.stdin.readline()
            if not line.strip():
                raise UsageError(f"--token-stdin: no {prompt.lower()} on stdin")
            return line.strip()
        if not sys.stdin.isatty():
            raise UsageError(f"{prompt} is needed: run in a terminal or pass --token-stdin")
        import getpass

        return getpass.getpass(f"{prompt}: ")

    def ask(self, prompt: str) -> str:
        if not sys.stdin.isatty():
            line = sys.stdin.readline()
            return line.strip()
        return input(f"{prompt}: ")

    def info(self, message: str) -> None:
        sys.stderr.write(message + "\n")

    def open_url(self, url: str) -> bool:
        import webbrowser

        try:
            return bool(webbrowser.open(url))
        except webbrowser.Error:
            return False


# -- pull / backfill --------------------------------------------------------------------------
def progress_display(out: Any) -> Any:
    """A rich Progress showing done/total, a bar and time left when the total is known, else a spinner
    and the count so far (a bar over an unknown total would only pretend)."""
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    def known(task: Any) -> bool:
        # A provider's total is an estimate: once more records than that arrived, it is unknown.
        return task.total is not None and task.completed <= task.total

    class KnownTotalBar(BarColumn):
        def render(self, task: Any) -> Any:
            return super().render(task) if known(task) else Text("")

    class KnownTotalTimeLeft(TimeRemainingColumn):
        def render(self, task: Any) -> Any:
            return super().render(task) if known(task) else Text("")

    class Count(ProgressColumn):
        def render(self, task: Any) -> Any:
            done = int(task.completed)
            return Text(f"{done:,}/{int(task.total):,}" if known(task) else f"{done:,}")

    return Progress(
        SpinnerColumn(finished_text=" "),
        TextColumn("{task.description}"),
        KnownTotalBar(),
        Count(),
        KnownTotalTimeLeft(),
        console=out,
        transient=True,
    )


def _progress() -> Any:
    """A rich progress display on a TTY, else None (cron and pipes get nothing)."""
    if not tty():
        return None, None
    prog = progress_display(console(stderr=True))
    tasks: dict[str, Any] = {}

    def update(conn: str, obj: str, done: int, total: int | None) -> None:
        key = f"{conn}/{obj}"
        if key not in tasks:
            tasks[key] = prog.add_task(key, total=total)
        prog.update(tasks[key], completed=done, total=total)

    return prog, update


def _render_pull(results: list[Any]) -> None:
    numbers = ("read", "created", "updated", "archived", "unchanged")
    out = table("connection", "object", *numbers, "error", right=numbers)
    for r in results:
        for o in r.objects:
            add_row(out, r.connection, o.object, o.read, o.created, o.updated, o.archived, o.unchanged, o.error)
        if r.error:
            add_row(out, r.connection, "-", "", "", "", "", "", r.error)
    console().print(out)
    for r in results:
        console().print(
            f"{r.connection}: {r.requests} requests, {r.retries} retries, {r.rate_limited} rate-limited, "
            f"{r.duration:.1f}s",
            markup=False,
        )


@app.command()
def pull(
    connection: ConnsOpt = None,
    objects: Annotated[
        str | None, typer.Option("--object", help="contacts,companies,deals,calls (default: all).")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Re-read changes since this ISO time (ignores the cursor).")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Ignore the cursor and re-read everything.")] = False,
    reconcile: Annotated[
        bool, typer.Option("--reconcile", help="Also compare id sets and mark vanished records.")
    ] = False,
    lock_timeout: LockOpt = None,
    metrics_file: MetricsOpt = None,
) -> None:
    """Pull changes from the CRM into the local store (incremental, resumable).

    Example (cron, every 5 minutes): crmsync --quiet pull --metrics-file /var/lib/node_exporter/crmsync.prom
    """
    from crmsync.sync.pull import exit_code
    from crmsync.sync.pull import pull as do_pull

    a = STATE.app()
    prog, update = _progress()
    try:
        if prog:
            prog.start()
        results = do_pull(
            a,
            connections=connection,
            objects=split_objects(objects),
            since=parse_when(since, name="--since"),
            full=full,
            reconcile=reconcile,
            lock_timeout=lock_timeout,
            progress=update,
        )
    finally:
        if prog:
            prog.stop()
        _write_metrics(a, metrics_file)
    _prune(a)
    if STATE.json:
        emit_json({"results": [r.as_dict() for r in results]})
    elif not STATE.quiet:
        _render_pull(results)
    for r in results:
        if r.error and not STATE.json:
            sys.stderr.write(f"crmsync: {r.connection}: {r.error}\n")
    finish(exit_code(results))


@app.command()
def backfill(
    connection: ConnOpt = None,
    objects: Annotated[
        str | None, typer.Option("--object", help="contacts,companies,deals,calls (default: all).")
    ] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only history from this date.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Only history up to this date.")] = None,
    lock_timeout: LockOpt = None,
    metrics_file: MetricsOpt = None,
) -> None:
    """Import the full history, checkpointed; re-run after a kill to continue where it stopped.

    Example: crmsync backfill -c prod --object contacts,companies
    """
    from crmsync.sync.pull import backfill as do_backfill

    a = STATE.app()
    prog, update = _progress()
    try:
        if prog:
            prog.start()
        result = do_backfill(
            a,
            connection=connection,
            objects=split_objects(objects),
            since=parse_when(since, name="--since"),
            until=parse_when(until, name="--until"),
            lock_timeout=lock_timeout,
            progress=update,
        )
    finally:
        if prog:
            prog.stop()
        _write_metrics(a, metrics_file)
    if STATE.json:
        emit_json(result.as_dict())
    elif not STATE.quiet:
        _render_pull([result])
    if result.error and not STATE.json:
        sys.stderr.write(f"crmsync: {result.connection}: {result.error}\n")
    finish(result.exit_code)


# -- push -------------------------------------------------------------------------------------
@app.command()
def push(
    source: Annotated[str | None, typer.Argument(help="Outcomes file (JSONL, CSV, JSON array) or - for stdin.")] = None,
    connection: ConnOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="auto (by extension), jsonl, csv or json.")] = "auto",
    delimiter: Annotated[
        str | None, typer.Option("--delimiter", help="CSV cell separator: , ; tab | [read from the header line].")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Any invalid record aborts before anything is queued (exit 2).")
    ] = False,
    rejects: Annotated[
        Path | None, typer.Option("--rejects", help="Write invalid records here (JSONL, with the error).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan from the local mirror; no CRM request.")
    ] = False,
    update: Annotated[
        bool, typer.Option("--update", help="Send changed content of already-delivered ids as updates.")
    ] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Resend outcomes that failed before.")] = False,
    status_id: Annotated[
        str | None, typer.Option("--status", help="Print the receipt of one outcome id and exit.")
    ] = None,
    schema: Annotated[bool, typer.Option("--schema", help="Print the CallOutcome JSON Schema and exit.")] = False,
    lock_timeout: LockOpt = None,
    metrics_file: MetricsOpt = None,
    strict_owners: Annotated[
        bool,
        typer.Option("--strict-owners", help="An owner_email that is no CRM user fails its outcome (default: yours)."),
    ] = False,
) -> None:
    """Push call outcomes into the CRM, exactly once, however often it is re-run.

    Example: my-dialer-export | crmsync push - -c prod --json > receipts.jsonl
    """
    if schema:
        from crmsync.model import CallOutcome

        emit_json(CallOutcome.model_json_schema())
        return
    from crmsync.sync import push as pushmod

    a = STATE.app()
    if status_id:
        r = pushmod.receipt(a, connection, status_id)
        if STATE.json:
            emit_json(r.as_dict())
        else:
            ids = ", ".join(f"{k} {v}" for k, v in r.remote_ids.items()) or "-"
            console().print(f"{r.id}: {r.status}; {ids}" + (f"; error: {r.error}" if r.error else ""))
        finish(0 if r.status in ("created", "updated") else ExitCode.PARTIAL)
        return
    if source is None and not retry_failed:
        raise UsageError("push needs an input file (or - for stdin); see crmsync push --help")
    sink = (lambda r: emit_json(r.as_dict())) if STATE.json else None
    prog = None
    progress_cb = None
    if tty() and not dry_run:
        prog = progress_display(console(stderr=True))
        task = prog.add_task("delivering", total=None)
        progress_cb = lambda done, total: prog.update(task, completed=done, total=total)  # noqa: E731
        prog.start()
    try:
        summary = pushmod.push(
            a,
            source=source,
            connection=connection,
            fmt=fmt,
            delimiter=delimiter,
            strict=strict,
            rejects=rejects,
            dry_run=dry_run,
            update=update,
            retry_failed=retry_failed,
            lock_timeout=lock_timeout,
            sink=sink,
            progress=progress_cb,
            strict_owners=strict_owners,
        )
    finally:
        if prog:
            prog.stop()
        if not dry_run:
            _write_metrics(a, metrics_file)
    if STATE.json:
        emit_json({"summary": summary.as_dict()})
    else:
        if not STATE.quiet:
            _render_push(summary)
        _push_reasons(summary, rejects)
    if summary.error:
        sys.stderr.write(f"crmsync: {summary.error}\n")
    finish(summary.exit_code)


def _render_push(s: Any) -> None:
    if s.dry_run:
        actions = sorted({a for d in s.plan_counts.values() for a in d})
        plan = table("object", *actions, right=actions)
        for obj, d in s.plan_counts.items():
            add_row(plan, obj, *[d.get(act, 0) for act in actions])
        console().print(f"plan for {s.read} outcomes ({s.rejected} invalid), no CRM request made:")
        console().print(plan)
        return
    out = console()
    out.soft_wrap = True  # a summary line stays one line in a log, however long its numbers
    out.print(
        f"{s.connection}: read {s.read}, queued {s.queued}, created {s.created}, updated {s.updated}, "
        f"failed {s.failed}, rejected {s.rejected}, conflicts {s.conflicts}, seen before {s.already}"
    )
    if s.backlog:
        labels = {"created": "created", "updated": "updated", "already": "already in the CRM", "queued": "queued again"}
        done = ", ".join(f"{labels.get(k, k)} {n}" for k, n in s.backlog.items())
        out.print(f"{s.connection}: queued by an earlier run: {done}")
    out.print(
        f"{s.connection}: {s.pending} still queued; {s.requests} requests, {s.rate_limited} rate-limited, "
        f"{s.duration:.1f}s"
    )
    if s.owners_defaulted:
        out.print(f"{s.owners_defaulted} outcome(s) named an owner_email that is no CRM user: yours instead")


def _push_reasons(s: Any, rejects: Path | None) -> None:
    """Why records were rejected, failed or conflicted: the first few on stderr, the rest counted."""
    lines = list(s.reject_reasons)
    if s.rejected > len(s.reject_reasons):
        keep = f"all of them are in {rejects}" if rejects else "`--rejects FILE` keeps them all"
        lines.append(f"{s.rejected - len(s.reject_reasons)} more invalid; {keep}")
    failed = s.failed + s.backlog.get("failed", 0)
    lines += [f"failed ({n}): {reason}" for reason, n in s.failure_reasons.items()]
    if (others := failed - sum(s.failure_reasons.values())) > 0:
        lines.append(f"{others} more failed (with --json each receipt has its reason)")
    if failed:
        lines.append("after fixing the cause: crmsync push --retry-failed")
    if s.conflicts:
        ids = ", ".join(s.conflict_ids) + (", …" if s.conflicts > len(s.conflict_ids) else "")
        lines.append(f"{s.conflicts} outcome id(s) were queued before with other content ({ids}); --update sends it")
    lines += [f"conflict: {d}" for d in s.disagreements]
    for line in lines:
        sys.stderr.write(f"crmsync: {line}\n")


# -- the rest lives in crmsync/commands (status, map, log, metrics, demo, sandbox, webhook) ----
def _register() -> None:
    from crmsync.cli import demo, mapcmd, sandbox, status, webhook, worker

    for module in (demo, mapcmd, sandbox, status, webhook, worker):
        module.register(app)
    _mention_global_options(app)


def _mention_global_options(typer_app: typer.Typer) -> None:
    """Each command's --help says that the global options work after it too."""
    for command in typer_app.registered_commands:
        command.epilog = command.epilog or (
            "Global options work here too: --json, -q/--quiet, -v/--verbose, --db, --config, --log-format."
        )
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _mention_global_options(group.typer_instance)


_register()


def main() -> None:
    """Console-script entry point: the one place errors become exit codes."""
    from typer.exceptions import Abort, Exit, TyperException

    from crmsync.http.tuning import tune_gc

    tune_gc()
    try:
        rv = app(standalone_mode=False)
    except CrmsyncError as exc:
        _fail(exc)
    except Exit as exc:
        sys.exit(exc.exit_code)
    except Abort:
        sys.stderr.write("crmsync: interrupted\n")
        sys.exit(ExitCode.INTERRUPTED)
    except TyperException as exc:
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            sys.stderr.write(f"crmsync: error: {exc}\n")
        sys.exit(ExitCode.USAGE)
    except KeyboardInterrupt:
        sys.stderr.write("crmsync: interrupted\n")
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as exc:
        # A database error raised outside the store's engine (its handle_error maps the rest).
        from crmsync.store import store_fault

        fault = store_fault(exc, url=STATE._app.store.url if STATE._app and "store" in vars(STATE._app) else "")
        if fault is None:
            raise
        fault.__cause__ = exc
        _fail(fault)
    sys.exit(rv if isinstance(rv, int) else 0)


def _fail(exc: CrmsyncError) -> None:
    """One line on stderr and the error's exit code; with --verbose, the underlying traceback first."""
    from crmsync.redact import redact

    if STATE.verbose and exc.__cause__ is not None:
        import traceback

        sys.stderr.write(redact("".join(traceback.format_exception(exc.__cause__))))
    sys.stderr.write(f"crmsync: error: {redact(str(exc))}\n")
    sys.exit(int(exc.exit_code))
