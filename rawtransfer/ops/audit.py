"""``raw-transfer audit``: the catalog, the archive and the source compared, and the
repairs that cannot lose or overwrite anything.

What it reports, each with its files (the JSON shape is in the README):

* *lost*: done in the catalog, missing at the destination;
* *dark*: a file in the archive's date tree (``YYYY/MM/DD``) with no catalog row;
* *mismatch*: the size differs from the catalog's; with ``--deep``, the SHA1 computed at
  the destination (``Destination.sha1``: a remote ``sha1sum`` where the server has a
  shell, else the file read back);
* *zero-size* files and *temporary leftovers* (``.*.rt-tmp``) in the archive;
* *stale claims*: claimed rows whose holder is gone or whose lease expired
  (``judge_existing``, as a claimer judges them);
* *failed and quarantined* files still as they were when they failed;
* *never transferred*: source files the service would take (patterns, exclusions) with
  no finished record covering the file now at the path (``Handled.covers``);
* *run gaps*: run numbers of which no file was seen anywhere, per telescope and night,
  when ``--metadata-regex`` has a ``run`` group (and a ``tel`` group, if any).

``--repair`` releases stale claims, removes temporaries older than a day, registers dark
files whose content is exactly what one of the source files packs to, and re-queues lost
and never-transferred files whose source is still there (a ``retry`` in their history, so
the service's next backfill takes them). It never deletes or overwrites an archived file
and never touches a source file. Mismatched and empty archive files are only reported:
which copy is right is for a person to decide.

The archive is listed one directory at a time (``Destination.list_archive``), the catalog
read in pages (``Catalog.audit_rows``), the source scanned once (``watch.scan``).
"""

from __future__ import annotations

import argparse
import getpass
import itertools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from rawtransfer import log as logsetup
from rawtransfer.catalog.base import (
    Catalog,
    FileFacts,
    HandledSources,
    Owner,
    Row,
    State,
    judge_existing,
    utc_from_epoch,
)
from rawtransfer.config import Settings
from rawtransfer.destination.base import ArchiveEntry, Destination, in_date_tree, is_temporary
from rawtransfer.errors import (
    EXIT_FILES_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    FileFailed,
    FileRejected,
    RawTransferError,
    ResourceUnavailable,
)
from rawtransfer.names import cut, plural, q
from rawtransfer.pipeline import MIN_LEASE_SECONDS
from rawtransfer.spool import Spool
from rawtransfer.steps import check, hashing, metadata, pack, place
from rawtransfer.steps.settle import FileVanished, NotRegular
from rawtransfer.steps.snapshot import Identity, Snapshot, current_identity
from rawtransfer.units import ago, mb, utc_iso
from rawtransfer.watch import Matcher, scan, unreadable_dirs

log = logging.getLogger(__name__)

# Catalog rows per query: each call is short (an index range on the primary key), and
# the table is never held while the audit works.
PAGE = 10_000
# Temporary files older than this are removed by --repair: no copy in progress goes a
# day without writing (a copy's lease is minutes), and younger ones may be a live copy's.
TEMPORARY_MAX_AGE = 86_400.0
# Lines shown per category in the text report; --json lists everything.
SHOWN = 20
# SHA1s computed at the destination at once with --deep (each thread has its own SSH
# connection; the server's disk, not the link, is the limit beyond a few).
DEEP_THREADS = 8
# A jump in run numbers this large is a counter reset, not frames lost: one range.
MAX_GAP_LISTED = 100_000
EPOCH = datetime(1970, 1, 1)
VERSION = 1


@dataclass(frozen=True)
class Category:
    key: str  # in the JSON
    title: str  # for people
    meaning: str


CATEGORIES = (
    Category("lost", "lost", "done in the catalog, missing at the destination"),
    Category("dark", "dark", "in the archive's date tree with no catalog row"),
    Category("mismatch", "mismatch", "size (with --deep: SHA1) differs from the catalog"),
    Category("zero_size", "zero-size", "empty files in the archive"),
    Category("temporary", "temporary leftovers", ".*.rt-tmp files of interrupted copies"),
    Category("stale_claims", "stale claims", "claims whose holder is gone or lease expired"),
    Category("unresolved", "failed/quarantined", "the file is still as it was when it failed"),
    Category("never_transferred", "never transferred", "source files with no done record"),
    Category("run_gaps", "run gaps", "run numbers never seen, per telescope and night"),
)
TITLES = {c.key: c.title for c in CATEGORIES}


@dataclass
class Report:
    archive: str
    catalog: str
    source: str
    since: date | None
    deep: bool
    found: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {c.key: [] for c in CATEGORIES}
    )
    looked_at: dict[str, float] = field(default_factory=dict)
    not_judged: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "in_flight",
                "young_source_files",
                "rows_of_other_archives",
                "other_archive_files",
                "unreadable_source_directories",
            ),
            0,
        )
    )
    run_gaps_checked: bool = False
    repair: dict[str, Any] | None = None

    @property
    def problems(self) -> int:
        """Files found in a category, plus source directories that could not be read
        (whose files were not judged)."""
        return self._unreadable + sum(len(v) for v in self.found.values())

    @property
    def left(self) -> int | None:
        """After --repair: what it could not take care of (and unreadable directories)."""
        if self.repair is None:
            return None
        left: dict[str, int] = self.repair["left"]
        return self._unreadable + sum(left.values())

    @property
    def _unreadable(self) -> int:
        return self.not_judged.get("unreadable_source_directories", 0)

    @property
    def exit_code(self) -> int:
        if self.repair is not None and self.repair.get("stopped"):
            return EXIT_UNREACHABLE
        remaining = self.problems if self.left is None else self.left
        return EXIT_FILES_FAILED if remaining else EXIT_OK


def _iso(when: datetime | float | None) -> str | None:
    """A catalog time (naive UTC) or a file time (epoch) for the JSON."""
    if when is None:
        return None
    return utc_iso(when if isinstance(when, datetime) else utc_from_epoch(when))


def _day(key: str) -> date:
    """The day of an archive path ``YYYY/MM/DD/NAME`` (checked by in_date_tree)."""
    return date(int(key[0:4]), int(key[5:7]), int(key[8:10]))


def _name(path: str) -> str:
    return path.rpartition("/")[2]


class Auditor:
    """One audit: ``look`` fills a Report; ``repair`` then acts on what it found."""

    def __init__(
        self,
        s: Settings,
        destination: Destination,
        catalog: Catalog,
        since: date | None = None,
        deep: bool = False,
    ) -> None:
        self.s = s
        self.destination = destination
        self.catalog = catalog
        self.since = since
        self.since_dt = datetime(since.year, since.month, since.day) if since else None
        self.deep = deep
        self.owner = Owner(host=s.host_id)
        self.who = f"{getpass.getuser()}@{socket.gethostname()}"
        # as the service's workers judge claims (pipeline.Context.lease_seconds)
        self.lease = max(MIN_LEASE_SECONDS, 4 * s.copy_timeout)
        self.now = time.time()
        self.matcher = _matcher(s)
        # archive paths are handled as strings (YYYY/MM/DD/NAME): a hundred thousand
        # path objects cost seconds. A catalog filepath is this prefix and such a string.
        probe = "0000/00/00/name"
        full = destination.full_path(PurePosixPath(probe))
        self.prefix = full.removesuffix(probe) if full.endswith(probe) else None
        self.days: dict[str, bool] = {}
        # what repair acts on
        self.lost: list[tuple[Row, PurePosixPath]] = []
        self.dark: list[ArchiveEntry] = []
        self.stale: list[Row] = []
        self.temporaries: list[ArchiveEntry] = []
        self.never: list[Path] = []
        self.by_name: dict[str, list[Path]] = {}
        self.live_sources: set[str] = set()
        # source path -> state of its claimed or released row (no terminal event yet)
        self.pending: dict[str, str] = {}
        # SHA1 -> archive path of every done row, this archive's or not
        self.done_sha1: dict[str, str] = {}

    # looking ------------------------------------------------------------------------
    def look(self) -> Report:
        started = time.monotonic()
        r = Report(
            archive=str(self.s.dest),
            catalog=describe_catalog(self.s),
            source=str(self.s.source_dir),
            since=self.since,
            deep=self.deep,
        )
        finals = self._archive(r)
        done, names, errors = self._catalog(r)
        self._compare(r, finals, done)
        handled = self.catalog.handled_sources(self.since_dt or EPOCH)
        names |= {_name(p) for p in handled}
        names |= self._source(r, handled, errors)
        for entry in self.dark:
            sources = self._same_name(entry.rel.name)
            r.found["dark"].append(
                {
                    "path": str(entry.rel),
                    "size": entry.size,
                    "mtime": _iso(entry.mtime),
                    "sources": [str(p) for p in sources],
                }
            )
        self._gaps(r, (*finals, *done), names)
        r.looked_at["seconds"] = round(time.monotonic() - started, 3)
        return r

    def _archive(self, r: Report) -> dict[str, ArchiveEntry]:
        finals: dict[str, ArchiveEntry] = {}
        days: set[str] = set()
        size = 0
        for entry in self.destination.list_archive(self.since):
            key = str(entry.rel)
            days.add(key[:10])
            size += entry.size
            if is_temporary(_name(key)):
                self.temporaries.append(entry)
                r.found["temporary"].append(
                    {"path": key, "size": entry.size, "mtime": _iso(entry.mtime)}
                )
            else:
                finals[key] = entry
        r.looked_at.update(
            archive_files=len(finals) + len(self.temporaries),
            archive_bytes=size,
            day_directories=len(days),
        )
        return finals

    def _key(self, filepath: str) -> str | None:
        """The archive path (YYYY/MM/DD/NAME) of a catalog ``filepath`` under this DEST."""
        if self.prefix is not None:
            if not filepath.startswith(self.prefix):
                return None
            key = filepath[len(self.prefix) :]
            if key.count("/") != 3:
                return None
        else:  # a destination whose full paths are not simply prefixed (none so far)
            parts = PurePosixPath(filepath).parts
            if len(parts) < 4 or self.destination.full_path(PurePosixPath(*parts[-4:])) != filepath:
                return None
            key = "/".join(parts[-4:])
        day = key[:10]
        if day not in self.days:
            self.days[day] = in_date_tree(tuple(day.split("/")))
        return key if self.days[day] else None

    def _catalog(self, r: Report) -> tuple[dict[str, Row], set[str], dict[str, Row]]:
        """Done rows by archive path, every source name, and the latest failed or
        quarantined row of each source path."""
        done: dict[str, Row] = {}
        names: set[str] = set()
        failed: dict[str, Row] = {}
        rows = elsewhere = live = 0
        now = self.catalog.clock()  # leases are judged by the catalog's clock
        after = ""
        while True:
            page = self.catalog.audit_rows(after, PAGE, self.since)
            for row in page:
                rows += 1
                src = row.source_filepath
                if src:
                    names.add(_name(src))
                if row.state == State.DONE and row.filepath:
                    self.done_sha1[row.sha1] = row.filepath
                    key = self._key(row.filepath)
                    if key is None:
                        elsewhere += 1
                    elif self.since is None or _day(key) >= self.since:
                        done.setdefault(key, row)
                elif row.state == State.RELEASED and src:
                    self.pending[src] = row.state
                elif row.state == State.CLAIMED:
                    verdict = judge_existing(
                        row.state,
                        row.claimed_by,
                        row.claimed_at,
                        src,
                        row.filepath,
                        self.owner,
                        self.lease,
                        now,
                    )
                    if verdict is not None:
                        live += 1
                        self.live_sources.add(src or "")
                    elif self.since_dt is None or (row.claimed_at or now) >= self.since_dt:
                        self.stale.append(row)
                    if src:
                        self.pending[src] = row.state
                elif row.state in (State.FAILED, State.QUARANTINED) and src:
                    before = failed.get(src)
                    if before is None or (row.updated_at or EPOCH) > (before.updated_at or EPOCH):
                        failed[src] = row
            if len(page) < PAGE:
                break
            after = page[-1].sha1
        for row in self.stale:
            holder = Owner.parse(row.claimed_by)
            r.found["stale_claims"].append(
                {
                    "sha1": row.sha1,
                    "source": row.source_filepath,
                    "claimed_by": row.claimed_by,
                    "claimed_at": _iso(row.claimed_at),
                    "why": "holder gone" if self.owner.looks_dead(holder) else "lease expired",
                }
            )
        r.looked_at["catalog_rows"] = rows
        r.not_judged.update(in_flight=live, rows_of_other_archives=elsewhere)
        return done, names, failed

    def _compare(self, r: Report, finals: dict[str, ArchiveEntry], done: dict[str, Row]) -> None:
        to_hash: list[tuple[str, Row, ArchiveEntry]] = []
        for key, row in done.items():
            entry = finals.get(key)
            if entry is None:
                rel = PurePosixPath(key)
                self.lost.append((row, rel))
                src = row.source_filepath
                r.found["lost"].append(
                    {
                        "path": key,
                        "sha1": row.sha1,
                        "size": row.packed_size,
                        "source": src,
                        "source_exists": bool(src) and os.path.lexists(src or ""),
                    }
                )
            elif entry.size == 0:
                r.found["zero_size"].append(
                    {"path": key, "mtime": _iso(entry.mtime), "sha1": row.sha1}
                )
            elif row.packed_size is not None and entry.size != row.packed_size:
                r.found["mismatch"].append(
                    {
                        "path": key,
                        "what": "size",
                        "size": entry.size,
                        "catalog_size": row.packed_size,
                        "sha1": None,
                        "catalog_sha1": row.sha1,
                    }
                )
            elif self.deep:
                to_hash.append((key, row, entry))
        others = 0
        for key, entry in finals.items():
            if key in done:
                continue
            if not key.endswith(".fz"):
                others += 1  # not a packed frame: not ours to judge
            elif entry.size == 0:
                r.found["zero_size"].append({"path": key, "mtime": _iso(entry.mtime), "sha1": None})
            else:
                self.dark.append(entry)
        r.not_judged["other_archive_files"] = others
        if not to_hash:
            return
        threads = max(1, min(DEEP_THREADS, self.s.workers))
        with ThreadPoolExecutor(threads, thread_name_prefix="audit-sha1") as pool:
            sums = list(pool.map(lambda item: self.destination.sha1(item[2].rel), to_hash))
        for (key, row, entry), got in zip(to_hash, sums, strict=True):
            if got != row.sha1:
                r.found["mismatch"].append(
                    {
                        "path": key,
                        "what": "sha1" if got is not None else "vanished",
                        "size": entry.size,
                        "catalog_size": row.packed_size,
                        "sha1": got,
                        "catalog_sha1": row.sha1,
                    }
                )

    def _source(self, r: Report, handled: HandledSources, failed: dict[str, Row]) -> set[str]:
        """Never transferred and unresolved files; returns the source names seen."""
        s = self.s
        # the patterns and, for dark files, the .fz that tidying leaves of an original
        wider = _matcher(
            replace(s, patterns=(*s.patterns, *(p + ".fz" for p in s.patterns if p[-3:] != ".fz")))
        )
        newer = self.since_dt.replace(tzinfo=UTC).timestamp() if self.since_dt else None
        names: set[str] = set()
        files = young = 0
        with unreadable_dirs() as unreadable:
            for path, st in scan(s.source_dir, wider, newer):
                mtime = st.st_mtime
                names.add(path.name)
                self.by_name.setdefault(path.name, []).append(path)
                if not self.matcher(path.name):
                    continue
                files += 1
                ident = Identity.of(st)
                mark = handled.get(str(path))
                if mark is not None and mark.covers(ident):
                    continue
                if str(path) in self.live_sources:
                    continue  # in flight now
                if self.now - mtime < s.backfill_recency_window:
                    young += 1  # the watcher's still
                    continue
                self.never.append(path)
                r.found["never_transferred"].append(
                    {
                        "source": str(path),
                        "size": ident.size,
                        "mtime": _iso(mtime),
                        "last_state": mark.state if mark else self.pending.get(str(path)),
                    }
                )
        for src, mark in sorted(handled.items()):
            if mark.state not in (State.FAILED, State.QUARANTINED):
                continue
            path = Path(src)
            if not path.is_relative_to(s.source_dir):
                continue  # another host's, in a shared catalog
            # gone: discarded by a person; changed: taken again (never transferred above)
            if not mark.covers(current_identity(path)):
                continue
            row = failed.get(src)
            r.found["unresolved"].append(
                {
                    "source": src,
                    "state": mark.state,
                    "at": _iso(mark.at),
                    "reason": row.error if row is not None else None,
                }
            )
        r.looked_at["source_files"] = files
        r.not_judged.update(young_source_files=young, unreadable_source_directories=len(unreadable))
        return names

    def _same_name(self, archived: str) -> list[Path]:
        """Source files an archive file of this name can come from: ``NAME`` packed to
        ``NAME.fz``, or the ``NAME.fz`` itself (already packed, or left by tidying)."""
        out = list(self.by_name.get(archived, []))
        if archived.endswith(".fz"):
            out = self.by_name.get(archived.removesuffix(".fz"), []) + out
        return out

    def _gaps(self, r: Report, archived: Iterable[str], names: set[str]) -> None:
        pattern = self.s.metadata_pattern
        if pattern is None or "run" not in pattern.groupindex:
            return
        r.run_gaps_checked = True
        has_tel = "tel" in pattern.groupindex

        def key(name: str) -> tuple[str | None, int] | None:
            m = pattern.search(name)
            run = m.group("run") if m else None
            if m is None or run is None or not (run.isascii() and run.isdigit()):
                return None
            return (m.group("tel") if has_tel else None), int(run)

        nights: dict[tuple[str | None, date], set[int]] = {}
        known: dict[str | None, set[int]] = {}
        for path in archived:
            k = key(_name(path))
            if k is not None:
                nights.setdefault((k[0], _day(path)), set()).add(k[1])
                known.setdefault(k[0], set()).add(k[1])
        for name in names:
            k = key(name)
            if k is not None:
                known.setdefault(k[0], set()).add(k[1])
        for (tel, night), runs in sorted(nights.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            seen = known[tel]
            ordered = sorted(runs)
            for a, b in itertools.pairwise(ordered):
                if b - a <= 1:
                    continue
                if b - a > MAX_GAP_LISTED:
                    spans = [(a + 1, b - 1)]
                else:
                    spans = _spans(n for n in range(a + 1, b) if n not in seen)
                for first, last in spans:
                    r.found["run_gaps"].append(
                        {
                            "tel": tel,
                            "night": night.isoformat(),
                            "first": first,
                            "last": last,
                            "count": last - first + 1,
                        }
                    )

    # repairing ------------------------------------------------------------------------
    def repair(self, r: Report) -> None:
        """Do what is safe, recording each step in ``r.repair`` as it is done: if the
        catalog or the destination goes away meanwhile, the report still says what was
        done (and ``stopped`` why the rest was not)."""
        done: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        left = {c.key: len(r.found[c.key]) for c in CATEGORIES}
        advice: list[str] = []
        r.repair = {
            "actions": done,
            "not_repaired": skipped,
            "left": left,
            "advice": advice,
            "stopped": None,
        }
        try:
            self._repair(done, skipped, left, advice)
        except ResourceUnavailable as exc:
            r.repair["stopped"] = str(exc)

    def _repair(
        self,
        done: list[dict[str, Any]],
        skipped: list[dict[str, Any]],
        left: dict[str, int],
        advice: list[str],
    ) -> None:
        reason = f"asked by raw-transfer audit --repair ({self.who})"

        for row in self.stale:
            if self.catalog.release_stale(
                row.sha1, row.claimed_by or "", row.claimed_at, self.owner, f"stale claim; {reason}"
            ):
                left["stale_claims"] -= 1
                done.append(
                    {
                        "action": "released",
                        "sha1": row.sha1,
                        "source": row.source_filepath,
                        "claimed_by": row.claimed_by,
                    }
                )

        old = [e for e in self.temporaries if self.now - e.mtime > TEMPORARY_MAX_AGE]
        if old:
            n = self.destination.sweep_temporaries(TEMPORARY_MAX_AGE)
            left["temporary"] -= min(n, len(old))
            done.append({"action": "removed_temporaries", "count": n})

        registered: set[str] = set()
        spool: Spool | None = None
        if self.dark:
            try:
                spool = Spool(self.s.state_dir / "spool", f"{self.s.host_id}-{os.getpid()}")
            except OSError as exc:
                why = f"no room to pack sources in {q(self.s.state_dir / 'spool')}: {exc.strerror}"
                skipped += [{"category": "dark", "path": str(e.rel), "why": why} for e in self.dark]
        if spool is not None:
            try:
                for entry in self.dark:
                    source, why = self._register(entry, spool.path, reason)
                    if source is None:
                        skipped.append({"category": "dark", "path": str(entry.rel), "why": why})
                        continue
                    registered.add(source)
                    left["dark"] -= 1
                    done.append({"action": "registered", "path": str(entry.rel), "source": source})
            finally:
                spool.close()

        oldest = self.now
        for row, rel in self.lost:
            problem = self._reopen(row, rel, reason)
            if problem is not None:
                skipped.append({"category": "lost", "path": str(rel), "why": problem})
                continue
            left["lost"] -= 1
            src = row.source_filepath or ""
            oldest = min(oldest, _mtime(src, self.now))
            done.append({"action": "requeued", "category": "lost", "source": src})

        for path in self.never:
            if str(path) in registered:
                left["never_transferred"] -= 1
                continue
            if current_identity(path) is None:
                skipped.append(
                    {"category": "never_transferred", "path": str(path), "why": "gone meanwhile"}
                )
                continue
            self.catalog.record_event(
                None, str(path), State.RETRY, f"never transferred; {reason}", self.owner
            )
            left["never_transferred"] -= 1
            oldest = min(oldest, _mtime(str(path), self.now))
            done.append(
                {"action": "requeued", "category": "never_transferred", "source": str(path)}
            )

        hours = (self.now - oldest) / 3600
        if hours > self.s.backfill_hours:
            advice.append(
                f"some re-queued files are older than --backfill-hours "
                f"({self.s.backfill_hours:g} h), which the service's backfill does not look "
                f"at; take them with one run of: raw-transfer SOURCE DEST --backfill-only "
                f"--backfill-hours {int(hours) + 1} (and the service's other flags)"
            )

    def _register(self, entry: ArchiveEntry, spool: Path, reason: str) -> tuple[str | None, str]:
        """Record a dark file as done if a source file of its name packs to exactly its
        content; (the source, "") or (None, why not)."""
        candidates = self._same_name(entry.rel.name)
        if not candidates:
            return None, "no source file of that name"
        archived = self.destination.sha1(entry.rel)
        if archived is None:
            return None, "gone from the archive meanwhile"
        if archived in self.done_sha1:  # nothing to pack: the catalog has it elsewhere
            return None, f"the same content is recorded as done at {self.done_sha1[archived]}"
        why = ""
        for path in candidates:
            facts, sha1, why = self._pack(path, spool, entry.rel)
            if facts is None:
                continue
            if sha1 != archived:
                why = f"{q(path)} packs to other content"
                continue
            filepath = self.destination.full_path(entry.rel)
            refused = self.catalog.register_done(
                sha1,
                facts,
                filepath,
                utc_from_epoch(entry.mtime),
                self.owner,
                self.lease,
                f"{filepath}: found in the archive with no row, verified against this file; "
                + reason,
            )
            if refused is None:
                return str(path), ""
            why = refused
        return None, why

    def _pack(
        self, path: Path, spool: Path, rel: PurePosixPath
    ) -> tuple[FileFacts | None, str, str]:
        """The facts of a source file and the SHA1 it packs to, as the pipeline would
        make them; (None, "", why) when it cannot be packed or belongs elsewhere."""
        try:
            with Snapshot(path) as snap:
                checked = check.check(snap.view, max_bytes=self.s.max_frame_bytes)
                day = place.header_date(checked.headers, self.s.header_card)
                if place.remote_relpath(day, path.name) != rel:
                    return None, "", f"{q(path)} belongs in {day.isoformat()}"
                raw_sha1 = hashing.sha1_file(snap.view)
                if checked.packed:
                    packed = pack.copy_to_spool(snap.view, spool).path
                else:
                    packed = pack.pack(snap.view, spool, float_images=checked.float_images)
                try:
                    sha1 = hashing.sha1_file(packed)
                    size = packed.stat().st_size
                finally:
                    packed.unlink(missing_ok=True)
                facts = FileFacts(
                    source_filepath=str(path),
                    raw_sha1=raw_sha1,
                    raw_size=snap.size,
                    file_created_at=utc_from_epoch(snap.identity.mtime_ns / 1e9),
                    packed_size=size,
                    obs_date=day,
                    metadata=metadata.metadata_from_name(self.s.metadata_pattern, path.name),
                    identity=str(snap.identity),
                )
                return facts, sha1, ""
        except (FileVanished, NotRegular, FileNotFoundError):
            return None, "", f"{q(path)} is gone or not a regular file"
        except (FileRejected, FileFailed) as exc:
            return None, "", f"{q(path)}: {cut(str(exc), 200)}"
        except OSError as exc:
            return None, "", f"{q(path)}: {exc.strerror or exc}"

    def _reopen(self, row: Row, rel: PurePosixPath, reason: str) -> str | None:
        """Re-queue a lost file if its source is still the file that was archived; None
        when done, else why not."""
        src = row.source_filepath
        if not src:
            return "no source path recorded"
        path = Path(src)
        if not path.is_relative_to(self.s.source_dir):
            return "its source is not under SOURCE_DIR (another host's?)"
        if not self.matcher(path.name):
            return "its source no longer matches --patterns"
        if current_identity(path) is None:
            fz = Path(src + ".fz")
            if current_identity(fz) is not None:
                return f"only the packed {q(fz)} is left at the source: copy it back by hand"
            return "its source is gone"
        try:
            if row.raw_sha1:
                same = hashing.sha1_file(path) == row.raw_sha1
            else:  # an upstream row: only the packed SHA1 is known
                spool = Spool(self.s.state_dir / "spool", f"{self.s.host_id}-{os.getpid()}")
                try:
                    _, sha1, why = self._pack(path, spool.path, rel)
                finally:
                    spool.close()
                if why:
                    return why
                same = sha1 == row.sha1
        except OSError as exc:
            return f"its source cannot be read: {exc.strerror or exc}"
        if not same:
            return "its source now holds other content"
        if self.destination.sha1(rel) is not None:
            return "it is back in the archive"
        if not self.catalog.reopen_lost(
            row.sha1, row.filepath or "", src, self.owner, f"archive file missing; {reason}"
        ):
            return "its row changed meanwhile"
        return None


def _mtime(path: str, default: float) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return default


def _spans(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive numbers as (first, last) ranges."""
    out: list[tuple[int, int]] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def _matcher(s: Settings) -> Matcher:
    from rawtransfer.service import make_matcher

    return make_matcher(s)


def describe_catalog(s: Settings) -> str:
    if s.uses_postgres:
        from rawtransfer.catalog.pg_connect import PgTarget

        return f"{PgTarget.from_settings(s).description} table {s.db_table}"
    return f"sqlite {s.state_dir / 'catalog.sqlite3'} table {s.db_table}"


# ---------------------------------------------------------------------------------------
# output


def human_size(n: float | None) -> str:
    return "?" if n is None else mb(n)


def human_age(iso: str | None, now: float) -> str:
    """How long ago a time of the JSON (utc_iso) was."""
    if iso is None:
        return "?"
    then = datetime.fromisoformat(iso.removesuffix("Z")).replace(tzinfo=UTC).timestamp()
    return ago(now - then)


def _table(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def _lines(key: str, item: dict[str, Any], now: float) -> tuple[str, ...]:
    if key == "lost":
        state = "present" if item["source_exists"] else "gone"
        return (
            item["path"],
            human_size(item["size"]),
            f"source {q(item['source'] or '?')} ({state})",
        )
    if key == "dark":
        sources = item["sources"]
        where = f"source of that name: {q(sources[0])}" if sources else "no source of that name"
        if len(sources) > 1:
            where += f" and {len(sources) - 1} more"
        return (item["path"], human_size(item["size"]), human_age(item["mtime"], now), where)
    if key == "mismatch":
        if item["what"] == "size":
            what = f"catalog says {human_size(item['catalog_size'])}"
        elif item["what"] == "vanished":
            what = "gone while its SHA1 was computed"
        else:
            what = f"SHA1 {item['sha1'][:12]}..., catalog says {item['catalog_sha1'][:12]}..."
        return (item["path"], human_size(item["size"]), what)
    if key == "zero_size":
        row = "catalog row " + item["sha1"][:12] + "..." if item["sha1"] else "no catalog row"
        return (item["path"], human_age(item["mtime"], now), row)
    if key == "temporary":
        return (item["path"], human_size(item["size"]), human_age(item["mtime"], now))
    if key == "stale_claims":
        return (
            q(item["source"] or "?"),
            f"claimed by {item['claimed_by']}",
            human_age(item["claimed_at"], now),
            item["why"],
        )
    if key == "unresolved":
        return (
            q(item["source"]),
            item["state"],
            human_age(item["at"], now),
            cut(item["reason"] or "", 120),
        )
    if key == "never_transferred":
        last = item["last_state"]
        if last is None:
            seen = "no record"
        elif last in (State.DONE, State.DUPLICATE):
            seen = f"changed since it was {last}"
        else:
            seen = f"last: {last}"
        return (q(item["source"]), human_size(item["size"]), human_age(item["mtime"], now), seen)
    if key == "run_gaps":
        first, last, count = item["first"], item["last"], item["count"]
        runs = f"run {first}" if count == 1 else f"runs {first}-{last} ({count})"
        tel = f"tel {item['tel']}" if item["tel"] is not None else "all"
        return (tel, f"night {item['night']}", runs)
    raise ValueError(key)


def render_text(r: Report, now: float | None = None) -> str:
    now = time.time() if now is None else now
    a = r.looked_at
    out = [
        f"raw-transfer audit: archive {r.archive}, catalog {r.catalog}, source {r.source}",
        f"looked at {plural(int(a['archive_files']), 'archived file')} "
        f"({human_size(a['archive_bytes'])}) in "
        f"{plural(int(a['day_directories']), 'day directory', 'day directories')}, "
        f"{plural(int(a['catalog_rows']), 'catalog row')} and "
        f"{plural(int(a['source_files']), 'source file')} in {a['seconds']:.1f} s"
        + (f", from {r.since.isoformat()} on" if r.since else "")
        + ("; SHA1s computed at the destination (--deep)" if r.deep else ""),
        "",
    ]
    summary: list[tuple[str, ...]] = []
    for c in CATEGORIES:
        n = len(r.found[c.key])
        meaning = c.meaning
        if c.key == "run_gaps" and not r.run_gaps_checked:
            meaning = "not checked: --metadata-regex has no 'run' group"
        summary.append((c.title, str(n), meaning))
    out += _table(summary, right=(1,))
    for c in CATEGORIES:
        items = r.found[c.key]
        if not items:
            continue
        out += ["", f"{c.title} ({len(items)})"]
        right = (
            (1,) if c.key in ("lost", "dark", "mismatch", "temporary", "never_transferred") else ()
        )
        out += _table([_lines(c.key, i, now) for i in items[:SHOWN]], right=right)
        if len(items) > SHOWN:
            out.append(f"  ... and {len(items) - SHOWN} more (--json lists them all)")
    nj = r.not_judged
    notes = []
    if nj.get("young_source_files"):
        notes.append(
            f"{plural(nj['young_source_files'], 'source file')} younger than "
            "--backfill-recency-window, left to the watcher"
        )
    if nj.get("in_flight"):
        notes.append(f"{plural(nj['in_flight'], 'file')} in flight (live claims)")
    if nj.get("rows_of_other_archives"):
        notes.append(
            f"{plural(nj['rows_of_other_archives'], 'done row')} naming files outside DEST "
            "(another archive's, or DEST spelled otherwise than the service's)"
        )
    if others := nj.get("other_archive_files", 0):
        notes.append(f"{plural(others, 'file')} in day directories that are not .fz frames")
    if unreadable := nj.get("unreadable_source_directories", 0):
        dirs = plural(unreadable, "source directory", "source directories")
        notes.append(f"{dirs} could not be read: their files were not looked at")
    if notes:
        out += ["", "not judged: " + "; ".join(notes)]
    if r.repair is not None:
        out += ["", "repair:"]
        out += _repair_lines(r.repair)
        left = r.repair["left"]
        parts = [f"{TITLES[k]} {n}" for k, n in left.items() if n]
        out += [
            "",
            f"left after repair: {plural(sum(left.values()), 'problem')}"
            + (f" ({', '.join(parts)})" if parts else "")
            + f"; exit {r.exit_code}",
        ]
    else:
        out += ["", f"{plural(r.problems, 'problem')}; exit {r.exit_code}"]
    return "\n".join(out)


def _repair_lines(rep: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, ...]] = []
    for act in rep["actions"]:
        kind = act["action"]
        if kind == "released":
            rows.append(("released", f"stale claim of {act['claimed_by']} on {q(act['source'])}"))
        elif kind == "removed_temporaries":
            rows.append(("removed", f"{plural(act['count'], 'temporary file')} older than a day"))
        elif kind == "registered":
            rows.append(("registered", f"{act['path']} as done: the packed {q(act['source'])}"))
        elif kind == "requeued":
            what = TITLES[act["category"]]
            rows.append(("re-queued", f"{q(act['source'])} ({what}): retry recorded"))
    for skip in rep["not_repaired"]:
        rows.append(("not repaired", f"{skip['path']} ({TITLES[skip['category']]}): {skip['why']}"))
    if not rows:
        rows.append(("nothing", "to repair safely"))
    lines = _table(rows)
    if any(a["action"] == "requeued" for a in rep["actions"]):
        lines.append("  the service's next backfill takes the re-queued files")
    lines += [f"  note: {text}" for text in rep["advice"]]
    if rep["stopped"]:
        lines.append(f"  stopped: {rep['stopped']}; run it again once that is back")
    return lines


def as_json(r: Report) -> dict[str, Any]:
    return {
        "version": VERSION,
        "archive": r.archive,
        "catalog": r.catalog,
        "source": r.source,
        "since": r.since.isoformat() if r.since else None,
        "deep": r.deep,
        "looked_at": r.looked_at,
        "not_judged": r.not_judged,
        "run_gaps_checked": r.run_gaps_checked,
        "counts": {k: len(v) for k, v in r.found.items()},
        "found": r.found,
        "problems": r.problems,
        "repair": r.repair,
        "exit": r.exit_code,
    }


# ---------------------------------------------------------------------------------------
# the command

OWN = ("since", "deep", "repair", "json")


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-11-24") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("audit")
    g.add_argument(
        "--since",
        type=_date,
        default=None,
        metavar="DATE",
        help="Only archive days from DATE (YYYY-MM-DD) on, and source files and catalog "
        "records from then on.",
    )
    g.add_argument(
        "--deep",
        action="store_true",
        help="Compare every archived file's SHA1, computed at the destination, with the "
        "catalog's (reads every file there).",
    )
    g.add_argument(
        "--repair",
        action="store_true",
        help="Do what is safe: release stale claims, remove temporaries older than a day, "
        "register dark files that verify against a source file, re-queue lost and "
        "never-transferred files whose source is there. Never deletes or overwrites an "
        "archived file, never touches a source file.",
    )
    g.add_argument("--json", action="store_true", help="The report as JSON (see the README).")


def run(
    s: Settings,
    since: date | None = None,
    deep: bool = False,
    repair: bool = False,
    json_out: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    from rawtransfer.service import check_source, make_catalog, make_destination

    check_source(s.source_dir)
    destination = make_destination(s)
    try:
        catalog = make_catalog(s)
        try:
            auditor = Auditor(s, destination, catalog, since, deep)
            report = auditor.look()
            if repair:
                auditor.repair(report)
        finally:
            catalog.close()
    finally:
        destination.close()
    if json_out:
        print(json.dumps(as_json(report), indent=1), file=out)
    else:
        print(render_text(report), file=out)
    return report.exit_code


def main(args: list[str]) -> int:
    from rawtransfer.options import service_parser, service_settings

    p = service_parser(
        "raw-transfer audit",
        "Compare the catalog, the archive at DEST and SOURCE_DIR: lost, dark, mismatched, "
        "empty and temporary files, stale claims, unresolved failures, files never "
        "transferred, run gaps. Takes the service's own arguments (or --config FILE); "
        "those it has no use for are ignored. Exit 0 clean, 1 problems found (after "
        "--repair: problems left), 2 usage, 3 destination or catalog unreachable.",
    )
    add_arguments(p)
    ns = p.parse_args(args)
    try:
        s = service_settings(ns, OWN)
        logsetup.setup(s.verbose)
        if not s.verbose:  # the report is the output; only warnings besides it
            logging.getLogger().setLevel(logging.WARNING)
        return run(s, ns.since, ns.deep, ns.repair, ns.json)
    except RawTransferError as exc:
        print(f"raw-transfer audit: error: {exc}", file=sys.stderr)
        return exc.exit_code
