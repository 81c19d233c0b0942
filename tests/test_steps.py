"""Unit tests of the per-file steps: settle, check, place, pack, hash, metadata."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from rawtransfer import synth
from rawtransfer.errors import FileIncomplete, FileRejected, PackError
from rawtransfer.spool import Spool
from rawtransfer.steps import check, hashing, metadata, pack, place, settle


def flip_byte(path: Path, offset_from_end: int = 5000) -> None:
    b = bytearray(path.read_bytes())
    b[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(b))


def age(path: Path, seconds: float = 120) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# -- settle -------------------------------------------------------------------------


def test_settle_ready_when_old_and_complete(frame) -> None:
    p = frame()
    age(p)
    r = settle.settle(p, patience=5)
    assert isinstance(r, settle.Ready) and r.size == p.stat().st_size


def test_settle_waits_for_recent_file(frame) -> None:
    p = frame()
    r = settle.settle(p, patience=30)
    assert isinstance(r, settle.Wait) and 0 < r.seconds <= 30


def test_settle_closed_file_needs_no_patience(frame) -> None:
    p = frame()
    assert isinstance(settle.settle(p, patience=30, closed=True), settle.Ready)


@pytest.mark.parametrize("keep", [100, 2880, 2880 + 1000, -2880])
def test_settle_detects_truncation_without_checksum(frame, keep: int) -> None:
    p = frame(checksum=False)
    data = p.read_bytes()
    p.write_bytes(data[:keep])
    age(p)
    with pytest.raises(FileIncomplete, match="truncated"):
        settle.settle(p, patience=1)


def test_settle_rejects_trailing_garbage(frame) -> None:
    p = frame()
    with p.open("ab") as fh:
        fh.write(b"x" * 2880)
    age(p)
    with pytest.raises(FileRejected, match="trailing"):
        settle.settle(p, patience=1)


def test_settle_rejects_empty_and_non_fits(tmp_path: Path) -> None:
    empty = tmp_path / "empty.fits"
    empty.touch()
    text = tmp_path / "text.fits"
    text.write_text("SIMPLE? no, a text file\n" * 200)
    for p in (empty, text):
        age(p)
    with pytest.raises(FileIncomplete, match="empty"):
        settle.settle(empty, patience=1)
    with pytest.raises(FileRejected, match="not a FITS file"):
        settle.settle(text, patience=1)


def test_settle_never_follows_links(frame, tmp_path: Path) -> None:
    p = frame()
    link = tmp_path / "link.fits"
    link.symlink_to(p)
    with pytest.raises(settle.NotRegular):
        settle.settle(link, patience=0)
    with pytest.raises(settle.FileVanished):
        settle.settle(tmp_path / "gone.fits", patience=0)


def test_expected_size_multi_hdu(tmp_path: Path) -> None:
    p = synth.write_multi_hdu(tmp_path / "m.fits")
    assert settle.fits_expected_size(p) == p.stat().st_size


# -- check --------------------------------------------------------------------------


def test_check_accepts_frame_with_and_without_checksum(frame) -> None:
    for cs in (True, False):
        r = check.check(frame(f"f{cs}.fits", checksum=cs))
        assert not r.float_images and not r.packed
        assert r.headers[0]["DATE-OBS"].startswith("2026-11-24")


def test_check_rejects_flipped_data_byte(frame) -> None:
    p = frame()
    flip_byte(p)
    with pytest.raises(FileRejected, match="checksum"):
        check.check(p)


def test_check_rejects_flipped_header_byte(frame) -> None:
    p = frame()
    b = bytearray(p.read_bytes())
    i = b.index(b"SYNTHCAM")
    b[i] = ord("X")
    p.write_bytes(bytes(b))
    with pytest.raises(FileRejected, match="checksum"):
        check.check(p)


def test_check_float_multi_and_packed(tmp_path: Path) -> None:
    f = synth.write_float_frame(tmp_path / "f.fits")
    assert check.check(f).float_images
    m = synth.write_multi_hdu(tmp_path / "m.fits")
    assert len(check.check(m).headers) == 4
    out = pack.pack(m, tmp_path, float_images=False)
    assert check.check(out).packed


def test_check_rejects_invalid_header_structure(tmp_path: Path) -> None:
    p = tmp_path / "bad.fits"
    hdu = fits.PrimaryHDU(np.zeros((10, 10), dtype=np.int16))
    hdu.writeto(p)
    b = bytearray(p.read_bytes())
    i = b.index(b"NAXIS1  =")
    b[i + 10 : i + 30] = b"        notanumber  "
    p.write_bytes(bytes(b))
    with pytest.raises(FileRejected):
        check.check(p)


# -- place --------------------------------------------------------------------------


def _hdr(value: object, card: str = "DATE-OBS") -> list[fits.Header]:
    h = fits.Header()
    h[card] = value
    return [h]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-24T23:59:59.9999", date(2026, 11, 24)),  # must not round into the 25th
        ("2026-11-24T23:59:59.99999999", date(2026, 11, 24)),
        ("2026-11-25", date(2026, 11, 25)),
        ("2024-02-29T00:00:00", date(2024, 2, 29)),
        (" 2026-01-01T12:00:00 ", date(2026, 1, 1)),
    ],
)
def test_header_date_keeps_its_own_day(value: str, expected: date) -> None:
    assert place.header_date(_hdr(value), "DATE-OBS") == expected


@pytest.mark.parametrize(
    "value",
    [
        "2026/11/24",
        "../../etc",
        "2026-11-24/../..",
        "24/11/26",
        "2026-13-01",
        "2023-02-29",
        "",
        "yesterday",
        20261124,
        True,
    ],
)
def test_header_date_rejects_malformed(value: object) -> None:
    with pytest.raises(FileRejected, match="DATE-OBS"):
        place.header_date(_hdr(value), "DATE-OBS")


def test_header_date_missing_card_and_other_card() -> None:
    with pytest.raises(FileRejected, match="missing"):
        place.header_date([fits.Header()], "DATE-OBS")
    assert place.header_date(_hdr("2020-05-06", "DATE-BEG"), "DATE-BEG") == date(2020, 5, 6)


@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2026, 1, 1)))
@settings(max_examples=200, deadline=None)
def test_place_is_the_values_own_date(dt: datetime) -> None:
    text = dt.isoformat(timespec="microseconds")
    rel = place.remote_relpath(place.header_date(_hdr(text), "DATE-OBS"), "x.fits")
    assert str(rel) == f"{dt:%Y/%m/%d}/x.fits.fz"


def test_remote_relpath_names() -> None:
    d = date(2026, 1, 2)
    assert str(place.remote_relpath(d, "a b.fits")) == "2026/01/02/a b.fits.fz"
    assert str(place.remote_relpath(d, "-x.fits.fz")) == "2026/01/02/-x.fits.fz"


# -- pack ---------------------------------------------------------------------------


def _funpack_pixels(fz: Path, tmp: Path) -> list[np.ndarray]:
    """Decompress with the real funpack, independently of the code under test."""
    out = tmp / (fz.name + ".unpacked.fits")
    subprocess.run(["funpack", "-O", str(out), str(fz)], check=True, capture_output=True)
    with fits.open(out) as h:
        return [np.array(x.data) for x in h if x.data is not None]


def test_pack_is_deterministic_and_lossless(frame, tmp_path: Path) -> None:
    p = frame(shape=(300, 200))
    a = pack.pack(p, tmp_path, float_images=False)
    time.sleep(1.1)  # fpack without -C stamps the time; make a difference visible
    b = pack.pack(p, tmp_path, float_images=False)
    assert hashing.sha1_file(a) == hashing.sha1_file(b)
    assert a.stat().st_size < p.stat().st_size
    (got,) = _funpack_pixels(a, tmp_path)
    assert np.array_equal(got, fits.getdata(p))


def test_pack_float_is_lossless(tmp_path: Path) -> None:
    p = synth.write_float_frame(tmp_path / "f.fits")
    out = pack.pack(p, tmp_path, float_images=True)
    (got,) = _funpack_pixels(out, tmp_path)
    assert got.tobytes() == fits.getdata(p).astype(got.dtype).tobytes()


def test_fpack_default_on_floats_would_be_lossy_and_is_caught(tmp_path: Path) -> None:
    p = synth.write_float_frame(tmp_path / "f.fits")
    lossy = tmp_path / "lossy.fz"
    subprocess.run(["fpack", "-C", "-O", str(lossy), str(p)], check=True)
    with pytest.raises(PackError, match="differ"):
        pack.verify_packed(p, lossy)


def test_verify_catches_corrupt_fz_that_funpack_accepts(frame, tmp_path: Path) -> None:
    p = frame(shape=(256, 256))
    out = pack.pack(p, tmp_path, float_images=False)
    bad = tmp_path / "bad.fz"
    b = bytearray(out.read_bytes())
    b[-3000] ^= 0xFF
    bad.write_bytes(bytes(b))
    rc = subprocess.run(["funpack", "-S", str(bad)], capture_output=True).returncode
    assert rc == 0  # fpack's own tools do not notice
    with pytest.raises(PackError):
        pack.verify_packed(p, bad)


def test_pack_multi_hdu_with_tables(tmp_path: Path) -> None:
    p = synth.write_multi_hdu(tmp_path / "m.fits")
    out = pack.pack(p, tmp_path, float_images=False)
    with fits.open(p) as a, fits.open(out) as b:
        assert np.array_equal(a["CCD1"].data, b["CCD1"].data)
        assert np.array_equal(a["CATALOG"].data["x"], b["CATALOG"].data["x"])
    assert len(_funpack_pixels(out, tmp_path)) == 3


def test_pack_failure_leaves_no_spool_file(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    bogus = tmp_path / "bogus.fits"
    bogus.write_bytes(b"not fits at all" * 300)
    with pytest.raises(PackError):
        pack.pack(bogus, spool, float_images=False)
    assert list(spool.iterdir()) == []


def test_spool_is_per_process_and_cleans_only_dead_owners(tmp_path: Path) -> None:
    base = tmp_path / "spool"
    mine = Spool(base, "me-1")
    (mine.path / ".a.fits.fz.rt-tmp").write_bytes(b"x")
    # a neighbour on the same state directory: its live spool is left alone
    other = Spool(base, "other-2")
    assert (mine.path / ".a.fits.fz.rt-tmp").exists()
    # a dead process's directory (its lock released) is removed by the next starter
    dead = base / "dead-3"
    dead.mkdir()
    (dead / ".lock").touch()
    (dead / ".b.fits.fz.rt-tmp").write_bytes(b"x")
    other.close()
    third = Spool(base, "third-4")
    assert not dead.exists() and not (base / "other-2").exists()
    assert (mine.path / ".a.fits.fz.rt-tmp").exists()
    (base / "keep.txt").write_text("not ours")
    mine.close()
    third.close()
    assert [p.name for p in base.iterdir()] == ["keep.txt"]


def test_spool_leaves_a_directory_whose_owner_has_not_locked_it_yet(tmp_path: Path) -> None:
    """A process between its mkdir and its flock is starting, not dead."""
    base = tmp_path / "spool"
    starting = base / "starting-5"
    starting.mkdir(parents=True)
    (starting / ".c.fits.fz.rt-tmp").write_bytes(b"x")
    abandoned = base / "abandoned-6"
    abandoned.mkdir()
    old = time.time() - 2 * 86400
    os.utime(abandoned, (old, old))
    s = Spool(base, "me-7")
    try:
        assert starting.exists() and not abandoned.exists()
    finally:
        s.close()


# -- hash and metadata --------------------------------------------------------------


def test_sha1_file(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"abc" * 100000)
    assert hashing.sha1_file(p) == hashlib.sha1(b"abc" * 100000).hexdigest()


def test_metadata_from_name() -> None:
    pat = re.compile(r"t(?P<tel>\d)_r(?P<run>\d+)_ut(?P<ut>\d).fits")
    assert metadata.metadata_from_name(pat, "t1_r12345_ut2.fits") == {
        "tel": 1,
        "run": 12345,
        "ut": 2,
    }
    assert metadata.metadata_from_name(pat, "other.fits") == {"tel": None, "run": None, "ut": None}
    assert metadata.metadata_from_name(None, "x") == {}


def test_settle_clock_skew_future_mtime_waits(frame) -> None:
    p = frame()
    future = time.time() + 3600
    os.utime(p, (future, future))
    assert isinstance(settle.settle(p, patience=5), settle.Wait)


def test_pack_hashes_both_ends_as_the_bytes_go_by(tmp_path: Path) -> None:
    p = synth.write_frame(tmp_path / "h.fits", (300, 200), seed=3)
    r = pack.pack_hashed(p, tmp_path, float_images=False)
    assert r.raw_sha1 == hashing.sha1_file(p)
    assert r.sha1 == hashing.sha1_file(r.path)
    c = pack.copy_to_spool(r.path, tmp_path)
    assert c.sha1 == c.raw_sha1 == r.sha1


def test_verify_catches_a_scaling_card_changed_in_the_packed_file(tmp_path: Path) -> None:
    p = synth.write_frame(tmp_path / "z.fits", (64, 64), seed=4)
    out = pack.pack(p, tmp_path, float_images=False)
    data = out.read_bytes()
    at = data.index(b"BZERO   =")
    card = f"{'BZERO   =':<10s}{32767:>20d}".ljust(80).encode()
    bad = tmp_path / "bzero.fz"
    bad.write_bytes(data[:at] + card + data[at + 80 :])
    with pytest.raises(PackError, match="BZERO"):
        pack.verify_packed(p, bad)


@pytest.mark.parametrize("tool", ["fpack", "funpack"])
def test_a_hung_packer_is_killed_at_its_deadline(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that never returns (a hung NFS mount) must give the worker its thread back:
    the child is killed at the deadline and the file is not half-packed in the spool."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / tool).write_text("#!/bin/sh\nexec sleep 60\n")
    (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(pack, "FPACK_TIMEOUT", 0.5)
    p = synth.write_frame(tmp_path / "hung.fits", (64, 64), seed=5)
    spool = tmp_path / "spool"
    spool.mkdir()
    with pytest.raises(PackError, match=f"{tool} took longer than"):
        pack.pack(p, spool, float_images=False)
    assert list(spool.iterdir()) == []
