"""Reaping: free the small local disk by deleting only files that are safely archived.

A local file may be deleted only when all of these hold:

* its catalog row is ``done`` and its archive copy was *verified* (``verified_at``);
* the file is, byte for byte, what that row describes: the ``.fz`` left by tidying has
  the row's SHA1, an original kept by ``--keep-source`` has the row's raw SHA1 (hashed
  from one snapshot of the file just before deleting it);
* both the file and the verification are older than ``--reap-after`` hours;
* with ``--reap-verify-remote``, the archive copy's SHA1, computed at the destination
  just before deleting, still matches (if not, the file is kept and a person alerted:
  the archive copy is bad);
* it is not excluded, not hidden, not a link, and it is still the very file that was
  hashed when it is removed (renamed aside, compared, then unlinked).

With ``--reap-when-disk-above``, when the source disk is fuller than that, such files
are deleted oldest first until it is not. If the disk is full and nothing may be
deleted (everything waits for transfer), that is when a person must act: an alert.

Every deletion is a line in the file's history (state ``reaped``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path, PurePosixPath

from rawtransfer.alerts import Alerter
from rawtransfer.catalog.base import Catalog, Owner, State, VerifiedCopy
from rawtransfer.config import Settings
from rawtransfer.destination.base import Destination
from rawtransfer.errors import ResourceUnavailable
from rawtransfer.metrics import Recorder
from rawtransfer.names import q
from rawtransfer.steps import hashing
from rawtransfer.steps.settle import FileVanished, NotRegular
from rawtransfer.steps.snapshot import Snapshot, remove_if_unchanged
from rawtransfer.watch import Matcher, scan

log = logging.getLogger(__name__)

# How often the service looks at the disk and the retention when reaping is asked for:
# a night's frames arrive every few tens of seconds, a minute keeps the disk in check.
REAP_INTERVAL = 60.0
ALERT_KIND = "disk full"


@dataclass(frozen=True)
class Candidate:
    path: Path
    size: int
    mtime: float
    expect: str  # the SHA1 the local file must have
    copy: VerifiedCopy

    @property
    def age_from(self) -> float:
        """Seconds since the epoch from which retention counts: the later of the file's
        mtime and the verification of its copy."""
        verified = self.copy.verified_at.replace(tzinfo=UTC).timestamp()
        return max(self.mtime, verified)


@dataclass
class Report:
    deleted: list[tuple[Candidate, str]] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)
    freed: int = 0
    disk_percent: float | None = None


def disk_percent(path: Path) -> float:
    """How full the filesystem holding ``path`` is, as ``df`` counts it."""
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return 100.0 * used / (used + avail) if used + avail else 0.0


def candidates(
    root: Path, matcher: Matcher, catalog: Catalog, keep_source: bool
) -> list[Candidate]:
    """Local files that are archived and verified, with what they must equal, oldest
    first.

    The ``.fz`` that tidying left in place of an original is looked up under the
    original's name and must have the row's SHA1; a file taken as it is (an original
    with ``--keep-source``, or a source that was already a ``.fz``) must have the row's
    raw SHA1.
    """
    # source path -> (local file, its lstat, tidied?), from one walk of the source
    found: dict[str, tuple[Path, os.stat_result, bool]] = {}
    both = Matcher((*matcher.patterns, *(p + ".fz" for p in matcher.patterns)), matcher.rules)
    for path, st in scan(root, both):
        if path.name.endswith(".fz") and matcher(path.name[: -len(".fz")]):
            found[str(path)[: -len(".fz")]] = (path, st, True)
        elif matcher(path.name) and (keep_source or path.name.endswith(".fz")):
            found.setdefault(str(path), (path, st, False))
    out = []
    for source, copy in catalog.verified_copies(sorted(found)).items():
        path, st, was_tidied = found[source]
        expect = copy.sha1 if was_tidied else copy.raw_sha1
        if expect:
            out.append(Candidate(path, st.st_size, st.st_mtime, expect, copy))
    return sorted(out, key=lambda c: c.age_from)


class Reaper:
    def __init__(
        self,
        settings: Settings,
        matcher: Matcher,
        catalog: Catalog,
        destination: Destination,
        alerter: Alerter | None = None,
        owner: Owner | None = None,
        metrics: Recorder | None = None,
    ) -> None:
        self.metrics = metrics or Recorder()
        self.s = settings
        self.matcher = matcher
        self.catalog = catalog
        self.destination = destination
        self.alerter = alerter
        self.owner = owner or Owner()
        self.alerted = False

    def __call__(self, dry_run: bool = False) -> Report:
        """Delete (or, in a dry run, list) what may go; say what was kept and why."""
        s = self.s
        report = Report()
        now = time.time()
        retention = (s.reap_after or 0.0) * 3600
        due = [
            c
            for c in candidates(s.source_dir, self.matcher, self.catalog, s.keep_source)
            if now - c.age_from >= retention
        ]
        if s.reap_after is not None:
            # everything past retention is tried once here; what was kept stays kept
            # (trying it again under disk pressure would hash and alert twice)
            for c in due:
                self._one(c, f"older than {s.reap_after:g} h", dry_run, report)
            due = []
        if s.reap_when_disk_above is not None:
            threshold = s.reap_when_disk_above
            # a dry run cannot watch the disk empty: it counts what deleting would free
            counted = 0
            for c in due:  # oldest first
                full = disk_percent(s.source_dir) - 100.0 * counted / _disk_bytes(s.source_dir)
                if full <= threshold:
                    break
                if self._one(c, f"disk {full:.0f}% full", dry_run, report) and dry_run:
                    counted += c.size
            report.disk_percent = disk_percent(s.source_dir)
            if not dry_run:
                self._disk_alert(s.source_dir, threshold)
        return report

    def _one(self, c: Candidate, why: str, dry_run: bool, report: Report) -> bool:
        try:
            with Snapshot(c.path) as snap:
                if hashing.sha1_file(snap.view) != c.expect:
                    report.kept.append((c.path, "its content is not the archived one"))
                    return False
                rel = _rel(c.copy.filepath)
                if self.s.reap_verify_remote:
                    remote = self.destination.sha1(rel)
                    if remote != c.copy.sha1:
                        what = "missing" if remote is None else f"SHA1 {remote}"
                        text = (
                            f"{q(c.path)} kept: its archive copy {q(c.copy.filepath)} is "
                            f"{what}, expected {c.copy.sha1}"
                        )
                        log.error("%s", text)
                        if self.alerter is not None:
                            self.alerter.alert("archive copy bad", text)
                        report.kept.append((c.path, f"archive copy {what}"))
                        return False
                if dry_run:
                    report.deleted.append((c, why))
                    report.freed += c.size
                    return True
                if not remove_if_unchanged(c.path, snap):
                    report.kept.append((c.path, "it changed"))
                    return False
        except (FileVanished, NotRegular, FileNotFoundError):
            return False
        except ResourceUnavailable as exc:
            report.kept.append((c.path, f"cannot check the archive copy: {exc}"))
            return False
        except OSError as exc:
            log.error("not reaping %s: %s", q(c.path), exc.strerror or exc)
            report.kept.append((c.path, exc.strerror or str(exc)))
            return False
        reason = f"deleted locally, {c.size} bytes ({why}); archive copy {c.copy.filepath} verified"
        self.catalog.record_event(c.copy.sha1, str(c.path), State.REAPED, reason, self.owner)
        log.info("reaped %s (%d bytes, %s)", q(c.path), c.size, why)
        self.metrics.reaped(c.size)
        report.deleted.append((c, why))
        report.freed += c.size
        return True

    def _disk_alert(self, root: Path, threshold: float) -> None:
        full = disk_percent(root)
        if full > threshold and not self.alerted:
            self.alerted = True
            text = (
                f"{q(root)} is {full:.0f}% full (threshold {threshold:g}%) and nothing more "
                "may be deleted: every file left waits for its transfer or verification"
            )
            log.error("%s", text)
            if self.alerter is not None:
                self.alerter.alert(ALERT_KIND, text)
        elif full <= threshold and self.alerted:
            self.alerted = False
            if self.alerter is not None:
                self.alerter.resolve(ALERT_KIND, f"{q(root)} is {full:.0f}% full again")


def _disk_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return max(1, st.f_blocks * st.f_frsize)


def _rel(filepath: str) -> PurePosixPath:
    """The archive-relative path (YYYY/MM/DD/NAME) of a recorded archive path."""
    return PurePosixPath(*PurePosixPath(filepath).parts[-4:])
