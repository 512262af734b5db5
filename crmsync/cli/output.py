"""What commands print: a rich console, tables, --json lines, progress on a TTY, shared renderers."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from crmsync.cli.state import STATE

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from crmsync.sync.pull import ConnectionResult

#: connection, object, records so far, total (None: unknown)
PullProgress = Callable[[str, str, int, "int | None"], None]


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    no_color = bool(os.environ.get("NO_COLOR"))
    # Off a terminal, lay out for 80 columns (or $COLUMNS): logs and mails stay readable.
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS") or 80)
    return Console(stderr=stderr, no_color=no_color, highlight=False, soft_wrap=False, width=width)


def table(*columns: str, right: Sequence[str] = ()) -> Table:
    """A borderless rich table whose cells wrap (long words fold) instead of being cut."""
    from rich.table import Table

    out = Table(box=None, pad_edge=False)
    for name in columns:
        out.add_column(name, justify="right" if name in right else "left", overflow="fold")
    return out


def add_row(to: Table, *cells: Any) -> None:
    """Add a row of plain text: brackets in data (``[strip, lower]``) are shown, never read as markup."""
    from rich.text import Text

    to.add_row(*(Text("" if cell is None else str(cell)) for cell in cells))


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str, sort_keys=False) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    if not STATE.quiet and not STATE.json:
        console().print(message)


def error_line(message: str) -> None:
    """One ``crmsync: …`` line on stderr (the exit code is the caller's to give, through cli.exits)."""
    sys.stderr.write(f"crmsync: {message}\n")


def tty() -> bool:
    return sys.stderr.isatty() and not STATE.quiet and not STATE.json


def progress_display(out: Console) -> Progress:
    """A rich Progress showing done/total, a bar and time left when the total is known, else a spinner
    and the count so far (a bar over an unknown total would only pretend)."""
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeRemainingColumn
    from rich.text import Text

    def known(task: Task) -> bool:
        # A provider's total is an estimate: once more records than that arrived, it is unknown.
        return task.total is not None and task.completed <= task.total

    class KnownTotalBar(BarColumn):
        def render(self, task: Task) -> Any:
            return super().render(task) if known(task) else Text("")

    class KnownTotalTimeLeft(TimeRemainingColumn):
        def render(self, task: Task) -> Text:
            return super().render(task) if known(task) else Text("")

    class Count(ProgressColumn):
        def render(self, task: Task) -> Text:
            done = int(task.completed)
            return Text(f"{done:,}/{int(task.total or 0):,}" if known(task) else f"{done:,}")

    return Progress(
        SpinnerColumn(finished_text=" "),
        TextColumn("{task.description}"),
        KnownTotalBar(),
        Count(),
        KnownTotalTimeLeft(),
        console=out,
        transient=True,
    )


def pull_progress() -> tuple[Progress | None, PullProgress | None]:
    """A rich progress display per connection/object on a TTY, else (None, None): cron and pipes get nothing."""
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


def render_pull(results: Sequence[ConnectionResult]) -> None:
    """Pull and backfill results: one row per connection and object, then each connection's requests."""
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
