"""raw-transfer audit over every combination of catalog and destination, real servers.

A small archive is made by a real ``--backfill-only`` run; then an archived file is
deleted, an unknown one added, one truncated, one emptied, a byte of another corrupted,
a stale claim and an old temporary file left, a run number skipped, and three source
files never sent (one of them already in the archive, one claimed by a dead process).
The audit must find exactly those, in the right categories; ``--repair`` must fix
exactly the safe ones and touch no archived byte; after the service's next backfill a
second audit shows only what no repair may fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from rawtransfer import synth
from rawtransfer.catalog.base import Catalog, FileFacts, Owner, utc_from_epoch
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.config import build
from rawtransfer.destination.base import ArchiveEntry, Destination, in_date_tree
from rawtransfer.options import build_parser, settings_values
from rawtransfer.service import make_catalog
from rawtransfer.steps import hashing, pack
from tests.conftest import Tree
from tests.helpers import run_rt
from tests.ssh_fixture import SshServer
from tests.test_backends_e2e import Backend, make_backend
from tests.test_sftp_destination import dest, sftp_dest  # noqa: F401 - fixtures

META = r"t(?P<tel>\d)_r(?P<run>\d+)_ut(?P<ut>\d).fits"
NIGHT = ("2026", "11", "24")
TWO_HOURS_AGO = time.time() - 7200


def _frame(src: Path, run: int) -> Path:
    path = synth.write_frame(
        src / f"t1_r{run}_ut1.fits", (64, 64), seed=run, date_obs=f"2026-11-24T23:{run % 60:02d}:00"
    )
    os.utime(path, (TWO_HOURS_AGO, TWO_HOURS_AGO))  # settled, and not the watcher's any more
    return path


def _audit(b: Backend, tree: Tree, *args: str) -> subprocess.CompletedProcess[str]:
    return run_rt(
        "audit",
        tree.src,
        *b.dest_args,
        *b.catalog_args,
        "--metadata-regex",
        META,
        *args,
        env=b.env,
        timeout=300,
    )


def _json(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _names(report: dict[str, Any]) -> dict[str, set[str]]:
    """Each category's files by name (archive or source), run gaps as tel/night/first-last."""
    out: dict[str, set[str]] = {}
    for key, items in report["found"].items():
        if key == "run_gaps":
            out[key] = {f"{i['tel']}/{i['night']}/{i['first']}-{i['last']}" for i in items}
        else:
            out[key] = {PurePosixPath(i.get("path") or i["source"]).name for i in items}
    return {k: v for k, v in out.items() if v}


def _open_catalog(b: Backend, tree: Tree, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    for k in [k for k in os.environ if k.startswith("PG")]:
        monkeypatch.delenv(k)
    for k, v in b.env.items():
        if k.startswith("PG"):
            monkeypatch.setenv(k, v)
    ns = build_parser().parse_args(
        [str(tree.src), *b.dest_args, *b.catalog_args, "--metadata-regex", META]
    )
    return make_catalog(build(settings_values(ns)[0]))


def _archive(tree: Tree) -> dict[str, str]:
    return {
        str(p.relative_to(tree.dest)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(tree.dest.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(params=["sqlite-local", "sqlite-ssh", "postgres-local", "postgres-ssh"])
def backend(request: pytest.FixtureRequest, tree: Tree) -> Backend:
    catalog, destination = request.param.split("-")
    return make_backend(request, tree, catalog, destination)


def test_audit_finds_each_fault_and_repairs_only_the_safe_ones(
    backend: Backend, tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = backend
    # a night of telescope 1 without run 104; run 109 is corrupt (quarantined)
    src = {run: _frame(tree.src, run) for run in (100, 101, 102, 103, 105, 109)}
    raw = bytearray(src[109].read_bytes())
    raw[-100] ^= 4
    src[109].write_bytes(bytes(raw))
    os.utime(src[109], (TWO_HOURS_AGO, TWO_HOURS_AGO))
    r = b.run(tree.src, "--backfill-only", "--metadata-regex", META)
    assert r.returncode == 1, r.stdout + r.stderr  # the quarantined one

    # an archive as the service left it: only the quarantine and the skipped run
    clean = _json(_audit(b, tree, "--json", "--deep"))
    assert _names(clean) == {
        "unresolved": {"t1_r109_ut1.fits"},
        "run_gaps": {"1/2026-11-24/104-104"},
    }
    assert clean["looked_at"]["archive_files"] == 5 and clean["exit"] == 1

    day = tree.dest.joinpath(*NIGHT)
    archived = {run: day / f"t1_r{run}_ut1.fits.fz" for run in (100, 101, 102, 103, 105)}
    original_100 = hashing.sha1_file(archived[100])
    archived[100].unlink()  # lost
    archived[101].write_bytes(archived[101].read_bytes()[:2880])  # truncated
    data = bytearray(archived[102].read_bytes())
    data[3000] ^= 1  # one bit of another
    archived[102].write_bytes(bytes(data))
    archived[103].write_bytes(b"")  # emptied
    (day / "unknown.fits.fz").write_bytes(os.urandom(5760))  # dark, from nowhere
    tmp = day / ".t1_r105_ut1.fits.fz.0123456789ab.rt-tmp"  # an interrupted copy's
    tmp.write_bytes(b"x" * 1000)
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp, (two_days_ago, two_days_ago))
    spool = tmp_path / "spool"
    spool.mkdir()
    # dark, but exactly what its source packs to (a copy made by hand, say)
    src[106] = _frame(tree.src, 106)
    (day / "t1_r106_ut1.fits.fz").write_bytes(
        pack.pack(src[106], spool, float_images=False).read_bytes()
    )
    # claimed by a service killed before it copied anything
    src[107] = _frame(tree.src, 107)
    dead = subprocess.Popen(["true"])
    dead.wait()
    catalog = _open_catalog(b, tree, monkeypatch)
    try:
        packed_107 = hashing.sha1_file(pack.pack(src[107], spool, float_images=False))
        facts = FileFacts(
            str(src[107]),
            hashing.sha1_file(src[107]),
            src[107].stat().st_size,
            utc_from_epoch(TWO_HOURS_AGO),
        )
        claim = catalog.claim(packed_107, facts, Owner(socket.gethostname(), dead.pid), 600)
        assert claim.outcome == "claimed"
    finally:
        catalog.close()
    src[108] = _frame(tree.src, 108)  # arrived while the service was down

    found = {
        "lost": {"t1_r100_ut1.fits.fz"},
        "dark": {"t1_r106_ut1.fits.fz", "unknown.fits.fz"},
        "mismatch": {"t1_r101_ut1.fits.fz"},
        "zero_size": {"t1_r103_ut1.fits.fz"},
        "temporary": {tmp.name},
        "stale_claims": {"t1_r107_ut1.fits"},
        "unresolved": {"t1_r109_ut1.fits"},
        "never_transferred": {"t1_r106_ut1.fits", "t1_r107_ut1.fits", "t1_r108_ut1.fits"},
        "run_gaps": {"1/2026-11-24/104-104"},
    }
    r = _audit(b, tree, "--json")
    assert r.returncode == 1, r.stderr
    report = _json(r)
    assert _names(report) == found
    assert report["counts"]["lost"] == 1 and report["problems"] == 12
    # the corrupted byte is seen only by its SHA1, computed at the destination
    deep = _json(_audit(b, tree, "--json", "--deep"))
    assert _names(deep) == {**found, "mismatch": {"t1_r101_ut1.fits.fz", "t1_r102_ut1.fits.fz"}}
    whats = {PurePosixPath(i["path"]).name: i["what"] for i in deep["found"]["mismatch"]}
    assert whats == {"t1_r101_ut1.fits.fz": "size", "t1_r102_ut1.fits.fz": "sha1"}
    text = _audit(b, tree, "--deep")
    assert text.returncode == 1 and text.stderr == "", text.stderr
    print(text.stdout)
    assert "lost                 1" in text.stdout and "run 104" in text.stdout

    before = _archive(tree)
    r = _audit(b, tree, "--json", "--deep", "--repair")
    assert r.returncode == 1, r.stderr  # mismatches and the rest are left to a person
    rep = _json(r)["repair"]
    actions = {(a["action"], PurePosixPath(a.get("source") or "").name) for a in rep["actions"]}
    assert actions == {
        ("released", "t1_r107_ut1.fits"),
        ("removed_temporaries", ""),
        ("registered", "t1_r106_ut1.fits"),
        ("requeued", "t1_r100_ut1.fits"),
        ("requeued", "t1_r107_ut1.fits"),
        ("requeued", "t1_r108_ut1.fits"),
    }
    assert [(s["category"], s["path"]) for s in rep["not_repaired"]] == [
        ("dark", "2026/11/24/unknown.fits.fz")
    ]
    assert {k: n for k, n in rep["left"].items() if n} == {
        "dark": 1,
        "mismatch": 2,
        "zero_size": 1,
        "unresolved": 1,
        "run_gaps": 1,
    }
    # not one archived byte touched; only the old temporary file went
    del before[str(tmp.relative_to(tree.dest))]
    assert _archive(tree) == before
    rows = {PurePosixPath(str(x["source_filepath"])).name: x for x in b.rows()}
    assert rows["t1_r106_ut1.fits"]["state"] == "done"
    assert rows["t1_r106_ut1.fits"]["filepath"] == str(day / "t1_r106_ut1.fits.fz")
    assert rows["t1_r100_ut1.fits"]["state"] == "released"
    assert rows["t1_r107_ut1.fits"]["state"] == "released"
    retried = {
        PurePosixPath(str(e["source_filepath"])).name for e in b.events() if e["state"] == "retry"
    }
    assert retried == {"t1_r100_ut1.fits", "t1_r107_ut1.fits", "t1_r108_ut1.fits"}

    # the service's backfill takes what was re-queued, and nothing else
    r = b.run(tree.src, "--backfill-only", "--metadata-regex", META)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 done" in r.stdout, r.stdout
    assert hashing.sha1_file(archived[100]) == original_100
    after = _archive(tree)
    for name, digest in before.items():
        assert after[name] == digest, f"{name} changed"
    final = _json(_audit(b, tree, "--json", "--deep"))
    assert _names(final) == {
        "dark": {"unknown.fits.fz"},
        "mismatch": {"t1_r101_ut1.fits.fz", "t1_r102_ut1.fits.fz"},
        "zero_size": {"t1_r103_ut1.fits.fz"},
        "unresolved": {"t1_r109_ut1.fits"},
        "run_gaps": {"1/2026-11-24/104-104"},
    }
    # and again: nothing more to repair, nothing changes
    again = _json(_audit(b, tree, "--json", "--repair"))
    assert again["repair"]["actions"] == [] and _archive(tree) == after


def test_since_and_the_service_flags(
    request: pytest.FixtureRequest, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = make_backend(request, tree, "sqlite", "local")
    for run in (1, 2, 4):
        _frame(tree.src, run)
    assert b.run(tree.src, "--backfill-only").returncode == 0
    # the unit's whole command line, pasted: flags audit has no use for are ignored quietly
    pasted = [
        "--patterns",
        "*.fits",
        "--workers",
        "3",
        "--backfill-only",
        "--polling",
        "--keep-source",
        "--patience",
        "1",
        "--copy-timeout",
        "5",
        "--ssh-controlmaster",
        "--alert-after",
        "60",
        "--header-card",
        "DATE-OBS",
    ]
    r = _audit(b, tree, *pasted)
    assert r.returncode == 1 and r.stderr == "", r.stderr  # run 3 is missing
    assert "tel 1  night 2026-11-24  run 3" in r.stdout
    later = _json(_audit(b, tree, "--json", "--since", "2026-11-25"))
    assert later["looked_at"]["archive_files"] == 0 and later["exit"] == 0
    same = _json(_audit(b, tree, "--json", "--since", "2026-11-24"))
    assert same["looked_at"]["archive_files"] == 3 and _names(same) == {
        "run_gaps": {"1/2026-11-24/3-3"}
    }
    # an archived frame copied to another day: dark, and never registered a second time
    copy = tree.dest / "2026/11/25/t1_r1_ut1.fits.fz"
    copy.parent.mkdir()
    copy.write_bytes((tree.dest / "2026/11/24/t1_r1_ut1.fits.fz").read_bytes())
    rep = _json(_audit(b, tree, "--json", "--repair"))["repair"]
    assert rep["actions"] == []
    [skipped] = rep["not_repaired"]
    assert skipped["path"] == "2026/11/25/t1_r1_ut1.fits.fz"
    assert skipped["why"].startswith("the same content is recorded as done at ")
    assert copy.exists() and len(b.rows()) == 3
    # usage: 2; an archive root that is not there: 3
    assert run_rt("audit").returncode == 2
    assert _audit(b, tree, "--since", "yesterday").returncode == 2
    r = run_rt("audit", tree.src, tree.root / "nowhere", "--state-dir", tree.state)
    assert r.returncode == 3, r.stderr
    assert "--repair" in run_rt("audit", "--help").stdout


def test_list_archive_walks_only_the_date_tree(dest: tuple[Destination, Path]) -> None:  # noqa: F811
    d, root = dest
    files = {
        "2026/11/24/a.fits.fz": b"a" * 10,
        "2026/11/24/.a.fits.fz.0123456789ab.rt-tmp": b"t",
        "2026/11/25/b.fits.fz": b"",
        "2026/12/01/c.fits.fz": b"c" * 3,
        "2025/01/31/d.fits.fz": b"d",
        "2026/13/01/not-a-month.fits.fz": b"x",
        "2026/02/30/not-a-day.fits.fz": b"x",
        "lost+found/e.fits.fz": b"x",
        "2026/11/stray.fits.fz": b"x",  # not in a day directory
        "f.fits.fz": b"x",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "2026/11/24/link.fits.fz").symlink_to(root / "f.fits.fz")
    (root / "2026/11/26").symlink_to(root / "2026/11/25")  # a linked day is not walked

    def listing(since: Any = None) -> list[tuple[str, int]]:
        return [(str(e.rel), e.size) for e in d.list_archive(since)]

    everything = [
        ("2025/01/31/d.fits.fz", 1),
        ("2026/11/24/.a.fits.fz.0123456789ab.rt-tmp", 1),
        ("2026/11/24/a.fits.fz", 10),
        ("2026/11/25/b.fits.fz", 0),
        ("2026/12/01/c.fits.fz", 3),
    ]
    assert listing() == everything
    from datetime import date

    assert listing(date(2026, 11, 25)) == everything[3:]
    assert listing(date(2027, 1, 1)) == []
    entry = next(iter(d.list_archive()))
    assert isinstance(entry, ArchiveEntry) and abs(entry.mtime - time.time()) < 600
    assert in_date_tree(("2026", "02", "28")) and not in_date_tree(("2026", "02", "30"))


def test_list_archive_of_a_missing_root_is_unreachable(dest: tuple[Destination, Path]) -> None:  # noqa: F811
    from rawtransfer.errors import DestinationUnavailable

    d, root = dest
    root.rmdir()
    with pytest.raises(DestinationUnavailable):
        list(d.list_archive())


ARCHIVED = 100_000
DAYS = 100


def test_100000_archived_files_audit_quickly_over_ssh(
    sshd_server: SshServer, tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    """The archive is listed one day directory at a time, LIST_BATCH directories per
    pipelined request; the time is printed (not asserted: CI machines differ)."""
    started = time.monotonic()
    db = tree.state / "catalog.sqlite3"
    SqliteCatalog(db, "rawtransfer").close()
    rows = []
    for i in range(ARCHIVED):
        rel = f"2026/{1 + (i // 1000) // 28:02d}/{1 + (i // 1000) % 28:02d}/f{i:06d}.fits.fz"
        rows.append((hashlib.sha1(rel.encode()).hexdigest(), rel))
    days = sorted({rel.rsplit("/", 1)[0] for _, rel in rows})
    assert len(days) == DAYS
    for d in days:
        (tree.dest / d).mkdir(parents=True)
    for _, rel in rows:
        (tree.dest / rel).write_bytes(b"0123456789")
    import sqlite3

    con = sqlite3.connect(db)
    with con:
        con.executemany(
            "insert into rawtransfer (sha1_hash, source_filepath, filepath, state, packed_size) "
            "values (?, ?, ?, 'done', 10)",
            ((sha1, f"/elsewhere/{rel}", str(tree.dest / rel)) for sha1, rel in rows),
        )
    con.close()
    built = time.monotonic() - started

    ssh = sshd_server
    dest_args = [
        f"{ssh.user}@127.0.0.1:{tree.dest}",
        "--ssh-config",
        str(ssh.ssh_config),
        "--known-hosts",
        str(ssh.known_hosts),
    ]
    timings = {}
    for name, where in (("ssh", dest_args), ("local", [str(tree.dest)])):
        t0 = time.monotonic()
        r = run_rt("audit", tree.src, *where, "--state-dir", tree.state, "--json", timeout=600)
        timings[name] = time.monotonic() - t0
        report = _json(r)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        assert report["looked_at"]["archive_files"] == ARCHIVED
        assert report["looked_at"]["day_directories"] == DAYS
        assert report["looked_at"]["catalog_rows"] == ARCHIVED
        assert report["problems"] == 0
        timings[name + " (inside audit)"] = report["looked_at"]["seconds"]
    with capsys.disabled():
        print(
            f"\naudit of {ARCHIVED} archived files in {DAYS} day directories "
            f"(built in {built:.1f} s): " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        )
