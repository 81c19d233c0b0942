"""How far a one-off ``--backfill-only`` run has got: files, bytes, rate and time left.

On a terminal, a progress bar (tqdm) below the log lines; anywhere else (a pipe, a file,
the journal), where a bar would be a stream of carriage returns, one status line in the
log every ``STATUS_INTERVAL`` seconds instead. The figures are read from the workers'
Stats, so nothing in the workers knows about either.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from rawtransfer.names import plural
from rawtransfer.workers import Stats

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

# Often enough that a long catch-up is seen to move, rarely enough that the log of a
# one-off run of a night's frames stays short.
STATUS_INTERVAL = 10.0


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Call ``tick()`` now and then while the pool works, and ``close()`` at the end."""

    def __init__(
        self,
        total: int,
        stats: Stats,
        stream: TextIO | None = None,
        *,
        interval: float = STATUS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stats = stats
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._last_line = self.started
        self._bar: tqdm[Any] | None = None
        self._redirect = contextlib.ExitStack()
        if total and self.stream.isatty():
            # imported on a terminal only: off one (a service, a cron job) it is RSS for
            # nothing
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(
                total=total,
                unit="file",
                file=self.stream,
                dynamic_ncols=True,
                smoothing=0.1,
            )
            # log lines are written above the bar, never through it
            self._redirect.enter_context(logging_redirect_tqdm())

    def _figures(self) -> tuple[int, int]:
        """(files finished, whatever their outcome; raw bytes of the files done)"""
        return sum(self.stats.counts.values()), self.stats.raw_bytes

    def line(self) -> str:
        """One status line: files, bytes, rates and the time left."""
        files, nbytes = self._figures()
        elapsed = max(self.clock() - self.started, 1e-9)
        total = max(self.total, files)
        pct = 100.0 * files / total if total else 100.0
        text = (
            f"backfill: {files} of {plural(total, 'file')} ({pct:.0f}%), "
            f"{nbytes / 1e6:.1f} MB, {files / elapsed:.1f} files/s, "
            f"{nbytes / 1e6 / elapsed:.1f} MB/s"
        )
        if files and files < total:
            text += f", about {_duration((total - files) * elapsed / files)} left"
        return text

    def tick(self) -> None:
        files, nbytes = self._figures()
        if self._bar is not None:
            if files > (self._bar.total or 0):
                self._bar.total = files  # a file changed meanwhile and was taken again
            self._bar.n = files
            elapsed = max(self.clock() - self.started, 1e-9)
            self._bar.set_postfix_str(
                f"{nbytes / 1e6:.1f} MB, {nbytes / 1e6 / elapsed:.1f} MB/s", refresh=False
            )
            self._bar.refresh()
        elif self.total and self.clock() - self._last_line >= self.interval:
            self._last_line = self.clock()
            log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self.tick()
            self._bar.close()
            self._bar = None
        self._redirect.close()
