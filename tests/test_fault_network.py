"""The fault suite, part two: the network and the servers fail under a running transfer.

* the network cut in the middle of a copy (a TCP relay in the test between the service
  and sshd drops every connection, refuses new ones for a while, then lets them through);
* sshd hung (its session processes SIGSTOPped) during a copy, continued later;
* PostgreSQL stopped at the claim and at the record (a private cluster, stopped with
  ``pg_ctl`` while the fault point holds the file, started again);
* a day directory at the destination that the service may not write into;
* the destination's host key changed while the watcher runs.

Each ends with every file done exactly once and the oracle (tests/oracle.py) clean. The
shared sshd is only ever signalled in its session processes (which these tests own) and
is never stopped; PostgreSQL is stopped only in a cluster of the test's own.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from rawtransfer import faults, synth
from rawtransfer.destination.base import is_temporary
from tests import pg_fixture
from tests.conftest import Tree
from tests.helpers import RAW_TRANSFER, run_rt, sqlite_rows, wait_for
from tests.oracle import oracle
from tests.ssh_fixture import SshServer, new_ed25519

Rows = list[dict[str, object]]


# --- the service as a process, its log in a file ------------------------------------------


@dataclass
class Service:
    """``raw-transfer`` started as a subprocess; stderr (the log) goes to a file."""

    log: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with self.log.open("ab") as err, self.log.with_suffix(".out").open("ab") as out:
            self.proc = subprocess.Popen(
                [*self.prefix, *RAW_TRANSFER, *self.args],
                stdout=out,
                stderr=err,
                env={**os.environ, **self.env},
            )
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def says(self, what: str, times: int = 1) -> Callable[[], bool]:
        return lambda: self.text().count(what) >= times

    def wait_until(self, what: str, timeout: float = 60, times: int = 1) -> None:
        """Wait for a log line (or fail at once, with the log, if the process exited)."""

        def seen() -> bool:
            if self.says(what, times)():
                return True
            assert self.proc is not None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"exited {code} before {what!r}:\n{self.text()}")
            return False

        wait_for(seen, timeout, repr(what))

    def wait(self, timeout: float = 120) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


# how every log line starts (outside systemd): time, level, thread
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \[")


def one_line_per_event(text: str) -> None:
    """No traceback, no line without its time and level (a journal entry of its own)."""
    stray = [x for x in text.splitlines() if not LINE.match(x)]
    assert not stray, "log lines that are not events:\n" + "\n".join(stray[:20])
    assert "internal error" not in text, text


def _sqlite(tree: Tree) -> tuple[Rows, Rows]:
    db = tree.state / "catalog.sqlite3"
    return sqlite_rows(db), sqlite_rows(db, "rawtransfer_events")


def exactly_once(tree: Tree, rows: Rows, events: Rows, sources: list[Path]) -> None:
    """Every source done, each published by exactly one verified copy; oracle clean."""
    done = {Path(str(r["source_filepath"])) for r in rows if r["state"] == "done"}
    assert done == set(sources), (done, rows)
    # a done event whose reason is the archive path is a verified transfer
    copies = Counter(
        str(e["sha1_hash"])
        for e in events
        if e["state"] == "done" and str(e["reason"]).endswith(".fits.fz")
    )
    assert len(copies) == len(sources) and set(copies.values()) == {1}, copies
    assert oracle(tree.src, tree.dest, rows, events, spool=tree.state / "spool") == []


# --- 1. the network cut in the middle of a copy ---------------------------------------------


class CutProxy:
    """A TCP relay on 127.0.0.1 in front of sshd; ``cut()`` drops every connection it
    carries and refuses new ones (accepted and closed at once, as a broken link looks to
    SSH) until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.blocked = threading.Event()
        self.accepted = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, name="pool-proxy", daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            if self.blocked.is_set():
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.accepted += 1
            with self._lock:
                self._socks |= {client, upstream}
            self._start(self._relay, client, upstream)

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        back = threading.Thread(target=self._pump, args=(b, a), name="pool-proxy", daemon=True)
        back.start()
        self._pump(a, b)
        back.join()
        with self._lock:
            self._socks -= {a, b}
        a.close()
        b.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # one side gone: the whole connection goes
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> int:
        """Drop every connection now; refuse new ones until restore(). Returns how many."""
        self.blocked.set()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        return len(socks) // 2

    def restore(self) -> None:
        self.blocked.clear()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close would not)
        self.listener.close()
        self.cut()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(10)


@pytest.fixture
def proxy(sshd_server: SshServer) -> Iterator[CutProxy]:
    p = CutProxy(sshd_server.port)
    yield p
    p.close()


def _through_proxy(ssh: SshServer, proxy: CutProxy, tmp: Path) -> tuple[Path, Path]:
    """An ssh_config whose alias reaches sshd through the proxy, and a known_hosts with the
    server's key under the name ssh checks it by (``[127.0.0.1]:PORT`` off port 22)."""
    config = tmp / "ssh_config_proxy"
    config.write_text(
        f"Host archive-via-proxy\n    HostName 127.0.0.1\n    Port {proxy.port}\n"
        f"    User {ssh.user}\n    IdentityFile {ssh.identity}\n"
    )
    known = tmp / "known_hosts_proxy"
    known.write_text(f"[127.0.0.1]:{proxy.port} {ssh.host_public_key}\n")
    return config, known


def test_network_cut_in_the_middle_of_a_copy(
    tree: Tree, sshd_server: SshServer, proxy: CutProxy
) -> None:
    files = synth.night(tree.src, 2, (64, 48))
    tree.settled()
    config, known = _through_proxy(sshd_server, proxy, tree.root)
    args = [
        str(tree.src),
        f"archive-via-proxy:{tree.dest}",
        "--ssh-config", str(config),
        "--known-hosts", str(known),
        "--state-dir", str(tree.state),
        "--backfill-only", "--workers", "2", "--ssh-controlmaster",
    ]  # fmt: skip
    svc = Service(
        tree.root / "rt.log",
        args,
        env={faults.ENV: "during-copy:pause:3"},
    ).start()
    try:
        # the copy of the first file is held in the middle; the network goes
        svc.wait_until("fault injected at during-copy")
        assert proxy.cut() >= 1
        # the interrupted copy is put back, and the next attempt meets a dead link too
        svc.wait_until("retrying")
        wait_for(lambda: proxy.refused >= 1, 30, "a connection attempt on the dead link")
        before = proxy.accepted
        proxy.restore()
        assert svc.wait() == 0, svc.text()
    finally:
        svc.kill()
    assert proxy.accepted > before  # the service came back through new connections
    text = svc.text()
    one_line_per_event(text)  # a dead link is one line per attempt, not a traceback
    rows, events = _sqlite(tree)
    exactly_once(tree, rows, events, files)
    # the interrupted copy's temporary file is gone from the archive (oracle) and was
    # removed by the service, not left for the next start's sweep
    assert not [p for p in tree.dest.rglob("*") if p.name.endswith(".rt-tmp")]


# --- 2. sshd hung during a copy ---------------------------------------------------------------


def test_sshd_hung_during_a_copy_is_abandoned_and_retried(
    tree: Tree, sshd_server: SshServer
) -> None:
    files = synth.night(tree.src, 2, (64, 48))
    tree.settled()
    # the copy is held for 1 s, well inside --copy-timeout: only the hang can exceed it
    args = [
        str(tree.src),
        f"{sshd_server.user}@127.0.0.1:{tree.dest}",
        "--ssh-config", str(sshd_server.ssh_config),
        "--known-hosts", str(sshd_server.known_hosts),
        "--state-dir", str(tree.state),
        "--backfill-only", "--workers", "2", "--ssh-controlmaster",
        "--copy-timeout", "3",
    ]  # fmt: skip
    svc = Service(
        tree.root / "rt.log",
        args,
        env={faults.ENV: "during-copy:pause:1"},
    ).start()
    stopped: list[int] = []
    try:
        svc.wait_until("fault injected at during-copy")
        stopped = sshd_server.signal_sessions(signal.SIGSTOP)
        assert stopped
        svc.wait_until("(--copy-timeout); connection dropped")
        # the retry goes through a new connection while the old server process still hangs
        assert svc.wait() == 0, svc.text()
        ended = time.time()
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        svc.kill()
    text = svc.text()
    assert "retrying" in text, text
    one_line_per_event(text)
    # the continued server processes find their connections gone and exit; they leave
    # nothing behind (the temporary file was removed after the reconnect)
    wait_for(
        lambda: not set(stopped) & set(sshd_server.session_pids()), 30, "the hung sessions to end"
    )
    # A request the hung server still held (the open of a temporary, pipelined with the
    # look at its directory) may run when it is continued, after the run has ended:
    # nobody can stop that from this side. Such a late temporary is the periodic
    # sweep's; one made while the run was alive would be ours, and a bug.
    late = [p for p in tree.dest.rglob("*") if is_temporary(p.name) and p.stat().st_mtime >= ended]
    for p in late:
        p.unlink()
    rows, events = _sqlite(tree)
    exactly_once(tree, rows, events, files)


# --- 3. PostgreSQL stopped at the claim and at the record -----------------------------------


@contextlib.contextmanager
def private_pg(root: Path) -> Iterator[pg_fixture.PgServer]:
    """A PostgreSQL cluster of this test's own (the session's is never stopped), made the
    way tests/pg_fixture.py makes the session's, and stopped by its pid at the end."""
    bindir = pg_fixture._find_bindir()
    if bindir is None:
        pytest.fail(f"initdb not found; install with `{pg_fixture.INSTALL}`", pytrace=False)
    assert bindir is not None
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    root.chmod(0o700)
    data = root / "data"
    r = pg_fixture._as_postgres(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
         "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"]
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (data / "pg_hba.conf").write_text(
        "local all postgres trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
    )
    port = pg_fixture._free_port()
    password = "fault-suite-" + os.urandom(8).hex()
    server = pg_fixture.PgServer(
        host="127.0.0.1", port=port, user="rt_fault", password=password, dbname="rt_fault",
        socket_dir=root, data_dir=data, passfile=root / "pgpass", bindir=bindir,
        postmaster_pid=0,
    )  # fmt: skip
    pg_start(server)
    try:
        setup = (
            f"create role rt_fault login password '{password}';\n"
            "create database rt_fault owner rt_fault;\n"
        )
        r = pg_fixture._as_postgres(
            [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(root),
             "-p", str(port), "-U", "postgres", "-d", "postgres"],
            input=setup,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        server.passfile.write_text(f"127.0.0.1:{port}:*:rt_fault:{password}\n")
        server.passfile.chmod(0o600)
        yield server
    finally:
        if server.postmaster_pid:
            pg_fixture._stop(bindir, data, server.postmaster_pid)


def pg_start(server: pg_fixture.PgServer) -> None:
    opts = (
        f"-c listen_addresses=127.0.0.1 -c port={server.port} "
        f"-c unix_socket_directories={server.socket_dir}"
    )
    r = pg_fixture._as_postgres(
        [str(server.bindir / "pg_ctl"), "-D", str(server.data_dir), "-l",
         str(server.socket_dir / "server.log"), "-o", opts, "-w", "-t", "60", "start"]
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    server.postmaster_pid = pg_fixture._postmaster_pid(server.data_dir)


def pg_stop(server: pg_fixture.PgServer) -> None:
    """A clean fast shutdown: open connections are ended, new ones refused."""
    r = pg_fixture._as_postgres(
        [str(server.bindir / "pg_ctl"), "-D", str(server.data_dir), "-m", "fast", "-w",
         "-t", "60", "stop"]
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    server.postmaster_pid = 0


def _pg_rows(server: pg_fixture.PgServer, table: str) -> Rows:
    with server.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("select * from {} order by 1").format(sql.Identifier(table)))
        return list(cur.fetchall())


@pytest.fixture
def own_pg() -> Iterator[pg_fixture.PgServer]:
    root = Path(tempfile.mkdtemp(prefix="rt-fault-pg-"))
    try:
        with private_pg(root) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("point", ["before-claim", "after-publish"])
def test_postgres_stopped_at_the_claim_and_at_the_record(
    tree: Tree, own_pg: pg_fixture.PgServer, point: str
) -> None:
    pg = own_pg
    env = {**pg.env, "PGPASSFILE": str(pg.passfile)}
    r = run_rt("db", "init", *pg.db_flags("goto"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    files = synth.night(tree.src, 2, (64, 48))
    tree.settled()
    args = [
        str(tree.src), str(tree.dest), *pg.db_flags("goto"),
        "--state-dir", str(tree.state), "--backfill-only", "--workers", "1",
    ]  # fmt: skip
    svc = Service(
        tree.root / "rt.log",
        args,
        env={**env, faults.ENV: f"{point}:pause:2"},
    ).start()
    try:
        svc.wait_until(f"fault injected at {point}")
        pg_stop(pg)  # while the file is held just before its claim, or before its record
        svc.wait_until("retrying")
        pg_start(pg)
        rc = svc.wait()
    finally:
        svc.kill()
    text = svc.text()
    assert rc == 0, text
    assert "catalog unavailable" in text, text
    one_line_per_event(text)  # libpq's two-line "connection refused" folded into one
    if point == "after-publish":
        # the copy was made and verified but could not be recorded: the retry finds it
        # in place with the same content and records it, it does not send it again
        assert len(list(tree.dest.rglob("*.fz"))) == 2
    rows, events = _pg_rows(pg, "goto"), _pg_rows(pg, "goto_events")
    exactly_once(tree, rows, events, files)


# --- 4. a day directory the service may not write into --------------------------------------

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def public_tree() -> Iterator[Tree]:
    """A tree the unprivileged user can reach (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="rt-fault-", dir="/tmp"))
    root.chmod(0o755)
    t = Tree(root, root / "src", root / "archive", root / "state")
    for d in (t.src, t.dest, t.state):
        d.mkdir()
        shutil.chown(d, "nobody", "nogroup")
    yield t
    shutil.rmtree(root, ignore_errors=True)


def test_a_day_directory_that_cannot_be_written(public_tree: Tree) -> None:
    tree = public_tree
    files = synth.night(tree.src, 2, (64, 48))
    tree.settled()
    day = tree.dest / "2026" / "11" / "24"
    day.mkdir(parents=True)
    for d in (day, day.parent, day.parent.parent):
        shutil.chown(d, "nobody", "nogroup")
    day.chmod(0o555)  # e.g. an operator's chmod, or a directory made by another account
    args = [
        str(tree.src), str(tree.dest), "--state-dir", str(tree.state),
        "--patience", "1", "--canary-interval", "0.5", "--workers", "2", "--keep-source",
    ]  # fmt: skip
    svc = Service(
        tree.root / "rt.log",
        args,
        env={"HOME": str(tree.state)},
        prefix=AS_NOBODY,
    ).start()
    try:
        # the start-up scan takes both files; neither can be written, and the log says
        # why, at every attempt
        svc.wait_until("Permission denied", times=4)
        assert not list(tree.dest.rglob("*.fz"))
        assert all(f.is_file() for f in files)  # nothing lost: the sources are untouched
        _rows, events = _sqlite(tree)
        assert not [e for e in events if e["state"] in ("done", "failed", "quarantined")]
        reasons = [str(e["reason"]) for e in events]
        assert any("Permission denied" in x and str(day) in x for x in reasons), reasons
        # each attempt claims the file again and gives the claim back with the reason
        assert not [x for x in reasons if "of None" in x], reasons
        # the operator fixes the directory: the files go through by themselves
        day.chmod(0o755)
        wait_for(lambda: len(list(day.glob("*.fz"))) == 2, 60, "the files after chmod")
        assert svc.stop() == 0
    finally:
        svc.kill()
    one_line_per_event(svc.text())
    rows, events = _sqlite(tree)
    exactly_once(tree, rows, events, files)


# --- 5. the host key changes while the watcher runs -----------------------------------------


class StatusListener:
    """The systemd notify socket, as systemd would hold it: the last STATUS= line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.last = ""

    def status(self) -> str:
        while True:
            try:
                msg = self.sock.recv(4096).decode()
            except BlockingIOError:
                return self.last
            for line in msg.splitlines():
                if line.startswith("STATUS="):
                    self.last = line.removeprefix("STATUS=")

    def close(self) -> None:
        self.sock.close()


def _fingerprint(public_line: str) -> str:
    key = paramiko.Ed25519Key(data=base64.b64decode(public_line.split()[1]))
    return str(key.fingerprint)


def _drop(tree: Tree, name: str, seed: int) -> Path:
    staged = synth.write_frame(tree.root / f".{name}", (64, 48), seed=seed)
    final = tree.src / name
    os.rename(staged, final)
    return final


def test_changed_host_key_while_running_pauses_and_resumes(
    tree: Tree, sshd_server: SshServer
) -> None:
    ssh = sshd_server
    known = tree.root / "known_hosts"
    right = f"[127.0.0.1]:{ssh.port} {ssh.host_public_key}\n"
    known.write_text(right)
    listener = StatusListener(tree.root / "notify.sock")
    args = [
        str(tree.src), f"{ssh.user}@127.0.0.1:{tree.dest}",
        "--ssh-config", str(ssh.ssh_config), "--known-hosts", str(known),
        "--state-dir", str(tree.state), "--ssh-controlmaster", "--workers", "2",
        "--patience", "1", "--canary-interval", "0.5",
    ]  # fmt: skip
    svc = Service(
        tree.root / "rt.log",
        args,
        env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"},
    ).start()
    try:
        svc.wait_until("watching")
        first = _drop(tree, "before.fits", 1)
        wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == 1, 60, "the first file")
        # the server now offers a key that known_hosts does not have for it: as if the
        # archive host was reinstalled, or someone is in between
        _other_private, other_public = new_ed25519()
        known.write_text(f"[127.0.0.1]:{ssh.port} {other_public}\n")
        ssh.kill_sessions()  # the connections are made again, and the key checked again
        svc.wait_until("destination unavailable, pausing")
        refusal = next(x for x in svc.text().splitlines() if "pausing" in x)
        assert f"[127.0.0.1]:{ssh.port}" in refusal, refusal
        assert _fingerprint(ssh.host_public_key) in refusal, refusal  # the key offered
        assert "refused" in refusal, refusal
        second = _drop(tree, "during.fits", 2)
        wait_for(
            lambda: "PAUSED" in listener.status() and listener.last.startswith("1 queued"),
            30,
            "the new file to wait in a paused queue",
        )
        assert len(list(tree.dest.rglob("*.fz"))) == 1  # nothing sent to that host
        known.write_text(right)  # the administrator confirms: the right key is back
        svc.wait_until("transfers resume")
        wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == 2, 60, "the file after resume")
        assert svc.stop() == 0
    finally:
        svc.kill()
        listener.close()
    one_line_per_event(svc.text())
    rows, events = _sqlite(tree)
    exactly_once(tree, rows, events, [first, second])
