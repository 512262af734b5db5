"""The offline demo: a seeded HubSpot emulator on loopback, a throwaway keyring and store."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any


def run_demo(
    *, db: str | None, contacts: int = 200, outcomes: str | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """connect -> pull -> push -> push again -> status; returns what each step reported."""
    import keyring

    from crmsync.app import App
    from crmsync.credentials import MemoryKeyring
    from crmsync.emulators.hubspot import build_hubspot
    from crmsync.oauth import StaticIO
    from crmsync.sync.connect import connect
    from crmsync.sync.pull import pull
    from crmsync.sync.push import push
    from crmsync.sync.status import gather

    # A throwaway credential store, set explicitly (keyring never picks it itself): the demo must
    # run where no keyring daemon exists, and must never leave its fake token in the real keyring.
    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    with tempfile.TemporaryDirectory(prefix="crmsync-demo-") as tmp:
        emulator = build_hubspot(
            seed=1, contacts=contacts, companies=max(1, contacts // 4), deals=max(1, contacts // 8)
        )
        server = emulator.serve()
        app = App(db=db or str(Path(tmp) / "demo.db"), env={"CRMSYNC_HOME": tmp})
        try:
            log(f"demo: HubSpot emulator on {server.url} with {contacts} contacts")
            token = emulator.private_app_token
            conn = connect(app, provider="hubspot", name="demo", base_url=server.url, options={}, io=StaticIO(token))
            pulled = pull(app, connections=[conn.name])
            source = outcomes or str(resources.files("crmsync") / "data" / "demo_outcomes.jsonl")
            first = push(app, source=source, connection=conn.name)
            writes_before = emulator.stats.writes
            second = push(app, source=source, connection=conn.name)
            pull(app, connections=[conn.name])  # the calls just logged come back into the mirror
            status = gather(app, [conn.name])
            return {
                "emulator": server.url,
                "pull": [r.as_dict() for r in pulled],
                "pulled": sum(o.read for r in pulled for o in r.objects),
                "push": first.as_dict(),
                "pushed": first.created,
                "repush": second.as_dict(),
                "repush_writes": emulator.stats.writes - writes_before,
                "status": status,
            }
        finally:
            app.close()
            server.stop()
            keyring.set_keyring(previous)
