"""Prometheus metrics: one registry per process, exported in the node_exporter textfile format.

Commands that touch a CRM count into this registry; ``--metrics-file`` (or ``metrics_file:``)
writes it atomically at the end of the run (prometheus_client writes a temp file and renames it),
so a textfile collector never reads half a file. ``crmsync metrics`` prints the same registry
class, so both outputs carry the same families: the store's gauges (``set_store_state``) in both,
the per-run counters with the values of the run that counted them.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    write_to_textfile,
)

# `*_created` timestamps would make each counter a second family that only the run that counted it has.
disable_created_metrics()

_ID_SEGMENT = re.compile(r"/(?:\d{2,}|[0-9a-f]{8}-[0-9a-f-]{27,})(?=/|$)")


def endpoint_template(path: str) -> str:
    """Collapse ids in a path so metrics labels stay few: /crm/v3/objects/contacts/123 -> …/{id}."""
    return _ID_SEGMENT.sub("/{id}", path.split("?")[0])


class Metrics:
    """The metric families crmsync exports (names are part of the documented interface)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "crm_requests", "HTTP requests sent to a CRM", ["provider", "connection", "endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "crm_request_duration_seconds", "CRM request latency", ["provider", "connection"], registry=r
        )
        self.errors = Counter("crm_errors", "Errors by kind", ["provider", "connection", "kind"], registry=r)
        self.sync_seconds = Histogram(
            "crm_sync_duration_seconds",
            "Duration of pull/push/backfill runs",
            ["provider", "connection", "command"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf")),
            registry=r,
        )
        self.records = Counter("crm_records", "Records handled", ["connection", "object", "action"], registry=r)
        self.outbox = Gauge("crm_outbox_items", "Outbox items by state", ["connection", "state"], registry=r)
        self.last_success = Gauge(
            "crm_last_success_timestamp_seconds", "When a command last succeeded", ["connection", "command"], registry=r
        )
        self.webhook_events = Counter(
            "crm_webhook_events", "Webhook events by result", ["provider", "connection", "result"], registry=r
        )
        self.records_stored = Gauge(
            "crm_records_stored", "Records in the local store", ["connection", "object", "archived"], registry=r
        )
        self.webhook_pending = Gauge(
            "crm_webhook_events_pending", "Webhook events not yet applied", ["connection"], registry=r
        )
        self.conflicts_open = Gauge("crm_conflicts_open", "Field conflicts kept open", ["connection"], registry=r)
        usage_labels = ["connection", "unit", "window", "scope"]
        self.api_used = Gauge(
            "crm_api_usage_used",
            "API allowance used (scope run: spent by crmsync today, as counted by it)",
            usage_labels,
            registry=r,
        )
        self.api_limit = Gauge("crm_api_usage_limit", "API allowance per window", usage_labels, registry=r)
        self.api_remaining = Gauge(
            "crm_api_usage_remaining", "API allowance left in the window", usage_labels, registry=r
        )
        self._lock = threading.Lock()

    def observe_request(self, provider: str, connection: str, endpoint: str, status: int, seconds: float) -> None:
        """HttpClient's observer: one call per request sent."""
        self.requests.labels(provider, connection, endpoint_template(endpoint), str(status)).inc()
        self.request_seconds.labels(provider, connection).observe(seconds)
        if status == 429:
            self.errors.labels(provider, connection, "rate_limited").inc()
        elif status == 0 or status >= 500:
            self.errors.labels(provider, connection, "unavailable").inc()

    def count_records(self, connection: str, obj: str, counts: dict[str, Any]) -> None:
        for action, n in counts.items():
            if isinstance(n, int) and n:
                self.records.labels(connection, obj, action).inc(n)

    def set_store_state(self, status: dict[str, Any], last_success: dict[tuple[str, str], float]) -> None:
        """Set the gauges that describe the store from a status document (``sync.status.gather``) and
        the finish times of each (connection, command)'s last successful run."""
        for c in status["connections"]:
            name = c["name"]
            for state in ("pending", "done", "failed", "conflict"):
                self.outbox.labels(name, state).set(c["outbox"][state])
            for obj, o in c["objects"].items():
                self.records_stored.labels(name, obj, "false").set(o["stored"] - o["archived"])
                self.records_stored.labels(name, obj, "true").set(o["archived"])
            self.webhook_pending.labels(name).set(c["webhook"]["pending"])
            self.conflicts_open.labels(name).set(c["conflicts_open"])
            self._set_usage(name, c.get("api_usage"))
        for (name, command), at in last_success.items():
            self.last_success.labels(name, command).set(at)

    def _set_usage(self, name: str, usage: dict[str, Any] | None) -> None:
        """The last recorded API usage (``sync.status``'s ``api_usage``); a figure the CRM did not give is left out."""
        if not usage:
            return
        labels = (name, str(usage.get("unit")), str(usage.get("window")), str(usage.get("scope")))
        daily_count = usage.get("scope") == "run" and "used_today" in usage
        used = usage.get("used_today") if daily_count else usage.get("used")
        remaining = usage.get("remaining_today") if daily_count else usage.get("remaining")
        for gauge, value in (
            (self.api_used, used),
            (self.api_limit, usage.get("limit")),
            (self.api_remaining, remaining),
        ):
            if isinstance(value, int | float):
                gauge.labels(*labels).set(value)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def write(self, path: Path) -> None:
        """Write the textfile atomically (temp file + rename, done by prometheus_client)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)
