"""Work started while the input is still being read and queued, so delivery need not wait for it.

``Warmup`` makes the provider and prepares the CRM for the objects queued; ``Prefetch`` sends the
first round's lookups. Both only start what delivery would do anyway; what fails here fails (or is
done again) when delivery asks for it, as it would have without the head start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from crmsync.http import SlidingWindow
from crmsync.sync.push.items import ACTIVITY_STEPS, ENTITY_STEPS, entity_key
from crmsync.sync.push.lookups import Prefetched, to_look_up
from crmsync.sync.push.settings import DEFAULT, PushSettings

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.mapping import Mapping
    from crmsync.providers.base import Provider
    from crmsync.store import CrmConnection


def count_from_answers(provider: Provider) -> Callable[[], None]:
    """Count every rate window's turns until their answers are in, not from when they were sent;
    returns what puts the windows back as they were (the provider may serve a pull next).

    A window counted from the send (HubSpot's search bucket, for pulls that need all of it) draws a
    429 whenever a request reaches the CRM later than its turn by more than the margin, as on a
    busy machine; a push's lookups never need the last fraction of that budget.
    """
    buckets = (getattr(getattr(provider, "http", None), "buckets", None) or {}).values()
    changed = [b for b in buckets if isinstance(b, SlidingWindow) and not b.from_answers]
    for bucket in changed:
        bucket.from_answers = True

    def restore() -> None:
        for bucket in changed:
            bucket.from_answers = False

    return restore


class Warmup:
    """The provider made, and the CRM prepared for the objects queued, while the input is still read.

    Delivery's first writes wait for the provider (credentials from the keyring) and for
    ``prepare_objects`` (idempotency properties, field metadata: a round trip or two per object).
    Both start on threads as soon as enqueue has queued outcomes of an object type, so their round
    trips overlap the rest of validating and queuing. Nothing is written to the CRM unless some
    outcome was queued (a push that queued one delivers it, so prepares it anyway).
    """

    def __init__(self, app: App, conn: CrmConnection) -> None:
        _ = app.metrics, app.secrets  # made here, not raced for by the thread below
        workers = 2 + len(ENTITY_STEPS) + len(ACTIVITY_STEPS)  # the provider, the owners, one per object
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="warmup")
        self.gates: dict[str, Future[None]] = {}
        self.before: dict[str, int] = {}  # the provider's request counters before any request of this run
        self.restore: Callable[[], None] = lambda: None  # the provider's rate windows as they were
        self.provider_future = self.pool.submit(self._make, app, conn)

    def _make(self, app: App, conn: CrmConnection) -> Provider:
        provider = app.provider(conn)
        self.before = provider.http.stats.as_dict()
        self.restore = count_from_answers(provider)
        return provider

    def prepare(self, objects: set[str]) -> None:
        """Prepare the CRM for these object types (those not asked for yet)."""
        for obj in sorted(objects - set(self.gates)):
            self.gates[obj] = self.pool.submit(self._prepare, obj)

    def _prepare(self, obj: str) -> None:
        self.provider_future.result().prepare_objects([obj])

    def provider(self) -> Provider:
        return self.provider_future.result()

    def close(self) -> None:
        # Started requests finish (they are short); nothing not yet started is begun.
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.restore()


class Prefetch:
    """The first round's CRM lookups, sent while the rest of the input is still being queued.

    A push's lookups are read-only and depend on no write, but delivery starts them only after the
    whole input is queued, claimed and split into lanes, leaving the CRM's search slots idle
    meanwhile. Here each queued part's keys are looked up in input order, in the batches ``lookup``
    would send, as soon as the provider is made; delivery's lookups take the answers from ``found``
    and look up only what is not there. Nothing is trusted beyond what a lane's own lookup would
    be: keys are checked against the mirror and the links again when an answer is taken, and a
    failed or cancelled prefetch only means the lane looks the keys up itself.
    """

    def __init__(
        self,
        app: App,
        conn: CrmConnection,
        mapping: Mapping,
        provider: Future[Provider],
        *,
        settings: PushSettings = DEFAULT,
    ) -> None:
        self.app, self.conn, self.mapping, self._provider = app, conn, mapping, provider
        self.in_flight = settings.prefetch_in_flight
        # One dispatcher keeps the input's order; the lookups go side by side behind it.
        self.dispatch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.pool: ThreadPoolExecutor | None = None
        #: object -> key -> the answer of the batch that holds the key ({key: record} found).
        self.found: dict[str, Prefetched] = {obj: {} for obj in ENTITY_STEPS}
        self._seen: set[tuple[str, str]] = set()
        self._waiting: dict[tuple[str, str], list[str]] = {}  # (object, kind) -> keys of a part-filled batch

    def add(self, canons: list[dict[str, dict[str, Any]]]) -> None:
        """Look up these outcomes' records (called from ``enqueue`` after each queued part)."""
        self.dispatch.submit(self._add, canons)

    def flush(self) -> None:
        """Send the part-filled batches; return once every key taken is in ``found``."""
        with contextlib.suppress(Exception):  # a failed prefetch is only a lookup not made ahead
            self.dispatch.submit(self._send_waiting).result()

    def _add(self, canons: list[dict[str, dict[str, Any]]]) -> None:
        provider = self._provider.result()
        for obj in ENTITY_STEPS:
            if obj in provider.optimistic_creates:
                continue  # created blind: its few lookups (linked keys) are left to the lanes
            keys = self._new_keys(obj, canons)
            if not keys:
                continue
            for k in to_look_up(self.app, self.conn, provider, obj, keys):
                kind = k.split(":", 1)[0]
                waiting = self._waiting.setdefault((obj, kind), [])
                waiting.append(k)
                if len(waiting) >= provider.lookup_batch(obj, kind):
                    self._send(provider, obj, self._waiting.pop((obj, kind)))

    def _new_keys(self, obj: str, canons: list[dict[str, dict[str, Any]]]) -> list[str]:
        keys = []
        for canon in canons:
            if obj in canon and (k := entity_key(obj, canon)) and (obj, k) not in self._seen:
                self._seen.add((obj, k))
                keys.append(k)
        return keys

    def _send_waiting(self) -> None:
        provider = self._provider.result()
        for (obj, _), keys in self._waiting.items():
            self._send(provider, obj, keys)
        self._waiting.clear()

    def _send(self, provider: Provider, obj: str, keys: list[str]) -> None:
        if self.pool is None:
            # A few in flight keep a rate-limited search busy; more threads would only wait for its turns.
            workers = min(provider.http.concurrency, self.in_flight)
            self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch-lookup")
        batch = [dict([k.split(":", 1)]) for k in keys]
        fields = self.mapping.provider_fields(obj)
        answer = self.pool.submit(provider.lookup, obj, batch, fields=fields)
        for k in keys:
            self.found[obj][k] = answer

    def close(self) -> None:
        self.dispatch.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
