"""The provider interface: everything the engine may ask of a CRM, and nothing more.

A provider is one file (``providers/<name>.py``) with one ``Provider`` subclass, registered in
``providers/__init__.py``. The engine (``crmsync/sync``) never branches on a provider's name: it
reads the class attributes below (batch size, limits, objects) and calls the methods.

Providers speak in the CRM's own field names (``properties``); the mapping layer turns those into
canonical fields and back, so no provider knows about ``CallOutcome`` and no engine code knows
about ``hs_call_disposition``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from crmsync.http import ResponsePolicy

if TYPE_CHECKING:
    from crmsync.credentials import SecretStore
    from crmsync.http import Auth, HttpClient, RateLimit
    from crmsync.providers.capabilities import WebhookSupport
    from crmsync.providers.usage import ApiUsage

T = TypeVar("T")
R = TypeVar("R")

#: Canonical object types, as the CLI names them (``--object contacts,companies``).
OBJECTS: tuple[str, ...] = ("contacts", "companies", "deals", "calls", "tasks")
#: Mapping-file section for each object type.
SECTION = {"contacts": "contact", "companies": "company", "deals": "deal", "calls": "call", "tasks": "task"}


@dataclass
class RemoteRecord:
    """One record as the CRM returned it (provider field names, values as received)."""

    id: str
    properties: dict[str, Any]
    updated_at: datetime | None = None
    archived: bool = False
    #: Linked records: object type -> remote ids (e.g. {"companies": ["42"]}).
    associations: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Page:
    """One page of changes, stored in one transaction together with ``cursor``."""

    records: list[RemoteRecord]
    #: Cursor to persist once this page is stored; None keeps the stored one.
    cursor: dict[str, Any] | None
    #: Remote ids the CRM reports as deleted (Zoho /deleted); marked archived locally.
    deleted: list[str] = field(default_factory=list)
    #: Total records the query will return, when the CRM says (for progress ETA).
    total: int | None = None


@dataclass
class FieldInfo:
    """One CRM field, as ``map check`` needs it."""

    name: str
    label: str = ""
    type: str = "string"  # string|number|bool|date|datetime|enumeration|reference|phone|email|text
    required: bool = False
    read_only: bool = False
    unique: bool = False
    custom: bool = False
    options: list[str] | None = None  # accepted values of a picklist/enumeration
    max_length: int | None = None


@dataclass
class Health:
    """Result of ``Provider.check()``: authentication, reachability and scopes."""

    ok: bool
    account: str | None = None
    detail: str = ""
    scopes: list[str] = field(default_factory=list)
    missing_scopes: list[str] = field(default_factory=list)
    token_expires_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outgoing:
    """A contact, company or deal to create or update."""

    ref: str  # the engine's correlation key; results come back with the same ref
    properties: dict[str, Any]  # provider field names (already mapped and conflict-filtered)
    match: dict[str, str]  # canonical keys to match on: {"email": …} | {"phone": …} | {"domain": …} | {"key": …}
    remote_id: str | None = None  # known remote id: update it rather than match
    #: Records to link to: object type -> remote id (contact->company, deal->contact/company).
    associations: dict[str, str] = field(default_factory=dict)
    #: Believed new (see ``Provider.optimistic_creates``): create it, and if the CRM already holds
    #: the match key, write nothing and answer ``ItemResult(exists=True)``.
    create_only: bool = False


@dataclass
class OutgoingActivity:
    """A call or task to create, carrying the idempotency marker the provider stores with it."""

    ref: str
    marker: str  # unique per outcome (and kind); find_activities() looks it up after a lost reply
    properties: dict[str, Any]
    associations: dict[str, str] = field(default_factory=dict)  # contacts/companies/deals -> remote id


@dataclass
class ItemResult:
    """Per-item outcome of a batch write; one bad item never fails its neighbours."""

    ref: str
    ok: bool
    remote_id: str | None = None
    created: bool = False
    error: str | None = None
    #: True when a retry may succeed (rate limit, 5xx); False for validation errors.
    retriable: bool = False
    #: The CRM already holds this item's key or marker (a ``create_only`` item, a call or task):
    #: nothing was written; ``remote_id`` names the record when the CRM said which.
    exists: bool = False
    #: The write may have been done, but its answer was lost (``http.UnconfirmedWrite``): the
    #: engine looks the item up by its key or marker before it sends it again.
    unconfirmed: bool = False


class ConnectIO(Protocol):
    """How ``connect`` talks to the person (or script) at the other end."""

    interactive: bool

    def secret(self, prompt: str) -> str:
        """A secret from a hidden prompt, or one line of stdin with --token-stdin."""
        ...

    def ask(self, prompt: str) -> str:
        """A visible answer (e.g. an OAuth code pasted back)."""
        ...

    def info(self, message: str) -> None: ...

    def open_url(self, url: str) -> bool:
        """Open a browser at url; False when none could be opened (the URL is printed then)."""
        ...


@dataclass
class ConnectContext:
    """What ``Provider.connect`` gets: the options of `crmsync connect` and factories."""

    name: str
    base_url: str | None
    options: dict[str, Any]
    secrets: SecretStore
    io: ConnectIO
    #: Builds the connection's HttpClient for a base URL and an auth (same transport as later runs).
    client: Any  # Callable[[str, Auth | None], HttpClient]
    #: A bare httpx.Client for OAuth token endpoints (same transport).
    token_client: Any  # Callable[[], httpx.Client]
    #: A secret document given in ``CRMSYNC_SECRET_<NAME>``: an OAuth one is renewed, not re-authorised.
    given: dict[str, Any] | None = None


@dataclass
class ConnectResult:
    """What a successful connect records in crm_connection (no secrets)."""

    base_url: str
    account_id: str | None
    scopes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    health: Health | None = None


@dataclass
class ProviderContext:
    """What a provider instance is built from."""

    connection: str
    base_url: str
    #: Non-secret connection settings (account id, dc, db, transport …). ``api_base_url``, when
    #: set (Zoho's api_domain + /crm/v8), is where requests go instead of base_url.
    settings: dict[str, Any]
    http: HttpClient
    secrets: SecretStore
    options: dict[str, Any] = field(default_factory=dict)  # per-connection config overrides


class Provider(ABC):
    """One CRM behind the engine. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    label: ClassVar[str]
    #: Keys of ``ConnectContext.options`` that ``connect`` reads; ``crmsync connect`` refuses the
    #: others in one line (exit 2). None accepts any.
    connect_options: ClassVar[frozenset[str] | None] = None
    #: Object types this provider can pull.
    objects: ClassVar[tuple[str, ...]] = ("contacts", "companies", "deals", "calls")
    #: Records per batch write.
    batch_size: ClassVar[int] = 100
    #: Default rate limits by bucket name ("default" applies to everything not named).
    default_rate_limits: ClassVar[dict[str, RateLimit]] = {}
    #: Requests in flight at once.
    default_concurrency: ClassVar[int] = 4
    #: Objects whose match key is unique in the CRM, so a create of a record that already exists
    #: fails instead of duplicating it. Push then sends keys it has never seen as ``create_only``
    #: without looking them up first, and looks up (and applies the conflict rules to) only the
    #: ones the CRM reports as existing: one request per batch instead of two.
    optimistic_creates: ClassVar[frozenset[str]] = frozenset()
    #: Activity types ("calls", "tasks") whose idempotency marker the CRM keeps unique, so a create
    #: of one that exists is refused (``exists``) instead of logged twice. For the others push asks
    #: ``find_activities`` before creating what this store has no record of having sent.
    unique_markers: frozenset[str] = frozenset()  # an instance may narrow it once it has seen the CRM's fields
    #: Optional capabilities, as "module:Class" / module paths resolved only when asked for (so a
    #: provider never imports its emulator): the CRM's webhooks (``webhooks()``), and the emulator
    #: module whose ``sandbox(options)`` serves `crmsync sandbox serve` and `crmsync demo`.
    webhook_support: ClassVar[str | None] = None
    emulator: ClassVar[str | None] = None

    @classmethod
    def webhooks(cls) -> WebhookSupport | None:
        """This CRM's webhook capability, or None when crmsync cannot receive its webhooks."""
        import importlib

        if cls.webhook_support is None:
            return None
        module, _, attr = cls.webhook_support.partition(":")
        support: WebhookSupport = getattr(importlib.import_module(module), attr)(cls.label)
        return support

    default_base_url: ClassVar[str] = ""
    #: Sorts this CRM's responses (rate-limit headers, token-expiry bodies) for HttpClient.
    policy_class: ClassVar[type[ResponsePolicy]] = ResponsePolicy
    #: How the CRM writes a link to another record, for a mapping's ``ref_id: {ref: <provider>}``:
    #: "object" (``{"id": "42"}``) or "int" (42); None when it takes no such shape.
    reference_shape: ClassVar[str | None] = None

    def __init__(self, ctx: ProviderContext) -> None:
        self.ctx = ctx
        self.http = ctx.http

    # -- connection --------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def connect(cls, ctx: ConnectContext) -> ConnectResult:
        """Obtain and store credentials (keyring), verify them with a live call.

        Raises:
            AuthError: the credentials were refused or a scope is missing (named).
            UsageError: the options do not fit this provider.
        """

    @classmethod
    @abstractmethod
    def make_auth(
        cls, *, connection: str, settings: Mapping[str, Any], secrets: SecretStore, token_client: Any
    ) -> Auth:
        """The Auth (headers + refresh) every request of this connection goes through."""

    @abstractmethod
    def check(self) -> Health:
        """Authenticate and reach the CRM.

        Returns:
            Health with the account id, granted scopes and any missing ones.
        Raises:
            AuthError: the credentials are rejected.
            RetriableError: the CRM is unreachable past the deadline.
        """

    @abstractmethod
    def fields(self, obj: str) -> list[FieldInfo]:
        """The CRM's field list for an object type (custom fields included), for ``map check``."""

    # -- pull ----------------------------------------------------------------------------------
    @abstractmethod
    def changes(
        self,
        obj: str,
        cursor: dict[str, Any] | None,
        *,
        fields: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[Page]:
        """Yield pages of records changed since ``cursor`` (None: everything), oldest first.

        Args:
            obj: object type.
            cursor: what the last stored page carried, or None for a first run.
            fields: provider fields to request (from the mapping).
            since: with no cursor, start at this instant instead of the beginning (--since).
            until: do not return changes after this instant (backfill windows; default: now).
        Returns:
            Pages, each with the cursor that resumes right after it.
        """

    @abstractmethod
    def fetch(self, obj: str, ids: Sequence[str], *, fields: Sequence[str]) -> list[RemoteRecord]:
        """Read records by id in batches (webhook consumption). Missing ids are left out."""

    @abstractmethod
    def list_ids(self, obj: str) -> Iterator[list[str]]:
        """Yield every live remote id in pages, cheaply (``pull --reconcile``)."""

    def managed_fields(self, obj: str) -> set[str]:
        """Fields the provider creates or fills itself (idempotency keys); `map check` lets them be."""
        return set()

    def read_associations(self, obj: str, ids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        """Linked ids per record (``{id: {"companies": [...]}}``) for the association reconcile.

        Linking records does not change their modified date in every CRM, so incremental pulls
        can miss it. Providers whose links live on the record itself return {}.
        """
        return {}

    # -- push ----------------------------------------------------------------------------------
    def prepare_push(self) -> None:
        """Make sure what push relies on exists (e.g. idempotency properties). Idempotent."""

    def prepare_objects(self, objects: Sequence[str]) -> None:
        """Like prepare_push, for the object types one push batch touches (default: prepare_push).

        A property or field that already exists (made by another run, or by a create whose answer
        was lost and whose retry met it) is read back and used, never taken for missing.
        """
        self.prepare_push()

    def lookup_batch(self, obj: str, kind: str) -> int:
        """How many keys of one kind (``email``, ``domain``…) one ``lookup`` call should get.

        Push sends its lookups in parallel calls of this size; a provider whose query takes more
        keys than it writes records per batch says so here.
        """
        return self.batch_size

    @abstractmethod
    def lookup(self, obj: str, keys: Sequence[dict[str, str]], *, fields: Sequence[str]) -> dict[str, RemoteRecord]:
        """Find existing records by canonical match keys; returns ``{key_string: record}``.

        ``key_string`` is ``match_key(keys[i])``. Used for records the local mirror does not know.
        """

    @abstractmethod
    def upsert(self, obj: str, items: Sequence[Outgoing]) -> list[ItemResult]:
        """Create or update up to ``batch_size`` records; one result per item, same refs."""

    def flush(self, obj: str) -> None:
        """Send what the provider gathered across ``upsert`` calls of one step (e.g. links). Default: nothing."""

    def resolve_owners(self, emails: Sequence[str]) -> dict[str, str]:
        """The CRM users behind reps' email addresses, for the owner of records and activities.

        Args:
            emails: email addresses, any case; duplicates allowed.
        Returns:
            ``{lower-cased email: CRM user id}`` for the emails that are users of the CRM; unknown
            ones are left out. A provider lists the CRM's users at most once per instance (a run).
        Raises:
            AuthError: the credentials may not read users (a scope is missing).
            NotImplementedError: this provider maps ``owner_email`` itself; push leaves it as it is.
        """
        raise NotImplementedError

    def default_owner(self) -> str | None:
        """The CRM user id of the connection's own user (owner when no rep is known), or None if unknown."""
        return None

    @abstractmethod
    def create_activities(self, obj: str, items: Sequence[OutgoingActivity]) -> list[ItemResult]:
        """Create calls or tasks (``obj`` = "calls" | "tasks") with their associations and markers.

        Returns:
            One result per item, same refs: ``exists`` when the CRM refused a marker it already
            holds, ``unconfirmed`` when the answer was lost; never sends a create twice itself.
        """

    @abstractmethod
    def find_activities(
        self, obj: str, markers: Sequence[str], *, context: Sequence[OutgoingActivity] = ()
    ) -> dict[str, str]:
        """Return ``{marker: remote_id}`` for activities that already exist, in as few requests as the CRM allows.

        ``context`` holds the activities as they would be sent (links, mapped properties), for a CRM
        that can only look for a marker among one record's activities (Pipedrive).

        Asked after a lost reply, after ``exists``, and (where markers are not unique) before
        creating activities the local store has no record of having sent. A call found created but
        not finished (Odoo: not yet marked done) is finished here.
        """

    def check_budget(self, needs: Mapping[str, int], *, spent_today: int = 0) -> None:
        """Refuse a push that cannot fit in what the CRM allows today, before its first write.

        ``needs`` counts the records the push may write per object type (``calls`` is the number of
        outcomes). ``spent_today`` is what this connection's runs recorded today in the unit of
        ``api_usage()``, for a CRM that states no remaining figure of its own. The default has
        nothing to check: rate limits are waited out, not budgeted.

        Raises:
            RetriableError: the push would spend more than its configured share of the day's budget.
        """

    # -- housekeeping ------------------------------------------------------------------------
    def quota(self) -> dict[str, Any]:
        """What the CRM last said about remaining quota (daily calls, credits); {} when unknown."""
        return {}

    def api_usage(self) -> ApiUsage | None:
        """The API allowance as last seen (``crmsync.providers.usage``); recorded with each run, shown
        by ``status`` and exported as metrics. None: the CRM states none and crmsync budgets none."""
        return None

    def close(self) -> None:
        self.http.close()


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of at most ``size``, in order (a request's batch)."""
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def at_once(fn: Callable[[T], R], items: Sequence[T], *, most: int | None = None) -> list[R]:
    """``fn`` over ``items``, each in its own thread (in line for a single one), results in order;
    ``most``: at most that many threads (the requests a CRM takes in flight).

    For a handful of independent requests (one per object type) that would otherwise wait on each other.
    """
    if len(items) <= 1:
        return [fn(x) for x in items]
    workers = len(items) if most is None else max(1, min(len(items), most))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="at-once") as pool:
        return list(pool.map(fn, items))


def run_ahead(items: Iterable[T], depth: int, *, name: str) -> Iterator[T]:
    """``items``, produced by a thread of their own up to ``depth`` ahead of the caller, in order.

    An error in producing surfaces at the item where it happened; a caller that stops early (or
    fails) stops the producer at its next item.
    """
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            box.put(("error", exc))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, item = box.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish
            with contextlib.suppress(queue.Empty):
                box.get_nowait()
            thread.join(timeout=0.05)
        close = getattr(items, "close", None)
        if close is not None:  # a generator's own clean-up (its run_ahead threads) runs now, not at GC
            close()


def walk_both_ends(
    page: Callable[[Any, Any, bool], tuple[list[T], bool]],
    key: Callable[[T], Any],
    low: Any,
    pool: Executor,
) -> Iterator[tuple[list[T], Any]]:
    """A keyset walk that, past its first page, also reads downwards from the top until the ends meet.

    ``page(low, high, descending)`` answers the first rows above ``low`` and below ``high`` (None:
    no bound) from the one end or the other, and whether more lie between; ``key`` orders rows
    (unique, a record's position: ``(Modified_Time, id)``, an id). Yields ``(rows, mark)``: for the
    lower end's pages the key every record up to which is now read (where a run may resume), None
    for the upper end's, and the greatest key read on the last page.

    The first page shows whether more follow, so a small backlog costs one query as before; after
    it each round trip reads two pages (the upper end's in ``pool``), halving a large backlog's chain
    of round trips. The ends read the same range at once, so the last round may read a page twice
    (rows the lower end has are dropped from the upper end's), and ends that meet exactly at a
    page's edge look once more. Pages from the top never move the mark: a run killed half-way
    resumes from the lower end and finds what the upper end stored unchanged.
    """
    high = top = None
    first = True
    while True:
        down = None if first else pool.submit(page, low, high, True)
        up, more = page(low, high, False)
        rows, more_down = down.result() if down is not None else ([], True)
        overlap = False
        if up and rows:
            reached = key(up[-1])
            overlap = reached >= key(rows[-1])
            rows = [r for r in rows if key(r) > reached]
        if rows:
            top = top or key(rows[0])
            high = key(rows[-1])
        if up:
            low = key(up[-1])
        if overlap or not more or not more_down:
            final = top or low  # the greatest key read; with nothing read, nothing to yield
            if up and rows:
                yield up, low
                yield rows, final
            elif up or rows:
                yield up or rows, final
            elif not first:
                yield [], final
            return
        if up:
            yield up, low
        if rows:
            yield rows, None
        first = False


def match_key(keys: Mapping[str, str]) -> str:
    """A stable string for a match dict: ``email:a@b.com``."""
    name, value = next(iter(keys.items()))
    return f"{name}:{value}"
