"""The service as a daemon process: canary pause/resume, alerts, sd_notify, backfill."""

from __future__ import annotations

import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from rawtransfer import synth
from rawtransfer.catalog.base import FileFacts, Owner, State
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.queue import WorkQueue
from rawtransfer.sdnotify import Notifier
from rawtransfer.timers import Backfill, Backlog
from rawtransfer.watch import Matcher, OverflowWatch
from tests.conftest import Tree
from tests.helpers import sqlite_rows, start_watcher, wait_for


class FakeSlack:
    """A local HTTP server standing in for Slack's webhook endpoint."""

    def __init__(self, hang: float = 0.0) -> None:
        self.messages: list[str] = []
        self.in_request = threading.Event()
        self.release = threading.Event()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.in_request.set()
                if hang:
                    outer.release.wait(hang)
                outer.messages.append(json.loads(body)["text"])
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/s3cr3tt0ken"
        self.thread = threading.Thread(target=self.server.serve_forever, name="pool-fakeslack")
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    s = FakeSlack()
    yield s
    s.close()


def start(
    tree: Tree, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tree.root / "rt.log"
    args = ("--patience", "1", "--canary-interval", "0.5", *extra)
    return start_watcher(tree.src, tree.dest, tree.state, log, *args, env=env), log


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    return proc.wait(60)


def drop(tree: Tree, name: str, seed: int, **kw: object) -> Path:
    staged = synth.write_frame(tree.root / f".{name}", (64, 64), seed=seed, **kw)  # type: ignore[arg-type]
    final = tree.src / name
    os.rename(staged, final)
    return final


def test_canary_pauses_while_destination_is_away_and_resumes(tree: Tree) -> None:
    proc, log = start(tree, "--alert-after", "0")
    try:
        drop(tree, "a.fits", 1)
        wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == 1, 30, "first file")
        away = tree.root / "unmounted"
        tree.dest.rename(away)  # the archive's filesystem goes away
        wait_for(lambda: b"destination unavailable, pausing" in log.read_bytes(), 30, "pause")
        for i in range(3):
            drop(tree, f"b{i}.fits", 10 + i)
        # files keep arriving locally; nothing is failed and the root is never recreated
        assert not tree.dest.exists()
        away.rename(tree.dest)
        wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == 4, 60, "all files after resume")
        wait_for(lambda: b"transfers resume" in log.read_bytes(), 30, "resume")
    finally:
        rc = stop(proc)
    assert rc == 0
    rows = sqlite_rows(tree.state / "catalog.sqlite3")
    assert sorted(r["state"] for r in rows) == ["done"] * 4
    assert b"Traceback" not in log.read_bytes()


def test_alerts_are_grouped_and_resolved(tree: Tree, slack: FakeSlack) -> None:
    env = {"RAWTRANSFER_SLACK_WEBHOOK_URL": slack.url}
    proc, log = start(tree, "--alert-interval", "3", "--alert-after", "0", env=env)
    try:
        for i in range(4):
            p = drop(tree, f"bad{i}.fits", i)
            b = bytearray(p.read_bytes())
            b[-500] ^= 1
            p.write_bytes(bytes(b))
        wait_for(
            lambda: sum("file quarantined" in m for m in slack.messages) >= 2, 30, "grouped alerts"
        )
        quarantined = [m for m in slack.messages if "file quarantined" in m]
        # the first went out alone at once; the rest were grouped into one message
        assert "bad" in quarantined[0]
        assert any("in the last" in m for m in quarantined[1:])
        tree.dest.rename(tree.root / "away")
        wait_for(lambda: any("destination down" in m for m in slack.messages), 30, "down alert")
        (tree.root / "away").rename(tree.dest)
        wait_for(lambda: any("resolved" in m for m in slack.messages), 30, "resolved alert")
    finally:
        rc = stop(proc)
    assert rc == 0
    assert "s3cr3tt0ken" not in log.read_text()


def test_hanging_webhook_does_not_hold_up_transfers(tree: Tree) -> None:
    slack = FakeSlack(hang=120)
    try:
        env = {"RAWTRANSFER_SLACK_WEBHOOK_URL": slack.url}
        proc, _log = start(tree, env=env)
        try:
            bad = drop(tree, "bad.fits", 99)
            bad.write_bytes(bad.read_bytes()[: -2880 * 2] + b"\0" * 5760)  # corrupt data
            wait_for(slack.in_request.is_set, 30, "the webhook to be called")
            for i in range(5):
                drop(tree, f"ok{i}.fits", i)
            wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == 5, 60, "transfers")
            assert not slack.messages  # the webhook is still hanging meanwhile
        finally:
            rc = stop(proc)
        assert rc == 0
    finally:
        slack.close()


def test_sd_notify_ready_status_and_watchdog(tree: Tree, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
    proc, _log = start(tree, env=env)
    got: list[str] = []
    try:
        while not any("WATCHDOG=1" in m for m in got) or not any("STATUS=" in m for m in got):
            got.append(sock.recv(4096).decode())
    finally:
        rc = stop(proc)
        sock.close()
    assert rc == 0
    assert got[0].startswith("READY=1")
    assert any("queued" in m for m in got)


def test_notifier_abstract_socket() -> None:
    name = f"rawtransfer-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier("@" + name)
        assert n.ready("starting")
        assert sock.recv(100) == b"READY=1\nSTATUS=starting"
        n.close()
        assert not Notifier("").enabled and not Notifier("").ready()
    finally:
        sock.close()


def test_backfill_queues_only_unhandled_files_in_the_window(tree: Tree) -> None:
    cat = SqliteCatalog(tree.state / "c.sqlite3", "rawtransfer")
    try:
        q = WorkQueue()
        old = synth.write_frame(tree.src / "old.fits", (32, 32), seed=1)
        handled = synth.write_frame(tree.src / "handled.fits", (32, 32), seed=2)
        (tree.src / "sub").mkdir()
        missed = synth.write_frame(tree.src / "sub" / "missed.fits", (32, 32), seed=3)
        synth.write_frame(tree.src / "young.fits", (32, 32), seed=4)  # inside the recency window
        hidden = tree.src / ".staging"
        hidden.mkdir()
        synth.write_frame(hidden / "staged.fits", (32, 32), seed=5)
        now = time.time()
        os.utime(old, (now - 3 * 3600, now - 3 * 3600))
        for p in (handled, missed):
            os.utime(p, (now - 1800, now - 1800))
        owner = Owner("h", 1)
        facts = FileFacts(str(handled), "r" * 40, 1, datetime(2026, 1, 1))
        cat.mark_failed("x" * 40, facts, State.QUARANTINED, "bad", owner)
        n = Backfill(tree.src, Matcher(("*.fits",)), cat, q, hours=2, recency_window=600)()
        assert n == 1
        assert q.pending() == [missed]
    finally:
        cat.close()


def test_overflow_triggers_a_rescan() -> None:
    hits: list[int] = []
    w = OverflowWatch(lambda: hits.append(1))
    try:
        logging.getLogger(OverflowWatch.LOGGER).warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        logging.getLogger(OverflowWatch.LOGGER).warning("something else")
    finally:
        w.close()
    assert hits == [1]


def test_backlog_alert_fires_once_and_resolves() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, str]] = []

        def alert(self, kind: str, text: str) -> None:
            self.calls.append(("alert", kind, text))

        def resolve(self, kind: str, text: str) -> None:
            self.calls.append(("resolve", kind, text))

        def close(self) -> None:
            pass

    q = WorkQueue()
    rec = Recorder()
    b = Backlog(q, rec, threshold=0.0)
    assert not b()  # empty queue: nothing late
    q.put(Path("/x/late.fits"))
    assert b() and b()
    assert [c[:2] for c in rec.calls] == [("alert", "backlog")]
    assert "late.fits" in rec.calls[0][2]
    item = q.get(timeout=0)
    assert item is not None
    q.done(item)
    assert not b()
    assert [c[:2] for c in rec.calls] == [("alert", "backlog"), ("resolve", "backlog")]


def test_reading_source_files_queues_nothing(tmp_path: Path) -> None:
    """watchdog reports opened and closed-without-write events for reads: ignored."""
    from rawtransfer.watch import start_observer

    q = WorkQueue()
    src = tmp_path / "src"
    src.mkdir()
    observer, _ = start_observer(src, q, Matcher(("*.fits",)), polling=False)
    try:
        f = synth.write_frame(tmp_path / ".a", (32, 32))
        os.rename(f, src / "a.fits")
        wait_for(lambda: q.depth()[0] == 1, 10, "the move event")
        item = q.get(timeout=1)
        assert item is not None
        q.done(item)
        for _ in range(5):  # the service's own reads: check, hash, pack
            (src / "a.fits").read_bytes()
        # a sentinel after the reads: inotify delivers events in order
        g = synth.write_frame(tmp_path / ".b", (32, 32), seed=2)
        os.rename(g, src / "b.fits")
        wait_for(lambda: q.depth()[0] >= 1, 10, "the sentinel")
        assert q.pending() == [src / "b.fits"]
    finally:
        observer.stop()
        observer.join(10)


def test_sighup_reopens_the_log_file(tree: Tree) -> None:
    logfile = tree.root / "rt-file.log"
    proc, _ = start(tree, "--logfile", str(logfile))
    try:
        wait_for(lambda: logfile.exists() and b"watching" in logfile.read_bytes(), 30, "log")
        rotated = tree.root / "rt-file.log.1"
        logfile.rename(rotated)  # logrotate moves the file away...
        proc.send_signal(signal.SIGHUP)  # ...and tells the service
        drop(tree, "after.fits", 7)
        wait_for(lambda: logfile.exists() and b"after.fits" in logfile.read_bytes(), 30, "reopen")
    finally:
        assert stop(proc) == 0
    assert b"after.fits" not in rotated.read_bytes()
