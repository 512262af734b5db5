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


def renew_channels(app: Any, names: list[str], last: dict[str, float], public_url: str | None) -> None:
    """Hourly, renew the Zoho watch channels of ``names`` that have one (a channel lasts a week)."""
    import time

    from crmsync.errors import CrmsyncError
    from crmsync.webhooks import ZOHO_CHANNEL_KEY, zoho_subscribe

    for name in names:
        if time.monotonic() - last.get(name, float("-inf")) < 3600:
            continue
        last[name] = time.monotonic()
        if not (app.secrets.get(name) or {}).get(ZOHO_CHANNEL_KEY):
            continue  # no channel made by `webhook subscribe`: nothing to renew
        try:
            zoho_subscribe(app, name, public_url=public_url)
        except CrmsyncError as exc:
            log.warning("renewing the Zoho channel of %s failed: %s", name, exc)


def register(app: typer.Typer) -> None:
    from crmsync.cli.output import add_row, console, emit_json, info, table
    from crmsync.cli.state import STATE

    webhook_app = typer.Typer(help="Receive CRM webhooks (HubSpot, Zoho) and apply them on pull.", no_args_is_help=True)
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
        """Receive webhooks on /hooks/hubspot/NAME and /hooks/zoho/NAME; stop with SIGTERM or Ctrl-C.

        It listens on loopback: put a TLS-terminating reverse proxy in front of it for the internet,
        and pass the URL the CRM calls as --public-url (HubSpot signs that URL).

        Example: crmsync webhook serve --public-url https://hooks.example.com --follow --interval 5
        """
        from crmsync.errors import CrmsyncError
        from crmsync.sync.pull import pull
        from crmsync.webhooks import WebhookReceiver, connections_with_hooks, is_loopback
        from crmsync.webhooks import serve as run

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
            renew_channels(a, [name for name, provider in hooks if provider == "zoho"], renewed_at, public_url)
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
                info("no HubSpot or Zoho connection yet: routes appear as connections are added")

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
            str | None, typer.Option("--channel-id", help="Zoho: the watch channel's id (stdin gives its token).")
        ] = None,
    ) -> None:
        """Store the webhook signing secret from stdin in the keyring (HubSpot: the app's client secret).

        For Zoho, stdin gives the watch channel's token; a secret for the notify URL is generated
        and the URL to register with Zoho is printed.

        Example: printf '%s' "$HUBSPOT_CLIENT_SECRET" | crmsync webhook secret -c prod
        """
        import secrets as pysecrets

        from crmsync.webhooks import SECRET_KEY, ZOHO_CHANNEL_KEY, ZOHO_TOKEN_KEY, ZOHO_URL_PARAM

        a = STATE.app()
        conn = a.connection(connection)
        if conn.provider == "hubspot":
            value = _read_secret("HubSpot app client secret")
            a.secrets.update(conn.name, **{SECRET_KEY: value})
            path = f"/hooks/hubspot/{conn.name}"
        elif conn.provider == "zoho":
            if not channel_id:
                raise UsageError("Zoho needs --channel-id (the watch channel's id); stdin gives its token")
            token = _read_secret("Zoho channel token")
            if len(token) > 50:
                raise UsageError("a Zoho channel token has at most 50 characters")
            url_secret = (a.secrets.get(conn.name) or {}).get(SECRET_KEY) or pysecrets.token_urlsafe(24)
            a.secrets.update(conn.name, **{SECRET_KEY: url_secret, ZOHO_TOKEN_KEY: token, ZOHO_CHANNEL_KEY: channel_id})
            path = f"/hooks/zoho/{conn.name}?{ZOHO_URL_PARAM}={url_secret}"
        else:
            raise UsageError(f"{conn.name} is a {conn.provider} connection; webhooks exist for hubspot and zoho")
        base = a.config.webhook.public_url or "PUBLIC_URL"
        if STATE.json:
            emit_json({"connection": conn.name, "stored": True, "notify_url": base.rstrip("/") + path})
        else:
            info(f"stored the webhook secret of {conn.name}; the CRM must call {base.rstrip('/')}{path}")

    @webhook_app.command("subscribe")
    def subscribe(
        connection: ConnOpt = None,
        public_url: Annotated[
            str | None, typer.Option("--public-url", help="Base URL Zoho calls [config webhook.public_url].")
        ] = None,
    ) -> None:
        """Zoho: create the watch channel that calls this receiver, or renew it (channels last a week).

        Run it again daily (cron) to renew; `webhook serve --follow` renews by itself.

        Example: crmsync webhook subscribe -c zoho-prod --public-url https://hooks.example.com
        """
        from crmsync.webhooks import zoho_subscribe

        doc = zoho_subscribe(STATE.app(), connection, public_url=public_url)
        if STATE.json:
            emit_json(doc)
        else:
            verb = "renewed" if doc["renewed"] else "enabled"
            info(f"{doc['connection']}: channel {doc['channel_id']} {verb} until {doc['expires_at']}")
            info(f"Zoho calls {doc['notify_url']}")

    @webhook_app.command("events")
    def events(
        connection: Annotated[str | None, typer.Option("--connection", "-c", help="Only this connection.")] = None,
        pending: Annotated[bool, typer.Option("--pending", help="Only events no pull has applied yet.")] = False,
        limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 100,
    ) -> None:
        """List stored webhook events, newest first.

        Example: crmsync webhook events --pending --json
        """
        from crmsync.webhooks import list_events

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
