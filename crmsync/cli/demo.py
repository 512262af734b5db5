"""`crmsync demo`: the whole job offline, against a seeded emulator, through the real code."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    from crmsync.cli.output import emit_json, info
    from crmsync.cli.state import STATE

    @app.command()
    def demo(
        contacts: Annotated[int, typer.Option("--contacts", help="Seeded contacts in the emulator.")] = 200,
        outcomes: Annotated[
            str | None, typer.Option("--outcomes", help="Outcomes to push (default: the bundled examples).")
        ] = None,
    ) -> None:
        """Run connect, pull, push and status against a local HubSpot emulator (no network, no setup).

        The store is a temporary one unless the global --db names where to keep it.

        Example: crmsync demo --json | jq .status
        """
        from crmsync.cli.status import render_status

        result = run_demo(db=STATE.db, contacts=contacts, outcomes=outcomes, log=info)
        if STATE.json:
            emit_json(result)
        else:
            render_status(result["status"])
            info(
                f"demo: pulled {result['pulled']} records, pushed {result['pushed']} calls "
                f"({result['push']['requests']} requests); a re-run of the push sent {result['repush_writes']} writes."
            )


def run_demo(
    *, db: str | None, contacts: int = 200, outcomes: str | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """connect -> pull -> push -> push again -> status against the demo CRM's sandbox; what each step reported."""
    import keyring

    from crmsync.app import App
    from crmsync.cli.sandbox import make_sandbox
    from crmsync.credentials import MemoryKeyring
    from crmsync.emulators.sandbox import SandboxOptions
    from crmsync.oauth import StaticIO
    from crmsync.providers import DEMO, get_provider
    from crmsync.sync.connect import connect
    from crmsync.sync.pull import pull
    from crmsync.sync.push import push
    from crmsync.sync.status import gather

    # A throwaway credential store, set explicitly (keyring never picks it itself): the demo must
    # run where no keyring daemon exists, and must never leave its fake token in the real keyring.
    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    with tempfile.TemporaryDirectory(prefix="crmsync-demo-") as tmp:
        options = SandboxOptions(
            seed=1, contacts=contacts, companies=max(1, contacts // 4), deals=max(1, contacts // 8)
        )
        provider, box = make_sandbox(DEMO, options)
        server = box.serve()
        app = App(db=db or str(Path(tmp) / "demo.db"), env={"CRMSYNC_HOME": tmp})
        try:
            log(f"demo: {get_provider(provider).label} emulator on {server.url} with {contacts} contacts")
            conn = connect(
                app,
                provider=provider,
                name="demo",
                base_url=server.url,
                options=box.connect_options(server.url),
                io=StaticIO(box.secret or ""),
            )
            pulled = pull(app, connections=[conn.name])
            source = outcomes or str(resources.files("crmsync") / "data" / "demo_outcomes.jsonl")
            first = push(app, source=source, connection=conn.name)
            writes_before = box.emulator.stats.writes
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
                "repush_writes": box.emulator.stats.writes - writes_before,
                "status": status,
            }
        finally:
            app.close()
            server.stop()
            keyring.set_keyring(previous)
