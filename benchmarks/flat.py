"""Memory over many transfers: does a long-running watcher's RSS stay flat?

An idle watcher (2 workers, a local archive, default flags: originals are tidied after
their copy is verified, as in service) is fed ``count`` small frames, ``every`` at a
time: each batch is renamed into the watched directory at once (a camera's closed
files), and once the watcher has logged ``done`` for every one of them, the RSS of its
process (VmRSS) is read. The queue is empty at each reading, so what it held does not
hide a leak; the first reading comes after the first batch, once the imports, the
catalog's cache and the allocator's arenas are warm. The figure is the RSS after the
last batch against the RSS after the first.
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from benchmarks import data
from benchmarks.measure import RunFailed, status_kib
from benchmarks.methods import RAW_TRANSFER, scratch
from benchmarks.targets import LogTail, _popen, _stop
from rawtransfer import synth

# Small frames: what is measured is the cost per transfer, not per byte (8 KB of pixels).
SHAPE = (64, 64)
# The worker's line for a file archived and verified ("done NAME -> DEST (...)").
DONE = re.compile(r"rawtransfer\.workers: done ")
WATCHING = re.compile(r"\bwatching\b")


def small_frames(directory: Path, count: int) -> list[Path]:
    """``count`` frames of ``SHAPE`` with distinct pixels (none is a duplicate of
    another), written from one frame's bytes: 10,000 in a second or two; aged."""
    directory.mkdir(parents=True, exist_ok=True)
    hdu = synth.raw_frame(SHAPE, seed=7, date_obs=data.DATE_OBS)
    buf = io.BytesIO()
    fits.HDUList([hdu]).writeto(buf)
    raw = buf.getvalue()
    n = SHAPE[0] * SHAPE[1]
    header_len = len(raw) - -(-2 * n // 2880) * 2880  # the data section is padded
    pixels = np.frombuffer(raw, dtype=">i2", count=n, offset=header_len).copy()
    out = []
    for i in range(count):
        pixels[0], pixels[1] = i % 32768, i // 32768  # this frame's own content
        body = raw[:header_len] + pixels.tobytes() + raw[header_len + 2 * n :]
        path = directory / f"m{i:06d}.fits"
        data.write_new(path, body)
        out.append(path)
    data.age(out)
    return out


def flat(work: Path, count: int, every: int) -> dict[str, object]:
    """RSS of an idle watcher after every ``every`` of ``count`` transfers."""
    with scratch(work / "flat") as root:
        pool, src, state, dest = root / "frames", root / "src", root / "state", root / "dest"
        for d in (src, state, dest):
            d.mkdir()
        frames = small_frames(pool, count)
        cmd = [*RAW_TRANSFER, str(src), str(dest), "--workers", "2", "--state-dir", str(state)]
        started = time.monotonic()
        proc = _popen(cmd)
        tail = LogTail(proc)
        samples: list[tuple[int, float]] = []
        try:
            at, _ = tail.wait_for(WATCHING)
            for start in range(0, count, every):
                batch = frames[start : start + every]
                for f in batch:
                    os.rename(f, src / f.name)  # closed files moved in, as a camera's
                for _ in batch:  # the workers say "done" once per file, in any order
                    at, _ = tail.wait_for(DONE, at + 1)
                rss = status_kib(proc.pid, "VmRSS")
                if not rss:
                    raise RunFailed(f"raw-transfer exited {proc.poll()} after {start} files")
                samples.append((start + len(batch), round(rss / 1024, 1)))
                print(f"    {samples[-1][0]:>6,} done: RSS {samples[-1][1]} MiB", flush=True)
        finally:
            _stop(proc)
            tail.close()
        wall = time.monotonic() - started
    first, last = samples[0][1], samples[-1][1]
    return {
        "files": count,
        "every": every,
        "frame_bytes": SHAPE[0] * SHAPE[1] * 2,
        "rss_mib": [[n, r] for n, r in samples],
        "rss_first_mib": first,
        "rss_last_mib": last,
        "growth_mib": round(last - first, 1),
        "growth_ratio": round(last / first, 3) if first else None,
        "wall_s": round(wall, 1),
    }
