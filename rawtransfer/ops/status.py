"""``raw-transfer status``: what the catalog holds and what the running watchers do.

From the catalog (index range scans only, so that a catalog of millions of rows answers
at once): rows per state, the files in flight, the oldest file not yet done, the last
file done, what was done in the last hour, the latest failures and quarantines. From the
live figures that each watcher publishes in its state directory (``live.py``): queue
depth, files in flight, paused or not and why, since when. ``--json`` prints the same
as one JSON document whose keys are stable (README, "raw-transfer status").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timedelta
from typing import Any, TextIO

from rawtransfer.catalog.base import CatalogStatus, Owner, Row, utcnow
from rawtransfer.config import Settings
from rawtransfer.errors import EXIT_OK
from rawtransfer.live import Live, catalog_label, read_live
from rawtransfer.names import cut, plural, q
from rawtransfer.ops.observe import guarded, open_catalog, settings_from
from rawtransfer.units import ago, duration, epoch_iso, mb, utc_iso, utc_text

# The format of --json; a change that breaks a reader gets a new number.
VERSION = 1
# Always shown, in this order (other states an old table may hold follow).
STATES = ("done", "failed", "quarantined", "claimed", "released")
# How many recent failures and quarantines, and how many files in flight, are listed.
RECENT = 5
IN_FLIGHT = 20
# The throughput window.
WINDOW = timedelta(hours=1)
LABEL_WIDTH = 20


def parser() -> argparse.ArgumentParser:
    from rawtransfer.options import service_parser

    p = service_parser(
        "raw-transfer status",
        "What the catalog holds and what the running service does. Takes the service's own "
        "arguments (paste the unit's command line, or give --config FILE); only the catalog "
        "flags, --state-dir and --host-id matter.",
        usage="%(prog)s [SOURCE_DIR DEST] [the service's flags, or --config FILE] [--json]",
    )
    p.add_argument("--json", action="store_true", help="One JSON document (keys in README).")
    return p


def main(args: list[str], out: TextIO = sys.stdout) -> int:
    ns = parser().parse_args(args)
    as_json = bool(ns.json)
    return guarded(lambda: run(settings_from(ns, ("json",)), as_json, out))


def run(s: Settings, as_json: bool, out: TextIO) -> int:
    catalog = open_catalog(s)
    try:
        started = time.monotonic()
        now = utcnow()
        figures = catalog.status(now - WINDOW, RECENT, IN_FLIGHT)
        took = time.monotonic() - started
    finally:
        catalog.close()
    label = catalog_label(s)
    lives = read_live(s.state_dir, s.db_table, Owner(host=s.host_id), time.time())
    doc = document(figures, lives, label, s.db_table, now)
    doc["query_seconds"] = round(took, 3)
    if as_json:
        json.dump(doc, out, indent=2, sort_keys=False)
        out.write("\n")
    else:
        out.write(render(doc, s))
    return EXIT_OK


# the document --------------------------------------------------------------------------


def _iso(at: datetime | None) -> str | None:
    return utc_iso(at) if at is not None else None


def _row(r: Row | None, now: datetime) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "file": r.source_filepath,
        "state": r.state,
        "sha1": r.sha1,
        "archive_path": r.filepath,
        "reason": r.error,
        "at": _iso(r.updated_at),
        "seconds_ago": round((now - r.updated_at).total_seconds(), 1) if r.updated_at else None,
        "file_time": _iso(r.file_created_at),
        "claimed_by": r.claimed_by,
        "claimed_at": _iso(r.claimed_at),
        "packed_bytes": r.packed_size,
        "raw_bytes": r.raw_size,
    }


def _process(live: Live) -> dict[str, Any]:
    f = live.figures
    since = f.get("paused_since")
    return {
        "host": f["host"],
        "pid": f["pid"],
        "running": live.running,
        "problem": live.problem,
        "catalog": f.get("catalog"),
        "started": epoch_iso(float(f["started"])),
        "updated": epoch_iso(float(f["updated"])),
        "source_dir": f.get("source_dir"),
        "dest": f.get("dest"),
        "queued": f.get("queued"),
        "in_flight": f.get("in_flight"),
        "paused": f.get("paused"),
        "paused_reasons": f.get("paused_reasons", []),
        "paused_since": epoch_iso(float(since)) if since is not None else None,
        "source_problem": f.get("source_problem"),
        "done": f.get("done"),
        "failed": f.get("failed"),
        "quarantined": f.get("quarantined"),
        "duplicates": f.get("duplicates"),
        "oldest_waiting": f.get("oldest_waiting"),
        "last_done": f.get("last_done"),
        "excluded": f.get("excluded", 0),
    }


def document(
    figures: CatalogStatus, lives: list[Live], label: str, table: str, now: datetime
) -> dict[str, Any]:
    """The status as one JSON-ready document (the keys are documented in README)."""
    counts = {state: int(figures.counts.get(state, 0)) for state in STATES}
    counts.update((k, int(v)) for k, v in sorted(figures.counts.items()) if k not in counts)
    running = [x for x in lives if x.running]
    paused = any(x.figures.get("paused") for x in running) if running else None
    reasons = sorted({r for x in running for r in x.figures.get("paused_reasons", [])})
    return {
        "version": VERSION,
        "generated_at": utc_iso(now),
        "catalog": label,
        "table": table,
        "counts": counts,
        "in_flight": [_row(r, now) for r in figures.claimed],
        "oldest_not_done": _row(figures.oldest_waiting, now),
        "last_done": _row(figures.last_done, now),
        "last_hour": {
            "files": figures.window_files,
            "packed_bytes": figures.window_packed_bytes,
            "raw_bytes": figures.window_raw_bytes,
        },
        "recent_failures": [_row(r, now) for r in figures.failed],
        "recent_quarantines": [_row(r, now) for r in figures.quarantined],
        "service": {
            "running": bool(running),
            "paused": paused,
            "paused_reasons": reasons,
            "processes": [_process(x) for x in lives],
        },
    }


# text for people -----------------------------------------------------------------------


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).replace(tzinfo=None)


def _line(label: str, text: str) -> str:
    return f"{label:<{LABEL_WIDTH}}{text}\n"


def _age(row: dict[str, Any], key: str, now: datetime) -> str:
    at = row.get(key)
    return ago((now - _when(at)).total_seconds()) if at else "at an unknown time"


def _since(iso: str | None, now: datetime) -> str:
    if iso is None:
        return ""
    return f" since {utc_text(_when(iso))} ({duration((now - _when(iso)).total_seconds())})"


def _file(row: dict[str, Any], key: str = "file") -> str:
    return q(row[key]) if row.get(key) else "?"


def render(doc: dict[str, Any], s: Settings) -> str:
    """The document as aligned plain text."""
    now = _when(doc["generated_at"])
    c = doc["counts"]
    parts = [f"{c['done']:,} done", f"{c['failed']:,} failed", f"{c['quarantined']:,} quarantined"]
    parts += [f"{c['claimed']:,} claimed (in flight)", f"{c['released']:,} released"]
    parts += [f"{v:,} {k}" for k, v in c.items() if k not in STATES]
    out = _line("catalog", f"{doc['catalog']}, table {doc['table']}")
    out += _line("files", ", ".join(parts))

    last = doc["last_done"]
    done = f"{_file(last)}, {_age(last, 'at', now)} -> {_file(last, 'archive_path')}"
    out += _line("last done", done if last else "none yet")
    hour = doc["last_hour"]
    out += _line(
        "last hour",
        f"{plural(hour['files'], 'file')} done, {mb(hour['packed_bytes'])} packed "
        f"({mb(hour['raw_bytes'])} raw)",
    )
    old = doc["oldest_not_done"]
    waiting = (
        [f"{_file(old)} ({old['state']}), written {_age(old, 'file_time', now)}"] if old else []
    )
    for p in doc["service"]["processes"]:  # files queued, not yet claimed
        if p["running"] and p["oldest_waiting"]:
            o = p["oldest_waiting"]
            waiting.append(
                f"{q(o['file'])}, waiting {duration(o['seconds'])} in the queue of "
                f"{p['host']}:{p['pid']}"
            )
    out += _line("oldest not done", "; ".join(waiting) or "none (nothing claimed or queued)")

    flying = doc["in_flight"]
    out += "" if flying else _line("in flight", "none")
    for i, r in enumerate(flying):
        text = f"{_file(r)}, claimed by {r['claimed_by'] or '?'} {_age(r, 'claimed_at', now)}"
        out += _line("in flight" if i == 0 else "", text)
    if c["claimed"] > len(flying):
        out += _line("", f"... and {c['claimed'] - len(flying):,} more")

    out += _service(doc["service"], now, s, doc["catalog"])

    for key, title in (("recent_failures", "failed"), ("recent_quarantines", "quarantined")):
        rows = doc[key]
        out += _line(f"recent {title}", "" if rows else "none").rstrip() + "\n"
        for r in rows:
            at = utc_text(_when(r["at"])) if r["at"] else "?"
            out += f"  {at}  {_age(r, 'at', now):<18}{_file(r)}: {cut(r['reason'] or '')}\n"
    return out


def _service(svc: dict[str, Any], now: datetime, s: Settings, doc_catalog: str) -> str:
    procs = svc["processes"]
    if not procs:
        where = s.state_dir / "live"
        return _line("service", f"not running (no live figures in {where}); paused: unknown")
    out = ""
    for p in procs:
        who = f"{p['host']}:{p['pid']}"
        if not p["running"]:
            out += _line("service", f"{who} NOT RUNNING: {p['problem']}")
            continue
        out += _line(
            "service",
            f"{who} running{_since(p['started'], now)}; figures of {_age(p, 'updated', now)}",
        )
        out += _line("  watching", f"{_file(p, 'source_dir')} -> {p['dest']}")
        if p["catalog"] != doc_catalog:
            out += _line("  catalog", str(p["catalog"]))
        out += _line("  queue", f"{p['queued']} queued, {p['in_flight']} in flight")
        if p["excluded"]:
            out += _line("  excluded", f"{plural(p['excluded'], 'file')} kept out by --exclude")
        if p["paused"]:
            why = ", ".join(p["paused_reasons"]) or "resources away"
            out += _line("  paused", f"YES{_since(p['paused_since'], now)}: {why}")
        else:
            out += _line("  paused", "no")
        if p["source_problem"]:
            out += _line("  source", p["source_problem"])
        oldest = p["oldest_waiting"]
        if oldest:
            waited = duration(oldest["seconds"])
            out += _line("  oldest waiting", f"{q(oldest['file'])}, for {waited}")
        last = f"; last done {p['last_done']}" if p["last_done"] else ""
        out += _line(
            "  since start",
            f"{p['done']} done, {p['failed']} failed, {p['quarantined']} quarantined, "
            f"{plural(p['duplicates'], 'duplicate')}{last}",
        )
    return out
