"""`crmsync status`, `crmsync log` and `crmsync metrics`."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from crmsync.cli.exits import finish, for_health
from crmsync.cli.options import parse_when, split_objects
from crmsync.cli.output import add_row, console, emit_json, table
from crmsync.cli.state import STATE


def describe_cursor(cursor: dict[str, Any] | None) -> str:
    """A short, human view of a provider's cursor (epoch-ms values shown as UTC times)."""
    from datetime import UTC, datetime

    if not cursor:
        return "-"
    parts = []
    preferred = ("ts", "hi", "modified_time", "last_hi", "after")
    for key, value in sorted(
        cursor.items(), key=lambda kv: (kv[0] not in preferred, preferred.index(kv[0]) if kv[0] in preferred else 0)
    ):
        if key.startswith("_") or value in (None, "", False):
            continue
        if isinstance(value, int) and value > 10**11:
            value = datetime.fromtimestamp(value / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        parts.append(f"{key}={value}")
        if len(parts) == 2:
            break
    return ", ".join(parts)[:40]


def render_status(doc: dict[str, Any]) -> None:
    """The dashboard: one block per connection, readable at 80 columns."""
    from rich.markup import escape

    from crmsync.providers.usage import describe as describe_usage
    from crmsync.timeutil import human_age

    out = console()
    for c in doc["connections"]:
        auth = c["auth"]
        exp = f", token until {auth['token_expires_at']}" if auth.get("token_expires_at") else ""
        out.print(
            f"[bold]{escape(c['name'])}[/bold]  {c['provider']}  account {escape(c['account'] or '-')}  "
            f"auth {auth['state']}{exp}"
        )
        objects = table(
            "object", "stored", "archived", "last pull", "cursor", right=("stored", "archived", "last pull")
        )
        for obj, o in c["objects"].items():
            cur = describe_cursor(o["cursor"])
            add_row(objects, obj, o["stored"], o["archived"], human_age(o["last_pull_age_seconds"]), cur)
        out.print(objects)
        ob = c["outbox"]
        line = f"outbox: {ob['pending']} pending, {ob['failed']} failed, {ob['delivered_today']} delivered today"
        out.print(line)
        if ob["top_error"]:
            out.print(f"  most common error: {ob['top_error']}", markup=False)
        wh = c["webhook"]
        out.print(
            f"webhook events pending: {wh['pending']}"
            + (f" (oldest {human_age(wh['oldest_pending_age_seconds'])})" if wh["pending"] else "")
            + f"   conflicts open: {c['conflicts_open']}"
        )
        if c["rate_limit"]:
            rl = c["rate_limit"]
            quota = rl.get("quota") or {}
            q = ", ".join(f"{k} {v}" for k, v in quota.items())
            out.print(
                f"last {rl['command']}: {rl['requests']} requests, {rl['retries']} retries, "
                f"{rl['rate_limited']} rate-limited" + (f"; quota: {q}" if q else ""),
                markup=False,
            )
        if c.get("api_usage"):
            out.print(describe_usage(c["api_usage"]), markup=False)
        ages = {obj: o.get("last_reconcile_age_seconds") for obj, o in c["objects"].items()}
        if any(age is not None for age in ages.values()):
            out.print("reconciled by ids: " + ", ".join(f"{obj} {human_age(a)}" for obj, a in ages.items()))
        else:
            out.print("reconciled by ids: never (crmsync pull --reconcile)")
        secret = auth.get("secret") or {}
        if secret:
            kept = f"{secret['storage']} {secret['where']}" if secret.get("where") else secret["storage"]
            out.print(f"secret: {escape(kept)}")
        out.print("")
    if doc.get("store"):
        out.print(f"store: {doc['store']}", markup=False, soft_wrap=True)  # a path must stay pasteable


def register(app: typer.Typer) -> None:
    @app.command()
    def status(
        connection: Annotated[
            list[str] | None, typer.Option("--connection", "-c", help="Connection (repeatable; default all).")
        ] = None,
        check: Annotated[
            bool, typer.Option("--check", help="Health check: exit 0 healthy, 1 problems, 3 auth problems.")
        ] = False,
        max_age: Annotated[str, typer.Option("--max-age", help="With --check: a pull older than this is stale.")] = "",
        live: Annotated[
            bool, typer.Option("--live", help="With --check: also call each CRM (auth, reachability, scopes).")
        ] = False,
    ) -> None:
        """Show each connection's sync state; --check makes it a monitoring probe.

        Example: crmsync status --check --max-age 15m --live || alert "crmsync unhealthy"
        """
        from datetime import timedelta

        from crmsync.cli.worker import masked
        from crmsync.sync.status import check as do_check
        from crmsync.sync.status import gather
        from crmsync.timeutil import parse_age

        app_ = STATE.app()
        doc = gather(app_, connection)
        if not check:
            doc["store"] = masked(app_.paths.db)
            if STATE.json:
                emit_json(doc)
            else:
                render_status(doc)
            return
        age = parse_age(max_age) if max_age else timedelta(minutes=app_.config.max_age_minutes)
        if age is None:
            from crmsync.errors import UsageError

            raise UsageError(f"--max-age {max_age!r}: use an age like 15m, 2h or 1d")
        problems = do_check(app_, doc, max_age=age, live=live)
        if STATE.json:
            emit_json({"healthy": not problems, "problems": [p.__dict__ for p in problems]})
        else:
            for p in problems:
                sys.stdout.write(p.message + "\n")
            if not problems and not STATE.quiet:
                sys.stdout.write("healthy\n")
        finish(for_health(p.auth for p in problems))

    @app.command("log")
    def log_cmd(
        connection: Annotated[str | None, typer.Option("--connection", "-c", help="Only this connection.")] = None,
        obj: Annotated[str | None, typer.Option("--object", help="Only this object type (contact, deal, …).")] = None,
        record: Annotated[str | None, typer.Option("--record", help="Only this remote record id.")] = None,
        since: Annotated[str, typer.Option("--since", help="How far back (age like 1d, or ISO time).")] = "7d",
        limit: Annotated[int, typer.Option("--limit", help="At most this many rows.")] = 50,
    ) -> None:
        """The audit log: runs, and per record what changed, when, by which command and mapping.

        Example: crmsync log -c prod --object contact --record 12345 --since 30d
        """

        app_ = STATE.app()
        if connection:
            app_.connection(connection)  # an unknown name is a configuration error (exit 3), as everywhere
        when = parse_when(since, name="--since")
        objects = split_objects(obj)
        if record or objects:
            changes = app_.store.mirror.changes(
                connection=connection, obj=objects[0] if objects else None, remote_id=record, since=when, limit=limit
            )
            runs = {r.id: r for r in app_.store.runs.recent(connection, since=when, limit=1000)}
            rows: list[dict[str, Any]] = []
            for ch in changes:
                run = runs.get(ch.run_id) if ch.run_id else None
                rows.append(
                    {
                        "at": ch.at.isoformat(timespec="seconds"),
                        "connection": ch.connection,
                        "object": ch.object,
                        "record": ch.remote_id,
                        "action": ch.action,
                        "changes": ch.changes,
                        "command": run.command if run else None,
                        "mapping": run.mapping_hash[:12] if run and run.mapping_hash else None,
                    }
                )
            if STATE.json:
                emit_json({"changes": rows})
                return
            changed = table("at", "object", "record", "action", "command", "fields")
            for r in rows:
                fields = ", ".join(f"{k}: {v[0]!r}→{v[1]!r}" for k, v in r["changes"].items() if isinstance(v, list))
                add_row(changed, r["at"], r["object"], r["record"], r["action"], r["command"] or "-", fields)
            console().print(changed)
            return
        runs_list = app_.store.runs.recent(connection, since=when, limit=limit)
        rows = [
            {
                "id": r.id,
                "connection": r.connection,
                "command": r.command,
                "status": r.status,
                "started_at": r.started_at.isoformat(timespec="seconds"),
                "finished_at": r.finished_at.isoformat(timespec="seconds") if r.finished_at else None,
                "counts": {k: v for k, v in (r.counts or {}).items() if not k.startswith("_")},
                "requests": r.requests,
                "rate_limited": r.rate_limited,
                "error": r.error,
                "mapping": r.mapping_hash[:12] if r.mapping_hash else None,
                "pid": r.pid,
                "host": r.host,
            }
            for r in runs_list
        ]
        if STATE.json:
            emit_json({"runs": rows})
            return
        listed = table("id", "started", "connection", "command", "status", "requests", "error", right=("requests",))
        for r in rows:
            add_row(
                listed, r["id"], r["started_at"], r["connection"], r["command"], r["status"], r["requests"], r["error"]
            )
        console().print(listed)

    @app.command()
    def metrics() -> None:
        """Print current values from the store in the Prometheus text format.

        Example: crmsync metrics > /var/lib/node_exporter/textfile/crmsync.prom
        """
        from crmsync.sync.status import store_metrics

        sys.stdout.write(store_metrics(STATE.app()).text())
