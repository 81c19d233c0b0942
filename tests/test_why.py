"""``raw-transfer why FILE`` against both catalogs: the history a real backfill wrote
(done, quarantined, duplicate, failed, retried), found by source path, archive path,
bare name and SHA1; claims released, taken again and taken over, and tidying; a file
never seen."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from rawtransfer import synth
from rawtransfer.catalog.base import Catalog, FileFacts, Owner, State, utcnow
from rawtransfer.catalog.pg_connect import PgTarget
from rawtransfer.catalog.pg_schema import init_schema, upgrade_schema
from rawtransfer.catalog.postgres import PostgresCatalog
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.ops import why
from tests.conftest import Tree
from tests.helpers import run_rt, sha1
from tests.pg_fixture import PgServer, PgTable
from tests.test_backends_e2e import Backend, make_backend

DAY = Path("2026/11/24")  # synth frames' DATE-OBS


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tree: Tree) -> Backend:
    return make_backend(request, tree, request.param, "local")


def ask(b: Backend, *args: str | Path) -> tuple[int, str]:
    r = run_rt("why", *args, *b.catalog_args, "--patterns", "*.fits", env=b.env)
    assert r.stderr == "", r.stderr
    return r.returncode, r.stdout


def ask_json(b: Backend, key: str | Path) -> dict[str, Any]:
    code, out = ask(b, key, "--json")
    doc: dict[str, Any] = json.loads(out)
    assert code == (0 if doc["found"] else 1)
    return doc


def test_why_tells_what_happened_to_each_file(backend: Backend, tree: Tree) -> None:
    good = synth.night(tree.src, 3, (64, 48))
    second = tree.src / "t1_r99999_ut1.fits"
    shutil.copy(good[1], second)  # the same content under a second name
    bad = synth.write_frame(tree.src / "t2_r66666_ut2.fits", (64, 64), seed=66)
    b = bytearray(bad.read_bytes())
    b[-100] ^= 4
    bad.write_bytes(bytes(b))
    conflict = synth.write_frame(tree.src / "t1_r20000_ut1.fits", (64, 48), seed=77)
    (tree.dest / DAY).mkdir(parents=True)
    (tree.dest / DAY / "t1_r20000_ut1.fits.fz").write_bytes(b"another file holds the name")
    tree.settled()
    r = backend.run(tree.src, "--backfill-only", "--workers", "3")
    assert r.returncode == 1, r.stdout + r.stderr

    # by source path: claimed, then done with its archive path and SHA1
    archived = tree.dest / DAY / (good[0].name + ".fz")
    code, text = ask(backend, good[0])
    print(text)
    assert code == 0
    assert "claimed" in text and f"archived as {archived}, sha1 {sha1(archived)}" in text
    doc = ask_json(backend, good[0])
    (f,) = doc["files"]
    assert f["source"] == str(good[0]) and doc["matched_by"] == "path"
    assert [e["state"] for e in f["events"]] == ["claimed", "done"]
    done = f["events"][1]
    assert done["reason"] == str(archived) and done["sha1"] == sha1(archived)
    assert done["host"] and isinstance(done["pid"], int)
    assert f["rows"][0]["state"] == "done" and f["rows"][0]["raw_sha1"] == sha1(good[0])

    # the same file by its archive path, its name, the archive's name, either SHA1
    for key, how in (
        (archived, "path"),
        (good[0].name, "name"),
        (archived.name, "name"),
        (sha1(archived), "sha1"),
        (sha1(good[0]).upper(), "sha1"),
    ):
        doc = ask_json(backend, key)
        assert doc["matched_by"] == how, key
        assert [x["source"] for x in doc["files"]] == [str(good[0])], key

    # quarantined, with the reason
    doc = ask_json(backend, bad.name)
    (f,) = doc["files"]
    assert [e["state"] for e in f["events"]] == ["quarantined"]
    assert "checksum" in f["events"][0]["reason"]

    # a duplicate says of which file (which of the two names went first is a race)
    dup, first = (second, good[1])
    if ask_json(backend, second)["files"][0]["events"][-1]["state"] == "done":
        dup, first = first, dup
    code, text = ask(backend, dup)
    print(text)
    assert code == 0 and "duplicate" in text and f"same content as {first}" in text
    # asked by the content's SHA1, both names come up
    doc = ask_json(backend, sha1(tree.dest / DAY / (first.name + ".fz")))
    assert sorted(x["source"] for x in doc["files"]) == sorted([str(dup), str(first)])

    # failed (another file holds the name), then retried by an operator
    r = run_rt("retry", conflict, *backend.catalog_args, env=backend.env)
    assert r.returncode == 0, r.stdout + r.stderr
    code, text = ask(backend, conflict)
    print(text)
    doc = ask_json(backend, conflict)
    states = [e["state"] for e in doc["files"][0]["events"]]
    assert states == ["claimed", "failed", "retry"], states
    assert "different content" in doc["files"][0]["events"][1]["reason"]
    assert "retry asked by" in doc["files"][0]["events"][2]["reason"]
    assert "failed" in text and "retry" in text

    # never seen: says so, and whether the service would take it
    code, text = ask(backend, tree.src / "t9_r1_ut1.fits")
    assert code == 1 and "never seen" in text and "matches --patterns '*.fits'" in text
    code, text = ask(backend, "notes.txt")
    assert code == 1 and "does not match --patterns" in text and "never taken" in text
    code, text = ask(backend, "0" * 40)
    assert code == 1 and "no file with this SHA1" in text


# ---------------------------------------------------------------------------------------
# the rest of a claim's life, through the catalog API, on both catalogs


@pytest.fixture(params=["sqlite", "postgres"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    cat: Catalog
    if request.param == "postgres":
        pg: PgServer = request.getfixturevalue("pg_server")
        table: PgTable = request.getfixturevalue("pg_table")
        target = PgTarget.build(pg.host, pg.port, pg.user, pg.dbname)
        init_schema(target, table.name)
        cat = PostgresCatalog(target, table.name, pool_size=1)
    else:
        cat = SqliteCatalog(tmp_path / "catalog.sqlite3", "rawtransfer")
    try:
        yield cat
    finally:
        cat.close()


def test_claims_released_taken_again_taken_over_and_tidied(catalog: Catalog) -> None:
    src = "/data/raw/t1_r10001_ut2.fits"
    facts = FileFacts(src, "b" * 40, 100, utcnow(), 50, date(2026, 11, 24))
    a, b, c = Owner("tel-a", 11), Owner("tel-b", 22), Owner("tel-c", 33)
    assert catalog.claim("a" * 40, facts, a, 600).outcome == "claimed"
    catalog.release("a" * 40, a, "stopping: SIGTERM")
    assert catalog.claim("a" * 40, facts, b, 600).outcome == "claimed"
    # b's lease (of 0 s) has expired by the time c looks
    assert catalog.claim("a" * 40, facts, c, 0.0).taken_over_from == str(b)
    catalog.mark_done("a" * 40, "/archive/2026/11/24/t1_r10001_ut2.fits.fz", c)
    catalog.record_event("a" * 40, src, State.DONE, "original replaced by t1_r10001_ut2.fits.fz", c)
    catalog.record_event(None, src, State.CHANGED, "rewritten while it was packed", c)

    history = catalog.history("t1_r10001_ut2.fits.fz", [])
    assert history.matched_by == "name"
    lines = [why.describe(e) for e in history.events]
    assert [x.label for x in lines] == [
        "claimed",
        "released",
        "claimed",
        "taken over",
        "done",
        "tidied",
        "changed",
    ]
    assert lines[2].text == "claimed again (released)"
    assert lines[3].text == "took over a stale claim of tel-b:22"
    assert (
        lines[4].text == f"archived as /archive/2026/11/24/t1_r10001_ut2.fits.fz, sha1 {'a' * 40}"
    )
    assert [e.host for e in history.events][:4] == ["tel-a", "tel-a", "tel-b", "tel-c"]
    text = why.render("t1_r10001_ut2.fits.fz", history)
    print(text)
    assert "tel-c:33" in text and "taken over" in text and "tidied" in text
    assert "catalog now: done" in text
    # by the raw file's SHA1 too; nothing by a path that is not there
    assert catalog.history("B" * 40, []).events == history.events
    assert catalog.history("/elsewhere/x.fits", ["/elsewhere/x.fits"]).events == []


def test_a_name_seen_on_many_nights_lists_each_file(catalog: Catalog) -> None:
    owner = Owner("h", 1)
    for night in range(3):
        src = f"/data/raw/2026-11-{20 + night}/flat.fits"
        facts = FileFacts(src, f"{night:040x}", 10, utcnow() - timedelta(days=3 - night))
        catalog.mark_failed(f"{night:040x}", facts, State.QUARANTINED, "not FITS", owner)
    history = catalog.history("flat.fits", ["flat.fits"])
    assert sorted({e.source_filepath for e in history.events}) == [
        f"/data/raw/2026-11-{20 + n}/flat.fits" for n in range(3)
    ]
    assert len(history.rows) == 3


def test_db_upgrade_adds_the_look_up_indexes(pg_server: PgServer, pg_table: PgTable) -> None:
    """A table prepared by an older release lacks the indexes that why and status use."""
    target = PgTarget.build(pg_server.host, pg_server.port, pg_server.user, pg_server.dbname)
    init_schema(target, pg_table.name)
    with pg_server.connect() as conn:
        for suffix in ("name_idx", "events_name_idx"):
            conn.execute(f'drop index "{pg_table.name}_{suffix}"')
    said = upgrade_schema(target, pg_table.name)
    assert f"added indexes {pg_table.name}_events_name_idx, {pg_table.name}_name_idx" in said
    assert "already up to date" in upgrade_schema(target, pg_table.name)
