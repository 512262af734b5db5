"""`crmsync pull`, `crmsync backfill` and `crmsync push`: run the engine, render, exit by the outcome."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from crmsync.cli.exits import finish, for_push, for_receipt, for_result, for_results
from crmsync.cli.options import ConnOpt, ConnsOpt, LockOpt, MetricsOpt, parse_when, split_objects
from crmsync.cli.output import (
    add_row,
    console,
    emit_json,
    error_line,
    progress_display,
    pull_progress,
    render_pull,
    table,
    tty,
)
from crmsync.cli.state import STATE
from crmsync.errors import CrmsyncError, UsageError

T = TypeVar("T")

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.cli.output import PullProgress
    from crmsync.sync.pull import ConnectionResult
    from crmsync.sync.push import PushSummary


def _result_json(result: ConnectionResult) -> dict[str, Any]:
    """A pull or backfill result for --json, with the exit code it ends in (after ``error``)."""
    out: dict[str, Any] = {}
    for key, value in result.as_dict().items():
        out[key] = value
        if key == "error":
            out["exit_code"] = int(for_result(result))
    return out


def _write_metrics(app_: App, path: Path | None) -> None:
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


def _prune(app_: App) -> None:
    app_.store.prune(older_than_days=app_.config.log_retention_days)


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
    from crmsync.sync.pull import pull as do_pull

    a = STATE.app()
    results = _walk(
        a,
        metrics_file,
        lambda update: do_pull(
            a,
            connections=connection,
            objects=split_objects(objects),
            since=parse_when(since, name="--since"),
            full=full,
            reconcile=reconcile,
            lock_timeout=lock_timeout,
            progress=update,
        ),
    )
    _prune(a)
    _show(results, {"results": [_result_json(r) for r in results]})
    finish(for_results(results))


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
    result = _walk(
        a,
        metrics_file,
        lambda update: do_backfill(
            a,
            connection=connection,
            objects=split_objects(objects),
            since=parse_when(since, name="--since"),
            until=parse_when(until, name="--until"),
            lock_timeout=lock_timeout,
            progress=update,
        ),
    )
    _show([result], _result_json(result))
    finish(for_result(result))


def _walk(a: App, metrics_file: Path | None, call: Callable[[PullProgress | None], T]) -> T:
    """Run a pull or backfill under the progress display (a TTY only), then write the metrics file."""
    prog, update = pull_progress()
    try:
        if prog:
            prog.start()
        return call(update)
    finally:
        if prog:
            prog.stop()
        _write_metrics(a, metrics_file)


def _show(results: list[ConnectionResult], doc: dict[str, Any]) -> None:
    """``doc`` with --json; else the results table (unless --quiet) and one stderr line per failed connection."""
    if STATE.json:
        emit_json(doc)
        return
    if not STATE.quiet:
        render_pull(results)
    for r in results:
        if r.error:
            error_line(f"{r.connection}: {r.error}")


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
        finish(for_receipt(r.status))
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
    code = for_push(summary)
    if STATE.json:
        emit_json({"summary": _push_json(summary, code)})
    else:
        if not STATE.quiet:
            _render_push(summary)
        _push_reasons(summary, rejects)
    if summary.error:
        error_line(summary.error)
    finish(code)


def _push_json(s: PushSummary, code: int) -> dict[str, Any]:
    """A push's summary for --json, with the exit code it ends in (after ``error``, where scripts read it)."""
    out: dict[str, Any] = {}
    for key, value in s.as_dict().items():
        out[key] = value
        if key == "error":
            out["exit_code"] = int(code)
    return out


def _render_push(s: PushSummary) -> None:
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


def _push_reasons(s: PushSummary, rejects: Path | None) -> None:
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


def register(app: typer.Typer) -> None:
    for command in (pull, backfill, push):
        app.command()(command)
