"""Named fault points, for the fault suite: make a race or a crash happen on purpose.

The pipeline calls ``hit(point, path)`` at a few named places. Nothing happens unless
the environment variable ``RAWTRANSFER_FAULT`` names that point, as a comma-separated
list of ``point:action[:argument]``:

* ``kill``: SIGKILL this process (a power cut, the OOM killer);
* ``raise``: raise ``InjectedFault`` (a defect of ours);
* ``pause:SECONDS``: sleep (a slow disk, a stalled thread);
* ``swap``: replace the source file by a *different* frame (the next night's DATE-OBS,
  other pixels) through an atomic rename, as a writer that rewrites a file does;
* ``rewrite``: overwrite the source in place (same inode) with such a frame.

Each entry fires once per process, for the first file that reaches its point, so a
restarted process (which tests start without the variable) or the next file runs clean.
This is the model of borg's failing chunker: a schedule given as a short string.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

log = logging.getLogger(__name__)

ENV = "RAWTRANSFER_FAULT"
POINTS = frozenset(
    {
        "after-settle",
        "after-check",
        "during-pack",
        "before-claim",
        "after-claim",
        "during-copy",
        "after-publish",
        "after-record",
    }
)
ACTIONS = frozenset({"kill", "raise", "pause", "swap", "rewrite"})


class InjectedFault(RuntimeError):
    """A fault injected by RAWTRANSFER_FAULT (stands for a defect in our code)."""


_fired: set[str] = set()
_lock = threading.Lock()


def _schedule() -> dict[str, tuple[str, str]]:
    text = os.environ.get(ENV, "")
    out: dict[str, tuple[str, str]] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        point, _, rest = entry.partition(":")
        action, _, arg = rest.partition(":")
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown fault {entry!r}")
        out[point] = (action, arg)
    return out


def other_version(path: Path) -> bytes:
    """A valid frame that differs from ``path``: DATE-OBS a day later, pixels changed."""
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        hdul.verify("silentfix")
        copy = fits.HDUList([h.copy() for h in hdul])
    for hdu in copy:
        if "DATE-OBS" in hdu.header:
            t = np.datetime64(str(hdu.header["DATE-OBS"])[:19]) + np.timedelta64(1, "D")
            hdu.header["DATE-OBS"] = str(t)
        if hdu.is_image and hdu.data is not None and hdu.data.dtype.kind in "iu":
            hdu.data = hdu.data ^ np.ones_like(hdu.data)
    buf = io.BytesIO()
    copy.writeto(buf, checksum=True)
    return buf.getvalue()


def _swap(path: Path) -> None:
    data = other_version(path)
    tmp = path.with_name(f".{path.name}.fault")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def _rewrite(path: Path) -> None:
    data = other_version(path)
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(data)


_current = threading.local()


def working_on(path: Path | None) -> None:
    """Name the source file this thread works on, for points deep in a step (the copy)."""
    _current.path = path


def hit(point: str, path: Path | None = None) -> None:
    """Fire the fault configured for ``point``, if any (once per process)."""
    if ENV not in os.environ:
        return
    path = path or getattr(_current, "path", None)
    if path is None:
        return
    schedule = _schedule()
    if point not in schedule:
        return
    with _lock:
        if point in _fired:
            return
        _fired.add(point)
    action, arg = schedule[point]
    log.warning("fault injected at %s: %s %s", point, action, path.name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise InjectedFault(f"injected at {point}")
    elif action == "pause":
        time.sleep(float(arg or "1"))
    elif action == "swap":
        _swap(path)
    elif action == "rewrite":
        _rewrite(path)
