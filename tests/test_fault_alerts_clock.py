"""The fault suite, part three: the alert channel fails, and the clock moves.

* Slack refusing connections, answering 500, or hanging: transfers go on undelayed, the
  failed delivery is logged without the webhook URL (a secret), and once the webhook
  works again later alerts arrive.
* The clock moved forward and back around the backfill window (libfaketime preloaded
  into the service): files are judged by their mtime against the service's clock, none
  is skipped because its mtime lies ahead of a clock set back, and none is sent twice.

Each ends with the oracle (tests/oracle.py) clean.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from rawtransfer import synth
from rawtransfer.steps import settle
from tests.conftest import Tree
from tests.helpers import clock_moved, run_rt, sqlite_rows, start_watcher, wait_for
from tests.oracle import oracle

Rows = list[dict[str, object]]
SECRET_PATH = "services/T000/B000/s3cr3tt0ken"


def _sqlite(tree: Tree) -> tuple[Rows, Rows]:
    db = tree.state / "catalog.sqlite3"
    return sqlite_rows(db), sqlite_rows(db, "rawtransfer_events")


def _oracle(tree: Tree) -> None:
    rows, events = _sqlite(tree)
    assert oracle(tree.src, tree.dest, rows, events, spool=tree.state / "spool") == []


def _drop(tree: Tree, name: str, seed: int, *, corrupt: bool = False) -> Path:
    staged = synth.write_frame(tree.root / f".{name}", (64, 48), seed=seed)
    if corrupt:  # a bit flipped in the pixels: CHECKSUM/DATASUM no longer match
        data = bytearray(staged.read_bytes())
        data[-1000] ^= 4
        staged.write_bytes(bytes(data))
    final = tree.src / name
    os.rename(staged, final)
    return final


# --- Slack down, failing, hanging -----------------------------------------------------------


class Hook:
    """A stand-in for Slack's webhook endpoint whose behaviour can change: ``ok``,
    ``500`` (a server error) or ``hang`` (no answer until released)."""

    def __init__(self, mode: str, port: int = 0) -> None:
        self.mode = mode
        self.messages: list[str] = []
        self.requests = 0
        self.answered = 0
        self.in_request = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests += 1
                outer.in_request.set()
                if outer.mode == "hang":
                    outer.release.wait(60)
                if outer.mode == "500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"internal_error")
                else:
                    outer.messages.append(json.loads(body)["text"])
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"ok")
                outer.answered += 1

            def log_message(self, *a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="pool-hook")
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("failure", ["refused", "500", "hanging"])
def test_slack_down_never_delays_transfers_and_later_alerts_arrive(
    tree: Tree, failure: str
) -> None:
    port = _unused_port()  # "refused": nobody listens there (yet)
    hooks: list[Hook] = []
    if failure != "refused":
        hooks.append(Hook("500" if failure == "500" else "hang", port))
    url = f"http://127.0.0.1:{port}/{SECRET_PATH}"
    log = tree.root / "rt.log"
    proc = start_watcher(
        tree.src,
        tree.dest,
        tree.state,
        log,
        "--patience", "1", "--canary-interval", "0.5",
        "--alert-after", "0", "--alert-interval", "1",
        env={"RAWTRANSFER_SLACK_WEBHOOK_URL": url},
    )  # fmt: skip
    text = lambda: log.read_text(errors="replace")  # noqa: E731
    try:
        _drop(tree, "bad1.fits", 99, corrupt=True)
        wait_for(lambda: "quarantined" in text(), 30, "the first alert to be raised")
        if failure == "hanging":
            wait_for(hooks[0].in_request.is_set, 30, "the webhook to be called")
        good = [_drop(tree, f"ok{i}.fits", i) for i in range(3)]
        wait_for(lambda: len(list(tree.dest.rglob("ok*.fz"))) == 3, 30, "the transfers")
        if failure == "hanging":
            assert hooks[0].answered == 0  # transfers went on while the webhook hung
        wait_for(lambda: "alert not delivered" in text(), 30, "the failed delivery logged")
        # Slack works again
        if failure == "refused":
            hooks.append(Hook("ok", port))
        else:
            hooks[0].mode = "ok"
            hooks[0].release.set()
        _drop(tree, "bad2.fits", 98, corrupt=True)
        wait_for(
            lambda: any("bad2.fits" in m for h in hooks for m in h.messages),
            30,
            "a later alert to arrive",
        )
    finally:
        proc.terminate()
        rc = proc.wait(60)
        for h in hooks:
            h.close()
    assert rc == 0
    logged = text()
    failed = [x for x in logged.splitlines() if "alert not delivered" in x]
    assert failed, logged
    if failure == "500":
        assert "HTTP 500" in failed[0], failed
    # the URL is a secret: neither it nor its path appears in any log line
    for secret in (url, SECRET_PATH, "s3cr3tt0ken"):
        assert secret not in logged, [x for x in logged.splitlines() if "s3cr3t" in x]
    assert all(p.is_file() for p in good)
    _oracle(tree)


# --- the clock moved around the backfill window ---------------------------------------------


def _aged(path: Path, hours: float, now: float) -> Path:
    t = now - hours * 3600
    os.utime(path, (t, t))
    return path


def test_clock_moved_around_the_backfill_window(tree: Tree) -> None:
    now = time.time()
    frames = synth.night(tree.src, 5, (64, 48))
    a = _aged(frames[0], 2 / 60, now)  # written just now
    d = _aged(frames[1], 0.5, now)
    b = _aged(frames[2], 12.5, now)
    c = _aged(frames[3], 13.5, now)
    e = frames[4]
    e.rename(tree.root / e.name)  # arrives later
    probe = run_rt("--version", env=clock_moved("-1h"))
    assert probe.returncode == 0, probe.stderr

    def backfill(offset: str | None, hours: str) -> str:
        env = clock_moved(offset) if offset else None
        args = ("--backfill-only", "--backfill-hours", hours, "--patience", "1")
        args += ("--state-dir", str(tree.state))
        r = run_rt(tree.src, tree.dest, *args, env=env, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def done() -> set[Path]:
        rows, _ = _sqlite(tree)
        return {Path(str(r["source_filepath"])) for r in rows if r["state"] == "done"}

    # 13 h ahead, a 14 h window: only what is less than an hour old is inside it
    out = backfill("+13h", "14")
    assert done() == {a, d}, out

    # an hour back, a 12 h window: b (12.5 h old, 11.5 h by this clock) is inside; c is
    # not; e and a, d carry mtimes ahead of this clock: e is taken, a and d not again
    os.rename(tree.root / e.name, e)
    _aged(e, 2 / 60, now)
    out = backfill("-1h", "12")
    assert done() == {a, d, b, e}, out
    assert "2 done" in out, out

    # the right clock and a day's window: the rest, and nothing a second time
    out = backfill(None, "24")
    assert done() == {a, b, c, d, e}, out
    assert "1 done" in out, out
    _rows, events = _sqlite(tree)
    copies = Counter(
        str(x["source_filepath"])
        for x in events
        if x["state"] == "done" and str(x["reason"]).endswith(".fits.fz")
    )
    assert set(copies.values()) == {1} and len(copies) == 5, copies
    _oracle(tree)


def test_settle_watches_a_file_whose_mtime_is_far_ahead_of_theclock_moved(tmp_path: Path) -> None:
    f = synth.write_frame(tmp_path / "a.fits", (16, 16))
    ahead = time.time() + 3600  # written before the clock was set back an hour
    os.utime(f, (ahead, ahead))
    first = settle.settle(f, 0.5)
    assert isinstance(first, settle.Wait) and first.seconds <= 0.5, first  # not an hour
    wait_for(lambda: isinstance(settle.settle(f, 0.5), settle.Ready), 10, "settled by watching")
    # a change while it is watched starts the watch again
    os.utime(f, (ahead + 1, ahead + 1))
    assert isinstance(settle.settle(f, 0.5), settle.Wait)
    os.utime(f, (ahead + 2, ahead + 2))
    assert isinstance(settle.settle(f, 0.5), settle.Wait)
    # a little ahead (a file server's clock a few seconds off): waited for, as before
    near = time.time() + 20
    os.utime(f, (near, near))
    wait = settle.settle(f, 0.5)
    assert isinstance(wait, settle.Wait) and wait.seconds > 19, wait
