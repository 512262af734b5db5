"""crmsync: keep a sales team's call data and its CRM in step, both ways."""

from __future__ import annotations

from crmsync.version import __version__

__all__ = ["__version__", "main"]


def main() -> None:
    """Console-script entry: answers --version before importing anything heavy."""
    import sys

    if sys.argv[1:] == ["--version"]:
        sys.stdout.write(__version__ + "\n")
        return
    from crmsync.cli import main as cli_main
    from crmsync.exiting import exit_now

    try:
        cli_main()
    except SystemExit as exc:
        exit_now(exc.code)
    exit_now(0)
