"""A de-duplicating, pausable, delay-aware work queue of source paths. No I/O.

* A path is pending at most once; putting it again only makes it due sooner when the new
  put says the file was closed after writing (or moved in).
* A path put while a worker holds it is remembered and handed out again when the worker
  is done with it, so an event during processing is never lost.
* ``pause()`` stops hand-outs between files (workers finish what they hold);
  ``resume()`` restarts them.

A backfill after an outage can queue a whole night's files, so a pending path costs as
little as it can (about 300 bytes; 100,000 queued files are ~30 MB): it is kept as its
``str`` (a ``Path`` object with its parsed parts costs three times as much) in one tuple
that is both its heap entry and its record, and a ``Path`` is made again only for the
item handed out.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Item:
    path: Path
    closed: bool = False
    attempt: int = 0


# A pending path: (due, seq, path, closed, attempt, since). The same tuple is in the heap
# (ordered by due time, then by the order of the puts) and in ``_pending``; a heap entry
# that is no longer the one in ``_pending`` was superseded and is skipped when popped.
_Entry = tuple[float, int, str, bool, int, float]


def _key(path: Path | str) -> str:
    """The path as ``str(Path(path))`` spells it: one key per file, whichever was given."""
    if isinstance(path, str):
        plain = "//" not in path and "/./" not in path and not path.startswith("./")
        if not (plain and path and not path.endswith(("/", "/."))):
            return str(Path(path))
    return os.fspath(path)


class WorkQueue:
    def __init__(self) -> None:
        self._clock = time.monotonic
        self._cond = threading.Condition()
        self._heap: list[_Entry] = []
        self._pending: dict[str, _Entry] = {}
        self._inflight: dict[str, float] = {}  # path: when it was first queued
        self._again: dict[str, tuple[bool, int, float]] = {}  # closed, attempt, due time
        self._seq = itertools.count()
        self._paused = False
        self._closed = False

    # producers -------------------------------------------------------------------
    def put(
        self, path: Path | str, *, closed: bool = False, delay: float = 0.0, attempt: int = 0
    ) -> bool:
        """Queue ``path`` (due after ``delay`` seconds). False if it was already queued.
        A ``str`` is taken as it is when ``Path`` would spell it the same (a scan need not
        make a ``Path`` of every file)."""
        key = _key(path)
        with self._cond:
            now = self._clock()
            # one float for both times when the file is due now (most puts)
            due = now + delay if delay > 0 else now
            if key in self._inflight:
                # remembered with its due time: a worker deferring its own file must not
                # get it back the moment it lets go of it
                again = self._again.get(key)
                if again is not None:
                    closed = closed or again[0]
                    due = min(due, again[2])
                self._again[key] = (closed, attempt, due)
                return False
            prev = self._pending.get(key)
            if prev is not None:
                # only a close-after-write makes a pending file due sooner: a stream of
                # modify events from a slow writer must not spin a worker on it
                if not (closed and not prev[3]):
                    return False
                entry = (now, next(self._seq), key, True, prev[4], prev[5])
            else:
                entry = (due, next(self._seq), key, closed, attempt, now)
            self._push(entry)
            return True

    def _push(self, entry: _Entry) -> None:
        self._pending[entry[2]] = entry
        heapq.heappush(self._heap, entry)
        self._cond.notify()

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
        heap, pending = self._heap, self._pending
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            key = entry[2]
            if pending.get(key) is not entry:  # superseded by an earlier due time
                continue
            del pending[key]
            self._inflight[key] = entry[5]
            return Item(Path(key), entry[3], entry[4])
        return None

    def done(self, item: Item) -> None:
        """The worker is finished with ``item``; re-queue it if it was put meanwhile."""
        key = _key(item.path)
        with self._cond:
            since = self._inflight.pop(key, None)
            again = self._again.pop(key, None)
            if again is not None:
                closed, attempt, due = again
                now = self._clock()
                first = now if since is None else since  # still unfinished since then
                self._push((max(due, now), next(self._seq), key, closed, attempt, first))
            self._cond.notify_all()

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
            return [Path(key) for key in self._pending]

    def depth(self) -> tuple[int, int]:
        """(pending, in flight)"""
        with self._cond:
            return len(self._pending), len(self._inflight)

    def oldest(self) -> tuple[Path, float] | None:
        """The unfinished path queued longest ago, and how many seconds ago."""
        with self._cond:
            found = [(since, key) for key, since in self._inflight.items()]
            if self._pending:
                entry = min(self._pending.values(), key=itemgetter(5))
                found.append((entry[5], entry[2]))
            if not found:
                return None
            since, key = min(found, key=itemgetter(0))
            return Path(key), self._clock() - since

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._inflight
