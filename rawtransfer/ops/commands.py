"""Subcommands sharing the service's configuration flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rawtransfer.config import (
    SETTING_NAMES,
    Settings,
    build,
    load_toml,
    validate_metadata_regex,
)
from rawtransfer.errors import RawTransferError


def _db_parser() -> argparse.ArgumentParser:
    from rawtransfer.cli import _add_common, _Parser

    p = _Parser(prog="raw-transfer db", description="Create or upgrade the catalog table.")
    p.add_argument("action", choices=("init", "upgrade"))
    _add_common(p)
    return p


def _retry_parser() -> argparse.ArgumentParser:
    from rawtransfer.cli import _add_common, _Parser
    from rawtransfer.ops import retry

    p = _Parser(
        prog="raw-transfer retry",
        description="Ask for failed files to be tried again (recorded in their history).",
    )
    retry.add_arguments(p)
    _add_common(p)
    return p


def service_parser(
    prog: str, description: str, usage: str | None = None, positionals: bool = True
) -> argparse.ArgumentParser:
    """A subcommand's parser that takes every one of the service's own arguments (an
    operator pastes the unit's command line, or gives --config FILE); those the command
    has no use for are accepted and ignored. ``positionals=False`` leaves SOURCE_DIR and
    DEST out, for a command that takes something else (why FILE)."""
    from rawtransfer.cli import _Parser, build_parser

    parent = build_parser(add_help=False, positionals=positionals)
    return _Parser(prog=prog, description=description, usage=usage, parents=[parent])


def service_settings(ns: argparse.Namespace, own: tuple[str, ...]) -> Settings:
    """Settings from the service's arguments (TOML, then flags), without the command's
    ``own`` options."""
    from rawtransfer.cli import _settings_values

    values, _ = _settings_values(
        argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in own})
    )
    return build(values)


def _reap(args: list[str]) -> int:
    from rawtransfer.ops.reap import add_arguments, run

    p = service_parser(
        "raw-transfer reap",
        "Delete local files whose copies are done and verified, past --reap-after hours or "
        "while the disk is fuller than --reap-when-disk-above; --dry-run lists them.",
    )
    add_arguments(p)
    ns = p.parse_args(args)
    try:
        s = service_settings(ns, ("dry_run",))
        return run(s, dry_run=ns.dry_run)
    except RawTransferError as exc:
        print(f"raw-transfer: error: {exc}", file=sys.stderr)
        return exc.exit_code


def run_subcommand(args: list[str]) -> int:
    name = args[0]
    if name == "audit":
        from rawtransfer.ops import audit

        return audit.main(args[1:])
    if name == "status":
        from rawtransfer.ops import status

        return status.main(args[1:])
    if name == "why":
        from rawtransfer.ops import why

        return why.main(args[1:])
    if name == "reap":
        return _reap(args[1:])
    ns = (_retry_parser() if name == "retry" else _db_parser()).parse_args(args[1:])
    values: dict[str, Any] = {}
    flags = vars(ns)
    if name == "retry":
        files, all_failed = flags.pop("files"), flags.pop("all_failed")
        if "config" in flags:
            values.update(load_toml(flags.pop("config")))
        values.update(flags)
        values = {k: v for k, v in values.items() if k in SETTING_NAMES}
        try:
            return _retry(values, files, all_failed)
        except RawTransferError as exc:
            print(f"raw-transfer: error: {exc}", file=sys.stderr)
            return exc.exit_code
    action = flags.pop("action")
    if "config" in flags:
        values.update(load_toml(flags.pop("config")))
    values.update(flags)
    values = {k: v for k, v in values.items() if k in SETTING_NAMES}
    try:
        return _db(action, values)
    except RawTransferError as exc:
        print(f"raw-transfer: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _retry(values: dict[str, Any], files: list[str], all_failed: bool) -> int:
    from rawtransfer.config import Settings
    from rawtransfer.ops import retry
    from rawtransfer.service import make_catalog

    validate_metadata_regex(values.get("metadata_regex"))
    if values.get("state_dir") is not None:
        values["state_dir"] = Path(str(values["state_dir"])).expanduser()
    s = Settings(source_dir=Path("."), dest=None, **values)  # type: ignore[arg-type]
    catalog = make_catalog(s)
    try:
        return retry.retry(catalog, files, all_failed)
    finally:
        catalog.close()


def _db(action: str, values: dict[str, Any]) -> int:
    from rawtransfer.catalog.sqlite import SqliteCatalog
    from rawtransfer.config import IDENTIFIER_RE, Settings
    from rawtransfer.errors import ConfigError

    validate_metadata_regex(values.get("metadata_regex"))
    table = values.get("db_table", "rawtransfer")
    if values.get("state_dir") is not None:
        values["state_dir"] = Path(str(values["state_dir"])).expanduser()
    if not IDENTIFIER_RE.match(table):
        raise ConfigError(f"--db-table {table!r} is not a lower-case SQL identifier")
    s = Settings(source_dir=Path("."), dest=None, **values)  # type: ignore[arg-type]
    if s.uses_postgres:
        from rawtransfer.catalog import postgres

        run = postgres.init_schema if action == "init" else postgres.upgrade_schema
        print(f"raw-transfer: {run(postgres.PgTarget.from_settings(s), table, s.metadata_columns)}")
        return 0
    cat = SqliteCatalog(s.state_dir / "catalog.sqlite3", s.db_table, s.metadata_columns)
    cat.close()
    where = s.state_dir / "catalog.sqlite3"
    print(f"raw-transfer: catalog {where} table {s.db_table} is ready ({action})")
    return 0
