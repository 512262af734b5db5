"""`crmsync sandbox serve`: an emulator on loopback for your own offline trials."""

from __future__ import annotations

import shlex
import sys
import threading
from typing import Annotated

import typer

from crmsync.errors import UsageError

#: Seeds at least this large say so on stderr before the URL line (which waits for the seeding).
BIG_SEED = 100_000


def register(app: typer.Typer) -> None:
    sandbox_app = typer.Typer(help="Local emulators of the CRMs' APIs.", no_args_is_help=True)
    app.add_typer(sandbox_app, name="sandbox")

    @sandbox_app.command("serve")
    def serve(
        provider: Annotated[str, typer.Argument(help="hubspot, zoho, odoo or pipedrive.")],
        host: Annotated[str, typer.Option("--host", help="Interface (loopback by default).")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="Port; 0 picks a free one.")] = 0,
        seed: Annotated[int, typer.Option("--seed", help="Seed for the generated data.")] = 0,
        contacts: Annotated[int, typer.Option("--contacts", min=0, help="Seeded contacts (any number).")] = 100,
        companies: Annotated[int, typer.Option("--companies", min=0, help="Seeded companies.")] = 25,
        deals: Annotated[int, typer.Option("--deals", min=0, help="Seeded deals.")] = 10,
        latency_ms: Annotated[
            float, typer.Option("--latency-ms", help="How long each answer takes (the emulator's work inside it).")
        ] = 0.0,
        rate_limit: Annotated[
            str | None, typer.Option("--rate-limit", help="N/SECONDS, e.g. 100/10 (429 above it).")
        ] = None,
        error_rate: Annotated[float, typer.Option("--error-rate", help="Share of requests answered 5xx.")] = 0.0,
        drop_rate: Annotated[float, typer.Option("--drop-rate", help="Share of connections dropped.")] = 0.0,
        partial_rate: Annotated[
            float, typer.Option("--partial-rate", help="Share of batch items that fail (207).")
        ] = 0.0,
        token_ttl: Annotated[
            float | None, typer.Option("--token-ttl", help="OAuth access-token lifetime in seconds.")
        ] = None,
    ) -> None:
        """Serve an emulator until interrupted; the first line of stdout is its base URL.

        It then prints the credentials and the `crmsync connect` command line that connects to it
        (the secret piped on stdin, never an argument).

        Example: crmsync sandbox serve hubspot --port 0 --contacts 1000 --latency-ms 150 --rate-limit 100/10
        """
        from crmsync.emulators.base import Faults

        limits = {}
        if rate_limit:
            try:
                n, _, per = rate_limit.partition("/")
                limits["default"] = (int(n), float(per or 1))
            except ValueError:
                raise UsageError("--rate-limit takes N/SECONDS, e.g. 100/10") from None
        faults = Faults(
            latency_ms=latency_ms,
            rate_limits=limits,
            error_rate=error_rate,
            drop_rate=drop_rate,
            partial_rate=partial_rate,
            token_ttl=token_ttl,
            seed=seed,
        )
        if contacts + companies + deals >= BIG_SEED:
            # Seeding a million records takes a minute or two; the URL line follows once it is done.
            sys.stderr.write(f"seeding {contacts:,} contacts, {companies:,} companies and {deals:,} deals…\n")
        emulator, creds = build(provider, seed=seed, contacts=contacts, companies=companies, deals=deals, faults=faults)
        server = emulator.serve(host, port)
        sys.stdout.write(server.url + "\n")
        for key, value in creds.items():
            sys.stdout.write(f"{key}={value}\n")
        sys.stdout.write(f"# to connect, paste:\n{connect_command(provider, server.url, creds)}\n")
        sys.stdout.flush()
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


def connect_command(provider: str, url: str, creds: dict[str, str], *, name: str = "sandbox") -> str:
    """The shell line that connects crmsync to a sandbox emulator: the secret goes through stdin."""
    q = shlex.quote
    provider = provider.lower()
    if provider in ("hubspot", "pipedrive"):
        secret, options = creds["token"], []
    elif provider == "zoho":
        secret = creds["client_secret"]
        options = ["--client-id", q(creds["client_id"]), "--grant-code", q(creds["grant_code"])]
    else:
        secret, options = creds["api_key"], ["--db-name", q(creds["db"]), "--user", q(creds["login"])]
    # The sandbox's credentials are made up, so a file keeps them where no OS keyring exists.
    words = ["crmsync", "connect", provider, "--name", q(name), "--base-url", q(url), *options, "--token-stdin"]
    words.append("--insecure-storage")
    return f"printf '%s\\n' {q(secret)} | {' '.join(words)}"


def build(
    provider: str, *, seed: int, contacts: int, companies: int, deals: int, faults: object
) -> tuple[object, dict[str, str]]:
    """An emulator and the credentials a connection to it needs (fake, for the sandbox only)."""
    name = provider.lower()
    if name == "hubspot":
        from crmsync.emulators.hubspot import build_hubspot

        emu = build_hubspot(seed=seed, contacts=contacts, companies=companies, deals=deals, faults=faults)
        return emu, {"token": emu.private_app_token}
    if name == "zoho":
        from crmsync.emulators.zoho import build_zoho

        emu = build_zoho(seed=seed, contacts=contacts, accounts=companies, deals=deals, faults=faults)
        # A Self Client grant code lets `connect zoho --grant-code` work without a browser.
        return emu, {
            "client_id": emu.client_id,
            "client_secret": emu.client_secret,
            "grant_code": emu.grant_code(ttl=3600),
        }
    if name == "odoo":
        from crmsync.emulators.odoo import build_odoo

        emu = build_odoo(seed=seed, partners=contacts, companies=companies, leads=deals, faults=faults)
        return emu, {"db": emu.db, "login": emu.login, "api_key": emu.api_key}
    if name == "pipedrive":
        from crmsync.emulators.pipedrive import build_pipedrive

        emu = build_pipedrive(seed=seed, contacts=contacts, companies=companies, deals=deals, faults=faults)
        return emu, {"token": emu.api_token}
    raise UsageError(f"unknown provider {provider!r}; choose one of: hubspot, odoo, pipedrive, zoho")
