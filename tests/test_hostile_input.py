"""Hostile and awkward input: deep JSON, broken and European CSV, YAML alias bombs.

Each is met as the user meets it where it matters: the CLI in a subprocess with a clean
environment, against the HubSpot emulator on loopback.
"""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crmsync.app import App
from crmsync.config import load_config
from crmsync.emulators.hubspot import HubSpotEmulator
from crmsync.errors import ConfigError, MappingError, UsageError
from crmsync.jsonlimits import MAX_DEPTH, first_too_deep, loads, value_end
from crmsync.mapping import Mapping
from crmsync.store import CrmConnection
from crmsync.sync.inputs import read_outcomes, sniff_delimiter
from crmsync.sync.push import push
from tests.e2e import cli_env, hubspot_app, run_cli

WHEN = "2026-11-20T10:00:00+01:00"


def outcome(oid: str, **over: Any) -> dict[str, Any]:
    return {
        "id": oid,
        "occurred_at": WHEN,
        "contact": {"email": f"{oid}@example.com"},
        "disposition": "connected",
    } | over


DEEP = '{"id": "deep", "custom": ' + "[" * 100_000 + "]" * 100_000 + "}"


# -- JSON nesting ------------------------------------------------------------------------------------
@pytest.fixture
def app() -> Iterator[App]:
    emulator = HubSpotEmulator(seed=1)
    a = hubspot_app("http://hubspot.test", emulator.private_app_token, transport=lambda name: emulator.transport())
    a.emulator = emulator  # type: ignore[attr-defined]
    yield a
    a.close()


def test_a_100000_deep_json_line_is_that_lines_error_and_the_lines_around_it_are_pushed(
    app: App, tmp_path: Path
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(outcome("a")) + "\n" + DEEP + "\n" + json.dumps(outcome("c")) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    summary = push(app, source=str(src), connection="hs", rejects=rejects)
    assert (summary.created, summary.rejected) == (2, 1)
    (rejected,) = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert rejected["line"] == 2
    assert rejected["error"].startswith(f"{src}:2: invalid JSON: nested deeper than {MAX_DEPTH} levels")
    ids = sorted(c["properties"]["crmsync_outcome_id"] for c in app.emulator.records("calls"))  # type: ignore[attr-defined]
    assert ids == ["a", "c"]


def test_a_deep_element_of_a_json_array_is_skipped_whole(tmp_path: Path) -> None:
    # The deep element is larger than one read of the array (64 KiB): it is skipped across reads.
    src = tmp_path / "in.json"
    src.write_text("[\n" + json.dumps(outcome("a")) + ",\n" + DEEP + ",\n" + json.dumps(outcome("c")) + "\n]\n")
    parsed = list(read_outcomes(str(src)))
    assert [p.outcome.id if p.outcome else None for p in parsed] == ["a", None, "c"]
    assert parsed[1].line == 3 and "nested deeper than 64 levels" in str(parsed[1].error)
    assert parsed[2].line == 4
    unclosed = tmp_path / "cut.json"
    unclosed.write_text("[\n" + json.dumps(outcome("a")) + ",\n" + "[" * 100_000)
    got = list(read_outcomes(str(unclosed)))
    assert got[0].outcome is not None and "nested deeper" in str(got[1].error) and len(got) == 2


def test_depth_exactly_at_the_limit_is_fine_and_one_more_is_not() -> None:
    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert first_too_deep(at_limit) is None and loads(at_limit) is not None
    over = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    assert first_too_deep(over) == MAX_DEPTH
    with pytest.raises(ValueError, match="nested deeper than 64 levels"):
        loads(over.encode())


@pytest.mark.parametrize(
    ("text", "deep"),
    [
        ('{"a": "' + "[" * 100 + '"}', False),  # brackets inside a string do not nest
        ('{"a": "\\"' + "[" * 100 + '"}', False),  # nor after an escaped quote
        ('{"a": "\\\\"' + ", " + "[" * 100 + "]" * 100 + "}", True),  # an escaped backslash ends the string
        ("{" * 40 + "[" * 40, True),  # unclosed, still too deep
    ],
)
def test_the_scan_sees_strings_and_escapes_as_the_parser_does(text: str, deep: bool) -> None:
    assert (first_too_deep(text) is not None) is deep
    if not deep:
        json.loads(text)  # and the parser agrees: valid JSON, no recursion trouble


def test_value_end_finds_the_end_of_one_element() -> None:
    assert value_end('{"a": [1, "]"]} , {"b": 2}', 0) == (15, False)
    assert value_end("[[[", 0) == (None, False)


# -- CSV ---------------------------------------------------------------------------------------------
HEADER = ["id", "occurred_at", "contact.email", "disposition", "notes", "deal.name", "deal.amount"]


def csv_row(oid: str, notes: str = "", amount: str = "", sep: str = ",") -> str:
    deal = f"Deal {oid}" if amount else ""
    return sep.join([oid, WHEN, f"{oid}@example.com", "connected", notes, deal, amount])


def test_an_unclosed_quote_is_its_lines_error_and_the_rows_after_it_are_read(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    rows = [",".join(HEADER), csv_row("a"), csv_row("b", '"never closed'), csv_row("c"), csv_row("d", '"ok, quoted"')]
    src.write_text("\n".join(rows) + "\n")
    parsed = list(read_outcomes(str(src)))
    assert [(p.line, p.outcome.id if p.outcome else None) for p in parsed] == [
        (2, "a"),
        (3, None),
        (4, "c"),
        (5, "d"),
    ]
    assert str(parsed[1].error).startswith(f"{src}:3: unclosed quote")
    # The quote "closes" at the end of a later line: the swallowed row gives it away all the same.
    src.write_text("\n".join([rows[0], csv_row("a", '"oops'), csv_row("b") + '"', csv_row("c")]) + "\n")
    parsed = list(read_outcomes(str(src)))
    assert [p.outcome.id for p in parsed if p.outcome] == ["c"]
    assert "unclosed quote" in str(parsed[0].error) and parsed[0].line == 2


def test_a_quoted_field_over_several_lines_is_one_row_numbered_by_its_first_line(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text(",".join(HEADER) + "\n" + csv_row("a", '"first\nsecond"') + "\n" + csv_row("b") + "\n")
    parsed = list(read_outcomes(str(src)))
    assert [(p.line, p.outcome.notes if p.outcome else p.error) for p in parsed] == [(2, "first\nsecond"), (4, None)]


def test_a_runaway_quote_loses_no_row_after_it_and_a_long_cell_is_named(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    rows = [csv_row(f"r{i}", "note " + "y" * 100) for i in range(3000)]  # far past the csv cell limit
    src.write_text(",".join(HEADER) + "\n" + csv_row("a", '"oops') + "\n" + "\n".join(rows) + "\n")
    parsed = list(read_outcomes(str(src)))
    assert [p.line for p in parsed if p.error] == [2]
    assert len([p for p in parsed if p.outcome]) == 3000
    src.write_text(",".join(HEADER) + "\n" + csv_row("a", '"' + "x" * 200_000 + '"') + "\n" + csv_row("b") + "\n")
    parsed = list(read_outcomes(str(src)))
    assert "a cell longer than 131072 characters" in str(parsed[0].error) and parsed[1].outcome is not None


def test_old_mac_line_ends_and_bad_bytes_spoil_only_their_own_row(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    body = ",".join(HEADER) + "\r" + csv_row("a", '"two\rlines"') + "\r" + csv_row("b") + "\r"
    src.write_bytes(body.encode() + csv_row("c", "caf\xe9").encode("latin-1") + b"\r" + csv_row("d").encode())
    parsed = list(read_outcomes(str(src)))
    assert [(p.line, p.outcome.id if p.outcome else None) for p in parsed] == [(2, "a"), (4, "b"), (5, None), (6, "d")]
    assert parsed[0].outcome is not None and parsed[0].outcome.notes == "two\rlines"
    assert str(parsed[2].error) == f"{src}:5: not UTF-8 text"


@pytest.mark.parametrize(
    ("header", "expected"),
    [("id,notes", ","), ("id;notes;x", ";"), ("id\tnotes", "\t"), ("id|notes", "|"), ('"a;b",c', ","), ("id", ",")],
)
def test_the_header_line_decides_the_delimiter(header: str, expected: str) -> None:
    assert sniff_delimiter(header + "\r\n") == expected


def test_delimiter_mistakes_are_usage_errors_before_anything_is_read(tmp_path: Path) -> None:
    missing = str(tmp_path / "not-there.csv")
    with pytest.raises(UsageError, match="--delimiter must be one of"):
        read_outcomes(missing, delimiter=":")
    with pytest.raises(UsageError, match="--delimiter is for CSV input"):
        read_outcomes(missing, "jsonl", delimiter=";")


@pytest.fixture
def served(home: Path) -> Iterator[tuple[HubSpotEmulator, dict[str, str]]]:
    emulator = HubSpotEmulator(seed=2)
    server = emulator.serve()
    hubspot_app(server.url, emulator.private_app_token).close()
    yield emulator, cli_env(home, "hs", emulator.private_app_token)
    server.stop()


def _pushed(emulator: HubSpotEmulator) -> list[str]:
    return sorted(c["properties"]["crmsync_outcome_id"] for c in emulator.records("calls"))


@pytest.mark.slow
def test_cli_unclosed_quote_names_the_line_and_strict_queues_nothing(
    served: tuple[HubSpotEmulator, dict[str, str]], tmp_path: Path
) -> None:
    emulator, env = served
    src = tmp_path / "calls.csv"
    src.write_text("\n".join([",".join(HEADER), csv_row("a"), csv_row("b", '"oops'), csv_row("c")]) + "\n")
    strict = run_cli(["push", str(src), "-c", "hs", "--strict"], env)
    assert strict.code == 2, strict.stderr
    assert f"{src}:3: unclosed quote" in strict.stderr and "Traceback" not in strict.stderr
    assert _pushed(emulator) == []
    rejects = tmp_path / "rejects.jsonl"
    result = run_cli(["--json", "push", str(src), "-c", "hs", "--rejects", str(rejects)], env)
    assert result.code == 1, result.stderr
    assert _pushed(emulator) == ["a", "c"]
    (rejected,) = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert rejected["line"] == 3 and "unclosed quote" in rejected["error"]


@pytest.mark.slow
@pytest.mark.parametrize("excel", [True, False], ids=["bom-crlf", "plain"])
def test_cli_reads_semicolon_csv_as_excel_writes_it(
    served: tuple[HubSpotEmulator, dict[str, str]], tmp_path: Path, excel: bool
) -> None:
    emulator, env = served
    rows = [";".join(HEADER), csv_row("a", '"Rückruf; morgen"', "1234,5", sep=";"), csv_row("b", sep=";")]
    text = "\r\n".join(rows) + "\r\n" if excel else "\n".join(rows) + "\n"
    src = tmp_path / "export.csv"
    src.write_bytes((codecs.BOM_UTF8 if excel else b"") + text.encode())
    result = run_cli(["--json", "push", str(src), "-c", "hs"], env)
    assert result.code == 0, result.stderr
    assert result.json_lines()[-1]["summary"]["created"] == 2
    assert _pushed(emulator) == ["a", "b"]
    notes = {
        c["properties"]["crmsync_outcome_id"]: c["properties"].get("hs_call_body") for c in emulator.records("calls")
    }
    assert notes["a"] == "Rückruf; morgen"
    amounts = [d["properties"].get("amount") for d in emulator.records("deals")]
    assert [float(a) for a in amounts] == [1234.5]


@pytest.mark.slow
def test_cli_delimiter_option_reads_a_tab_file_whatever_its_name(
    served: tuple[HubSpotEmulator, dict[str, str]], tmp_path: Path
) -> None:
    emulator, env = served
    src = tmp_path / "export.txt"
    src.write_text("\t".join(HEADER) + "\n" + csv_row("t1", sep="\t") + "\n")
    result = run_cli(["push", str(src), "-c", "hs", "--delimiter", "tab"], env)
    assert result.code == 0, result.stderr
    assert _pushed(emulator) == ["t1"]
    bad = run_cli(["push", str(src), "-c", "hs", "--delimiter", "x"], env)
    assert bad.code == 2 and "--delimiter must be one of" in bad.stderr and "Traceback" not in bad.stderr


# -- YAML --------------------------------------------------------------------------------------------
def alias_bomb(top: str = "") -> str:
    """Nine levels of nine aliases each: 387 million nodes once expanded, 600 bytes on disk."""
    lines = [top, 'lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        lines.append(f"lol{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(line for line in lines if line) + "\n"


#: Runs crmsync and, at exit, writes this process's own peak RSS (VmHWM, kB) as the last stderr line.
#: The child's rusage cannot say it: on Linux a process's ru_maxrss starts from its parent's RSS at
#: fork and survives exec, and the parent here is a pytest that has grown over the whole suite.
_MEASURED = (
    "import atexit, re, runpy, sys\n"
    "def peak():\n"
    "    text = open('/proc/self/status').read()\n"
    "    sys.stderr.write('\\nVmHWM ' + re.search(r'VmHWM:\\s+(\\d+)', text).group(1) + '\\n')\n"
    "atexit.register(peak)\n"
    "sys.argv = ['crmsync', *sys.argv[1:]]\n"
    "runpy.run_module('crmsync', run_name='__main__')\n"
)


def _run_measured(args: list[str], env: dict[str, str]) -> tuple[int, str, float, int]:
    """(exit code, stderr, CPU seconds, peak RSS in MiB) of one crmsync subprocess, killed after a minute.

    CPU rather than wall time: a loaded test machine stretches the wall clock, not the work.
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURED, *args], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        killer = threading.Timer(60, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU, not every child's
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text, _, peak = err.read().decode().rstrip("\n").rpartition("\nVmHWM ")
        cpu = usage.ru_utime + usage.ru_stime
        return proc.returncode, text, cpu, int(peak) // 1024


def test_a_yaml_alias_bomb_in_config_fails_fast_with_file_and_line(home: Path) -> None:
    config = home / "config.yaml"
    config.write_text(alias_bomb("default_region: US"))
    started = time.process_time()  # CPU, not wall time: an expanded bomb burns CPU, a loaded box only waits
    with pytest.raises(ConfigError) as exc:
        load_config(config)
    assert time.process_time() - started < 2
    assert str(exc.value).startswith(f"{config}:") and "YAML aliases expand" in str(exc.value)
    code, err, cpu, rss = _run_measured(["status"], cli_env(home))
    assert code == 3, err
    assert f"{config}:" in err and "Traceback" not in err
    assert rss < 400, f"peak RSS {rss} MiB"
    assert cpu < 5, f"{cpu:.1f} s of CPU, most of it the interpreter starting"


def test_a_yaml_alias_bomb_in_a_mapping_file_fails_fast_with_file_and_line(home: Path) -> None:
    mapping = home / "mappings" / "hs.yaml"
    mapping.parent.mkdir()
    mapping.write_text(alias_bomb("version: 1"))
    started = time.process_time()
    with pytest.raises(MappingError) as exc:
        Mapping.load("hubspot", mapping)
    assert time.process_time() - started < 2
    assert str(exc.value).startswith(f"{mapping}:") and "YAML aliases expand" in str(exc.value)
    app = App()
    app.store.connections.save(CrmConnection(name="hs", provider="hubspot", base_url="http://unused"))
    app.close()
    code, err, cpu, rss = _run_measured(["map", "show", "-c", "hs"], cli_env(home))
    assert code == 2, err
    assert f"{mapping}:" in err and "Traceback" not in err
    assert rss < 400, f"peak RSS {rss} MiB"
    assert cpu < 5, f"{cpu:.1f} s of CPU, most of it the interpreter starting"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &x\n  - *x\n", "refers to a node that contains it"),
        ("a: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 64 levels"),
        ("a: &a 1\n" + "".join(f"k{i}: *a\n" for i in range(101)), "more than 100 YAML aliases"),
    ],
    ids=["recursive", "deep", "many-aliases"],
)
def test_other_yaml_abuse_is_refused_with_its_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}:")


def test_anchors_and_merge_keys_within_budget_still_work(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "connections:\n"
        "  a: &defaults {rate_limit: 50, timeout_seconds: 20}\n"
        "  b:\n    <<: *defaults\n    concurrency: 3\n"
    )
    config = load_config(path)
    assert config.connection("b").rate_limit == 50 and config.connection("b").concurrency == 3
