"""The command line: parse, call one library function, render (a rich table or --json), exit by the outcome.

``app`` (the root command) and ``main`` (the console script) are what the package exports;
``STATE`` too, for tests that run commands in-process. Commands import ``crmsync.cli.output``
and ``crmsync.cli.state``, never this package.
"""

# ruff: noqa: I001  (temporary: the names below must be bound before cli.app registers the commands)
from __future__ import annotations

# Until every command imports crmsync.cli.output/options/state (the next commit), the names they import from here.
from crmsync.cli.options import parse_when, split_objects  # noqa: F401
from crmsync.cli.output import add_row, console, emit_json, info, table  # noqa: F401
from crmsync.cli.state import STATE

from crmsync.cli.app import app, main

__all__ = ["STATE", "app", "main"]
