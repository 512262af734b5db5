"""Shared end-to-end helpers: an emulator on loopback, a connected App, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crmsync.app import App
from crmsync.credentials import env_name
from crmsync.oauth import StaticIO
from crmsync.sync.connect import connect


class ScriptIO(StaticIO):
    """StaticIO that can also follow the browser step with an HTTP GET."""

    def __init__(self, secret: str = "", open_with: Any = None) -> None:
        super().__init__(secret)
        self.open_with = open_with

    def open_url(self, url: str) -> bool:
        if self.open_with is None:
            return False
        self.open_with(url)
        return True


def write_config(home: Path, connection: str, **settings: Any) -> None:
    """A config.yaml in CRMSYNC_HOME with per-connection settings (e.g. raised rate limits)."""
    (home / "config.yaml").write_text(yaml.safe_dump({"connections": {connection: settings}}))


def hubspot_app(server_url: str, token: str, *, name: str = "hs", db: str | None = None, transport: Any = None) -> App:
    app = App(db=db, transport=transport)
    connect(app, provider="hubspot", name=name, base_url=server_url, options={}, io=ScriptIO(token))
    return app


def pull_stopped_before_page(app: App, page: int, objects: list[str]) -> bool:
    """Pull ``objects`` as if killed just before storing page ``page`` (0-based) of the run.

    True if the run was stopped there; False if it stored fewer pages and ended on its own.
    """
    from crmsync.sync.pull import pull

    apply, applied = app.store.mirror.apply_page, [0]

    def killed(*args: Any, **kwargs: Any) -> Any:
        if applied[0] == page:
            raise KeyboardInterrupt
        applied[0] += 1
        return apply(*args, **kwargs)

    app.store.mirror.apply_page = killed  # type: ignore[method-assign]
    try:
        pull(app, objects=objects)
        return False
    except KeyboardInterrupt:
        return True
    finally:
        app.store.mirror.apply_page = apply  # type: ignore[method-assign]


def kills_before_every_page(monkeypatch: Any, home: Path, run: Callable[[int], bool]) -> int:
    """``run(n)`` with a kill before page n, in a fresh CRMSYNC_HOME each, for n = 0, 1, ... until a
    run ends on its own (``run`` returns False); how many runs were killed."""
    kill_at = 0
    while True:
        monkeypatch.setenv("CRMSYNC_HOME", str(home / f"kill-{kill_at}"))
        if not run(kill_at):
            return kill_at
        kill_at += 1


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def cli_env(home: Path, connection: str | None = None, secret: str | None = None) -> dict[str, str]:
    """Environment for a crmsync subprocess: same home, no OS keyring, the secret in the env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_SECRET")}
    env.update({"CRMSYNC_HOME": str(home), "NO_COLOR": "1", "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"})
    if connection and secret:
        env[env_name(connection)] = secret
    return env


def run_cli(args: list[str], env: dict[str, str], *, stdin: str | None = None, timeout: float = 300) -> CliResult:
    proc = subprocess.run(
        [sys.executable, "-m", "crmsync", *args], env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)
