"""Peak memory of raw-transfer on large frames, against fpack's own in the same run.

    .venv/bin/python benchmarks/memory.py                  # 8 frames of 100 MB, 4 workers
    .venv/bin/python benchmarks/memory.py --quick          # 4 frames of 32 MB, 2 workers

The service's peak RSS (VmHWM of the raw-transfer process, sampled until it exits) is
what the unit's MemoryMax must hold with room to spare; it is printed beside the peak RSS
of one bare `fpack -C` on the same frame, the size of a frame, and their ratios. The
proof and the check work a block of rows at a time, so the peak should grow with the
number of workers, not with the size of a frame. Not part of the test suite: numbers
depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rawtransfer import synth


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def service_peak(src: Path, dest: Path, state: Path, workers: int) -> tuple[float, float]:
    """Peak RSS (MiB) of a --backfill-only run, and its wall time."""
    cmd = [sys.executable, "-m", "rawtransfer", str(src), str(dest), "--backfill-only"]
    cmd += ["--workers", str(workers), "--state-dir", str(state)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm_kib(proc.pid))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"raw-transfer exited {proc.returncode}")
    return peak / 1024, time.monotonic() - started


def fpack_peak(frame: Path) -> float:
    """Peak RSS (MiB) of one bare fpack on the frame (children's maxrss, fresh process)."""
    code = (
        "import resource, subprocess, sys\n"
        "with open(sys.argv[1], 'rb') as i, open('/dev/null', 'wb') as o:\n"
        "    subprocess.run(['fpack', '-C', '-r', '-S', '-'], stdin=i, stdout=o, check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(frame)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip()) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 frames of 32 MB, 2 workers")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    shape, frames, workers = (6132, 8176), a.frames, a.workers
    if a.quick:
        shape, frames, workers = (4096, 4096), 4, 2
    with tempfile.TemporaryDirectory(prefix="rt-mem-") as tmp:
        root = Path(tmp)
        src, dest, state = root / "src", root / "dest", root / "state"
        for d in (src, dest, state):
            d.mkdir()
        paths = [
            synth.write_frame(src / f"f{i}.fits", shape, seed=i, checksum=False)
            for i in range(frames)
        ]
        past = time.time() - 3600
        for p in paths:
            os.utime(p, (past, past))
        frame_mib = paths[0].stat().st_size / 2**20
        fp = fpack_peak(paths[0])
        peak, wall = service_peak(src, dest, state, workers)
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "frames": frames,
        "frame_mib": round(frame_mib, 1),
        "workers": workers,
        "service_peak_rss_mib": round(peak, 1),
        "fpack_peak_rss_mib": round(fp, 1),
        "service_per_worker_over_frame": round(peak / workers / frame_mib, 2),
        "service_over_fpack": round(peak / fp, 2),
        "wall_s": round(wall, 1),
        "self_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    for k, v in figures.items():
        print(f"{k:32s} {v}")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
