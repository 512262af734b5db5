"""`crmsync webhook serve|secret|subscribe|events`: receive CRM change events and feed them to `pull`."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer

from crmsync.errors import UsageError

log = logging.getLogger("crmsync.webhooks")

ConnOpt = Annotated[
    str | None, typer.Option("--connection", "-c", help="Connection name (optional when only one exists).")
]
ConnsOpt = Annotated[
    list[str] | None, typer.Option("--connection", "-c", help="Connection (repeatable; default: all).")
]


def _read_secret(prompt: str) -> str:
    """One line of stdin, or a hidden prompt on a terminal; never a command-line argument."""
    value = typer.prompt(prompt, hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
    value = value.strip()
    if not value:
        raise UsageError("no secret on stdin")
    return value


def register(app: typer.Typer) -> None:
    from crmsync.cli.output import add_row, console, emit_json, info, table
    from crmsync.cli.state import STATE

    webhook_app = typer.Typer(help="Receive CRM webhooks and apply them on pull.", no_args_is_help=True)
    app.add_typer(webhook_app, name="webhook")

    @webhook_app.command("serve")
    def serve(
        host: Annotated[str | None, typer.Option("--host", help="Interface [config; 127.0.0.1].")] = None,
        port: Annotated[int | None, typer.Option("--port", help="Port; 0 picks a free one [config; 8787].")] = None,
        public_url: Annotated[
            str | None,
            typer.Option("--public-url", help="Base URL the CRM calls and signs, e.g. https://hooks.example.com."),
        ] = None,
        trust_proxy: Annotated[
            bool,
            typer.Option("--trust-proxy", help="Sign-check against X-Forwarded-Proto/Host (only behind your proxy)."),
        ] = False,
        follow: Annotated[
            bool, typer.Option("--follow", help="Also pull every --interval seconds in this process.")
        ] = False,
        interval: Annotated[
            float | None, typer.Option("--interval", help="Seconds between pulls with --follow [5].")
        ] = None,
        connection: ConnsOpt = None,
    ) -> None:
        """Receive webhooks on /hooks/PROVIDER/NAME for every CRM that sends them; stop with SIGTERM or Ctrl-C.

        It listens on loopback: put a TLS-terminating reverse proxy in front of it for the internet,
        and pass the URL the CRM calls as --public-url (a CRM that signs requests signs that URL).

        Example: crmsync webhook serve --public-url https://hooks.example.com --follow --interval 5
        """
        from crmsync.errors import CrmsyncError
        from crmsync.sync.pull import pull
        from crmsync.webhooks import WebhookReceiver, connections_with_hooks, is_loopback
        from crmsync.webhooks import serve as run
        from crmsync.webhooks.subscriptions import renew

        a = STATE.app()
        hooks = connections_with_hooks(a, connection)
        receiver = WebhookReceiver(a, host=host, port=port, public_url=public_url, trust_proxy=trust_proxy or None)
        if not is_loopback(receiver.host):
            log.warning(
                "listening on %s, which is not loopback: the receiver speaks plain HTTP, so put a "
                "TLS-terminating reverse proxy in front of it (README, Webhooks)",
                receiver.host,
            )
        every = interval if interval is not None else a.config.webhook.follow_interval_seconds
        if every <= 0:
            raise UsageError("--interval must be more than 0 seconds")

        renewed_at: dict[str, float] = {}

        def tick() -> None:
            try:
                for res in pull(a, connections=connection or None):
                    if res.error:
                        log.warning("pull %s: %s", res.connection, res.error)
            except CrmsyncError as exc:
                log.warning("pull: %s", exc)
            renew(a, [name for name, _ in hooks], renewed_at, public_url)
            write_metrics()

        def ready(r: WebhookReceiver) -> None:
            urls = {name: r.hook_url(provider, name) for name, provider in hooks}
            if STATE.json:
                emit_json({"listening": r.url, "public_url": r.public_url, "hooks": urls})
                return
            sys.stdout.write(f"listening on {r.url}\n")
            sys.stdout.flush()
            for name, url in urls.items():
                info(f"{name}: {url}")
            if not urls:
                info("no connection to a CRM that sends webhooks yet: routes appear as connections are added")

        def write_metrics() -> None:
            if a.config.metrics_file:
                a.metrics.write(a.config.metrics_file)

        # Without --follow the loop only refreshes the metrics textfile (GET /metrics serves them too).
        idle = write_metrics if a.config.metrics_file else None
        run(receiver, tick=tick if follow else idle, interval=every, on_ready=ready)

    @webhook_app.command("secret")
    def secret(
        connection: ConnOpt = None,
        channel_id: Annotated[
            str | None,
            typer.Option(
                "--channel-id", help="The watch channel's id, for a CRM with channels (stdin gives its token)."
            ),
        ] = None,
    ) -> None:
        """Store the webhook secret the CRM gave from stdin in the keyring, and print the URL it must call.

        HubSpot: the app's client secret. Zoho: the watch channel's token (with --channel-id); a
        secret for the notify URL is generated. Where crmsync makes the credentials itself, use
        `webhook subscribe` instead.

        Example: printf '%s' "$HUBSPOT_CLIENT_SECRET" | crmsync webhook secret -c prod
        """
        from crmsync.webhooks.subscriptions import secret_prompt, store_secret

        a = STATE.app()
        prompt = secret_prompt(a, connection)
        doc = store_secret(a, connection, _read_secret(prompt), channel_id=channel_id)
        if STATE.json:
            emit_json(doc)
        else:
            info(f"stored the webhook secret of {doc['connection']}; the CRM must call {doc['notify_url']}")

    @webhook_app.command("subscribe")
    def subscribe(
        connection: ConnOpt = None,
        public_url: Annotated[
            str | None, typer.Option("--public-url", help="Base URL the CRM calls [config webhook.public_url].")
        ] = None,
    ) -> None:
        """Register this receiver with the CRM (Zoho: a watch channel; Pipedrive: webhooks), or renew it.

        The credentials the CRM's calls carry are generated and kept with the connection's secret.
        Zoho's channels last a week: run it again daily (cron), or let `webhook serve --follow` renew.

        Example: crmsync webhook subscribe -c zoho-prod --public-url https://hooks.example.com
        """
        from crmsync.webhooks.subscriptions import subscribe as do_subscribe

        doc = do_subscribe(STATE.app(), connection, public_url=public_url)
        if STATE.json:
            emit_json(doc)
        else:
            info(f"{doc['connection']}: {doc['summary']}")
            info(f"the CRM calls {doc['notify_url']}")

    @webhook_app.command("events")
    def events(
        connection: Annotated[str | None, typer.Option("--connection", "-c", help="Only this connection.")] = None,
        pending: Annotated[bool, typer.Option("--pending", help="Only events no pull has applied yet.")] = False,
        limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 100,
    ) -> None:
        """List stored webhook events, newest first.

        Example: crmsync webhook events --pending --json
        """
        from crmsync.store.events import list_events

        rows = [
            _event_row(e) for e in list_events(STATE.app().store, connection=connection, pending=pending, limit=limit)
        ]
        if STATE.json:
            emit_json({"events": rows})
            return
        listed = table("id", "received", "connection", "object", "record", "type", "occurred", "processed")
        for r in rows:
            add_row(
                listed,
                r["id"],
                r["received_at"] or "-",
                r["connection"],
                r["object"],
                r["remote_id"],
                r["event_type"],
                r["occurred_at"] or "-",
                r["processed_at"] or "pending",
            )
        console().print(listed)


def _event_row(e: Any) -> dict[str, Any]:
    def iso(value: Any) -> str | None:
        return value.isoformat(timespec="seconds") if value is not None else None

    return {
        "id": e.id,
        "connection": e.connection,
        "provider": e.provider,
        "object": e.object,
        "remote_id": e.remote_id,
        "event_type": e.event_type,
        "occurred_at": iso(e.occurred_at),
        "received_at": iso(e.received_at),
        "processed_at": iso(e.processed_at),
        "dedupe_key": e.dedupe_key,
    }
