"""Global options work before and after the subcommand, in a subprocess and in CliRunner alike."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from crmsync.cli.app import GLOBAL_OPTIONS, app, hoist_global_options
from crmsync.emulators.hubspot import HubSpotEmulator
from tests.e2e import cli_env, hubspot_app, run_cli
from tests.test_hubspot_e2e import outcome_lines

TOKEN = "pat-na1-5c5c5c5c-6d6d-4e4e-8f8f-0a0a0a0a0a0a"
ROOT = get_command(app)


@pytest.mark.parametrize(
    ("typed", "parsed"),
    [
        (["status", "--json"], ["--json", "status"]),
        (["push", "f.jsonl", "-c", "prod", "--json"], ["--json", "push", "f.jsonl", "-c", "prod"]),
        (["pull", "--quiet"], ["--quiet", "pull"]),
        (["map", "check", "-c", "prod", "--json"], ["--json", "map", "check", "-c", "prod"]),
        (["webhook", "events", "--pending", "--json"], ["--json", "webhook", "events", "--pending"]),
        (["sandbox", "serve", "hubspot", "-v"], ["-v", "sandbox", "serve", "hubspot"]),
        (["worker", "-p", "2", "--db", "x.db"], ["--db", "x.db", "worker", "-p", "2"]),
        (["--db", "a.db", "status", "--log-format", "json"], ["--db", "a.db", "--log-format", "json", "status"]),
        (["status", "--db=/tmp/x.db", "-q"], ["--db=/tmp/x.db", "-q", "status"]),
        (["map", "--json", "show"], ["--json", "map", "show"]),
        (["status", "--config", "--json"], ["--config", "--json", "status"]),  # --json is --config's value
    ],
)
def test_global_options_move_in_front_of_the_subcommand(typed: list[str], parsed: list[str]) -> None:
    assert hoist_global_options(ROOT, typed) == parsed


@pytest.mark.parametrize(
    "typed",
    [
        ["push", "f.jsonl", "--format", "--json"],  # the value of the subcommand's own option
        ["push", "f.jsonl", "-c", "-q"],  # a connection named -q, odd but the user's
        ["push", "--", "--json"],  # after --, everything is an argument
        ["--json", "status"],
        ["status"],
        ["nosuchcommand", "--json"],  # left for Click to report
    ],
)
def test_what_is_not_a_global_option_stays_where_it_is(typed: list[str]) -> None:
    assert hoist_global_options(ROOT, typed) == typed


def test_no_subcommand_defines_an_option_named_like_a_global_one() -> None:
    """A global option after a subcommand could otherwise mean two things."""
    clashes = []

    def walk(cmd: Any, path: list[str]) -> None:
        for name, child in (getattr(cmd, "commands", None) or {}).items():
            for param in child.params:
                clashes.extend([f"{' '.join([*path, name])} {opt}" for opt in param.opts if opt in GLOBAL_OPTIONS])
            walk(child, [*path, name])

    walk(ROOT, ["crmsync"])
    assert clashes == []


def test_cli_runner_and_the_console_entry_agree(home: Path) -> None:
    typed = ["log", "--since", "1d", "--json"]
    in_process = CliRunner().invoke(app, typed)
    subprocess = run_cli(typed, cli_env(home))
    assert in_process.exit_code == subprocess.code == 0, in_process.output + subprocess.stderr
    assert json.loads(in_process.stdout) == json.loads(subprocess.stdout) == {"runs": []}


@pytest.mark.parametrize("typed", [["--log-format", "yaml", "status"], ["status", "--log-format", "yaml"]])
def test_an_unknown_log_format_is_a_usage_error(home: Path, typed: list[str]) -> None:
    result = run_cli(typed, cli_env(home))
    assert result.code == 2
    assert "'yaml' is not one of 'text', 'json'" in result.stderr and "Traceback" not in result.stderr


def test_log_of_an_unknown_connection_exits_3_with_one_line(home: Path) -> None:
    result = run_cli(["log", "-c", "nope"], cli_env(home))
    assert result.code == 3
    assert result.stderr.strip().splitlines() == ["crmsync: error: no connection named 'nope' (configured: none)"]


def test_shell_completion_is_offered(home: Path) -> None:
    helped = run_cli(["--help"], cli_env(home))
    assert "--install-completion" in helped.stdout and "--show-completion" in helped.stdout
    env = {**cli_env(home), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1", "HOME": str(home)}
    script = run_cli(["--show-completion", "bash"], env)
    assert script.code == 0, script.stderr
    assert "complete -o default -F" in script.stdout and "_COMPLETE=complete_bash" in script.stdout


@pytest.fixture
def connected(home: Path) -> Iterator[tuple[HubSpotEmulator, dict[str, str]]]:
    """A HubSpot emulator on loopback with a connection `hs` in the store; its secret in the env."""
    emulator = HubSpotEmulator(seed=3, contacts=12, companies=4, deals=2, private_app_token=TOKEN)
    server = emulator.serve()
    try:
        hubspot_app(server.url, TOKEN).close()
        yield emulator, cli_env(home, "hs", TOKEN)
    finally:
        server.stop()


@pytest.mark.slow
def test_status_push_pull_and_map_with_options_after_the_subcommand(
    connected: tuple[HubSpotEmulator, dict[str, str]], home: Path, tmp_path: Path
) -> None:
    emulator, env = connected
    status = run_cli(["status", "--json"], env)
    assert status.code == 0, status.stderr
    doc = status.json()
    assert doc["store"] == str(home / "crmsync.db") and doc["connections"][0]["name"] == "hs"

    plain = run_cli(["status", "-q"], env)
    assert f"store: {home / 'crmsync.db'}\n" in plain.stdout

    source = tmp_path / "outcomes.jsonl"
    source.write_text(outcome_lines(5))
    pushed = run_cli(["push", str(source), "-c", "hs", "--json"], env)
    assert pushed.code == 0, pushed.stderr
    lines = pushed.json_lines()
    receipts, summary = lines[:-1], lines[-1]["summary"]
    assert sorted(r["id"] for r in receipts) == [f"o-{i}" for i in range(5)]
    assert summary["read"] == 5 and summary["failed"] == 0 and summary["rejected"] == 0
    assert len(emulator.records("calls")) == 5

    quiet = run_cli(["pull", "--quiet"], env)
    assert quiet.code == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""

    checked = run_cli(["map", "check", "-c", "hs", "--json"], env)
    assert checked.code in (0, 1), checked.stderr
    assert "problems" in checked.json()

    logs = run_cli(["pull", "-v", "--log-format", "json"], env)
    assert logs.code == 0, logs.stderr
    assert logs.stderr.strip() and all(json.loads(line)["level"] for line in logs.stderr.splitlines())

    other = tmp_path / "other.db"
    elsewhere = run_cli(["log", "--db", str(other), "--json"], env)
    assert elsewhere.code == 0 and elsewhere.json() == {"runs": []} and other.exists()
    assert os.path.getsize(home / "crmsync.db") > 0


def test_every_commands_help_says_global_options_work_after_it() -> None:
    for typed in (["status", "--help"], ["map", "check", "--help"], ["sandbox", "serve", "-h"]):
        result = CliRunner().invoke(app, typed)
        assert result.exit_code == 0 and "Global options work here too: --json" in result.stdout
