"""Who owns what an outcome writes: its ``owner_email`` as a CRM user, resolved once per run."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

from crmsync.providers.base import Provider
from crmsync.sync.push.items import ACTIVITY_STEPS, Item
from crmsync.sync.push.receipts import PushSummary

log = logging.getLogger("crmsync.push")


class Owners:
    """Who owns what an outcome writes: its ``owner_email`` as a CRM user, resolved once per run.

    The run's emails go to ``Provider.resolve_owners`` in one call (later rounds ask only for emails
    not seen yet); the CRM user id then replaces the email in the outcome's records before mapping.
    Policy for an email the CRM has no user for: the connection's own user (``default_owner``), a
    warning and one count in ``owners_defaulted``; with ``strict`` the outcome fails instead, before
    anything of it is written. Calls and tasks without an ``owner_email`` get the connection's own
    user too, so no activity is left unassigned where the CRM has owners (when the connection's user
    is not known either, the CRM's own default owner applies). A provider without ``default_owner``
    gets an unknown email as it is and applies its own fallback.
    """

    OWNED = ("contacts", "deals", "calls", "tasks")

    def __init__(self, provider: Provider, *, strict: bool) -> None:
        self.provider, self.strict = provider, strict
        self.users: dict[str, str | None] = {}  # email -> CRM user id (None: unknown to the CRM)
        self._default: Future[str | None] | None = None  # asked for alongside the first resolve
        self._applied: dict[str, int] = {}  # the last round's outcome ids -> id() of their records
        self._warned: set[str] = set()
        self.supported = True  # False once the provider says it maps owner_email itself
        # A provider that cannot name its own user applies its own fallback to an unknown email.
        self.own_fallback = type(provider).default_owner is Provider.default_owner

    def default(self) -> str | None:
        self._ask_default()
        assert self._default is not None
        return self._default.result()

    def start(self) -> None:
        """Ask for the connection's own user now, ahead of the first ``apply`` that needs it."""
        self._ask_default()

    def _ask_default(self) -> None:
        """Start reading the connection's own user in a thread of its own (it waits on no one)."""
        if self._default is not None:
            return
        self._default = Future()

        def read(answer: Future[str | None]) -> None:
            try:
                answer.set_result(self.provider.default_owner())
            except BaseException as exc:  # raised in the lane that needs the answer
                answer.set_exception(exc)

        threading.Thread(target=read, args=(self._default,), name="default-owner", daemon=True).start()

    def apply(self, items: list[Item], summary: PushSummary) -> None:
        """Put the CRM user (or the fallback) in place of each item's ``owner_email``."""
        todo = [it for it in items if self._applied.get(it.row.outcome_id) != id(it.canon)]
        self._applied = {}  # only the last round's records could come again; more would grow with the run
        if todo:
            self._ask_default()
        emails = {it.row.outcome_id: owner_email(it.canon) for it in todo}
        self._resolve(sorted({e for e in emails.values() if e} - self.users.keys()))
        if not self.supported:
            return
        for it in todo:
            self._applied[it.row.outcome_id] = id(it.canon)
            self._apply_one(it, emails[it.row.outcome_id], summary)

    def _resolve(self, new: list[str]) -> None:
        if new and self.supported:
            try:
                found = self.provider.resolve_owners(new)
            except NotImplementedError:
                self.supported = False
            else:
                self.users.update((e, found.get(e)) for e in new)

    def _apply_one(self, it: Item, email: str | None, summary: PushSummary) -> None:
        owner = self.users.get(email) if email else None
        if email and owner is None:
            if self.strict:
                it.failed, it.row.state = True, "failed"
                it.row.last_error = f"owner_email {email} is not a user of the CRM (--strict-owners)"
                return
            summary.owners_defaulted += 1
            if self.own_fallback:
                return  # the email goes to the provider as it is: it applies (and reports) its fallback
            if email not in self._warned:
                self._warned.add(email)
                log.warning("owner_email %s is no user of the CRM: the connection's user owns its records", email)
        chosen = owner
        for obj in self.OWNED:
            if obj in it.canon and (email or obj in ACTIVITY_STEPS):
                if chosen is None:
                    chosen = self.default()
                if chosen is None:
                    it.canon[obj].pop("owner_email", None)  # the CRM's own default applies
                else:
                    it.canon[obj]["owner_email"] = chosen


def owner_email(canon: dict[str, dict[str, Any]]) -> str | None:
    """The outcome's ``owner_email`` (the same on its contact, deal and call), lower-cased."""
    email = next((c["owner_email"] for c in canon.values() if c.get("owner_email")), None)
    return str(email).strip().lower() if email else None
