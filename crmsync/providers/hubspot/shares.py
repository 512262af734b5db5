"""How the objects of one pull share the search budget: first to the searches costing the fewest association reads.

Each large object's pull walks its list upwards and searches downwards until they meet
(``partitioned``). A search page brings 200 changes whatever the object, but search results carry no
associations: each 1,000 searched ids cost one general request per association type the object
pulls (companies none, contacts one, deals two), and the general budget is what the list walks
live on. A list page carries its associations inline. So while a cheaper object's search side runs,
a dearer object's search side waits and its list side reads on; the search budget is used all the
same (one keyset chain keeps it busy at HubSpot's round trip), and the general budget goes to list
pages instead of association reads. A search side whose own list side has stopped never waits: it
is then all that is left to read its object.
"""

from __future__ import annotations

import threading

from crmsync.providers.hubspot.values import PULL_ASSOCIATIONS


def _cost(obj: str) -> int:
    """General requests per 1,000 searched ids of ``obj`` (its association types)."""
    return len(PULL_ASSOCIATIONS.get(obj, []))


class Shares:
    """The list and search sides of the partitioned walks running in one provider (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listing: dict[str, int] = {}
        self._searching: dict[str, int] = {}

    def start(self, obj: str, side: str) -> None:
        with self._lock:
            sides = self._listing if side == "list" else self._searching
            sides[obj] = sides.get(obj, 0) + 1

    def stop(self, obj: str, side: str) -> None:
        with self._lock:
            sides = self._listing if side == "list" else self._searching
            sides[obj] = sides.get(obj, 0) - 1
            if sides[obj] <= 0:
                del sides[obj]

    def hold_search(self, obj: str) -> bool:
        """Whether ``obj``'s search side waits: its list reads on, and a cheaper object's search runs."""
        with self._lock:
            if obj not in self._listing:
                return False
            mine = _cost(obj)
            return any(_cost(o) < mine for o in self._searching if o != obj)
