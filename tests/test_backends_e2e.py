"""The pipeline end to end over every combination of catalog and destination, and the
upstream drop-in: SQLite or PostgreSQL, a local directory or SSH, real servers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from rawtransfer import synth
from rawtransfer.catalog.base import FileFacts, Owner
from rawtransfer.catalog.postgres import PostgresCatalog
from rawtransfer.config import LocalDest, Settings
from tests.conftest import Tree
from tests.helpers import RAW_TRANSFER, check_archive, run_rt, sqlite_rows

META = r"t(?P<tel>\d)_r(?P<run>\d+)_ut(?P<ut>\d).fits"


@dataclass
class Backend:
    name: str
    dest_args: list[str]
    catalog_args: list[str]
    rows: Callable[[], list[dict[str, object]]]
    events: Callable[[], list[dict[str, object]]]
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        src: Path,
        *args: str | Path,
        timeout: float = 300,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run_rt(
            src,
            *self.dest_args,
            *self.catalog_args,
            *args,
            env={**self.env, **(env or {})},
            timeout=timeout,
        )


def _pg_rows(server: object, table: str) -> list[dict[str, object]]:
    with server.connect() as conn, conn.cursor(row_factory=dict_row) as cur:  # type: ignore[attr-defined]
        cur.execute(sql.SQL("select * from {}").format(sql.Identifier(table)))
        return list(cur.fetchall())


def make_backend(request: pytest.FixtureRequest, tree: Tree, catalog: str, dest: str) -> Backend:
    env: dict[str, str] = {}
    if dest == "ssh":
        ssh = request.getfixturevalue("sshd_server")
        dest_args = [
            f"{ssh.user}@127.0.0.1:{tree.dest}",
            "--ssh-config",
            str(ssh.ssh_config),
            "--known-hosts",
            str(ssh.known_hosts),
        ]
    else:
        dest_args = [str(tree.dest)]
    if catalog == "postgres":
        pg = request.getfixturevalue("pg_server")
        table = request.getfixturevalue("pg_table").name
        env = pg.env
        cat_args = [*pg.db_flags(table), "--state-dir", str(tree.state)]
        r = run_rt("db", "init", *pg.db_flags(table), "--metadata-regex", META, env=env)
        assert r.returncode == 0, r.stderr
        rows = lambda: _pg_rows(pg, table)  # noqa: E731
        events = lambda: _pg_rows(pg, table + "_events")  # noqa: E731
    else:
        cat_args = ["--state-dir", str(tree.state)]
        rows = lambda: sqlite_rows(tree.state / "catalog.sqlite3")  # noqa: E731
        events = lambda: sqlite_rows(tree.state / "catalog.sqlite3", "rawtransfer_events")  # noqa: E731
    return Backend(f"{catalog}-{dest}", dest_args, cat_args, rows, events, env)


@pytest.fixture(params=["sqlite-local", "sqlite-ssh", "postgres-local", "postgres-ssh"])
def backend(request: pytest.FixtureRequest, tree: Tree) -> Backend:
    catalog, dest = request.param.split("-")
    return make_backend(request, tree, catalog, dest)


def _night(tree: Tree, tmp_path: Path) -> dict[str, Path]:
    good = synth.night(tree.src, 4, (128, 96))
    expected = {p.name + ".fz": p for p in good}
    shutil.copy(good[1], tree.src / "t1_r99999_ut1.fits")  # same content, second name
    expected["float.fits.fz"] = synth.write_float_frame(tree.src / "float.fits")
    expected["multi.fits.fz"] = synth.write_multi_hdu(tree.src / "multi.fits")
    bad = synth.write_frame(tree.src / "t2_r66666_ut2.fits", (64, 64), seed=66)
    b = bytearray(bad.read_bytes())
    b[-100] ^= 4
    bad.write_bytes(bytes(b))
    tree.settled()
    return expected


def test_backfill_over_every_combination(backend: Backend, tree: Tree, tmp_path: Path) -> None:
    expected = _night(tree, tmp_path)
    r = backend.run(
        tree.src,
        "--backfill-only",
        "--patterns",
        "*.fits",
        "--metadata-regex",
        META,
        "--workers",
        "3",
        "--ssh-controlmaster",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    # the flag is upstream's; what it asked for is what the service always does, and says so
    said = "connections are kept" if "ssh" in backend.name else "has no effect here"
    assert said in r.stderr and "--ssh-controlmaster" in r.stderr
    rows = backend.rows()
    # which of the two names of one content went first is a race; the other is a duplicate
    if any(
        str(x["source_filepath"]).endswith("t1_r99999_ut1.fits") and x["state"] == "done"
        for x in rows
    ):
        first = next(k for k in expected if k.startswith("t2_r10001"))
        del expected[first]
        expected["t1_r99999_ut1.fits.fz"] = tree.src / "t1_r99999_ut1.fits"
    check_archive(tree.dest, expected, rows, tmp_path)
    states = Counter(str(x["state"]) for x in rows)
    assert states == {"done": 6, "quarantined": 1}, states
    assert [e["state"] for e in backend.events()].count("duplicate") == 1
    named = 0
    for x in rows:
        m = re.match(META, Path(str(x["source_filepath"])).name)
        if x["state"] == "done" and m:
            named += 1
            got = tuple(int(x[k]) for k in ("tel", "run", "ut"))  # type: ignore[call-overload]
            assert got == tuple(int(v) for v in m.groups())
    assert named == 4
    # again: nothing to do, nothing changes
    r = backend.run(tree.src, "--backfill-only", "--patterns", "*.fits", "--metadata-regex", META)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 done" in r.stdout and len(backend.rows()) == len(rows)


@pytest.mark.parametrize("combo", ["postgres-ssh"])
def test_two_hosts_sharing_one_catalog_transfer_each_file_once(
    request: pytest.FixtureRequest, tree: Tree, tmp_path: Path, combo: str
) -> None:
    b = make_backend(request, tree, *combo.split("-"))
    for i in range(24):
        synth.write_frame(tree.src / f"f{i:02d}.fits", (96, 96), seed=i)
    tree.settled()
    procs = []
    for host in ("telescope-a", "telescope-b"):
        state = tmp_path / host
        procs.append(
            subprocess.Popen(
                [
                    *RAW_TRANSFER,
                    str(tree.src),
                    *b.dest_args,
                    *b.catalog_args[:-2],
                    "--state-dir",
                    str(state),
                    "--backfill-only",
                    "--workers",
                    "4",
                    "--host-id",
                    host,
                    "--ssh-controlmaster",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **b.env},
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
    rows = b.rows()
    assert len(rows) == 24 and {x["state"] for x in rows} == {"done"}
    # a "done" event whose reason is the archive path is a verified transfer; the other
    # host seeing the finished row records "same content already at ..."
    copies = [e for e in b.events() if e["state"] == "done" and str(e["reason"]).startswith("/")]
    done_events = Counter(str(e["sha1_hash"]) for e in copies)
    assert len(done_events) == 24
    assert set(done_events.values()) == {1}, "a file was transferred twice"
    hosts = {str(e["host"]) for e in b.events() if e["state"] == "done"}
    assert hosts <= {"telescope-a", "telescope-b"}
    assert len(list(tree.dest.rglob("*.fz"))) == 24


def test_upstream_drop_in(request: pytest.FixtureRequest, tree: Tree, tmp_path: Path) -> None:
    """The exact upstream table and command line, after `db upgrade`."""
    pg = request.getfixturevalue("pg_server")
    ssh = request.getfixturevalue("sshd_server")
    table = request.getfixturevalue("pg_table").name
    ddl = (
        (ROOT / "sql" / "upstream_goto.sql")
        .read_text()
        .replace("create table goto", f"create table {table}")
    )
    with pg.connect() as conn:
        conn.execute(ddl)  # type: ignore[arg-type]
        conn.execute(
            sql.SQL(
                "insert into {} (sha1_hash, source_filepath, filepath, tel, run, ut) "
                "values ('a' || repeat('0', 39), '/old/t1_r1_ut1.fits', '/archive/old.fz', 1, 1, 1)"
            ).format(sql.Identifier(table))
        )
    flags = pg.db_flags(table)
    for _ in range(2):
        r = run_rt("db", "upgrade", *flags, "--metadata-regex", META, env=pg.env)
        assert r.returncode == 0, r.stderr
    frames = [
        synth.write_frame(tree.src / f"t{t}_r{12340 + i}_ut{u}.fits", (96, 96), seed=i)
        for i, (t, u) in enumerate([(1, 2), (2, 3), (1, 4)])
    ]
    (tree.src / "not_matching.fits").write_bytes(frames[0].read_bytes())
    tree.settled()
    r = run_rt(
        tree.src,
        f"{ssh.user}@127.0.0.1:{tree.dest}",
        "--patterns",
        "t?_r*_ut?.fits",
        "--metadata-regex",
        META,
        "--header-card",
        "DATE-OBS",
        *flags,
        "--copy-timeout",
        "60",
        "--workers",
        "8",
        "--ssh-controlmaster",
        "--backfill-only",
        "--ssh-config",
        str(ssh.ssh_config),
        "--known-hosts",
        str(ssh.known_hosts),
        "--state-dir",
        str(tree.state),
        env=pg.env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {str(x["source_filepath"]): x for x in _pg_rows(pg, table)}
    assert rows["/old/t1_r1_ut1.fits"]["state"] == "done"  # the upstream row is kept
    for f in frames:
        row = rows[str(f)]
        tel, run, ut = (
            int(v)
            for v in f.name[1:].replace(".fits", "").replace("_r", " ").replace("_ut", " ").split()
        )
        assert (row["tel"], row["run"], row["ut"]) == (tel, run, ut)
        assert Path(str(row["filepath"])).read_bytes()  # on the "remote" side
    check_archive(tree.dest, {f.name + ".fz": f for f in frames}, list(rows.values()), tmp_path)


@pytest.mark.parametrize("problem", ["unknown", "changed"])
def test_host_key_problems_refuse_and_transfer_nothing(
    request: pytest.FixtureRequest, tree: Tree, tmp_path: Path, problem: str
) -> None:
    ssh = request.getfixturevalue("sshd_server")
    kh = tmp_path / "known_hosts"
    if problem == "unknown":
        kh.write_text("")
    else:
        other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
        kh.write_text(f"[127.0.0.1]:{ssh.port} {other}\n")
    synth.write_frame(tree.src / "a.fits", (32, 32))
    tree.settled()
    r = run_rt(
        tree.src,
        f"{ssh.user}@127.0.0.1:{tree.dest}",
        "--backfill-only",
        "--ssh-config",
        str(ssh.ssh_config),
        "--known-hosts",
        str(kh),
        "--state-dir",
        str(tree.state),
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert ("unknown host key" if problem == "unknown" else "host key changed") in r.stderr
    assert "SHA256:" in r.stderr
    assert list(tree.dest.iterdir()) == []
    assert not (tree.state / "catalog.sqlite3").exists()


ROOT = Path(__file__).resolve().parent.parent


def test_the_service_needs_only_select_insert_update(
    request: pytest.FixtureRequest, tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator creates the table (`db init`); the service runs as a role that may
    only SELECT, INSERT and UPDATE it, including a shutdown that gives claims back."""
    pg = request.getfixturevalue("pg_server")
    table = request.getfixturevalue("pg_table").name
    assert run_rt("db", "init", *pg.db_flags(table), env=pg.env).returncode == 0
    role = f"rt_svc_{table[-8:]}"
    with _superuser(pg) as conn:
        conn.execute(sql.SQL("create role {} login password 'svc-pw'").format(sql.Identifier(role)))
        for t in (table, table + "_events"):
            conn.execute(
                sql.SQL("grant select, insert, update on {} to {}").format(
                    sql.Identifier(t), sql.Identifier(role)
                )
            )
    try:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"{pg.host}:{pg.port}:{pg.dbname}:{role}:svc-pw\n")
        passfile.chmod(0o600)
        for i in range(6):
            synth.write_frame(tree.src / f"f{i}.fits", (64, 64), seed=i)
        tree.settled()
        flags = [*pg.db_flags(table)]
        flags[flags.index("--db-user") + 1] = role
        env = {**pg.env, "PGPASSFILE": str(passfile)}
        r = run_rt(
            tree.src, tree.dest, *flags, "--backfill-only", "--state-dir", tree.state, env=env
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert {x["state"] for x in _pg_rows(pg, table)} == {"done"}
        # a release (an abandoned copy) is an UPDATE too
        s = Settings(
            source_dir=tree.src,
            dest=LocalDest(tree.dest),
            db_host=pg.host,
            db_port=pg.port,
            db_user=role,
            db_name=pg.dbname,
            db_table=table,
        )
        monkeypatch.setenv("PGPASSFILE", str(passfile))
        cat = PostgresCatalog.from_settings(s)
        try:
            me = Owner()
            facts = FileFacts("/x/y.fits", "r" * 40, 1, datetime(2026, 1, 1))
            cat.claim("e" * 40, facts, me, 600)
            cat.release("e" * 40, me, "shutting down")
        finally:
            cat.close()
        (row,) = [x for x in _pg_rows(pg, table) if x["sha1_hash"] == "e" * 40]
        assert row["state"] == "released"
    finally:
        with _superuser(pg) as conn:
            for t in (table, table + "_events"):
                conn.execute(
                    sql.SQL("revoke all on {} from {}").format(
                        sql.Identifier(t), sql.Identifier(role)
                    )
                )
            conn.execute(sql.SQL("drop role {}").format(sql.Identifier(role)))


def _superuser(pg: object) -> psycopg.Connection[tuple[object, ...]]:
    """The cluster's superuser, over the fixture's private socket (creating roles)."""
    return psycopg.connect(
        host=str(pg.socket_dir),  # type: ignore[attr-defined]
        port=pg.port,  # type: ignore[attr-defined]
        user="postgres",
        dbname=pg.dbname,  # type: ignore[attr-defined]
        autocommit=True,
    )
