"""One judgement: each backend feeds its errors through errors.classify, and production
reaches the same kinds that the classifier's table pins (tests/test_retry.py).

Refused (a person must act: rights, a read-only mount, keys) pauses like an outage but is
alerted at once, and ends a run that starts against it with exit code 3.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from psycopg import sql

from rawtransfer import synth
from rawtransfer.catalog.base import FileFacts, Owner, utcnow
from rawtransfer.catalog.pg_connect import PgTarget
from rawtransfer.catalog.postgres import PostgresCatalog
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.destination.local import LocalDestination
from rawtransfer.errors import (
    CatalogRefused,
    DestinationRefused,
    DestinationUnavailable,
    Kind,
)
from rawtransfer.queue import WorkQueue
from rawtransfer.timers import Canary
from tests.conftest import Tree
from tests.helpers import run_rt
from tests.test_backends_e2e import _superuser


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs that is remounted read-only by the test (EROFS, as a bad mount)."""
    where = tmp_path / "ro"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _remount_ro(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def test_a_read_only_destination_is_refused_not_unavailable(tmp_path: Path) -> None:
    """The root is writable (check passes); the year directory is a read-only mount."""
    root = tmp_path / "archive"
    year = root / "2026"
    year.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(year)], check=True)
    try:
        d = LocalDestination(root)
        d.check()
        src = tmp_path / "x.fz"
        src.write_bytes(b"x")
        with pytest.raises(DestinationUnavailable) as info:
            d.publish(src, PurePosixPath("2026/11/24/x.fz"), "0" * 40, threading.Event())
        assert isinstance(info.value, DestinationRefused) and info.value.kind == Kind.REFUSED
        assert "Read-only" in str(info.value)
    finally:
        subprocess.run(["umount", "-l", str(year)], check=False)


def test_a_read_only_destination_at_start_exits_3(read_only: Path, tree: Tree) -> None:
    _remount_ro(read_only)
    synth.write_frame(tree.src / "a.fits", (32, 32))
    tree.settled()
    r = run_rt(tree.src, read_only, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "not writable" in r.stderr or "Read-only" in r.stderr, r.stderr


def test_a_read_only_sqlite_catalog_is_refused(read_only: Path) -> None:
    cat = SqliteCatalog(read_only / "catalog.sqlite3", "rawtransfer")
    cat.close()
    _remount_ro(read_only)
    facts = FileFacts("/d/a.fits", "1" * 40, 10, utcnow())
    with pytest.raises(CatalogRefused) as info:
        cat = SqliteCatalog(read_only / "catalog.sqlite3", "rawtransfer")
        try:
            cat.claim("2" * 40, facts, Owner(), 600)
        finally:
            cat.close()
    assert info.value.kind == Kind.REFUSED


def test_a_postgres_role_without_rights_is_refused(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    pg = request.getfixturevalue("pg_server")
    table = request.getfixturevalue("pg_table").name
    assert run_rt("db", "init", *pg.db_flags(table), env=pg.env).returncode == 0
    role = f"rt_ro_{table[-8:]}"
    with _superuser(pg) as conn:
        conn.execute(sql.SQL("create role {} login password 'ro-pw'").format(sql.Identifier(role)))
        for t in (table, table + "_events"):
            conn.execute(
                sql.SQL("grant select on {} to {}").format(sql.Identifier(t), sql.Identifier(role))
            )
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"{pg.host}:{pg.port}:{pg.dbname}:{role}:ro-pw\n")
    passfile.chmod(0o600)
    old = os.environ.get("PGPASSFILE")
    os.environ["PGPASSFILE"] = str(passfile)
    try:
        target = PgTarget.build(host=pg.host, port=pg.port, user=role, dbname=pg.dbname)
        cat = PostgresCatalog(target, table)
        try:
            facts = FileFacts("/d/a.fits", "1" * 40, 10, utcnow())
            with pytest.raises(CatalogRefused, match="permission denied"):
                cat.claim("3" * 40, facts, Owner(), 600)
        finally:
            cat.close()
        wrong = PgTarget.build(host=pg.host, port=pg.port, user="nobody_here", dbname=pg.dbname)
        with pytest.raises(CatalogRefused):
            PostgresCatalog(wrong, table)
    finally:
        if old is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = old
        with _superuser(pg) as conn:
            conn.execute(sql.SQL("drop owned by {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("drop role {}").format(sql.Identifier(role)))


class _Alerts:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def alert(self, kind: str, text: str) -> None:
        self.sent.append((kind, text))

    def resolve(self, kind: str, text: str) -> None:
        self.sent.append(("resolved " + kind, text))

    def close(self) -> None:
        pass


class _Dest:
    def __init__(self, exc: Exception | None) -> None:
        self.exc = exc

    def check(self) -> None:
        if self.exc is not None:
            raise self.exc


class _Cat:
    def check(self) -> None:
        pass


def test_the_canary_alerts_a_refusal_at_once_and_an_outage_only_when_it_lasts() -> None:
    alerts = _Alerts()
    dest = _Dest(DestinationUnavailable("connection refused"))
    queue = WorkQueue()
    canary = Canary(dest, _Cat(), queue, alerts, alert_after=3600)  # type: ignore[arg-type]
    assert canary() is False and queue.paused
    assert alerts.sent == []  # an outage may pass by itself: wait before waking anyone
    dest.exc = DestinationRefused("host key changed")
    canary()
    assert [k for k, _ in alerts.sent] == ["destination down"]
    dest.exc = None
    assert canary() is True and not queue.paused
    assert [k for k, _ in alerts.sent] == ["destination down", "resolved destination down"]
