"""``raw-transfer status`` against both catalogs: after a real backfill, on a catalog of a
million rows (built by one bulk statement), and with a watcher running (its live figures,
paused and why, and what is left when it stops or is killed); the heartbeat line."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from rawtransfer import synth
from rawtransfer.catalog.base import Owner, utcnow
from rawtransfer.catalog.pg_connect import PgTarget
from rawtransfer.catalog.pg_schema import init_schema
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.live import Publisher, live_path
from rawtransfer.ops.status import IN_FLIGHT, RECENT
from tests.conftest import Tree
from tests.helpers import run_rt, sha1, start_watcher, wait_for
from tests.pg_fixture import PgServer, PgTable
from tests.test_backends_e2e import Backend, make_backend

# flags only the service uses: accepted by status, without a word
SERVICE_ONLY = ("--workers", "3", "--ssh-controlmaster", "--copy-timeout", "60", "--polling")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tree: Tree) -> Backend:
    return make_backend(request, tree, request.param, "local")


def status(b: Backend, tree: Tree, *extra: str) -> subprocess.CompletedProcess[str]:
    """The operator pastes the service's command line after the word."""
    return run_rt(
        "status", tree.src, *b.dest_args, *b.catalog_args, *SERVICE_ONLY, *extra, env=b.env
    )


def status_json(b: Backend, tree: Tree) -> dict[str, Any]:
    r = status(b, tree, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""  # no warning about the service's own flags
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def test_status_after_a_backfill(backend: Backend, tree: Tree) -> None:
    good = synth.night(tree.src, 3, (64, 48))
    bad = synth.write_frame(tree.src / "t2_r66666_ut2.fits", (64, 64), seed=66)
    b = bytearray(bad.read_bytes())
    b[-100] ^= 4
    bad.write_bytes(bytes(b))
    tree.settled()
    r = backend.run(tree.src, "--backfill-only", "--workers", "3")
    assert r.returncode == 1, r.stdout + r.stderr

    doc = status_json(backend, tree)
    assert doc["version"] == 1
    assert doc["counts"] == {"done": 3, "failed": 0, "quarantined": 1, "claimed": 0, "released": 0}
    archived = sorted(tree.dest.rglob("*.fits.fz"))
    assert len(archived) == 3
    assert doc["last_hour"] == {
        "files": 3,
        "packed_bytes": sum(p.stat().st_size for p in archived),
        "raw_bytes": sum(p.stat().st_size for p in good),
    }
    last = doc["last_done"]
    assert last["file"] in {str(p) for p in good} and last["state"] == "done"
    assert Path(last["archive_path"]) in archived
    assert last["sha1"] == sha1(Path(last["archive_path"]))
    assert 0 <= last["seconds_ago"] < 600
    (q,) = doc["recent_quarantines"]
    assert q["file"] == str(bad) and "checksum" in q["reason"]
    assert doc["recent_failures"] == [] and doc["in_flight"] == []
    assert doc["oldest_not_done"] is None
    assert doc["service"] == {
        "running": False,
        "paused": None,
        "paused_reasons": [],
        "processes": [],
    }

    # or the unit's --config FILE (catalog flags on the command line still win)
    config = tree.root / "rawtransfer.toml"
    config.write_text(
        f'source_dir = "{tree.src}"\ndest = "{tree.dest}"\nstate_dir = "{tree.state}"\n'
        "workers = 8\ncopy_timeout = 60\nbackfill_interval = 1200\nkeep_source = true\n"
    )
    r = run_rt("status", "--config", config, *backend.catalog_args, "--json", env=backend.env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["counts"] == doc["counts"]

    r = status(backend, tree)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = r.stdout
    print(text)
    for expected in ("3 done", "1 quarantined", "0 failed", " MB packed", " ago", str(bad)):
        assert expected in text, expected
    assert "not running" in text


# ---------------------------------------------------------------------------------------
# a million rows, built by one statement in the database


N = 1_000_000
# row i: 1..20 claimed, ..50 released, ..3050 quarantined, ..8050 failed, the rest done,
# one done row in ten an upstream row (no updated_at). Row i was last touched OFF(i)
# seconds ago: a permutation of i spread over a year, the rows that land in the last
# hour squeezed into its first half so that a slow machine does not move the boundary.
_O = "((i * 7919) % 1000000) * 30"
OFF = f"(case when {_O} < 3600 then {_O} / 2 else {_O} end)"
STATE = (
    "case when i <= 20 then 'claimed' when i <= 50 then 'released' "
    "when i <= 3050 then 'quarantined' when i <= 8050 then 'failed' else 'done' end"
)
COLUMNS = (
    "sha1_hash, source_filepath, state, error, filepath, raw_sha1, packed_size, raw_size, "
    "file_created_at, updated_at, created_at, claimed_by, claimed_at"
)


def off(i: int) -> int:
    o = (i * 7919) % 1_000_000 * 30
    return o // 2 if o < 3600 else o


@dataclass
class Expected:
    counts: dict[str, int]
    window: tuple[int, int, int]
    last_done: str
    oldest: str
    failed: list[str]
    quarantined: list[str]


def expected() -> Expected:
    done = [i for i in range(8051, N + 1) if i % 10]
    recent = [i for i in done if off(i) < 3600]
    return Expected(
        counts={
            "done": N - 8050,
            "failed": 5000,
            "quarantined": 3000,
            "claimed": 20,
            "released": 30,
        },
        window=(len(recent), sum(10**6 + i for i in recent), sum(2 * 10**6 + i for i in recent)),
        last_done=f"{min(done, key=off):040x}",
        oldest=f"{max(range(1, 51), key=off):040x}",
        failed=[f"{i:040x}" for i in sorted(range(3051, 8051), key=off)[:RECENT]],
        quarantined=[f"{i:040x}" for i in sorted(range(51, 3051), key=off)[:RECENT]],
    )


def _bulk_sqlite(path: Path) -> None:
    SqliteCatalog(path, "rawtransfer").close()  # the real schema and its indexes
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("pragma synchronous=off")
        # as a bulk load does: rows first, then the indexes built once, sorted
        indexes = con.execute(
            "select name, sql from sqlite_master where type = 'index' "
            "and tbl_name = 'rawtransfer' and sql is not null"
        ).fetchall()
        for name, _ in indexes:
            con.execute(f'drop index "{name}"')
        started = time.monotonic()
        con.execute(
            f"""
            with recursive n(i) as (select 1 union all select i + 1 from n where i < :n)
            insert into rawtransfer ({COLUMNS})
            select printf('%040x', i),
                '/data/raw/' || (i / 1000) || '/t1_r' || substr('000000' || i, -7) || '_ut1.fits',
                {STATE},
                case when i between 51 and 8050 then 'reason ' || i end,
                case when i > 8050 then
                    '/archive/' || (i / 1000) || '/t1_r' || substr('000000' || i, -7)
                    || '_ut1.fits.fz' end,
                printf('%040x', i + 2000000), 1000000 + i, 2000000 + i,
                datetime(:now, '-' || ({OFF} + 60) || ' seconds'),
                case when i > 8050 and i % 10 = 0 then null
                    else datetime(:now, '-' || {OFF} || ' seconds') end,
                datetime(:now, '-' || {OFF} || ' seconds'),
                case when i <= 20 then 'otherhost:1' end,
                case when i <= 20 then datetime(:now, '-10 seconds') end
            from n
            """,
            {"n": N, "now": utcnow().isoformat(sep=" ", timespec="seconds")},
        )
        for _, ddl in indexes:
            con.execute(ddl)
        print(f"\nSQLite: {N:,} rows and their indexes built in {time.monotonic() - started:.1f} s")
    finally:
        con.close()


def _bulk_postgres(pg: PgServer, table: str, vacuum: bool = True) -> None:
    init_schema(
        PgTarget.build(pg.host, pg.port, pg.user, pg.dbname), table
    )  # the real schema and its indexes
    # psycopg's placeholders make every other % a literal one
    offset = OFF.replace("%", "%%").replace("i * 7919", "i::bigint * 7919")
    started = time.monotonic()
    with pg.connect() as conn:
        conn.execute(
            sql.SQL(
                f"""
                insert into {{t}} ({COLUMNS})
                select lpad(to_hex(i), 40, '0'),
                    '/data/raw/' || (i / 1000) || '/t1_r' || lpad(i::text, 7, '0') || '_ut1.fits',
                    {STATE},
                    case when i between 51 and 8050 then 'reason ' || i end,
                    case when i > 8050 then
                        '/archive/' || (i / 1000) || '/t1_r' || lpad(i::text, 7, '0')
                        || '_ut1.fits.fz' end,
                    lpad(to_hex(i + 2000000), 40, '0'), 1000000 + i, 2000000 + i,
                    %(now)s - make_interval(secs => {offset} + 60),
                    case when i > 8050 and i %% 10 = 0 then null
                        else %(now)s - make_interval(secs => {offset}) end,
                    %(now)s - make_interval(secs => {offset}),
                    case when i <= 20 then 'otherhost:1' end,
                    case when i <= 20 then %(now)s - interval '10 seconds' end
                from generate_series(1, %(n)s) as i
                """
            ).format(t=sql.Identifier(table)),
            {"n": N, "now": utcnow().replace(microsecond=0)},
        )
        built = time.monotonic() - started
        # what autovacuum does to a table after a large insert (PostgreSQL 13+): the
        # planner's statistics and the visibility map that index-only counts rely on
        if vacuum:
            conn.execute(sql.SQL("vacuum analyze {t}").format(t=sql.Identifier(table)))
    print(
        f"\nPostgreSQL: {N:,} rows built in {built:.1f} s, "
        f"vacuum analyze {time.monotonic() - started - built:.1f} s"
    )


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_status_counts_a_million_rows(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    want = expected()
    env: dict[str, str] = {}
    if kind == "postgres":
        pg: PgServer = request.getfixturevalue("pg_server")
        table: PgTable = request.getfixturevalue("pg_table")
        _bulk_postgres(pg, table.name)
        flags = [*pg.db_flags(table.name), "--state-dir", str(tmp_path)]
        env = pg.env
    else:
        _bulk_sqlite(tmp_path / "catalog.sqlite3")
        flags = ["--state-dir", str(tmp_path)]
    for attempt in range(2):  # the first call on a cold cache, then a warm one
        started = time.monotonic()
        r = run_rt("status", *flags, "--json", env=env)
        wall = time.monotonic() - started
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        print(
            f"{kind}: status on {N:,} rows: queries {doc['query_seconds']:.3f} s, "
            f"the whole command {wall:.2f} s ({'cold' if attempt == 0 else 'warm'})"
        )
    assert doc["counts"] == want.counts
    hour = doc["last_hour"]
    assert (hour["files"], hour["packed_bytes"], hour["raw_bytes"]) == want.window
    assert want.window[0] > 50  # the window holds something worth counting
    assert doc["last_done"]["sha1"] == want.last_done
    assert doc["oldest_not_done"]["sha1"] == want.oldest
    assert [x["sha1"] for x in doc["recent_failures"]] == want.failed
    assert [x["sha1"] for x in doc["recent_quarantines"]] == want.quarantined
    assert len(doc["in_flight"]) == min(20, IN_FLIGHT)
    assert {x["claimed_by"] for x in doc["in_flight"]} == {"otherhost:1"}
    # and why finds one row among a million by name, archive path and SHA1
    for key in ("t1_r0500001_ut1.fits", "/archive/500/t1_r0500001_ut1.fits.fz", f"{500001:040x}"):
        started = time.monotonic()
        r = run_rt("why", key, *flags, "--json", env=env)
        wall = time.monotonic() - started
        assert r.returncode == 0, r.stdout + r.stderr
        (f,) = json.loads(r.stdout)["files"]
        assert f["source"] == "/data/raw/500/t1_r0500001_ut1.fits"
        print(f"{kind}: why {key}: {wall:.2f} s (the whole command)")


# ---------------------------------------------------------------------------------------
# a running watcher


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    return proc.wait(60)


def test_status_shows_the_running_service(tree: Tree) -> None:
    log = tree.root / "rt.log"
    args = ("--patience", "1", "--canary-interval", "0.5")
    b = Backend("sqlite-local", [str(tree.dest)], ["--state-dir", str(tree.state)], list, list)
    proc = start_watcher(tree.src, tree.dest, tree.state, log, *args)
    try:
        doc = status_json(b, tree)
        (p,) = doc["service"]["processes"]
        assert p["running"] and p["pid"] == proc.pid and p["problem"] is None
        assert p["source_dir"] == str(tree.src) and p["dest"] == str(tree.dest)
        assert doc["service"]["running"] and doc["service"]["paused"] is False
        assert p["queued"] == 0 and p["in_flight"] == 0

        synth.write_frame(tree.src / "a.fits", (64, 64), seed=1)
        wait_for(lambda: status_json(b, tree)["service"]["processes"][0]["done"] == 1, 60, "done")

        away = tree.root / "unmounted"
        tree.dest.rename(away)  # the archive's filesystem goes away: paused
        wait_for(lambda: status_json(b, tree)["service"]["paused"], 60, "paused")
        doc = status_json(b, tree)
        (p,) = doc["service"]["processes"]
        assert doc["service"]["paused_reasons"] == ["destination unavailable"]
        assert p["paused_since"] is not None and p["paused_reasons"] == ["destination unavailable"]
        synth.write_frame(tree.src / "b.fits", (64, 64), seed=2)
        wait_for(
            lambda: status_json(b, tree)["service"]["processes"][0]["queued"] == 1, 60, "queued"
        )
        text = status(b, tree).stdout
        print(text)
        assert "YES since" in text and "destination unavailable" in text
        assert "1 queued" in text and "oldest waiting" in text
        away.rename(tree.dest)
        wait_for(lambda: status_json(b, tree)["counts"]["done"] == 2, 60, "resumed")
    finally:
        assert _stop(proc) == 0
    # a clean stop removes the figures
    assert status_json(b, tree)["service"]["processes"] == []

    # a killed watcher leaves them behind: status says the process is gone
    proc = start_watcher(tree.src, tree.dest, tree.state, log, *args)
    wait_for(lambda: status_json(b, tree)["service"]["running"], 30, "second start")
    proc.kill()
    proc.wait(30)
    doc = status_json(b, tree)
    (p,) = doc["service"]["processes"]
    assert not p["running"] and f"process {p['host']}:{proc.pid} is not running" in p["problem"]
    assert doc["service"]["running"] is False and doc["service"]["paused"] is None
    assert "NOT RUNNING" in status(b, tree).stdout
    # the next start sweeps them
    proc = start_watcher(tree.src, tree.dest, tree.state, log, *args)
    try:
        (p,) = status_json(b, tree)["service"]["processes"]
        assert p["running"] and p["pid"] == proc.pid
    finally:
        assert _stop(proc) == 0


# ---------------------------------------------------------------------------------------
# the heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def figures(**kw: Any) -> dict[str, Any]:
    f: dict[str, Any] = {
        "version": 1,
        "host": "h",
        "pid": os.getpid(),
        "started": time.time(),
        "updated": time.time(),
        "queued": 4,
        "in_flight": 2,
        "paused": False,
        "paused_reasons": [],
        "paused_since": None,
        "source_problem": None,
        "done": 120,
        "failed": 1,
        "quarantined": 0,
        "oldest_waiting": {"file": "t1_r7_ut1.fits", "seconds": 200.0},
    }
    f.update(kw)
    return f


def test_heartbeat_every_few_minutes_and_the_live_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    owner = Owner(host="h")
    pub = Publisher(tmp_path, owner, interval=300.0, clock=clock)
    caplog.set_level(logging.INFO, logger="rawtransfer.live")
    pub(figures())
    assert json.loads(live_path(tmp_path, owner).read_text())["queued"] == 4
    assert not caplog.records  # nothing before the first interval
    clock.now += 299
    pub(figures(queued=5))
    assert json.loads(live_path(tmp_path, owner).read_text())["queued"] == 5
    assert not caplog.records
    clock.now += 1
    pub(figures())
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "heartbeat: 4 queued, 2 in flight; since start 120 done, 1 failed, 0 quarantined; "
        "not paused; oldest waiting t1_r7_ut1.fits for 3 minutes"
    )
    clock.now += 300
    now = time.time()
    pub(figures(paused=True, paused_reasons=["catalog unavailable"], paused_since=now - 600))
    assert "PAUSED for 10 minutes: catalog unavailable" in caplog.records[-1].getMessage()
    assert len(caplog.records) == 2
    assert [p.name for p in (tmp_path / "live").iterdir()] == [f"h-{os.getpid()}.json"]
    pub.close()
    assert list((tmp_path / "live").iterdir()) == []


def test_the_live_file_of_a_dead_process_is_swept(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = live_path(tmp_path, Owner("h", dead.pid))
    path.parent.mkdir()
    path.write_text(json.dumps(figures(pid=dead.pid)))
    mine = Publisher(tmp_path, Owner("h"))
    assert not path.exists()
    mine.close()


def test_status_says_so_when_there_is_no_catalog(tmp_path: Path) -> None:
    r = run_rt("status", "--state-dir", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "no catalog at" in r.stderr
    assert not (tmp_path / "nowhere").exists()  # nothing created by a mistyped flag
