"""Test isolation: every test gets its own CRMSYNC_HOME and an in-memory keyring.

The in-memory keyring is set explicitly: keyring never selects it by itself, so tests that need
the real discovery (no backend on a headless box) run crmsync in a child process instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest

from crmsync.credentials import MemoryKeyring


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryKeyring]:
    """No test reads or writes the user's config, store or keyring."""
    home = tmp_path / "crmsync-home"
    home.mkdir()
    monkeypatch.setenv("CRMSYNC_HOME", str(home))
    for var in list(os.environ):
        if var.startswith("CRMSYNC_SECRET") or var in ("CRMSYNC_DB", "CRMSYNC_CONFIG"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture
def home() -> Path:
    return Path(os.environ["CRMSYNC_HOME"])
