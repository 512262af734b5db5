"""What every emulator module offers `crmsync sandbox serve` and `crmsync demo`: one ``sandbox(options)`` factory.

A provider names its emulator module (``Provider.emulator``); the module's ``sandbox`` seeds an
emulator and says how crmsync connects to it (the secret piped on stdin, the other options as
`crmsync connect` flags), so the commands never branch on a CRM's name.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crmsync.emulators.base import Emulator, Faults, LoopbackServer

#: `crmsync connect` option key (as ``sync.connect`` takes it) -> its command-line flag.
FLAGS = {
    "client_id": "--client-id",
    "grant_code": "--grant-code",
    "db": "--db-name",
    "user": "--user",
    "jwt_key": "--jwt-key",
    "login_host": "--login-host",
    "tenant": "--tenant",
    "certificate": "--certificate",
}


@dataclass
class SandboxOptions:
    """What `sandbox serve` lets people choose; each emulator seeds its own kinds of records from it."""

    seed: int = 0
    contacts: int = 100
    companies: int = 25
    deals: int = 10
    faults: Faults | None = None


@dataclass
class Sandbox:
    """A seeded emulator and the (made-up) credentials a connection to it needs."""

    emulator: Emulator
    #: What `crmsync connect --token-stdin` reads (a token, client secret or API key); None when the
    #: connection signs with a key file instead (named in ``options``).
    secret: str | None
    #: Printed as ``key=value`` lines after the base URL.
    credentials: dict[str, str]
    #: Other `crmsync connect` options, by key (see ``FLAGS``); ``{url}`` in a value stands for the
    #: base URL the sandbox is served at (an emulator that is also the login authority).
    options: dict[str, str] = field(default_factory=dict)

    def connect_options(self, url: str) -> dict[str, str]:
        """The `connect` options for a sandbox served at ``url``."""
        return {key: value.replace("{url}", url) for key, value in self.options.items()}

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> LoopbackServer:
        return self.emulator.serve(host, port)

    def connect_command(self, provider: str, url: str, *, name: str = "sandbox") -> str:
        """The shell line that connects crmsync to this sandbox: the secret goes through stdin."""
        q = shlex.quote
        options = [word for key, value in self.connect_options(url).items() for word in (FLAGS[key], q(value))]
        # The sandbox's credentials are made up, so a file keeps them where no OS keyring exists.
        words = ["crmsync", "connect", provider, "--name", q(name), "--base-url", q(url), *options]
        if self.secret is None:
            return " ".join([*words, "--insecure-storage"])
        words += ["--token-stdin", "--insecure-storage"]
        return f"printf '%s\\n' {q(self.secret)} | {' '.join(words)}"
