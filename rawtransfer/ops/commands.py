"""Subcommands sharing the service's configuration flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rawtransfer.config import (
    SETTING_NAMES,
    Settings,
    load_toml,
    validate_metadata_regex,
)
from rawtransfer.errors import RawTransferError


def _db_parser() -> argparse.ArgumentParser:
    from rawtransfer.options import Parser, add_common

    p = Parser(prog="raw-transfer db", description="Create or upgrade the catalog table.")
    p.add_argument("action", choices=("init", "upgrade"))
    add_common(p)
    return p


def _retry_parser() -> argparse.ArgumentParser:
    from rawtransfer.ops import retry
    from rawtransfer.options import Parser, add_common

    p = Parser(
        prog="raw-transfer retry",
        description="Ask for failed files to be tried again (recorded in their history).",
    )
    retry.add_arguments(p)
    add_common(p)
    return p


def _reap(args: list[str]) -> int:
    from rawtransfer.ops.reap import add_arguments, run
    from rawtransfer.options import service_parser, service_settings

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
    from rawtransfer.catalog.base import IDENTIFIER_RE
    from rawtransfer.catalog.sqlite import SqliteCatalog
    from rawtransfer.errors import ConfigError

    validate_metadata_regex(values.get("metadata_regex"))
    table = values.get("db_table", "rawtransfer")
    if values.get("state_dir") is not None:
        values["state_dir"] = Path(str(values["state_dir"])).expanduser()
    if not IDENTIFIER_RE.match(table):
        raise ConfigError(f"--db-table {table!r} is not a lower-case SQL identifier")
    s = Settings(source_dir=Path("."), dest=None, **values)  # type: ignore[arg-type]
    if s.uses_postgres:
        from rawtransfer.catalog.pg_connect import PgTarget
        from rawtransfer.catalog.pg_schema import init_schema, upgrade_schema

        run = init_schema if action == "init" else upgrade_schema
        print(f"raw-transfer: {run(PgTarget.from_settings(s), table, s.metadata_columns)}")
        return 0
    cat = SqliteCatalog(s.state_dir / "catalog.sqlite3", s.db_table, s.metadata_columns)
    cat.close()
    where = s.state_dir / "catalog.sqlite3"
    print(f"raw-transfer: catalog {where} table {s.db_table} is ready ({action})")
    return 0
