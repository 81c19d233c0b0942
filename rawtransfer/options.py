"""The command line's options, declared once: the service's parser, and the parent that
every subcommand taking the service's own arguments builds on (so that an operator can
paste the unit's command line, or give --config FILE), and the merge of a TOML file with
the flags. ``cli`` runs the service; ``ops`` runs the operators' commands; both import
from here, and neither from the other.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rawtransfer import __version__
from rawtransfer.config import Settings, build, load_toml
from rawtransfer.errors import EXIT_USAGE

HELP_EPILOG = """\
Every flag may also be set in the TOML file given with --config, using the flag's name
(dashes or underscores); flags override the file. Secrets come from the environment:
RAWTRANSFER_SLACK_WEBHOOK_URL (or RAWTRANSFER_SLACK_WEBHOOK_URL_FILE), and the database
password from ~/.pgpass or PGPASSWORD. A source directory named like a subcommand
(status, audit, why, db, retry, reap) is given as ./status.

exit codes: 0 all done; 1 some files failed or were quarantined; 2 usage or configuration
error; 3 destination or catalog unreachable at start; 128+N on signal N.
"""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one clear line, then the usual exit code 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """A byte count such as 2000000, 512M or 4G (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M or 4G") from None


def add_common(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument("--config", type=Path, default=S, help="TOML file with any of these settings.")
    p.add_argument(
        "--state-dir",
        default=S,
        metavar="DIR",
        help="Where the embedded catalog and the packing spool live "
        "(default $XDG_STATE_HOME/rawtransfer).",
    )
    p.add_argument(
        "--metadata-regex",
        default=S,
        metavar="RE",
        help="Regex matched against file names; its named groups fill catalog "
        "columns of the same names (lower-case SQL identifiers).",
    )
    p.add_argument("--db-host", default=S, metavar="H", help="PostgreSQL catalog host.")
    p.add_argument(
        "--db-user",
        default=S,
        metavar="U",
        help="PostgreSQL user (password from ~/.pgpass or PGPASSWORD).",
    )
    p.add_argument("--db-name", default=S, metavar="N", help="PostgreSQL database name.")
    p.add_argument(
        "--db-port", type=int, default=S, metavar="PORT", help="PostgreSQL port (default 5432)."
    )
    p.add_argument(
        "--db-table",
        default=S,
        metavar="T",
        help="Catalog table name (a lower-case SQL identifier).",
    )
    p.add_argument(
        "--db-dsn",
        default=S,
        metavar="DSN",
        help="A libpq connection string instead of the --db-* flags (no password in it).",
    )
    p.add_argument("--verbose", action="store_true", default=S, help="Debug logging.")
    p.add_argument(
        "--logfile",
        default=S,
        metavar="PATH",
        help="Log to this file as well as to standard error.",
    )


# The service and every subcommand, as `raw-transfer --help` (and a bare `raw-transfer`)
# shows them; each subcommand's own --help has the details.
USAGE = """\
raw-transfer SOURCE_DIR DEST [options]           watch and transfer (or --backfill-only)
       raw-transfer status [SOURCE_DIR DEST] [options] [--json]
       raw-transfer audit SOURCE_DIR DEST [options] [--since DATE] [--deep] [--repair] [--json]
       raw-transfer why FILE [options] [--json]
       raw-transfer retry FILE... | --all-failed [options]
       raw-transfer reap SOURCE_DIR DEST [options] [--dry-run]
       raw-transfer db init|upgrade [options]
       (options: the service's own; --config FILE gives them all)"""


def build_parser(add_help: bool = True, positionals: bool = True) -> argparse.ArgumentParser:
    """The service's parser; with ``add_help=False``, a parent for the subcommands that
    take the service's own arguments (so that the unit's command line can be pasted);
    ``positionals=False`` leaves SOURCE_DIR and DEST out (``why`` takes a FILE instead)."""
    S = argparse.SUPPRESS
    p = Parser(
        prog="raw-transfer",
        description="Move raw FITS frames from SOURCE_DIR into a YYYY/MM/DD archive at DEST: "
        "checked, packed losslessly with fpack, claimed by SHA1 in a catalog, copied "
        "atomically and verified at the destination.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
        usage=USAGE if add_help else None,
    )
    if positionals:
        p.add_argument(
            "source_dir",
            nargs="?",
            default=S,
            metavar="SOURCE_DIR",
            help="The directory watched, recursively.",
        )
        p.add_argument(
            "dest",
            nargs="?",
            default=S,
            metavar="DEST",
            help="user@host:/path, host:/path (an ssh alias) or a local /path.",
        )
    if add_help:
        p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_common(p)
    p.add_argument(
        "--patterns",
        nargs="+",
        default=S,
        metavar="GLOB",
        help="File names to take, glob-style (default '*.fits').",
    )
    p.add_argument(
        "--header-card",
        default=S,
        metavar="NAME",
        help="FITS header card whose date places the file (default DATE-OBS).",
    )
    p.add_argument(
        "--copy-timeout",
        type=float,
        default=S,
        metavar="S",
        help="Seconds one copy may take before it is abandoned and retried (default 60).",
    )
    p.add_argument(
        "--workers", type=int, default=S, metavar="N", help="Worker threads (default 4)."
    )
    p.add_argument(
        "--ssh-controlmaster",
        action="store_true",
        default=S,
        help="Accepted for upstream's unit files: SSH connections are always kept, one per "
        "worker, rebuilt when lost.",
    )
    p.add_argument(
        "--known-hosts",
        default=S,
        metavar="FILE",
        help="known_hosts file for the destination's host key (default the user's).",
    )
    p.add_argument(
        "--ssh-config",
        default=S,
        metavar="FILE",
        help="ssh_config file for host aliases, users, ports and keys (default ~/.ssh/config).",
    )
    p.add_argument(
        "--remote-file-mode",
        default=S,
        metavar="MODE",
        help="Octal mode of archived files (default 0640).",
    )
    p.add_argument(
        "--remote-dir-mode",
        default=S,
        metavar="MODE",
        help="Octal mode of the YYYY/MM/DD directories created (default 0750).",
    )
    p.add_argument(
        "--canary-interval",
        type=float,
        default=S,
        metavar="S",
        help="Seconds between checks that destination and catalog are reachable.",
    )
    p.add_argument(
        "--backfill-interval",
        type=float,
        default=S,
        metavar="S",
        help="Seconds between scans for files that were missed.",
    )
    p.add_argument(
        "--backfill-hours",
        type=float,
        default=S,
        metavar="H",
        help="How far back (file mtime) a backfill looks (default 12).",
    )
    p.add_argument(
        "--backfill-recency-window",
        type=float,
        default=S,
        metavar="S",
        help="Files younger than this are left to the watcher (not with --backfill-only).",
    )
    p.add_argument(
        "--overwrite-unpacked-interval",
        type=float,
        default=S,
        metavar="S",
        help="Seconds between passes replacing verified originals by their .fz.",
    )
    p.add_argument(
        "--overwrite-unpacked-hours",
        type=float,
        default=S,
        metavar="H",
        help="How far back that pass looks.",
    )
    p.add_argument(
        "--overwrite-unpacked-recency-window",
        type=float,
        default=S,
        metavar="S",
        help="Originals younger than this are kept.",
    )
    p.add_argument(
        "--keep-source",
        action="store_true",
        default=S,
        help="Never replace or delete local originals.",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=S,
        metavar="PATTERN",
        help="rsync-style rule on paths relative to SOURCE_DIR (globs, '**', a trailing / for "
        "directories); excluded files are never taken. Repeatable.",
    )
    p.add_argument(
        "--exclude-from",
        default=S,
        metavar="FILE",
        help="Exclude rules, one per line ('#' starts a comment).",
    )
    p.add_argument(
        "--reap-after",
        type=float,
        default=S,
        metavar="HOURS",
        help="Delete local files (the .fz left by tidying, or originals with --keep-source) "
        "whose copy is done and verified, once older than HOURS.",
    )
    p.add_argument(
        "--reap-when-disk-above",
        type=float,
        default=S,
        metavar="PERCENT",
        help="When the source disk is fuller than PERCENT, delete such files oldest first "
        "until it is not (still only verified ones).",
    )
    p.add_argument(
        "--reap-verify-remote",
        action="store_true",
        default=S,
        help="Check the archive copy's SHA1 again just before deleting a local file.",
    )
    p.add_argument(
        "--max-frame-bytes",
        type=_size,
        default=S,
        metavar="N",
        help="Quarantine a frame whose data would take more than N bytes once decompressed, "
        "before decompressing it; suffixes K, M, G (default 1G).",
    )
    p.add_argument(
        "--patience",
        type=float,
        default=S,
        metavar="S",
        help="Seconds a file's size and mtime must be unchanged before it is taken (default 5).",
    )
    p.add_argument(
        "--polling",
        action="store_true",
        default=S,
        help="Poll the source instead of inotify (for network filesystems).",
    )
    p.add_argument(
        "--slack-webhook-url",
        default=S,
        metavar="URL",
        help="Slack webhook for alerts (better: RAWTRANSFER_SLACK_WEBHOOK_URL).",
    )
    p.add_argument(
        "--alert-after",
        type=float,
        default=S,
        metavar="S",
        help="Alert when the destination or catalog has been down this long (default 300).",
    )
    p.add_argument(
        "--alert-interval",
        type=float,
        default=S,
        metavar="S",
        help="At most one Slack message per kind of alert per this many seconds (default 300).",
    )
    p.add_argument(
        "--alert-backlog",
        type=float,
        default=S,
        metavar="S",
        help="Alert when the oldest file not yet done has waited this long (default 3600).",
    )
    p.add_argument(
        "--stop-grace",
        type=float,
        default=S,
        metavar="S",
        help="On SIGTERM, files in flight get this long to finish before they are abandoned "
        "cleanly (default 30).",
    )
    p.add_argument(
        "--backfill-only",
        action="store_true",
        default=S,
        help="One catch-up pass over --backfill-hours, a summary, then exit.",
    )
    p.add_argument(
        "--host-id",
        default=S,
        metavar="NAME",
        help="This host's name in catalog claims (default the host name).",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=S,
        metavar="N",
        help="Serve Prometheus metrics at http://127.0.0.1:N/metrics (default off).",
    )
    p.add_argument(
        "--metrics-textfile",
        default=S,
        metavar="PATH",
        help="Write Prometheus metrics to PATH (*.prom, for node-exporter's textfile "
        "collector), replaced atomically every few seconds (default off).",
    )
    return p


def settings_values(ns: argparse.Namespace) -> tuple[dict[str, Any], frozenset[str]]:
    flags = vars(ns)
    values: dict[str, Any] = {}
    if "config" in flags:
        values.update(load_toml(flags.pop("config")))
    values.update(flags)
    return values, frozenset(values)


def service_parser(
    prog: str, description: str, usage: str | None = None, positionals: bool = True
) -> argparse.ArgumentParser:
    """A subcommand's parser that takes every one of the service's own arguments (an
    operator pastes the unit's command line, or gives --config FILE); those the command
    has no use for are accepted and ignored. ``positionals=False`` leaves SOURCE_DIR and
    DEST out, for a command that takes something else (why FILE)."""
    parent = build_parser(add_help=False, positionals=positionals)
    return Parser(prog=prog, description=description, usage=usage, parents=[parent])


def service_settings(ns: argparse.Namespace, own: tuple[str, ...]) -> Settings:
    """Settings from the service's arguments (TOML, then flags), without the command's
    ``own`` options."""
    values, _ = settings_values(
        argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in own})
    )
    return build(values)
