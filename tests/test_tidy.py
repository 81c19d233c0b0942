"""Tidying: an original is replaced by its .fz only when the verified copy matches."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from rawtransfer import synth
from rawtransfer.catalog.base import FileFacts, Owner
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.tidy import tidy_one
from tests.conftest import Tree
from tests.helpers import RAW_TRANSFER, run_rt, sha1, sqlite_rows, wait_for


def _backfill(tree: Tree) -> dict[str, str]:
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 0, r.stdout + r.stderr
    return {
        str(r_["source_filepath"]): str(r_["sha1_hash"])
        for r_ in sqlite_rows(tree.state / "catalog.sqlite3")
    }


def test_tidy_one_replaces_only_with_the_verified_bytes(tree: Tree) -> None:
    a = synth.write_frame(tree.src / "a.fits", (64, 64), seed=1, date_obs="2026-11-24T01:00:00")
    b = synth.write_frame(tree.src / "b.fits", (64, 64), seed=2, date_obs="2026-11-24T01:00:00")
    tree.settled()
    rows = _backfill(tree)
    spool = tree.state / "spool"
    cat = SqliteCatalog(tree.state / "catalog.sqlite3", "rawtransfer")
    try:
        owner = Owner("h", os.getpid())
        # a wrong SHA1 (as if the archive held something else): nothing is touched
        assert not tidy_one(a, "0" * 40, spool, cat, owner)
        assert a.exists() and not a.with_name("a.fits.fz").exists()
        # a foreign file already where the .fz would go: nothing is touched
        a.with_name("a.fits.fz").write_bytes(b"someone else's")
        assert not tidy_one(a, rows[str(a)], spool, cat, owner)
        assert a.exists() and a.with_name("a.fits.fz").read_bytes() == b"someone else's"
        # the real thing
        assert tidy_one(b, rows[str(b)], spool, cat, owner)
        assert not b.exists()
        fz = b.with_name("b.fits.fz")
        assert sha1(fz) == rows[str(b)] == sha1(tree.dest / "2026/11/24/b.fits.fz")
        assert not [p for p in tree.src.iterdir() if p.name.endswith(".rt-tmp")]
        assert list(spool.iterdir()) == []
    finally:
        cat.close()


def test_upstream_rows_without_verification_are_never_tidied(tree: Tree) -> None:
    cat = SqliteCatalog(tree.state / "catalog.sqlite3", "rawtransfer")
    try:
        from datetime import datetime

        a = synth.write_frame(tree.src / "a.fits", (32, 32), seed=3)
        facts = FileFacts(str(a), "r" * 40, 1, datetime(2026, 1, 1))
        owner = Owner("h", os.getpid())
        cat.claim("c" * 40, facts, owner, 600)
        assert cat.verified_sources(datetime(2000, 1, 1)) == {}
    finally:
        cat.close()


def test_watcher_tidies_after_verification_and_keep_source_keeps(
    tree: Tree, tmp_path: Path
) -> None:
    def run(keep: bool) -> None:
        log = tree.root / f"rt-{keep}.log"
        args = [
            *RAW_TRANSFER,
            str(tree.src),
            str(tree.dest),
            "--state-dir",
            str(tree.state),
            "--patience",
            "1",
            "--overwrite-unpacked-recency-window",
            "0",
        ]
        if keep:
            args.append("--keep-source")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        try:
            wait_for(lambda: b"watching" in log.read_bytes(), 30, "start")
            name = f"k{keep}.fits"
            staged = synth.write_frame(tree.root / name, (64, 64), seed=int(keep))
            os.rename(staged, tree.src / name)
            wait_for(lambda: (tree.dest / "2026/11/24" / (name + ".fz")).exists(), 60, "transfer")
            if keep:
                wait_for(lambda: b"done " in log.read_bytes(), 30, "done line")
            else:
                wait_for(lambda: b"tidied" in log.read_bytes(), 60, "tidy")
        finally:
            proc.terminate()
            assert proc.wait(60) == 0, log.read_text()

    run(keep=True)
    assert (tree.src / "kTrue.fits").exists() and not (tree.src / "kTrue.fits.fz").exists()
    run(keep=False)
    assert not (tree.src / "kFalse.fits").exists()
    assert sha1(tree.src / "kFalse.fits.fz") == sha1(tree.dest / "2026/11/24/kFalse.fits.fz")


def test_a_file_left_aside_by_an_interrupted_removal_is_put_back(tree: Tree) -> None:
    """A tidy or reap killed between its rename aside and its unlink: the next start puts
    the file back under its name (never over one there now), and it is judged again."""
    new = synth.write_frame(tree.src / ".b.fits.0123456789ab.rt-aside", (64, 64), seed=7)
    both = synth.write_frame(tree.src / ".c.fits.0123456789ab.rt-aside", (64, 64), seed=8)
    there = synth.write_frame(tree.src / "c.fits", (64, 64), seed=9)
    tree.settled()
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tree.src / "b.fits").exists() and not new.exists()
    assert both.exists() and sha1(there) != sha1(both)  # kept both, said so
    assert "kept both" in r.stderr
    assert "2 done" in r.stdout, r.stdout
