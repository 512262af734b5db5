"""The CLI surface: help texts, exit codes, config errors, the demo end to end."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from keyring.backend import KeyringBackend

from crmsync.app import App
from crmsync.config import load_config
from crmsync.errors import ConfigError
from tests.e2e import CliResult, cli_env, run_cli


def invoke(args: list[str], *, stdin: str | None = None) -> CliResult:
    """``crmsync ARGS`` in this process, through ``cli.main`` (where errors become exit codes)."""
    from click.testing import CliRunner

    from crmsync.cli import STATE, main

    STATE._app = None  # a fresh App per command, as in a real process
    with CliRunner().isolation(input=stdin) as (out, err, _):
        argv, sys.argv = sys.argv, ["crmsync", *args]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = argv
            sys.stdout.flush()  # the captured streams are text wrappers over the bytes read below
            sys.stderr.flush()
            if STATE._app is not None:
                STATE._app.close()
            STATE._app = None
        return CliResult(code, out.getvalue().decode(), err.getvalue().decode())


COMMANDS = ["connect", "pull", "push", "backfill", "map", "status", "log", "metrics", "demo", "sandbox", "webhook"]


def test_help_lists_every_command_and_exit_codes() -> None:
    result = invoke(["--help"])
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


def test_pull_without_a_connection_exits_3_with_one_line() -> None:
    result = invoke(["pull"])
    assert result.code == 3
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "crmsync connect" in result.stderr


def test_unknown_provider_names_the_valid_ones() -> None:
    result = invoke(["connect", "nosuchcrm", "--name", "x", "--token-stdin"], stdin="t\n")
    assert result.code == 2
    from crmsync.providers import provider_names

    assert (
        result.stderr == f"crmsync: error: unknown provider 'nosuchcrm'; choose one of: {', '.join(provider_names())}\n"
    )


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


@pytest.mark.slow
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


def test_push_schema_is_json_schema() -> None:
    result = invoke(["push", "--schema"])
    assert result.code == 0
    schema = result.json()
    assert schema["title"] == "CallOutcome" and "disposition" in schema["properties"]


def test_json_mode_keeps_stdout_machine_readable() -> None:
    result = invoke(["--json", "status"])
    assert result.code == 3 and result.stdout == ""


class FileKeyring(KeyringBackend):
    """An OS keyring's stand-in that outlives the process: a JSON file named by CRMSYNC_TEST_KEYRING."""

    priority = 1  # type: ignore[assignment]

    def _entries(self) -> dict[str, str]:
        path = Path(os.environ["CRMSYNC_TEST_KEYRING"])
        return json.loads(path.read_text()) if path.exists() else {}

    def get_password(self, service: str, username: str) -> str | None:
        return self._entries().get(f"{service}/{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        entries = self._entries()
        entries[f"{service}/{username}"] = password
        Path(os.environ["CRMSYNC_TEST_KEYRING"]).write_text(json.dumps(entries))

    def delete_password(self, service: str, username: str) -> None:
        entries = self._entries()
        entries.pop(f"{service}/{username}", None)
        Path(os.environ["CRMSYNC_TEST_KEYRING"]).write_text(json.dumps(entries))


def shell_env(home: Path) -> dict[str, str]:
    """A user's shell: this venv's crmsync on PATH, a keyring that persists between processes."""
    env = cli_env(home)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHON_KEYRING_BACKEND": "tests.test_cli.FileKeyring",
            "PYTHONPATH": str(Path(__file__).parents[1]),
            "CRMSYNC_TEST_KEYRING": str(home / "keyring.json"),
        }
    )
    return env


@pytest.mark.parametrize("provider", ["hubspot", "zoho", "odoo", "pipedrive"])
@pytest.mark.slow
def test_sandbox_serve_prints_a_connect_line_that_works_when_pasted(home: Path, provider: str) -> None:
    env = shell_env(home)
    server = subprocess.Popen(
        [sys.executable, "-m", "crmsync", "sandbox", "serve", provider, "--contacts", "5"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        printed = [server.stdout.readline()]
        while printed[-1] and not printed[-1].startswith("printf "):
            printed.append(server.stdout.readline())
        assert printed[0].startswith("http://127.0.0.1:")
        line = printed[-1].strip()
        assert f"crmsync connect {provider} --name sandbox --base-url {printed[0].strip()}" in line
        secret = shlex.split(line)[2]
        assert secret not in line.split("|", 1)[1]  # the secret is piped, never an argument
        connected = subprocess.run(["sh", "-c", line], env=env, capture_output=True, text=True, timeout=120)
        assert connected.returncode == 0, connected.stderr
        assert "connected sandbox" in connected.stdout
        pulled = run_cli(["pull", "--object", "contacts", "--json"], env)
        assert pulled.code == 0, pulled.stderr
        assert pulled.json()["results"][0]["objects"]["contacts"]["read"] >= 5
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_schedule_prints_lines_that_run_from_crons_empty_environment(home: Path) -> None:
    from crmsync.store import CrmConnection

    (home / "config.yaml").write_text("redis_url: redis://127.0.0.1:1/0\n")  # a closed port: no queue
    App().store.connections.save(
        CrmConnection(name="prod", provider="hubspot", account_id="1", base_url="http://x", scopes=[], settings={})
    )
    printed = run_cli(["schedule", "--every", "5m", "-c", "prod"], cli_env(home))
    assert printed.code == 0, printed.stderr
    crontab = [line for line in printed.stdout.splitlines() if not line.startswith("#")]
    assert len(crontab) == 2 and all(line.startswith("*/5 * * * * ") for line in crontab)
    assert f"--config {home / 'config.yaml'}" in crontab[0]
    command = crontab[0].removeprefix("*/5 * * * * ")
    cron = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh"}
    ran = subprocess.run(["sh", "-c", command], env=cron, capture_output=True, text=True, timeout=120)
    # It found the config and the connection, and reached for the configured queue.
    assert ran.returncode == 75, ran.stdout + ran.stderr
    assert "cannot reach the job queue at redis://127.0.0.1:1/0" in ran.stderr
    missing = run_cli(["schedule"], {**cli_env(home), "CRMSYNC_CONFIG": str(home / "nowhere.yaml")})
    assert "nowhere.yaml" not in "".join(x for x in missing.stdout.splitlines() if not x.startswith("#"))


def _pull_result(error: str) -> Any:
    from crmsync.sync.pull import ObjectResult

    obj = ObjectResult(object="contacts")
    obj.error = error
    return type(
        "Result",
        (),
        {"connection": "prod", "objects": [obj], "error": None, "requests": 1, "retries": 0, "rate_limited": 0},
    )()


def test_table_cells_wrap_whole_and_show_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    from crmsync.cli.output import add_row, console, render_pull, table

    error = "ConnectError [Errno 111] Connection refused by crm.example.com:443 while reading [strip, lower]"
    result = _pull_result(error)
    result.duration = 0.5
    render_pull([result])
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "".join(error.split()) in "".join(out.split())
    rules = table("canonical field", "transform")
    add_row(rules, "contact.email", "[strip, lower]")
    add_row(rules, "contact.phone", "[bold]e164[/bold]")
    console().print(rules)
    shown = capsys.readouterr().out
    assert "[strip, lower]" in shown and "[bold]e164[/bold]" in shown


def test_progress_shows_counts_and_a_bar_only_with_a_total() -> None:
    import io

    from rich.console import Console

    from crmsync.cli.output import progress_display

    buffer = io.StringIO()
    out = Console(file=buffer, force_terminal=True, width=100, color_system=None)
    progress = progress_display(out)
    unknown = progress.add_task("hs/contacts", total=None)
    progress.update(unknown, completed=1234)
    known = progress.add_task("delivering", total=5000)
    progress.update(known, completed=1200)
    out.print(progress.make_tasks_table(progress.tasks))
    backfill, push = buffer.getvalue().splitlines()[:2]
    assert "1,234" in backfill and "━" not in backfill and "1,234/" not in backfill
    assert "1,200/5,000" in push and "━" in push


# -- connect: generic options, each provider refusing what it does not use ------------------------
def test_connect_help_lists_the_registry_and_the_generic_options() -> None:
    from crmsync.providers import provider_names

    result = invoke(["connect", "--help"])
    assert result.code == 0
    text = " ".join(result.stdout.split())
    assert ", ".join(provider_names()) in text
    for flag in ("--jwt-key", "--login-host", "--tenant", "--certificate", "--user, --username"):
        assert flag in text


@pytest.mark.parametrize(
    ("provider", "args", "refused"),
    [
        ("odoo", ["--oauth"], "--oauth"),
        ("hubspot", ["--dc", "eu", "--db-name", "x"], "--dc, --db-name"),
        ("zoho", ["--username", "me"], "--user"),
        ("pipedrive", ["--tenant", "t"], "--tenant"),
        ("hubspot", ["--login-host", "test.example.com"], "--login-host"),
    ],
)
def test_a_provider_refuses_options_it_does_not_use_in_one_line(provider: str, args: list[str], refused: str) -> None:
    from crmsync.providers import get_provider

    args = ["connect", provider, "-n", "x", "--token-stdin", "--insecure-storage", *args]
    result = invoke(args, stdin="secret\n")
    assert result.code == 2, result.stderr
    label = get_provider(provider).label
    assert result.stderr == f"crmsync: error: {label} does not use {refused}; see crmsync connect --help\n"
    assert not App().secrets_dir.exists()  # refused before the secret's file storage was even probed


def test_connect_passes_generic_options_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import crmsync.sync.connect as connect_mod
    from crmsync.store import CrmConnection

    seen: dict[str, Any] = {}

    def fake_connect(app: App, *, provider: str, name: str, options: dict[str, Any], **_: Any) -> CrmConnection:
        seen.update(options)
        return CrmConnection(name=name, provider=provider, account_id="acct", base_url="http://x", scopes=[])

    monkeypatch.setattr(connect_mod, "connect", fake_connect)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("k")
    cert.write_text("c")
    args = ["--jwt-key", str(key), "--login-host", "test.example.com", "--tenant", "acme.onmicrosoft.com"]
    args += ["--certificate", str(cert), "--username", "bot@acme.com"]
    result = invoke(["--json", "connect", "future", "-n", "x", *args])
    assert result.code == 0, result.stderr
    assert seen == {
        "jwt_key": str(key),
        "login_host": "test.example.com",
        "tenant": "acme.onmicrosoft.com",
        "certificate": str(cert),
        "user": "bot@acme.com",
    }
    assert result.json()["account"] == "acct"


def test_a_key_file_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke(["connect", "hubspot", "-n", "x", "--jwt-key", str(tmp_path / "missing.pem")])
    assert result.code == 2
    assert "--jwt-key" in result.stderr and "Traceback" not in result.stderr


# -- exit codes: decided in cli/exits.py from outcomes and errors --------------------------------
def test_every_outcome_has_its_documented_exit_code() -> None:
    from crmsync.cli.exits import for_outcome
    from crmsync.errors import AuthError, RetriableError, UsageError
    from crmsync.sync.run import Outcome

    assert [for_outcome(o) for o in Outcome if o is not Outcome.FAILED] == [0, 1, 75, 130, 75]
    failed = [for_outcome(Outcome.FAILED, e) for e in (UsageError("u"), AuthError("a"), RetriableError("r"))]
    assert failed == [2, 3, 75]


@pytest.mark.parametrize(
    ("outcomes", "code"),
    [
        (["ok", "ok"], 0),
        (["ok", "partial"], 1),
        (["busy", "ok"], 75),  # a busy connection's 75 counts when nothing else failed
        (["busy", "partial"], 1),
        (["retriable", "auth"], 3),  # a failure that needs a person wins over a temporary one
        (["retriable", "ok"], 75),
    ],
)
def test_a_pull_of_several_connections_exits_by_its_worst_lasting_failure(outcomes: list[str], code: int) -> None:
    from crmsync.cli.exits import for_results
    from crmsync.errors import AuthError, LockHeldError, RetriableError
    from crmsync.sync.pull import ConnectionResult
    from crmsync.sync.run import Outcome

    def result(kind: str) -> ConnectionResult:
        r = ConnectionResult("c", "hubspot", "pull")
        if kind in ("ok", "partial"):
            r.outcome = Outcome(kind)
        elif kind == "busy":
            r.outcome, r.failure = Outcome.BUSY, LockHeldError("held")
        else:
            r.outcome, r.failure = Outcome.FAILED, RetriableError("down") if kind == "retriable" else AuthError("no")
        return r

    assert for_results([result(k) for k in outcomes]) == code


def test_no_command_module_imports_the_cli_package() -> None:
    """Commands import cli.output/options/state/exits: the package (which imports them all) never."""
    import ast

    cli_dir = Path(__file__).parents[1] / "crmsync" / "cli"
    offenders = []
    for path in sorted(cli_dir.glob("*.py")):
        if path.name in ("__init__.py", "app.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("crmsync.cli", "crmsync.cli.app"):
                offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name in ("crmsync.cli", "crmsync.cli.app") for a in node.names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
