"""One error model: every outcome other than done leaves a row, an event and a reason.

Files that cannot be read, headers astropy refuses, frames that declare more memory than
allowed, defects of ours: each ends in a recorded state and is not tried again at every
scan; failures are tried again when their cause can have gone (the file changed, the
conflicting archive file was moved aside, an operator asked). A full spool is the
host's problem: the file waits, it is never failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from rawtransfer import faults, synth
from tests.conftest import Tree
from tests.helpers import RAW_TRANSFER, run_rt, sqlite_rows, start_watcher, wait_for
from tests.oracle import oracle


def _rows(tree: Tree) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    db = tree.state / "catalog.sqlite3"
    return sqlite_rows(db), sqlite_rows(db, "rawtransfer_events")


def _backfill(tree: Tree, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_rt(
        tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state, *extra, env=env
    )


def _oracle(tree: Tree) -> None:
    rows, events = _rows(tree)
    assert oracle(tree.src, tree.dest, rows, events) == []


def _state_of(tree: Tree, name: str) -> tuple[str, str]:
    _, events = _rows(tree)
    mine = [e for e in events if str(e["source_filepath"]).endswith(name)]
    assert mine, events
    return str(mine[-1]["state"]), str(mine[-1]["reason"])


def _non_ascii_header(path: Path) -> Path:
    synth.write_frame(path, (64, 64), checksum=False)
    data = bytearray(path.read_bytes())
    at = data.index(b"UTC start of exposure")
    data[at : at + 3] = "é".encode("latin-1") + b"XX"  # one byte that is not ASCII
    path.write_bytes(bytes(data))
    return path


def _cards_out_of_order(path: Path) -> Path:
    synth.write_frame(path, (64, 64), checksum=False)
    data = bytearray(path.read_bytes())
    # swap the BITPIX and NAXIS cards (cards 2 and 3): mandatory order broken
    data[80:160], data[160:240] = data[160:240], data[80:160]
    path.write_bytes(bytes(data))
    return path


def _declares_huge(path: Path) -> Path:
    """A small .fz whose header declares a 60000 x 60000 image."""
    hdu = fits.CompImageHDU(np.zeros((64, 64), dtype="i2"), compression_type="RICE_1")
    hdu.header["DATE-OBS"] = "2026-11-24T22:00:00"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    data = bytearray(path.read_bytes())
    for card in (b"ZNAXIS1 =", b"ZNAXIS2 ="):
        at = data.index(card)
        data[at : at + 80] = f"{card.decode():<8s}{60000:>21d}".ljust(80).encode()
    for card in (b"ZTILE1  =", b"ZTILE2  ="):
        at = data.index(card)
        data[at : at + 80] = (
            f"{card.decode():<8s}{60000 if card == b'ZTILE1  =' else 1:>21d}".ljust(80).encode()
        )
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (_non_ascii_header, "quarantined"),
        (_cards_out_of_order, "quarantined"),
        (_declares_huge, "quarantined"),
    ],
    ids=["non-ascii-header", "cards-out-of-order", "declares-60000x60000"],
)
def test_files_astropy_refuses_are_quarantined_once(tree: Tree, make, expect: str) -> None:  # type: ignore[no-untyped-def]
    name = "bad.fits.fz" if make is _declares_huge else "bad.fits"
    make(tree.src / name)
    # a good frame checked first in the same process (its name sorts first, one worker)
    # makes astropy's warnings errors before the bad one is settled
    synth.write_frame(tree.src / "a-good.fits", (32, 32), seed=5)
    tree.settled()
    r = _backfill(tree, "--patterns", "*.fits", "*.fits.fz", "--workers", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    state, reason = _state_of(tree, name)
    assert state == expect and reason, (state, reason)
    if make is _declares_huge:
        assert "declares" in reason and "--max-frame-bytes" in reason
    # recorded once: the next run does not look at it again
    again = _backfill(tree, "--patterns", "*.fits", "*.fits.fz")
    assert again.returncode == 0 and "0 files" in again.stdout, again.stdout
    _oracle(tree)


def test_max_frame_bytes_quarantines_before_decompressing(tree: Tree) -> None:
    synth.write_frame(tree.src / "big.fits", (256, 256))  # 128 KiB of pixels
    synth.write_frame(tree.src / "small.fits", (32, 32), seed=1)
    tree.settled()
    r = _backfill(tree, "--max-frame-bytes", "64K")
    assert r.returncode == 1, r.stdout + r.stderr
    assert _state_of(tree, "big.fits")[0] == "quarantined"
    assert _state_of(tree, "small.fits")[0] == "done"
    bad = run_rt(tree.src, tree.dest, "--max-frame-bytes", "lots")
    assert bad.returncode == 2 and "512M" in bad.stderr


def test_a_defect_is_recorded_once_with_its_traceback_and_not_retried(tree: Tree) -> None:
    synth.night(tree.src, 2, (64, 48))
    tree.settled()
    r = _backfill(tree, env={faults.ENV: "after-check:raise"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.count("Traceback") == 1, r.stderr
    rows, events = _rows(tree)
    failed = [e for e in events if e["state"] == "failed"]
    assert len(failed) == 1 and "internal error" in str(failed[0]["reason"])
    assert [r for r in rows if r["state"] == "failed" and r["error"]]
    again = _backfill(tree)
    assert "0 files" in again.stdout, again.stdout
    # an operator asks for a retry; the next run takes it and it goes through
    path = str(failed[0]["source_filepath"])
    asked = run_rt("retry", path, "--state-dir", tree.state)
    assert asked.returncode == 0 and "retry recorded" in asked.stdout, asked.stdout + asked.stderr
    third = _backfill(tree)
    assert third.returncode == 0 and "1 done" in third.stdout, third.stdout
    _oracle(tree)


def test_retry_refuses_quarantined_files_and_takes_them_once_repaired(tree: Tree) -> None:
    bad = _cards_out_of_order(tree.src / "bad.fits")
    tree.settled()
    assert _backfill(tree).returncode == 1
    asked = run_rt("retry", bad, "--state-dir", tree.state)
    assert asked.returncode == 1 and "once the file changes" in asked.stdout, asked.stdout
    assert "0 files" in _backfill(tree).stdout
    bad.unlink()
    synth.write_frame(bad, (64, 64))  # repaired under the same name
    tree.settled()
    r = _backfill(tree)
    assert r.returncode == 0 and "1 done" in r.stdout, r.stdout
    _oracle(tree)


def test_a_conflict_is_retried_once_the_file_in_the_way_is_moved_aside(tree: Tree) -> None:
    (f,) = synth.night(tree.src, 1, (64, 48))
    tree.settled()
    day = tree.dest / "2026" / "11" / "24"
    day.mkdir(parents=True)
    squatter = day / (f.name + ".fz")
    squatter.write_bytes(b"someone else's file")
    r = _backfill(tree)
    assert r.returncode == 1 and "different content" in r.stdout, r.stdout
    assert "0 files" in _backfill(tree).stdout  # nothing changed: not tried again
    squatter.rename(tree.root / "moved-aside.fz")
    r = _backfill(tree)
    assert r.returncode == 0 and "1 done" in r.stdout, r.stdout + r.stderr
    _oracle(tree)


@pytest.fixture
def public_tree() -> Iterator[Tree]:
    """A tree an unprivileged user can reach (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="rt-public-", dir="/tmp"))
    os.chmod(root, 0o755)
    t = Tree(root, root / "src", root / "archive", root / "state")
    for d in (t.src, t.dest, t.state):
        d.mkdir()
    shutil.chown(t.dest, "nobody")
    shutil.chown(t.state, "nobody")
    shutil.chown(t.src, "nobody")
    yield t
    shutil.rmtree(root, ignore_errors=True)


def test_a_source_file_that_cannot_be_read_is_failed_with_its_reason(public_tree: Tree) -> None:
    tree = public_tree
    ok, locked = synth.night(tree.src, 2, (64, 48))
    os.chmod(locked, 0o000)
    for p in (ok, locked):
        shutil.chown(p, "nobody")
    tree.settled()
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    cmd = [*as_nobody, *RAW_TRANSFER, str(tree.src), str(tree.dest), "--backfill-only"]
    cmd += ["--state-dir", str(tree.state)]
    env = {**os.environ, "HOME": str(tree.state)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert "Permission denied" in r.stdout, r.stdout
    state, reason = _state_of(tree, locked.name)
    assert state == "failed" and "cannot be read" in reason
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert "0 files" in again.stdout, again.stdout
    # the operator fixes the permissions (the ctime changes): the file goes through
    os.chmod(locked, 0o644)
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert third.returncode == 0 and "1 done" in third.stdout, third.stdout + third.stderr


@pytest.fixture
def small_spool(tree: Tree) -> Iterator[Path]:
    spool = tree.state / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spool)], check=True)
    yield spool
    subprocess.run(["umount", "-l", str(spool)], check=False)


def test_a_full_spool_pauses_and_never_fails_a_file(tree: Tree, small_spool: Path) -> None:
    log = tree.root / "rt.log"
    proc = start_watcher(tree.src, tree.dest, tree.state, log, "--canary-interval", "0.5")
    try:
        synth.write_frame(tree.src / "big.fits", (256, 512))  # packs to well over 64 KiB
        wait_for(lambda: b"spool unavailable" in log.read_bytes(), 60, "the spool to be full")
        subprocess.run(["mount", "-o", "remount,size=8m", str(small_spool)], check=True)
        wait_for(lambda: list(tree.dest.rglob("big.fits.fz")), 60, "the transfer after room")
    finally:
        proc.terminate()
        proc.wait(30)
    rows, _events = _rows(tree)
    assert {r["state"] for r in rows} == {"done"}, rows
    text = log.read_text()
    assert "failed" not in text and "quarantined" not in text, text
    _oracle(tree)


def test_logs_stay_one_short_line_per_event(tree: Tree) -> None:
    synth.write_frame(tree.src / "new\nline.fits", (32, 32))
    long = tree.src / "long.fits"
    synth.write_frame(long, (32, 32), seed=2)
    with fits.open(long, mode="update") as h:
        h[0].header["DATE-OBS"] = "2026-11-24T" + "9" * 60  # long, and not a date
        h[0].add_checksum()
    # a 10,000-character value needs a CONTINUE card: astropy writes a long string
    hdr = fits.getheader(long)
    hdr["DATE-OBS"] = "X" * 10_000
    data = fits.getdata(long)
    long.unlink()
    fits.PrimaryHDU(data, hdr).writeto(long, checksum=True)
    tree.settled()
    r = _backfill(tree)
    lines = (r.stdout + r.stderr).splitlines()
    assert max(len(x) for x in lines) < 1200, max(len(x) for x in lines)
    # the newline is escaped wherever the name appears, the archive path included
    assert not [x for x in lines if x.startswith("line.fits")], lines
    done = [x for x in lines if " done " in x or x.startswith("done")]
    assert all("\\n" in x for x in done if "line.fits" in x), done
