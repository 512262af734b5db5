"""Partitioned reads: K disjoint key-space partitions read side by side, their pages interleaved.

A provider splits a large pull into partitions (disjoint id ranges, say) and hands each one's page
iterator to :func:`interleave`. Every page reaches the caller carrying one composite cursor that
holds each partition's position *as of the pages yielded so far*: a partition's position moves
only with a page of its own that the caller has received. The engine stores a page and its cursor
in one transaction, so a kill resumes every partition where its last stored page left it, and no
record is read into the store twice (the partitions are disjoint).

The composite cursor is ``{"parts": {key: {"at": <partition cursor>, "done": bool}}, **extra}``;
the engine treats it as opaque, the provider reads it back with :func:`parse`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import replace
from typing import Any

from crmsync.providers.base import Page

__all__ = ["PartitionFn", "compose", "interleave", "parse"]

#: Reads one partition from its own cursor (None: from its start), yielding pages whose
#: ``cursor`` is that partition's position after the page (None keeps the previous one).
PartitionFn = Callable[[Any], Iterable[Page]]

_POLL = 0.05  # seconds a blocked worker waits before it looks at the stop flag again


def parse(cursor: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each partition's ``{"at", "done"}`` from a composite cursor (empty for None or another shape)."""
    parts = (cursor or {}).get("parts")
    if not isinstance(parts, Mapping):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, state in parts.items():
        if isinstance(state, Mapping):
            out[str(key)] = {"at": state.get("at"), "done": bool(state.get("done"))}
    return out


def compose(parts: Mapping[str, Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
    """The composite cursor for these partition states (copied, so later changes do not leak in)."""
    return {"parts": {k: {"at": v.get("at"), "done": bool(v.get("done"))} for k, v in parts.items()}, **extra}


def interleave(
    partitions: Mapping[str, PartitionFn],
    cursor: Mapping[str, Any] | None = None,
    *,
    depth: int = 4,
    name: str = "partition",
    extra: Mapping[str, Any] | None = None,
) -> Generator[Page, None, None]:
    """Pages of every partition as they arrive, each with the composite cursor as of that page.

    One thread per unfinished partition; at most ``depth`` pages wait in a shared bounded queue, so
    memory stays flat however far one partition could run ahead. A partition that ends yields an
    empty page marking it done. The first error raised by a partition stops the others and is
    raised here; a caller that stops early (closes this generator) stops every partition at its
    next page. Partitions not named in ``cursor`` start from their beginning; ones marked done are
    not read again.
    """
    state: dict[str, dict[str, Any]] = {k: {"at": None, "done": False} for k in partitions}
    for key, saved in parse(cursor).items():
        if key in state:
            state[key] = saved
    extra = dict(extra or {})
    todo = [k for k in partitions if not state[k]["done"]]
    if not todo:
        return
    box: queue.Queue[tuple[str, str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: tuple[str, str, Any]) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def work(key: str, start: Any) -> None:
        pages: Iterable[Page] | None = None
        try:
            pages = partitions[key](start)
            for page in pages:
                if stop.is_set() or not put(("page", key, page)):
                    return
            put(("done", key, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", key, exc))
        finally:
            close = getattr(pages, "close", None)
            if close is not None:  # the partition's own clean-up runs in its thread, now
                with contextlib.suppress(Exception):
                    close()

    threads = [threading.Thread(target=work, args=(k, state[k]["at"]), name=f"{name}-{k}", daemon=True) for k in todo]
    for t in threads:
        t.start()
    running = len(threads)
    try:
        while running:
            kind, key, item = box.get()
            if kind == "error":
                raise item
            if kind == "done":
                running -= 1
                state[key] = {"at": state[key]["at"], "done": True}
                yield Page(records=[], cursor=compose(state, **extra))
                continue
            page: Page = item
            if page.cursor is not None:
                state[key] = {"at": page.cursor, "done": False}
            yield replace(page, cursor=compose(state, **extra))
    finally:
        stop.set()
        for t in threads:
            while t.is_alive():  # unblock a worker waiting on a full queue, then let it finish
                with contextlib.suppress(queue.Empty):
                    box.get_nowait()
                t.join(timeout=_POLL)
