"""`crmsync connect`: create or renew a connection; the provider's own flow asks for what it needs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from crmsync.cli.output import emit_json, info
from crmsync.cli.state import STATE
from crmsync.errors import UsageError
from crmsync.providers import provider_names


def connect(
    provider: Annotated[str, typer.Argument(help=f"One of: {', '.join(provider_names())}.", show_default=False)],
    name: Annotated[str, typer.Option("--name", "-n", help="A name for this connection, e.g. prod.")],
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="API base URL (an emulator, proxy or regional host).")
    ] = None,
    token_stdin: Annotated[
        bool, typer.Option("--token-stdin", help="Read the token/secret from stdin, not a prompt.")
    ] = False,
    oauth: Annotated[bool, typer.Option("--oauth", help="OAuth 2.0 instead of a private-app token.")] = False,
    client_id: Annotated[str | None, typer.Option("--client-id", help="OAuth client id.")] = None,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Print the authorisation URL instead of opening a browser.")
    ] = False,
    dc: Annotated[str | None, typer.Option("--dc", help="Data centre: us, eu, in, au, jp, ca, sa, cn.")] = None,
    grant_code: Annotated[
        str | None, typer.Option("--grant-code", help="A Self Client grant code (headless OAuth).")
    ] = None,
    database: Annotated[str | None, typer.Option("--db-name", "--database", help="Database name.")] = None,
    user: Annotated[str | None, typer.Option("--user", "--username", help="Login (user name).")] = None,
    transport: Annotated[
        str | None, typer.Option("--transport", help="API transport, e.g. jsonrpc or json2 (default: by version).")
    ] = None,
    scopes: Annotated[
        str | None, typer.Option("--scopes", help="OAuth scopes to request (space/comma separated).")
    ] = None,
    password: Annotated[
        bool, typer.Option("--password", help="The secret is a password, not an API key (not advised).")
    ] = False,
    jwt_key: Annotated[
        Path | None,
        typer.Option(
            "--jwt-key",
            help="Private key file (PEM) for a JWT bearer flow.",
            dir_okay=False,
            resolve_path=True,
        ),
    ] = None,
    login_host: Annotated[
        str | None, typer.Option("--login-host", help="Login/authorisation host, e.g. a sandbox's.")
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Directory tenant (id or domain).")] = None,
    certificate: Annotated[
        Path | None,
        typer.Option(
            "--certificate",
            help="Client certificate file (PEM) for certificate credentials.",
            dir_okay=False,
            resolve_path=True,
        ),
    ] = None,
    insecure_storage: Annotated[
        bool,
        typer.Option(
            "--insecure-storage",
            help="Keep the secret in a file readable only by you (data directory, mode 0600), not the OS keyring.",
        ),
    ] = False,
) -> None:
    """Create or renew a connection; the secret goes to the OS keyring (or see --insecure-storage).

    Each provider reads only the options it needs and refuses the others (exit 2).
    With CRMSYNC_SECRET_<NAME> set, the secret is taken from there and stored nowhere.

    Example: crmsync connect hubspot --name prod   (prompts for the private-app token)
    """
    from crmsync.sync.connect import connect as do_connect

    options: dict[str, Any] = {
        "token_stdin": token_stdin,
        "oauth": oauth,
        "client_id": client_id,
        "no_browser": no_browser,
        "dc": dc,
        "grant_code": grant_code,
        "db": database,
        "user": user,
        "transport": transport,
        "scopes": scopes,
        "password": password,
        "jwt_key": str(jwt_key) if jwt_key else None,
        "login_host": login_host,
        "tenant": tenant,
        "certificate": str(certificate) if certificate else None,
    }
    conn = do_connect(
        STATE.app(),
        provider=provider,
        name=name,
        base_url=base_url,
        options={k: v for k, v in options.items() if v not in (None, False)},
        io=CliIO(token_stdin),
        insecure_storage=insecure_storage,
    )
    if STATE.json:
        emit_json(
            {
                "connection": conn.name,
                "provider": conn.provider,
                "account": conn.account_id,
                "base_url": conn.base_url,
                "scopes": conn.scopes,
            }
        )
    else:
        info(f"connected [bold]{conn.name}[/bold] ({conn.provider}, account {conn.account_id})")


class CliIO:
    """ConnectIO for a terminal (hidden prompts) or a script (--token-stdin)."""

    def __init__(self, from_stdin: bool) -> None:
        self.from_stdin = from_stdin
        self.interactive = sys.stdin.isatty() and not from_stdin

    def secret(self, prompt: str) -> str:
        if self.from_stdin:
            line = sys.stdin.readline()
            if not line.strip():
                raise UsageError(f"--token-stdin: no {prompt.lower()} on stdin")
            return line.strip()
        if not sys.stdin.isatty():
            raise UsageError(f"{prompt} is needed: run in a terminal or pass --token-stdin")
        import getpass

        return getpass.getpass(f"{prompt}: ")

    def ask(self, prompt: str) -> str:
        if not sys.stdin.isatty():
            line = sys.stdin.readline()
            return line.strip()
        return input(f"{prompt}: ")

    def info(self, message: str) -> None:
        sys.stderr.write(message + "\n")

    def open_url(self, url: str) -> bool:
        import webbrowser

        try:
            return bool(webbrowser.open(url))
        except webbrowser.Error:
            return False


def register(app: typer.Typer) -> None:
    app.command()(connect)
