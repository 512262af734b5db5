"""Dramatiq actors: the CLI's pull, push and backfill as jobs that workers on many hosts run.

Start workers with ``crmsync worker`` (or ``dramatiq crmsync.worker``); queue jobs with
``crmsync enqueue pull|push|backfill``. Each job builds its own ``App`` from the environment
(``CRMSYNC_DB``, ``CRMSYNC_CONFIG``/``CRMSYNC_HOME``, ``CRMSYNC_REDIS_URL``, and the secrets'
``CRMSYNC_SECRET_<NAME>`` / ``CRMSYNC_SECRET_FILE_<NAME>`` when there is no keyring) and calls the
same library function as the command line, so a job and a CLI run write the same run log.

The broker is Redis at ``CRMSYNC_REDIS_URL``, else the config file's ``redis_url``, else
``redis://127.0.0.1:6379/0``; it is chosen when this module is imported, as Dramatiq requires.

A job is acknowledged only after it ran (Dramatiq's default: a fetched message stays in its
worker's unacknowledged set until then). When a worker process dies, its unacknowledged jobs go
back on the queue once it has missed ``HEARTBEAT_TIMEOUT_MS`` of heartbeats: ``Heartbeat`` beats
for every live worker process and gives the broker's requeue of dead workers' jobs a chance on a
clock, so a killed worker's job runs again on another within seconds, without a new ``enqueue``.
Its outbox claims are taken over at once (their run's advisory lock died with it) and its run is
marked ``abandoned`` by the next run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

try:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("crmsync workers need the worker extra: pip install 'crmsync[worker]'") from exc

from crmsync.app import App
from crmsync.errors import AuthError, ConfigError, CrmsyncError, ExitCode, LockHeldError, StoreError, UsageError
from crmsync.sync.pull import ConnectionResult
from crmsync.sync.push import PushSummary
from crmsync.sync.run import Outcome

log = logging.getLogger("crmsync.worker")

QUEUE = "crmsync"
NAMESPACE = "crmsync"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def broker_url(env: Mapping[str, str] | None = None) -> str:
    """Where the job queue lives: CRMSYNC_REDIS_URL > config ``redis_url`` > local Redis."""
    env = os.environ if env is None else env
    if env.get("CRMSYNC_REDIS_URL"):
        return env["CRMSYNC_REDIS_URL"]
    from crmsync.config import load_config, resolve_paths

    paths = resolve_paths(env=dict(env))
    return load_config(paths.config_file, required=bool(env.get("CRMSYNC_CONFIG"))).redis_url or DEFAULT_REDIS_URL


#: A worker process silent for this long is dead, and its unacknowledged jobs are queued again.
HEARTBEAT_TIMEOUT_MS = 15_000
#: How often each worker process beats (well inside the timeout, so a busy worker is never taken for dead).
HEARTBEAT_SECONDS = 3.0
#: Out of a million broker commands, how many also requeue dead workers' jobs (Dramatiq's default is
#: 1,000, which left a killed worker's job waiting minutes for enough traffic).
MAINTENANCE_CHANCE = 250_000


class Heartbeat(dramatiq.Middleware):
    """Each worker process beats on a clock, and with each beat the broker may requeue dead workers' jobs.

    Dramatiq's Redis broker beats (and requeues) only as a side effect of its commands: a worker
    whose consumers stop fetching while its jobs run would look dead, and requeueing would wait
    for other traffic. One daemon thread per worker process keeps both going.
    """

    def __init__(self, interval: float = HEARTBEAT_SECONDS) -> None:
        self.interval = interval
        self._stop = threading.Event()

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self._stop.clear()
        threading.Thread(target=self._beat, args=(broker,), name="crmsync-heartbeat", daemon=True).start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self._stop.set()

    def _beat(self, broker: Any) -> None:
        while not self._stop.wait(self.interval):
            try:
                broker.do_qsize(QUEUE)  # any broker command beats; this one only reads
            except Exception as exc:  # Redis away for a moment: the consumers report it too
                log.debug("heartbeat failed: %s", exc)


broker = RedisBroker(
    url=broker_url(),
    namespace=NAMESPACE,
    heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
    maintenance_chance=MAINTENANCE_CHANCE,
)
broker.add_middleware(Heartbeat())
dramatiq.set_broker(broker)


class JobFailed(Exception):
    """A job that may succeed later (CRM down, rate-limited past the deadline, lock busy): retried."""


class JobRejected(Exception):
    """A job that cannot succeed until a person acts (credentials, configuration): not retried."""


#: Exceptions that retrying cannot fix: Dramatiq fails the message at once.
NOT_RETRIED = (JobRejected, AuthError, ConfigError, UsageError)


def _settle(what: str, outcome: Outcome, failure: CrmsyncError | None, error: str | None) -> None:
    """Turn how a run ended into the job's fate: done, retried later, or failed for good."""
    if outcome in (Outcome.OK, Outcome.PARTIAL):
        # Per-record failures stay in the outbox and the run log; running the job again won't fix them.
        return
    # Work left queued after temporary errors, a busy connection or an error that may pass: a later try.
    temporary = outcome in (Outcome.RETRY_LATER, Outcome.BUSY) or (
        failure is not None and failure.exit_code == ExitCode.TEMPFAIL
    )
    raise (JobFailed if temporary else JobRejected)(f"{what}: {error}")


def _settle_run(what: str, result: ConnectionResult) -> None:
    """A pull's or backfill's outcome as the job's fate."""
    _settle(what, result.outcome, result.failure, result.error)


@contextlib.contextmanager
def _store_faults(what: str) -> Iterator[None]:
    """A store fault as a job's fate: retried later when it may pass (busy, full, unreachable), else failed."""
    try:
        yield
    except StoreError as exc:
        if exc.exit_code == ExitCode.TEMPFAIL:
            raise JobFailed(f"{what}: {exc}") from exc
        raise JobRejected(f"{what}: {exc}") from exc


def _redacted_logs() -> None:
    """Dramatiq sets up the worker's log handlers: make them redact secrets as the CLI's do."""
    from crmsync.redact import RedactingFilter

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


# -- the library calls (usable without a broker: tests, other schedulers) ------------------------
def pull_delta(connection: str, *, app: App | None = None) -> ConnectionResult | None:
    """One incremental pull of a connection; None when another worker is already pulling it."""
    own = app is None
    _redacted_logs()
    app = app or App()
    try:
        from crmsync.sync.pull import pull

        try:
            result = pull(app, connections=[connection])[0]
        except LockHeldError as exc:
            # The running pull covers this one; the next scheduled pull picks up what follows.
            log.info("pull %s skipped: %s", connection, exc)
            return None
        log.info(
            "pull %s: %s",
            connection,
            ", ".join(f"{o.object} {o.read} read" for o in result.objects) or "nothing to do",
        )
        return result
    finally:
        if own:
            app.close()


def push_outcomes(connection: str, *, app: App | None = None) -> PushSummary | None:
    """Deliver what is queued in the outbox of a connection; None when a push holds its lock (SQLite)."""
    own = app is None
    _redacted_logs()
    app = app or App()
    try:
        from crmsync.sync.push import push

        try:
            summary = push(app, source=None, connection=connection)
        except LockHeldError as exc:
            # Only on SQLite: the running push delivers everything pending, this job's rows too.
            log.info("push %s skipped: %s", connection, exc)
            return None
        log.info(
            "push %s: created %d, updated %d, failed %d, pending %d",
            connection,
            summary.created,
            summary.updated,
            summary.failed,
            summary.pending,
        )
        return summary
    finally:
        if own:
            app.close()


def backfill_object(connection: str, obj: str | None = None, *, app: App | None = None) -> ConnectionResult:
    """Backfill one object (or all) of a connection; raises JobFailed while the connection is busy."""
    own = app is None
    _redacted_logs()
    app = app or App()
    try:
        from crmsync.sync.pull import backfill

        try:
            return backfill(app, connection=connection, objects=[obj] if obj else None)
        except LockHeldError as exc:
            raise JobFailed(f"backfill {connection}: {exc}") from None
    finally:
        if own:
            app.close()


# -- the actors ------------------------------------------------------------------------------------
# Pulls are not retried: the schedule enqueues the next one anyway. Time limits are generous
# because a job stopped by one loses nothing (each page and each outbox step is committed).
@dramatiq.actor(queue_name=QUEUE, max_retries=0, time_limit=30 * 60_000, throws=NOT_RETRIED)
def crm_pull_delta_job(connection: str) -> None:
    """Pull the changes of one connection since its cursor."""
    with _store_faults(f"pull {connection}"):
        result = pull_delta(connection)
    if result is not None:
        _settle_run(f"pull {connection}", result)


@dramatiq.actor(queue_name=QUEUE, max_retries=5, time_limit=60 * 60_000, throws=NOT_RETRIED)
def crm_push_outcomes_job(connection: str) -> None:
    """Deliver the queued outcomes of one connection (several may run at once on PostgreSQL)."""
    with _store_faults(f"push {connection}"):
        summary = push_outcomes(connection)
    if summary is not None:
        _settle(f"push {connection}", summary.outcome, summary.failure, summary.error)


@dramatiq.actor(queue_name=QUEUE, max_retries=20, time_limit=24 * 3600_000, throws=NOT_RETRIED)
def crm_backfill_job(connection: str, object: str | None = None) -> None:
    """Import the history of one object (None: every object) of a connection, resumably."""
    with _store_faults(f"backfill {connection}"):
        result = backfill_object(connection, object)
    _settle_run(f"backfill {connection}", result)


JOBS = {"pull": crm_pull_delta_job, "push": crm_push_outcomes_job, "backfill": crm_backfill_job}
