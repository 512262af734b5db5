"""How a crmsync process ends: its exit handlers run, its output is flushed, then it exits at once.

An ordinary interpreter exit also frees every object and module one by one and joins idle pool
threads, which took a measurable part of a short command's wall time after its work was done;
nothing crmsync keeps needs that teardown, since the store is closed by its exit handler.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_now(code: object = 0) -> NoReturn:
    """Exit with ``code`` as ``SystemExit`` would (None is 0, a message is printed and is 1)."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    atexit._run_exitfuncs()  # the store's clean-close mark, logging's flush
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe (crmsync status | head) or stream: nothing more can be said there
    os._exit(status)
