"""The issue's other targets: latency of an idle watcher, the backfill scan, memory.

* Latency: a frame is written and closed in the watched directory of an idle watcher;
  the time until the watcher logs it ``done`` (verified at the destination) is compared
  with the time the same kind of frame takes alone in a one-off run (from its "to look
  at" line to its ``done`` line, so process start-up is left out of both).
* Scan: N header-only ``*.fits`` files against an N-row catalog that has every one of them
  done (same paths and identities); the backfill pass in-process and a whole
  ``--backfill-only`` run that finds nothing to do, against ``find`` on the same tree; and,
  as a second baseline doing what a pass must also do, ``find -printf`` of each file's
  identity followed by the ``sqlite3`` command-line tool reading the catalog's latest
  event of each path in the window (neither compares the two).
* Memory: peak RSS of a one-off run once N files are queued, against the same run on
  an empty source.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from benchmarks import data
from benchmarks.measure import Meter, RunFailed, Usage, run_sampled, status_kib
from benchmarks.methods import RAW_TRANSFER, _run, scratch

# How long a watcher or a one-off run may take to start, or a frame to come through; far
# more than they take, so that a hang ends the benchmark instead of blocking it.
LOG_TIMEOUT = 300.0
# The watcher is left alone this long before each frame, so that each one meets it idle.
IDLE_SECONDS = 1.0
# With N files queued, the workers run this long before the run is stopped: the queue is
# full from the start, and the peak is reached as the first files are taken.
QUEUED_HOLD = 2.0
# A stopped run abandons its files in flight after --stop-grace; it exits well before.
STOP_TIMEOUT = 60.0
# A scan figure is the median of this many passes (they take milliseconds to seconds).
SCAN_REPEATS = 3
# The scan's window (Backfill's hours; find's -mmin -720).
SCAN_HOURS = 12
# The fair baseline's two halves: what a backfill pass reads, without its comparison. The
# path and identity (device:inode:size:mtime:ctime, times in seconds) of every file...
SCAN_FIND_PRINTF = "%p %D:%i:%s:%T@:%C@\n"
# ...and each path's latest event in the window, as handled_sources selects it
SCAN_EVENTS_SQL = (
    "select e.source_filepath, e.state, e.at, e.identity from rawtransfer_events e "
    "where e.at >= '{since}' and not exists (select 1 from rawtransfer_events f "
    "where f.source_filepath = e.source_filepath and f.id > e.id);"
)


class LogTail:
    """A process's stderr, line by line, each with the time it was read."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, name="log-tail", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append((time.monotonic(), line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], start: int = 0) -> tuple[int, float]:
        """The index and time of the first line from ``start`` that matches."""
        deadline = time.monotonic() + LOG_TIMEOUT
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    if pattern.search(line):
                        return i, t
                    if re.search(r"\b(quarantined|failed)\b", line) and "0 failed" not in line:
                        raise RunFailed(f"raw-transfer: {line.strip()}")
                    i += 1
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    tail = "".join(x for _, x in self.lines[-15:])
                    raise RunFailed(f"no line matching {pattern.pattern!r}; log:\n{tail}")
                self._cond.wait(0.5)

    def close(self) -> None:
        self._thread.join(STOP_TIMEOUT)


def _done(name: str) -> re.Pattern[str]:
    return re.compile(rf"\bdone\b.*{re.escape(name)}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _popen(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        bufsize=1,
    )


def p99(samples: list[float]) -> float:
    return float(np.percentile(samples, 99))


def latency(
    frames: list[Path],
    work: Path,
    dest_for: Callable[[Path], str],
    flags: list[str],
    idle: float = IDLE_SECONDS,
) -> dict[str, object]:
    """Closed-to-verified latency of an idle watcher (2 workers), one frame at a time,
    against the time each frame takes alone in a one-off run."""
    samples: list[float] = []
    with scratch(work / "lat") as root:
        src, state, dest = root / "src", root / "state", root / "dest"
        for d in (src, state, dest):
            d.mkdir()
        cmd = [*RAW_TRANSFER, str(src), dest_for(dest), "--workers", "2"]
        proc = _popen([*cmd, "--state-dir", str(state), *flags])
        tail = LogTail(proc)
        try:
            at, _ = tail.wait_for(re.compile(r"\bwatching\b"))
            for frame in frames:
                time.sleep(idle)  # deliberate: the watcher is idle when the frame comes
                target = src / frame.name
                shutil.copyfile(frame, target)  # written and closed in the source
                closed = time.monotonic()
                at, done = tail.wait_for(_done(frame.name), at)
                samples.append(done - closed)
        finally:
            _stop(proc)
            tail.close()
    alone: list[float] = []
    for frame in frames:
        with scratch(work / "alone") as root:
            src, state, dest = root / "src", root / "state", root / "dest"
            for d in (src, state, dest):
                d.mkdir()
            shutil.copyfile(frame, src / frame.name)
            data.age([src / frame.name])
            cmd = [*RAW_TRANSFER, str(src), dest_for(dest), "--backfill-only", "--workers", "2"]
            proc = _popen([*cmd, "--state-dir", str(state), *flags])
            tail = LogTail(proc)
            try:
                at, start = tail.wait_for(re.compile(r"to look at"))
                _, done = tail.wait_for(_done(frame.name), at)
                alone.append(done - start)
            finally:
                _stop(proc)
                tail.close()
    return {
        "runs": len(samples),
        "samples_s": [round(s, 3) for s in samples],
        "median_s": round(statistics.median(samples), 3),
        "p99_s": round(p99(samples), 3),
        "alone_samples_s": [round(s, 3) for s in alone],
        "alone_median_s": round(statistics.median(alone), 3),
    }


def _register_all(state: Path, files: list[Path], dest: Path) -> None:
    """Fill a fresh catalog with a done row (and its event) for every file, with the
    identity each has now, through the catalog's own ``register_done``."""
    from rawtransfer.catalog.base import FileFacts, Owner, utcnow
    from rawtransfer.catalog.sqlite import SqliteCatalog
    from rawtransfer.steps.snapshot import current_identity

    catalog = SqliteCatalog(state / "catalog.sqlite3", "rawtransfer")
    owner, now = Owner(), utcnow()
    # one transaction for them all: a commit (and its fsync) per row would take minutes
    catalog._db.execute("begin")
    for p in files:
        key = hashlib.sha1(str(p).encode(), usedforsecurity=False).hexdigest()
        facts = FileFacts(
            source_filepath=str(p),
            raw_sha1=key,
            raw_size=0,
            file_created_at=now,
            identity=str(current_identity(p)),
        )
        problem = catalog.register_done(
            key, facts, f"{dest}/{data.DAY_DIR}/{p.name}.fz", now, owner, 600.0, "benchmark"
        )
        if problem:
            raise RunFailed(f"catalog refused {p}: {problem}")
    catalog._db.execute("commit")
    catalog.close()


def _inprocess_scan(src: Path, state: Path) -> tuple[float, float, int]:
    """One backfill pass as the service runs it: (wall s, CPU s, files queued)."""
    from rawtransfer.catalog.sqlite import SqliteCatalog
    from rawtransfer.queue import WorkQueue
    from rawtransfer.timers import Backfill
    from rawtransfer.watch import Matcher

    catalog = SqliteCatalog(state / "catalog.sqlite3", "rawtransfer")
    try:
        backfill = Backfill(src, Matcher(("*.fits",)), catalog, WorkQueue(), SCAN_HOURS, 0.0)
        t0, c0 = time.perf_counter(), time.process_time()
        queued = backfill()
        return time.perf_counter() - t0, time.process_time() - c0, queued
    finally:
        catalog.close()


def scan(work: Path, count: int) -> dict[str, object]:
    src, state, dest = work / f"scan-{count}", work / f"scan-{count}-state", work / "scan-dest"
    for d in (state, dest):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = data.small_tree(src, count)
    _register_all(state, files, dest)
    setup = time.perf_counter() - t0
    find = ["find", str(src), "-type", "f", "-name", "*.fits", "-mmin", str(-60 * SCAN_HOURS)]
    finds: list[Usage] = []
    for _ in range(SCAN_REPEATS):
        with Meter() as m:
            _run(find)
        finds.append(m.usage)
    fair: list[Usage] = []
    since = (datetime.now(UTC) - timedelta(hours=SCAN_HOURS)).replace(tzinfo=None)
    sql = SCAN_EVENTS_SQL.format(since=since.isoformat(sep=" "))
    for _ in range(SCAN_REPEATS):
        with Meter() as m:
            _run([*find, "-printf", SCAN_FIND_PRINTF])
            _run(["sqlite3", str(state / "catalog.sqlite3"), sql])
        fair.append(m.usage)
    passes = [_inprocess_scan(src, state) for _ in range(SCAN_REPEATS)]
    if any(q for _, _, q in passes):
        raise RunFailed(f"the backfill pass queued {passes[0][2]} of {count} handled files")
    with Meter() as whole:
        cmd = [*RAW_TRANSFER, str(src), str(dest), "--backfill-only", "--state-dir", str(state)]
        run_sampled(cmd, whole.usage)
    return {
        "files": count,
        "setup_s": round(setup, 1),
        "find_wall_s": round(statistics.median(u.wall_s for u in finds), 4),
        "find_cpu_s": round(statistics.median(u.cpu_s for u in finds), 4),
        "fair_wall_s": round(statistics.median(u.wall_s for u in fair), 4),
        "fair_cpu_s": round(statistics.median(u.cpu_s for u in fair), 4),
        "pass_wall_s": round(statistics.median(p[0] for p in passes), 4),
        "pass_cpu_s": round(statistics.median(p[1] for p in passes), 4),
        "process_wall_s": round(whole.usage.wall_s, 3),
        "process_cpu_s": round(whole.usage.cpu_s, 3),
        "process_peak_rss_mib": round(whole.usage.peak_rss_mib or 0, 1),
    }


LOOK_AT = re.compile(r"([\d,]+) files? to look at")


def _peak_queued(src: Path, state: Path, dest: Path) -> tuple[float, int]:
    """Peak RSS (MiB) of a one-off run over ``src``, stopped once its queue is full and
    the workers have run for a moment; and how many files it queued."""
    cmd = [*RAW_TRANSFER, str(src), str(dest), "--backfill-only", "--workers", "2"]
    proc = _popen([*cmd, "--state-dir", str(state), "--stop-grace", "1"])
    tail = LogTail(proc)
    peak = 0
    try:
        seen = threading.Event()
        queued: list[int] = []

        def watch() -> None:
            i, _ = tail.wait_for(LOOK_AT)
            m = LOOK_AT.search(tail.lines[i][1])
            queued.append(int(m.group(1).replace(",", "")) if m else -1)
            seen.set()

        waiter = threading.Thread(target=watch, name="queued", daemon=True)
        waiter.start()
        until = None
        while proc.poll() is None:
            peak = max(peak, status_kib(proc.pid, "VmHWM"))
            if seen.is_set() and until is None:
                until = time.monotonic() + QUEUED_HOLD
            if until is not None and time.monotonic() > until:
                break
            if not waiter.is_alive() and not seen.is_set():
                break  # the run failed before queueing anything; said below
            time.sleep(0.02)  # sampling a process that runs by itself
        peak = max(peak, status_kib(proc.pid, "VmHWM"))
        if not seen.is_set() and proc.poll() is not None:
            tail.close()
            out = "".join(x for _, x in tail.lines[-10:])
            raise RunFailed(f"raw-transfer exited {proc.returncode} before queueing:\n{out}")
    finally:
        _stop(proc)
        tail.close()
    return peak / 1024, queued[0]


def memory(work: Path, src: Path, count: int) -> dict[str, object]:
    with scratch(work / "mem") as root:
        empty, state0, state1, dest = root / "empty", root / "s0", root / "s1", root / "dest"
        for d in (empty, state0, state1, dest):
            d.mkdir()
        idle, _ = _peak_queued(empty, state0, dest)
        queued, n = _peak_queued(src, state1, dest)
    if n != count:
        raise RunFailed(f"the run queued {n} files of {count}")
    return {
        "files_queued": count,
        "peak_rss_queued_mib": round(queued, 1),
        "peak_rss_empty_mib": round(idle, 1),
        "kib_per_queued_file": round((queued - idle) * 1024 / count, 2),
    }
