"""``raw-transfer why FILE``: one file's history, one line per state change.

FILE is a source path, an archive path, a bare file name or a SHA1 (of the packed or of
the raw file). The lines come from the catalog's append-only events table: when, which
host and process, what happened and why (claimed, taken over, done with its archive
path and SHA1, failed, quarantined, retry, released, duplicate of which file, changed,
tidied). A file never seen says so, and whether the service would take it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from rawtransfer.catalog.base import SHA1_RE, Event, History, Row
from rawtransfer.config import Settings
from rawtransfer.errors import EXIT_FILES_FAILED, EXIT_OK
from rawtransfer.live import catalog_label
from rawtransfer.names import cut, q
from rawtransfer.ops.observe import guarded, open_catalog, settings_from
from rawtransfer.units import ago, mb, utc_iso, utc_text

VERSION = 1
STATE_WIDTH = 12
_EPOCH = datetime(1970, 1, 1)


def parser() -> argparse.ArgumentParser:
    from rawtransfer.options import service_parser

    p = service_parser(
        "raw-transfer why",
        "The history of one file: a source path, an archive path, a bare name or a SHA1. "
        "Takes the service's own flags (or --config FILE); only the catalog flags, "
        "--state-dir and --patterns matter.",
        usage="%(prog)s FILE [the service's flags, or --config FILE] [--json]",
        positionals=False,
    )
    p.add_argument("file", metavar="FILE", help="Source path, archive path, name or SHA1.")
    p.add_argument("--json", action="store_true", help="One JSON document (keys in README).")
    return p


def main(args: list[str], out: TextIO = sys.stdout) -> int:
    ns = parser().parse_args(args)
    key, as_json = str(ns.file), bool(ns.json)
    return guarded(lambda: run(settings_from(ns, ("file", "json")), key, as_json, out))


def spellings(key: str) -> list[str]:
    """The path as given, absolute, and with links resolved (the catalog holds what the
    service was given, which is usually absolute)."""
    return list(dict.fromkeys([key, os.path.abspath(key), os.path.realpath(key)]))


def run(s: Settings, key: str, as_json: bool, out: TextIO) -> int:
    catalog = open_catalog(s)
    try:
        history = catalog.history(key, spellings(key))
    finally:
        catalog.close()
    found = bool(history.events or history.rows)
    if as_json:
        json.dump(document(key, history, s), out, indent=2)
        out.write("\n")
    else:
        out.write(render(key, history) if found else never_seen(key, s))
    return EXIT_OK if found else EXIT_FILES_FAILED


# what each line says -------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    label: str
    text: str


def describe(e: Event) -> Line:
    """An event as a label and a sentence (the events table stores state and reason)."""
    reason = e.reason or ""
    if e.state == "claimed":
        if reason.startswith("took over"):
            return Line("taken over", reason)
        return Line("claimed", reason)
    if e.state == "done":
        if reason.startswith("original replaced by"):
            return Line("tidied", reason)
        if reason.startswith("same content already at"):
            return Line("done", reason)
        sha1 = f", sha1 {e.sha1}" if e.sha1 else ""
        return Line("done", f"archived as {reason}{sha1}" if reason else f"done{sha1}")
    if e.state == "duplicate":
        return Line("duplicate", reason)
    if e.state == "retry":
        return Line("retry", reason)
    return Line(e.state, reason)


def _by_file(history: History) -> dict[str, tuple[list[Event], list[Row]]]:
    """Events and rows per source file, files in the order they first appear."""
    files: dict[str, tuple[list[Event], list[Row]]] = {}
    for e in history.events:
        files.setdefault(e.source_filepath, ([], []))[0].append(e)
    for r in sorted(history.rows, key=lambda r: r.updated_at or r.file_created_at or _EPOCH):
        files.setdefault(r.source_filepath or "?", ([], []))[1].append(r)
    return files


def _row_text(r: Row, with_reason: bool) -> str:
    text = r.state
    if r.filepath:
        # a failed row's path is the archive file that was in the way
        text += f", {'archived as' if r.state == 'done' else 'at'} {q(r.filepath)}"
    text += f", sha1 {r.sha1}"
    if r.packed_size:
        text += f", {mb(r.packed_size)} packed"
    if r.error and r.state != "done" and with_reason:
        text += f": {cut(r.error)}"
    if r.updated_at:
        text += f" ({utc_text(r.updated_at)})"
    return text


def render(key: str, history: History) -> str:
    how = {"sha1": "by SHA1", "path": "by path", "name": "by name"}[history.matched_by]
    files = _by_file(history)
    out = f"{q(key)}: {len(files)} file{'' if len(files) == 1 else 's'} found {how}\n"
    for src, (events, rows) in files.items():
        out += f"\n{q(src)}\n"
        for e in events:
            line = describe(e)
            who = f"{e.host or '?'}:{e.pid if e.pid is not None else '?'}"
            text = f"  {utc_text(e.at)}  {who:<20} {line.label:<{STATE_WIDTH}} {cut(line.text)}"
            out += text.rstrip() + "\n"
        if rows and not events:
            out += "  (no history: recorded before rawtransfer kept one)\n"
        for r in rows:
            out += f"  catalog now: {_row_text(r, with_reason=not events)}\n"
    if history.truncated:
        out += "\n(more history than shown: give a full path or a SHA1)\n"
    return out


def never_seen(key: str, s: Settings) -> str:
    where = f"{catalog_label(s)}, table {s.db_table}"
    if SHA1_RE.match(key.strip().lower()):
        return f"{key}: no file with this SHA1 (packed or raw) in {where}\n"
    from rawtransfer.watch import Matcher

    name = os.path.basename(key.rstrip("/"))
    patterns = " ".join(repr(p) for p in s.patterns)
    out = (
        f"{q(key)}: never seen: no row and no history in {where} (not taken yet: a running "
        "service may hold it in its queue, see raw-transfer status)\n"
    )
    if Matcher(s.patterns)(name):
        out += (
            f"  its name matches --patterns {patterns}: the service takes it once it is "
            "under SOURCE_DIR and has settled\n"
        )
    else:
        hidden = " (a hidden name is never taken)" if name.startswith(".") else ""
        out += f"  its name does not match --patterns {patterns}: never taken{hidden}\n"
    try:
        st = os.stat(key)
    except OSError:
        return out
    age = time.time() - st.st_mtime
    out += f"  it exists here: {mb(st.st_size)}, modified {ago(age)}\n"
    if age > s.backfill_hours * 3600:
        out += (
            f"  older than --backfill-hours {s.backfill_hours:g}: a backfill does not look at "
            f"it (raise --backfill-hours to {age / 3600 + 1:.0f} for a one-off run)\n"
        )
    return out


# --json --------------------------------------------------------------------------------


def document(key: str, history: History, s: Settings) -> dict[str, Any]:
    files = []
    for src, (events, rows) in _by_file(history).items():
        files.append(
            {
                "source": src,
                "events": [
                    {
                        "at": utc_iso(e.at),
                        "host": e.host,
                        "pid": e.pid,
                        "state": e.state,
                        "label": describe(e).label,
                        "reason": e.reason,
                        "sha1": e.sha1,
                    }
                    for e in events
                ],
                "rows": [
                    {
                        "state": r.state,
                        "sha1": r.sha1,
                        "raw_sha1": r.raw_sha1,
                        "archive_path": r.filepath,
                        "reason": r.error,
                        "packed_bytes": r.packed_size,
                        "raw_bytes": r.raw_size,
                        "at": utc_iso(r.updated_at) if r.updated_at else None,
                    }
                    for r in rows
                ],
            }
        )
    return {
        "version": VERSION,
        "key": key,
        "catalog": catalog_label(s),
        "table": s.db_table,
        "found": bool(files),
        "matched_by": history.matched_by if files else None,
        "truncated": history.truncated,
        "files": files,
    }
