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
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from rawtransfer import log as logsetup
from rawtransfer.alerts import Alerter, NullAlerter, SlackAlerter
from rawtransfer.catalog.base import Catalog, Owner
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.config import LocalDest, Settings
from rawtransfer.destination.base import Destination, sweep_leftovers
from rawtransfer.destination.local import LocalDestination
from rawtransfer.errors import EXIT_FILES_FAILED, EXIT_OK, ConfigError
from rawtransfer.live import VERSION as LIVE_VERSION
from rawtransfer.live import Publisher, catalog_label
from rawtransfer.metrics import Recorder, start_metrics
from rawtransfer.names import plural, q
from rawtransfer.outcome import Outcome, Result
from rawtransfer.pipeline import MIN_LEASE_SECONDS, Context
from rawtransfer.progress import Progress
from rawtransfer.queue import WorkQueue
from rawtransfer.reap import REAP_INTERVAL, Reaper
from rawtransfer.sdnotify import Notifier, watchdog_interval
from rawtransfer.selection import read_rules
from rawtransfer.source import Change, SourceHealth
from rawtransfer.spool import Spool
from rawtransfer.steps.snapshot import recover_asides
from rawtransfer.tidy import Tidy, tidy_one
from rawtransfer.timers import Backfill, Backlog, Canary, Periodic
from rawtransfer.watch import Matcher, OverflowWatch, Watcher, unreadable_dirs
from rawtransfer.workers import Pool, Stats

log = logging.getLogger(__name__)

# The periodic sweep of temporaries looks into day directories changed this recently.
SWEEP_RECENT = 2 * 86400.0
# How often the watcher-mode main loop looks at the source directory and the observer.
HEALTH_INTERVAL = 5.0
# After the grace period, abandoned copies get this long to clean up (remove their
# temporary files, release their claims) before the process exits anyway.
STOP_GRACE = 15.0

# Flags that mean nothing for a local destination are said to be so, never ignored.
LOCAL_ONLY_NOTE = {
    "ssh_controlmaster": "it keeps SSH connections open; DEST is local",
    "copy_timeout": "it bounds copies over SSH; DEST is local",
    "known_hosts": "it is for SSH destinations; DEST is local",
    "ssh_config": "it is for SSH destinations; DEST is local",
}


# What a one-off --backfill-only run has no use for: it watches nothing, runs no timers,
# never tidies and reports in its summary rather than to Slack.
WATCHER_ONLY = (
    "polling",
    "canary_interval",
    "backfill_interval",
    "backfill_recency_window",
    "overwrite_unpacked_interval",
    "overwrite_unpacked_hours",
    "overwrite_unpacked_recency_window",
    "keep_source",
    "slack_webhook_url",
    "alert_after",
    "alert_interval",
    "alert_backlog",
    "reap_after",  # a one-off run leaves reaping to `raw-transfer reap`
    "reap_when_disk_above",
    "reap_verify_remote",
)


def make_catalog(s: Settings) -> Catalog:
    if s.uses_postgres:
        from rawtransfer.catalog.postgres import PostgresCatalog

        return PostgresCatalog.from_settings(s)
    return SqliteCatalog(s.state_dir / "catalog.sqlite3", s.db_table, s.metadata_columns)


def make_destination(s: Settings) -> Destination:
    if isinstance(s.dest, LocalDest):
        return LocalDestination(s.dest.path, s.file_mode, s.dir_mode)
    from rawtransfer.destination.sftp import SftpDestination  # paramiko only when needed

    return SftpDestination(
        s.dest,
        copy_timeout=s.copy_timeout,
        known_hosts=s.known_hosts,
        ssh_config=s.ssh_config,
        # a connection per file costs a handshake per frame (60 ms against 26 ms per
        # small frame, measured): connections are always kept, one per worker
        persistent=True,
        file_mode=s.file_mode,
        dir_mode=s.dir_mode,
    )


def make_matcher(s: Settings) -> Matcher:
    """The patterns with the --exclude rules (read once, at start)."""
    return Matcher(s.patterns, read_rules(s.exclude, s.exclude_files))


def make_alerter(s: Settings) -> Alerter:
    if s.slack_webhook_url:
        return SlackAlerter(s.slack_webhook_url, host=s.host_id, interval=s.alert_interval)
    return NullAlerter()


def check_not_nested(source: Path, dest: Path) -> None:
    """An archive inside the watched tree would feed its own files back in (and the
    other way round would pack the archive into itself)."""
    src, dst = source.resolve(), dest.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise ConfigError(f"DEST {q(dest)} and SOURCE_DIR {q(source)} must not contain each other")


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
        self.stop = threading.Event()  # stop taking new files
        self.abort = threading.Event()  # abandon copies in progress
        self.signum: int | None = None
        self.queue = WorkQueue()
        self.stats = Stats()
        self.notifier = Notifier()
        self.matcher: Matcher | None = None  # the watcher's, for the excluded count
        self.metrics: Recorder = Recorder()  # start_metrics() once the checks pass

    # signals ---------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            # a second signal: leave at once; publishing is atomic, so nothing is
            # half-published, and claims are reclaimed from a dead process
            os._exit(128 + signum)
        self.signum = signum
        self.stop.set()
        self.queue.wake()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        logsetup.reopen()

    def install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGHUP, self._on_hup)

    # run -------------------------------------------------------------------------
    def run(self, out: TextIO = sys.stdout) -> int:
        s = self.s
        if isinstance(s.dest, LocalDest):
            for name, why in LOCAL_ONLY_NOTE.items():
                if name in self.explicit:
                    log.warning("--%s has no effect here: %s", name.replace("_", "-"), why)
        elif "ssh_controlmaster" in self.explicit:
            log.info(
                "--ssh-controlmaster: SSH connections are kept (one per worker, rebuilt when "
                "lost) whether it is given or not; it is accepted for upstream's unit files"
            )
        idle = [n for n in WATCHER_ONLY if n in self.explicit] if s.backfill_only else []
        if idle:
            log.warning(
                "--backfill-only: no effect in a one-off run (it watches nothing, runs no "
                "timers, never replaces originals, reports in its summary): %s",
                " ".join("--" + n.replace("_", "-") for n in idle),
            )
        check_source(s.source_dir)
        if isinstance(s.dest, LocalDest):
            check_not_nested(s.source_dir, s.dest.path)
        destination = make_destination(s)
        try:
            destination.check()
            # temporaries of copies killed before this start: older than any lease
            sweep_leftovers(destination, max(MIN_LEASE_SECONDS, 4 * s.copy_timeout))
        except BaseException:
            destination.close()
            raise
        # nothing is written anywhere before the checks above have passed
        # a removal (tidy, reap) killed halfway left a file renamed aside: put it back
        recover_asides(s.source_dir)
        catalog = make_catalog(s)
        spool: Spool | None = None
        try:
            catalog.check()
            # a spool directory of our own: another process on the same state directory
            # keeps its files, and only dead processes' leftovers are removed
            spool = Spool(s.state_dir / "spool", f"{s.host_id}-{os.getpid()}")
            self.metrics = start_metrics(s, self.queue)
            ctx = Context(
                settings=s,
                catalog=catalog,
                destination=destination,
                spool=spool,
                stop=self.abort,
                owner=Owner(host=s.host_id),
                burst=s.backfill_only,
                metrics=self.metrics,
            )
            self.install_signals()
            if s.backfill_only:
                return self._burst(ctx, out)
            return self._watch(ctx)
        finally:
            self.metrics.close()  # a textfile gets the final figures
            if spool is not None:
                spool.close()
            catalog.close()
            destination.close()
            self.notifier.close()

    def _scan(self, ctx: Context) -> int:
        """Queue every matching file of the last --backfill-hours not yet handled."""
        return Backfill(
            self.s.source_dir,
            make_matcher(self.s),
            ctx.catalog,
            self.queue,
            self.s.backfill_hours,
            recency_window=0.0,
            destination=ctx.destination,
            owner=ctx.owner,
        )()

    def _drain(self, pool: Pool) -> None:
        """Ordered shutdown of the workers: finish, or abandon cleanly after a grace."""
        self.stop.set()
        self.queue.close()
        self.queue.wake()
        if not pool.join(self.s.stop_grace):
            log.warning("abandoning copies still in progress after %.0f s", self.s.stop_grace)
            self.abort.set()
            pool.join(STOP_GRACE)

    def _burst(self, ctx: Context, out: TextIO) -> int:
        s = self.s
        with unreadable_dirs() as unreadable:
            n = self._scan(ctx)
        log.info("backfill: %s to look at under %s", plural(n, "file"), q(s.source_dir))
        if unreadable:
            log.error(
                "%s under %s: their files were not looked at",
                plural(len(unreadable), "unreadable directory", "unreadable directories"),
                q(s.source_dir),
            )
        self.queue.close()
        pool = Pool(ctx, self.queue, s.workers, self.stats, stop=self.stop)
        progress = Progress(n, self.stats)  # a bar on a terminal, else a line now and then
        pool.start()
        while not pool.join(timeout=0.5):
            progress.tick()
            if self.stop.is_set():
                self._drain(pool)
                break
        progress.close()
        self._summary(out, ctx, unreadable)
        if self.signum is not None:
            return 128 + self.signum
        return EXIT_FILES_FAILED if self.stats.any_failed or unreadable else EXIT_OK

    def _watch(self, ctx: Context) -> int:
        s = self.s
        matcher = self.matcher = make_matcher(s)
        alerter = make_alerter(s)
        canary = Canary(ctx.destination, ctx.catalog, self.queue, alerter, s.alert_after)
        canary.checks["spool"] = ctx.spool.check
        canary_timer = Periodic("canary", s.canary_interval, canary, self.stop)
        backfill = Backfill(
            s.source_dir,
            matcher,
            ctx.catalog,
            self.queue,
            s.backfill_hours,
            s.backfill_recency_window,
            destination=ctx.destination,
            owner=ctx.owner,
        )
        backfill_timer = Periodic(
            "backfill", s.backfill_interval, backfill, self.stop, run_first=False
        )
        rescan = Periodic("rescan", 24 * 3600.0, lambda: self._scan(ctx), self.stop, run_first=True)

        tidy = Tidy(
            s.source_dir,
            matcher,
            ctx.catalog,
            ctx.spool.path,
            ctx.owner,
            s.overwrite_unpacked_hours,
            s.overwrite_unpacked_recency_window,
        )

        def on_outcome(outcome: Outcome) -> None:
            if outcome.result == Result.DONE and not s.keep_source:
                try:
                    age = time.time() - outcome.path.stat().st_mtime
                except OSError:
                    return
                if age >= s.overwrite_unpacked_recency_window and outcome.sha1:
                    try:
                        tidy_one(outcome.path, outcome.sha1, ctx.spool.path, ctx.catalog, ctx.owner)
                    except OSError as exc:  # the transfer is done; tidying waits for later
                        log.error("not tidying %s: %s", q(outcome.path), exc)
            elif outcome.result == Result.RETRY:
                canary_timer.poke()  # pause the queue now rather than at the next tick
            elif outcome.result in (Result.QUARANTINED, Result.FAILED):
                alerter.alert(
                    f"file {outcome.result.value}", f"{q(outcome.path)}: {outcome.reason}"
                )

        source = SourceHealth(s.source_dir, alerter, s.alert_after)
        self.metrics.resources(
            lambda: [*canary.down_since, *(() if source.healthy else ("source",))]
        )
        watcher = Watcher(s.source_dir, self.queue, matcher, s.polling)
        watcher.arm()
        overflow = OverflowWatch(rescan.poke)
        pool = Pool(ctx, self.queue, s.workers, self.stats, on_outcome, stop=self.stop)
        backlog = Periodic(
            "backlog", s.canary_interval, Backlog(self.queue, alerter, s.alert_backlog), self.stop
        )
        # a copy killed while the service ran (its worker thread is long gone) left a
        # temporary file: swept once it is older than a lease, looking only into day
        # directories changed in the last two days (cheap on a large archive)
        sweep = Periodic(
            "sweep",
            s.backfill_interval,
            partial(sweep_leftovers, ctx.destination, ctx.lease_seconds, SWEEP_RECENT),
            self.stop,
            run_first=False,
        )
        threads = [canary_timer, backfill_timer, rescan, backlog, sweep]
        if s.reaps:
            reaper = Reaper(
                s, matcher, ctx.catalog, ctx.destination, alerter, ctx.owner, self.metrics
            )
            threads.append(Periodic("reap", REAP_INTERVAL, reaper, self.stop))
        if not s.keep_source:
            threads.append(
                Periodic("tidy", s.overwrite_unpacked_interval, tidy, self.stop, run_first=False)
            )
        pool.start()
        for t in threads:
            t.start()
        # the figures that `raw-transfer status` shows, and the heartbeat in the log
        live = Publisher(s.state_dir, ctx.owner)
        label = catalog_label(s)
        try:
            log.info("watching %s -> %s", q(s.source_dir), s.dest)
            self.notifier.ready(self._status(canary, source))
            live(self._figures(canary, source, label))
            wd = watchdog_interval()
            tick = min(HEALTH_INTERVAL, wd) if wd else HEALTH_INTERVAL
            while not self.stop.wait(tick):
                change = source()
                if change is Change.LOST:
                    watcher.disarm()  # a directory moved away would still be followed
                elif change is Change.REARM:
                    # files that arrived while it was away (or that the new directory
                    # already holds) have sent no event to this watcher: rescan
                    if watcher.arm():
                        rescan.poke()
                elif source.healthy and not watcher.alive:
                    if not watcher.failing:
                        log.error(
                            "the file watcher stopped (SOURCE_DIR removed and created "
                            "again?); restarting it and rescanning"
                        )
                    if watcher.arm():
                        rescan.poke()
                # systemd restarts a service whose watchdog is not fed: feed it only
                # while every worker and the observer are alive (a restart cannot bring
                # back a missing source: that is alerted and shown in the status)
                if pool.alive() and (watcher.alive or not source.healthy):
                    self.notifier.watchdog()
                self.notifier.status(self._status(canary, source))
                live(self._figures(canary, source, label))
        finally:
            self.notifier.stopping()
            # producers first, then the workers; whatever is still queued in memory is
            # found again by the start-up scan next time
            overflow.close()
            watcher.disarm(STOP_GRACE)
            self.stop.set()
            for t in threads:
                t.shutdown()
            self._drain(pool)
            alerter.close()
            live.close()
        log.info("stopped (signal %s)", self.signum)
        return EXIT_OK

    def _status(self, canary: Canary, source: SourceHealth) -> str:
        pending, inflight = self.queue.depth()
        c = self.stats.counts
        text = f"{pending} queued, {inflight} in flight, {c['done']} done"
        if not source.healthy:
            text += "; " + source.status()
        if not canary.healthy:
            text += "; PAUSED: " + ", ".join(f"{k} unavailable" for k in canary.down_since)
        if self.stats.last_done:
            text += f"; last {self.stats.last_done}"
        return text

    def _figures(self, canary: Canary, source: SourceHealth, catalog: str) -> dict[str, Any]:
        """The live figures (live.py; `raw-transfer status` shows them, README lists them)."""
        pending, inflight = self.queue.depth()
        c = self.stats.counts
        now, mono = time.time(), time.monotonic()
        down = dict(canary.down_since)  # monotonic times, copied: the canary's thread edits it
        oldest = self.queue.oldest()
        return {
            "version": LIVE_VERSION,
            "host": self.s.host_id,
            "pid": os.getpid(),
            "started": now - (mono - self.stats.started),
            "updated": now,
            "catalog": catalog,
            "table": self.s.db_table,
            "source_dir": os.path.abspath(self.s.source_dir),
            "dest": str(self.s.dest),
            "queued": pending,
            "in_flight": inflight,
            "paused": self.queue.paused,
            "paused_reasons": sorted(f"{name} unavailable" for name in down),
            "paused_since": now - (mono - min(down.values())) if down else None,
            "source_problem": None if source.healthy else source.status(),
            "done": c["done"],
            "failed": c["failed"] + c["not done"],
            "quarantined": c["quarantined"],
            "duplicates": c["duplicate"],
            "oldest_waiting": {"file": oldest[0].name, "seconds": round(oldest[1], 1)}
            if oldest
            else None,
            "last_done": self.stats.last_done or None,
            "excluded": self.matcher.excluded_count if self.matcher is not None else 0,
        }

    def _summary(
        self, out: TextIO, ctx: Context, unreadable: list[tuple[Path, str]] | None = None
    ) -> None:
        st = self.stats
        elapsed = time.monotonic() - st.started
        c = st.counts
        total = sum(c.values())
        rate = total / elapsed if elapsed > 0 else 0.0
        print(
            f"raw-transfer: {plural(total, 'file')} in {elapsed:.1f} s ({rate:.1f} files/s): "
            f"{c['done']} done, {c['already done']} already done, "
            f"{plural(c['duplicate'], 'duplicate')}, "
            f"{c['quarantined']} quarantined, {c['failed'] + c['not done']} failed, "
            f"{c['skipped']} skipped"
            + (
                f", {plural(len(unreadable), 'unreadable directory', 'unreadable directories')}"
                if unreadable
                else ""
            ),
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
        for path, reason in unreadable or ():
            print(f"  unreadable directory, not looked at: {q(path)}: {reason}", file=out)
        print(f"  archive: {self.s.dest}", file=out)
        if isinstance(ctx.catalog, SqliteCatalog):
            print(f"  catalog: {ctx.catalog.path} (table {self.s.db_table})", file=out)
