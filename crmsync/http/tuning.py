"""Process-wide tweaks, in one place: how the garbage collector and httpcore behave in a crmsync process.

Each changes a setting that applies to the whole process, not to one client; the figures behind
them are in docs/perf-decisions.md.
"""

from __future__ import annotations

#: Bytes asked of the socket per read of an answer (httpcore reads 64 KiB at a time).
READ_BYTES = 1 << 20


def read_in_larger_pieces() -> None:
    """Let httpcore read an answer in pieces of up to 1 MiB instead of 64 KiB.

    Each read gives up the GIL, and winning it back means waiting for the threads that parse,
    map and store earlier pages, on the chain of keyset requests of a large pull. httpcore offers
    no setting for it, only this class attribute; if it is ever gone, reads stay as they are.
    """
    try:
        from httpcore._sync.http11 import HTTP11Connection
    except ImportError:  # pragma: no cover - httpcore's layout changed
        return
    if getattr(HTTP11Connection, "READ_NUM_BYTES", READ_BYTES) < READ_BYTES:
        HTTP11Connection.READ_NUM_BYTES = READ_BYTES


def tune_gc() -> None:
    """Collect garbage far less often than CPython's default (the CLI sets it first; so do benchmark workers).

    A sync keeps tens of thousands of records alive (a push round, a pull page's mirror rows), and at
    the default threshold every thread waited while each full collection scanned all of them; crmsync
    makes little cyclic garbage, so rarer collections cost nothing in memory.
    """
    import gc

    gc.set_threshold(50_000, 20, 100)
