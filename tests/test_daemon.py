"""The real daemon against real servers: outages of sshd and PostgreSQL, a burst of
small files, SIGTERM mid-transfer and a restart. Nothing lost, nothing twice."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.rows import dict_row

from rawtransfer import synth
from tests.conftest import Tree
from tests.helpers import RAW_TRANSFER, run_rt, wait_for
from tests.ssh_fixture import INSTALL_HINT, SshdError, SshServer, running_sshd


@pytest.fixture
def own_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """An sshd of this test's own, so that it can be stopped without harming others."""
    try:
        with running_sshd(tmp_path_factory.mktemp("own-sshd")) as server:
            yield server
    except SshdError as exc:
        pytest.fail(f"{exc}\nIf OpenSSH server is missing: {INSTALL_HINT}", pytrace=False)


def _family(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = (int(x) for x in line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Stop a server and all its processes (a hung host), continue them afterwards."""
    pids = _family(pid)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in _family(pid) + pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


class Daemon:
    def __init__(self, tree: Tree, args: list[str], env: dict[str, str]) -> None:
        self.log = tree.root / "daemon.log"
        self.args, self.env = args, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*RAW_TRANSFER, *self.args],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
            env={**os.environ, **self.env},
        )
        mark = self.log.read_bytes().count(b"watching")
        wait_for(
            lambda: self.log.read_bytes().count(b"watching") > mark or self.proc.poll() is not None,
            60,
            "the daemon to start",
        )  # type: ignore[union-attr]
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(120)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def pg_ssh(
    request: pytest.FixtureRequest, tree: Tree, own_sshd: SshServer
) -> Iterator[tuple[Daemon, object, str]]:
    pg = request.getfixturevalue("pg_server")
    table = request.getfixturevalue("pg_table").name
    r = run_rt("db", "init", *pg.db_flags(table), env=pg.env)
    assert r.returncode == 0, r.stderr
    args = [
        str(tree.src),
        f"{own_sshd.user}@127.0.0.1:{tree.dest}",
        *pg.db_flags(table),
        "--ssh-config",
        str(own_sshd.ssh_config),
        "--known-hosts",
        str(own_sshd.known_hosts),
        "--state-dir",
        str(tree.state),
        "--patience",
        "1",
        "--workers",
        "4",
        "--canary-interval",
        "0.5",
        "--copy-timeout",
        "5",
        "--ssh-controlmaster",
        "--backfill-interval",
        "5",
        "--backfill-recency-window",
        "2",
    ]
    d = Daemon(tree, args, pg.env)
    yield d, pg, table
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(30)


def _rows(pg: object, table: str) -> list[dict[str, object]]:
    with pg.connect() as conn, conn.cursor(row_factory=dict_row) as cur:  # type: ignore[attr-defined]
        cur.execute(sql.SQL("select * from {}").format(sql.Identifier(table)))
        return list(cur.fetchall())


def _drop(tree: Tree, name: str, seed: int, shape: tuple[int, int] = (64, 64)) -> Path:
    staged = synth.write_frame(tree.root / f".{name}", shape, seed=seed)
    final = tree.src / name
    os.rename(staged, final)
    return final


def _exactly_once(tree: Tree, pg: object, table: str, n: int) -> None:
    rows = _rows(pg, table)
    assert Counter(str(r["state"]) for r in rows) == {"done": n}, Counter(
        str(r["state"]) for r in rows
    )
    events = _rows(pg, table + "_events")
    assert not [e for e in events if e["state"] in ("failed", "quarantined")]
    done = Counter(  # verified transfers: the reason is the archive path
        str(e["sha1_hash"])
        for e in events
        if e["state"] == "done" and str(e["reason"]).startswith("/")
    )
    assert len(done) == n and set(done.values()) == {1}, "a file was transferred twice"
    files = [p for p in tree.dest.rglob("*") if p.is_file()]
    assert len(files) == n and not [p for p in files if p.name.endswith(".rt-tmp")]


def test_sshd_outage_pauses_and_everything_arrives_once(
    pg_ssh, tree: Tree, own_sshd: SshServer
) -> None:  # type: ignore[no-untyped-def]
    d, pg, table = pg_ssh
    d.start()
    for i in range(3):
        _drop(tree, f"before{i}.fits", i)
    wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == 3, 60, "first files")
    with frozen(own_sshd.pid):
        wait_for(lambda: "destination unavailable, pausing" in d.text(), 60, "the canary to pause")
        for i in range(5):
            _drop(tree, f"during{i}.fits", 10 + i)
        # files keep arriving locally and wait; nothing is marked failed
        assert not [r for r in _rows(pg, table) if r["state"] in ("failed", "quarantined")]
    wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == 8, 120, "all files after sshd is back")
    wait_for(lambda: "transfers resume" in d.text(), 60, "resume")
    assert d.stop() == 0
    _exactly_once(tree, pg, table, 8)
    assert "Traceback" not in d.text()


def test_postgres_outage_pauses_and_everything_arrives_once(pg_ssh, tree: Tree) -> None:  # type: ignore[no-untyped-def]
    d, pg, table = pg_ssh
    d.start()
    _drop(tree, "before.fits", 1)
    wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == 1, 60, "first file")
    with frozen(pg.postmaster_pid):
        wait_for(lambda: "catalog unavailable, pausing" in d.text(), 60, "the canary to pause")
        for i in range(4):
            _drop(tree, f"during{i}.fits", 10 + i)
    wait_for(
        lambda: len(list(tree.dest.rglob("*.fz"))) == 5, 120, "all files after the catalog is back"
    )
    wait_for(lambda: "transfers resume" in d.text(), 60, "resume")
    assert d.stop() == 0
    _exactly_once(tree, pg, table, 5)
    assert "Traceback" not in d.text()


def test_burst_of_small_files_then_sigterm_mid_transfer_and_restart(pg_ssh, tree: Tree) -> None:  # type: ignore[no-untyped-def]
    d, pg, table = pg_ssh
    d.start()
    # a burst: a few thousand small frames moved in as fast as they can be written
    n = 2000
    # no CHECKSUM cards: each copy gets its own exposure number in the header below
    template = synth.write_frame(
        tree.root / "template.fits", (16, 16), seed=0, checksum=False
    ).read_bytes()
    writer_done = threading.Event()

    def writer() -> None:
        for i in range(n):
            # distinct content: the same frame with a different exposure number
            data = bytearray(template)
            hdr_at = data.index(b"EXPTIME =")
            data[hdr_at + 10 : hdr_at + 30] = f"{i:>20d}".encode()
            tmp = tree.root / f".b{i:05d}"
            tmp.write_bytes(bytes(data))
            os.rename(tmp, tree.src / f"b{i:05d}.fits")
        writer_done.set()

    t = threading.Thread(target=writer, name="pool-writer")
    t.start()
    wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) >= 50, 120, "some of the burst")
    # SIGTERM mid-transfer, then a restart picks up the rest
    assert d.stop() == 0
    t.join(120)
    assert writer_done.is_set()
    assert not [p for p in tree.dest.rglob("*") if p.name.endswith(".rt-tmp")]
    assert not [r for r in _rows(pg, table) if r["state"] == "claimed"]
    d.start()
    wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == n, 600, "the whole burst")
    assert d.stop() == 0
    _exactly_once(tree, pg, table, n)
