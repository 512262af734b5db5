"""Every registered provider names an emulator whose ``sandbox(options)`` connects and pulls as it says."""

from __future__ import annotations

from pathlib import Path

import pytest

from crmsync.app import App
from crmsync.cli.sandbox import make_sandbox
from crmsync.emulators.sandbox import SandboxOptions
from crmsync.errors import UsageError
from crmsync.oauth import StaticIO
from crmsync.providers import get_provider, provider_names
from crmsync.sync.connect import connect
from crmsync.sync.pull import pull


@pytest.mark.parametrize("name", provider_names())
def test_the_sandbox_of_every_provider_connects_with_what_it_prints(tmp_path: Path, name: str) -> None:
    registered, box = make_sandbox(name.upper(), SandboxOptions(seed=2, contacts=3, companies=1, deals=1))
    assert registered == name
    line = box.connect_command(registered, "http://127.0.0.1:9")
    if box.secret is not None:
        assert box.secret not in line.split("|", 1)[1]  # piped on stdin, never an argument
    assert all(value in line for value in box.connect_options("http://127.0.0.1:9").values())
    server = box.serve()
    app = App(db=str(tmp_path / "s.db"))
    try:
        conn = connect(
            app,
            provider=registered,
            name="s",
            base_url=server.url,
            options=box.connect_options(server.url),
            io=StaticIO(box.secret or ""),
        )
        (result,) = pull(app, connections=[conn.name], objects=["contacts"])
        assert result.error is None and sum(o.read for o in result.objects) >= 3
    finally:
        app.close()
        server.stop()


def test_a_provider_without_an_emulator_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = get_provider(provider_names()[0])
    monkeypatch.setattr(cls, "emulator", None)
    with pytest.raises(UsageError, match="has no emulator"):
        make_sandbox(cls.name, SandboxOptions())
