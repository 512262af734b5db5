"""Pipedrive's 2-second burst windows spent to the last turn without a 429, however transit times spread."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest

from crmsync.app import App
from crmsync.cli.exits import for_push
from crmsync.emulators.pipedrive import PipedriveEmulator
from crmsync.http import SlidingWindow
from crmsync.sync.connect import connect
from crmsync.sync.push import push
from tests.e2e import ScriptIO, write_config
from tests.test_pipedrive import _outcomes


def _push_with_spread_transit(home: Path, tmp_path: Path) -> PipedriveEmulator:
    write_config(home, "pd", rate_limit=40)
    emulator = PipedriveEmulator(plan="growth")
    inner = emulator.transport()
    rng = random.Random(7)

    def transit(request: httpx.Request) -> httpx.Response:
        time.sleep(rng.uniform(0, 0.25))  # transit of 0-250 ms: far more than the window's margin
        return inner.handle_request(request)

    app = App(transport=lambda name: httpx.MockTransport(transit))
    connect(
        app, provider="pipedrive", name="pd", base_url="http://pd.test", options={}, io=ScriptIO(emulator.api_token)
    )
    summary = push(app, source=str(_outcomes(tmp_path / "o.jsonl", 80)), connection="pd")
    assert for_push(summary) == 0 and summary.created == 80, summary.as_dict()
    return emulator


@pytest.mark.slow
def test_windows_counted_from_the_answers_meet_no_429(home: Path, tmp_path: Path) -> None:
    emulator = _push_with_spread_transit(home, tmp_path)
    assert emulator.stats.rate_limited == 0


@pytest.mark.slow
def test_windows_counted_from_the_turns_would_meet_429s(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same push with the turns counted when taken: the spread outruns the margin (this test's
    control: the one above would catch a regression)."""
    monkeypatch.setattr(SlidingWindow, "settle", lambda self: None)
    emulator = _push_with_spread_transit(home, tmp_path)
    assert emulator.stats.rate_limited > 0
