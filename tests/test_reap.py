"""Reaping deletes exactly the local files that are done, verified and past retention.

Never a failed, quarantined, excluded, waiting or changed one; never one whose archive
copy is bad when --reap-verify-remote is given; on both catalogs and both destinations.
The disk-pressure mode runs on a small tmpfs.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from psycopg import sql

from rawtransfer import faults, synth
from rawtransfer.catalog.base import utcnow
from tests.conftest import Tree
from tests.helpers import run_rt, sha1
from tests.test_backends_e2e import Backend, make_backend

KEEP = ("--keep-source",)


def _age_verification(
    request: pytest.FixtureRequest, backend: Backend, tree: Tree, hours: float
) -> None:
    """Move every row's verification time ``hours`` into the past (the test's history)."""
    when = utcnow() - timedelta(hours=hours)
    if backend.name.startswith("postgres"):
        pg = request.getfixturevalue("pg_server")
        table = request.getfixturevalue("pg_table").name
        with pg.connect() as conn:
            conn.execute(
                sql.SQL("update {} set verified_at = %s where verified_at is not null").format(
                    sql.Identifier(table)
                ),
                (when,),
            )
    else:
        con = sqlite3.connect(tree.state / "catalog.sqlite3")
        con.execute(
            "update rawtransfer set verified_at = ? where verified_at is not null",
            (when.isoformat(sep=" "),),
        )
        con.commit()
        con.close()


def _old(*paths: Path, hours: float = 3) -> None:
    import os
    import time

    t = time.time() - hours * 3600
    for p in paths:
        os.utime(p, (t, t))


@pytest.mark.parametrize("combo", ["sqlite-local", "postgres-ssh"])
def test_reap_deletes_exactly_the_safely_archived_ones(
    request: pytest.FixtureRequest, tree: Tree, combo: str
) -> None:
    backend = make_backend(request, tree, *combo.split("-"))
    f = synth.night(tree.src, 6, (64, 48))
    excluded, due, changed, recent, bad_copy, conflict = f
    corrupt = synth.write_frame(tree.src / "corrupt.fits", (64, 48), seed=99)
    data = bytearray(corrupt.read_bytes())
    data[-100] ^= 4
    corrupt.write_bytes(bytes(data))
    day = tree.dest / "2026" / "11" / "24"
    day.mkdir(parents=True)
    (day / (conflict.name + ".fz")).write_bytes(b"someone else's file")
    tree.settled()
    r = backend.run(tree.src, "--backfill-only", *KEEP, "--state-dir", tree.state)
    assert r.returncode == 1, r.stdout + r.stderr  # the conflict and the corrupt frame
    waiting = synth.write_frame(tree.src / "waiting.fits", (64, 48), seed=77)
    # the history: verified three hours ago; files as old, except one touched just now
    _age_verification(request, backend, tree, 3)
    _old(*f, corrupt, waiting)
    changed.write_bytes(faults.other_version(changed))
    _old(changed)
    recent.touch()
    copy = next(tree.dest.rglob(bad_copy.name + ".fz"))
    b = bytearray(copy.read_bytes())
    b[-10] ^= 1
    copy.write_bytes(bytes(b))
    before = {p: sha1(p) for p in tree.src.rglob("*.fits")}

    flags = ["--reap-after", "1", *KEEP, "--exclude", excluded.name, "--state-dir", tree.state]
    dry = run_rt("reap", tree.src, *backend.dest_args, *backend.catalog_args, *flags, "--dry-run",
                 env=backend.env)  # fmt: skip
    assert dry.returncode == 0, dry.stdout + dry.stderr
    listed = [x for x in dry.stdout.splitlines() if x.startswith("would delete")]
    assert len(listed) == 2 and all(due.name in x or bad_copy.name in x for x in listed), dry.stdout
    assert {p: sha1(p) for p in before} == before  # a dry run deletes nothing

    real = run_rt("reap", tree.src, *backend.dest_args, *backend.catalog_args, *flags,
                  "--reap-verify-remote", env=backend.env)  # fmt: skip
    assert real.returncode == 0, real.stdout + real.stderr
    assert not due.exists()
    # everything else is still there, byte for byte
    assert {p: sha1(p) for p in before if p != due} == {p: h for p, h in before.items() if p != due}
    assert "archive copy" in real.stdout and bad_copy.name in real.stdout
    events = backend.events()
    reaped = [e for e in events if e["state"] == "reaped"]
    assert [e["source_filepath"] for e in reaped] == [str(due)]
    assert "verified" in str(reaped[0]["reason"])


def test_reap_takes_the_fz_left_by_tidying_not_the_original(tree: Tree) -> None:
    (f,) = synth.night(tree.src, 1, (64, 48))
    tree.settled()
    assert run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state).returncode == 0
    # what tidying does: the original replaced by its byte-identical .fz
    packed = next(tree.dest.rglob("*.fz"))
    fz = f.with_name(f.name + ".fz")
    fz.write_bytes(packed.read_bytes())
    f.unlink()
    _old(fz)
    con = sqlite3.connect(tree.state / "catalog.sqlite3")
    old = (utcnow() - timedelta(hours=3)).isoformat(sep=" ")
    con.execute("update rawtransfer set verified_at = ?", (old,))
    con.commit()
    con.close()
    r = run_rt("reap", tree.src, tree.dest, "--reap-after", "1", "--state-dir", tree.state)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not fz.exists() and "deleted" in r.stdout
    # without --reap-after or --reap-when-disk-above there is nothing to do: said clearly
    none = run_rt("reap", tree.src, tree.dest, "--state-dir", tree.state)
    assert none.returncode == 2 and "--reap-after" in none.stderr


@pytest.fixture
def small_source(tree: Tree) -> Iterator[Path]:
    src = tree.root / "small-src"
    src.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(src)], check=True)
    yield src
    subprocess.run(["umount", "-l", str(src)], check=False)


def test_disk_pressure_deletes_oldest_first_until_below(tree: Tree, small_source: Path) -> None:
    frames = synth.night(small_source, 8, (200, 200))  # 80 KB each
    _old(*frames, hours=24)
    state = ["--state-dir", str(tree.state)]
    r = run_rt(small_source, tree.dest, "--backfill-only", "--backfill-hours", "48", *state)
    assert r.returncode == 0, r.stdout + r.stderr
    con = sqlite3.connect(tree.state / "catalog.sqlite3")
    # verified one hour apart, the first frame longest ago
    for i, p in enumerate(frames):
        when = (utcnow() - timedelta(hours=10 - i)).isoformat(sep=" ")
        con.execute(
            "update rawtransfer set verified_at = ? where source_filepath = ?", (when, str(p))
        )
    con.commit()
    con.close()
    waiting = [synth.write_frame(small_source / f"w{i}.fits", (200, 200), seed=50 + i)
               for i in range(4)]  # fmt: skip
    (small_source / "filler.dat").write_bytes(b"\0" * 700_000)
    from rawtransfer.reap import disk_percent

    start = disk_percent(small_source)
    threshold = start - 10  # about three frames must go
    flags = ["--reap-when-disk-above", f"{threshold:.1f}", "--keep-source", *state]
    r = run_rt("reap", small_source, tree.dest, *flags)
    assert r.returncode == 0, r.stdout + r.stderr
    gone = [p for p in frames if not p.exists()]
    assert gone and gone == frames[: len(gone)], (gone, r.stdout)  # oldest first
    assert disk_percent(small_source) <= threshold
    assert all(p.exists() for p in waiting)  # never one not yet archived
    # fuller than 1%, and nothing may go without --keep-source (originals wait for their
    # tidying): a person must act (the log says so; the service alerts)
    high = run_rt("reap", small_source, tree.dest, "--reap-when-disk-above", "1", *state)
    assert "nothing more may be deleted" in high.stderr, high.stderr
    assert all(p.exists() for p in waiting)


def test_reaping_is_counted_in_the_metrics_and_shown_by_why(tree: Tree) -> None:
    from rawtransfer.catalog.sqlite import SqliteCatalog
    from rawtransfer.config import build
    from rawtransfer.destination.local import LocalDestination
    from rawtransfer.metrics import Metrics
    from rawtransfer.queue import WorkQueue
    from rawtransfer.reap import Reaper
    from rawtransfer.service import make_matcher

    files = synth.night(tree.src, 2, (64, 48))
    tree.settled()
    assert run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state).returncode == 0
    s = build(
        {"source_dir": str(tree.src), "dest": str(tree.dest), "state_dir": str(tree.state),
         "keep_source": True, "reap_after": 0.0}
    )  # fmt: skip
    metrics = Metrics(WorkQueue())
    cat = SqliteCatalog(tree.state / "catalog.sqlite3", "rawtransfer")
    try:
        report = Reaper(s, make_matcher(s), cat, LocalDestination(tree.dest), metrics=metrics)()
    finally:
        cat.close()
    assert len(report.deleted) == 2 and not any(p.exists() for p in files)
    value = metrics.registry.get_sample_value
    assert value("rawtransfer_reaped_files_total") == 2
    assert value("rawtransfer_reaped_bytes_total") == sum(c.size for c, _ in report.deleted)
    why = run_rt("why", files[0].name, "--state-dir", tree.state)
    assert "reaped" in why.stdout and "deleted locally" in why.stdout, why.stdout


def test_reap_with_hostile_names(tree: Tree) -> None:
    names = ["odd name'$(touch pwned);.fits", "new\nline.fits", "-dash [1].fits"]
    files = [synth.write_frame(tree.src / n, (48, 40), seed=i) for i, n in enumerate(names)]
    tree.settled()
    assert run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state).returncode == 0
    r = run_rt("reap", tree.src, tree.dest, "--keep-source", "--reap-after", "0",
               "--state-dir", tree.state)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert not any(p.exists() for p in files)
    assert len(list(tree.dest.rglob("*.fz"))) == 3  # the archive is untouched
    assert all("\n" not in line[1:] for line in r.stdout.splitlines())
    assert not (tree.root / "pwned").exists() and not Path("pwned").exists()
