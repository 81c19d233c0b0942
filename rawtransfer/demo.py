"""The README's demo: a handful of realistic raw frames moved into a local archive.

Makes a scratch area (``./demo`` by default) with a night's worth of small frames, one
duplicate under a second name and one corrupted frame, runs
``raw-transfer SRC ARCHIVE --backfill-only`` with the embedded SQLite catalog, and shows
what happened and where to look.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from rawtransfer import synth


def _command() -> str:
    """How to run raw-transfer from here: the venv's script, relative when it can be."""
    exe = Path(sys.executable).parent / "raw-transfer"
    if not exe.exists():
        return "raw-transfer"
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rawtransfer.demo", description=__doc__)
    p.add_argument("--where", type=Path, default=Path("demo"), help="scratch area (default ./demo)")
    p.add_argument("--frames", type=int, default=8, help="how many frames (default 8)")
    p.add_argument("--size", type=int, default=1024, help="frame side in pixels (default 1024)")
    a = p.parse_args(argv)
    where = a.where.resolve()
    if where.exists():
        shutil.rmtree(where)
    src, archive, state = where / "telescope", where / "archive", where / "state"
    for d in (src, archive, state):
        d.mkdir(parents=True)
    (src / "2026-11-24").mkdir()
    frames = synth.night(src / "2026-11-24", a.frames, (a.size, a.size))
    shutil.copy(frames[0], src / "2026-11-24" / "copy of first frame.fits")
    bad = bytearray(frames[1].read_bytes())
    bad[-20000] ^= 0x10  # one flipped bit in the pixel data: CHECKSUM catches it
    (src / "2026-11-24" / "t9_r99999_ut9.fits").write_bytes(bytes(bad))
    past = time.time() - 60  # written a minute ago: settled
    for f in (src / "2026-11-24").iterdir():
        os.utime(f, (past, past))
    print(f"demo: {len(frames) + 2} frames in {src} (one duplicate, one corrupted)\n")
    cmd = [
        sys.executable,
        "-m",
        "rawtransfer",
        str(src),
        str(archive),
        "--backfill-only",
        "--patterns",
        "*.fits",
        "--state-dir",
        str(state),
        "--metadata-regex",
        r"t(?P<tel>\d)_r(?P<run>\d+)_ut(?P<ut>\d)\.fits",
    ]
    # quoted for a shell: the regex has parentheses, the glob must reach us unexpanded
    rt = _command()
    print("$ " + shlex.join([rt, *cmd[3:]]) + "\n", flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    print(f"\nexit code {rc} (1: some file was quarantined - the corrupted one)\n")
    print("archive:")
    for f in sorted(archive.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(where)}  {f.stat().st_size} bytes")
    db = sqlite3.connect(state / "catalog.sqlite3")
    print("\ncatalog rows (state, tel, run, ut, destination / reason):")
    for row in db.execute(
        "select state, tel, run, ut, coalesce(filepath, error) from rawtransfer order by 3"
    ):
        print("  " + " | ".join("" if v is None else str(v) for v in row))
    flags = ["--state-dir", str(state)]
    print(
        f"\nwhere to look: the archive {archive}, the originals (untouched) {src}, and the "
        f"catalog {state / 'catalog.sqlite3'}, through raw-transfer itself:\n"
        f"  $ {shlex.join([rt, 'status', str(src), str(archive), *flags])}\n"
        f"  $ {shlex.join([rt, 'why', 't9_r99999_ut9.fits', *flags])}"
    )
    packed = list(archive.rglob("*.fits.fz"))
    ok = rc == 1 and len(packed) == len(frames)
    print("demo: " + ("OK" if ok else "something unexpected happened, see above"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
