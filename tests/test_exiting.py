"""How a crmsync process ends (``crmsync.exiting``): handlers run, output flushed, the code kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SCRIPT = """
import atexit, sys
from crmsync.exiting import exit_now
atexit.register(lambda: sys.stdout.write("handler ran\\n"))
sys.stdout.write("x" * 200_000 + "\\n")
sys.stderr.write("to stderr\\n")
exit_now({code})
"""


def buffered() -> dict[str, str]:
    """The environment with stdout block-buffered, as for a crmsync whose output goes to a pipe."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def run(code: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(code=code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=buffered(),
        **kw,
    )


@pytest.mark.parametrize(("code", "status"), [("0", 0), ("7", 7), ("None", 0)])
def test_the_exit_handlers_run_the_output_is_whole_and_the_code_is_kept(code: str, status: int) -> None:
    done = run(code)
    assert done.returncode == status
    assert done.stdout == "x" * 200_000 + "\nhandler ran\n"  # buffered output is flushed, after the handlers
    assert done.stderr == "to stderr\n"


def test_a_message_is_printed_and_exits_1_as_systemexit_would() -> None:
    done = run("'crmsync: error: gone'")
    assert done.returncode == 1
    assert done.stderr == "to stderr\ncrmsync: error: gone\n"


def test_a_reader_that_went_away_is_no_traceback_and_the_code_is_kept() -> None:
    read, write = os.pipe()
    os.close(read)  # `crmsync … | head` after head has exited: the buffered line meets a closed pipe
    script = "import sys; from crmsync.exiting import exit_now; sys.stdout.write('a line\\n'); exit_now(3)"
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, env=buffered()
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (3, "")
