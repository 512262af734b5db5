"""The global options of one invocation, and the library's App they open (built on first use)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crmsync.app import App


@dataclass
class Globals:
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    config: str | None = None
    db: str | None = None
    log_format: str = "text"
    _app: App | None = None

    def app(self) -> App:
        """The library's App, built on first use."""
        if self._app is None:
            from crmsync.app import App  # imported late: `crmsync --help` stays fast

            self._app = App(config=self.config, db=self.db)
        return self._app


STATE = Globals()
