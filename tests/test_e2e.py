"""End to end: the real raw-transfer command as a subprocess, checked independently."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from rawtransfer import synth
from tests.conftest import Tree
from tests.helpers import (
    RAW_TRANSFER,
    check_archive,
    run_rt,
    sqlite_rows,
    start_watcher,
    wait_for,
)

META = r"t(?P<tel>\d)_r(?P<run>\d+)_ut(?P<ut>\d)\.fits"
ODD_NAMES = [
    "with space.fits",
    "quote'single.fits",
    'quote"double.fits',
    "semi;colon.fits",
    "$(touch pwned).fits",
    "new\nline.fits",
    "-leading-dash.fits",
]


def _bad_date(path: Path, value: str) -> Path:
    synth.write_frame(path, (64, 64), date_obs="2026-01-01T00:00:00")
    with fits.open(path, mode="update") as h:
        h[0].header["DATE-OBS"] = value
        h[0].add_checksum()
    return path


def _events(tree: Tree) -> list[dict[str, object]]:
    return sqlite_rows(tree.state / "catalog.sqlite3", "rawtransfer_events")


def test_backfill_only_moves_good_files_and_quarantines_bad(tree: Tree, tmp_path: Path) -> None:
    s = tree.src
    night = s / "2026-11-24"
    night.mkdir()
    good = synth.night(night, 3, (200, 160))
    expected = {p.name + ".fz": p for p in good}
    dup = night / "copy of t1.fits"
    shutil.copy(good[0], dup)
    f = synth.write_float_frame(s / "float.fits")
    m = synth.write_multi_hdu(s / "multi.fits")
    expected |= {"float.fits.fz": f, "multi.fits.fz": m}
    # already packed by someone else: taken as it is, not packed again
    pre = synth.write_frame(tmp_path / "prepacked.fits", (128, 128), seed=77)
    subprocess.run(["fpack", "-C", "-O", str(s / "prepacked.fits.fz"), str(pre)], check=True)
    expected["prepacked.fits.fz"] = pre
    for i, name in enumerate(ODD_NAMES):
        expected[name + ".fz"] = synth.write_frame(s / name, (64, 64), seed=100 + i)
    # bad ones
    corrupt = synth.write_frame(s / "corrupt.fits", (128, 128), seed=200)
    b = bytearray(corrupt.read_bytes())
    b[-4000] ^= 0x01
    corrupt.write_bytes(bytes(b))
    trunc = s / "truncated.fits"
    trunc.write_bytes(
        synth.write_frame(tmp_path / "t.fits", (128, 128), seed=201, checksum=False).read_bytes()[
            :9000
        ]
    )
    (s / "empty.fits").touch()
    (s / "notfits.fits").write_text("just text\n" * 500)
    _bad_date(s / "slashdate.fits", "2026/11/24")
    _bad_date(s / "dotdot.fits", "../../../etc")
    (s / "link.fits").symlink_to(good[1])
    tree.settled()
    before = {p: p.read_bytes() for p in s.rglob("*") if p.is_file() and not p.is_symlink()}

    r = run_rt(
        s,
        tree.dest,
        "--backfill-only",
        "--patterns",
        "*.fits",
        "*.fits.fz",
        "--state-dir",
        tree.state,
        "--metadata-regex",
        META,
        "--workers",
        "3",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    rows = sqlite_rows(tree.state / "catalog.sqlite3")
    # two names, one content: whichever worker came first is archived, the other is the
    # duplicate
    if (tree.dest / "2026/11/24/copy of t1.fits.fz").exists():
        del expected[good[0].name + ".fz"]
        expected["copy of t1.fits.fz"] = dup
        dup, first = good[0], dup
    else:
        first = good[0]
    check_archive(tree.dest, expected, rows, tmp_path)

    by_src = {str(r_["source_filepath"]): r_ for r_ in rows}
    for bad, why in [
        (corrupt, "checksum"),
        (trunc, "truncated"),
        (s / "notfits.fits", "not a FITS file"),
        (s / "slashdate.fits", "not an ISO date"),
        (s / "dotdot.fits", "not an ISO date"),
    ]:
        row = by_src[str(bad)]
        assert row["state"] == "quarantined", bad
        assert why in str(row["error"]), (bad, row["error"])
        assert why in r.stdout
    # metadata columns from the file names
    t2 = by_src[str(good[1])]
    assert (t2["tel"], t2["run"], t2["ut"]) == (2, 10001, 2)
    assert by_src[str(first)]["state"] == "done"
    # the duplicate is recorded, not sent again
    ev = [e for e in _events(tree) if e["source_filepath"] == str(dup)]
    assert [e["state"] for e in ev] == ["duplicate"]
    assert "1 duplicate," in r.stdout
    # never taken, and not a word above debug level: an empty file, a link
    assert str(s / "empty.fits") not in by_src and "empty.fits" not in r.stdout + r.stderr
    assert "link.fits" not in r.stderr
    # no shell ever saw a name
    assert not (Path.cwd() / "pwned").exists()
    # the originals are untouched
    assert {p: p.read_bytes() for p in before} == before

    # a second run finds nothing to do and changes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in tree.dest.rglob("*")}
    r2 = run_rt(
        s,
        tree.dest,
        "--backfill-only",
        "--patterns",
        "*.fits",
        "*.fits.fz",
        "--state-dir",
        tree.state,
        "--metadata-regex",
        META,
    )
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "0 done" in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in tree.dest.rglob("*")} == mtimes


def test_existing_different_file_at_destination_is_never_overwritten(
    tree: Tree, tmp_path: Path
) -> None:
    p = synth.write_frame(tree.src / "a.fits", (64, 64), date_obs="2026-11-24T01:00:00")
    target = tree.dest / "2026" / "11" / "24" / "a.fits.fz"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"somebody else's file")
    tree.settled()
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 1
    assert "different content" in r.stdout
    assert target.read_bytes() == b"somebody else's file"
    (row,) = sqlite_rows(tree.state / "catalog.sqlite3")
    assert row["state"] == "failed" and p.exists()


def test_same_content_already_at_destination_counts_as_done(tree: Tree, tmp_path: Path) -> None:
    synth.write_frame(tree.src / "a.fits", (64, 64), date_obs="2026-11-24T01:00:00")
    tree.settled()
    other_state = tmp_path / "state2"
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", other_state)
    assert r.returncode == 0, r.stderr
    # a fresh catalog (say, after losing the state directory): the copy there is adopted
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = sqlite_rows(tree.state / "catalog.sqlite3")
    assert row["state"] == "done"


def _start_watcher(tree: Tree, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tree.root / "rt.log"
    return start_watcher(tree.src, tree.dest, tree.state, log, "--patience", "1.5", *extra), log


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    return proc.wait(60)


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_watcher_takes_moved_in_and_slowly_written_files(
    tree: Tree, tmp_path: Path, observer: str
) -> None:
    # a file that arrived while the service was down is found by the start-up scan
    early = synth.write_frame(tree.src / "early.fits", (96, 96), seed=1)
    tree.settled(early)
    proc, log = _start_watcher(tree, *(["--polling"] if observer == "polling" else []))
    try:
        expected = {"early.fits.fz": early}
        # atomic moves: written under a hidden name, renamed into place
        for i in range(4):
            staged = synth.write_frame(tree.src / f".staging{i}", (96, 96), seed=10 + i)
            final = tree.src / "sub" / f"moved{i}.fits"
            final.parent.mkdir(exist_ok=True)
            os.rename(staged, final)
            expected[final.name + ".fz"] = final
        # a slow writer: chunks with pauses shorter than --patience
        blob = synth.write_frame(tmp_path / "slow.fits", (256, 256), seed=42).read_bytes()
        slow = tree.src / "slow.fits"
        with slow.open("wb") as fh:
            for k in range(0, len(blob), 16384):
                fh.write(blob[k : k + 16384])
                fh.flush()
                time.sleep(0.05)
        expected["slow.fits.fz"] = tmp_path / "slow.fits"
        wait_for(
            lambda: len(list(tree.dest.rglob("*.fz"))) == len(expected), 60, "all files archived"
        )
    finally:
        rc = _stop(proc)
    assert rc == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text
    assert "quarantined" not in text, text
    check_archive(tree.dest, expected, sqlite_rows(tree.state / "catalog.sqlite3"), tmp_path)


def test_sigterm_leaves_no_temporaries_and_no_live_claims(tree: Tree, tmp_path: Path) -> None:
    for i in range(30):
        synth.write_frame(tree.src / f"f{i:03d}.fits", (400, 400), seed=i)
    tree.settled()
    proc, log = _start_watcher(tree)
    wait_for(lambda: b"done " in log.read_bytes(), 60, "a first file done")
    rc = _stop(proc)
    assert rc == 0, log.read_text()
    assert not [p for p in tree.dest.rglob("*") if p.name.endswith(".rt-tmp")]
    assert not list((tree.state / "spool").iterdir())
    rows = sqlite_rows(tree.state / "catalog.sqlite3")
    assert not [r for r in rows if r["state"] == "claimed"], "claims left behind"
    done = [r for r in rows if r["state"] == "done"]
    assert done and len(done) == len(list(tree.dest.rglob("*.fz")))
    # a restart picks up the rest, nothing twice
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(tree.dest.rglob("*.fz"))) == 30
    rows = sqlite_rows(tree.state / "catalog.sqlite3")
    assert len(rows) == 30 and {r["state"] for r in rows} == {"done"}


def test_sigint_on_backfill_exits_130(tree: Tree) -> None:
    for i in range(40):
        synth.write_frame(tree.src / f"f{i:03d}.fits", (400, 400), seed=i)
    tree.settled()
    log = tree.root / "bf.log"
    proc = subprocess.Popen(
        [
            *RAW_TRANSFER,
            str(tree.src),
            str(tree.dest),
            "--backfill-only",
            "--workers",
            "1",
            "--state-dir",
            str(tree.state),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    wait_for(lambda: b"done " in log.read_bytes(), 60, "a first file done")
    rc = _stop(proc, signal.SIGINT)
    assert rc == 130, log.read_text()
    assert not [p for p in tree.dest.rglob("*") if p.name.endswith(".rt-tmp")]
    rows = sqlite_rows(tree.state / "catalog.sqlite3")
    assert not [r for r in rows if r["state"] == "claimed"]


@pytest.mark.parametrize("shape", [(64, 64)])
def test_demo_frames_are_realistic(tmp_path: Path, shape: tuple[int, int]) -> None:
    p = synth.write_frame(tmp_path / "x.fits", shape)
    with fits.open(p) as h:
        assert h[0].header["BZERO"] == 32768 and h[0].header["BITPIX"] == 16
        assert "CHECKSUM" in h[0].header and "DATE-OBS" in h[0].header
        assert h[0].data.dtype == np.uint16


def test_second_signal_exits_at_once_and_publishes_nothing_partial(
    tree: Tree, tmp_path: Path
) -> None:
    for i in range(40):
        synth.write_frame(tree.src / f"f{i:03d}.fits", (400, 400), seed=i)
    tree.settled()
    log = tree.root / "twice.log"
    proc = subprocess.Popen(
        [
            *RAW_TRANSFER,
            str(tree.src),
            str(tree.dest),
            "--backfill-only",
            "--workers",
            "2",
            "--state-dir",
            str(tree.state),
            "--stop-grace",
            "600",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    wait_for(lambda: b"done " in log.read_bytes(), 60, "a first file done")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # the second does not wait for the grace period
    assert proc.wait(30) == 130
    # whatever is under a final name is complete and verified
    rows = {str(r["filepath"]): r for r in sqlite_rows(tree.state / "catalog.sqlite3")}
    for fz in tree.dest.rglob("*.fz"):
        subprocess.run(["funpack", "-S", str(fz)], check=True, capture_output=True)
        if str(fz) in rows:
            assert rows[str(fz)]["state"] == "done"
    # and the next run finishes the job: stale claims of the dead process are taken over
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(tree.dest.rglob("*.fz"))) == 40
    assert {r_["state"] for r_ in sqlite_rows(tree.state / "catalog.sqlite3")} == {"done"}


def test_archive_modes_are_configurable(tree: Tree) -> None:
    synth.write_frame(tree.src / "a.fits", (32, 32), date_obs="2026-11-24T01:00:00")
    tree.settled()
    r = run_rt(
        tree.src,
        tree.dest,
        "--backfill-only",
        "--state-dir",
        tree.state,
        "--remote-file-mode",
        "0604",
        "--remote-dir-mode",
        "0755",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    f = tree.dest / "2026/11/24/a.fits.fz"
    assert f.stat().st_mode & 0o777 == 0o604
    assert f.parent.stat().st_mode & 0o777 == 0o755 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_a_file_rewritten_under_a_handled_name_is_never_skipped_silently(tree: Tree) -> None:
    p = synth.write_frame(tree.src / "a.fits", (32, 32), seed=1, date_obs="2026-11-24T01:00:00")
    bad = synth.write_frame(tree.src / "b.fits", (32, 32), seed=2, date_obs="2026-11-24T01:00:00")
    good_b = bad.read_bytes()
    raw = bytearray(good_b)
    raw[-100] ^= 1
    bad.write_bytes(bytes(raw))
    tree.settled()
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 1 and "b.fits" in r.stdout  # quarantined
    archived = (tree.dest / "2026/11/24/a.fits.fz").read_bytes()
    # the camera writes a different frame under the old name; the bad one is repaired
    p.unlink()
    synth.write_frame(p, (32, 32), seed=99, date_obs="2026-11-24T01:00:00")
    bad.write_bytes(good_b)
    for f in (p, bad):
        os.utime(f, None)  # written now: later than the catalog's record of them
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state, "--patience", "0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "different content" in r.stdout  # a.fits: told, not overwritten
    assert (tree.dest / "2026/11/24/a.fits.fz").read_bytes() == archived
    assert (tree.dest / "2026/11/24/b.fits.fz").exists()  # the repaired file went through


def test_a_touched_file_is_looked_at_once_not_at_every_scan(tree: Tree) -> None:
    p = synth.write_frame(tree.src / "a.fits", (32, 32), seed=1)
    tree.settled()
    args = (tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state, "--patience", "0")
    assert run_rt(*args).returncode == 0
    os.utime(p, None)  # touched (same content)
    r = run_rt(*args)
    assert r.returncode == 0 and "1 already done" in r.stdout, r.stdout
    r = run_rt(*args)
    assert r.returncode == 0 and "0 files" in r.stdout, r.stdout  # not again
