"""The progress of a one-off run: a status line in the log off a terminal, a tqdm bar on
one (a real pseudo-terminal), and plural words that agree with their numbers."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

import pytest

from rawtransfer import synth
from rawtransfer.names import plural
from rawtransfer.outcome import Outcome, Result
from rawtransfer.progress import Progress
from rawtransfer.workers import Stats
from tests.conftest import Tree
from tests.helpers import RAW_TRANSFER, run_rt


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_a_status_line_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rawtransfer.progress")
    stats, clock, stream = Stats(), Clock(), io.StringIO()
    progress = Progress(4, stats, stream, interval=10.0, clock=clock)
    progress.tick()
    assert not caplog.records  # nothing to say yet
    clock.now += 4
    stats.add(Outcome(Result.DONE, Path("/s/a.fits"), raw_size=3_000_000))
    stats.add(Outcome(Result.QUARANTINED, Path("/s/b.fits"), reason="corrupt"))
    progress.tick()
    assert not caplog.records  # not before the interval
    clock.now += 6
    progress.tick()
    progress.tick()  # once per interval, however often it is ticked
    assert [r.getMessage() for r in caplog.records] == [
        "backfill: 2 of 4 files (50%), 3.0 MB, 0.2 files/s, 0.3 MB/s, about 10 s left"
    ]
    progress.close()
    assert stream.getvalue() == ""  # no bar, no carriage returns in a log


def test_the_status_line_counts_every_outcome_and_says_when_it_is_over() -> None:
    stats, clock = Stats(), Clock()
    progress = Progress(1, stats, io.StringIO(), clock=clock)
    clock.now += 2
    stats.add(Outcome(Result.DONE, Path("/s/a.fits"), raw_size=1_000_000))
    stats.given_up(Path("/s/b.fits"), "destination down")  # re-queued, then given up
    # more files finished than were queued (one changed and was taken again)
    assert progress.line() == "backfill: 2 of 2 files (100%), 1.0 MB, 1.0 files/s, 0.5 MB/s"
    progress.close()


def test_backfill_only_off_a_terminal_prints_no_bar(tree: Tree) -> None:
    synth.night(tree.src, 3, (64, 48))
    tree.settled()
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "file/s" not in r.stderr
    assert "backfill: 3 files to look at" in r.stderr
    assert "raw-transfer: 3 files in" in r.stdout and "0 duplicates," in r.stdout


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every end of the terminal is closed
            return out
        if not chunk:
            return out
        out += chunk


def test_backfill_only_on_a_terminal_shows_a_bar(tree: Tree) -> None:
    synth.night(tree.src, 3, (64, 48))
    tree.settled()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        proc = subprocess.Popen(
            [
                *map(str, RAW_TRANSFER),
                str(tree.src),
                str(tree.dest),
                "--backfill-only",
                "--state-dir",
                str(tree.state),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        slave = -1
        err = _read_all(master).decode(errors="replace")
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, err
    assert "3/3" in err and "100%" in err and "file/s" in err, err
    assert " MB/s" in err  # bytes and their rate beside the files
    # the log lines are written above the bar, each on a line of its own
    done = [ln for ln in err.replace("\r", "\n").splitlines() if " done " in ln]
    assert len(done) == 3 and all(ln.split()[2] == "INFO" for ln in done), err
    assert "raw-transfer: 3 files in" in out


@pytest.mark.parametrize(
    ("n", "word", "many", "text"),
    [
        (0, "file", None, "0 files"),
        (1, "file", None, "1 file"),
        (2, "duplicate", None, "2 duplicates"),
        (1, "unreadable directory", "unreadable directories", "1 unreadable directory"),
        (3, "unreadable directory", "unreadable directories", "3 unreadable directories"),
    ],
)
def test_plural(n: int, word: str, many: str | None, text: str) -> None:
    assert plural(n, word, many) == text


def test_one_file_is_one_file_in_the_log_and_the_summary(tree: Tree) -> None:
    (frame,) = synth.night(tree.src, 1, (64, 48))
    (tree.src / "copy.fits").write_bytes(frame.read_bytes())
    tree.settled()
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state, "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "backfill: 2 files to look at" in r.stderr
    assert "raw-transfer: 2 files in" in r.stdout
    assert "1 done," in r.stdout and "1 duplicate," in r.stdout
    assert "1 files" not in r.stdout + r.stderr and "1 duplicates" not in r.stdout
