"""The oracle of the fault suite: is the promise kept, whatever happened on the way?

Given the source tree, the archive tree and the catalog (rows and events), it lists
every way the promise "each file ends exactly once, verified, at the destination, or
stands as failed or quarantined with its reason" is broken. It is written independently
of the code under test: it hashes, unpacks and reads headers itself.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from astropy.io import fits

TERMINAL_FAILURES = {"failed", "quarantined"}


def _sha1(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


def _pixels(path: Path) -> list[bytes]:
    with fits.open(path, do_not_scale_image_data=True) as h:
        out = []
        for hdu in h:
            if hdu.data is None:
                continue
            a = np.asarray(hdu.data)
            out.append(a.astype(a.dtype.newbyteorder(">"), copy=False).tobytes())
        return out


def _date_dir(path: Path) -> tuple[str, str, str] | None:
    with fits.open(path) as h:
        for hdu in h:
            v = hdu.header.get("DATE-OBS")
            if v:
                y, m, d = str(v)[:10].split("-")
                return (y, m, d)
    return None


def _files(root: Path) -> Iterable[Path]:
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            yield Path(dirpath, n)


def oracle(
    src: Path,
    dest: Path,
    rows: list[dict[str, object]],
    events: list[dict[str, object]],
    patterns: tuple[str, ...] = ("*.fits",),
    spool: Path | None = None,
) -> list[str]:
    """Every broken promise, one line each; an empty list means all is well."""
    problems: list[str] = []
    done = [r for r in rows if r["state"] == "done"]
    by_dest: dict[str, list[dict[str, object]]] = defaultdict(list)
    for r in done:
        by_dest[str(r["filepath"])].append(r)

    # temporaries or partial files anywhere
    for root in (src, dest, *([spool] if spool else [])):
        for f in _files(root):
            if f.name.endswith((".rt-tmp", ".fault")):
                problems.append(f"temporary file left: {f}")

    archived = [f for f in _files(dest) if not f.name.startswith(".")]
    content: dict[str, list[Path]] = defaultdict(list)
    for f in archived:
        digest = _sha1(f)
        content[digest].append(f)
        owners = by_dest.get(str(f), [])
        if not owners:
            problems.append(f"unexpected file at the destination (no done row): {f}")
            continue
        row = owners[0]
        if row["sha1_hash"] != digest:
            problems.append(f"{f}: SHA1 {digest} but its done row says {row['sha1_hash']}")
        day = _date_dir(f)
        if day is not None and f.parent.relative_to(dest).parts != day:
            problems.append(f"{f}: in {f.parent.relative_to(dest)} but its DATE-OBS says {day}")
        source = Path(str(row["source_filepath"]))
        same_version = source.is_file() and row["raw_sha1"] == _sha1(source)
        if same_version and _pixels(source) != _pixels(f):
            problems.append(f"{f}: pixels differ from its source {source}")
    for digest, paths in content.items():
        if len(paths) > 1:
            problems.append(f"published twice ({digest}): {sorted(map(str, paths))}")
    for path, owners in by_dest.items():
        if not Path(path).is_file():
            problems.append(f"lost: done row for {path} but no such file at the destination")
        if len(owners) > 1:
            problems.append(f"two done rows point at {path}")

    # every source file is archived (its current bytes), or failed with a reason
    raw_done = {str(r["raw_sha1"]) for r in done} | {str(r["sha1_hash"]) for r in done}
    latest: dict[str, dict[str, object]] = {}
    for e in sorted(events, key=lambda e: int(str(e["id"]))):
        if e["state"] in {"done", "duplicate", "failed", "quarantined"}:
            latest[str(e["source_filepath"])] = e
    for f in _files(src):
        if f.name.startswith(".") or not any(fnmatch.fnmatch(f.name, p) for p in patterns):
            continue
        if _sha1(f) in raw_done:
            continue
        last = latest.get(str(f))
        if last is not None and last["state"] in TERMINAL_FAILURES:
            if not last["reason"]:
                problems.append(f"{f}: {last['state']} without a reason")
            continue
        problems.append(f"lost: {f} (its current content is neither archived nor failed)")
    for r in rows:
        if r["state"] in TERMINAL_FAILURES and not r["error"]:
            problems.append(f"row {r['sha1_hash']} is {r['state']} without a reason")
        if r["state"] == "claimed":
            problems.append(f"claim left behind: {r['sha1_hash']} ({r['source_filepath']})")
    return problems
