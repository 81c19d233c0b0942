"""What ``status`` and ``why`` share: settings from the service's own arguments, and the
catalog opened to be read (never created by a mistyped ``--state-dir`` or table)."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable

from rawtransfer.catalog.base import Catalog
from rawtransfer.config import Settings, build
from rawtransfer.errors import ConfigError, RawTransferError


def settings_from(ns: argparse.Namespace, own: tuple[str, ...]) -> Settings:
    """The service's settings from its arguments (TOML, then flags), leaving out the
    command's ``own`` options. SOURCE_DIR and DEST may be absent: neither command needs
    them, and every other flag is checked as the service would check it."""
    from rawtransfer.options import settings_values

    values, _ = settings_values(
        argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in own})
    )
    for name in ("source_dir", "dest"):
        if not values.get(name):
            values[name] = "."
    return build(values)


def _check_sqlite(s: Settings) -> None:
    path = s.state_dir / "catalog.sqlite3"
    if not path.is_file():
        raise ConfigError(
            f"no catalog at {path}: give the service's --state-dir (or its --config FILE), "
            "or its --db-* flags for PostgreSQL"
        )
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = [
                r[0]
                for r in con.execute("select name from sqlite_master where type = 'table'")
                if not r[0].startswith("sqlite_") and not r[0].endswith("_events")
            ]
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"catalog {path}: {exc}") from None
    if s.db_table not in tables:
        raise ConfigError(
            f"catalog {path} has no table {s.db_table} (it has: {', '.join(tables) or 'none'}); "
            "give the service's --db-table"
        )


def open_catalog(s: Settings) -> Catalog:
    if s.uses_postgres:
        from rawtransfer.catalog.pg_connect import PgTarget
        from rawtransfer.catalog.postgres import PostgresCatalog

        return PostgresCatalog(
            PgTarget.from_settings(s), s.db_table, s.metadata_columns, pool_size=1
        )
    from rawtransfer.catalog.sqlite import SqliteCatalog

    _check_sqlite(s)
    return SqliteCatalog(s.state_dir / "catalog.sqlite3", s.db_table, s.metadata_columns)


def guarded(run: Callable[[], int]) -> int:
    """Run a command; a RawTransferError is one line on stderr and its exit code."""
    try:
        return run()
    except RawTransferError as exc:
        print(f"raw-transfer: error: {exc}", file=sys.stderr)
        return exc.exit_code
