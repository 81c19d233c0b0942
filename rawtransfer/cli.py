"""The one place that parses arguments and maps errors to exit codes.

    raw-transfer SOURCE_DIR DEST [flags]        the service (or --backfill-only)
    raw-transfer db init|upgrade [flags]        create or upgrade the catalog table
    raw-transfer status|audit|why FILE          operators' commands

Exit codes: 0 all done; 1 some files failed or were quarantined; 2 usage or configuration
error; 3 a required resource unreachable at start; 128+N on signal N.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from rawtransfer import log as logsetup
from rawtransfer.config import build
from rawtransfer.errors import EXIT_USAGE, RawTransferError
from rawtransfer.options import build_parser, settings_values

log = logging.getLogger("rawtransfer")

SUBCOMMANDS = ("status", "audit", "why", "db", "retry", "reap")


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"raw-transfer: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # the usage, not only an error
        build_parser().print_usage(sys.stderr)
        return EXIT_USAGE
    if args and args[0] in SUBCOMMANDS:
        from rawtransfer.ops.commands import run_subcommand

        return run_subcommand(args)
    ns = build_parser().parse_args(args)
    try:
        values, explicit = settings_values(ns)
        settings = build(values)
        logsetup.setup(settings.verbose, settings.logfile)
        from rawtransfer.service import Service

        return Service(settings, explicit).run()
    except RawTransferError as exc:
        log.debug("stopping on %r", exc)
        return _fail(str(exc), exc.exit_code)
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
