"""crmsync: keep a sales team's call data and its CRM in step, both ways."""

from __future__ import annotations

__version__ = "0.1.0"


def main() -> None:
    """Console-script entry: answers --version before importing anything heavy."""
    import sys

    if sys.argv[1:] == ["--version"]:
        sys.stdout.write(__version__ + "\n")
        return
    from crmsync.cli import main as cli_main

    cli_main()


def tune_gc() -> None:
    """How a crmsync process collects garbage (the CLI sets it first; so do the benchmarks' workers).

    A sync keeps tens of thousands of records alive (a push round, a pull page's mirror rows). At
    CPython's default threshold (700 allocations) a 10,000-outcome push ran a full collection every
    half second, each scanning all of them for ~0.1 s while every thread waited: 1 s of the run.
    crmsync makes little cyclic garbage, so rarer collections cost nothing in memory.
    """
    import gc

    gc.set_threshold(50_000, 20, 100)
