"""Logging, set up once at the entry point: one line per event, journald-friendly.

Under systemd (``JOURNAL_STREAM`` set) the time stamp is left to the journal; the level
and thread name are always there, and file names are escaped by the callers (names.q),
so every event stays on one line.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

FORMAT = "%(levelname)s [%(threadName)s] %(name)s: %(message)s"


class OneLine(logging.Filter):
    """A library's message with line breaks (libpq's "connection refused" and its hint)
    would make several journal entries, the later ones without a level: fold it. A
    traceback (exc_info) is formatted after this and stays as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "\n" in msg:
            record.msg = " ".join(part.strip() for part in msg.splitlines() if part.strip())
            record.args = None
        return True


def setup(verbose: bool = False, logfile: Path | None = None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level = logging.DEBUG if verbose else logging.INFO
    root.setLevel(level)
    stream = logging.StreamHandler(sys.stderr)
    fmt = FORMAT if os.environ.get("JOURNAL_STREAM") else "%(asctime)s " + FORMAT
    stream.setFormatter(logging.Formatter(fmt))
    stream.addFilter(OneLine())
    root.addHandler(stream)
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        # WatchedFileHandler reopens the file when logrotate moves it away
        fh = logging.handlers.WatchedFileHandler(logfile)
        fh.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))
        fh.addFilter(OneLine())
        root.addHandler(fh)
    # the libraries' chatter is debugging material, not events
    for noisy in ("watchdog", "paramiko", "psycopg", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
    # paramiko's transport thread logs every connection that fails (a dead link, a banner
    # that never came) as ERROR lines of a traceback, a dozen per attempt all through an
    # outage; the destination reports the same failure as one line of its own
    if not verbose:
        logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


def reopen() -> None:
    """Reopen log files (SIGHUP), for log rotation without copytruncate."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.acquire()
            try:
                if h.stream:
                    h.stream.close()
                h.stream = h._open()
            finally:
                h.release()
