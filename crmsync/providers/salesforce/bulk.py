"""Bulk API 2.0 query jobs for big backfills: one job, results read page by page, resumable.

A job is created once; its id and the ``Sforce-Locator`` of the next page are the checkpoint each
stored page carries, so a run killed mid-way asks for the same page again instead of a new job.
Pages are parsed one at a time (``maxRecords``), so memory stays flat however big the backfill.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterator
from typing import Any

from crmsync.errors import FatalProviderError, RetriableError

#: Rows per results page: small enough to parse in memory, big enough to keep requests few.
PAGE_ROWS = 10_000
POLL_SECONDS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
TERMINAL = {"JobComplete", "Failed", "Aborted"}

Request = Callable[..., Any]  # (method, path, **kwargs) -> httpx.Response


def create_job(request: Request, soql: str) -> str:
    body = {"operation": "query", "query": soql, "contentType": "CSV", "columnDelimiter": "COMMA", "lineEnding": "LF"}
    doc = request("POST", "/jobs/query", json=body).json()
    return str(doc["id"])


def wait_for(
    request: Request, job_id: str, *, deadline: float = 3600.0, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Poll the job until it is complete; Failed or Aborted is a FatalProviderError naming why."""
    started = time.monotonic()
    for n in range(1_000_000):
        doc = request("GET", f"/jobs/query/{job_id}", endpoint="/jobs/query/{id}").json()
        state = doc.get("state")
        if state == "JobComplete":
            return
        if state in TERMINAL:
            raise FatalProviderError(
                f"Salesforce Bulk query job {job_id} ended {state}: {doc.get('errorMessage') or ''}"
            )
        if time.monotonic() - started > deadline:
            raise RetriableError(f"Salesforce Bulk query job {job_id} is still {state}; the next run resumes it")
        sleep(POLL_SECONDS[min(n, len(POLL_SECONDS) - 1)])


def pages(request: Request, job_id: str, locator: str | None) -> Iterator[tuple[list[dict[str, Any]], str | None]]:
    """``(rows, next locator)`` from ``locator`` on (None: the first page); the last page's is None."""
    while True:
        params: dict[str, Any] = {"maxRecords": PAGE_ROWS}
        if locator:
            params["locator"] = locator
        response = request("GET", f"/jobs/query/{job_id}/results", params=params, endpoint="/jobs/query/{id}/results")
        nxt = response.headers.get("sforce-locator")
        nxt = None if not nxt or nxt == "null" else nxt
        rows = list(csv.DictReader(io.StringIO(response.text)))
        yield rows, nxt
        if nxt is None:
            return
        locator = nxt
