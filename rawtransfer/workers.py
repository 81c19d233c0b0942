"""The worker pool: take a path, process it, classify the outcome, retry or give up.

Workers stop through an Event; they never sleep, they wait on the queue. A file that
could not be finished because a resource was away goes back on the queue with an
exponential, jittered, capped back-off; everything else ends in a recorded state.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rawtransfer.catalog.base import State
from rawtransfer.errors import Kind, classify
from rawtransfer.names import q
from rawtransfer.outcome import Outcome, Result
from rawtransfer.pipeline import Context, process_one
from rawtransfer.queue import Item, WorkQueue

log = logging.getLogger(__name__)

# Back-off for files whose step failed because a resource was away: first retry after
# about 2 s, doubling, never more than 5 minutes apart (the canary resumes sooner).
BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
# A file whose content another worker has claimed is looked at again at least this often.
BUSY_CAP = 30.0
# In a one-off run nobody is waiting for the resource to come back all night: a file is
# given up (and reported) after this many attempts.
BURST_MAX_ATTEMPTS = 5
# How long a worker waits on an empty queue before it looks at the stop event again.
POLL_SECONDS = 0.5
JOIN_TIMEOUT = 30.0


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Full-jitter exponential back-off (as dramatiq's compute_backoff)."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography


@dataclass
class Stats:
    """Counts for the summary, status lines and exit code; thread-safe."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[Path, str, str]] = field(default_factory=list)
    raw_bytes: int = 0
    packed_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    last_done: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.counts[outcome.result.value] += 1
            if outcome.result == Result.DONE:
                self.raw_bytes += outcome.raw_size
                self.packed_bytes += outcome.packed_size
                self.last_done = q(outcome.path.name)
            if outcome.result in (Result.FAILED, Result.QUARANTINED):
                self.failures.append((outcome.path, outcome.result.value, outcome.reason))

    def given_up(self, path: Path, reason: str) -> None:
        with self._lock:
            self.counts["not done"] += 1
            self.failures.append((path, "not done", reason))

    @property
    def any_failed(self) -> bool:
        return bool(self.failures)


class Pool:
    def __init__(
        self,
        ctx: Context,
        queue: WorkQueue,
        workers: int,
        stats: Stats,
        on_outcome: Callable[[Outcome], None] | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.ctx = ctx
        # workers leave after the file in hand once ``stop`` is set; ``ctx.stop`` (abort)
        # makes them abandon even that one
        self.stop = stop or ctx.stop
        self.queue = queue
        self.stats = stats
        self.on_outcome = on_outcome
        self._threads = [
            threading.Thread(target=self._run, name=f"worker-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def join(self, timeout: float = JOIN_TIMEOUT) -> bool:
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        while not self.stop.is_set():
            item = self.queue.get(timeout=POLL_SECONDS)
            if item is None:
                if self.ctx.burst and self.queue.idle():
                    return
                continue
            try:
                self._one(item)
            except Exception as exc:
                # process_one judges every error of a file itself; what reaches here is a
                # catalog that went away while an outcome was being recorded, or a bug
                if classify(exc) in (Kind.TRANSIENT, Kind.REFUSED):
                    self._retry(item, f"{type(exc).__name__}: {exc}", 0.0, retry=True)
                else:
                    log.exception("%s: internal error; the file is left as it is", q(item.path))
                    self.stats.given_up(item.path, f"internal error: {type(exc).__name__}: {exc}")
                    self.ctx.metrics.given_up()
            finally:
                self.queue.done(item)

    def _retry(self, item: Item, reason: str, delay: float, *, retry: bool) -> None:
        """Back on the queue with back-off; a one-off run gives up after a few tries."""
        name = q(item.path)
        if self.stop.is_set():
            return  # shutting down: the scan at the next start finds it again
        # BUSY never gives up: the other worker finishes, or its lease expires and the
        # claim is taken over
        if retry and self.ctx.burst and item.attempt + 1 >= BURST_MAX_ATTEMPTS:
            log.error("giving up on %s after %d attempts: %s", name, item.attempt + 1, reason)
            self.stats.given_up(item.path, reason)
            self.ctx.metrics.given_up()
            return
        delay = max(delay, backoff(item.attempt, cap=BACKOFF_CAP if retry else BUSY_CAP))
        verb = "retrying" if retry else "deferring"
        log.warning("%s %s in %.0f s: %s", verb, name, delay, reason)
        self.queue.put(item.path, delay=delay, attempt=item.attempt + 1)

    def _one(self, item: Item) -> None:
        started = time.monotonic()
        outcome = process_one(item.path, self.ctx, closed=item.closed)
        elapsed = time.monotonic() - started
        self.ctx.metrics.outcome(outcome)
        r = outcome.result
        name = q(item.path)
        if r == Result.DONE:
            ratio = outcome.raw_size / outcome.packed_size if outcome.packed_size else 0
            log.info(
                "done %s -> %s (%d bytes, packed %.2fx, %.2f s)",
                name,
                q(outcome.dest),
                outcome.raw_size,
                ratio,
                elapsed,
            )
            if outcome.again:
                log.warning("%s %s", name, outcome.reason)
                self.queue.put(item.path, delay=self.ctx.settings.patience)
        elif r in (Result.QUARANTINED, Result.FAILED):
            log.error("%s %s: %s", r.value, name, outcome.reason)
        elif r == Result.DUPLICATE:
            log.warning("duplicate %s: %s", name, outcome.reason)
        elif r == Result.SKIPPED:
            log.warning("skipped %s: %s", name, outcome.reason)
        elif r == Result.ALREADY_DONE:
            log.debug("already done %s", name)
        elif r == Result.IGNORED:
            log.debug("not taken: %s: %s", name, outcome.reason)
            return
        elif r == Result.WAIT:
            log.debug("waiting for %s: %s", name, outcome.reason)
            self.queue.put(item.path, delay=outcome.delay, attempt=item.attempt)
            return
        elif r == Result.CHANGED:
            # not a failure: the new version is looked at once it has settled again
            log.warning("%s %s; looking at it again", name, outcome.reason)
            self.ctx.catalog.record_event(
                None, str(item.path), State.CHANGED, outcome.reason, self.ctx.owner
            )
            self.queue.put(item.path, delay=self.ctx.settings.patience, attempt=item.attempt)
            return
        elif r in (Result.RETRY, Result.BUSY):
            self._retry(item, outcome.reason, outcome.delay, retry=r == Result.RETRY)
            if self.on_outcome:
                self.on_outcome(outcome)
            return
        self.stats.add(outcome)
        if self.on_outcome:
            self.on_outcome(outcome)
