"""The catalog table's DDL: ``raw-transfer db init`` and ``db upgrade``.

Run by an operator, never by the service: the service needs only SELECT, INSERT and
UPDATE on the table (``postgres.py`` checks at start that the columns are there). The
upstream table (SPEC.md) keeps its rows; ``upgrade_schema`` adds rawtransfer's columns,
its indexes and the events table, all in one transaction.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from rawtransfer.catalog.base import EXTRA_COLUMNS, UPSTREAM_COLUMNS, identifier
from rawtransfer.catalog.pg_connect import Conn, PgTarget, connect, cut, describe_error
from rawtransfer.deadlines import Deadlines
from rawtransfer.errors import CatalogUnavailable, ConfigError

# Schema changes: CREATE INDEX on a large upstream table can take minutes; an ALTER TABLE
# waiting for the table lock blocks every other user of the table, so it gives up soon.
SCHEMA_DEADLINE = 1800.0
SCHEMA_LOCK_TIMEOUT_MS = 10_000

# Metadata columns created by rawtransfer have no declared type upstream could tell us;
# text holds every value a regex group yields (integers are cast on assignment), while
# an existing upstream table keeps its own smallint/int columns.
METADATA_TYPE = "text"

# The last component of a source path, as an indexable (immutable) expression.
NAME_EXPR = "regexp_replace(source_filepath, '^.*/', '')"


def sql_name(name: str) -> sql.Identifier:
    """A table or column name, checked by ``identifier``, as a quoted SQL identifier."""
    return sql.Identifier(identifier(name))


def _indexes(conn: Conn, table: str) -> set[str]:
    """The names of the indexes on ``table`` and on its events table."""
    rows = conn.execute(
        "select indexrelid::regclass::text from pg_index "
        "where indrelid in (to_regclass(quote_ident(%s)), to_regclass(quote_ident(%s)))",
        (table, f"{table}_events"),
    ).fetchall()
    return {r[0] for r in rows}


def table_columns(conn: Conn, table: str) -> set[str] | None:
    """The columns of ``table`` as the search path resolves it, or None if it is absent."""
    row = conn.execute("select to_regclass(quote_ident(%s))::oid", (table,)).fetchone()
    if row is None or row[0] is None:
        return None
    rows = conn.execute(
        "select attname from pg_attribute where attrelid = %s and attnum > 0 and not attisdropped",
        (row[0],),
    ).fetchall()
    return {r[0] for r in rows}


def _schema_statements(
    table: str, metadata_columns: tuple[str, ...], create: bool
) -> list[sql.Composed]:
    t = sql_name(table)
    ev = sql_name(f"{table}_events")
    meta = [(c, METADATA_TYPE) for c in metadata_columns]
    for c, _ in meta:
        sql_name(c)
    out: list[sql.Composed] = []
    if create:
        # the upstream DDL (SPEC.md), then the metadata and the extra columns
        cols = [*UPSTREAM_COLUMNS, *meta, ("created_at", "timestamp default now() not null")]
        cols += list(EXTRA_COLUMNS)
        out.append(
            sql.SQL("create table if not exists {t} ({cols})").format(
                t=t,
                cols=sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(ddl)) for c, ddl in cols
                ),
            )
        )
    # On an existing (upstream) table: a constant default makes ADD COLUMN a catalog-only
    # change in PostgreSQL 11+, and state defaults to 'done', which is what upstream rows are.
    for c, ddl in (*meta, *EXTRA_COLUMNS):
        out.append(
            sql.SQL("alter table {t} add column if not exists {c} {ddl}").format(
                t=t, c=sql.Identifier(c), ddl=sql.SQL(ddl)
            )
        )
    out += [
        sql.SQL("create index if not exists {i} on {t} (source_filepath)").format(
            i=sql_name(f"{table}_source_idx"), t=t
        ),
        sql.SQL("create index if not exists {i} on {t} (state, updated_at)").format(
            i=sql_name(f"{table}_state_idx"), t=t
        ),
        sql.SQL(
            "create table if not exists {ev} ("
            "id bigint generated always as identity primary key, "
            "at timestamp not null, sha1_hash varchar(40), source_filepath text not null, "
            "state text not null, host text, pid integer, reason text, identity text)"
        ).format(ev=ev),
        sql.SQL("alter table {ev} add column if not exists identity text").format(ev=ev),
        sql.SQL("create index if not exists {i} on {ev} (source_filepath, id)").format(
            i=sql_name(f"{table}_events_source_idx"), ev=ev
        ),
        sql.SQL("create index if not exists {i} on {ev} (at)").format(
            i=sql_name(f"{table}_events_at_idx"), ev=ev
        ),
        # for the operators' status and why (look-ups by content, archive path and name)
        *(
            sql.SQL("create index if not exists {i} on {t} ({e})").format(
                i=sql_name(f"{table}_{suffix}"), t=on, e=sql.SQL(expr)
            )
            for suffix, on, expr in (
                ("raw_sha1_idx", t, "raw_sha1"),
                ("filepath_idx", t, "filepath"),
                ("name_idx", t, NAME_EXPR),
                ("events_sha1_idx", ev, "sha1_hash"),
                ("events_name_idx", ev, NAME_EXPR),
            )
        ),
    ]
    return out


def _apply(target: PgTarget, table: str, metadata_columns: tuple[str, ...], init: bool) -> str:
    statements = _schema_statements(table, metadata_columns, create=init)  # validates names
    deadlines = Deadlines("schema-deadline")
    try:
        conn = connect(target)
        try:
            with deadlines.watch(SCHEMA_DEADLINE, cut(conn)) as g:
                try:
                    before = table_columns(conn, table)
                    if before is None and not init:
                        raise ConfigError(
                            f"{target.description}: table {table} does not exist; "
                            "create it with: raw-transfer db init"
                        )
                    had_events = table_columns(conn, f"{table}_events") is not None
                    indexes_before = _indexes(conn, table)
                    # all or nothing: PostgreSQL's DDL is transactional
                    with conn.transaction():
                        conn.execute(
                            sql.SQL("set local lock_timeout = {}").format(
                                sql.Literal(SCHEMA_LOCK_TIMEOUT_MS)
                            )
                        )
                        for st in statements:
                            conn.execute(st)
                    after = table_columns(conn, table) or set()
                    new_indexes = sorted(_indexes(conn, table) - indexes_before)
                except psycopg.Error as exc:
                    why = "no answer in time" if g.fired else describe_error(exc)
                    raise CatalogUnavailable(f"{target.description}: {why}") from None
        finally:
            conn.close()
    finally:
        deadlines.close()
    if before is None:
        return f"created table {table} and {table}_events in {target.description}"
    added = sorted(after - before)
    parts = [f"added columns {', '.join(added)}"] if added else []
    if new_indexes and had_events:
        parts.append(f"added indexes {', '.join(new_indexes)}")
    if not had_events:
        parts.append(f"created {table}_events")
    did = "; ".join(parts) or "already up to date"
    return f"table {table} in {target.description}: {did}; every existing row kept"


def init_schema(target: PgTarget, table: str, metadata_columns: tuple[str, ...] = ()) -> str:
    """Create the catalog table, its indexes and its events table (an existing table is
    upgraded instead); returns a one-line summary."""
    return _apply(target, table, metadata_columns, init=True)


def upgrade_schema(target: PgTarget, table: str, metadata_columns: tuple[str, ...] = ()) -> str:
    """Add the missing columns, indexes and the events table to an existing (upstream)
    table, keeping its rows; safe to run again. Returns a one-line summary."""
    return _apply(target, table, metadata_columns, init=False)
