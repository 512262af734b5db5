"""`crmsync demo`: the whole job offline, against the HubSpot emulator, through the real code."""

from __future__ import annotations

from typing import Annotated

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
        from crmsync.sync.demo import run_demo

        result = run_demo(db=STATE.db, contacts=contacts, outcomes=outcomes, log=info)
        if STATE.json:
            emit_json(result)
        else:
            render_status(result["status"])
            info(
                f"demo: pulled {result['pulled']} records, pushed {result['pushed']} calls "
                f"({result['push']['requests']} requests); a re-run of the push sent {result['repush_writes']} writes."
            )
