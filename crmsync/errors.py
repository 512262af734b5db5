"""The exception tree and the exit codes it maps to.

Every error crmsync expects is a ``CrmsyncError``; ``cli.py`` turns it into one line on
stderr and the exit code below. A traceback therefore always means a bug.

    CrmsyncError                      exit 1 unless a subclass says otherwise
    ├── UsageError                    2  bad flags, bad input files (InputError)
    │   ├── InputError                2  a record of an input file is invalid (file:line: field: reason)
    │   └── MappingError              2  a mapping file is invalid (file:line: key: reason)
    ├── ConfigError                   3  no connection, bad config file, no keyring
    ├── AuthError                     3  credentials rejected, expired, or a scope missing
    ├── LockHeldError                 75 another run holds the connection's lock
    ├── StoreError                    3  the store cannot be opened or written: read-only, missing, refused
    │   ├── StoreCorruptError         3  the store file is damaged (the message says how to rebuild it)
    │   ├── StoreBusyError            75 another process holds the store's lock past the wait
    │   ├── StoreFullError            75 the disk (or the database server) has no room left
    │   └── StoreUnreachableError     75 the database server does not answer
    ├── ProviderError                 1  the CRM said no
    │   ├── RetriableError            75 429/5xx/timeouts still failing at the deadline
    │   └── FatalProviderError        1  4xx that no retry will fix
    └── PartialFailure                1  some records failed, the rest were done
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Exit codes shared by every command (documented in --help and the README)."""

    OK = 0
    PARTIAL = 1
    USAGE = 2
    AUTH = 3
    TEMPFAIL = 75  # sysexits EX_TEMPFAIL: cron may simply try again later
    INTERRUPTED = 130


class CrmsyncError(Exception):
    """Root of every error crmsync expects; carries the exit code for the CLI."""

    exit_code: ExitCode = ExitCode.PARTIAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(CrmsyncError):
    exit_code = ExitCode.USAGE


class InputError(UsageError):
    """An input record is invalid; the message names file, line and field."""

    def __init__(self, message: str, *, path: str = "", line: int = 0, field: str = "") -> None:
        self.path, self.line, self.field = path, line, field
        where = f"{path}:{line}: " if path else ""
        super().__init__(f"{where}{field + ': ' if field else ''}{message}")
        self.reason = message


class MappingError(UsageError):
    """A mapping file is invalid; the message names file, line and key."""


class ConfigError(CrmsyncError):
    exit_code = ExitCode.AUTH


class AuthError(CrmsyncError):
    exit_code = ExitCode.AUTH


class LockHeldError(CrmsyncError):
    exit_code = ExitCode.TEMPFAIL


class StoreError(CrmsyncError):
    """The local store cannot be used; the message names it (``store.store_fault`` decides which)."""

    exit_code = ExitCode.AUTH


class StoreCorruptError(StoreError):
    """The store file is damaged; ``saved`` is where its queued outcomes were written, if anywhere."""

    def __init__(self, message: str, *, hint: str | None = None, saved: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.saved = saved


class StoreBusyError(StoreError):
    exit_code = ExitCode.TEMPFAIL


class StoreFullError(StoreError):
    exit_code = ExitCode.TEMPFAIL


class StoreUnreachableError(StoreError):
    exit_code = ExitCode.TEMPFAIL


class ProviderError(CrmsyncError):
    """The CRM refused a request. ``status`` and ``body`` are already redacted."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        body: Any = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code
        self.body = body


class RetriableError(ProviderError):
    """Rate limited or unavailable past the deadline: try again later."""

    exit_code = ExitCode.TEMPFAIL


class FatalProviderError(ProviderError):
    """A 4xx that no retry will fix."""


class PartialFailure(CrmsyncError):
    """Some records failed; the rest were done."""

    exit_code = ExitCode.PARTIAL
