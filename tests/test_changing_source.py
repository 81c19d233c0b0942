"""A source file that changes while it is processed: one snapshot per file.

Each race is made deterministic by a fault point (rawtransfer.faults): the source is
swapped for another version (atomic rename) or rewritten in place at a named step. The
oracle then checks that the archive holds only content whose catalog row belongs to it,
and that the version left in the source is archived, never failed or skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rawtransfer import faults, synth
from tests.conftest import Tree
from tests.helpers import run_rt, sqlite_rows, start_watcher, wait_for
from tests.oracle import oracle


def _rows(tree: Tree) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    db = tree.state / "catalog.sqlite3"
    return sqlite_rows(db), sqlite_rows(db, "rawtransfer_events")


def _check(tree: Tree) -> list[dict[str, object]]:
    rows, events = _rows(tree)
    assert oracle(tree.src, tree.dest, rows, events, spool=tree.state / "spool") == []
    return rows


def _night(tree: Tree, n: int = 3) -> list[Path]:
    files = synth.night(tree.src, n, (96, 80))
    tree.settled()
    return files


def _backfill(tree: Tree, fault: str = "") -> str:
    env = {faults.ENV: fault} if fault else {}
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


@pytest.mark.parametrize(
    "fault",
    [
        "after-settle:swap",
        "after-check:swap",
        "during-pack:swap",
        "during-pack:rewrite",
        "before-claim:swap",
        "before-claim:rewrite",
        "after-claim:swap",
        "during-copy:rewrite",
    ],
)
def test_a_file_changed_while_processed_is_looked_at_again(tree: Tree, fault: str) -> None:
    files = _night(tree)
    out = _backfill(tree, fault)
    assert "changed while" in out, out
    rows = _check(tree)
    # every version left in the source is archived in its own day directory
    done = {Path(str(r["source_filepath"])) for r in rows if r["state"] == "done"}
    assert set(files) <= done, out
    assert not [r for r in rows if r["state"] in ("failed", "quarantined")], rows


def test_a_version_renamed_in_during_the_copy_is_not_taken_as_done(tree: Tree) -> None:
    """In the watcher: the old version is recorded, the new one is archived as well."""
    log = tree.root / "rt.log"
    proc = start_watcher(
        tree.src,
        tree.dest,
        tree.state,
        log,
        "--patience",
        "0.5",
        env={faults.ENV: "after-publish:swap"},
    )
    try:
        f = synth.write_frame(tree.src / "a.fits", (96, 80), date_obs="2026-11-24T21:00:00")
        wait_for(lambda: len(list(tree.dest.rglob("*.fz"))) == 2, 60, "both versions archived")
    finally:
        proc.terminate()
        proc.wait(30)
    rows = _check(tree)
    assert {r["state"] for r in rows} == {"done"}
    assert sorted(p.parent.name for p in tree.dest.rglob("*.fz")) == ["24", "25"]
    assert f.exists()


def test_a_copy_that_keeps_an_old_mtime_is_not_skipped(tree: Tree) -> None:
    """cp -p, rsync -t, a move from a staging area: a new file with an old mtime."""
    (f,) = _night(tree, 1)
    _backfill(tree)
    staged = tree.root / "staged.fits"
    staged.write_bytes(faults.other_version(f))
    old = f.stat().st_mtime - 60
    os.utime(staged, (old, old))
    shutil.move(staged, f)  # keeps the old mtime, as cp -p and rsync -t do
    out = _backfill(tree)
    assert "1 done" in out, out
    _check(tree)
    assert len(list(tree.dest.rglob("*.fz"))) == 2


def test_a_packed_source_changed_during_the_copy_is_never_left_unverified(tree: Tree) -> None:
    """.fz sources are uploaded from one snapshot; no unverified copy under a final name."""
    raw = _night(tree, 3)
    for p in raw:
        packed = p.with_name(p.name + ".fz")
        with p.open("rb") as inp, packed.open("wb") as out:
            subprocess.run(["fpack", "-C", "-r", "-S", "-"], stdin=inp, stdout=out, check=True)
        p.unlink()
    tree.settled()
    r = run_rt(
        tree.src,
        tree.dest,
        "--backfill-only",
        "--patterns",
        "*.fits.fz",
        "--state-dir",
        tree.state,
        env={faults.ENV: "during-copy:swap"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows, events = _rows(tree)
    assert oracle(tree.src, tree.dest, rows, events, patterns=("*.fits.fz",)) == []
    assert {r["state"] for r in rows} == {"done"}


def test_unchanged_files_are_not_looked_at_again(tree: Tree) -> None:
    _night(tree, 2)
    _backfill(tree)
    time.sleep(0.01)
    out = _backfill(tree)
    assert "0 files" in out, out
