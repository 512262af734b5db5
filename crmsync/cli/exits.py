"""The one place where how a command ended becomes the process's exit code.

The engine ends a run with an ``Outcome`` (``crmsync.sync.run``) or raises a ``CrmsyncError``
(``crmsync.errors``, whose tree documents each error's code); commands hand either to this module,
and ``run`` turns every expected error into one line on stderr and its code. A traceback
therefore always means a bug.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NoReturn

import typer

from crmsync.cli.state import STATE
from crmsync.errors import CrmsyncError, ExitCode
from crmsync.sync.run import Outcome

if TYPE_CHECKING:
    from crmsync.sync.pull import ConnectionResult
    from crmsync.sync.push import PushSummary

EXIT_CODES = """Exit codes: 0 success · 1 partial failure (some records failed, the rest done) ·
2 usage or bad input · 3 authentication/configuration, or a store that is read-only, unopenable or corrupt ·
75 temporary failure (CRM unavailable or rate-limited past the deadline, lock held, store busy or full:
try again later) · 130 interrupted."""

_BY_OUTCOME = {
    Outcome.OK: ExitCode.OK,
    Outcome.PARTIAL: ExitCode.PARTIAL,
    Outcome.RETRY_LATER: ExitCode.TEMPFAIL,
    Outcome.INTERRUPTED: ExitCode.INTERRUPTED,
    Outcome.BUSY: ExitCode.TEMPFAIL,
}


def for_error(exc: CrmsyncError) -> ExitCode:
    """The documented code of an expected error (the table in ``crmsync.errors``)."""
    return ExitCode(exc.exit_code)


def for_outcome(outcome: Outcome, failure: CrmsyncError | None = None) -> ExitCode:
    """A run's code: its error's when one stopped it, else its outcome's."""
    if outcome is Outcome.FAILED:
        return for_error(failure) if failure is not None else ExitCode.PARTIAL
    return _BY_OUTCOME[outcome]


def for_result(result: ConnectionResult) -> ExitCode:
    return for_outcome(result.outcome, result.failure)


def for_push(summary: PushSummary) -> ExitCode:
    return for_outcome(summary.outcome, summary.failure)


def for_results(results: Sequence[ConnectionResult]) -> ExitCode:
    """A pull of several connections: a failure that needs a person (1, 2, 3) wins over a temporary
    one (75), and a busy connection's 75 counts only when nothing else failed."""
    codes = {for_result(r) for r in results if r.outcome is not Outcome.BUSY} - {ExitCode.OK}
    if lasting := codes - {ExitCode.TEMPFAIL}:
        return max(lasting)
    return ExitCode.TEMPFAIL if codes or any(r.busy for r in results) else ExitCode.OK


def for_receipt(status: str) -> ExitCode:
    """``push --status ID``: 0 when the outcome is in the CRM, else 1."""
    return ExitCode.OK if status in ("created", "updated") else ExitCode.PARTIAL


def for_health(problems: Iterable[bool]) -> ExitCode:
    """``status --check``: 0 healthy, 3 when a problem is about authentication, else 1.

    ``problems`` holds, per problem found, whether it is an authentication problem.
    """
    auth = list(problems)
    if not auth:
        return ExitCode.OK
    return ExitCode.AUTH if any(auth) else ExitCode.PARTIAL


def done() -> NoReturn:
    """End the command now, successfully (``--version``)."""
    raise typer.Exit(ExitCode.OK)


def problems_found() -> NoReturn:
    """End a check or preview that found problems (exit 1; it has printed them)."""
    raise typer.Exit(ExitCode.PARTIAL)


def finish(code: int) -> None:
    """End the command with ``code`` (returning normally means 0)."""
    if code:
        raise typer.Exit(code)


def run(app: typer.Typer) -> NoReturn:
    """Run the CLI and exit: every ``CrmsyncError`` becomes one line on stderr and its code."""
    from typer.exceptions import Abort, Exit, TyperException

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

        built = STATE._app
        fault = store_fault(exc, url=built.store.url if built is not None and "store" in vars(built) else "")
        if fault is None:
            raise
        fault.__cause__ = exc
        _fail(fault)
    sys.exit(rv if isinstance(rv, int) else 0)


def _fail(exc: CrmsyncError) -> NoReturn:
    """One line on stderr and the error's exit code; with --verbose, the underlying traceback first."""
    from crmsync.redact import redact

    if STATE.verbose and exc.__cause__ is not None:
        import traceback

        sys.stderr.write(redact("".join(traceback.format_exception(exc.__cause__))))
    sys.stderr.write(f"crmsync: error: {redact(str(exc))}\n")
    sys.exit(int(for_error(exc)))
