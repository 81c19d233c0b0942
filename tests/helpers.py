"""Helpers for end-to-end tests: run the real command, check the archive independently."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

RAW_TRANSFER = [sys.executable, "-m", "rawtransfer"]


def run_rt(
    *args: str | Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RAW_TRANSFER, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def wait_for(cond: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    """Poll a condition with a deadline (the thing waited for is outside this process)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def data_arrays(path: Path) -> list[np.ndarray]:
    with fits.open(path) as h:
        return [np.array(x.data) for x in h if x.data is not None]


def funpack(fz: Path, out_dir: Path) -> Path:
    # CFITSIO parses file names (brackets, $, parentheses): hand funpack a plain name
    safe = out_dir / "check-copy.fits.fz"
    out = out_dir / "check-copy.fits"
    safe.write_bytes(fz.read_bytes())
    out.unlink(missing_ok=True)
    subprocess.run(["funpack", "-O", str(out), str(safe)], check=True, capture_output=True)
    safe.unlink()
    return out


def sqlite_rows(db: Path, table: str = "rawtransfer") -> list[dict[str, object]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(f'select * from "{table}"')]
    finally:
        con.close()


def check_archive(
    archive: Path,
    expected: dict[str, Path],
    rows: list[dict[str, object]],
    scratch: Path,
) -> None:
    """Independently of the code under test: funpack each archived file, compare its
    pixels with the source, compare its SHA1 with the catalog row, and check that the
    archive holds exactly the expected files and no temporaries."""
    files = sorted(p for p in archive.rglob("*") if p.is_file())
    names = sorted(p.name for p in files)
    assert not [n for n in names if n.endswith(".rt-tmp")], f"temporary files left: {names}"
    assert names == sorted(expected), f"archive holds {names}, expected {sorted(expected)}"
    done = {r["filepath"]: r for r in rows if r["state"] == "done"}
    for f in files:
        src = expected[f.name]
        row = done.get(str(f))
        assert row is not None, f"no done catalog row for {f}"
        assert row["sha1_hash"] == sha1(f)
        assert row["raw_sha1"] == sha1(Path(str(row["source_filepath"])))
        unpacked = funpack(f, scratch)
        a, b = data_arrays(src), data_arrays(unpacked)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            if x.dtype.names:
                assert x.tobytes() == y.tobytes()
            else:
                assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
        unpacked.unlink()
        with fits.open(src) as h:
            date_obs = next(hd.header["DATE-OBS"] for hd in h if "DATE-OBS" in hd.header)
        y, m, d = date_obs[:10].split("-")
        assert f.parent.relative_to(archive).parts == (y, m, d)


def start_watcher(
    src: Path, dest: Path, state: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The real daemon in watcher mode, its log in ``log``; returns once it watches."""
    proc = subprocess.Popen(
        [
            *RAW_TRANSFER,
            str(src),
            str(dest),
            "--patterns",
            "*.fits",
            "--state-dir",
            str(state),
            "--workers",
            "2",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env={**os.environ, **(env or {})},
    )
    wait_for(lambda: b"watching" in log.read_bytes() or proc.poll() is not None, 30, "start")
    assert proc.poll() is None, log.read_text()
    return proc


def libfaketime() -> Path:
    for lib in sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1")):
        return lib
    pytest.fail("libfaketime is missing: apt-get install faketime (scripts/setup.sh)")


def clock_moved(offset: str) -> dict[str, str]:
    """The environment that runs the service with its clock moved by ``offset``; file
    times on disk stay the kernel's, as on a host whose clock was set wrong."""
    return {
        "LD_PRELOAD": str(libfaketime()),
        "FAKETIME": offset,
        "NO_FAKE_STAT": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
