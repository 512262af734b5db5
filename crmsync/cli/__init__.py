"""The command line: parse, call one library function, render (a rich table or --json), exit by the outcome.

``app`` (the root command) and ``main`` (the console script) are what the package exports;
``STATE`` too, for tests that run commands in-process. Commands import ``crmsync.cli.output``
and ``crmsync.cli.state``, never this package.
"""

from __future__ import annotations

from crmsync.cli.app import app, main
from crmsync.cli.state import STATE

__all__ = ["STATE", "app", "main"]
