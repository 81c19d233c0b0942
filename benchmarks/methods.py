"""What is timed on a set of frames: raw-transfer, and the baselines it must beat.

* raw-transfer ``--backfill-only --workers N`` (a fresh state directory and archive each
  time, so every frame is checked, packed, proven lossless, copied and verified);
* (a) bare ``fpack -C``, N processes at a time;
* (b) the upstream-style chain per file, N files at a time: ``fitscheck``, ``fpack -C``,
  ``sha1sum``, then ``cp`` into the day directory, or ``ssh HOST mkdir -p`` and ``scp``,
  either with a new connection per call or through an OpenSSH ControlMaster;
* (c) ``rsync -a`` of the raw files over ssh (one rsync, as it is used).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.data import DAY_DIR
from benchmarks.measure import Meter, RunFailed, Usage, run_sampled
from benchmarks.remote import ControlMaster, Remote

RAW_TRANSFER = [sys.executable, "-m", "rawtransfer"]
FITSCHECK = str(Path(sys.executable).parent / "fitscheck")


@dataclass
class Run:
    size: str
    dest: str  # "local" or "ssh"
    method: str
    files: int
    raw_bytes: int
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    attempts: int = 1

    @property
    def others_share(self) -> float:
        """The share of the machine's CPU that other processes took during the run."""
        u = self.usage
        capacity = (os.cpu_count() or 1) * u.wall_s
        return (u.others_cpu_s or 0.0) / capacity if capacity else 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, object]:
        u = self.usage
        samples = u.rss_samples_mib
        quarter = max(1, len(samples) // 4)
        out: dict[str, object] = {
            "size": self.size,
            "dest": self.dest,
            "method": self.method,
            "files": self.files,
            "raw_mb": round(self.raw_bytes / 1e6, 1),
            "wall_s": round(u.wall_s, 3),
            "ms_per_file": round(u.wall_s / self.files * 1000, 2) if self.files else None,
            "mb_per_s": round(self.raw_bytes / 1e6 / u.wall_s, 1) if self.raw_bytes else None,
            "cpu_s": round(u.cpu_s, 3),
            "server_cpu_s": None if u.server_cpu_s is None else round(u.server_cpu_s, 3),
            "total_cpu_s": round(u.total_cpu_s, 3),
            "cpu_per_file_s": round(u.total_cpu_s / self.files, 4) if self.files else None,
            "peak_rss_mib": None if u.peak_rss_mib is None else round(u.peak_rss_mib, 1),
            "others_cpu_s": None if u.others_cpu_s is None else round(u.others_cpu_s, 2),
            "others_share": round(self.others_share, 3),
            "attempts": self.attempts,
        }
        if len(samples) >= 8:  # enough to compare the start of a run with its end
            out["rss_first_quarter_mib"] = round(max(samples[:quarter]), 1)
            out["rss_last_quarter_mib"] = round(max(samples[-quarter:]), 1)
        if self.error:
            out["error"] = self.error
        return out


@contextlib.contextmanager
def scratch(path: Path) -> Iterator[Path]:
    """A fresh directory for one run, removed afterwards (the disk is not endless)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(cmd: list[str], stdout: int | None = subprocess.DEVNULL) -> None:
    out = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        raise RunFailed(f"{' '.join(cmd[:3])} ... exited {out.returncode}: {out.stderr[-500:]}")


def _parallel(files: list[Path], workers: int, one: Callable[[Path], None]) -> None:
    with ThreadPoolExecutor(workers, thread_name_prefix="bench") as pool:
        for f in pool.map(one, files):  # re-raises the first failure
            del f


def raw_transfer(
    run: Run,
    src: Path,
    dest: str,
    state: Path,
    workers: int,
    flags: list[str],
    server_pid: int | None = None,
) -> None:
    cmd = [*RAW_TRANSFER, str(src), dest, "--backfill-only", "--workers", str(workers)]
    cmd += ["--state-dir", str(state), *flags]
    with Meter(server_pid) as m:
        run_sampled(cmd, m.usage)
    run.usage = m.usage


def fpack_alone(run: Run, files: list[Path], spool: Path, workers: int) -> None:
    def one(f: Path) -> None:
        out = spool / (f.name + ".fz")
        _run(["fpack", "-C", "-O", str(out), str(f)])
        out.unlink()

    with Meter() as m:
        _parallel(files, workers, one)
    run.usage = m.usage


def _pack_and_hash(f: Path, spool: Path) -> Path:
    _run([FITSCHECK, str(f)])
    packed = spool / (f.name + ".fz")
    _run(["fpack", "-C", "-O", str(packed), str(f)])
    _run(["sha1sum", str(packed)])
    return packed


def chain_local(run: Run, files: list[Path], spool: Path, dest: Path, workers: int) -> None:
    day = dest / DAY_DIR

    def one(f: Path) -> None:
        packed = _pack_and_hash(f, spool)
        day.mkdir(parents=True, exist_ok=True)
        _run(["cp", str(packed), str(day / packed.name)])
        packed.unlink()

    with Meter() as m:
        _parallel(files, workers, one)
    run.usage = m.usage


def chain_ssh(
    run: Run,
    files: list[Path],
    spool: Path,
    remote: Remote,
    dest: Path,
    workers: int,
    master: ControlMaster | None,
) -> None:
    opts = remote.client_opts() + (master.opts() if master else [])
    day = dest / DAY_DIR

    def one(f: Path) -> None:
        packed = _pack_and_hash(f, spool)
        _run(["ssh", *opts, remote.alias, "mkdir", "-p", str(day)])
        _run(["scp", "-q", *opts, str(packed), f"{remote.alias}:{day}/{packed.name}"])
        packed.unlink()

    with Meter(remote.pid) as m:
        if master is not None:
            m.extra_server_cpu = master.close
        _parallel(files, workers, one)
    run.usage = m.usage


def rsync_ssh(run: Run, src: Path, remote: Remote, dest: Path) -> None:
    rsh = " ".join(["ssh", *remote.client_opts()])
    with Meter(remote.pid) as m:
        _run(["rsync", "-a", "-e", rsh, f"{src}{os.sep}", f"{remote.alias}:{dest}/"])
    run.usage = m.usage
