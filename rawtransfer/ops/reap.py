"""``raw-transfer reap``: delete (or list, with ``--dry-run``) the local files that are
safely archived, by the same rules as the service's reaping timer (rawtransfer.reap)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from rawtransfer import log as logsetup
from rawtransfer.catalog.base import Owner
from rawtransfer.config import Settings
from rawtransfer.errors import EXIT_OK, ConfigError
from rawtransfer.names import plural, q
from rawtransfer.reap import Reaper


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run", action="store_true", help="List what would be deleted and why; delete nothing."
    )


def run(s: Settings, dry_run: bool, out: TextIO = sys.stdout) -> int:
    from rawtransfer.service import make_catalog, make_destination, make_matcher

    if not s.reaps:
        raise ConfigError("reap needs --reap-after HOURS or --reap-when-disk-above PERCENT")
    logsetup.setup(s.verbose, s.logfile)
    destination = make_destination(s)
    try:
        destination.check()
        catalog = make_catalog(s)
        try:
            reaper = Reaper(s, make_matcher(s), catalog, destination, owner=Owner(host=s.host_id))
            report = reaper(dry_run=dry_run)
        finally:
            catalog.close()
    finally:
        destination.close()
    now = time.time()
    verb = "would delete" if dry_run else "deleted"
    for c, why in report.deleted:
        age = (now - c.age_from) / 3600
        print(f"{verb:12s} {c.size / 1e6:10.1f} MB  {age:7.1f} h  {q(c.path)}  ({why})", file=out)
    for path, why in report.kept:
        print(f"{'kept':12s} {'':>13s}  {'':>9s}  {q(path)}  ({why})", file=out)
    n = len(report.deleted)
    disk = f"; disk {report.disk_percent:.0f}% full" if report.disk_percent is not None else ""
    print(
        f"raw-transfer reap: {verb} {plural(n, 'file')}, {report.freed / 1e6:.1f} MB{disk}",
        file=out,
    )
    return EXIT_OK
