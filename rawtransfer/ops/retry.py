"""``raw-transfer retry``: an operator asks for failed files to be tried again.

A retry is a line in the file's history (state ``retry``, with who asked); since the
path's latest word is then no longer terminal, the service's next backfill (or the next
``--backfill-only`` run) takes the file again. Quarantined files are the file's own
fault: they are retried only when the file itself changes, never on request.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from datetime import datetime
from typing import Any

from rawtransfer.catalog.base import Catalog, Owner, State
from rawtransfer.errors import EXIT_FILES_FAILED, EXIT_OK
from rawtransfer.names import plural, q


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="FILE", help="Source paths of failed files.")
    p.add_argument(
        "--all-failed", action="store_true", help="Every file whose latest outcome is failed."
    )


def _candidates(path: str) -> list[str]:
    """The path as given and as an absolute path (the catalog has what the service had)."""
    out = [path]
    absolute = os.path.abspath(path)
    if absolute != path:
        out.append(absolute)
    return out


def retry(catalog: Catalog, files: list[str], all_failed: bool, out: Any = sys.stdout) -> int:
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    owner = Owner()
    asked = 0
    refused = 0
    targets: list[str] = []
    if all_failed:
        handled = catalog.handled_sources(datetime(1970, 1, 1))
        targets += sorted(p for p, h in handled.items() if h.state == State.FAILED)
    for f in files:
        for cand in _candidates(f):
            h = catalog.handled(cand)
            if h is None:
                continue
            if h.state == State.QUARANTINED:
                print(
                    f"{q(cand)}: quarantined: it is taken again by itself once the file "
                    "changes (repaired or replaced), never on request",
                    file=out,
                )
                refused += 1
            elif h.state == State.FAILED:
                targets.append(cand)
            else:
                print(f"{q(cand)}: {h.state}, nothing to retry", file=out)
            break
        else:
            print(f"{q(f)}: no record of this file has failed", file=out)
            refused += 1
    for path in dict.fromkeys(targets):
        catalog.record_event(None, path, State.RETRY, f"retry asked by {who}", owner)
        print(f"{q(path)}: retry recorded; the next backfill takes it again", file=out)
        asked += 1
    if not files and not all_failed:
        print("nothing to do: name files, or give --all-failed", file=out)
        return EXIT_FILES_FAILED
    print(f"raw-transfer retry: {plural(asked, 'file')} to be taken again", file=out)
    return EXIT_OK if not refused else EXIT_FILES_FAILED
