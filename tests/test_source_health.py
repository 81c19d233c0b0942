"""The source itself under fault: SOURCE_DIR renamed away, removed and recreated, swapped
for another directory, made unreadable; unreadable subdirectories in a one-off run.

inotify watches an inode, not a path, so each of these left the watcher blind without a
word. The tests run the real daemon (one looks at the Watcher alone). The backfill timer
is set to a day, so whatever is found after the source returns was found by the re-armed
watcher and its rescan.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rawtransfer import synth
from rawtransfer.queue import WorkQueue
from rawtransfer.watch import Matcher, Watcher
from tests.conftest import Tree
from tests.helpers import RAW_TRANSFER, sqlite_rows, start_watcher, wait_for
from tests.test_service import FakeSlack

# The service's main loop ticks at half the unit's WatchdogSec: 0.5 s here instead of
# the 5 s default, so that a source that goes and comes back is noticed quickly.
FAST_TICK = {"WATCHDOG_USEC": "1000000"}
# Root reads every directory whatever its mode; without these two capabilities it is
# held to the permission bits like any other user (the service runs as its own user).
NO_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


def as_service_user() -> list[str]:
    return NO_DAC if os.geteuid() == 0 else []


class NotifySocket:
    """What the service tells systemd: the datagrams sent to NOTIFY_SOCKET, read as
    they come (as systemd does: a full socket would block the sender)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-reader")
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue

    def last_status(self) -> str:
        for m in reversed(list(self.messages)):
            for line in m.splitlines():
                if line.startswith("STATUS="):
                    return line[len("STATUS=") :]
        return ""

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    s = FakeSlack()
    yield s
    s.close()


def start(
    tree: Tree, notify: NotifySocket, slack: FakeSlack, prefix: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tree.root / "rt.log"
    env = {
        **FAST_TICK,
        "NOTIFY_SOCKET": str(notify.path),
        "RAWTRANSFER_SLACK_WEBHOOK_URL": slack.url,
    }
    args = (
        "--patience",
        "1",
        "--canary-interval",
        "0.5",
        "--backfill-interval",
        "86400",
        "--alert-after",
        "0",
        "--alert-interval",
        "1",
        "--keep-source",
    )
    if not prefix:
        return start_watcher(tree.src, tree.dest, tree.state, log, *args, env=env), log
    # start_watcher with a command prefix (setpriv): the same command line
    proc = subprocess.Popen(
        [
            *prefix,
            *RAW_TRANSFER,
            str(tree.src),
            str(tree.dest),
            "--patterns",
            "*.fits",
            "--state-dir",
            str(tree.state),
            "--workers",
            "2",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env={**os.environ, **env},
    )
    wait_for(lambda: b"watching" in log.read_bytes() or proc.poll() is not None, 30, "start")
    assert proc.poll() is None, log.read_text()
    return proc, log


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    return proc.wait(60)


def drop(tree: Tree, directory: Path, name: str, seed: int) -> Path:
    """A frame moved into ``directory`` (written aside first, as a camera's software does)."""
    staged = synth.write_frame(tree.root / f".{name}", (64, 64), seed=seed)
    final = directory / name
    os.rename(staged, final)
    return final


def archived(tree: Tree) -> set[str]:
    return {p.name for p in tree.dest.rglob("*.fz")}


def lines(log: Path, text: str) -> list[str]:
    return [ln for ln in log.read_text(errors="replace").splitlines() if text in ln]


def exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE): the path never
    disappears, only the directory behind it changes, as when a disk is mounted over it."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def test_source_renamed_away_is_reported_and_rearmed_when_back(
    tree: Tree, notify: NotifySocket, slack: FakeSlack
) -> None:
    proc, log = start(tree, notify, slack)
    try:
        drop(tree, tree.src, "a.fits", 1)
        wait_for(lambda: archived(tree) == {"a.fits.fz"}, 30, "the first frame")
        assert "source" not in notify.last_status().lower()
        away = tree.root / "src.away"
        tree.src.rename(away)
        wait_for(lambda: bool(lines(log, "SOURCE_DIR")), 30, "the log line")
        wait_for(lambda: "SOURCE UNAVAILABLE" in notify.last_status(), 30, "the status")
        wait_for(lambda: any("source unavailable" in m for m in slack.messages), 30, "the alert")
        # a frame arrives while the directory is away, then the directory comes back
        drop(tree, away, "b.fits", 2)
        away.rename(tree.src)
        wait_for(lambda: "b.fits.fz" in archived(tree), 30, "the frame that arrived meanwhile")
        drop(tree, tree.src, "c.fits", 3)
        wait_for(lambda: "c.fits.fz" in archived(tree), 30, "a frame after the return")
        wait_for(lambda: any("resolved" in m for m in slack.messages), 30, "resolved")
        wait_for(lambda: "SOURCE" not in notify.last_status(), 30, "the status to clear")
    finally:
        rc = stop(proc)
    assert rc == 0
    assert archived(tree) == {"a.fits.fz", "b.fits.fz", "c.fits.fz"}
    down = lines(log, "unavailable: it does not exist")
    assert len(down) == 1 and " ERROR " in down[0], down  # logged once, at error level
    assert lines(log, "is back after"), log.read_text()
    assert "Traceback" not in log.read_text()


def test_source_removed_and_created_again_is_watched_again(
    tree: Tree, notify: NotifySocket, slack: FakeSlack
) -> None:
    proc, log = start(tree, notify, slack)
    try:
        drop(tree, tree.src, "a.fits", 1)
        wait_for(lambda: archived(tree) == {"a.fits.fz"}, 30, "the first frame")
        # removed, seen missing, created again: inotify's watch died with the directory
        shutil.rmtree(tree.src)
        wait_for(lambda: bool(lines(log, "unavailable: it does not exist")), 30, "the log line")
        tree.src.mkdir()
        wait_for(lambda: bool(lines(log, "is back after")), 30, "the return")
        drop(tree, tree.src, "b.fits", 2)
        wait_for(lambda: "b.fits.fz" in archived(tree), 30, "a frame in the new directory")
        # removed and created again between two looks: the new directory may even have
        # the old inode number (ext4 hands it out again at once), so only the ended
        # watch tells
        shutil.rmtree(tree.src)
        tree.src.mkdir()
        drop(tree, tree.src, "c.fits", 3)
        wait_for(lambda: "c.fits.fz" in archived(tree), 30, "a frame after the quick swap")
    finally:
        rc = stop(proc)
    assert rc == 0
    assert archived(tree) == {"a.fits.fz", "b.fits.fz", "c.fits.fz"}
    assert "Traceback" not in log.read_text()


def test_watcher_is_not_alive_once_its_directory_is_deleted(tmp_path: Path) -> None:
    """A directory removed and created again between two looks can have the same device
    and inode numbers: the watch that ended is what shows it."""
    src = tmp_path / "src"
    src.mkdir()
    watcher = Watcher(src, WorkQueue(), Matcher(("*.fits",)), polling=False)
    assert watcher.arm()
    try:
        assert watcher.alive
        shutil.rmtree(src)
        src.mkdir()
        wait_for(lambda: not watcher.alive, 10, "the watcher to notice")
        assert watcher.arm()  # re-armed on the new directory, it sees files again
        queue = watcher.queue
        drop_at = synth.write_frame(tmp_path / ".x", (32, 32))
        os.rename(drop_at, src / "x.fits")
        wait_for(lambda: queue.pending() == [src / "x.fits"], 10, "the event")
    finally:
        watcher.disarm()


def test_source_replaced_in_one_step_is_alerted_and_watched(
    tree: Tree, notify: NotifySocket, slack: FakeSlack
) -> None:
    other = tree.root / "other-disk"
    other.mkdir()
    proc, log = start(tree, notify, slack)
    try:
        drop(tree, tree.src, "a.fits", 1)
        wait_for(lambda: archived(tree) == {"a.fits.fz"}, 30, "the first frame")
        drop(tree, other, "b.fits", 2)  # already on the directory that takes the name
        exchange(tree.src, other)
        wait_for(lambda: bool(lines(log, "was replaced")), 30, "the log line")
        wait_for(lambda: any("replaced" in m for m in slack.messages), 30, "the alert")
        wait_for(lambda: "b.fits.fz" in archived(tree), 30, "the frame already there")
        drop(tree, tree.src, "c.fits", 3)
        wait_for(lambda: "c.fits.fz" in archived(tree), 30, "a frame after the swap")
    finally:
        rc = stop(proc)
    assert rc == 0
    assert archived(tree) == {"a.fits.fz", "b.fits.fz", "c.fits.fz"}
    replaced = lines(log, "was replaced")
    assert len(replaced) == 1 and " ERROR " in replaced[0], replaced
    assert "Traceback" not in log.read_text()


def test_source_unreadable_is_reported_until_readable_again(
    tree: Tree, notify: NotifySocket, slack: FakeSlack
) -> None:
    proc, log = start(tree, notify, slack, prefix=as_service_user())
    try:
        tree.src.chmod(0)
        wait_for(lambda: bool(lines(log, "unavailable: it is not readable")), 30, "the log line")
        wait_for(lambda: "SOURCE UNAVAILABLE" in notify.last_status(), 30, "the status")
        drop(tree, tree.src, "a.fits", 1)  # written by someone allowed to
        tree.src.chmod(0o755)
        wait_for(lambda: "a.fits.fz" in archived(tree), 30, "the frame that arrived meanwhile")
        drop(tree, tree.src, "b.fits", 2)
        wait_for(lambda: "b.fits.fz" in archived(tree), 30, "a frame afterwards")
        wait_for(lambda: any("resolved" in m for m in slack.messages), 30, "resolved")
    finally:
        tree.src.chmod(0o755)
        rc = stop(proc)
    assert rc == 0
    assert len(lines(log, "unavailable: it is not readable")) == 1
    assert "Traceback" not in log.read_text()


def test_backfill_only_reports_unreadable_directories_and_exits_1(tree: Tree) -> None:
    readable = drop(tree, tree.src, "a.fits", 1)
    locked = tree.src / "locked"  # no read, no search
    locked.mkdir()
    drop(tree, locked, "b.fits", 2)
    listable = tree.src / "listable"  # names can be read, the files cannot be looked at
    listable.mkdir()
    drop(tree, listable, "c.fits", 3)
    tree.settled(readable)
    locked.chmod(0)
    listable.chmod(0o644)
    try:
        r = subprocess.run(
            [
                *as_service_user(),
                *RAW_TRANSFER,
                str(tree.src),
                str(tree.dest),
                "--patterns",
                "*.fits",
                "--state-dir",
                str(tree.state),
                "--backfill-only",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        locked.chmod(0o755)
        listable.chmod(0o755)
    assert r.returncode == 1, r.stdout + r.stderr
    assert archived(tree) == {"a.fits.fz"}
    # each named once in the log, with the count, and in the summary
    for d in (locked, listable):
        warned = [ln for ln in r.stderr.splitlines() if str(d) in ln]
        assert len(warned) == 1 and "WARNING" in warned[0], r.stderr
        assert [ln for ln in r.stdout.splitlines() if "unreadable" in ln and str(d) in ln]
    assert "2 unreadable directories" in r.stderr
    assert "2 unreadable directories" in r.stdout.splitlines()[0], r.stdout
    rows = sqlite_rows(tree.state / "catalog.sqlite3")
    assert [r["state"] for r in rows] == ["done"]
