"""The source scan (watch.scan) against the plain definition it replaces for speed:
``os.walk`` without following links, each path asked of ``Selection.wants``."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from rawtransfer.selection import read_rules
from rawtransfer.watch import Matcher, scan, scan_paths

RULES = ("calib/", "*_test.fits", "/focus/**", "nights/*/junk.fits", "old[0-9].fits", "x/y")


def reference(
    root: Path, matcher: Matcher, newer_than: float | None = None
) -> Iterator[tuple[Path, os.stat_result]]:
    """What the scan did before it was written for speed, less the error reporting."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and matcher.excluded(here / d, is_dir=True) is None
        )
        for name in sorted(filenames):
            if not matcher(name):
                continue
            path = Path(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                matcher.say_once(here / name, "not a regular file (links are not followed)")
                continue
            if newer_than is not None and st.st_mtime < newer_than:
                continue
            if not matcher.wants(here / name, st.st_size):
                continue
            yield path, st


def _file(p: Path, data: bytes = b"x", age: float = 0.0) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    if age:
        t = time.time() - age
        os.utime(p, (t, t))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel in (
        "a.fits",
        "b.fits",
        "z/deep/er/c.fits",
        "2026-11-24/t1_r1_ut1.fits",
        "2026-11-24/calib/flat.fits",
        "calib/bias.fits",
        "calib.fits",
        "x_test.fits",
        "focus/a.fits",
        "focus/sub/a.fits",
        "other/focus/a.fits",
        "nights/n1/junk.fits",
        "q/nights/n1/junk.fits",
        "nights/n1/deeper/junk.fits",
        "old1.fits",
        "old12.fits",
        "x/y",
        "w/x/y",
        "frame.fits.tmp",
        "core",
        "core.12",
        "up.fits.part",
        ".hidden.fits",
        ".staging/a.fits",
        "d/.staging/b.fits",
        "with space [1].fits",
        "quote'name\n.fits",
        "notes.txt",
    ):
        _file(root / rel)
    _file(root / "empty.fits", b"")
    _file(root / "old" / "stale.fits", age=48 * 3600)
    (root / "link.fits").symlink_to(root / "a.fits")
    (root / "dangling.fits").symlink_to(root / "nowhere")
    (root / "linked_dir").symlink_to(root / "z", target_is_directory=True)
    (root / "linked.fits").symlink_to(root / "z", target_is_directory=True)
    os.mkfifo(root / "pipe.fits")
    (root / "dir.fits").mkdir()
    _file(root / "dir.fits" / "in_dir.fits")
    return root


@pytest.mark.parametrize("rules", [(), RULES])
@pytest.mark.parametrize("newer", [None, 24 * 3600])
def test_the_scan_takes_what_the_plain_definition_takes(
    src: Path, rules: tuple[str, ...], newer: float | None
) -> None:
    patterns = ("*.fits", "*.tmp", "core*", "*.part", "x*", "y")
    fast, slow = Matcher(patterns, read_rules(rules)), Matcher(patterns, read_rules(rules))
    since = None if newer is None else time.time() - newer
    got = [(p, (st.st_ino, st.st_mtime_ns)) for p, st in scan(src, fast, since)]
    want = [(p, (st.st_ino, st.st_mtime_ns)) for p, st in reference(src, slow, since)]
    assert got == want  # the same files, in the same order, with their lstat
    assert list(fast._said) == list(slow._said)  # and the same "not taken" said once
    assert fast.excluded_count == slow.excluded_count
    assert any("not a regular file" in k for k in fast._said)
    assert [str(p) for p, _ in scan(src, fast, since)] == [
        p for p, _ in scan_paths(src, fast, since)
    ]
    if not rules:
        assert src / "calib" / "bias.fits" in {p for p, _ in got}
    else:
        assert src / "calib" / "bias.fits" not in {p for p, _ in got}


def test_an_abandoned_scan_leaves_no_descriptor_open(src: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    it = scan_paths(src, Matcher(("*.fits",)))
    next(it)
    it.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_catalog_read_of_a_backfill_pass_merges_as_before(tmp_path: Path) -> None:
    """SQLite's handled_sources leaves out in SQL the done rows that merge_handled would
    drop (their path's latest event is in the window) and takes the latest of a path's
    rows in Python: the same answer as the grouped query it replaced."""
    from datetime import timedelta

    from rawtransfer.catalog.base import merge_handled, utcnow
    from rawtransfer.catalog.sqlite import SqliteCatalog, _events, _rows, _ts

    cat = SqliteCatalog(tmp_path / "c.sqlite3", "rawtransfer")
    now = utcnow()
    since, old, recent = (
        now - timedelta(hours=1),
        now - timedelta(hours=2),
        now - timedelta(minutes=5),
    )
    rows = [  # (sha1, path, state, created, updated)
        ("a1", "/d/upstream.fits", "done", recent, None),
        ("b1", "/d/two.fits", "done", old, recent - timedelta(minutes=1)),
        ("b2", "/d/two.fits", "done", old, recent),
        ("c1", "/d/old_event.fits", "done", old, recent),
        ("d1", "/d/new_retry.fits", "done", old, recent),
        ("e1", "/d/new_done.fits", "done", old, recent),
        ("f1", "/d/too_old.fits", "done", old, old),
        ("g1", "/d/failed.fits", "failed", recent, recent),
    ]
    events = [  # (at, path, state, identity)
        (old, "/d/old_event.fits", "failed", None),
        (recent, "/d/new_retry.fits", "done", "1:2:3:4:5"),
        (recent, "/d/new_retry.fits", "retry", None),
        (recent, "/d/new_done.fits", "done", "1:2:3:4:6"),
        (recent, "/d/event_only.fits", "quarantined", "1:2:3:4:7"),
    ]
    db = cat._db
    for sha, path, state, created, updated in rows:
        db.execute(
            f"insert into {cat.t} (sha1_hash, source_filepath, state, created_at, updated_at) "
            "values (?, ?, ?, ?, ?)",
            (sha, path, state, _ts(created), _ts(updated)),
        )
    for at, path, state, identity in events:
        db.execute(
            f"insert into {cat.ev} (at, source_filepath, state, identity) values (?, ?, ?, ?)",
            (_ts(at), path, state, identity),
        )
    ev = db.execute(
        f"select e.source_filepath, e.at, e.state, e.identity from {cat.ev} e "
        f"where e.at >= ? and e.id = (select max(id) from {cat.ev} f "
        "where f.source_filepath = e.source_filepath)",
        (_ts(since),),
    ).fetchall()
    grouped = db.execute(
        f"select source_filepath, max(coalesce(updated_at, created_at)) from {cat.t} "
        "where state = 'done' and source_filepath is not null "
        "and coalesce(updated_at, created_at) >= ? group by source_filepath",
        (_ts(since),),
    ).fetchall()
    before = merge_handled(_events(ev), _rows(grouped))
    got = cat.handled_sources(since)
    assert got == before
    assert set(got) == {
        "/d/upstream.fits",
        "/d/two.fits",
        "/d/old_event.fits",
        "/d/new_done.fits",
        "/d/event_only.fits",
    }
    assert got["/d/two.fits"].at == recent and got["/d/new_done.fits"].identity == "1:2:3:4:6"
    cat.close()


def test_the_catalog_read_without_upstream_rows_matches_the_grouped_query(
    tmp_path: Path,
) -> None:
    """When every done row's path has its latest event in the window (the usual case),
    handled_sources reads only their paths: the same answer as the grouped query."""
    from datetime import timedelta

    from rawtransfer.catalog.base import merge_handled, utcnow
    from rawtransfer.catalog.sqlite import SqliteCatalog, _events, _rows, _ts

    cat = SqliteCatalog(tmp_path / "c.sqlite3", "rawtransfer")
    now = utcnow()
    since, recent = now - timedelta(hours=1), now - timedelta(minutes=5)
    db = cat._db
    for i, state in enumerate(("done", "done", "failed")):
        path = f"/d/f{i}.fits"
        db.execute(
            f"insert into {cat.t} (sha1_hash, source_filepath, state, updated_at) "
            "values (?, ?, ?, ?)",
            (f"s{i}", path, state, _ts(recent)),
        )
        for at, st in ((recent - timedelta(minutes=1), "claimed"), (recent, state)):
            db.execute(
                f"insert into {cat.ev} (at, source_filepath, state, identity) values (?, ?, ?, ?)",
                (_ts(at), path, st, f"1:{i}:3:4:5" if i else None),
            )
    ev = db.execute(
        f"select source_filepath, at, state, identity from {cat.ev} e where at >= ? and "
        f"id = (select max(id) from {cat.ev} f where f.source_filepath = e.source_filepath)",
        (_ts(since),),
    ).fetchall()
    grouped = db.execute(
        f"select source_filepath, max(coalesce(updated_at, created_at)) from {cat.t} "
        "where state = 'done' and coalesce(updated_at, created_at) >= ? group by 1",
        (_ts(since),),
    ).fetchall()
    got = cat.handled_sources(since)
    assert got == merge_handled(_events(ev), _rows(grouped))
    assert got["/d/f0.fits"].identity is None and got["/d/f0.fits"].at == recent
    assert got["/d/f2.fits"].state == "failed"


def test_handled_sources_answers_as_handled_records() -> None:
    """HandledSources keeps each record as one string: what it answers, and covers, is
    what the Handled records it stands for answer."""
    from datetime import datetime

    from rawtransfer.catalog.base import Handled, HandledSources, handled_record

    at = datetime(2026, 1, 2, 3, 4, 5, 6)
    marks = {
        "/a": Handled(at, "done", "1:2:3:4:5"),
        "/b": Handled(at.replace(microsecond=0), "failed", None),  # "...:05", no fraction
        "/c": Handled(at, "quarantined", "1:2:3:4:6"),
    }
    h = HandledSources({p: handled_record(m.at, m.state, m.identity) for p, m in marks.items()})
    assert dict(h.items()) == marks and len(h) == 3 and "/a" in h and "/x" not in h
    assert h.get("/x") is None
    # text as SQLite keeps it gives the same record
    assert handled_record("2026-01-02 03:04:05.000006", "done", "1:2:3:4:5") == h.records["/a"]
    later = 4_000_000_000 * 10**9  # an mtime (ns) after the record: not covered by time
    for ident in ("1:2:3:4:5", "1:2:3:4:55", "1:2:3:4:6", f"1:2:3:{later}:7", "9:9:9:9:9"):
        for src, mark in marks.items():
            assert h.covers(src, ident) == mark.covers(ident), (src, ident)
    assert not h.covers("/x", "1:2:3:4:5")
    del h["/a"]
    assert set(h) == {"/b", "/c"}


def test_identity_text_is_the_identity_as_recorded(tmp_path: Path) -> None:
    from rawtransfer.steps.snapshot import Identity, identity_text

    f = tmp_path / "f"
    f.write_bytes(b"x")
    st = os.lstat(f)
    assert identity_text(st) == str(Identity.of(st))
