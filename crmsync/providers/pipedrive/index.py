"""Persons found by email or phone from the person list, read as the push goes, instead of one search per key.

An exact person search costs 20 tokens and waits its turn in a bucket of 10 per 2 seconds; a list page
costs 10 tokens for 500 persons under the general burst (40 per 2 s on Growth). So a push into a
company whose persons fit in a few pages per outcome is cheaper and faster reading them all. The read
is paid as it goes: every key asked for allows ``PAGES_PER_KEY`` more pages, and until the list has
been read to its end a key it has not shown yet is searched for as before. A company too big for the
push therefore costs at most ``PAGES_PER_KEY`` list pages per key on top of the searches.

Once read, the index is brought up to date before every answer with one list of the persons updated
since the last read began (10 tokens a lookup batch), so a person created meanwhile is found: by
someone else, or by this push's own create whose answer was lost (the engine looks it up before it
may send the create again). A person deleted meanwhile may still be matched, as a search racing
the delete could have matched it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from crmsync.providers.pipedrive import records as rec

#: List pages one key asked for may pay for (a page costs half a search; 0.25 page = 2.5 tokens).
PAGES_PER_KEY = 0.25
#: The catch-up read starts this long before the last read began (whole-second timestamps).
OVERLAP = timedelta(seconds=2)
KINDS = ("email", "phone")

Walk = Callable[[dict[str, Any]], Iterator[tuple[list[dict[str, Any]], str | None]]]


def _values(person: dict[str, Any], kind: str) -> Iterable[str]:
    for item in person.get("emails" if kind == "email" else "phones") or []:
        value = item.get("value") if isinstance(item, dict) else item
        if value:
            yield str(value).strip().lower()


class PersonIndex:
    """email/phone -> the oldest live person's id, filled from ``/api/v2/persons`` pages."""

    def __init__(self, walk: Walk) -> None:
        self._walk = walk
        self._ids: dict[tuple[str, str], int] = {}
        self._pages: Iterator[tuple[list[dict[str, Any]], str | None]] | None = None
        self._read_from: datetime | None = None  # when the current read began (wall clock)
        self._allowance = 0.0
        self.complete = False
        self.broken = False
        self.pages = 0
        self._lock = threading.Lock()

    def _add(self, rows: Iterable[dict[str, Any]]) -> None:
        for person in rows:
            if person.get("is_deleted") or person.get("id") is None:
                continue
            pid = int(person["id"])
            for kind in KINDS:
                for value in _values(person, kind):
                    held = self._ids.get((kind, value))
                    self._ids[(kind, value)] = pid if held is None else min(held, pid)

    def _read(self) -> None:
        """Pages while the allowance lasts; the catch-up read once the list has been read to its end."""
        if self._pages is None:
            self._read_from = datetime.now(UTC).replace(microsecond=0)
            self._pages = self._walk({"sort_by": "id"})
        if self.complete and self._read_from is not None:
            since, began = self._read_from - OVERLAP, datetime.now(UTC).replace(microsecond=0)
            for rows, _ in self._walk({"updated_since": rec.rfc3339(since), "sort_by": "update_time"}):
                self.pages += 1
                self._add(rows)
            self._read_from = began  # only once read whole: a failed read is read again next time
            return
        while not self.complete and not self.broken and self._allowance >= 1:
            self._allowance -= 1
            try:
                rows, more = next(self._pages)
            except StopIteration:
                more, rows = None, []
            except Exception:
                # A page that failed ends the walk: from here on every key is searched for.
                self.broken = True
                raise
            self.pages += 1
            self._add(rows)
            self.complete = more is None

    def find(self, kind: str, values: Sequence[str]) -> tuple[dict[str, str], list[str]]:
        """(value -> person id, for those the list shows) and the values that still need a search."""
        with self._lock:
            self._allowance += len(values) * PAGES_PER_KEY
            self._read()
            found: dict[str, str] = {}
            rest: list[str] = []
            for value in values:
                pid = self._ids.get((kind, value.strip().lower()))
                if pid is not None:
                    found[value] = str(pid)
                elif not self.complete:
                    rest.append(value)
            return found, rest
