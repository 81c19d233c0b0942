"""The catalog contract, run against the SQLite and the PostgreSQL catalog alike, and the
PostgreSQL specifics: schema init/upgrade (the upstream drop-in), credentials, names with
SQL in them, and client-side deadlines against a really hung server.

PostgreSQL is the scratch cluster of ``tests/pg_fixture.py``; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from rawtransfer.catalog.base import (
    Catalog,
    ClaimOutcome,
    FileFacts,
    Owner,
    State,
    utcnow,
)
from rawtransfer.catalog.pg_connect import CALL_DEADLINE, POOL_TIMEOUT, PgTarget, cut, redact
from rawtransfer.catalog.pg_schema import init_schema, upgrade_schema
from rawtransfer.catalog.postgres import PostgresCatalog
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.deadlines import Deadlines
from rawtransfer.errors import CatalogUnavailable, ConfigError, FileFailed
from tests.helpers import clock_moved
from tests.pg_fixture import PgServer, PgTable

RAW_TRANSFER = str(Path(sys.executable).with_name("raw-transfer"))
UPSTREAM_DDL = (
    "create table goto (sha1_hash varchar(40) primary key, source_filepath text, "
    "file_created_at timestamp without time zone, file_transferred_at timestamp without "
    "time zone, filepath text, tel smallint, run int, ut smallint, created_at timestamp "
    "without time zone default now() not null);"
)
UPSTREAM_REGEX = r"t(?P<tel>\d)_r(?P<run>\d+)_ut(?P<ut>\d).fits"
META = ("tel", "run")
LEASE = 600.0
# A hung server must fail a call within a few seconds; this is the test's outer bound.
HUNG_CALL_BOUND = 10.0


# ---------------------------------------------------------------------------------------
# one fixture, two backends


@dataclass
class Backend:
    """A catalog under test, and a side door to read what it stored."""

    kind: str
    make: Callable[[], Catalog]
    query: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]
    table: str

    def row(self, sha1: str) -> dict[str, Any] | None:
        cols = ("state", "source_filepath", "filepath", "claimed_by", "error", "attempts", "tel")
        rows = self.query(
            f"select {', '.join(cols)} from {self.table} where sha1_hash = {self.mark}", (sha1,)
        )
        return dict(zip(cols, rows[0], strict=True)) if rows else None

    def events(self, source: str) -> list[tuple[str, str]]:
        return [
            (r[0], r[1])
            for r in self.query(
                f"select state, reason from {self.table}_events "
                f"where source_filepath = {self.mark} order by id",
                (source,),
            )
        ]

    def age_claim(self, sha1: str, seconds: float) -> None:
        """Move a claim's time into the past, as if its holder had gone quiet."""
        past = utcnow() - timedelta(seconds=seconds)
        arg: Any = past.isoformat(sep=" ") if self.kind == "sqlite" else past
        self.query(
            f"update {self.table} set claimed_at = {self.mark} where sha1_hash = {self.mark}",
            (arg, sha1),
        )

    @property
    def mark(self) -> str:
        return "?" if self.kind == "sqlite" else "%s"


def _sqlite_query(path: Path) -> Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]:
    def query(q: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            return db.execute(q, params).fetchall()

    return query


def _pg_query(server: PgServer) -> Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]:
    def query(q: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with server.connect() as conn:
            cur = conn.execute(q.encode(), params)
            return cur.fetchall() if cur.description else []

    return query


def target(server: PgServer, dbname: str | None = None) -> PgTarget:
    return PgTarget.build(server.host, server.port, server.user, dbname or server.dbname)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened: list[Catalog] = []
    if request.param == "sqlite":
        path = tmp_path / "catalog.sqlite3"

        def make() -> Catalog:
            return SqliteCatalog(path, "cat", META)

        b = Backend("sqlite", make, _sqlite_query(path), "cat")
    else:
        pg: PgTable = request.getfixturevalue("pg_table")
        init_schema(target(pg.server), pg.name, META)

        def make() -> Catalog:
            return PostgresCatalog(target(pg.server), pg.name, META, pool_size=20)

        b = Backend("postgres", make, _pg_query(pg.server), pg.name)

    def tracked() -> Catalog:
        cat = b.make()
        opened.append(cat)
        return cat

    yield Backend(b.kind, tracked, b.query, b.table)
    for cat in opened:
        cat.close()


def facts(name: str = "/data/t1_r12345_ut2.fits", **kw: Any) -> FileFacts:
    kw.setdefault("raw_sha1", "r" * 40)
    kw.setdefault("raw_size", 1000)
    kw.setdefault("packed_size", 400)
    kw.setdefault("obs_date", date(2026, 11, 24))
    kw.setdefault("metadata", {"tel": 1, "run": 12345})
    return FileFacts(source_filepath=name, file_created_at=utcnow(), **kw)


def sha(text: str) -> str:
    return (text * 40)[:40]


def other_host(name: str = "elsewhere") -> Owner:
    return Owner(host=name, pid=4242)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------------------------------
# the contract


def test_claim_then_done_then_duplicate(backend: Backend) -> None:
    cat = backend.make()
    me = Owner()
    cat.check()
    assert cat.claim(sha("a"), facts(), me, LEASE).outcome == ClaimOutcome.CLAIMED
    row = backend.row(sha("a"))
    assert row is not None
    assert (row["state"], row["claimed_by"], row["attempts"]) == ("claimed", str(me), 1)
    assert int(row["tel"]) == 1
    # a live claim held elsewhere is busy
    busy = cat.claim(sha("a"), facts("/data/other.fits"), other_host(), LEASE)
    assert busy.outcome == ClaimOutcome.BUSY
    assert busy.source_filepath == "/data/t1_r12345_ut2.fits"
    cat.mark_done(sha("a"), "/archive/2026/11/24/t1_r12345_ut2.fits.fz", me)
    row = backend.row(sha("a"))
    assert row is not None and row["state"] == "done"
    done = cat.claim(sha("a"), facts("/data/copy.fits"), other_host(), LEASE)
    assert done.outcome == ClaimOutcome.DONE
    assert done.source_filepath == "/data/t1_r12345_ut2.fits"
    assert done.filepath == "/archive/2026/11/24/t1_r12345_ut2.fits.fz"
    assert backend.events("/data/t1_r12345_ut2.fits") == [
        ("claimed", ""),
        ("done", "/archive/2026/11/24/t1_r12345_ut2.fits.fz"),
    ]
    done = cat.handled("/data/t1_r12345_ut2.fits")
    assert done is not None and done.state == State.DONE
    assert cat.handled("/data/never.fits") is None


def test_takeover_after_lease_expired(backend: Backend) -> None:
    cat = backend.make()
    first, second = other_host("a"), other_host("b")
    assert cat.claim(sha("b"), facts(), first, LEASE).outcome == ClaimOutcome.CLAIMED
    assert cat.claim(sha("b"), facts(), second, LEASE).outcome == ClaimOutcome.BUSY
    backend.age_claim(sha("b"), LEASE + 60)
    taken = cat.claim(sha("b"), facts("/data/again.fits"), second, LEASE)
    assert taken.outcome == ClaimOutcome.CLAIMED
    assert taken.taken_over_from == str(first)
    row = backend.row(sha("b"))
    assert row is not None
    assert (row["claimed_by"], row["attempts"], row["source_filepath"]) == (
        str(second),
        2,
        "/data/again.fits",
    )
    assert backend.events("/data/again.fits") == [
        ("claimed", f"took over a stale claim of {first}")
    ]
    # the old holder's late mark_done must not overwrite the new claim
    with pytest.raises(CatalogUnavailable, match="lost"):
        cat.mark_done(sha("b"), "/archive/x.fz", first)


def test_takeover_from_dead_process_on_this_host(backend: Backend) -> None:
    cat = backend.make()
    ghost = Owner(host=socket.gethostname(), pid=dead_pid())
    assert cat.claim(sha("c"), facts(), ghost, LEASE).outcome == ClaimOutcome.CLAIMED
    # a live process elsewhere with the same pid is not judged dead from here
    assert cat.claim(sha("c"), facts(), other_host(), LEASE).outcome == ClaimOutcome.BUSY
    taken = cat.claim(sha("c"), facts(), Owner(), LEASE)
    assert (taken.outcome, taken.taken_over_from) == (ClaimOutcome.CLAIMED, str(ghost))


def test_own_leftover_claim_is_taken_back(backend: Backend) -> None:
    cat = backend.make()
    me = Owner()
    assert cat.claim(sha("d"), facts(), me, LEASE).outcome == ClaimOutcome.CLAIMED
    again = cat.claim(sha("d"), facts(), me, LEASE)
    assert (again.outcome, again.taken_over_from) == (ClaimOutcome.CLAIMED, str(me))
    cat.mark_done(sha("d"), "/archive/d.fz", me)


def test_mark_failed(backend: Backend) -> None:
    cat = backend.make()
    me = Owner()
    bad = facts("/data/bad.fits")
    cat.mark_failed(sha("e"), bad, State.QUARANTINED, "truncated", me)
    row = backend.row(sha("e"))
    assert row is not None and (row["state"], row["error"]) == ("quarantined", "truncated")
    bad_mark = cat.handled("/data/bad.fits")
    assert bad_mark is not None and bad_mark.state == State.QUARANTINED
    # a claim on failed content says so; a claim we hold becomes failed with its reason
    assert cat.claim(sha("f"), facts("/data/f.fits"), me, LEASE).outcome == ClaimOutcome.CLAIMED
    cat.mark_failed(sha("f"), facts("/data/f.fits"), State.FAILED, "conflict", me)
    row = backend.row(sha("f"))
    assert row is not None and (row["state"], row["claimed_by"]) == ("failed", None)
    # failed content is tried again by whoever gets past the pipeline's "already
    # handled" test (a changed file, an operator's retry): the row is taken over
    again = cat.claim(sha("f"), facts("/data/g.fits"), other_host(), LEASE)
    assert again.outcome == ClaimOutcome.CLAIMED
    row = backend.row(sha("f"))
    assert row is not None and (row["state"], row["error"]) == ("claimed", None)
    # a done row is never turned into a failure, but the attempt is in the history
    assert cat.claim(sha("h"), facts("/data/h.fits"), me, LEASE).outcome == ClaimOutcome.CLAIMED
    cat.mark_done(sha("h"), "/archive/h.fz", me)
    cat.mark_failed(sha("h"), facts("/data/h2.fits"), State.FAILED, "late", me)
    row = backend.row(sha("h"))
    assert row is not None and row["state"] == "done"
    assert backend.events("/data/h2.fits") == [("failed", "late")]


def test_release(backend: Backend) -> None:
    cat = backend.make()
    me = Owner()
    assert cat.claim(sha("i"), facts("/data/i.fits"), me, LEASE).outcome == ClaimOutcome.CLAIMED
    cat.release(sha("i"), other_host(), "not mine")  # only the holder can give it back
    assert backend.row(sha("i")) is not None
    cat.release(sha("i"), me, "shutting down")
    row = backend.row(sha("i"))  # kept (no DELETE right needed), owned by nobody
    assert row is not None and row["state"] == "released" and row["claimed_by"] is None
    assert backend.events("/data/i.fits") == [("claimed", ""), ("released", "shutting down")]
    cat.release(sha("i"), me, "twice")  # nothing held: nothing happens
    assert len(backend.events("/data/i.fits")) == 2
    # the next claimer (another host here) takes the released row over at once
    res = cat.claim(sha("i"), facts("/data/i.fits"), other_host(), LEASE)
    assert res.outcome == ClaimOutcome.CLAIMED


def test_record_event_and_the_latest_word(backend: Backend) -> None:
    cat = backend.make()
    me = Owner()
    cat.record_event(sha("j"), "/data/j.fits", State.RETRY, "catalog away", me)
    assert backend.events("/data/j.fits")[-1][0] == State.RETRY
    assert cat.handled("/data/j.fits") is None  # a retry asked for: not handled
    cat.record_event(sha("j"), "/data/j.fits", State.DUPLICATE, "same as /data/k.fits", me)
    mark = cat.handled("/data/j.fits")
    assert mark is not None and mark.state == State.DUPLICATE
    cat.record_event(None, "/data/odd name 'x'; drop table cat.fits", State.FAILED, "odd", me)
    odd = cat.handled("/data/odd name 'x'; drop table cat.fits")
    assert odd is not None and odd.state == State.FAILED


def test_handled_sources(backend: Backend) -> None:
    cat = backend.make()
    me = Owner()
    since = utcnow() - timedelta(minutes=1)
    assert cat.claim(sha("k"), facts("/d/done.fits"), me, LEASE).outcome == ClaimOutcome.CLAIMED
    cat.mark_done(sha("k"), "/archive/k.fz", me)
    cat.claim(sha("l"), facts("/d/inflight.fits"), me, LEASE)
    cat.claim(sha("m"), facts("/d/released.fits"), me, LEASE)
    cat.release(sha("m"), me, "shutdown")
    cat.mark_failed(sha("n"), facts("/d/bad.fits"), State.QUARANTINED, "corrupt", me)
    cat.record_event(sha("k"), "/d/dup.fits", State.DUPLICATE, "same as done", me)
    cat.record_event(sha("o"), "/d/retry.fits", State.RETRY, "away", me)
    # a source whose latest word is not terminal is not handled, whatever came before
    cat.record_event(sha("p"), "/d/again.fits", State.FAILED, "first try", me)
    cat.record_event(sha("p"), "/d/again.fits", State.RETRY, "second try", me)
    handled = cat.handled_sources(since)
    assert set(handled) == {"/d/done.fits", "/d/bad.fits", "/d/dup.fits"}
    assert all(since <= h.at <= utcnow() for h in handled.values())
    assert cat.handled_sources(utcnow() + timedelta(minutes=1)) == {}


def test_handled_records_the_identity_of_the_file(backend: Backend) -> None:
    """'Already handled' is the file's identity when it was handled, not a time."""
    cat = backend.make()
    me = Owner()
    ident = "64769:1234:5000:1700000000000000000:1700000000000000000"
    f = facts("/d/ident.fits")
    assert cat.claim(sha("q"), f, me, LEASE).outcome == ClaimOutcome.CLAIMED
    cat.mark_done(sha("q"), "/archive/q.fz", me, identity=ident)
    h = cat.handled("/d/ident.fits")
    assert h is not None and h.state == "done" and h.identity == ident
    assert h.covers(ident)
    # another inode, or the same inode rewritten (ctime), is another file
    assert not h.covers("64769:1235:5000:1700000000000000000:1700000000000000000")
    assert not h.covers("64769:1234:5000:1700000000000000000:1700000000000000001")
    assert cat.handled_sources(utcnow() - timedelta(minutes=1))["/d/ident.fits"] == h
    # a later, non-terminal word (a change seen, a retry asked for) means not handled
    cat.record_event(None, "/d/ident.fits", State.CHANGED, "rewritten", me)
    assert cat.handled("/d/ident.fits") is None
    assert "/d/ident.fits" not in cat.handled_sources(utcnow() - timedelta(minutes=1))


def _race(n: int, attempt: Callable[[int], ClaimOutcome]) -> list[ClaimOutcome]:
    barrier = threading.Barrier(n)
    results: list[ClaimOutcome] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        barrier.wait()
        outcome = attempt(i)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=run, args=(i,), name=f"claimer-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == n, "a claimer did not finish"
    return results


def test_concurrent_claims_have_one_winner(backend: Backend) -> None:
    cat = backend.make()
    results = _race(
        16, lambda i: cat.claim(sha("q"), facts(f"/d/{i}.fits"), other_host(f"h{i}"), LEASE).outcome
    )
    assert results.count(ClaimOutcome.CLAIMED) == 1
    assert results.count(ClaimOutcome.BUSY) == 15


def test_concurrent_takeover_has_one_winner(backend: Backend) -> None:
    cat = backend.make()
    assert cat.claim(sha("r"), facts(), other_host("gone"), LEASE).outcome == ClaimOutcome.CLAIMED
    backend.age_claim(sha("r"), LEASE + 60)
    results = _race(
        16, lambda i: cat.claim(sha("r"), facts(f"/d/{i}.fits"), other_host(f"h{i}"), LEASE).outcome
    )
    assert results.count(ClaimOutcome.CLAIMED) == 1
    row = backend.row(sha("r"))
    assert row is not None and row["attempts"] == 2


# ---------------------------------------------------------------------------------------
# PostgreSQL: schema, the upstream drop-in, credentials, names


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RAW_TRANSFER, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.fixture
def fresh_db(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database of its own, for tests that need an exact table name such as ``goto``."""
    monkeypatch.setenv("PGPASSFILE", str(pg_server.passfile))
    name = f"rt_{uuid.uuid4().hex[:12]}"
    with pg_server.connect("postgres") as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with pg_server.connect("postgres") as conn:
            conn.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))


def tables(server: PgServer, dbname: str) -> set[str]:
    with server.connect(dbname) as conn:
        rows = conn.execute(
            "select tablename from pg_tables where schemaname = current_schema()"
        ).fetchall()
    return {r[0] for r in rows}


def test_db_init_then_upgrade_twice(pg_server: PgServer, pg_table: PgTable) -> None:
    flags = [*pg_server.db_flags(pg_table.name), "--metadata-regex", UPSTREAM_REGEX]
    with pytest.raises(ConfigError, match="db init"):
        PostgresCatalog(target(pg_server), pg_table.name, ("tel", "run", "ut"))
    made = cli("db", "init", *flags, env=pg_server.env)
    assert made.returncode == 0, made.stderr
    assert "created table" in made.stdout
    for _ in range(2):
        again = cli("db", "upgrade", *flags, env=pg_server.env)
        assert again.returncode == 0, again.stderr
        assert "already up to date" in again.stdout
    cat = PostgresCatalog(target(pg_server), pg_table.name, ("tel", "run", "ut"))
    try:
        f = facts(metadata={"tel": 1, "run": 12345, "ut": 2})
        assert cat.claim(sha("s"), f, Owner(), LEASE).outcome == ClaimOutcome.CLAIMED
    finally:
        cat.close()
    # a metadata group added later is a missing column until the next upgrade
    with pytest.raises(ConfigError, match="db upgrade"):
        PostgresCatalog(target(pg_server), pg_table.name, ("tel", "run", "ut", "night"))


def test_upstream_table_drop_in(pg_server: PgServer, fresh_db: str) -> None:
    upstream_sha = "0123456789abcdef0123456789abcdef01234567"
    with pg_server.connect(fresh_db) as conn:
        conn.execute(UPSTREAM_DDL)
        conn.execute(
            "insert into goto (sha1_hash, source_filepath, file_created_at, "
            "file_transferred_at, filepath, tel, run, ut) values "
            "(%s, '/data/t1_r100_ut2.fits', now(), now(), '/archive/t1_r100_ut2.fits.fz', "
            "1, 100, 2)",
            (upstream_sha,),
        )
    flags = [
        "--db-host", pg_server.host, "--db-port", str(pg_server.port),
        "--db-user", pg_server.user, "--db-name", fresh_db, "--db-table", "goto",
        "--metadata-regex", UPSTREAM_REGEX,
    ]  # fmt: skip
    meta = ("tel", "run", "ut")
    # the service itself changes no schema: it says what to run
    with pytest.raises(ConfigError, match="raw-transfer db upgrade"):
        PostgresCatalog(target(pg_server, fresh_db), "goto", meta)
    first = cli("db", "upgrade", *flags, env=pg_server.env)
    assert first.returncode == 0, first.stderr
    assert "added columns" in first.stdout and "goto_events" in first.stdout
    second = cli("db", "upgrade", *flags, env=pg_server.env)
    assert second.returncode == 0, second.stderr
    assert "already up to date" in second.stdout
    with pg_server.connect(fresh_db) as conn:
        rows = conn.execute("select sha1_hash, state, tel, run, ut, attempts from goto").fetchall()
        kinds = dict(
            conn.execute(
                "select column_name, data_type from information_schema.columns "
                "where table_name = 'goto'"
            ).fetchall()
        )
    assert rows == [(upstream_sha, "done", 1, 100, 2, 0)]
    assert (kinds["tel"], kinds["run"], kinds["ut"]) == ("smallint", "integer", "smallint")
    cat = PostgresCatalog(target(pg_server, fresh_db), "goto", meta)
    try:
        me = Owner()
        old = cat.claim(upstream_sha, facts("/data/t1_r100_ut2.fits"), me, LEASE)
        assert (old.outcome, old.filepath) == (ClaimOutcome.DONE, "/archive/t1_r100_ut2.fits.fz")
        upstream_mark = cat.handled("/data/t1_r100_ut2.fits")
        assert upstream_mark is not None and upstream_mark.state == State.DONE
        assert upstream_mark.identity is None  # upstream rows: judged by time, as upstream
        since = utcnow() - timedelta(hours=1)
        assert "/data/t1_r100_ut2.fits" in cat.handled_sources(since)
        # a new frame fills upstream's integer columns from the regex groups
        new = facts("/data/t2_r12345_ut3.fits", metadata={"tel": 2, "run": 12345, "ut": 3})
        assert cat.claim(sha("u"), new, me, LEASE).outcome == ClaimOutcome.CLAIMED
        cat.mark_done(sha("u"), "/archive/2026/11/24/t2_r12345_ut3.fits.fz", me)
        # a group value that does not fit upstream's smallint is this file's failure
        huge = facts("/data/t9_r1_ut99999.fits", metadata={"tel": 9, "run": 1, "ut": 99999})
        with pytest.raises(FileFailed, match="out of range"):
            cat.claim(sha("9"), huge, me, LEASE)
        cat.check()
    finally:
        cat.close()
    with pg_server.connect(fresh_db) as conn:
        row = conn.execute(
            "select tel, run, ut, state from goto where sha1_hash = %s", (sha("u"),)
        ).fetchone()
    assert row == (2, 12345, 3, "done")


def test_wrong_password_is_a_clear_error(pg_server: PgServer, tmp_path: Path) -> None:
    wrong = "Wr0ng-Passw0rd-xyzzy"
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:{pg_server.user}:{wrong}\n")
    passfile.chmod(0o600)
    flags = pg_server.db_flags("goto")
    for env in (
        {**pg_server.env, "PGPASSFILE": str(passfile)},
        {**pg_server.env, "PGPASSWORD": wrong},
    ):
        res = cli("db", "upgrade", *flags, env=env)
        assert res.returncode == 3, res.stderr
        text = res.stdout + res.stderr
        assert wrong not in text
        assert "password authentication failed" in text
        for part in (pg_server.user, pg_server.host, pg_server.dbname):
            assert part in text
    # the service itself, at start-up
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    env = {**pg_server.env, "PGPASSWORD": wrong, "XDG_STATE_HOME": str(tmp_path / "state")}
    res = cli(str(src), str(dest), *flags, "--backfill-only", env=env)
    assert res.returncode == 3, res.stderr
    assert wrong not in res.stdout + res.stderr
    assert "password authentication failed" in res.stderr


def test_no_password_in_dsn_or_messages() -> None:
    with pytest.raises(ConfigError) as info:
        PgTarget.build(dsn="host=db.example user=rt password=s3cret dbname=goto")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        PgTarget.build(dsn="postgresql://rt:s3cret@db.example/goto")
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in redact("connection to 'host=x password=s3cret' failed")
    assert "s3cret" not in redact("password = 's3 cret' and more".replace("s3 cret", "s3cret"))
    assert "s3cret" not in redact("postgresql://rt:s3cret@host/db")
    t = PgTarget.build(dsn="host=db.example port=6543 user=rt dbname=goto")
    assert t.description == "postgresql rt@db.example:6543/goto"
    assert "password" not in t.conninfo


@pytest.mark.parametrize(
    "bad",
    [
        ["--db-table", "goto; drop table x"],
        ["--db-table", "Goto"],
        ["--metadata-regex", r"t(?P<tel;drop table x>\d)"],
        ["--metadata-regex", r"t(?P<Tel>\d)"],
        ["--metadata-regex", r"t(?P<state>\d)"],
    ],
)
def test_sql_in_names_is_refused(pg_server: PgServer, fresh_db: str, bad: list[str]) -> None:
    flags = [
        "--db-host", pg_server.host, "--db-port", str(pg_server.port),
        "--db-user", pg_server.user, "--db-name", fresh_db, "--db-table", "goto",
    ]  # fmt: skip
    for action in ("init", "upgrade"):
        res = cli("db", action, *flags, *bad, env=pg_server.env)
        assert res.returncode == 2, res.stderr
        assert "error" in res.stderr
    assert tables(pg_server, fresh_db) == set()


def test_names_are_checked_in_process(pg_server: PgServer, pg_table: PgTable) -> None:
    with pytest.raises(ConfigError):
        PostgresCatalog(target(pg_server), "x; drop table y", ())
    with pytest.raises(ConfigError):
        PostgresCatalog(target(pg_server), pg_table.name, ("tel); drop table y; --",))
    with pytest.raises(ConfigError):
        init_schema(target(pg_server), 'x"; drop table y', ())
    with pytest.raises(ConfigError):  # a derived name would be cut to 63 characters
        upgrade_schema(target(pg_server), "a" * 60, ())


# ---------------------------------------------------------------------------------------
# PostgreSQL: deadlines against a hung server (SIGSTOP), and recovery


def _backend_pids(server: PgServer) -> list[int]:
    with server.connect() as conn:
        rows = conn.execute(
            "select pid from pg_stat_activity where backend_type = 'client backend' "
            "and pid <> pg_backend_pid()"
        ).fetchall()
    return [r[0] for r in rows]


@contextlib.contextmanager
def stopped(*pids: int) -> Iterator[None]:
    """SIGSTOP our own server's processes, and always SIGCONT them again."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _wait_until(ok: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ok():
            return True
        threading.Event().wait(0.2)
    return False


def test_deadline_cuts_a_call_to_a_stopped_backend(pg_server: PgServer) -> None:
    deadlines = Deadlines("test-deadlines")
    conn = pg_server.connect()
    try:
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        with stopped(row[0]):
            t0 = time.monotonic()
            with pytest.raises(psycopg.OperationalError), deadlines.watch(1.0, cut(conn)) as g:
                conn.execute("select 1")
            took = time.monotonic() - t0
        assert g.fired
        assert 0.9 <= took < 5.0, took
    finally:
        conn.close()
        deadlines.close()


def test_stopped_backend_costs_no_call(pg_server: PgServer, pg_table: PgTable) -> None:
    """The pool's checked hand-out drops a connection whose backend is hung."""
    init_schema(target(pg_server), pg_table.name, ())
    cat = PostgresCatalog(target(pg_server), pg_table.name, (), pool_size=1)
    try:
        cat.check()
        pids = _backend_pids(pg_server)
        assert len(pids) == 1
        with stopped(*pids):
            t0 = time.monotonic()
            cat.check()
            assert cat.claim(sha("v"), facts(), Owner(), LEASE).outcome == ClaimOutcome.CLAIMED
            assert time.monotonic() - t0 < HUNG_CALL_BOUND
    finally:
        cat.close()


def test_hung_server_fails_calls_fast_and_recovers(pg_server: PgServer, pg_table: PgTable) -> None:
    init_schema(target(pg_server), pg_table.name, ())
    cat = PostgresCatalog(target(pg_server), pg_table.name, (), pool_size=2)
    try:
        cat.check()
        me = Owner()
        with stopped(pg_server.postmaster_pid, *_backend_pids(pg_server)):
            for call in (
                lambda: cat.claim(sha("w"), facts(), me, LEASE),
                lambda: cat.handled("/data/w.fits"),
                cat.check,
            ):
                t0 = time.monotonic()
                with pytest.raises(CatalogUnavailable) as info:
                    call()
                took = time.monotonic() - t0
                assert took < HUNG_CALL_BOUND, took
                assert took < POOL_TIMEOUT + CALL_DEADLINE + 1
                assert pg_server.user in str(info.value)

        # the server is back: the pool reconnects by itself, nothing to restart
        def works() -> bool:
            try:
                cat.check()
            except CatalogUnavailable:
                return False
            return True

        assert _wait_until(works, 60), "the catalog did not come back after SIGCONT"
        assert cat.claim(sha("w"), facts(), me, LEASE).outcome == ClaimOutcome.CLAIMED
    finally:
        cat.close()


def test_database_restart_loses_no_work(pg_server: PgServer, pg_table: PgTable) -> None:
    """Connections killed under the pool (as by a restart) are replaced on hand-out."""
    init_schema(target(pg_server), pg_table.name, ())
    cat = PostgresCatalog(target(pg_server), pg_table.name, (), pool_size=3)
    try:
        cat.check()
        with pg_server.connect() as conn:
            conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where backend_type = 'client backend' and pid <> pg_backend_pid() "
                "and usename = current_user"
            )
        me = Owner()
        assert cat.claim(sha("x"), facts(), me, LEASE).outcome == ClaimOutcome.CLAIMED
        cat.mark_done(sha("x"), "/archive/x.fz", me)
    finally:
        cat.close()


def test_claim_and_done_latency(pg_server: PgServer, pg_table: PgTable) -> None:
    """Not a benchmark: a guard against a round-trip regression (one per call)."""
    init_schema(target(pg_server), pg_table.name, META)
    cat = PostgresCatalog(target(pg_server), pg_table.name, META)
    try:
        me = Owner()
        n = 200
        t0 = time.perf_counter()
        for i in range(n):
            key = f"{i:040d}"
            assert cat.claim(key, facts(f"/d/{i}.fits"), me, LEASE).outcome == ClaimOutcome.CLAIMED
            cat.mark_done(key, f"/archive/{i}.fz", me)
        per_file = (time.perf_counter() - t0) / n
        print(f"\nclaim+mark_done on PostgreSQL: {per_file * 1000:.2f} ms per file")
        assert per_file < 0.05
    finally:
        cat.close()


def test_handled_sources_from_upstream_timestamps(pg_server: PgServer, pg_table: PgTable) -> None:
    """Upstream rows have no updated_at: their created_at (UTC in our sessions) counts."""
    init_schema(target(pg_server), pg_table.name, ())
    with pg_server.connect() as conn:
        conn.execute(
            sql.SQL(
                "insert into {} (sha1_hash, source_filepath, filepath, created_at) values "
                "(%s, '/d/old.fits', '/a/old.fz', %s), (%s, '/d/new.fits', '/a/new.fz', %s)"
            ).format(sql.Identifier(pg_table.name)),
            (sha("y"), datetime(2020, 1, 1), sha("z"), utcnow()),
        )
    cat = PostgresCatalog(target(pg_server), pg_table.name, ())
    try:
        assert set(cat.handled_sources(utcnow() - timedelta(hours=1))) == {"/d/new.fits"}
    finally:
        cat.close()


def test_a_host_whose_clock_runs_ahead_does_not_take_over_a_live_claim(
    pg_server: PgServer, pg_table: PgTable
) -> None:
    """Hosts that share a PostgreSQL catalog judge a claim's lease by the catalog
    server's clock: a host whose clock runs 20 minutes ahead (more than the lease) must
    not take over a claim that another host holds and is working on, which would send
    the file twice. The second host is a process of its own under libfaketime."""
    init_schema(target(pg_server), pg_table.name, META)
    cat = PostgresCatalog(target(pg_server), pg_table.name, META)
    try:
        held = cat.claim(sha("c"), facts(), Owner("host-a", 101), LEASE)
        assert held.outcome == ClaimOutcome.CLAIMED
    finally:
        cat.close()
    script = (
        "import sys\n"
        "from datetime import date\n"
        "from rawtransfer.catalog.base import FileFacts, Owner, utcnow\n"
        "from rawtransfer.catalog.pg_connect import PgTarget\n"
        "from rawtransfer.catalog.postgres import PostgresCatalog\n"
        "host, port, user, db, table, sha1 = sys.argv[1:7]\n"
        "cat = PostgresCatalog(PgTarget.build(host, int(port), user, db), table, "
        "('tel', 'run'))\n"
        "f = FileFacts(source_filepath='/data/t1_r12345_ut2.fits', raw_sha1='r' * 40, "
        "raw_size=1000, packed_size=400, obs_date=date(2026, 11, 24), "
        "metadata={'tel': 1, 'run': 12345}, file_created_at=utcnow())\n"
        "r = cat.claim(sha1, f, Owner('host-b', 202), 600.0)\n"
        "print(utcnow().isoformat(), r.outcome.name)\n"
        "cat.close()\n"
    )
    args = [pg_server.host, str(pg_server.port), pg_server.user, pg_server.dbname]
    out = subprocess.run(
        [sys.executable, "-c", script, *args, pg_table.name, sha("c")],
        env={**os.environ, **clock_moved("+20m")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    clock, outcome = out.stdout.split()
    assert datetime.fromisoformat(clock) > utcnow() + timedelta(minutes=19)  # it ran ahead
    assert outcome == "BUSY", out.stdout
