"""The CLI surface: help texts, exit codes, config errors, the demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crmsync.app import App
from crmsync.config import load_config
from crmsync.errors import ConfigError
from tests.e2e import cli_env, run_cli

COMMANDS = ["connect", "pull", "push", "backfill", "map", "status", "log", "metrics", "demo", "sandbox", "webhook"]


def test_help_lists_every_command_and_exit_codes(home: Path) -> None:
    result = run_cli(["--help"], cli_env(home))
    assert result.code == 0
    for name in COMMANDS:
        assert f"  {name}" in result.stdout
    assert "75" in result.stdout and "130" in result.stdout


def test_every_command_has_help_with_an_example() -> None:
    from typer.main import get_command

    from crmsync.cli import app

    root = get_command(app)
    missing = []

    def walk(cmd, path):  # type: ignore[no-untyped-def]
        sub = getattr(cmd, "commands", None)
        if sub:
            for name, child in sub.items():
                walk(child, [*path, name])
            return
        if not cmd.help or "Example" not in cmd.help:
            missing.append(" ".join(path))

    walk(root, [])
    assert missing == []


def test_version_is_answered(home: Path) -> None:
    result = run_cli(["--version"], cli_env(home))
    assert result.code == 0 and result.stdout.strip()


def test_pull_without_a_connection_exits_3_with_one_line(home: Path) -> None:
    result = run_cli(["pull"], cli_env(home))
    assert result.code == 3
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "crmsync connect" in result.stderr


def test_unknown_provider_names_the_valid_ones(home: Path) -> None:
    result = run_cli(["connect", "salesforce", "--name", "x", "--token-stdin"], cli_env(home), stdin="t\n")
    assert result.code == 2
    assert "hubspot, odoo, zoho" in result.stderr


def test_config_errors_name_key_path_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("log_retention_days: 30\nwebhook:\n  port: high\nconnections:\n  prod:\n    rate_limt: 10\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    text = str(exc.value)
    assert f"{cfg}:3: webhook.port" in text
    assert f"{cfg}:6: connections.prod.rate_limt: unknown key" in text


def test_config_yaml_syntax_error_has_a_line(tmp_path: Path, home: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("a: [1, 2\nb: 3\n")
    result = run_cli(["--config", str(cfg), "status"], cli_env(home))
    assert result.code == 3 and f"{cfg}:" in result.stderr and "Traceback" not in result.stderr


def test_example_config_is_valid_and_documents_every_key() -> None:
    from crmsync.config import Config, ConnectionSettings, WebhookSettings

    path = Path(__file__).parents[1] / "config.example.yaml"
    load_config(path)
    text = path.read_text()
    for model in (Config, ConnectionSettings, WebhookSettings):
        for key in model.model_fields:
            assert f"{key}:" in text, f"config.example.yaml does not document {key}"


def test_precedence_flag_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"db: {tmp_path / 'file.db'}\n")
    env = {"CRMSYNC_HOME": str(tmp_path), "CRMSYNC_CONFIG": str(cfg)}
    assert App(env=env).store.url.endswith("file.db")
    assert App(env={**env, "CRMSYNC_DB": str(tmp_path / "env.db")}).store.url.endswith("env.db")
    assert App(env={**env, "CRMSYNC_DB": str(tmp_path / "env.db")}, db=str(tmp_path / "flag.db")).store.url.endswith(
        "flag.db"
    )


def test_demo_end_to_end_in_an_empty_home(tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC")}
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"),
            "NO_COLOR": "1",
        }
    )
    env.pop("PYTHON_KEYRING_BACKEND", None)
    plain = subprocess.run(
        [sys.executable, "-m", "crmsync", "demo"], env=env, cwd=home, capture_output=True, text=True, timeout=300
    )
    assert plain.returncode == 0, plain.stderr
    assert "Traceback" not in plain.stderr + plain.stdout
    assert "contacts" in plain.stdout and "pushed 25 calls" in plain.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "crmsync", "--json", "demo"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["pulled"] > 0 and doc["pushed"] == 25 and doc["repush_writes"] == 0
    assert doc["status"]["connections"][0]["objects"]["calls"]["stored"] == 25
    assert list(home.iterdir()) == [] or not any(p.suffix == ".db" for p in home.rglob("*"))  # nothing left behind


def test_examples_outcomes_is_the_bundled_demo_file() -> None:
    root = Path(__file__).parents[1]
    assert (root / "examples" / "outcomes.jsonl").read_text() == (
        root / "crmsync" / "data" / "demo_outcomes.jsonl"
    ).read_text()


def test_push_schema_is_json_schema(home: Path) -> None:
    result = run_cli(["push", "--schema"], cli_env(home))
    assert result.code == 0
    schema = result.json()
    assert schema["title"] == "CallOutcome" and "disposition" in schema["properties"]


def test_json_mode_keeps_stdout_machine_readable(home: Path) -> None:
    result = run_cli(["--json", "status"], cli_env(home))
    assert result.code == 3 and result.stdout == ""
