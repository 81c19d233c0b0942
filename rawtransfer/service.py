"""Wire everything together: start-up checks, signals, the run loop, ordered shutdown.

The one-off ``--backfill-only`` run is the same loop in burst mode (as rq's
``Worker.work(burst=True)``): scan, drain the queue, summarise, exit.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from rawtransfer.catalog.base import TERMINAL, Catalog, Owner
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.config import LocalDest, Settings
from rawtransfer.destination.base import Destination
from rawtransfer.destination.local import LocalDestination
from rawtransfer.errors import EXIT_FILES_FAILED, EXIT_OK, ConfigError
from rawtransfer.names import q
from rawtransfer.pipeline import Context
from rawtransfer.queue import WorkQueue
from rawtransfer.steps.pack import clean_spool
from rawtransfer.watch import Matcher, queue_scan, start_observer
from rawtransfer.workers import Pool, Stats

log = logging.getLogger(__name__)

# How often the watcher-mode main loop looks at the observer's health.
HEALTH_INTERVAL = 5.0
# In-flight files get this long to finish after SIGTERM before they are abandoned
# (temporary files removed, claims released); well inside systemd's TimeoutStopSec.
STOP_GRACE = 30.0

# Flags that are accepted for compatibility but whose feature arrives with a later issue.
# Each is announced in one line at start-up when given, never silently ignored.
LATER: dict[str, str] = {
    "canary_interval": "the canary timer arrives with the service issue (#4)",
    "backfill_interval": "periodic backfill in watcher mode arrives with the service issue (#4)",
    "backfill_recency_window": "periodic backfill in watcher mode arrives with issue #4",
    "overwrite_unpacked_interval": "tidying of originals arrives with issue #4; sources are kept",
    "overwrite_unpacked_hours": "tidying of originals arrives with issue #4; sources are kept",
    "overwrite_unpacked_recency_window": "tidying arrives with issue #4; sources are kept",
    "slack_webhook_url": "Slack alerts arrive with issue #4; problems are logged only",
    "ssh_controlmaster": "SSH destinations (and their persistent connections) arrive with #3",
}


def make_catalog(s: Settings) -> Catalog:
    if s.uses_postgres:
        raise ConfigError(
            "the PostgreSQL catalog (--db-host/--db-name/--db-dsn) arrives with issue #3; "
            "without those flags the embedded SQLite catalog is used"
        )
    return SqliteCatalog(s.state_dir / "catalog.sqlite3", s.db_table, s.metadata_columns)


def make_destination(s: Settings) -> Destination:
    if isinstance(s.dest, LocalDest):
        return LocalDestination(s.dest.path)
    raise ConfigError(f"SSH destinations ({s.dest}) arrive with issue #3; use a local path")


def check_source(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"SOURCE_DIR {q(path)} does not exist")
    if not path.is_dir():
        raise ConfigError(f"SOURCE_DIR {q(path)} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"SOURCE_DIR {q(path)} is not readable")


class Service:
    def __init__(self, settings: Settings, explicit: frozenset[str] = frozenset()) -> None:
        self.s = settings
        self.explicit = explicit
        self.stop = threading.Event()
        self.signum: int | None = None
        self.queue = WorkQueue()
        self.stats = Stats()

    # signals ---------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            # a second signal: leave at once; publishing is atomic, so nothing is
            # half-published, and claims are reclaimed from a dead process
            os._exit(128 + signum)
        self.signum = signum
        self.stop.set()
        self.queue.wake()

    def install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    # run -------------------------------------------------------------------------
    def run(self, out: TextIO = sys.stdout) -> int:
        s = self.s
        for name, why in LATER.items():
            if name in self.explicit:
                log.warning("--%s accepted: %s", name.replace("_", "-"), why)
        check_source(s.source_dir)
        destination = make_destination(s)
        try:
            destination.check()
        except BaseException:
            destination.close()
            raise
        # nothing is written anywhere before the checks above have passed
        catalog = make_catalog(s)
        try:
            catalog.check()
            spool = s.state_dir / "spool"
            spool.mkdir(parents=True, exist_ok=True)
            if n := clean_spool(spool):
                log.info("removed %d stale temporary files from %s", n, spool)
            ctx = Context(
                settings=s,
                catalog=catalog,
                destination=destination,
                spool=spool,
                stop=self.stop,
                owner=Owner(host=s.host_id),
                burst=s.backfill_only,
            )
            self.install_signals()
            if s.backfill_only:
                return self._burst(ctx, out)
            return self._watch(ctx)
        finally:
            catalog.close()
            destination.close()

    def _handled(self, catalog: Catalog, since: float) -> set[str]:
        from datetime import UTC, datetime

        return catalog.handled_sources(datetime.fromtimestamp(since, UTC).replace(tzinfo=None))

    def _scan(self, ctx: Context) -> int:
        s = self.s
        since = time.time() - s.backfill_hours * 3600
        handled = self._handled(ctx.catalog, since)
        return queue_scan(
            s.source_dir, self.queue, Matcher(s.patterns), since, handled.__contains__
        )

    def _burst(self, ctx: Context, out: TextIO) -> int:
        s = self.s
        n = self._scan(ctx)
        log.info("backfill: %d files to look at under %s", n, q(s.source_dir))
        self.queue.close()
        pool = Pool(ctx, self.queue, s.workers, self.stats)
        pool.start()
        while not pool.join(timeout=0.5):
            if self.stop.is_set():
                pool.join(STOP_GRACE)
                break
        self._summary(out, ctx)
        if self.signum is not None:
            return 128 + self.signum
        return EXIT_FILES_FAILED if self.stats.any_failed else EXIT_OK

    def _watch(self, ctx: Context) -> int:
        s = self.s
        matcher = Matcher(s.patterns)
        observer, _handler = start_observer(s.source_dir, self.queue, matcher, s.polling)
        pool = Pool(ctx, self.queue, s.workers, self.stats)
        pool.start()
        try:
            n = self._scan(ctx)
            log.info("watching %s; %d files queued by the start-up scan", q(s.source_dir), n)
            while not self.stop.wait(HEALTH_INTERVAL):
                if not observer.is_alive():
                    log.error("the file watcher died; restarting it and rescanning")
                    observer, _handler = start_observer(
                        s.source_dir, self.queue, matcher, s.polling
                    )
                    self._scan(ctx)
        finally:
            # producers first, then the workers; whatever is still queued in memory is
            # found again by the start-up scan next time
            observer.stop()
            observer.join(STOP_GRACE)
            self.stop.set()
            self.queue.close()
            self.queue.wake()
            pool.join(STOP_GRACE)
        log.info("stopped (signal %s)", self.signum)
        return EXIT_OK

    def _summary(self, out: TextIO, ctx: Context) -> None:
        st = self.stats
        elapsed = time.monotonic() - st.started
        c = st.counts
        total = sum(c.values())
        rate = total / elapsed if elapsed > 0 else 0.0
        print(
            f"raw-transfer: {total} files in {elapsed:.1f} s ({rate:.1f} files/s): "
            f"{c['done']} done, {c['already done']} already done, {c['duplicate']} duplicates, "
            f"{c['quarantined']} quarantined, {c['failed'] + c['not done']} failed, "
            f"{c['skipped']} skipped",
            file=out,
        )
        if st.raw_bytes:
            ratio = st.raw_bytes / st.packed_bytes if st.packed_bytes else 0.0
            print(
                f"  bytes: {st.raw_bytes / 1e6:.1f} MB raw -> {st.packed_bytes / 1e6:.1f} MB "
                f"packed ({ratio:.2f}x), {st.raw_bytes / 1e6 / max(elapsed, 1e-9):.1f} MB/s",
                file=out,
            )
        for path, what, reason in st.failures:
            print(f"  {what}: {q(path)}: {reason}", file=out)
        print(f"  archive: {self.s.dest}", file=out)
        if isinstance(ctx.catalog, SqliteCatalog):
            print(f"  catalog: {ctx.catalog.path} (table {self.s.db_table})", file=out)


__all__ = ["TERMINAL", "Service"]
