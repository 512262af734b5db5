"""What an operator and a monitoring system see: status, health problems, metrics from the store.

``gather`` returns one JSON-ready document per connection; its keys are a documented interface
(README "status --json"), so add keys rather than rename them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from crmsync.model import utcnow
from crmsync.providers import usage as api_usage
from crmsync.store import CrmSyncLog

if TYPE_CHECKING:
    from crmsync.app import App
    from crmsync.metrics import Metrics
    from crmsync.store import CrmConnection


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="seconds")


def _age(value: datetime | None, now: datetime) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return round((now - value).total_seconds(), 1)


def _token_expiry(app: App, conn: CrmConnection) -> str | None:
    """Only the expiry time is read from the secret; nothing else of it leaves this function."""
    try:
        secret = app.secrets.get(conn.name) or {}
    except Exception:
        return None
    exp = secret.get("expires_at")
    return datetime.fromtimestamp(float(exp), tz=UTC).isoformat(timespec="seconds") if exp else None


def _secret_location(app: App, conn: CrmConnection) -> dict[str, str | None]:
    """Where the secret lives (keyring, file and its path, environment and its variable), never the secret."""
    try:
        where = app.secrets.locate(conn.name).as_dict()
    except Exception as exc:  # an unreadable keyring must not take status down
        return {"storage": "unknown", "where": type(exc).__name__}
    if where["storage"] == "none" and conn.settings.get("secret_storage"):
        where["storage"] = f"missing (was {conn.settings['secret_storage']})"
    return where


def connection_status(app: App, conn: CrmConnection, *, now: datetime | None = None) -> dict[str, Any]:
    """The status document of one connection."""
    now = now or utcnow()
    store = app.store
    counts = store.mirror.count_records(conn.name)
    cursors = {c.object: c for c in store.mirror.cursors(conn.name) if c.kind == "incremental"}
    runs = store.runs.recent(conn.name, limit=200)
    last_pull: dict[str, datetime] = {}
    last_reconcile: dict[str, datetime] = {}
    last_run_by_cmd: dict[str, CrmSyncLog] = {}
    for run in runs:
        last_run_by_cmd.setdefault(run.command, run)
        if run.command in ("pull", "backfill") and run.status in ("ok", "partial") and run.finished_at:
            for obj, c in (run.counts or {}).items():
                if obj.startswith("_") or not isinstance(c, dict) or c.get("error"):
                    continue
                last_pull.setdefault(obj, run.finished_at)
                if c.get("reconciled") is not None:  # None: this pull did not reconcile by ids
                    last_reconcile.setdefault(obj, run.finished_at)
    objects: dict[str, Any] = {}
    for obj in sorted(set(counts) | set(cursors) | set(last_pull)):
        cur = cursors.get(obj)
        objects[obj] = {
            "stored": counts.get(obj, {}).get("stored", 0),
            "archived": counts.get(obj, {}).get("archived", 0),
            "last_pull_at": _iso(last_pull.get(obj)),
            "last_pull_age_seconds": _age(last_pull.get(obj), now),
            "cursor": cur.value if cur else None,
            "last_reconcile_at": _iso(last_reconcile.get(obj)),
            "last_reconcile_age_seconds": _age(last_reconcile.get(obj), now),
        }
    start_of_day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    outbox = store.overview.outbox(conn.name, since=start_of_day)
    backlog = store.overview.webhook_backlog(conn.name)
    last = runs[0] if runs else None
    usage = None
    for run in runs:
        if run.command in ("pull", "push", "backfill") and run.finished_at:
            usage = {
                "command": run.command,
                "requests": run.requests,
                "retries": run.retries,
                "rate_limited": run.rate_limited,
                "finished_at": _iso(run.finished_at),
            }
            quota = (run.counts or {}).get("_quota")
            if quota:
                usage["quota"] = quota
            break
    return {
        "name": conn.name,
        "provider": conn.provider,
        "account": conn.account_id,
        "base_url": conn.base_url,
        "auth": {
            "state": conn.auth_state,
            "token_expires_at": _token_expiry(app, conn),
            "secret": _secret_location(app, conn),
            "last_ok_at": _iso(conn.last_ok_at),
            "last_checked_at": _iso(conn.last_checked_at),
        },
        "objects": objects,
        "outbox": {
            "pending": outbox.states.get("pending", 0),
            "failed": outbox.states.get("failed", 0),
            "done": outbox.states.get("done", 0),
            "conflict": outbox.states.get("conflict", 0),
            "delivered_today": outbox.delivered_since,
            "top_error": outbox.errors.most_common(1)[0][0] if outbox.errors else None,
            "oldest_failed_at": _iso(outbox.oldest_failed),
        },
        "webhook": {
            "pending": backlog.pending,
            "oldest_pending_age_seconds": _age(backlog.oldest_received, now),
        },
        "conflicts_open": store.overview.open_conflicts(conn.name),
        "last_run": {
            "command": last.command,
            "status": last.status,
            "started_at": _iso(last.started_at),
            "finished_at": _iso(last.finished_at),
            "error": last.error,
        }
        if last
        else None,
        "rate_limit": usage,
        "api_usage": api_usage.latest(runs, now),
    }


def gather(app: App, connections: list[str] | None = None) -> dict[str, Any]:
    """The status document: ``{"generated_at", "connections": [...]}``."""
    conns = app.connections(connections)
    app.store.check_writable()  # a locked or full store is what the next pull would meet: say so
    app.store.runs.abandon_dead()  # a run whose process died shows as abandoned, not running forever
    now = utcnow()
    return {"generated_at": _iso(now), "connections": [connection_status(app, c, now=now) for c in conns]}


@dataclass
class Problem:
    connection: str
    kind: str  # stale | failed_run | failed_outbox | auth | webhook_backlog | unreachable
    message: str

    @property
    def auth(self) -> bool:
        return self.kind == "auth"


def check(app: App, doc: dict[str, Any], *, max_age: timedelta, live: bool = False) -> list[Problem]:
    """Health problems, one per line for a monitoring probe."""
    problems: list[Problem] = []
    # A live check answers for the credentials as they are now, so it overrides a stored auth state.
    live_problems, live_ok = _live_check(app, doc) if live else ([], set())
    webhook_age = app.config.webhook.max_pending_minutes * 60
    for c in doc["connections"]:
        name = c["name"]
        if c["auth"]["state"] != "ok" and name not in live_ok:
            problems.append(
                Problem(name, "auth", f"{name}: credentials {c['auth']['state']}; run `crmsync connect` again")
            )
        exp = c["auth"].get("token_expires_at")
        secret_known = exp is not None
        if secret_known and datetime.fromisoformat(exp) < utcnow() - timedelta(days=1):
            # An OAuth access token is refreshed on use; one stale for a day means refresh failed.
            problems.append(Problem(name, "auth", f"{name}: access token expired at {exp} and was not refreshed"))
        for obj, o in c["objects"].items():
            age = o["last_pull_age_seconds"]
            if age is None:
                problems.append(Problem(name, "stale", f"{name}: {obj} never pulled successfully"))
            elif age > max_age.total_seconds():
                problems.append(
                    Problem(
                        name,
                        "stale",
                        f"{name}: {obj} last pulled {int(age)}s ago (max {int(max_age.total_seconds())}s)",
                    )
                )
        if not c["objects"]:
            problems.append(Problem(name, "stale", f"{name}: never pulled successfully"))
        problems += _failed_runs(app, name)
        if c["outbox"]["failed"]:
            problems.append(
                Problem(
                    name,
                    "failed_outbox",
                    f"{name}: {c['outbox']['failed']} outbox item(s) failed "
                    f"(most common: {c['outbox']['top_error']}); see `crmsync push --retry-failed`",
                )
            )
        pend_age = c["webhook"]["oldest_pending_age_seconds"]
        if pend_age is not None and pend_age > webhook_age:
            problems.append(
                Problem(
                    name,
                    "webhook_backlog",
                    f"{name}: {c['webhook']['pending']} webhook event(s) pending, oldest {int(pend_age)}s",
                )
            )
    return problems + live_problems


def _live_check(app: App, doc: dict[str, Any]) -> tuple[list[Problem], set[str]]:
    """Each CRM's own check: the problems found and the connections whose credentials work now."""
    from crmsync.errors import AuthError, CrmsyncError

    problems: list[Problem] = []
    ok: set[str] = set()
    for conn in app.connections([c["name"] for c in doc["connections"]]):
        try:
            health = app.provider(conn).check()
            app.store.connections.touch(conn.name, ok=health.ok, auth_state="ok" if health.ok else None)
            ok.add(conn.name)
            if health.missing_scopes:
                problems.append(
                    Problem(conn.name, "auth", f"{conn.name}: missing scopes {', '.join(health.missing_scopes)}")
                )
        except AuthError as exc:
            app.store.connections.touch(conn.name, ok=False, auth_state="invalid")
            problems.append(Problem(conn.name, "auth", f"{conn.name}: {exc}"))
        except CrmsyncError as exc:
            problems.append(Problem(conn.name, "unreachable", f"{conn.name}: {exc}"))
    return problems, ok


def _failed_runs(app: App, name: str) -> list[Problem]:
    """The last finished pull and push of a connection, each a problem if it failed (a pull also if
    some object failed): cron's next run may fix it, but until then the data is not flowing."""
    last: dict[str, CrmSyncLog] = {}
    for run in app.store.runs.recent(name, limit=200):
        if run.command in ("pull", "push") and run.finished_at is not None:
            last.setdefault(run.command, run)
    problems = []
    for command, run in last.items():
        if run.status == "failed" or (command == "pull" and run.status == "partial"):
            counts = run.counts or {}
            errors = [str(c["error"]) for c in counts.values() if isinstance(c, dict) and c.get("error")]
            why = run.error or "; ".join(errors) or run.status
            when = _iso(run.finished_at)
            problems.append(Problem(name, "failed_run", f"{name}: the last {command} ({when}) failed: {why}"[:300]))
    return problems


def store_metrics(app: App, metrics: Metrics | None = None) -> Metrics:
    """The store's current state set into ``metrics`` (a new registry by default), for both exports."""
    from crmsync.metrics import Metrics

    out = metrics or Metrics()
    doc = gather(app)
    last: dict[tuple[str, str], float] = {}
    for c in doc["connections"]:
        for cmd in ("pull", "push", "backfill"):
            run = app.store.runs.last(c["name"], cmd)
            if run and run.finished_at:
                ts = run.finished_at if run.finished_at.tzinfo else run.finished_at.replace(tzinfo=UTC)
                last[(c["name"], cmd)] = ts.timestamp()
    out.set_store_state(doc, last)
    return out
