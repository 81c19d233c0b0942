"""Wall time, CPU time (children included) and peak memory of what the harness runs.

CPU is taken from ``getrusage(RUSAGE_CHILDREN)`` deltas around a run, so it holds every
process the run started and waited for (raw-transfer and its fpack/funpack children, the
chains' fitscheck/fpack/sha1sum/ssh/scp, rsync). What is not our child is read from
``/proc``: the scratch sshd (the listener plus its live sessions; finished sessions are
in the listener's cutime/cstime once reaped) and a backgrounded ssh ControlMaster.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
# How often a running process's memory is sampled: fine enough for a peak that lasts a
# frame's packing (hundreds of ms), coarse enough to cost nothing next to it.
SAMPLE_INTERVAL = 0.05
# How long finished sshd sessions get to exit (and be reaped into the listener's
# counters) before the server's CPU is read; they go within milliseconds normally.
SESSION_EXIT_TIMEOUT = 3.0


def children_cpu() -> float:
    """User plus system seconds of every child process waited for so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after it
    return text.rsplit(")", 1)[1].split()


def process_cpu(pid: int, with_children: bool = True) -> float:
    """CPU seconds of ``pid`` (and of its reaped children), 0 if it is gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    # fields 14-17 of stat (utime stime cutime cstime) are 11-14 after the name
    ticks = int(f[11]) + int(f[12])
    if with_children:
        ticks += int(f[13]) + int(f[14])
    return ticks / TICKS


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (f := _stat_fields(int(entry.name))) is not None:
            by_parent.setdefault(int(f[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def tree_cpu(pid: int) -> float:
    """All the CPU a process tree has used: the root with its reaped children, plus each
    live descendant with its own reaped children (so nothing is counted twice)."""
    return process_cpu(pid) + sum(process_cpu(p) for p in descendants(pid))


def wait_sessions_gone(pid: int, timeout: float = SESSION_EXIT_TIMEOUT) -> None:
    """Give a server's finished sessions the time to exit and be reaped."""
    deadline = time.monotonic() + timeout
    while descendants(pid) and time.monotonic() < deadline:
        time.sleep(0.02)  # polling a condition, bounded by the deadline


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``): the difference
    over a run, less what the run used, is what other processes took meanwhile."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy
    ticks = [int(x) for x in first[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (VmHWM, VmRSS), 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Usage:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # our children: user + system
    server_cpu_s: float | None = None  # sshd and an ssh ControlMaster, when there is one
    peak_rss_mib: float | None = None  # of the main process run, when it is sampled
    rss_samples_mib: list[float] = field(default_factory=list)
    # CPU that processes other than the run's took on this machine meanwhile (the harness's
    # own bookkeeping is in it, a few per cent at most): a sign of a disturbed figure
    others_cpu_s: float | None = None

    @property
    def total_cpu_s(self) -> float:
        return self.cpu_s + (self.server_cpu_s or 0.0)


class Meter:
    """Measure one run: ``with Meter(server_pid) as m: ...``; then ``m.usage``."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.usage = Usage()
        self.extra_server_cpu: Callable[[], float] | None = None

    def __enter__(self) -> Meter:
        os.sync()  # the previous run's dirty pages are not this run's to write
        if self.server_pid is not None:
            wait_sessions_gone(self.server_pid)
            self._server0 = tree_cpu(self.server_pid)
        self._cpu0 = children_cpu()
        self._busy0 = machine_busy()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.usage.wall_s = time.perf_counter() - self._t0
        self.usage.cpu_s = children_cpu() - self._cpu0
        busy = machine_busy() - self._busy0
        if self.server_pid is not None:
            wait_sessions_gone(self.server_pid)
            server = tree_cpu(self.server_pid) - self._server0
            if self.extra_server_cpu is not None:
                server += self.extra_server_cpu()
            self.usage.server_cpu_s = server
        self.usage.others_cpu_s = max(0.0, busy - self.usage.total_cpu_s)


def run_sampled(
    cmd: Sequence[str],
    usage: Usage,
    stdout: int | None = subprocess.DEVNULL,
    on_line: Callable[[str], None] | None = None,
) -> int:
    """Run ``cmd`` to its end, sampling its peak RSS; stderr lines go to ``on_line``."""
    proc = subprocess.Popen(
        cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=pump, name="stderr-reader", daemon=True)
    reader.start()
    peak = 0
    while True:
        peak = max(peak, status_kib(proc.pid, "VmHWM"))
        rss = status_kib(proc.pid, "VmRSS")
        if rss:
            usage.rss_samples_mib.append(rss / 1024)
        try:
            proc.wait(SAMPLE_INTERVAL)
            break
        except subprocess.TimeoutExpired:
            continue
    reader.join()
    usage.peak_rss_mib = peak / 1024 if peak else None
    if proc.returncode != 0:
        tail = "".join(lines[-15:])
        raise RunFailed(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc.returncode


class RunFailed(Exception):
    """A measured command failed; its figures are left out."""


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def machine() -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
