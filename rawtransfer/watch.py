"""Turn the source directory into queued paths: a full scan, and watchdog events.

Only regular files whose *name* matches one of the patterns are queued; links are never
followed, hidden files (editors' and rsync's temporaries, our own) are left alone.
Reading a file produces opened and closed-without-write events: those are ignored, so
the service's own reads never queue anything.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

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

from rawtransfer.queue import WorkQueue

log = logging.getLogger(__name__)

# How often the polling observer (network filesystems) lists the tree.
POLL_INTERVAL = 5.0


class Matcher:
    def __init__(self, patterns: tuple[str, ...]) -> None:
        self._re = re.compile("|".join(fnmatch.translate(p) for p in patterns))

    def __call__(self, name: str) -> bool:
        return not name.startswith(".") and self._re.match(name) is not None


def scan(
    root: Path, matcher: Matcher, newer_than: float | None = None
) -> Iterator[tuple[Path, float]]:
    """Regular files under ``root`` matching the patterns, with their mtimes."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not matcher(name):
                continue
            path = Path(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                log.warning("skipped %r: not a regular file (links are not followed)", str(path))
                continue
            if newer_than is not None and st.st_mtime < newer_than:
                continue
            yield path, st.st_mtime


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
        # hidden directories are staging areas (as in the scan): not ours to take
        if any(p.startswith(".") for p in parts[:-1]):
            return
        if self.matcher(path.name):
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
