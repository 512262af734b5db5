"""`crmsync sandbox serve`: an emulator on loopback for your own offline trials."""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from crmsync.errors import UsageError
from crmsync.providers import get_provider, provider_names

if TYPE_CHECKING:
    from crmsync.emulators.sandbox import Sandbox, SandboxOptions

#: Seeds at least this large say so on stderr before the URL line (which waits for the seeding).
BIG_SEED = 100_000


def register(app: typer.Typer) -> None:
    sandbox_app = typer.Typer(help="Local emulators of the CRMs' APIs.", no_args_is_help=True)
    app.add_typer(sandbox_app, name="sandbox")

    @sandbox_app.command("serve")
    def serve(
        provider: Annotated[str, typer.Argument(help=f"{', '.join(provider_names())}.")],
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
        from crmsync.emulators.sandbox import SandboxOptions

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
        options = SandboxOptions(seed=seed, contacts=contacts, companies=companies, deals=deals, faults=faults)
        name, box = make_sandbox(provider, options)
        server = box.serve(host, port)
        sys.stdout.write(server.url + "\n")
        for key, value in box.credentials.items():
            sys.stdout.write(f"{key}={value}\n")
        sys.stdout.write(f"# to connect, paste:\n{box.connect_command(name, server.url)}\n")
        sys.stdout.flush()
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


def make_sandbox(provider: str, options: SandboxOptions) -> tuple[str, Sandbox]:
    """(the provider's registered name, its seeded sandbox), from the emulator module the provider names."""
    cls = get_provider(provider)
    if cls.emulator is None:
        raise UsageError(f"{cls.label} has no emulator in this build")
    factory: Callable[[SandboxOptions], Sandbox] = importlib.import_module(cls.emulator).sandbox
    return cls.name, factory(options)
