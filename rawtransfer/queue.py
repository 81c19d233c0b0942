"""A de-duplicating, pausable, delay-aware work queue of source paths. No I/O.

* A path is pending at most once; putting it again only makes it due sooner when the new
  put says the file was closed after writing (or moved in).
* A path put while a worker holds it is remembered and handed out again when the worker
  is done with it, so an event during processing is never lost.
* ``pause()`` stops hand-outs between files (workers finish what they hold);
  ``resume()`` restarts them.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Item:
    path: Path
    closed: bool = False
    attempt: int = 0


class WorkQueue:
    def __init__(self) -> None:
        self._clock = time.monotonic
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Path]] = []
        self._pending: dict[Path, Item] = {}
        self._due: dict[Path, float] = {}
        self._inflight: set[Path] = set()
        self._again: dict[Path, tuple[Item, float]] = {}  # item, due time
        self._seq = itertools.count()
        self._since: dict[Path, float] = {}  # when each unfinished path was first queued
        self._paused = False
        self._closed = False

    # producers -------------------------------------------------------------------
    def put(
        self, path: Path, *, closed: bool = False, delay: float = 0.0, attempt: int = 0
    ) -> bool:
        """Queue ``path`` (due after ``delay`` seconds). False if it was already queued."""
        with self._cond:
            item = Item(path, closed, attempt)
            if path in self._inflight:
                # remembered with its due time: a worker deferring its own file must not
                # get it back the moment it lets go of it
                due = self._clock() + max(delay, 0.0)
                again = self._again.get(path)
                if again is not None:
                    closed = closed or again[0].closed
                    due = min(due, again[1])
                self._again[path] = (Item(path, closed, attempt), due)
                return False
            self._since.setdefault(path, self._clock())
            due = self._clock() + max(delay, 0.0)
            if path in self._pending:
                prev = self._pending[path]
                # only a close-after-write makes a pending file due sooner: a stream of
                # modify events from a slow writer must not spin a worker on it
                if not (closed and not prev.closed):
                    return False
                self._pending[path] = Item(path, True, prev.attempt)
                due = self._clock()
            else:
                self._pending[path] = item
            self._due[path] = due
            heapq.heappush(self._heap, (due, next(self._seq), path))
            self._cond.notify()
            return True

    # consumers -------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Item | None:
        """The next due item, or None when closed and empty, or on timeout."""
        end = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._closed and not self._pending and not self._inflight:
                    return None
                wait = None if end is None else end - self._clock()
                if not self._paused:
                    item = self._pop_due()
                    if item is not None:
                        return item
                    if self._heap:
                        next_due = self._heap[0][0] - self._clock()
                        wait = next_due if wait is None else min(wait, next_due)
                if wait is not None and wait <= 0:
                    return None
                self._cond.wait(wait)

    def _pop_due(self) -> Item | None:
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            due, _, path = heapq.heappop(self._heap)
            if self._due.get(path) != due:  # superseded by an earlier due time
                continue
            item = self._pending.pop(path)
            del self._due[path]
            self._inflight.add(path)
            return item
        return None

    def done(self, item: Item) -> None:
        """The worker is finished with ``item``; re-queue it if it was put meanwhile."""
        with self._cond:
            self._inflight.discard(item.path)
            again = self._again.pop(item.path, None)
            if again is None and item.path not in self._pending:
                self._since.pop(item.path, None)
            self._cond.notify_all()
        if again is not None:
            item_again, due = again
            self.put(
                item_again.path,
                closed=item_again.closed,
                delay=due - self._clock(),
                attempt=item_again.attempt,
            )

    # control ---------------------------------------------------------------------
    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """No more puts are expected: ``get`` returns None once everything is done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def pending(self) -> list[Path]:
        with self._cond:
            return list(self._pending)

    def depth(self) -> tuple[int, int]:
        """(pending, in flight)"""
        with self._cond:
            return len(self._pending), len(self._inflight)

    def oldest(self) -> tuple[Path, float] | None:
        """The unfinished path queued longest ago, and how many seconds ago."""
        with self._cond:
            if not self._since:
                return None
            path, since = min(self._since.items(), key=lambda kv: kv[1])
            return path, self._clock() - since

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._inflight
