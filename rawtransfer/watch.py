"""Turn the source directory into queued paths: a full scan, and watchdog events.

Only regular files whose *name* matches one of the patterns are queued; links are never
followed, hidden files (editors' and rsync's temporaries, our own) are left alone.
Reading a file produces opened and closed-without-write events: those are ignored, so
the service's own reads never queue anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from operator import itemgetter
from pathlib import Path, PurePosixPath

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from rawtransfer.names import q
from rawtransfer.queue import WorkQueue
from rawtransfer.selection import NEVER_SUFFIXES, Selection

log = logging.getLogger(__name__)

# How often the polling observer (network filesystems) lists the tree.
POLL_INTERVAL = 5.0


class Matcher(Selection):
    """The patterns and the exclude rules (selection.Selection); called with a bare name,
    it answers for the patterns alone."""

    def __call__(self, name: str) -> bool:
        return self.name_matches(name)


class _Collectors(threading.local):
    def __init__(self) -> None:
        self.stack: list[list[tuple[Path, str]]] = []


_collectors = _Collectors()


@contextlib.contextmanager
def unreadable_dirs() -> Iterator[list[tuple[Path, str]]]:
    """Collect the directories that ``scan`` could not read, with the reason, for every
    scan run by this thread inside the block.

    The one-off run wants the count of a scan that Backfill drives: a collector scoped
    to the thread and the block reaches it without a parameter through every caller.
    """
    found: list[tuple[Path, str]] = []
    _collectors.stack.append(found)
    try:
        yield found
    finally:
        _collectors.stack.remove(found)


def scan(
    root: Path, matcher: Matcher, newer_than: float | None = None
) -> Iterator[tuple[Path, os.stat_result]]:
    """Regular files under ``root`` matching the patterns, with their ``lstat`` (the
    callers need the mtime and the identity: one stat per file, taken here).

    A directory that cannot be read is reported once per scan (a warning naming it, and
    to the ``unreadable_dirs`` collectors): its files are not looked at, and saying
    nothing would let a run end "all done" without them. A subdirectory that vanished
    during the scan is not an error (staging areas come and go).
    """
    for path, st in scan_paths(root, matcher, newer_than):
        yield Path(path), st


def scan_paths(
    root: Path, matcher: Matcher, newer_than: float | None = None
) -> Iterator[tuple[str, os.stat_result]]:
    """``scan``, with each path as the string ``str(Path)`` would give.

    The per-file work is kept to C calls (a pass over 100,000 files is a backfill's
    whole cost): names are matched by one compiled expression, the lstat is the
    directory entry's own (``DirEntry.stat``), relative paths are strings, and a
    ``PurePosixPath`` is built only for a file that is refused (to log it once).
    Directories are walked depth first, each one's files in name order before its
    subdirectories in name order; a link to a directory is neither walked nor reported
    (as ``os.walk`` does), a link to anything else is reported as not a regular file.
    """
    reported: set[str] = set()

    def unreadable(directory: str, exc: OSError) -> None:
        if directory in reported:
            return
        if directory != top and isinstance(exc, FileNotFoundError | NotADirectoryError):
            log.debug("directory %s vanished during the scan", q(directory))
            return
        reported.add(directory)
        reason = exc.strerror or type(exc).__name__
        log.warning(
            "cannot read directory %s (%s): its files are not looked at", q(directory), reason
        )
        for found in _collectors.stack:
            found.append((Path(directory), reason))

    top = str(root)
    name_ok = matcher.name_pattern.match  # the patterns, and not hidden
    taken = matcher.file_taken
    # without exclude rules, a file that is not empty and whose name has neither a
    # temporary suffix nor starts like a core dump is taken: file_taken's answer,
    # without its two calls
    plain = not matcher.rules
    never = NEVER_SUFFIXES
    by_name = itemgetter(0)
    is_reg = stat.S_ISREG
    # (directory, its path relative to root with a trailing "/", or "" for root)
    stack: list[tuple[str, str]] = [(top, "")]
    while stack:
        dirpath, rel = stack.pop()
        files: list[tuple[str, os.DirEntry[str]]] = []
        subdirs: list[str] = []
        try:
            # the entries' lstat is then an fstatat on this descriptor: no lookup of the
            # whole path per file
            fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            unreadable(dirpath, exc)
            continue
        try:
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        name = entry.name
                        try:
                            is_dir = entry.is_dir()
                        except OSError:
                            is_dir = False
                        if is_dir:
                            try:
                                link = entry.is_symlink()
                            except OSError:
                                link = False
                            if not link:
                                subdirs.append(name)
                        elif name_ok(name) is not None:
                            files.append((name, entry))
            except OSError as exc:  # reading on failed: none of it is looked at
                unreadable(dirpath, exc)
                continue
            prefix = dirpath if dirpath.endswith("/") else dirpath + "/"
            files.sort(key=by_name)  # names are unique: the entries are not compared
            for name, entry in files:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # a directory that can be listed but not searched
                    unreadable(dirpath, exc)
                    continue
                if not is_reg(st.st_mode):
                    matcher.say_once(
                        PurePosixPath(rel + name), "not a regular file (links are not followed)"
                    )
                    continue
                if newer_than is not None and st.st_mtime < newer_than:
                    continue
                if not (
                    plain
                    and st.st_size
                    and not name.endswith(never)
                    and not name.startswith("core")
                ) and not taken(rel, name, st.st_size):
                    continue
                yield prefix + name, st
        finally:
            os.close(fd)
        # an excluded directory is not even listed; pushed in reverse: popped in order
        for d in sorted(subdirs, reverse=True):
            if (
                not d.startswith(".")
                and matcher.excluded(PurePosixPath(rel + d), is_dir=True) is None
            ):
                stack.append((prefix + d, rel + d + "/"))


class Handler(FileSystemEventHandler):
    def __init__(self, queue: WorkQueue, matcher: Matcher, root: Path) -> None:
        self.queue = queue
        self.matcher = matcher
        self.root = root

    def _take(self, raw: str | bytes, *, closed: bool) -> None:
        path = Path(os.fsdecode(raw))
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return
        # hidden directories are staging areas (as in the scan): not ours to take; the
        # size is not known here (an empty file is skipped when it is processed)
        if self.matcher.wants(PurePosixPath(*parts)):
            self.queue.put(path, closed=closed)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self._take(event.dest_path, closed=True)
        elif isinstance(event, FileClosedEvent):  # closed after writing
            self._take(event.src_path, closed=True)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self._take(event.src_path, closed=False)
        # FileOpenedEvent, FileClosedNoWriteEvent, deletions: nothing to do


class OverflowWatch(logging.Handler):
    """Calls ``on_overflow`` when watchdog reports an inotify queue overflow.

    watchdog only logs that events were lost (and rebuilds its watches); it does not
    replay them, so the service must rescan the source itself.
    """

    LOGGER = "watchdog.observers.inotify_c"

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow
        logging.getLogger(self.LOGGER).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            log.error("inotify queue overflowed: events were lost; rescanning the source")
            self.on_overflow()

    def close(self) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)
        super().close()


def make_observer(polling: bool) -> BaseObserver:
    return PollingObserver(timeout=POLL_INTERVAL) if polling else Observer()


def start_observer(
    root: Path, queue: WorkQueue, matcher: Matcher, polling: bool
) -> tuple[BaseObserver, Handler]:
    observer = make_observer(polling)
    handler = Handler(queue, matcher, root)
    observer.schedule(handler, str(root), recursive=True)
    observer.daemon = True
    observer.start()
    return observer, handler


class Watcher:
    """The observer on the source directory, which can be disarmed and armed again.

    inotify watches an inode, not a path: when SOURCE_DIR goes away or is replaced, the
    old observer watches nothing (watchdog stops its emitter when the directory is
    deleted) or the wrong directory (one moved away is followed), so the service
    disarms it and arms a new one on whatever directory holds the name when it is back.
    """

    def __init__(self, root: Path, queue: WorkQueue, matcher: Matcher, polling: bool) -> None:
        self.root = root
        self.queue = queue
        self.matcher = matcher
        self.polling = polling
        self._observer: BaseObserver | None = None
        self.failing = False  # the last attempt to arm failed (and was said)

    @property
    def alive(self) -> bool:
        """The observer and its emitter both run. watchdog ends the emitter alone when
        the watched directory is deleted (IN_DELETE_SELF): a directory removed and
        created again between two looks can even get the same inode number back, so
        this is how that case is seen."""
        obs = self._observer
        if obs is None or not obs.is_alive():
            return False
        emitters = obs.emitters
        return bool(emitters) and all(e.is_alive() for e in emitters)

    def arm(self) -> bool:
        """Start watching (again); False, said once until it works, if it cannot."""
        self.disarm()
        try:
            self._observer, _ = start_observer(self.root, self.queue, self.matcher, self.polling)
        except OSError as exc:  # gone again, or out of inotify watches
            if not self.failing:
                log.error("cannot watch %s: %s", q(self.root), exc)
            self.failing = True
            return False
        self.failing = False
        return True

    def disarm(self, timeout: float = 15.0) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None
