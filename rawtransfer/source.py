"""Is SOURCE_DIR still there, readable, and the directory the watcher was armed on?

A source directory removed (and perhaps created again), made unreadable, or replaced by
another directory under the same name (a disk mounted over it or unmounted from under
it) would otherwise leave the watcher blind without a word. The service's main loop
asks ``SourceHealth`` at every tick and re-arms the watcher when it says so.
"""

from __future__ import annotations

import enum
import logging
import os
import stat
import time
from pathlib import Path

from rawtransfer.alerts import Alerter
from rawtransfer.names import q

log = logging.getLogger(__name__)

ALERT_KIND = "source unavailable"


class Change(enum.Enum):
    NONE = "none"
    LOST = "lost"  # stop watching: there is nothing (or nothing readable) to watch
    REARM = "rearm"  # watch the directory now under the name, and rescan it


def identity(root: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(device, inode) of the directory at ``root``, or None and why it is unusable."""
    try:
        st = os.stat(root)  # SOURCE_DIR may be a link to the data disk: follow it
    except FileNotFoundError:
        return None, "it does not exist"
    except OSError as exc:
        return None, f"cannot look at it ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return None, "it is not a directory"
    if not os.access(root, os.R_OK | os.X_OK):
        return None, "it is not readable"
    return (st.st_dev, st.st_ino), None


class SourceHealth:
    """Watch the watched directory itself.

    Its loss is logged once at error level, alerted after ``alert_after`` seconds (as
    the canary does for the destination) and resolved when it is back. A replacement
    (the device or inode behind the name changed without a loss seen in between) is
    logged and alerted at once: the files may now be going to another disk.
    """

    def __init__(self, root: Path, alerter: Alerter, alert_after: float) -> None:
        self.root = root
        self.alerter = alerter
        self.alert_after = alert_after
        self.identity, self.problem = identity(root)
        self.down_since = time.monotonic() if self.problem else 0.0
        self.alerted = False

    @property
    def healthy(self) -> bool:
        return self.problem is None

    def __call__(self) -> Change:
        now = time.monotonic()
        ident, problem = identity(self.root)
        if problem is not None:
            change = Change.LOST if self.problem is None else Change.NONE
            if change is Change.LOST:
                self.down_since = now
                log.error(
                    "SOURCE_DIR %s unavailable: %s; not watching until it is back",
                    q(self.root),
                    problem,
                )
            self.problem = problem
            down = now - self.down_since
            if not self.alerted and down >= self.alert_after:
                self.alerted = True
                self.alerter.alert(
                    ALERT_KIND, f"SOURCE_DIR {q(self.root)}: {problem} (for {down:.0f} s)"
                )
            return change
        if self.problem is not None:
            down = now - self.down_since
            other = " (a different directory: device or inode changed)"
            log.warning(
                "SOURCE_DIR %s is back after %.0f s%s; watching it again and rescanning",
                q(self.root),
                down,
                other if ident != self.identity else "",
            )
            if self.alerted:
                self.alerted = False
                self.alerter.resolve(
                    ALERT_KIND, f"SOURCE_DIR {q(self.root)} back after {down:.0f} s"
                )
            self.problem, self.identity = None, ident
            return Change.REARM
        if ident != self.identity:
            text = (
                f"SOURCE_DIR {q(self.root)} was replaced: device/inode {_show(self.identity)} "
                f"is now {_show(ident)} (another mount, or removed and created again)"
            )
            log.error("%s; watching the new directory and rescanning", text)
            self.alerter.alert(ALERT_KIND, text)
            self.identity = ident
            return Change.REARM
        return Change.NONE

    def status(self) -> str:
        """For the status line: empty while all is well."""
        return f"SOURCE UNAVAILABLE: {self.problem}" if self.problem else ""


def _show(ident: tuple[int, int] | None) -> str:
    return f"{ident[0]}/{ident[1]}" if ident else "none"
