"""Periodic threads of the service: canary, backfill, backlog (tidy and reap have modules of
their own).

Each waits on the service's stop Event rather than sleeping, so shutdown is immediate,
and can be poked to run at once (a failed copy pokes the canary; an inotify overflow
pokes the backfill).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from rawtransfer.alerts import Alerter
from rawtransfer.catalog.base import Catalog, HandledSources, Owner, State, utc_from_epoch
from rawtransfer.destination.base import Destination
from rawtransfer.errors import Kind, ResourceUnavailable
from rawtransfer.names import plural, q
from rawtransfer.queue import WorkQueue
from rawtransfer.steps.settle import CLOCK_SLACK
from rawtransfer.steps.snapshot import IDENTITY_FORMAT
from rawtransfer.watch import Matcher, scan_paths

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 30.0


class Periodic(threading.Thread):
    """Run ``fn`` every ``interval`` seconds (and at once when poked) until ``stop``."""

    def __init__(
        self,
        name: str,
        interval: float,
        fn: Callable[[], object],
        stop: threading.Event,
        *,
        run_first: bool = True,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.fn = fn
        self.stop = stop
        self._poke = threading.Event()
        self._run_first = run_first

    def poke(self) -> None:
        self._poke.set()

    def run(self) -> None:
        first = self._run_first
        while not self.stop.is_set():
            if not first:
                self._poke.wait(self.interval)
                if self.stop.is_set():
                    return
            first = False
            self._poke.clear()
            try:
                self.fn()
            except Exception:
                log.exception("%s failed; trying again in %.0f s", self.name, self.interval)

    def shutdown(self) -> None:
        self._poke.set()
        self.join(JOIN_TIMEOUT)


class Canary:
    """Pause the queue while the destination or the catalog is away; resume after.

    Nothing is failed while a resource is down: files wait in the queue (and new ones
    keep arriving into it). An outage longer than ``alert_after`` seconds is alerted
    once, and its end is announced as resolved.
    """

    def __init__(
        self,
        destination: Destination,
        catalog: Catalog,
        queue: WorkQueue,
        alerter: Alerter,
        alert_after: float,
    ) -> None:
        self.checks: dict[str, Callable[[], None]] = {
            "destination": destination.check,
            "catalog": catalog.check,
        }
        self.queue = queue
        self.alerter = alerter
        self.alert_after = alert_after
        self.down_since: dict[str, float] = {}
        self.alerted: set[str] = set()

    @property
    def healthy(self) -> bool:
        return not self.down_since

    def __call__(self) -> bool:
        now = time.monotonic()
        for name, check in self.checks.items():
            try:
                check()
            except ResourceUnavailable as exc:
                if name not in self.down_since:
                    self.down_since[name] = now
                    log.error("%s unavailable, pausing transfers: %s", name, exc)
                # refused (host key, rights, read-only): no waiting will help, say it now
                late = now - self.down_since[name] >= self.alert_after
                if (late or exc.kind == Kind.REFUSED) and name not in self.alerted:
                    self.alerted.add(name)
                    self.alerter.alert(
                        f"{name} down",
                        f"{name} unavailable for {now - self.down_since[name]:.0f} s: {exc}",
                    )
            else:
                if name in self.down_since:
                    down = now - self.down_since.pop(name)
                    log.warning("%s is back after %.0f s", name, down)
                    if name in self.alerted:
                        self.alerted.discard(name)
                        self.alerter.resolve(f"{name} down", f"{name} back after {down:.0f} s")
        if self.down_since:
            if not self.queue.paused:
                self.queue.pause()
        elif self.queue.paused:
            log.info("destination and catalog reachable: transfers resume")
            self.queue.resume()
        return self.healthy


class Backfill:
    """Queue files modified in the window that have no finished catalog row.

    One query for the handled set, then a directory scan: never a query per file. Files
    younger than the recency window are left to the watcher. Stale claims and retryable
    failures have no terminal state, so they are found here too.
    """

    def __init__(
        self,
        root: Path,
        matcher: Matcher,
        catalog: Catalog,
        queue: WorkQueue,
        hours: float,
        recency_window: float,
        destination: Destination | None = None,
        owner: Owner | None = None,
    ) -> None:
        self.destination = destination
        self.owner = owner or Owner()
        self.root = root
        self.matcher = matcher
        self.catalog = catalog
        self.queue = queue
        self.hours = hours
        self.recency_window = recency_window

    def __call__(self) -> int:
        now = time.time()
        since = now - self.hours * 3600
        handled = self.catalog.handled_sources(utc_from_epoch(since))
        for src in self._conflicts_gone(since, handled):
            del handled[src]
        n = 0
        # young files are the watcher's; none are with --backfill-only (window 0). An
        # mtime far ahead of the clock is no sign of youth: the clock was moved back
        window = self.recency_window > 0
        young, ahead = now - self.recency_window, now + CLOCK_SLACK
        # the loop runs once per file of the window: names bound once
        record_of, covers, put = handled.records.get, handled.covers, self.queue.put
        identity_and_space = IDENTITY_FORMAT + " "  # identity_text(st), and a space
        for path, st in scan_paths(self.root, self.matcher, since):
            if window and young < st.st_mtime <= ahead:
                continue
            # the file that was handled, not merely one under its name (snapshot.Identity);
            # HandledSources.covers, but for the call: a record starts with its identity
            # and a space
            record = record_of(path)
            if record is not None:
                identity = identity_and_space % (
                    st.st_dev,
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                )
                if record.startswith(identity) or covers(path, identity[:-1]):
                    continue
            if put(Path(path)):
                n += 1
        if n:
            log.info("backfill: queued %s that had been missed", plural(n, "file"))
        return n

    def _conflicts_gone(self, since: float, handled: HandledSources) -> list[str]:
        """Failed files whose conflicting archive file has been moved aside: recorded as
        retried (so that they are no longer 'handled') and returned."""
        if self.destination is None:
            return []
        out = []
        for src, filepath in self.catalog.failed_at_destination(utc_from_epoch(since)).items():
            mark = handled.get(src)
            if mark is None or mark.state != State.FAILED:
                continue
            rel = PurePosixPath(*PurePosixPath(filepath).parts[-4:])
            if self.destination.sha1(rel) is None:
                reason = f"the conflicting archive file {filepath} is gone"
                log.warning("retrying %s: %s", q(src), reason)
                self.catalog.record_event(None, src, State.RETRY, reason, self.owner)
                out.append(src)
        return out


class Backlog:
    """Alert when the oldest file not yet done has waited longer than ``threshold``."""

    def __init__(self, queue: WorkQueue, alerter: Alerter, threshold: float) -> None:
        self.queue = queue
        self.alerter = alerter
        self.threshold = threshold
        self.alerted = False

    def __call__(self) -> bool:
        oldest = self.queue.oldest()
        late = oldest is not None and oldest[1] >= self.threshold
        if late and not self.alerted and oldest is not None:
            self.alerted = True
            path, age = oldest
            pending, inflight = self.queue.depth()
            self.alerter.alert(
                "backlog",
                f"{q(path.name)} has waited {age / 60:.0f} min; "
                f"{pending} queued, {inflight} in flight",
            )
        elif not late and self.alerted:
            self.alerted = False
            self.alerter.resolve("backlog", "the backlog has cleared")
        return late
